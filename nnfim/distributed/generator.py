"""A :class:`~nnfim.Generator` whose results cover the union of every rank's shard.

Each rank runs the ordinary generator on its own loader, which normalises by
its own example count; the results are then rescaled to sums over the global
count and all-reduced (diagonals, dense and block matrices, K-FAC factors,
EKFAC diagonals, matrix-free products), or gathered in rank order (low-rank
factors, Jacobians, per-example gradients, the NTK's layer inputs and output
gradients). Before any data moves the ranks exchange their example counts and
whether they failed (:func:`~nnfim.distributed.collectives.agree`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from nnfim.distributed.collectives import (
    DistributedError,
    Group,
    _check_fingerprints,
    _collective,
    agree,
    all_reduce_sum,
    fingerprint,
    gather_cat,
    rank_seed,
    rank_world,
)
from nnfim.generator._passes import Additive, LayerIO, batch_size
from nnfim.generator.jacobian import Generator
from nnfim.generator.shared import Use, Uses
from nnfim.vector import PVector

__all__ = ["DistributedGenerator", "make_generator"]

#: counts travel in floating buffers as ``hi * _SPLIT + lo``, both exact
_SPLIT = 1 << 20


def _leaves(tree: Any) -> list[torch.Tensor]:
    if isinstance(tree, torch.Tensor):
        return [tree]
    if isinstance(tree, dict):  # keys sorted: ranks may have built them in any order
        return [t for k in sorted(tree) for t in _leaves(tree[k])]
    if isinstance(tree, (tuple, list)):
        return [t for v in tree for t in _leaves(v)]
    raise TypeError(f"cannot reduce a {type(tree).__name__}")


def _rebuild(tree: Any, it: Iterator[torch.Tensor]) -> Any:
    if isinstance(tree, torch.Tensor):
        return next(it)
    if isinstance(tree, dict):
        values = {k: _rebuild(tree[k], it) for k in sorted(tree)}
        return {k: values[k] for k in tree}
    return type(tree)(_rebuild(v, it) for v in tree)


class DistributedGenerator(Generator):
    """The generator of one rank; every result is that of all ranks' data together.

    Arguments are :class:`~nnfim.Generator`'s, plus the process group. The
    Monte-Carlo seed of rank ``r`` is ``rank_seed(seed, r)``.

    Args:
        model: the network, the same on every rank.
        loader: this rank's shard (e.g. a ``DataLoader`` with a
            ``DistributedSampler``); shards may differ in size but none may be
            empty.
        group: the process group (None: the default group).
        **kwargs: :class:`~nnfim.Generator`'s keyword arguments.

    Raises:
        RuntimeError: no process group is initialised.

    >>> dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    >>> gen = DistributedGenerator(nn.Linear(3, 2), [torch.randn(4, 3)])
    >>> gen.diag().shape
    torch.Size([8])
    >>> dist.destroy_process_group()
    """

    def __init__(
        self,
        model: nn.Module,
        loader: Iterable[Any],
        *,
        group: Group = None,
        **kwargs: Any,
    ) -> None:
        self.group = group
        self.rank, self.world_size = rank_world(group)
        seed = kwargs.pop("seed", 0)
        super().__init__(model, loader, seed=rank_seed(seed, self.rank), **kwargs)
        self.base_seed = seed
        self._n_local: int | None = None

    # -- local passes, counted ------------------------------------------------
    def layer_pass(
        self,
        consume: Callable[[dict[str, torch.Tensor], dict[str, torch.Tensor]], None]
        | Additive,
        join: bool = False,
    ) -> int:
        """This rank's pass (see :meth:`Generator.layer_pass`); returns the local count."""
        self._n_local = super().layer_pass(consume, join)
        return self._n_local

    def _tangents(
        self, v: PVector
    ) -> Iterator[tuple[int, list[int], slice, Any, torch.Tensor, torch.Tensor]]:
        seen = 0
        for item in super()._tangents(v):
            seen += item[4].shape[0]
            yield item
        self._n_local = seen

    def local_count(self) -> int:
        """This rank's number of examples (counted without a forward pass if it can)."""
        if self._n_local is None:
            total = 0
            with torch.no_grad(), self._guard():
                for index, batch in self._batches():
                    n = batch_size(batch)
                    total += (
                        n if n is not None else self._forward(index, batch).shape[0]
                    )
            self._n_local = total
        return self._n_local

    def _attempt(self, compute: Callable[[], Any]) -> tuple[Any, BaseException | None]:
        try:
            return compute(), None
        except Exception as exc:  # told to the other ranks by agree()
            return None, exc

    def _agree(self, what: str, compute: Callable[[], Any]) -> tuple[Any, list[int]]:
        """Run ``compute`` locally, then agree on success and exchange counts."""
        self._n_local = None
        result, error = self._attempt(compute)
        count = 0 if error is not None or self._n_local is None else self._n_local
        counts = agree(
            what,
            count,
            error,
            group=self.group,
            device=self.device,
            params=list(self.params.values()),
        )
        return result, counts

    def _mean(self, what: str, compute: Callable[[], Any]) -> Any:
        """Global mean from ``compute``'s local means: ``sum_r n_r mean_r / N``."""
        local, counts = self._agree(what, compute)
        summed = all_reduce_sum(
            _leaves(local),
            scale=counts[self.rank] / sum(counts),
            group=self.group,
            what=what,
        )
        return _rebuild(local, iter(summed))

    def _gather(
        self, what: str, compute: Callable[[], torch.Tensor], dim: int
    ) -> torch.Tensor:
        local, counts = self._agree(what, compute)
        return gather_cat(local, counts, dim, group=self.group, what=what)

    # -- reduced quantities ---------------------------------------------------
    def diag(self) -> torch.Tensor:
        """Diagonal over all ranks' data, ``(P,)``."""
        return self._mean("diag", super().diag)

    def dense(self) -> torch.Tensor:
        """Dense Fisher over all ranks' data, ``(P, P)``."""
        return self._mean("dense", super().dense)

    def block_diag(self) -> dict[str, torch.Tensor]:
        """Per-layer blocks over all ranks' data."""
        return self._mean("block_diag", super().block_diag)

    def quasi_diag(self) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Diagonal and weight-bias cross terms over all ranks' data."""
        return self._mean("quasi_diag", super().quasi_diag)

    def kfac(
        self,
        convention: str = "expand",
        io: LayerIO | None = None,
        terms: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] | None = None,
    ) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], dict[str, torch.Tensor]]:
        """K-FAC factors and exact blocks over all ranks' data.

        ``io`` keeps this rank's layer inputs and gradients, ``terms`` receives
        the sums of Kronecker terms (see the base class).
        """

        def compute() -> Any:
            local: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] | None = (
                None if terms is None else {}
            )
            factors, blocks = super(DistributedGenerator, self).kfac(
                convention, io, local
            )
            return factors, blocks, local or {}

        factors, blocks, summed = self._mean("kfac", compute)
        if terms is not None:
            terms.update({k: [tuple(t) for t in v] for k, v in summed.items()})
        return factors, blocks

    def ekfac_diag(
        self,
        bases: dict[str, tuple[torch.Tensor, torch.Tensor]],
        io: LayerIO | None = None,
    ) -> dict[str, torch.Tensor]:
        """EKFAC scalings over all ranks' data (the bases must agree on every rank).

        ``io``: this rank's kept K-FAC pass, used instead of a new local pass.
        """

        def compute() -> dict[str, torch.Tensor]:
            out = super(DistributedGenerator, self).ekfac_diag(bases, io)
            if io is not None and io.complete:  # no pass ran to count the shard
                self._n_local = io.n
            return out

        return self._mean("ekfac_diag", compute)

    def factor(self) -> torch.Tensor:
        """``U`` of shape ``(K * N, P)`` over all ranks, rows in rank order, ``F = U^T U``."""
        p = self.layer_collection.numel()
        local, counts = self._agree("factor", super().factor)
        n, total = counts[self.rank], sum(counts)
        rows = local.reshape(-1, n, p) * math.sqrt(n / total)
        return gather_cat(rows, counts, 1, group=self.group, what="factor").reshape(
            -1, p
        )

    def mv(self, v: PVector) -> PVector:
        """``F v`` over all ranks' data: a local pass, then one all-reduce.

        The example count, the failure flags and the parameters' fingerprints
        travel in the product's buffer.
        """
        self._n_local = None
        local, error = self._attempt(lambda: super(DistributedGenerator, self).mv(v))
        if error is None:
            n = self._n_local or 0
            flat = local.flatten() * n
        else:
            n = 0
            flat = torch.zeros(
                self.layer_collection.numel(), dtype=self.dtype, device=self.device
            )
        # count, failure flags and parameter fingerprints ride in the same buffer
        world = self.world_size
        status = flat.new_zeros(2 + 3 * world)
        status[0], status[1] = n // _SPLIT, n % _SPLIT
        status[2 + self.rank] = float(error is not None)
        fp = fingerprint(list(self.params.values())).to(flat.dtype)
        status[2 + world + 2 * self.rank : 4 + world + 2 * self.rank] = fp
        buf = torch.cat([flat, status])
        _collective("mv", self.group, lambda: dist.all_reduce(buf, group=self.group))
        if error is not None:
            raise error
        tail = buf[flat.numel() :].tolist()  # the one host sync of a product
        failed = [r for r, bad in enumerate(tail[2 : 2 + world]) if bad]
        if failed:
            raise DistributedError(
                f"nnfim.distributed: rank(s) {failed} raised during mv; this rank "
                f"stops too (see the error on rank(s) {failed})."
            )
        fps = torch.tensor(tail[2 + world :], dtype=flat.dtype).reshape(world, 2)
        _check_fingerprints("mv", fps)
        total = int(round(tail[0])) * _SPLIT + int(round(tail[1]))
        return PVector.from_flat(self.layer_collection, buf[: flat.numel()] / total)

    # -- example-indexed quantities, gathered ---------------------------------
    def row_blocks(self) -> torch.Tensor:
        """Per-example rows ``J_i^T d_ki`` of all ranks, ``(K, N, P)``, in rank order."""

        def local() -> torch.Tensor:
            parts: list[torch.Tensor] = []
            self.row_pass(parts.append)
            return torch.cat(parts, 1)

        return self._gather("row_blocks", local, 1)

    def jvp(self, v: PVector) -> torch.Tensor:
        """``J v`` for every example of every rank, ``(N, C)``, in rank order."""
        return self._gather("jvp", lambda: super(DistributedGenerator, self).jvp(v), 0)

    def vjp(self, u: torch.Tensor) -> PVector:
        """``sum_i J_i^T u_i`` over all ranks, ``u`` of shape ``(N, C)`` in rank order."""

        def local() -> torch.Tensor:
            self.local_count()
            return torch.zeros(())

        _, counts = self._agree("vjp", local)
        if u.shape[0] != sum(counts):
            raise ValueError(
                f"vjp: the function-space vector has {u.shape[0]} examples, the "
                f"ranks' loaders yield {sum(counts)} ({counts} per rank)."
            )
        start = sum(counts[: self.rank])
        part, _ = self._agree(
            "vjp",
            lambda: (
                super(DistributedGenerator, self)
                .vjp(u[start : start + counts[self.rank]])
                .flatten()
            ),
        )
        (total,) = all_reduce_sum([part], group=self.group, what="vjp")
        return PVector.from_flat(self.layer_collection, total)

    def _union_io(
        self,
        io: list[tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]],
        counts: list[int],
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Every rank's layer inputs and output gradients, concatenated in rank order."""
        xs: dict[str, Any] = {}
        gys: dict[str, torch.Tensor] = {}
        for name in io[0][0]:
            if isinstance(io[0][0][name], Uses):  # a layer with several uses
                parts: list[Any] = [b[0][name] for b in io]
                xs[name], gys[name] = self._union_uses(parts, counts)
                continue
            x = torch.cat([b[0][name] for b in io], 0)
            if x.dim() and x.shape[0]:
                xs[name] = gather_cat(x, counts, 0, group=self.group, what="gram")
            else:  # fallback layers carry their rows in the gradients
                xs[name] = x
            gy = torch.cat([b[1][name] for b in io], 1)
            gys[name] = gather_cat(gy, counts, 1, group=self.group, what="gram")
        return xs, gys

    def _union_uses(
        self, parts: list[Uses], counts: list[int]
    ) -> tuple[Uses, torch.Tensor]:
        """Every rank's uses of one layer, each call's tensors concatenated in rank order."""
        items = []
        for calls in zip(*(p.items for p in parts), strict=True):
            x = torch.cat([u.x for u in calls], 0)
            gy = torch.cat([u.gy for u in calls], 1)
            items.append(
                Use(
                    calls[0].site,
                    gather_cat(x, counts, 0, group=self.group, what="gram"),
                    gather_cat(gy, counts, 1, group=self.group, what="gram"),
                )
            )
        k, n = items[0].gy.shape[:2]
        return Uses(items), items[0].gy.new_empty(k, n, 0)

    def gram(self, other: Generator | None = None) -> torch.Tensor:
        """Gram matrix over all ranks' examples, ``(K, N, K2, N2)``, unnormalised.

        Each rank computes the rows of its own examples against the gathered
        layer inputs and output gradients of every rank, then the rows are
        gathered: every rank ends with the whole matrix.
        """
        if other is not None and not isinstance(other, DistributedGenerator):
            raise ValueError(
                "gram: with distributed=True both loaders must be sharded the same way."
            )
        left, counts = self._agree("gram", self.layer_io)
        if other is None:
            right_io, right_counts = left, counts
        else:
            right_io, right_counts = other._agree("gram", other.layer_io)
        right = self._union_io(right_io, right_counts)
        rows = [self.gram_block(xs1, gys1, *right) for xs1, gys1 in left]
        return gather_cat(torch.cat(rows, 1), counts, 1, group=self.group, what="gram")


def make_generator(
    model: nn.Module,
    loader: Iterable[Any],
    distributed: bool | dist.ProcessGroup,
    **kwargs: Any,
) -> Generator:
    """A :class:`Generator`, or a :class:`DistributedGenerator` when asked.

    Args:
        model: the network.
        loader: the data (this rank's shard when distributed).
        distributed: False (this process's data only), True (the default
            process group) or a ``torch.distributed.ProcessGroup``.
        **kwargs: the generator's keyword arguments.
    """
    if distributed is False or distributed is None:
        return Generator(model, loader, **kwargs)
    group = None if distributed is True else distributed
    return DistributedGenerator(model, loader, group=group, **kwargs)
