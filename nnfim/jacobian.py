"""Per-example Jacobians as a parameter-to-function map, and per-example gradients."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from nnfim.distributed.generator import DistributedGenerator, make_generator
from nnfim.generator._passes import batch_size
from nnfim.generator.jacobian import Generator, OutputFn
from nnfim.layers import LayerCollection
from nnfim.vector import FVector, PVector

__all__ = ["Jacobian", "per_example_grads"]


class Jacobian:
    """The Jacobian of a model's outputs over a loader, ``(C, n, P)``.

    :meth:`jvp` (``PVector -> FVector``, forward mode) and :meth:`vjp`
    (``FVector -> PVector``, one backward per batch) are matrix-free;
    :meth:`dense` materialises it, ``chunk_size`` examples at a time.

    Args:
        model: the network (left untouched).
        loader: batches ``inputs`` or ``(inputs, ...)``, same order every pass.
        layer_collection: the parameters (default: all trainable ones).
        function: ``(model, batch) -> outputs (n, C)``.
        n_output: expected ``C`` (checked).
        device: where batches go (default: the model's device).
        chunk_size: examples per chunk of per-example rows in :meth:`dense`.
        distributed: ``True`` or a process group: ``loader`` is this rank's
            shard and the Jacobian covers every rank's examples, in rank order
            (``n`` is the total); see docs/distributed.md.
        progress: show a progress bar (tqdm, on stderr) on each pass over
            ``loader``; silently none when tqdm is not installed.

    >>> model = torch.nn.Linear(3, 2)
    >>> jac = Jacobian(model, [torch.randn(4, 3)])
    >>> jac.dense().shape
    torch.Size([2, 4, 8])
    """

    def __init__(
        self,
        model: nn.Module,
        loader: Iterable[Any],
        *,
        layer_collection: LayerCollection | None = None,
        function: OutputFn | None = None,
        n_output: int | None = None,
        device: torch.device | str | None = None,
        chunk_size: int | None = None,
        distributed: bool | dist.ProcessGroup = False,
        progress: bool = False,
    ) -> None:
        self.generator = make_generator(
            model,
            loader,
            distributed,
            layer_collection=layer_collection,
            variant="function" if function is not None else "regression",
            function=function,
            n_output=n_output,
            device=device,
            chunk_size=chunk_size,
            progress=progress,
        )
        self.layer_collection = self.generator.layer_collection

    def dense(self) -> torch.Tensor:
        """The Jacobian, shape ``(C, n, P)``, in the collection's flat order."""
        if isinstance(self.generator, DistributedGenerator):
            return self.generator.row_blocks()
        return _all_rows(self.generator)

    def jvp(self, v: PVector) -> FVector:
        """``J v``: the outputs' first-order change along ``v``, ``(C, n)``."""
        if v.layer_collection != self.layer_collection:
            raise ValueError(
                "Jacobian.jvp: the vector covers another layer collection."
            )
        return FVector(self.generator.jvp(v).t())

    def vjp(self, f: FVector) -> PVector:
        """``J^T f = sum_{c,i} f[c, i] dF_c(x_i) / dtheta``."""
        return self.generator.vjp(f.data.t())


def per_example_grads(
    model: nn.Module,
    loader: Iterable[Any],
    variant: str = "classif_logits",
    *,
    layer_collection: LayerCollection | None = None,
    function: OutputFn | None = None,
    device: torch.device | str | None = None,
    chunk_size: int | None = None,
    distributed: bool | dist.ProcessGroup = False,
    progress: bool = False,
) -> torch.Tensor:
    """Gradients of each example's negative log-likelihood, ``(n, P)``.

    The loss is the variant's: cross-entropy on logits for ``classif_logits``,
    ``-f_y`` for ``classif_logsoftmax``, binary cross-entropy with logits for
    ``classif_binary``, ``||y - f||^2 / 2`` for ``regression``. Batches must
    carry labels ``(inputs, labels)``. With ``distributed=True`` (or a process
    group) the loader is this rank's shard and the rows of every rank are
    returned, in rank order.
    carry labels ``(inputs, labels)``. ``progress=True`` shows a progress bar
    (tqdm, on stderr) over the loader when tqdm is installed.

    >>> model = torch.nn.Linear(3, 2)
    >>> per_example_grads(model, [(torch.randn(4, 3), torch.tensor([0, 1, 1, 0]))]).shape
    torch.Size([4, 8])
    """
    gen = make_generator(
        model,
        loader,
        distributed,
        layer_collection=layer_collection,
        variant=variant,
        fisher_type="empirical",
        function=function,
        device=device,
        chunk_size=chunk_size,
        progress=progress,
    )
    if isinstance(gen, DistributedGenerator):
        return gen.row_blocks()[0]
    return _all_rows(gen)[0]


def _all_rows(gen: Generator) -> torch.Tensor:
    """Every per-example row ``(K, n, P)`` of ``gen``'s loader.

    Where the loader is a sequence of batches whose sizes are known up front,
    the rows are written in place into one preallocated tensor (no
    concatenation, no second copy of the result); otherwise each chunk is
    kept and they are concatenated at the end.
    """
    total = _known_size(gen.loader)
    p = gen.layer_collection.numel()
    full: torch.Tensor | None = None  # the preallocated result, once K is known
    filled = 0
    in_full = False  # whether the last buffer handed out is a slice of ``full``
    parts: list[torch.Tensor] = []

    def buffer(k: int, m: int) -> torch.Tensor:
        nonlocal full, in_full
        if total is not None and full is None:
            full = torch.empty((k, total, p), dtype=gen.dtype, device=gen.device)
        in_full = (
            full is not None
            and not parts
            and full.shape[0] == k
            and filled + m <= full.shape[1]
        )
        if in_full:
            assert full is not None
            return full[:, filled : filled + m]
        return torch.empty((k, m, p), dtype=gen.dtype, device=gen.device)

    def consume(rows: torch.Tensor) -> None:
        nonlocal filled
        if in_full:
            filled += rows.shape[1]
        else:
            parts.append(rows)

    gen.row_pass(consume, buffer)
    if full is None:
        return torch.cat(parts, 1)
    if not parts and filled == full.shape[1]:
        return full
    # the model gave other row counts than the batch sizes announced
    return torch.cat([full[:, :filled], *parts], 1)


def _known_size(loader: Iterable[Any]) -> int | None:
    """The number of examples of a list or tuple of batches, else None."""
    if not isinstance(loader, (list, tuple)):
        return None
    sizes = [batch_size(batch) for batch in loader]
    if not sizes or any(s is None for s in sizes):
        return None
    return sum(s for s in sizes if s is not None)
