"""Helpers of the generator's passes: batches, batched backward, contexts."""

from __future__ import annotations

import contextlib
import os
import platform
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

#: With ``sub_batch="auto"``, batches are split only where ``K`` copies of the
#: layer outputs would pass this many elements (64 MiB in float32).
SUB_BATCH_ELEMENTS = 1 << 24
#: On CPU, with ``sub_batch="auto"``, a sub-batch keeps what its forward saves
#: for the backward and its ``K`` output gradients under this many bytes
#: (``F v`` and ``J v``: what the dual forward saves). A batch is cut into as
#: many sub-batches as that takes, of equal sizes, and on CPU a sub-batch's
#: tensors stay alive until the next one's forward. Measured on the benchmark
#: CNN (batches of 128; alternating processes, 3 rounds; before
#: :func:`prime_heap` existed): the exact diagonal went from 180 to 191 MiB in
#: one piece to 62 to 64 MiB in pieces of 41 (same time within the noise);
#: pieces of 32 that stay alive until the next
#: forward then took 1.83 to 1.85 s and 52 to 55 MiB, against 2.04 to 2.09 s
#: for pieces of 41 and 5 freed before it (0.29 to 0.31 million page faults
#: a call against 0.40 to 0.46: freed first, glibc hands the memory back and
#: the next piece faults it in again). ``F v``: 229 to 251 MiB to 64 to 73
#: MiB, 471 to 486 ms to 437 to 460 ms. Smaller budgets cost time (8 MiB: the
#: diagonal 2.20 to 2.28 s, 31 to 33 MiB).
CPU_PIECE_BYTES = 16 << 20
#: On CPU, with ``sub_batch="auto"``, consecutive loader batches of the same
#: shapes are joined into one piece while the piece stays under this many
#: bytes (and under ``CPU_PIECE_BYTES``), counted as for ``CPU_PIECE_BYTES``:
#: fewer, larger matrix products and less work per batch, for more memory;
#: 0 never joins. Joined: ``F v``, ``J v`` and the passes that sum
#: per-example products (diagonals, K-FAC, the EKFAC refit). Measured on the
#: benchmark MLP (8 batches of 256; the suite's child processes, medians of 3
#: alternating rounds of 3 calls; its whole data fits in one piece):
#:
#: ==============  ===================  ===================  ===================
#: quantity        unjoined             8 MiB                16 MiB
#: ==============  ===================  ===================  ===================
#: ``F v``         25.7 to 26.4 ms,     21.0 ms, 22 MiB      19.1 to 19.8 ms,
#:                 8 MiB                                     33 MiB
#: MC diagonal     18.4 to 18.8 ms,     15.8 ms, 20 MiB      15.5 ms, 32 MiB
#:                 6 to 7 MiB
#: exact diagonal  35 to 36 ms,         35.5 ms, 26 MiB      33 to 35 ms,
#:                 20 to 25 MiB                              39 MiB
#: K-FAC           60 ms, 32 to 33 MiB  56.9 ms, 33 MiB      55 to 57 ms,
#:                                                           40 to 46 MiB
#: ==============  ===================  ===================  ===================
CPU_JOIN_BYTES = 16 << 20
#: Bytes of the one block :func:`prime_heap` allocates and frees.
HEAP_PRIME_BYTES = 24 << 20
_heap_primed = False


def prime_heap() -> None:
    """Once per process, on glibc: let the heap keep freed blocks of passes.

    glibc serves a block above its mmap threshold (128 KiB at the start) by
    ``mmap``; when it frees such a block of up to 32 MiB, it raises the
    threshold to that block's size and its heap trim threshold to twice that
    (its documented dynamic threshold). Until a process has freed a large
    block, the heap hands its top back to the system whenever more than the
    low threshold is free, and a pass that allocates and frees sub-batch
    after sub-batch faults the same memory in again and again. Allocating and
    freeing one block of ``HEAP_PRIME_BYTES`` (never written, so no page is
    touched) raises the thresholds as any program's large temporary does.
    Afterwards the process keeps up to twice that much freed memory at the top
    of its heap instead of returning it. Measured on the benchmark CNN's exact
    diagonal (alternating processes, 3 rounds): 1.66 to 1.77 s and 0.28 to 0.32
    million page faults a call, primed 1.34 to 1.46 s and under 400; the floor
    (plain forward and backward passes) moved within its noise. The
    environment variable ``NNFIM_PRIME_HEAP=0`` leaves the allocator alone.
    """
    global _heap_primed
    if _heap_primed:
        return
    _heap_primed = True
    if os.environ.get("NNFIM_PRIME_HEAP", "1") == "0":
        return
    if platform.libc_ver()[0] == "glibc":
        torch.empty(HEAP_PRIME_BYTES, dtype=torch.uint8)


#: Per-example gradient rows of fallback layers held at once (16 MiB in
#: float32): with ``sub_batch="auto"`` batches are split to stay under it.
#: Writing fewer, fresh rows is also faster than one huge allocation.
FALLBACK_ROW_ELEMENTS = 1 << 22
#: Output-gradient elements gathered over sub-batches before K-FAC's products.
KFAC_GATHER_ELEMENTS = 1 << 18
#: Elements of layer inputs and output gradients that an EKFAC build with
#: ``ekfac_refit=True`` keeps from its K-FAC pass (128 MiB in float32); above
#: it, the refit runs a second pass instead.
EKFAC_IO_ELEMENTS = 1 << 25


class Gather:
    """Collect a layer's tensors over calls, concatenate them, then call ``fn`` once.

    A few large matrix products run far faster than many thin ones; the
    held tensors stay below ``KFAC_GATHER_ELEMENTS`` elements (counted on the
    last tensor of each call). Each call's ``i``-th tensor is concatenated
    along ``dims[i]``: by default ``(x, gy)`` pairs, examples along 0 and 1.
    """

    def __init__(self, fn: Callable[..., None], dims: tuple[int, ...] = (0, 1)) -> None:
        self.fn = fn
        self.dims = dims
        self.pending: dict[str, list[tuple[torch.Tensor, ...]]] = {}

    def add(self, name: str, *tensors: torch.Tensor) -> None:
        items = self.pending.get(name)
        if items and not self._joins(items[-1], tensors):
            self.flush(name)
        items = self.pending.setdefault(name, [])
        items.append(tensors)
        if sum(i[-1].numel() for i in items) >= KFAC_GATHER_ELEMENTS:
            self.flush(name)

    def _joins(
        self, last: tuple[torch.Tensor, ...], new: tuple[torch.Tensor, ...]
    ) -> bool:
        """Whether ``new`` concatenates to ``last`` (e.g. the same number of directions)."""
        for a, b, dim in zip(last, new, self.dims, strict=True):
            if a.dim() != b.dim():
                return False
            if (
                a.shape[:dim] != b.shape[:dim]
                or a.shape[dim + 1 :] != b.shape[dim + 1 :]
            ):
                return False
        return True

    def flush(self, name: str | None = None) -> None:
        for key in [name] if name is not None else list(self.pending):
            items = self.pending.pop(key, [])
            if len(items) == 1:
                self.fn(key, *items[0])
            elif items:
                self.fn(
                    key,
                    *(
                        torch.cat([i[j] for i in items], dim)
                        for j, dim in enumerate(self.dims)
                    ),
                )


class Additive:
    """A consumer of :meth:`Generator.layer_pass` additive over output directions.

    Per (sub-)batch the pass calls :meth:`batch` once with the layer inputs,
    then :meth:`directions` once or more with output gradients of a subset of
    the ``K`` directions (every direction exactly once), then :meth:`batch_end`.
    Where the directions are backpropagated one after the other (graphs with
    convolutions) they are streamed one at a time: ``K`` copies of the layer
    outputs are never stacked, and work that depends on the inputs only is done
    once per batch, in :meth:`batch`.
    """

    def batch(self, xs: dict[str, torch.Tensor]) -> None:
        """Input-side work of a (sub-)batch: layer name -> input ``(n, ...)``."""

    def directions(
        self, xs: dict[str, torch.Tensor], gys: dict[str, torch.Tensor]
    ) -> None:
        """Output gradients ``(K_chunk, n, ...)`` of some of the directions."""
        raise NotImplementedError

    def batch_end(self) -> None:
        """Called after the last :meth:`directions` of a (sub-)batch."""


class Streamed(Additive):
    """An additive consumer from a function ``consume(xs, gys)``."""

    def __init__(
        self,
        consume: Callable[[dict[str, torch.Tensor], dict[str, torch.Tensor]], None],
    ) -> None:
        self.consume = consume

    def directions(
        self, xs: dict[str, torch.Tensor], gys: dict[str, torch.Tensor]
    ) -> None:
        self.consume(xs, gys)


class LayerIO:
    """Layer inputs and output gradients of a pass, kept while under a budget.

    Lets a second statistic of the same pass (EKFAC's refit after K-FAC's
    factors) be computed without a second forward and backward. Once the held
    tensors would pass ``budget`` elements everything is dropped and
    ``complete`` turns False: the caller then runs a pass of its own. Each
    item is one (sub-)batch: its inputs, and its output gradients as the list
    of direction chunks the pass streamed.
    """

    def __init__(self, budget: int) -> None:
        #: the layers kept, set by the pass that fills it
        self.names: list[str] = []
        #: examples seen by that pass
        self.n = 0
        self.budget = budget
        self.items: list[
            tuple[dict[str, torch.Tensor], list[dict[str, torch.Tensor]]]
        ] = []
        self.held = 0
        self.complete = budget > 0

    def _fits(self, size: int) -> bool:
        if self.held + size > self.budget:
            self.items, self.held, self.complete = [], 0, False
        else:
            self.held += size
        return self.complete

    def batch(self, xs: dict[str, torch.Tensor]) -> None:
        """Start a (sub-)batch with its layer inputs."""
        if self.complete and self._fits(sum(xs[n].numel() for n in self.names)):
            self.items.append(({n: xs[n].detach() for n in self.names}, []))

    def add(self, gys: dict[str, torch.Tensor]) -> None:
        """Output gradients of some directions of the current (sub-)batch."""
        if self.complete and self._fits(sum(gys[n].numel() for n in self.names)):
            self.items[-1][1].append({n: gys[n].detach() for n in self.names})

    def replay(self, consumer: Additive) -> None:
        """Hand the kept tensors to ``consumer`` as the pass did."""
        for xs, chunks in self.items:
            consumer.batch(xs)
            for gys in chunks:
                consumer.directions(xs, gys)
            consumer.batch_end()


def has_quasi_structure(layer: Any) -> bool:
    shapes = dict(layer.params)
    return (
        list(shapes) == ["weight", "bias"]
        and len(shapes["bias"]) == 1
        and shapes["weight"][0] == shapes["bias"][0]
    )


#: Autograd nodes whose batching rules loop over the batched dimension and
#: concatenate (convolutions, pooling): with them in the graph, backpropagating
#: the directions one after the other is 2-4x faster than one batched backward
#: (measured on CPU, torch 2.13; see benchmarks/README.md).
SLOW_BATCHING_NODES = ("Convolution", "Pool")


def batching_is_slow(out: torch.Tensor, limit: int = 100_000) -> bool:
    """Whether ``out``'s autograd graph holds a node with a looping batching rule."""
    seen: set[Any] = set()
    stack = [out.grad_fn]
    while stack and len(seen) < limit:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if any(key in type(node).__name__ for key in SLOW_BATCHING_NODES):
            return True
        stack.extend(fn for fn, _ in node.next_functions)
    return False


def graph_consumers(out: torch.Tensor) -> dict[int, int]:
    """Per leaf tensor (by ``id``), the autograd nodes reachable from ``out`` using it."""
    users: dict[int, set[Any]] = {}
    seen: set[Any] = set()
    stack = [out.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        for fn, _ in node.next_functions:
            if fn is None:
                continue
            leaf = getattr(fn, "variable", None)
            if leaf is not None:
                users.setdefault(id(leaf), set()).add(node)
            else:
                stack.append(fn)
    return {k: len(v) for k, v in users.items()}


def output_grads(
    out: torch.Tensor,
    tensors: list[torch.Tensor],
    directions: torch.Tensor,
    batched: bool = True,
) -> tuple[list[torch.Tensor], bool]:
    """Gradients of ``directions . out`` w.r.t. each tensor, shape ``(K, *t.shape)``.

    The ``K`` directions go through one batched backward (``is_grads_batched``)
    when ``batched``. Where PyTorch has no batching rule for an operation of the
    graph (it warns of a "performance drop" and loops internally, slowly), the
    directions are backpropagated one after the other from the same forward
    pass instead, and the returned flag says so for the next batches.

    Returns:
        The gradients, and whether batching should be used next time.
    """
    k = directions.shape[0]
    if not tensors:
        return [], batched
    if k == 1:
        grads = torch.autograd.grad(out, tensors, directions[0], allow_unused=True)
        stacked: list[torch.Tensor | None] = [
            None if g is None else g[None] for g in grads
        ]
    elif batched:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            grads = torch.autograd.grad(
                out, tensors, directions, is_grads_batched=True, allow_unused=True
            )
        stacked = list(grads)
        batched = not any("batching rule" in str(w.message) for w in caught)
        for w in caught:
            if "batching rule" not in str(w.message):
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    else:
        per_direction = [
            torch.autograd.grad(
                out, tensors, directions[j], retain_graph=j < k - 1, allow_unused=True
            )
            for j in range(k)
        ]
        stacked = [
            None
            if per_direction[0][i] is None
            else torch.stack([g[i] for g in per_direction])
            for i in range(len(tensors))
        ]
    return [
        torch.zeros((k, *t.shape), dtype=t.dtype, device=t.device) if g is None else g
        for g, t in zip(stacked, tensors, strict=True)
    ], batched


def direction_grads(
    out: torch.Tensor, tensors: list[torch.Tensor], directions: torch.Tensor
) -> Iterator[list[torch.Tensor]]:
    """Gradients of ``directions[j] . out``, one direction after the other.

    Yields, for each of the ``K`` directions, the gradients w.r.t. each tensor
    with a leading direction axis of size 1, ``(1, *t.shape)`` (zeros where a
    tensor does not influence ``out``); the graph is freed after the last.
    """
    k = directions.shape[0]
    for j in range(k):
        if not tensors:
            yield []
            continue
        grads = torch.autograd.grad(
            out, tensors, directions[j], retain_graph=j < k - 1, allow_unused=True
        )
        yield [
            t.new_zeros((1, *t.shape)) if g is None else g[None]
            for g, t in zip(grads, tensors, strict=True)
        ]


def batch_size(batch: Any) -> int | None:
    """Leading size of a tensor batch, or of a tuple/list of tensors (else None)."""
    if isinstance(batch, torch.Tensor):
        return batch.shape[0] if batch.dim() else None
    if isinstance(batch, (tuple, list)) and batch:
        sizes = {t.shape[0] for t in batch if isinstance(t, torch.Tensor) and t.dim()}
        return sizes.pop() if len(sizes) == 1 else None
    return None


def slice_batch(batch: Any, sl: slice, n: int) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch[sl]
    return type(batch)(
        t[sl] if isinstance(t, torch.Tensor) and t.dim() and t.shape[0] == n else t
        for t in batch
    )


def join_layout(batch: Any) -> tuple[Any, ...] | None:
    """What must match for batches to be joined along examples, or None.

    A tensor, or a plain tuple/list of tensors that all have the same leading
    size: their types, trailing shapes, dtypes and devices. None for anything
    else (a dict, a scalar, a shared tensor, a named tuple), never joined.
    """
    if isinstance(batch, torch.Tensor):
        if not batch.dim():
            return None
        return (torch.Tensor, batch.shape[1:], batch.dtype, batch.device)
    if type(batch) not in (tuple, list) or not batch:
        return None
    if not all(isinstance(t, torch.Tensor) and t.dim() for t in batch):
        return None
    if len({t.shape[0] for t in batch}) != 1:
        return None
    return (type(batch), *((t.shape[1:], t.dtype, t.device) for t in batch))


def join_batches(batches: list[Any]) -> Any:
    """Batches of one :func:`join_layout` as one, examples in order."""
    first = batches[0]
    if isinstance(first, torch.Tensor):
        return _joined_tensor(batches)
    return type(first)(_joined_tensor(list(p)) for p in zip(*batches, strict=True))


def _joined_tensor(parts: list[torch.Tensor]) -> torch.Tensor:
    """``torch.cat(parts)``, or a view where they lie end to end in one storage.

    Batches cut from one tensor (``x.split(256)``, ``x[i:i + b]``) are such
    parts: viewed whole, they are joined without a copy (the MLP benchmark's
    inputs: 6.4 MB a call). Never for tensors that require gradients, whose
    views autograd would tie to the first part alone.
    """
    first = parts[0]
    if len(parts) > 1 and all(map(_viewable, parts)):
        storage = first.untyped_storage().data_ptr()
        end = first.storage_offset()
        for part in parts:
            if part.untyped_storage().data_ptr() != storage or (
                part.storage_offset() != end
            ):
                break
            end += part.numel()
        else:
            shape = (sum(part.shape[0] for part in parts), *first.shape[1:])
            stride = torch.empty(shape, device="meta").stride()  # allocates nothing
            return first.as_strided(shape, stride, first.storage_offset())
    return torch.cat(parts)


def _viewable(t: torch.Tensor) -> bool:
    """Whether ``t``'s elements are its storage's, in order, with no lazy flag.

    A lazy conjugate or negation is a flag of the view, not of the storage.
    """
    return (
        t.layout is torch.strided
        and t.is_contiguous()
        and not (t.requires_grad or t.is_conj() or t.is_neg())
    )


def repeated_to(batch: Any, m: int) -> Any:
    """``batch``, or copies of it joined to at least ``m`` examples.

    Only where it has fewer than ``m``; a batch that :func:`join_layout`
    refuses is left as it is.
    """
    n = batch_size(batch)
    if n is None or n >= m or join_layout(batch) is None:
        return batch
    return join_batches([batch] * -(-m // n))


def negligible_zeroed(d: torch.Tensor) -> torch.Tensor:
    """Output directions ``(K, n, ...)`` with negligible entries set to zero.

    An entry below ``eps^2`` times the largest of its example (``eps`` the
    dtype's machine epsilon) moves that example's Fisher by less than
    ``eps^2`` relative, far below the rounding of the passes themselves. A
    confident softmax has such entries (products of probabilities as small as
    1e-26), and their products in the backward pass and the factors fall
    below the smallest normal float (1.2e-38 in float32), which x86 CPUs
    compute on a slow path: zeroed, the transformer's exact K-FAC ran 5.5 x
    faster on an Intel Xeon.
    """
    if not d.is_floating_point() or d.dim() < 2 or d.numel() == 0:
        return d
    eps = torch.finfo(d.dtype).eps
    mag = d.abs()
    dims = [0, *range(2, d.dim())]
    scale = mag.amax(dim=dims, keepdim=True)
    return d.masked_fill(mag < (eps * eps) * scale, 0.0)


def math_attention() -> Any:
    """Fused attention kernels have no forward-mode rule: use the math one."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # torch < 2.3 has no such switch
        return contextlib.nullcontext()
    return sdpa_kernel([SDPBackend.MATH])


@contextlib.contextmanager
def padding_lookups_constant(model: nn.Module) -> Iterator[None]:
    """Give an embedding's padding lookups no forward-mode derivative.

    Reverse mode gives the padding row no gradient from its lookups; forward
    mode must agree, or ``J v`` and ``J^T u`` would describe two different
    Jacobians (the row may still be used elsewhere, e.g. by a tied head).
    """

    def hook(
        module: nn.Module, args: tuple[Any, ...], output: torch.Tensor
    ) -> torch.Tensor:
        assert isinstance(module, nn.Embedding)
        pad = (args[0] == module.padding_idx)[..., None]
        return torch.where(pad, output.detach(), output)

    handles = [
        m.register_forward_hook(hook)
        for m in model.modules()
        if isinstance(m, nn.Embedding) and m.padding_idx is not None
    ]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
