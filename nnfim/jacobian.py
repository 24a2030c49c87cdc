"""Per-example Jacobians as a parameter-to-function map, and per-example gradients."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from nnfim.distributed.generator import DistributedGenerator, make_generator
from nnfim.generator.jacobian import OutputFn
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
        parts: list[torch.Tensor] = []
        self.generator.row_pass(parts.append)
        return torch.cat(parts, 1)

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
    parts: list[torch.Tensor] = []
    gen.row_pass(lambda rows: parts.append(rows[0]))
    return torch.cat(parts)
