"""Collective building blocks over ``torch.distributed`` (gloo on CPU, NCCL on GPU).

Every function here is a collective: all ranks of the group call it in the
same order with tensors of matching shapes. Failures are agreed on before any
data moves (:func:`agree`), so that a rank that raised makes the others raise
a :class:`DistributedError` naming it instead of waiting forever.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

import torch
import torch.distributed as dist

if dist.is_available():
    # torch.distributed.nn.functional takes ``group=group.WORLD`` as a default
    # argument, so the default group of the moment is kept in its functions'
    # defaults. torch imports it lazily, the first time an optimizer is
    # constructed (torch._dynamo) -- usually after init_process_group. That
    # group then outlives destroy_process_group(), and its gloo threads are
    # torn down during interpreter exit, which can abort the process
    # ("terminate called without an active exception"). Imported here, with
    # nnfim, it usually finds no group yet and keeps none.
    import torch.distributed.nn.functional  # noqa: F401

__all__ = [
    "DistributedError",
    "agree",
    "all_reduce_mean",
    "all_reduce_sum",
    "assign_by_cost",
    "broadcast_by_owner",
    "distributed_eigh",
    "fingerprint",
    "gather_cat",
    "rank_seed",
    "rank_world",
]

T = TypeVar("T")
Group = Any  # torch.distributed.ProcessGroup, or None for the default group

_MASK64 = (1 << 64) - 1


class DistributedError(RuntimeError):
    """Another rank failed, or a collective operation failed or timed out."""


def rank_world(group: Group = None) -> tuple[int, int]:
    """``(rank, world_size)`` in ``group``, after checking a group is initialised.

    Raises:
        RuntimeError: ``torch.distributed`` is unavailable or not initialised.
    """
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            "nnfim: distributed=True needs an initialised process group: call "
            "torch.distributed.init_process_group(...) first (torchrun sets the "
            "environment for init_method='env://'), or drop distributed=True to "
            "compute this rank's matrix on its own data."
        )
    return dist.get_rank(group), dist.get_world_size(group)


def _collective(what: str, group: Group, fn: Callable[[], T]) -> T:
    """Run one collective call; its failure becomes a :class:`DistributedError`."""
    try:
        return fn()
    except RuntimeError as exc:  # DistBackendError and gloo's errors derive from it
        if isinstance(exc, DistributedError):
            raise
        rank = dist.get_rank(group) if dist.is_initialized() else "?"
        raise DistributedError(
            f"nnfim.distributed: {what} failed on rank {rank} ({exc}). Another rank "
            "probably raised or exited before reaching this collective (see its "
            "traceback), or did not answer within the process group's timeout "
            "(init_process_group(timeout=...))."
        ) from exc


def _bind(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Callable[[], Any]:
    """``fn`` with its arguments bound now (a lambda in a loop binds late)."""
    return lambda: fn(*args, **kwargs)


def rank_seed(seed: int, rank: int) -> int:
    """The Monte-Carlo seed of ``rank`` derived from the user's ``seed``.

    Rank 0 keeps ``seed`` (one process gives the non-distributed result); the
    others get a splitmix64 hash of ``(seed, rank)``, so ranks draw different
    samples and a run is reproducible for a given world size.

    >>> rank_seed(7, 0), rank_seed(7, 1) == rank_seed(7, 1), rank_seed(7, 1) != 7
    (7, True, True)
    """
    if rank == 0:
        return seed
    z = (seed * 0x9E3779B97F4A7C15 + rank) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) & ((1 << 63) - 1)


def fingerprint(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Two float64 numbers that differ between ranks holding different parameters.

    Returns:
        ``(2,)``: the sum and the sum of absolute values of every entry.
    """
    total = torch.stack([t.detach().sum(dtype=torch.float64) for t in tensors])
    absolute = torch.stack([t.detach().abs().sum(dtype=torch.float64) for t in tensors])
    return torch.stack([total.sum(), absolute.sum()])


def _check_fingerprints(what: str, fps: torch.Tensor) -> None:
    """Raise on every rank alike when ``fps`` ``(world, 2)`` differ from rank 0's."""
    rtol = 8 * torch.finfo(fps.dtype).eps
    same = torch.isclose(fps, fps[0].expand_as(fps), rtol=rtol, atol=0.0).all(1)
    differ = [r for r, ok in enumerate(same.tolist()) if not ok]
    if differ:
        raise ValueError(
            f"nnfim.distributed: during {what}, the model's parameters on rank(s) "
            f"{differ} differ from rank 0's; every rank must hold the same model "
            "(broadcast the parameters first, or wrap the model in "
            "DistributedDataParallel, which does at construction)."
        )


def agree(
    what: str,
    count: int,
    error: BaseException | None,
    *,
    group: Group = None,
    device: torch.device | str = "cpu",
    params: Sequence[torch.Tensor] = (),
) -> list[int]:
    """Exchange every rank's example count and whether it failed; raise if one did.

    Args:
        what: the operation, for messages.
        count: this rank's number of examples (0 where it failed).
        error: the exception this rank raised, or None.
        group: the process group (default: the default group).
        device: where the small exchange tensor lives (CUDA for NCCL).
        params: the model's parameters, checked to be the same on every rank
            (through :func:`fingerprint`).

    Returns:
        Every rank's count, in rank order.

    Raises:
        BaseException: ``error`` itself on the rank that failed.
        DistributedError: on the other ranks, naming the ranks that failed.
        ValueError: on every rank, the parameters differ between ranks.
    """
    _, world = rank_world(group)
    fp = fingerprint(params) if params else torch.zeros(2, dtype=torch.float64)
    mine = torch.cat(
        [
            torch.tensor([count, int(error is not None)], device=device),
            fp.to(device).view(torch.int64),
        ]
    )
    parts = [torch.empty_like(mine) for _ in range(world)]
    _collective(
        f"the status exchange of {what}",
        group,
        lambda: dist.all_gather(parts, mine, group=group),
    )
    gathered = torch.stack(parts)
    status = gathered[:, :2].tolist()
    if error is not None:
        raise error
    failed = [r for r, (_, bad) in enumerate(status) if bad]
    if failed:
        raise DistributedError(
            f"nnfim.distributed: rank(s) {failed} raised during {what}; this rank "
            f"stops too (see the error on rank(s) {failed})."
        )
    _check_fingerprints(what, gathered[:, 2:].contiguous().view(torch.float64))
    return [c for c, _ in status]


def _pack(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def _unpack(buf: torch.Tensor, like: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    out, start = [], 0
    for t in like:
        out.append(buf[start : start + t.numel()].view(t.shape))
        start += t.numel()
    return out


def all_reduce_sum(
    tensors: Sequence[torch.Tensor],
    *,
    scale: float = 1.0,
    group: Group = None,
    what: str = "a sum",
) -> list[torch.Tensor]:
    """Sum of each tensor (times ``scale``) over the ranks, one all-reduce per dtype.

    Args:
        tensors: same shapes and dtypes on every rank (left unchanged).
        scale: this rank's factor, applied in the packed buffer (no extra copy).
        group: the process group (default: the default group).
        what: the operation, for messages.

    Returns:
        New tensors, the sums, identical on every rank.
    """
    out: list[torch.Tensor | None] = [None] * len(tensors)
    by_dtype: dict[torch.dtype, list[int]] = {}
    for i, t in enumerate(tensors):
        by_dtype.setdefault(t.dtype, []).append(i)
    for idx in by_dtype.values():
        like = [tensors[i] for i in idx]
        buf = _pack(like)
        if scale != 1.0:
            buf.mul_(scale)
        _collective(what, group, _bind(dist.all_reduce, buf, group=group))
        for i, t in zip(idx, _unpack(buf, like), strict=True):
            out[i] = t
    return [t for t in out if t is not None]


def all_reduce_mean(
    tensors: Sequence[torch.Tensor], weight: float = 1.0, *, group: Group = None
) -> list[torch.Tensor]:
    r"""Weighted mean over the ranks, :math:`\sum_r w_r t_r / \sum_r w_r`.

    For K-FAC factors averaged over ranks whose batches differ in size, pass
    each rank's example count as ``weight``. The weight travels in the same
    buffer: one all-reduce per dtype.

    Args:
        tensors: same shapes and dtypes (floating) on every rank.
        weight: this rank's weight (positive in total over ranks).
        group: the process group (default: the default group).

    Returns:
        New tensors, identical on every rank.

    Raises:
        ValueError: the weights sum to zero or less.

    >>> dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    >>> all_reduce_mean([torch.ones(2)], weight=3.0)
    [tensor([1., 1.])]
    >>> dist.destroy_process_group()
    """
    if not tensors:
        return []
    dtype = tensors[0].dtype
    if any(t.dtype != dtype for t in tensors):
        raise ValueError("all_reduce_mean: give tensors of a single dtype.")
    w = torch.tensor([weight], dtype=dtype, device=tensors[0].device)
    buf = _pack([t * weight for t in tensors] + [w])
    _collective("all_reduce_mean", group, lambda: dist.all_reduce(buf, group=group))
    total = float(buf[-1])
    if total <= 0:
        raise ValueError(
            f"all_reduce_mean: the weights sum to {total}; give positive weights."
        )
    return [t / total for t in _unpack(buf[:-1], tensors)]


def gather_cat(
    tensor: torch.Tensor,
    counts: Sequence[int],
    dim: int = 0,
    *,
    group: Group = None,
    what: str = "a gather",
) -> torch.Tensor:
    """Concatenate every rank's ``tensor`` along ``dim``, in rank order.

    Sizes along ``dim`` may differ (uneven shards): each rank pads to the
    largest, and the padding is trimmed after the all-gather.

    Args:
        tensor: this rank's part; other dimensions equal on every rank.
        counts: every rank's size along ``dim`` (from :func:`agree`).
        dim: the dimension to concatenate.
        group: the process group (default: the default group).
        what: the operation, for messages.

    Returns:
        The concatenation, identical on every rank.
    """
    dim = dim % tensor.dim()
    top = max(counts)
    pad = top - tensor.shape[dim]
    if pad:
        shape = list(tensor.shape)
        shape[dim] = pad
        tensor = torch.cat([tensor, tensor.new_zeros(shape)], dim)
    tensor = tensor.contiguous()
    parts = [torch.empty_like(tensor) for _ in counts]
    _collective(what, group, lambda: dist.all_gather(parts, tensor, group=group))
    return torch.cat(
        [p.narrow(dim, 0, c) for p, c in zip(parts, counts, strict=True)], dim
    )


def assign_by_cost(costs: Sequence[float], world_size: int) -> list[int]:
    """Owner rank of each job, balancing the total cost per rank (KAISA).

    Greedy longest-processing-time: jobs by decreasing cost (ties by index) go
    to the least loaded rank (ties by lowest rank); deterministic, so every
    rank computes the same assignment.

    Args:
        costs: one non-negative cost per job, e.g. ``size ** 3`` for an
            eigendecomposition.
        world_size: the number of ranks.

    Returns:
        The owner rank of each job, in the order of ``costs``.

    Raises:
        ValueError: ``world_size`` below 1 or a negative cost.

    >>> assign_by_cost([8.0, 1.0, 4.0, 4.0], 2)
    [0, 0, 1, 1]
    """
    if world_size < 1:
        raise ValueError(f"assign_by_cost: world_size must be >= 1, got {world_size}.")
    if any(c < 0 for c in costs):
        raise ValueError(f"assign_by_cost: costs must be non-negative, got {costs}.")
    loads = [(0.0, r) for r in range(world_size)]
    owners = [0] * len(costs)
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        load, rank = heapq.heappop(loads)
        owners[i] = rank
        heapq.heappush(loads, (load + costs[i], rank))
    return owners


def broadcast_by_owner(
    tensors: Mapping[str, Sequence[torch.Tensor]],
    owners: Mapping[str, int],
    *,
    group: Group = None,
) -> None:
    """Fill every rank's ``tensors[name]`` in place with those of ``owners[name]``.

    Each rank passes tensors of the right shapes and dtypes for every name
    (values only matter on the owner); each owner's tensors travel packed in
    one broadcast per (owner, dtype).

    Args:
        tensors: name -> tensors, same keys, shapes and dtypes on every rank.
        owners: name -> owner rank (e.g. from :func:`assign_by_cost`), in
            group rank numbering.
        group: the process group (default: the default group).

    Raises:
        ValueError: a name without an owner.
    """
    missing = sorted(set(tensors) - set(owners))
    if missing:
        raise ValueError(f"broadcast_by_owner: no owner for {missing}.")
    rank, world = rank_world(group)
    for owner in range(world):
        names = [n for n in tensors if owners[n] == owner]
        flat = [t for n in names for t in tensors[n]]
        by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
        for t in flat:
            by_dtype.setdefault(t.dtype, []).append(t)
        for like in by_dtype.values():
            buf = _pack(like)
            src = owner if group is None else dist.get_global_rank(group, owner)
            _collective(
                "broadcast_by_owner",
                group,
                _bind(dist.broadcast, buf, src, group=group),
            )
            if rank != owner:
                for t, new in zip(like, _unpack(buf, like), strict=True):
                    t.copy_(new)


def distributed_eigh(
    matrices: Mapping[str, torch.Tensor],
    *,
    group: Group = None,
    owners: Mapping[str, int] | None = None,
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``torch.linalg.eigh`` of each matrix, spread over ranks by cost, then broadcast.

    Every rank passes the same (already reduced) symmetric matrices, e.g.
    K-FAC factors of shape ``(..., d, d)``; matrix ``name`` is decomposed on
    one rank (by default :func:`assign_by_cost` with cost ``batch * d^3``) and
    broadcast, so every rank holds the owner's eigenvectors bit for bit.

    Args:
        matrices: name -> ``(..., d, d)`` symmetric tensor, same on every rank.
        group: the process group (default: the default group).
        owners: name -> owner rank, instead of the cost-balanced assignment.

    Returns:
        name -> ``(eigenvalues (..., d), eigenvectors (..., d, d))``.

    Raises:
        DistributedError: an eigendecomposition failed on another rank.

    >>> dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    >>> evals, evecs = distributed_eigh({"fc": torch.eye(3)[None] * 2})["fc"]
    >>> evals
    tensor([[2., 2., 2.]])
    >>> dist.destroy_process_group()
    """
    rank, world = rank_world(group)
    names = list(matrices)
    if owners is None:
        costs = [
            float(m.numel() // max(m.shape[-1] * m.shape[-2], 1)) * m.shape[-1] ** 3
            for m in matrices.values()
        ]
        owners = dict(zip(names, assign_by_cost(costs, world), strict=True))
    out: dict[str, list[torch.Tensor]] = {}
    error: BaseException | None = None
    for name, m in matrices.items():
        if owners[name] == rank and error is None:
            try:
                evals, evecs = torch.linalg.eigh(m)
                # eigh returns column-major eigenvectors; the other ranks receive
                # row-major copies, and later products must round alike everywhere
                out[name] = [evals.contiguous(), evecs.contiguous()]
                continue
            except Exception as exc:  # told to the others by agree()
                error = exc
        out[name] = [m.new_empty(m.shape[:-1]), torch.empty_like(m)]
    device = next(iter(matrices.values())).device if matrices else "cpu"
    agree("distributed_eigh", 0, error, group=group, device=device)
    broadcast_by_owner(out, owners, group=group)
    return {name: (v[0], v[1]) for name, v in out.items()}
