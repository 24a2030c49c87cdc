"""Module hooks that record layer inputs and outputs, and the model-state guard."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = ["LayerCapture", "preserved_model"]


class LayerCapture:
    """Forward hooks recording every call's first input and output, per module.

    A module called several times in one forward pass (a reused module) has
    one entry per call, in call order, in :attr:`inputs` and :attr:`outputs`.

    The outputs stay in the autograd graph, so gradients with respect to them
    (the output gradients of the rules) come from one ``autograd.grad`` call.
    An output that a later operation modifies in place (``ReLU(inplace=True)``)
    is detected through its version counter; with ``clone_outputs`` the hook
    hands the rest of the network a copy and keeps the original untouched.

    A module in :attr:`broadcast` is called on an input shared by the whole
    batch (``pos(arange(T))``, added to every example): its input and output
    are expanded to ``batch_n`` examples (views, no copy) and the rest of the
    network receives the expanded output, so each example has its own output
    gradient. The generator uses this only where the model's output is
    unchanged by it (checked on the first batch).
    """

    def __init__(self, modules: dict[str, nn.Module]) -> None:
        self._modules = modules
        #: the hooked modules by name
        self.modules = modules
        self._names = {id(m): name for name, m in modules.items()}
        self._handles: list[Any] = []
        self.clone_outputs = False
        self.enabled = True
        #: calls per layer in the last forward (when ``count_only``)
        self.calls: dict[str, int] = {}
        #: leading size of each call's output, per layer (when ``count_only``,
        #: which also records every call's input and output)
        self.leading: dict[str, list[int | None]] = {}
        self.count_only = False
        #: modules whose call does not follow the batch: their input and output
        #: are expanded over the ``batch_n`` examples of the forward pass
        self.broadcast: set[str] = set()
        #: the examples of the forward pass under way (for :attr:`broadcast`)
        self.batch_n: int | None = None
        self.inputs: dict[str, list[torch.Tensor]] = {}
        self.outputs: dict[str, list[torch.Tensor]] = {}
        self._versions: list[tuple[torch.Tensor, int]] = []

    def __enter__(self) -> LayerCapture:
        from nnfim.generator.rules.attention import RECORDER, SELF_RECORDING

        for module in self._modules.values():
            if module not in SELF_RECORDING:
                self._handles.append(module.register_forward_hook(self._hook))
        self._token = RECORDER.set(self._record)
        return self

    def __exit__(self, *exc: object) -> None:
        from nnfim.generator.rules.attention import RECORDER

        RECORDER.reset(self._token)
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.reset()

    def _record(
        self, module: nn.Module, x: torch.Tensor, y: torch.Tensor
    ) -> torch.Tensor:
        """Record a step that a module computes without a submodule call."""
        if id(module) not in self._names:
            return y
        out = self._hook(module, (x,), y)
        return y if out is None else out

    def reset(self) -> None:
        """Forget the tensors of the last forward pass."""
        self.inputs, self.outputs, self._versions = {}, {}, []
        self.calls = {}
        self.leading = {}

    def _hook(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
        if not self.enabled:
            return None
        name = self._names[id(module)]
        self.calls[name] = self.calls.get(name, 0) + 1
        if self.count_only:
            is_batched = isinstance(output, torch.Tensor) and output.dim() > 0
            self.leading.setdefault(name, []).append(
                output.shape[0] if is_batched else None
            )
            # every call's tensors, so that a pass can reuse this forward
            if is_batched and args and isinstance(args[0], torch.Tensor):
                self.inputs.setdefault(name, []).append(args[0].detach())
                self.outputs.setdefault(name, []).append(output)
                self._versions.append((output, output._version))
            return None
        if not args or not isinstance(args[0], torch.Tensor):
            raise ValueError(
                f"layer {name!r} ({type(module).__name__}): its first positional "
                "argument is not a tensor, so no rule can use it."
            )
        if not isinstance(output, torch.Tensor):
            raise ValueError(
                f"layer {name!r} ({type(module).__name__}) returns "
                f"{type(output).__name__}, not a tensor."
            )
        x, replaced = args[0], False
        if name in self.broadcast:
            if self.batch_n is None:
                raise ValueError(
                    f"layer {name!r} ({type(module).__name__}) is shared by the whole "
                    "batch, but this batch's size is unknown (its first tensor has no "
                    "leading batch dimension)."
                )
            # every example sees the same call: its own copy (a view) gets its
            # own output gradient
            x = x.expand(self.batch_n, *x.shape)
            output = output.expand(self.batch_n, *output.shape)
            replaced = True
        self.inputs.setdefault(name, []).append(x.detach())
        self.outputs.setdefault(name, []).append(output)
        self._versions.append((output, output._version))
        if self.clone_outputs:
            return output.clone()
        return output if replaced else None

    def modified_in_place(self) -> bool:
        """Whether an output was changed in place after its layer returned it."""
        return any(out._version != v for out, v in self._versions)

    def missing(self) -> list[str]:
        """Layers whose hook did not fire in the last forward pass."""
        return [name for name in self._modules if name not in self.inputs]


@contextmanager
def preserved_model(model: nn.Module, need_grad: list[nn.Parameter]) -> Iterator[None]:
    """Run a block with ``need_grad`` requiring gradients and grad mode on.

    BatchNorm layers that normalise with batch statistics get a forward hook
    that holds those statistics constant (see :mod:`nnfim.generator.rules.norm`).
    On exit, also through an exception, ``requires_grad`` of every parameter,
    the train/eval flag of every module, the BatchNorm running statistics and
    the hooks are restored. Parameters and their ``.grad`` are never written by
    nnfim (it uses ``torch.autograd.grad``).
    """
    from nnfim.generator.rules.norm import frozen_batchnorm, uses_batch_stats

    flags = [(p, p.requires_grad) for p in model.parameters()]
    modes = [(m, m.training) for m in model.modules()]
    batchnorms = [
        b for b in model.modules() if isinstance(b, _BatchNorm) and uses_batch_stats(b)
    ]
    saved = [(t, t.clone()) for b in batchnorms for t in b.buffers(recurse=False)]
    handles = []
    try:
        for b in batchnorms:
            handles.append(b.register_forward_hook(frozen_batchnorm))
        for p in need_grad:
            p.requires_grad_(True)
        with torch.enable_grad():
            yield
    finally:
        for h in handles:
            h.remove()
        with torch.no_grad():
            for buffer, value in saved:
                buffer.copy_(value)
        for p, flag in flags:
            p.requires_grad_(flag)
        for module, mode in modes:
            module.training = mode
