"""The generator: one pass over the data fills any representation.

Per batch: one forward pass with hooks recording every layer's input ``x``
and output ``y``; the variant's ``K`` output directions ``D`` (``K = C`` for the
exact Fisher, ``C - 1`` for the softmax one); one batched backward
(``is_grads_batched``) giving ``gy = D^T dF/dy`` for every layer at once,
shape ``(K, n, ...)``; the layer rules contract ``x`` and ``gy`` into diagonals, blocks or per-example rows.
Matrix-free products use forward-mode AD instead (:meth:`Generator.mv`).

Every quantity is a mean over examples: ``F = (1/n) sum_i J_i^T H_i J_i``.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Callable, Iterable, Iterator
from typing import Any, NamedTuple, TypeVar

import torch
import torch.autograd.forward_ad as fwAD
from torch import nn
from torch.func import functional_call
from torch.nn.modules.batchnorm import _BatchNorm

from nnfim._progress import progress_bar
from nnfim.generator._dense import DenseMoments
from nnfim.generator._jvp import linear_tangents
from nnfim.generator._passes import (
    CPU_JOIN_BYTES,
    CPU_PIECE_BYTES,
    FALLBACK_ROW_ELEMENTS,
    SUB_BATCH_ELEMENTS,
    Additive,
    Gather,
    LayerIO,
    Streamed,
    batch_size,
    batching_is_slow,
    direction_grads,
    graph_consumers,
    has_quasi_structure,
    join_batches,
    join_layout,
    math_attention,
    negligible_zeroed,
    output_grads,
    padding_lookups_constant,
    prime_heap,
    repeated_to,
    slice_batch,
)
from nnfim.generator.fallback import FallbackRule, call_one, fallback_rows
from nnfim.generator.hooks import LayerCapture, preserved_model
from nnfim.generator.rules import LayerRule, find_rule, registered_types
from nnfim.generator.rules._registry import (
    DEFAULT_CHUNK_ELEMENTS,
    add_diag_of,
    add_into,
    held_params,
)
from nnfim.generator.rules.attention import decomposed_attention
from nnfim.generator.rules.norm import uses_batch_stats
from nnfim.generator.shared import SharedRule, Site, Use, Uses
from nnfim.generator.variants import get_variant
from nnfim.layers import LayerCollection
from nnfim.vector import PVector

__all__ = ["FISHER_TYPES", "Generator"]

FISHER_TYPES = ("exact", "mc", "empirical")

#: Largest exact block K-FAC builds for a layer without Kronecker factors.
MAX_EXACT_BLOCK = 1 << 28


#: ``(model, batch) -> outputs (n, C)``
OutputFn = Callable[[nn.Module, Any], torch.Tensor]


#: what the layer check's forwards cover, for error messages
_CHECKED = "the first batch, or its first 2 and 3 examples"


def _calls_changed(name: str, calls: int) -> str:
    return (
        f"layer {name!r} was called once in the layer check's forward passes "
        f"({_CHECKED}) but {calls} times in this batch's; nnfim needs the same "
        "modules called as often in every batch, of any size."
    )


class _Probe(NamedTuple):
    """What the layer check's forwards saw (see :meth:`Generator.rules`)."""

    #: calls per hooked module
    calls: dict[str, int]
    #: leading size of each call's output, per hooked module
    leading: dict[str, list[int | None]]
    #: whether each hooked module's outputs follow the batch size
    follows: dict[str, bool]
    #: uses of each parameter in the autograd graph (``graph_consumers``)
    consumers: dict[int, int]
    #: examples of the forward that gave ``calls`` and ``leading``
    n: int
    #: a batch (a cut of the first) and the model's output on it, for the
    #: expansion check
    batch: Any
    reference: torch.Tensor
    #: per-example sizes, where forwards of 2 and 3 examples measured them
    sizes: _Sizes | None = None


class _Sizes(NamedTuple):
    """Per-example sizes of a pass, from the layer check's forwards of 2 and 3 examples.

    Each is the growth from the 2-example forward to the 3-example one, so
    what does not follow the batch (parameters, positional tables) drops out.
    They size the first batch's sub-batches before any forward of it.
    """

    #: the loader they were measured on
    loader: Any
    #: the model's outputs per example (``C``)
    width: int
    #: elements of each hooked module's outputs per example
    outputs: dict[str, int]
    #: elements of each hooked module's outputs that the batch shares (a
    #: positional table), which an expanded layer holds per example
    shared: dict[str, int]
    #: bytes the autograd graph saves per example (:class:`_SavedBytes`),
    #: measured where they bound sub-batches (on CPU, ``sub_batch="auto"``)
    saved: int | None
    #: whether the graph holds a node whose batching rule loops
    slow_batching: bool


class _SavedBytes:
    """Saved-tensor hooks that add up what a forward saves for the backward.

    Each saved tensor counts its own elements once (a view of a larger buffer
    counts the view), parameters included: they cancel between two forwards.
    """

    def __init__(self) -> None:
        self.total = 0
        self._seen: set[tuple[int, tuple[int, ...], tuple[int, ...]]] = set()

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        if t.layout != torch.strided:  # sparse: no data pointer; not counted
            return t
        key = (t.data_ptr(), tuple(t.shape), tuple(t.stride()))
        if key not in self._seen:
            self._seen.add(key)
            self.total += t.numel() * t.element_size()
        return t

    @staticmethod
    def unpack(t: torch.Tensor) -> torch.Tensor:
        return t

    def hooks(self) -> Any:
        return torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)


class _Bound(nn.Module):
    """Calls ``function(model, batch)`` so that ``functional_call`` can swap params."""

    def __init__(self, model: nn.Module, function: OutputFn) -> None:
        super().__init__()
        self.model = model
        self.function = function

    def forward(self, batch: Any) -> torch.Tensor:
        return self.function(self.model, batch)


_T = TypeVar("_T")


def _versions(batch: Any) -> list[int]:
    """The version counters of a joinable batch's tensors (bumped by writes)."""
    tensors = [batch] if isinstance(batch, torch.Tensor) else batch
    return [t._version for t in tensors]


def join_bytes() -> int:
    """The bytes a run of joined batches stays under: never above a cut piece's."""
    return min(CPU_JOIN_BYTES, CPU_PIECE_BYTES)


def _own_storage(t: torch.Tensor) -> torch.Tensor:
    """``t``, or a copy of it where it views part of a larger storage."""
    whole = t.storage_offset() == 0 and t.is_contiguous()
    if whole and t.untyped_storage().nbytes() == t.numel() * t.element_size():
        return t
    return t.clone()


class _Diagonal(Additive):
    """Running sums of the diagonal, per layer, added to in place.

    Input-side work (convolution patches) is done once per batch
    (:meth:`LayerRule.diag_input`); a module holding a parameter of another
    layer (a tied weight) computes only its layer's; layers named in
    ``quasi`` also sum their
    weight-bias cross terms (:meth:`LayerRule.weight_bias_cross`), into
    ``cross``.
    """

    def __init__(
        self,
        rules: dict[str, LayerRule],
        modules: dict[str, nn.Module],
        layers: LayerCollection,
        quasi: set[str] | None = None,
    ) -> None:
        self.rules = rules
        self.modules = modules
        self.quasi = quasi or set()
        #: each layer's parameters where its module holds more (a weight tied
        #: to another layer's): None where it holds only those
        self.names = {
            name: held_params(module, [p for p, _ in layers[name].params])
            for name, module in modules.items()
        }
        #: layer name -> parameter name -> running sum
        self.sums: dict[str, dict[str, torch.Tensor]] = {name: {} for name in rules}
        #: layer name -> running sum of the weight-bias cross terms
        self.cross: dict[str, torch.Tensor] = {}
        self.inputs: dict[str, Any] = {}

    def batch(self, xs: dict[str, torch.Tensor]) -> None:
        self.inputs = {
            name: rule.diag_input(self.modules[name], xs[name])
            for name, rule in self.rules.items()
        }

    def directions(
        self, xs: dict[str, torch.Tensor], gys: dict[str, torch.Tensor]
    ) -> None:
        for name, rule in self.rules.items():
            module = self.modules[name]
            names = self.names[name]
            if name in self.quasi and names is None:
                c = rule.add_diag_with_cross(
                    module, self.inputs[name], xs[name], gys[name], self.sums[name]
                )
                add_into(self.cross, name, c)
                continue
            add_diag_of(
                rule, module, self.inputs[name], gys[name], self.sums[name], names
            )
            if name in self.quasi:
                c = rule.weight_bias_cross(module, xs[name], gys[name])
                add_into(self.cross, name, c)

    def batch_end(self) -> None:
        self.inputs = {}

    def flat(self, layers: LayerCollection) -> torch.Tensor:
        """The sums as one flat tensor in ``layers``' order."""
        return layers.flatten(
            {
                layers[name].full_name(p): d
                for name, sums in self.sums.items()
                for p, d in sums.items()
            }
        )


class Generator:
    """Computes Fisher quantities of ``model`` over ``loader``.

    Args:
        model: the network; its output for a batch is ``(n, C)`` (``(n,)`` is
            read as ``C = 1`` for the binary and regression variants).
        loader: an iterable of batches: a tensor of inputs, or a tuple/list
            ``(inputs, labels, ...)``; with ``function`` anything it accepts.
            It must yield the same batches in the same order on every pass.
        layer_collection: which parameters (default: every trainable one).
        variant: ``"classif_logits"``, ``"classif_logsoftmax"``,
            ``"classif_binary"``, ``"regression"`` or ``"function"``.
        fisher_type: ``"exact"``, ``"mc"`` (Monte-Carlo, ``mc_samples`` labels
            sampled from the model per example) or ``"empirical"`` (true labels).
        mc_samples: samples per example for ``fisher_type="mc"``.
        seed: seed of the Monte-Carlo sampler; the same call gives the same
            matrix whatever the global RNG state.
        n_output: expected number of outputs ``C`` (checked; inferred if None).
        function: ``(model, batch) -> outputs`` replacing ``model(batch[0])``.
        device: where batches are moved (default: the model's device).
        chunk_size: examples per chunk when per-example rows are materialised
            (dense, block-diagonal, low-rank, Jacobians); default: chunks of at
            most 2^24 elements.
        sub_batch: examples per forward and backward of the ``K`` output
            directions (and of ``mv``, ``jvp``). ``"auto"`` splits a batch of
            ``n`` only where ``K`` copies of its layer outputs would pass 2^24
            elements, and then into sub-batches of at least ``2 n / K``
            examples (memory near a training step's), and where fallback
            layers' ``K`` per-example gradients would pass 2^22 elements; on
            CPU, also where the bytes a sub-batch's forward saves for the
            backward (measured per example by the layer check; for ``mv`` and
            ``jvp``, by dual forwards of 2 and 3 examples) and its output
            gradients would pass ``CPU_PIECE_BYTES`` (16 MiB). A split batch
            is cut into sub-batches of equal sizes. On CPU, consecutive
            batches of one :func:`join_layout` are joined while the same count
            stays under ``CPU_JOIN_BYTES`` (16 MiB): fewer, larger products,
            faster and with more memory than the loader's batches. An int
            never joins; ``None`` neither splits nor joins. Results do not
            depend on it.
        strict: raise instead of falling back to ``torch.func`` for layers
            without a usable rule (see :meth:`rules`).
        progress: show a progress bar (tqdm, on stderr) on every pass over
            the loader; silently none when tqdm is not installed.

    Raises:
        ValueError: bad arguments, or a BatchNorm in train mode.
    """

    def __init__(
        self,
        model: nn.Module,
        loader: Iterable[Any],
        *,
        layer_collection: LayerCollection | None = None,
        variant: str = "classif_logits",
        fisher_type: str = "exact",
        mc_samples: int = 1,
        seed: int = 0,
        n_output: int | None = None,
        function: OutputFn | None = None,
        device: torch.device | str | None = None,
        chunk_size: int | None = None,
        sub_batch: int | str | None = "auto",
        strict: bool = False,
        progress: bool = False,
    ) -> None:
        self.progress = progress
        if chunk_size is not None and (
            not isinstance(chunk_size, int) or chunk_size < 1
        ):
            raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}.")
        self.chunk_size = chunk_size
        if not (
            sub_batch is None
            or sub_batch == "auto"
            or (isinstance(sub_batch, int) and sub_batch > 0)
        ):
            raise ValueError(
                f"sub_batch must be 'auto', None or a positive int, got {sub_batch!r}."
            )
        self.sub_batch = sub_batch
        self.strict = strict
        self._rules: dict[str, LayerRule] | None = None
        #: calls per hooked module in the first forward pass (set by ``rules``)
        self._calls: dict[str, int] = {}
        #: layers called once on an input shared by the batch, expanded over it
        self._broadcast: set[str] = set()
        #: batched backward of the output directions, unless the graph holds a
        #: node whose batching rule loops (``batching_is_slow``) or a missing
        #: batching rule shows up (see ``output_grads``)
        self._batched = True
        #: the exact Fisher's ``C`` directions, not the fewest (``K = C - 1`` for
        #: the softmax): set while computing the Gram dual, whose ``(K, n, K, n)``
        #: layout is documented with ``K = C``
        self._all_directions = False
        #: the layer check's forward of the first batch, kept for the next pass
        #: (see :meth:`_pass_rules`)
        self._kept: dict[str, Any] | None = None
        #: per-example sizes seen by the layer check (see :meth:`_small_probe`)
        self._sizes: _Sizes | None = None
        # (loader, bytes one example's dual forward saves): sizes mv's pieces
        self._dual_bytes: tuple[Any, int] | None = None
        #: a layer output is changed in place (``ReLU(inplace=True)``): the
        #: hooks hand the network a copy (seen once, kept for every pass)
        self._clone = False
        self.model = model
        self.loader = loader
        self.layer_collection = layer_collection or LayerCollection.from_model(model)
        if len(self.layer_collection) == 0:
            raise ValueError(
                "the layer collection is empty: the model has no trainable parameters."
            )
        self.variant = get_variant(variant)
        if variant == "function" and function is None:
            raise ValueError(
                "variant='function' needs function=(model, batch) -> outputs."
            )
        if fisher_type not in FISHER_TYPES:
            raise ValueError(
                f"unknown fisher_type {fisher_type!r}; choose one of {FISHER_TYPES}."
            )
        if fisher_type == "mc" and (not isinstance(mc_samples, int) or mc_samples < 1):
            raise ValueError(f"mc_samples must be a positive int, got {mc_samples!r}.")
        self.fisher_type = fisher_type
        self.mc_samples = mc_samples
        self.seed = seed
        self.n_output = n_output
        self.function = function
        self.params = self.layer_collection.check_model(model)
        first = next(iter(self.params.values()))
        self.dtype = first.dtype
        self.device = torch.device(device) if device is not None else first.device
        modules = dict(model.named_modules())
        self.modules = {
            layer.name: modules[layer.name] for layer in self.layer_collection
        }

    def with_loader(self, loader: Iterable[Any]) -> Generator:
        """The same generator reading another loader."""
        other = copy.copy(self)
        other.loader = loader
        other._kept = None
        return other

    # -- plumbing -----------------------------------------------------------
    def rules(self) -> dict[str, LayerRule]:
        """The rule of every layer, checked; layers without a usable one fall back.

        A layer whose parameters have several uses (its module called several
        times in one forward pass, or a parameter shared with other modules
        that have rules: tied weights) gets a :class:`SharedRule`, which sums
        the uses' per-example gradients. A layer falls back to per-example
        gradients through ``torch.func`` (:mod:`nnfim.generator.fallback`)
        when its type, or that of another module holding one of its
        parameters, has no rule, or when such a module is not called as a
        module or returns outputs that do not follow the batch. A layer called
        once on an input the batch shares (a positional embedding) is expanded
        over the batch instead where its rule allows it and the model's output
        stays the same (see :class:`LayerCapture`). The first call runs two
        forward passes of 2 and 3 examples of the first batch to see which
        modules are called how often and on what (a forward of the whole batch
        where those cannot tell), and one more of 2 examples where a layer is
        to be expanded.

        Raises:
            ValueError: with ``strict=True``, a layer that would fall back; or a
                layer with an unsupported configuration.
        """
        if self._rules is not None:
            return self._rules
        sites = self._sites()
        reasons = self._static_reasons(sites)
        calls: dict[str, int] = {}
        reasons.update(self._call_reasons(reasons, sites, calls))
        self._calls = calls
        out: dict[str, LayerRule] = {}
        for name, module in self.modules.items():
            if name in reasons:
                if self.strict:
                    raise ValueError(reasons[name])
                out[name] = FallbackRule(self.layer_collection[name], reasons[name])
                continue
            rule = find_rule(module)
            assert rule is not None
            checked = []
            for site_name, site_module, params in sites[name]:
                site_rule = find_rule(site_module)
                assert site_rule is not None
                site_rule.check(site_module)
                checked.append(Site(site_name, site_module, site_rule, params))
            uses = sum(calls.get(site.name, 0) for site in checked)
            out[name] = (
                rule if uses == 1 else SharedRule(self.layer_collection[name], checked)
            )
        if any(isinstance(r, FallbackRule) for r in out.values()) and self._coupled():
            raise ValueError(
                "layers without a rule fall back to per-example torch.func gradients, "
                "which cannot follow a BatchNorm in train mode (it couples examples); "
                f"call model.eval() first. Falling back: {sorted(reasons)}."
            )
        self._rules = out
        return out

    def _pass_rules(self) -> dict[str, LayerRule]:
        """:meth:`rules` for a :meth:`layer_pass` that follows at once.

        If the layer check runs now and needs a forward of the whole first batch
        (:meth:`_whole_probe`), that forward is kept for the pass, which then
        starts with the second batch's forward.
        """
        if self._rules is not None:
            return self._rules
        self._kept = {}
        try:
            return self.rules()
        except BaseException:
            self._kept = None
            raise

    def _sites(
        self,
    ) -> dict[str, list[tuple[str, nn.Module, tuple[tuple[str, str], ...]]]]:
        """Per layer, the modules holding its parameters, the owner first.

        Each entry is ``(module name, module, ((name in the module, name in
        the layer), ...))``; a module registered under several names is one.
        """
        owners = {
            id(getattr(module, p)): (name, p)
            for name, module in self.modules.items()
            for p in self._param_names(name)
        }
        out: dict[str, list[tuple[str, nn.Module, tuple[tuple[str, str], ...]]]] = {
            name: [] for name in self.modules
        }
        for mod_name, module in self.model.named_modules():
            pairs: dict[str, list[tuple[str, str]]] = {}
            for p_name, p in module.named_parameters(
                recurse=False, remove_duplicate=False
            ):
                if id(p) in owners:
                    layer, owner_name = owners[id(p)]
                    pairs.setdefault(layer, []).append((p_name, owner_name))
            for layer, pr in pairs.items():
                out[layer].append((mod_name, module, tuple(pr)))
        for name, entries in out.items():
            owner = self.modules[name]
            entries[:] = [e for e in entries if e[1] is owner] + [
                e for e in entries if e[1] is not owner
            ]
        return out

    def _static_reasons(
        self, sites: dict[str, list[tuple[str, nn.Module, Any]]]
    ) -> dict[str, str]:
        reasons = {}
        for name, module in self.modules.items():
            if find_rule(module) is None:
                reasons[name] = (
                    f"layer {name!r} of type {type(module).__name__} has no nnfim rule. "
                    f"Supported types: {', '.join(registered_types())}. Register one "
                    "with nnfim.register_rule, leave the layer out with "
                    "layer_collection=LayerCollection.from_model(model, names=[...]), "
                    "or drop strict=True to compute it through torch.func."
                )
                continue
            for site_name, site_module, params in sites[name][1:]:
                if find_rule(site_module) is None:
                    reasons[name] = (
                        f"layer {name!r}: parameter {params[0][1]!r} is shared with "
                        f"module {site_name!r} of type {type(site_module).__name__}, "
                        "which has no nnfim rule (tied weights); register one with "
                        "nnfim.register_rule, or drop strict=True to compute the "
                        "layer through torch.func."
                    )
                    break
        return reasons

    def _call_reasons(
        self,
        static: dict[str, str],
        sites: dict[str, list[tuple[str, nn.Module, Any]]],
        calls_out: dict[str, int],
    ) -> dict[str, str]:
        """Layers with a use that is not a module call following the batch.

        Fills ``calls_out`` with the number of calls of every hooked module,
        seen in forwards of a few examples of the first batch
        (:meth:`_small_probe`) or, where those cannot tell, of the whole batch
        (:meth:`_whole_probe`).
        """
        hooked = {
            site_name: site_module
            for name in self.modules
            if name not in static
            for site_name, site_module, _ in sites[name]
        }
        if not hooked:
            return {}
        index, batch = next(iter(self._batches(show=False)))
        # Grad mode on, like the real passes: some modules take other code paths
        # without it (TransformerEncoderLayer's fused inference path).
        with (
            self._guard(math_kernel=not self._fused_attention),
            LayerCapture(hooked) as cap,
        ):
            cap.count_only = True
            probe = self._small_probe(cap, index, batch, hooked)
            if probe is None:
                probe = self._whole_probe(cap, index, batch, hooked)
        calls, leading, follows, consumers, n, batch, reference, _ = probe
        calls_out.update(calls)
        reasons = {}
        # layers called once, alone, on an input the whole batch shares
        shared_input: set[str] = set()
        for name in self.modules:
            if name in static:
                continue
            for i, (site_name, site_module, _) in enumerate(sites[name]):
                if (
                    len(sites[name]) == 1
                    and calls.get(site_name, 0) == 1
                    and None not in leading.get(site_name, [None])
                    and (leading[site_name][0] != n or not follows[site_name])
                    and getattr(find_rule(site_module), "broadcastable", False)
                ):
                    shared_input.add(name)
                why = self._call_reason(
                    name,
                    site_name,
                    type(site_module).__name__,
                    i == 0,
                    calls.get(site_name, 0),
                    leading.get(site_name, []),
                    follows[site_name],
                    n,
                )
                if why:
                    reasons[name] = why
                    break
            else:
                unseen = self._unseen_use(name, sites[name], calls, consumers)
                if unseen:
                    reasons[name] = unseen
        self._broadcast = self._try_broadcast(
            {name for name in shared_input if name in reasons}, index, batch, reference
        )  # on the m-example batch where there is one
        if self._broadcast and self._kept is not None:
            self._kept.clear()  # its layer tensors were not expanded
        self._sizes = probe.sizes
        for name in self._broadcast:
            del reasons[name]
        return reasons

    def _small_probe(
        self, cap: LayerCapture, index: int, batch: Any, hooked: dict[str, nn.Module]
    ) -> _Probe | None:
        """Calls and output sizes from forwards of the first 2 and 3 examples.

        An output that follows the batch has 2 rows in the first and 3 in the
        second; a fixed leading size (a positional embedding of ``T``
        positions) cannot equal both. Two such forwards cost far less than one
        of a whole batch. Where the saved bytes are measured (CPU,
        ``sub_batch="auto"``), a joinable batch of fewer than 4 examples is
        probed on copies of it: that sizes the joining of such batches. None
        where the batch cannot be cut, a cut forward fails or gives other
        rows, or the calls differ or leave a module uncalled (calls that
        depend on the data): the whole batch decides then.
        """
        # the saved bytes bound CPU sub-batches only (see _split); counting
        # them costs a Python call per saved tensor
        measure = self.device.type == "cpu" and self.sub_batch == "auto"
        if measure:  # batches this small are worth joining: probe copies of it
            batch = repeated_to(batch, 4)
        n = batch_size(batch)
        if n is None or n < 4:
            return None
        seen: list[tuple[dict[str, int], dict[str, list[int | None]]]] = []
        numels: list[dict[str, int]] = []
        saved: list[int] = []
        for m in (2, 3):
            cap.reset()
            piece = slice_batch(batch, slice(0, m), n)
            counter = _SavedBytes()
            try:
                with counter.hooks() if measure else contextlib.nullcontext():
                    out = self._forward(index, piece)
            except Exception:  # the whole batch's forward raises what is wrong
                return None
            if out.shape[0] != m:
                return None
            seen.append((dict(cap.calls), dict(cap.leading)))
            numels.append(
                {k: sum(o.numel() for o in outs) for k, outs in cap.outputs.items()}
            )
            saved.append(counter.total)
            if m == 2:
                small, reference = piece, out.detach()
                consumers = graph_consumers(out)
                clone = cap.modified_in_place()
                slow = batching_is_slow(out)
            del out
        (calls, leading), (calls_3, leading_3) = seen
        if calls != calls_3 or not all(calls.get(name, 0) for name in hooked):
            return None
        if clone:
            self._clone = True
        follows = {
            name: all(s == 2 for s in leading.get(name, []))
            and all(s == 3 for s in leading_3.get(name, []))
            for name in hooked
        }
        two, three = numels
        sizes = _Sizes(
            loader=self.loader,
            width=reference.shape[1],
            outputs={k: max(three.get(k, 0) - two[k], 0) for k in two},
            shared={k: two[k] for k in two if three.get(k) == two[k]},
            saved=max(saved[1] - saved[0], 0) if measure else None,
            slow_batching=slow,
        )
        return _Probe(calls, leading, follows, consumers, 2, small, reference, sizes)

    def _whole_probe(
        self, cap: LayerCapture, index: int, batch: Any, hooked: dict[str, nn.Module]
    ) -> _Probe:
        """Calls and output sizes from a forward of the whole first batch.

        When a pass asked for it (``self._kept`` not None), the output and every
        call's layer tensors are kept for the pass to reuse.
        """
        cap.reset()
        out = self._forward(index, batch)
        n = out.shape[0]
        calls, leading = dict(cap.calls), dict(cap.leading)
        consumers = graph_consumers(out)
        if cap.modified_in_place():
            self._clone = True
        elif self._kept is not None:
            self._kept.update(
                loader=self.loader,
                index=index,
                out=out,
                calls=calls,
                inputs=cap.inputs,
                outputs=cap.outputs,
            )
        reference = out.detach()
        del out
        # A leading size equal to n by coincidence (a positional embedding of
        # T = n positions, broadcast over the batch) does not follow the batch:
        # a forward of m != n examples tells them apart.
        follows = dict.fromkeys(hooked, True)
        if batch_size(batch) == n > 1:
            m = 2 if n > 2 else 1
            cap.reset()
            smaller = slice_batch(batch, slice(0, m), n)
            try:
                small_out = self._forward(index, smaller).detach()
                fewer = small_out.shape[0]
            except Exception:  # a batch that cannot be cut: sizes alone decide
                fewer = None
            if fewer == m:
                # the expansion check needs only these m examples
                batch, reference = smaller, small_out
                follows = {
                    name: all(s == m for s in cap.leading.get(name, []))
                    for name in hooked
                }
        return _Probe(calls, leading, follows, consumers, n, batch, reference)

    def _try_broadcast(
        self, names: set[str], index: int, batch: Any, reference: torch.Tensor
    ) -> set[str]:
        """The layers of ``names`` that can be expanded over the batch.

        A forward pass of the first batch with them expanded
        (:class:`LayerCapture`'s ``broadcast``) must give the model's output:
        code that reads the shared output's shape (``pos.sum(0)``) would
        otherwise compute something else, and such a layer falls back instead.
        All are tried together, then (if that fails) one by one.
        """
        n = batch_size(batch)
        if not names or n is None:
            return set()

        def same_output(group: set[str]) -> bool:
            modules = {name: self.modules[name] for name in group}
            try:
                with (
                    self._guard(math_kernel=not self._fused_attention),
                    LayerCapture(modules) as cap,
                ):
                    cap.broadcast, cap.batch_n = set(group), n
                    out = self._forward(index, batch).detach()
            except Exception:  # e.g. an in-place write into the expanded output
                return False
            scale = float(reference.abs().max()) if reference.numel() else 0.0
            return out.shape == reference.shape and torch.allclose(
                out, reference, rtol=1e-5, atol=1e-6 * scale
            )

        if same_output(names):
            return set(names)
        if len(names) == 1:
            return set()
        alone = {name for name in sorted(names) if same_output({name})}
        return alone if len(alone) <= 1 or same_output(alone) else set()

    def _unseen_use(
        self,
        name: str,
        sites: list[tuple[str, nn.Module, Any]],
        calls: dict[str, int],
        consumers: dict[int, int],
    ) -> str | None:
        """A parameter the graph uses more often than the hooked calls do.

        Each module call uses its parameters in one autograd node; a further
        use (``h @ tok.weight.t()`` in a parent's forward) is invisible to
        hooks, so the rules would miss it.
        """
        layer = self.layer_collection[name]
        for p_name in self._param_names(name):
            p = self.params[layer.full_name(p_name)]
            seen = sum(
                calls.get(site_name, 0)
                for site_name, _, params in sites
                if any(owner == p_name for _, owner in params)
            )
            if consumers.get(id(p), 0) > seen:
                return (
                    f"layer {name!r}: parameter {p_name!r} is used "
                    f"{consumers[id(p)]} times in the forward pass but only {seen} "
                    "of them are module calls (the others use it functionally, e.g. "
                    "h @ weight.t()); drop strict=True to compute it through "
                    "torch.func, or make every use a module call."
                )
        return None

    @staticmethod
    def _call_reason(
        name: str,
        site: str,
        kind: str,
        owner: bool,
        count: int,
        leading: list[int | None],
        follows: bool,
        n: int,
    ) -> str | None:
        what = (
            f"layer {name!r} ({kind})"
            if owner
            else (
                f"layer {name!r}: its parameter is shared with module {site!r} ({kind}), "
                "which"
            )
        )
        if count == 0:
            return (
                f"{what} owns parameters but is not called as a module in the "
                "forward pass (its weights are used functionally); drop strict=True "
                "to compute it through torch.func, or leave it out with "
                "layer_collection=."
            )
        bad = [s for s in leading if s != n]
        if bad or not follows:
            return (
                f"{what} returns a tensor whose leading size ({bad[0] if bad else n} "
                f"for a batch of {n}) does not follow the batch size (e.g. a "
                "positional embedding broadcast over the batch), so it has no "
                "per-example output gradients; drop strict=True to compute it "
                "through torch.func."
            )
        return None

    def _coupled(self) -> bool:
        """Whether a module couples the examples of a batch (BatchNorm in train mode)."""
        return any(
            isinstance(m, _BatchNorm) and uses_batch_stats(m)
            for m in self.model.modules()
        )

    def _fallback_rows(
        self, index: int, batch: Any, directions: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """Per-example rows ``(K, n, p_l)`` of the fallback layers."""
        rules = self.rules()
        layers = [n for n, r in rules.items() if isinstance(r, FallbackRule)]
        if not layers:
            return {}
        names = [
            self.layer_collection[n].full_name(p)
            for n in layers
            for p, _ in self.layer_collection[n].params
        ]
        params = {k: self.params[k] for k in names}
        examples = batch if self.function is not None else self._inputs(index, batch)

        def forward_one(p: dict[str, torch.Tensor], example: Any) -> torch.Tensor:
            return call_one(self.model, self.function, p, example)

        # torch.func differentiates inside (batched: the math attention kernel);
        # nothing is recorded outside
        with torch.no_grad(), math_attention():
            rows = fallback_rows(forward_one, params, examples, directions)
        k, n = directions.shape[:2]
        return {
            name: torch.cat(
                [
                    rows[self.layer_collection[name].full_name(p)].reshape(k, n, -1)
                    for p, _ in self.layer_collection[name].params
                ],
                2,
            )
            for name in layers
        }

    def _move(self, batch: Any) -> Any:
        if isinstance(batch, torch.Tensor):
            return batch.to(self.device)
        if isinstance(batch, (tuple, list)):
            return type(batch)(self._move(b) for b in batch)
        if isinstance(batch, dict):
            return {k: self._move(v) for k, v in batch.items()}
        return batch

    def _batches(self, show: bool = True) -> Iterator[tuple[int, Any]]:
        index = -1
        loader = progress_bar(self.loader, self.progress and show)
        for index, batch in enumerate(loader):
            yield index, self._move(batch)
        if index < 0:
            raise ValueError("the loader yielded no batches: nothing to average over.")

    def _inputs(self, index: int, batch: Any) -> torch.Tensor:
        x = batch[0] if isinstance(batch, (tuple, list)) and batch else batch
        if not isinstance(x, torch.Tensor):
            raise ValueError(
                f"batch {index}: expected a tensor or a tuple (inputs, labels, ...), got "
                f"{type(batch).__name__}; pass function=(model, batch) -> outputs."
            )
        if x.is_floating_point() and x.dtype != self.dtype:
            raise ValueError(
                f"batch {index}: inputs are {x.dtype} but the model's parameters are "
                f"{self.dtype}; convert one of them (e.g. model.to({x.dtype}))."
            )
        return x

    def _labels(self, index: int, batch: Any) -> torch.Tensor:
        if isinstance(batch, (tuple, list)) and len(batch) >= 2:
            return batch[1]
        raise ValueError(
            f"batch {index}: the empirical Fisher needs labels, but the batch has none; "
            "the loader must yield (inputs, labels)."
        )

    def _forward(
        self, index: int, batch: Any, params: dict[str, torch.Tensor] | None = None
    ) -> torch.Tensor:
        if self.function is not None:
            if params is None:
                out = self.function(self.model, batch)
            else:
                bound = _Bound(self.model, self.function)
                out = functional_call(
                    bound, {f"model.{k}": v for k, v in params.items()}, (batch,)
                )
        else:
            x = self._inputs(index, batch)
            out = (
                self.model(x)
                if params is None
                else functional_call(self.model, params, (x,))
            )
        return self._check_output(index, out)

    def _check_output(self, index: int, out: Any) -> torch.Tensor:
        if not isinstance(out, torch.Tensor):
            raise ValueError(
                f"batch {index}: the model returned {type(out).__name__}, not a tensor; "
                "pass function=(model, batch) -> outputs to select one."
            )
        primal = fwAD.unpack_dual(out).primal
        if primal.dim() == 1 and self.variant.name in (
            "classif_binary",
            "regression",
            "function",
        ):
            out = out[:, None]
            primal = primal[:, None]
        if primal.dim() != 2:
            raise ValueError(
                f"batch {index}: variant {self.variant.name!r} expects "
                f"{self.variant.output_doc}, got outputs of shape {tuple(primal.shape)}."
            )
        if self.n_output is not None and primal.shape[1] != self.n_output:
            raise ValueError(
                f"batch {index}: the model has {primal.shape[1]} outputs but "
                f"n_output={self.n_output}; drop n_output (it is inferred) or fix it."
            )
        if not bool(torch.isfinite(primal.detach()).all()):
            raise ValueError(
                f"batch {index}: the model's outputs contain NaN or inf; check the "
                "inputs and the weights of this batch."
            )
        self.variant.check_output(primal)
        return out

    def _rng(self) -> torch.Generator | None:
        if self.fisher_type != "mc":
            return None
        gen = torch.Generator(device=self.device)
        gen.manual_seed(self.seed)
        return gen

    def _directions(
        self, index: int, out: torch.Tensor, batch: Any, noise: torch.Tensor | None
    ) -> torch.Tensor:
        """Output directions ``(K, n, C)``: ``F_i = sum_k J_i^T d_k d_k^T J_i``.

        ``noise`` is this batch's slice of the Monte-Carlo noise, ``(S, n, ...)``.
        """
        out = out.detach()
        if self.fisher_type == "exact":
            if self._all_directions:
                return self.variant.directions(out)
            return negligible_zeroed(self.variant.fisher_directions(out))
        if self.fisher_type == "empirical":
            d = self.variant.label_grad(out, self._labels(index, batch))[None]
            return negligible_zeroed(d)
        assert noise is not None
        if self.mc_samples == 1:
            return negligible_zeroed(self.variant.sample_grad(out, noise[0])[None])
        samples = [
            self.variant.sample_grad(out, noise[s]) for s in range(self.mc_samples)
        ]
        return negligible_zeroed(torch.stack(samples).div_(math.sqrt(self.mc_samples)))

    def _noise(
        self, rng: torch.Generator | None, counts: list[int], out: torch.Tensor
    ) -> torch.Tensor | None:
        """Monte-Carlo noise of whole loader batches of ``counts`` examples.

        One draw per loader batch, in the loader's order: the same labels
        whether a batch is cut, joined to others or neither.
        """
        if rng is None:
            return None
        out = out.detach()
        draws = [self.variant.draw(rng, self.mc_samples, n, out) for n in counts]
        return draws[0] if len(draws) == 1 else torch.cat(draws, 1)

    def _n_directions(self, width: int) -> int:
        """Output directions per batch, for a model of ``width`` outputs."""
        if self.fisher_type == "exact":
            if self._all_directions:
                return width
            return self.variant.n_fisher_directions(width)
        return self.mc_samples if self.fisher_type == "mc" else 1

    def _split(
        self,
        batch: Any,
        k: int,
        per_example: float,
        rows: float = 0.0,
        saved: int | None = None,
    ) -> list[tuple[slice, Any]]:
        """Sub-batches that bound the ``K`` output gradients held at once.

        ``"auto"``: as many examples as keep ``K`` copies of the layer outputs
        (``per_example`` elements per example) under ``SUB_BATCH_ELEMENTS``,
        and at least ``2 n / K`` (a backward of about ``2 n`` rows, near a
        training step's memory). Small networks are not split at all: thin
        sub-batches make thin matrix products. Fallback layers write ``rows``
        elements per example (their per-example gradients, all directions):
        those are kept under ``FALLBACK_ROW_ELEMENTS``, down to one example.
        On CPU, where the layer check measured the bytes the graph ``saved``
        per example, a sub-batch also keeps those and the ``K`` output
        gradients under ``CPU_PIECE_BYTES`` (see there).
        """
        n = batch_size(batch)
        whole = [(slice(None), batch)]
        if n is None or self.sub_batch is None or self._coupled():
            return whole
        if isinstance(self.sub_batch, int):
            size = self.sub_batch
        else:
            fits = int(SUB_BATCH_ELEMENTS // max(k * per_example, 1.0))
            size = max(-(-2 * n // k), fits)
            size = min(size, self._most(k, per_example, rows, saved))
        if size >= n:
            return whole
        # as many pieces, sizes within one of each other (128 by at most 41:
        # 4 x 32, not 3 x 41 + 5): the allocator reuses the same blocks
        count = -(-n // size)
        base, extra = divmod(n, count)
        pieces, start = [], 0
        for i in range(count):
            sl = slice(start, start + base + (i < extra))
            pieces.append((sl, slice_batch(batch, sl, n)))
            start = sl.stop
        return pieces

    def _most(
        self,
        k: int,
        per_example: float,
        rows: float,
        saved: int | None,
        budget: int | None = None,
    ) -> int:
        """Most examples in one piece by the fallback rows and, on CPU, the bytes.

        See :meth:`_split`: ``K`` output gradients of ``per_example`` elements
        and the ``saved`` bytes per example under ``budget`` (default
        ``CPU_PIECE_BYTES``), and ``rows`` fallback elements per example under
        ``FALLBACK_ROW_ELEMENTS``; at least one example.
        """
        most = 1 << 62
        if rows:
            most = min(most, int(FALLBACK_ROW_ELEMENTS // rows))
        if saved is not None and self.device.type == "cpu":
            piece = saved + k * per_example * self.dtype.itemsize
            limit = CPU_PIECE_BYTES if budget is None else budget
            most = min(most, int(limit // max(piece, 1.0)))
        return max(most, 1)

    @property
    def _fused_attention(self) -> bool:
        """Whether the hooked passes may run attention through fused kernels.

        They may where each batch has one output direction (the empirical
        Fisher, one Monte-Carlo sample): a plain backward, no batching rule
        needed. Layers that fall back run under the math kernel in any case.
        """
        return self.fisher_type == "empirical" or (
            self.fisher_type == "mc" and self.mc_samples == 1
        )

    @contextlib.contextmanager
    def _guard(self, math_kernel: bool = True) -> Iterator[None]:
        """Model state preserved; attention through the math kernel if ``math_kernel``.

        Fused attention kernels have no forward-mode rule and no batching rule;
        the math kernel has both and computes the same function. A forward
        followed by one plain backward needs neither, and is faster fused.
        """
        if self.device.type == "cpu":
            prime_heap()
        with (
            preserved_model(self.model, list(self.params.values())),
            math_attention() if math_kernel else contextlib.nullcontext(),
            decomposed_attention(self.model),
        ):
            yield

    # -- hook-based pass ------------------------------------------------------
    def layer_pass(
        self,
        consume: Callable[[dict[str, torch.Tensor], dict[str, torch.Tensor]], None]
        | Additive,
        join: bool = False,
    ) -> int:
        """Run the data through the hooks and hand each batch's tensors to ``consume``.

        ``consume(xs, gys)`` receives layer name -> input ``(n, ...)`` and layer
        name -> output gradients ``(K, n, ...)``. An :class:`Additive` consumer
        instead receives the directions in chunks (one at a time where they are
        backpropagated one after the other), without ``K`` stacked copies.

        ``join``: on CPU with ``sub_batch="auto"``, join consecutive small
        batches (:meth:`_joined`) into pieces under ``CPU_JOIN_BYTES`` of what
        their forward saves and their output gradients. For consumers whose
        work per piece is about that (sums of per-example products: diagonals,
        K-FAC); not for those that materialise per-example rows or products
        between pieces (dense blocks, the Gram), whose memory would grow
        with the piece.

        Returns:
            The number of examples seen.
        """
        rules = self._pass_rules()
        # the layer check's forward of the first batch, if it just ran: reused
        kept = dict(self._kept or {})
        self._kept = None
        if kept.get("loader") is not self.loader:
            kept = {}
        hooked = self._hooked(rules)
        # layers whose rule reads one call's input and output gradients
        plain = [
            n for n, r in rules.items() if not isinstance(r, (FallbackRule, SharedRule))
        ]
        # Directions are streamed to additive consumers where they are
        # backpropagated one after the other; a layer with several uses takes
        # all its directions at once.
        streamable = isinstance(consume, Additive) and not any(
            isinstance(r, SharedRule) for r in rules.values()
        )
        rng = self._rng()
        n_total = 0
        k: int | None = None
        per_example = 0.0
        sizes: _Sizes | None = None
        # fallback rows: (K, n, p_l) per-example gradients of each such layer
        fallback_numel = sum(
            self.layer_collection[n].numel
            for n, r in rules.items()
            if isinstance(r, FallbackRule)
        )
        with (
            self._guard(math_kernel=not self._fused_attention),
            LayerCapture(hooked) as cap,
        ):
            cap.clone_outputs = self._clone
            cap.broadcast = self._broadcast & set(hooked)

            def sized_by(check: _Sizes) -> int:
                """Set the pass's sizes from the layer check's; returns ``K``."""
                nonlocal k, per_example, sizes
                sizes = check
                k = self._n_directions(check.width)
                per_example = sum(
                    check.outputs.get(n, 0)
                    + (check.shared.get(n, 0) if n in cap.broadcast else 0)
                    for n in hooked
                )
                self._batched = self._batched and not check.slow_batching
                return k

            def join_most(index: int, batch: Any) -> int:
                """Most examples of joined batches, where the layer check sized them.

                Sets the pass's sizes from the check's (no forward of a whole
                batch); 0 (no joining) where it kept its forward of this batch
                for the pass or did not measure the saved bytes.
                """
                check = self._sizes
                if (
                    kept.get("index") == index
                    or check is None
                    or check.loader is not self.loader
                    or check.saved is None
                ):
                    return 0
                directions = sized_by(check)
                # streamed directions hold one copy of the layer outputs, not K
                streamed = streamable and not self._batched and directions > 1
                held = 1 if streamed else directions
                fits = int(SUB_BATCH_ELEMENTS // max(held * per_example, 1.0))
                rows = directions * fallback_numel
                return min(
                    fits,
                    self._most(held, per_example, rows, check.saved, join_bytes()),
                )

            joined = self._joined(join_most if join else lambda i, b: 0)
            for group, batch, counts in joined:
                index = group[0][0]
                first = None
                if k is None:  # the first batch tells how many directions there are
                    first = self._reuse(cap, kept, index, hooked)
                    kept.clear()
                    # the layer check's sizes, where no forward of this batch is kept
                    sizes = self._sizes if first is None else None
                    if sizes is None or sizes.loader is not self.loader:
                        sizes = None
                        if first is None:
                            first = self._captured_forward(cap, index, batch)
                        k = self._n_directions(first.shape[1])
                        per_example = sum(
                            o.numel() for outs in cap.outputs.values() for o in outs
                        ) / max(first.shape[0], 1)
                        self._batched = self._batched and not batching_is_slow(first)
                    else:  # sized by the layer check: no forward of the whole batch
                        k = sized_by(sizes)
                # streamed directions hold one copy of the layer outputs, not K
                stream = streamable and not self._batched and k > 1
                pieces = self._split(
                    batch,
                    1 if stream else k,
                    per_example,
                    k * fallback_numel,
                    None if sizes is None else sizes.saved,
                )
                if len(pieces) > 1:
                    first = None
                noise = None
                for sl, piece in pieces:
                    if first is not None:
                        out = first
                    elif counts is None:
                        out = self._captured_forward(cap, index, piece)
                    else:
                        out = self._replaying(
                            lambda i, b: self._captured_forward(cap, i, b), group, piece
                        )
                    if noise is None:
                        noise = self._noise(
                            rng, counts or [batch_size(batch) or out.shape[0]], out
                        )
                    directions = self._directions(
                        index, out, piece, None if noise is None else noise[:, sl]
                    )
                    outputs: list[torch.Tensor] = []
                    if stream:
                        xs, outputs = self._plain_tensors(rules, plain, cap)
                    else:
                        xs, grads = self._layer_tensors(rules, cap, out, directions)
                    cap.enabled = False
                    fallback = self._fallback_rows(index, piece, directions)
                    cap.enabled = True
                    for name in fallback:
                        xs[name] = fallback[name].new_empty(0)
                    if stream:
                        assert isinstance(consume, Additive)
                        consume.batch(xs)
                        chunks = direction_grads(out, outputs, directions)
                        for j, grad_list in enumerate(chunks):
                            grads = dict(zip(plain, grad_list, strict=True))
                            for name, rows in fallback.items():
                                grads[name] = rows[j : j + 1]
                            consume.directions(xs, grads)
                            del grad_list
                        consume.batch_end()
                    else:
                        grads.update(fallback)
                        if isinstance(consume, Additive):
                            consume.batch(xs)
                            consume.directions(xs, grads)
                            consume.batch_end()
                        else:
                            consume(xs, grads)
                    n_total += out.shape[0]
                    cap.reset()
                    if len(pieces) == 1 or self.device.type != "cpu":
                        # drop this batch's graph and tensors before the next
                        # forward: two batches' worth would otherwise be alive.
                        # A CPU sub-batch's stay: freed first, the next one
                        # faults their memory back in (see CPU_PIECE_BYTES)
                        del out, directions, outputs, grads, xs
                first = None
        return n_total

    def _hooked(self, rules: dict[str, LayerRule]) -> dict[str, nn.Module]:
        """Modules to hook: the layers with rules and every other use's module."""
        modules = [
            (name, self.modules[name])
            for name, r in rules.items()
            if not isinstance(r, (FallbackRule, SharedRule))
        ]
        for r in rules.values():
            if isinstance(r, SharedRule):
                modules.extend((site.name, site.module) for site in r.sites)
        out: dict[str, nn.Module] = {}
        seen: set[int] = set()
        for name, module in modules:
            if id(module) not in seen:
                seen.add(id(module))
                out[name] = module
        return out

    def _layer_tensors(
        self,
        rules: dict[str, LayerRule],
        cap: LayerCapture,
        out: torch.Tensor,
        directions: torch.Tensor,
    ) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """Layer inputs and output gradients ``(K, n, ...)`` of every call, per layer.

        One batched backward gives the output gradients of every recorded call;
        a layer with several uses gets :class:`Uses` as its input and an empty
        ``(K, n, 0)`` tensor as its gradients.
        """
        keys = [(m, j) for m, outs in cap.outputs.items() for j in range(len(outs))]
        grad_list, self._batched = output_grads(
            out, [cap.outputs[m][j] for m, j in keys], directions, self._batched
        )
        per_call: dict[str, list[torch.Tensor]] = {}
        for (m, _), g in zip(keys, grad_list, strict=True):
            per_call.setdefault(m, []).append(g)
        names = {id(m): name for name, m in cap.modules.items()}
        xs: dict[str, Any] = {}
        grads: dict[str, torch.Tensor] = {}
        for name, rule in rules.items():
            if isinstance(rule, SharedRule):
                items = []
                for site in rule.sites:
                    key = names[id(site.module)]
                    for x, g in zip(cap.inputs[key], per_call[key], strict=True):
                        items.append(Use(site, site.rule.prepare(site.module, x), g))
                xs[name] = Uses(items)
                grads[name] = directions.new_empty(directions.shape[0], out.shape[0], 0)
            elif not isinstance(rule, FallbackRule):
                key = names[id(self.modules[name])]
                if len(cap.inputs[key]) != 1:
                    raise ValueError(_calls_changed(name, len(cap.inputs[key])))
                xs[name] = rule.prepare(self.modules[name], cap.inputs[key][0])
                grads[name] = per_call[key][0]
        return xs, grads

    def _reuse(
        self,
        cap: LayerCapture,
        kept: dict[str, Any],
        index: int,
        hooked: dict[str, nn.Module],
    ) -> torch.Tensor | None:
        """Hand ``cap`` the layer check's forward of this batch, if it was kept."""
        if kept.get("index") != index or any(
            len(kept["inputs"].get(n, [])) != kept["calls"].get(n, 0) for n in hooked
        ):
            return None
        cap.reset()
        for n in hooked:
            cap.inputs[n] = kept["inputs"][n]
            cap.outputs[n] = kept["outputs"][n]
        return kept["out"]

    def _plain_tensors(
        self, rules: dict[str, LayerRule], plain: list[str], cap: LayerCapture
    ) -> tuple[dict[str, Any], list[torch.Tensor]]:
        """Prepared inputs and outputs of the layers called once (no backward yet)."""
        xs: dict[str, Any] = {}
        outputs = []
        for name in plain:
            if len(cap.inputs[name]) != 1:
                raise ValueError(_calls_changed(name, len(cap.inputs[name])))
            xs[name] = rules[name].prepare(self.modules[name], cap.inputs[name][0])
            outputs.append(cap.outputs[name][0])
        return xs, outputs

    def _captured_forward(
        self, cap: LayerCapture, index: int, batch: Any
    ) -> torch.Tensor:
        cap.reset()
        cap.batch_n = batch_size(batch)
        out = self._forward(index, batch)
        if cap.modified_in_place() and not cap.clone_outputs:
            cap.clone_outputs = self._clone = True
            cap.reset()
            out = self._forward(index, batch)
        missing = cap.missing()
        if missing:
            raise ValueError(
                f"layers {missing} were not called in this batch's forward pass but "
                f"were in the layer check's ({_CHECKED}); nnfim needs the same "
                "modules called in every batch."
            )
        return out

    @staticmethod
    def _replaying(
        forward: Callable[[int, Any], _T], group: list[tuple[int, Any]], piece: Any
    ) -> _T:
        """``forward(index, piece)`` of loader batches ``group`` joined into ``piece``.

        Where it raises, the batches run one by one, so that the error names
        the batch it comes from.
        """
        try:
            return forward(group[0][0], piece)
        except Exception:
            for index, batch in group:
                forward(index, batch)
            raise

    def _param_names(self, name: str) -> list[str]:
        return [p for p, _ in self.layer_collection[name].params]

    def diag(self) -> torch.Tensor:
        """Exact diagonal of the Fisher, shape ``(P,)``."""
        sums = _Diagonal(self._pass_rules(), self.modules, self.layer_collection)
        n = self.layer_pass(sums, join=True)
        return sums.flat(self.layer_collection).div_(n)

    def _rows(
        self, rule: LayerRule, name: str, x: torch.Tensor, gy: torch.Tensor
    ) -> torch.Tensor:
        return rule.flat_grads(self.modules[name], x, gy, self._param_names(name))

    def block_diag(self) -> dict[str, torch.Tensor]:
        """One exact ``(p_l, p_l)`` block per layer (see :meth:`dense`)."""
        rules = self._pass_rules()
        acc = {
            name: DenseMoments({name: self.layer_collection[name].numel})
            for name in rules
        }

        def consume(xs: dict[str, torch.Tensor], gys: dict[str, torch.Tensor]) -> None:
            for name, rule in rules.items():
                self._add_moments(acc[name], {name: rule}, xs, gys)

        n = self.layer_pass(Streamed(consume))
        like = torch.zeros((), dtype=self.dtype, device=self.device)
        return {name: moments.result(like) / n for name, moments in acc.items()}

    def _add_moments(
        self,
        acc: DenseMoments,
        rules: dict[str, LayerRule],
        xs: dict[str, torch.Tensor],
        gys: dict[str, torch.Tensor],
    ) -> None:
        """Add one batch of the layers ``rules`` to ``acc``, chunk by chunk.

        Layers whose per-example gradients are outer products enter through
        their factors when ``K > 2`` (below, the rows' product is as cheap).
        """
        k, n = gys[next(iter(rules))].shape[:2]
        outer = {}
        for name, rule in rules.items():
            if k <= 2 or (acc.outer is not None and name not in acc.outer):
                continue
            factors = rule.outer_factors(
                self.modules[name], xs[name], gys[name], self._param_names(name)
            )
            if factors is not None:
                outer[name] = factors
        rest = [name for name in rules if name not in outer]
        for sl in self._chunks((1, n), acc.per_example(k, outer)):
            rows = None
            if rest:
                rows = torch.cat(
                    [
                        self._rows(rules[name], name, xs[name][sl], gys[name][:, sl])
                        for name in rest
                    ],
                    1,
                )
            acc.add({m: (g[:, sl], a[sl], i) for m, (g, a, i) in outer.items()}, rows)

    def row_pass(
        self,
        consume_rows: Callable[[torch.Tensor], None],
        buffer: Callable[[int, int], torch.Tensor] | None = None,
        additive: bool = False,
    ) -> int:
        """Hand per-example rows ``J_i^T d_ki`` to ``consume_rows`` chunk by chunk.

        Each call receives a tensor of shape ``(K, chunk, P)`` (all layers in
        flat order); chunks respect ``chunk_size``. Every layer writes its
        columns in place (:meth:`~LayerRule.write_grads`): nothing is
        concatenated.

        Args:
            consume_rows: called with each chunk's rows.
            buffer: ``(K, chunk) -> tensor (K, chunk, P)`` the rows are written
                into (e.g. a slice of a preallocated result); default: a new
                tensor per chunk.
            additive: the consumer sums over the rows: the directions may come
                in several calls of fewer than ``K`` (see :class:`Additive`).

        Returns:
            The number of examples seen.
        """
        rules = self._pass_rules()
        p = self.layer_collection.numel()
        columns: dict[str, slice] = {}
        for name in rules:
            start = sum(s.stop - s.start for s in columns.values())
            columns[name] = slice(start, start + self.layer_collection[name].numel)

        def consume(xs: dict[str, torch.Tensor], gys: dict[str, torch.Tensor]) -> None:
            first = next(iter(gys.values()))
            k = first.shape[0]
            for sl in self._chunks(first.shape[:2], p):
                m = len(range(first.shape[1])[sl])
                rows = (
                    buffer(k, m) if buffer is not None else first.new_empty((k, m, p))
                )
                for name, rule in rules.items():
                    rule.write_grads(
                        self.modules[name],
                        xs[name][sl],
                        gys[name][:, sl],
                        self._param_names(name),
                        rows[..., columns[name]],
                    )
                consume_rows(rows)

        return self.layer_pass(Streamed(consume) if additive else consume)

    def dense(self) -> torch.Tensor:
        """The exact Fisher, shape ``(P, P)``.

        Layers whose per-example gradients are outer products (Linear) enter
        through their factors when ``K > 2``: ``n p_l p_m`` multiply-adds per
        block instead of ``K n p_l p_m`` (:mod:`nnfim.generator._dense`).
        """
        rules = self.rules()
        widths = {name: self.layer_collection[name].numel for name in rules}
        acc = DenseMoments(widths)

        def consume(xs: dict[str, torch.Tensor], gys: dict[str, torch.Tensor]) -> None:
            self._add_moments(acc, rules, xs, gys)

        n = self.layer_pass(Streamed(consume))
        like = torch.zeros((), dtype=self.dtype, device=self.device)
        return acc.result(like) / n

    def factor(self) -> torch.Tensor:
        """``U`` of shape ``(K * n, P)`` with ``F = U^T U`` (rows scaled by ``1/sqrt(n)``)."""
        parts: list[torch.Tensor] = []
        n = self.row_pass(lambda rows: parts.append(rows))
        return torch.cat(parts, 1).reshape(
            -1, self.layer_collection.numel()
        ) / math.sqrt(n)

    def quasi_diag(self) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The diagonal and, per layer with a bias, the weight-bias cross terms.

        Returns:
            ``(diag (P,), crosses)``: layer name -> ``E[dW_o * db_o]`` of the
            weight's shape, for layers whose parameters are ``weight`` and ``bias``
            with one bias per leading weight index.
        """
        rules = self._pass_rules()
        quasi = {
            name for name in rules if has_quasi_structure(self.layer_collection[name])
        }
        sums = _Diagonal(rules, self.modules, self.layer_collection, quasi)
        n = self.layer_pass(sums, join=True)
        return sums.flat(self.layer_collection).div_(n), {
            k: c / n for k, c in sums.cross.items()
        }

    def layer_io(self) -> list[tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]]:
        """Every batch's layer inputs and output gradients, kept in memory.

        The exact Fisher's gradients are those of all ``C`` directions (not the
        ``C - 1`` that suffice for sums over directions): the Gram dual built
        from them has the documented ``(C, n, C, n)`` layout.
        """
        out: list[tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]] = []
        previous, self._all_directions = self._all_directions, True
        try:
            self.layer_pass(lambda xs, gys: out.append((xs, gys)))
        finally:
            self._all_directions = previous
        return out

    def gram(self, other: Generator | None = None) -> torch.Tensor:
        """Gram matrix of the rows ``J_i^T d_ki`` of two generators, unnormalised.

        Returns:
            ``(K, n, K2, n2)`` with entry ``[k, i, l, j] = (J_i^T d_ki) . (J_j^T d_lj)``.
        """
        left = self.layer_io()
        right = left if other is None else other.layer_io()
        # every batch's example count from its output gradients (K, n, ...);
        # the blocks are written into the result one at a time
        n1 = [next(iter(gys.values())).shape[1] for _, gys in left]
        n2 = (
            n1 if other is None else [next(iter(g.values())).shape[1] for _, g in right]
        )
        out: torch.Tensor | None = None
        i = 0
        for io1, m1 in zip(left, n1, strict=True):
            j = 0
            for io2, m2 in zip(right, n2, strict=True):
                block = self.gram_block(*io1, *io2)
                if out is None:  # the directions K and K2 from the first block
                    k1, _, k2, _ = block.shape
                    out = block.new_empty(k1, sum(n1), k2, sum(n2))
                out[:, i : i + m1, :, j : j + m2] = block
                j += m2
            i += m1
        assert out is not None
        return out

    def gram_block(
        self,
        xs1: dict[str, torch.Tensor],
        gys1: dict[str, torch.Tensor],
        xs2: dict[str, torch.Tensor],
        gys2: dict[str, torch.Tensor],
    ) -> torch.Tensor:
        """The Gram block ``(K, n1, K2, n2)`` of two batches' layer inputs and gradients.

        The sum over layers of each rule's :meth:`~LayerRule.gram`.
        """
        total = None
        for name, rule in self.rules().items():
            g = rule.gram(
                self.modules[name],
                xs1[name],
                gys1[name],
                xs2[name],
                gys2[name],
                self._param_names(name),
            )
            total = g if total is None else total + g
        assert total is not None
        return total

    def kfac(
        self,
        convention: str = "expand",
        io: LayerIO | None = None,
        terms: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] | None = None,
    ) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], dict[str, torch.Tensor]]:
        """Kronecker factors of the layers that have them, exact blocks of the rest.

        A layer with several uses (:class:`SharedRule`) whose uses all have
        Kronecker factors gets one term per module holding its parameters,
        each from that module's calls stacked as positions: a reused module
        has one pair of factors, a parameter tied across modules (an embedding
        and an output head) a sum of Kronecker terms, returned in ``terms``.

        Args:
            convention: ``"expand"`` or ``"reduce"`` for shared positions.
            io: if given, keeps the Kronecker layers' inputs and output
                gradients of this pass (within its budget) for :meth:`ekfac_diag`.
            terms: filled with layer name -> ``[(A_t, G_t), ...]`` for the
                layers held as sums of Kronecker terms; when None, such a
                layer is an exact block (``ValueError`` above
                ``MAX_EXACT_BLOCK`` entries).

        Returns:
            ``(factors, blocks)``: layer name -> ``(A, G)`` (shapes
            ``(groups, a, a)``, ``(groups, b, b)``), and layer name -> exact
            ``(p_l, p_l)`` block for layers without Kronecker structure.
        """
        if convention not in ("expand", "reduce"):
            raise ValueError(
                f"unknown KFAC convention {convention!r}; choose 'expand' or 'reduce'."
            )
        rules = self._pass_rules()
        # lists in the rules' order, never sets: the factors' order must not
        # depend on string hashing (ranks reduce them leaf by leaf)
        kron = [n for n, r in rules.items() if self._is_kronecker(n, r)]
        # without ``terms``, a parameter whose modules give different Kronecker
        # terms (a tied embedding and head) can only be an exact block
        several = {
            n: r.sites
            for n, r in rules.items()
            if n in kron and isinstance(r, SharedRule) and len(r.sites) > 1
        }
        if terms is None:
            kron = [n for n in kron if n not in several]
        for name, rule in rules.items():
            numel = self.layer_collection[name].numel
            if name not in kron and numel * numel > MAX_EXACT_BLOCK:
                if isinstance(rule, FallbackRule):
                    why = rule.reason.split(";")[0]
                elif name in several:
                    why = (
                        f"its parameters are used by modules "
                        f"{[s.name for s in several[name]]} with different Kronecker "
                        "terms, a sum that PMatKFAC holds (FIM(..., PMatKFAC)) but "
                        "EKFAC and the K-FAC optimisers do not"
                    )
                else:
                    why = "its rule has no Kronecker factors"
                self._kept = None
                raise ValueError(
                    f"K-FAC would hold layer {name!r} as an exact ({numel}, {numel}) block "
                    f"({numel * numel:.2e} entries) because {why}. Leave it out "
                    "with layer_collection=, or use PMatDiag / PMatImplicit for it."
                )
        a_acc: dict[str, torch.Tensor] = {}
        g_acc: dict[str, torch.Tensor] = {}
        blocks: dict[str, torch.Tensor] = {}
        sums: dict[str, list[list[torch.Tensor]]] = {}
        if io is not None:
            io.names = [n for n in rules if n in kron]
        shared = [n for n in kron if isinstance(rules[n], SharedRule)]
        # rules whose A comes from the inputs alone, G from the gradients alone
        split = [n for n in kron if n not in shared and rules[n].kfac_split]

        # sums in place: a fresh sum per batch would leave the heap a freed
        # block of every factor's size per batch to reuse or fragment
        add = add_into

        def add_terms(name: str, uses: Any) -> None:
            rule = rules[name]
            assert isinstance(rule, SharedRule) and isinstance(uses, Uses)
            acc = sums.setdefault(name, [])
            for j, (a, g) in enumerate(rule.kfac_terms(uses, convention)):
                if j < len(acc):
                    acc[j][0] += a
                    acc[j][1] += g
                else:
                    acc.append([a, g])

        def add_factors(name: str, x: torch.Tensor, gy: torch.Tensor) -> None:
            a, g = rules[name].kfac_factors(self.modules[name], x, gy, convention)
            add(a_acc, name, a)
            add(g_acc, name, g)

        def add_a(name: str, x: torch.Tensor) -> None:
            add(a_acc, name, rules[name].kfac_a(self.modules[name], x, convention))

        def add_g(name: str, gy: torch.Tensor) -> None:
            add(g_acc, name, rules[name].kfac_g(self.modules[name], gy, convention))

        def add_block(name: str, x: torch.Tensor, gy: torch.Tensor) -> None:
            for sl in self._chunks(gy.shape[:2], self.layer_collection[name].numel):
                rows = self._rows(rules[name], name, x[sl], gy[:, sl])
                add(blocks, name, rows.t() @ rows)

        # Split rules: A from the inputs once per batch, G from the directions
        # as they come (directions and examples enter G alike: gathered as rows).
        gather = Gather(add_factors)
        gather_a = Gather(add_a, dims=(0,))
        gather_g = Gather(add_g, dims=(1,))
        held: dict[str, list[torch.Tensor]] = {}
        inputs: dict[str, torch.Tensor] = {}

        class Consumer(Additive):
            def batch(self, xs: dict[str, torch.Tensor]) -> None:
                inputs.update(xs)
                if io is not None:
                    io.batch(xs)
                for name in split:
                    gather_a.add(name, xs[name])

            def directions(
                self, xs: dict[str, torch.Tensor], gys: dict[str, torch.Tensor]
            ) -> None:
                if io is not None:
                    io.add(gys)
                for name in rules:
                    gy = gys[name]
                    if name in shared:  # all directions at once (never streamed)
                        add_terms(name, xs[name])
                    elif name not in kron:
                        add_block(name, xs[name], gy)
                    elif name in split:
                        gather_g.add(name, gy.reshape(1, -1, *gy.shape[2:]))
                    else:  # both factors may depend on all the directions
                        held.setdefault(name, []).append(gy)

            def batch_end(self) -> None:
                for name, chunks in held.items():
                    gy = chunks[0] if len(chunks) == 1 else torch.cat(chunks)
                    gather.add(name, inputs[name], gy)
                held.clear()
                inputs.clear()

        n = self.layer_pass(Consumer(), join=True)
        for g in (gather, gather_a, gather_g):
            g.flush()
        if io is not None:
            io.n = n
        for name, acc in sums.items():
            if len(acc) == 1:
                a_acc[name], g_acc[name] = acc[0]
            else:
                assert terms is not None
                terms[name] = [(a / n, g / n) for a, g in acc]
        return (
            {
                name: (a_acc[name] / n, g_acc[name] / n)
                for name in rules
                if name in a_acc
            },
            {name: block / n for name, block in blocks.items()},
        )

    def _is_kronecker(self, name: str, rule: LayerRule) -> bool:
        """Kronecker factors apply when the layer's parameters are exactly the rule's."""
        own = [p for p, _ in self.modules[name].named_parameters(recurse=False)]
        if isinstance(rule, SharedRule):
            return rule.kronecker_sites(self._calls) and self._param_names(name) == own
        return rule.kronecker and self._param_names(name) == own

    def ekfac_diag(
        self,
        bases: dict[str, tuple[torch.Tensor, torch.Tensor]],
        io: LayerIO | None = None,
    ) -> dict[str, torch.Tensor]:
        """Exact second moments of per-example gradients in the given bases.

        Args:
            bases: layer name -> ``(Q_A, Q_G)`` eigenvectors.
            io: a complete :class:`LayerIO` of a pass over the same data (from
                :meth:`kfac`): used instead of a new pass.

        Returns:
            Layer name -> ``(groups, b, a)`` scalings.
        """
        rules = self.rules() if io is not None and io.complete else self._pass_rules()
        acc: dict[str, torch.Tensor] = {}

        def add_diag(name: str, x: torch.Tensor, gy: torch.Tensor) -> None:
            q_a, q_g = bases[name]
            d = rules[name].ekfac_diag(self.modules[name], x, gy, q_a, q_g)
            add_into(acc, name, d)

        gather = Gather(add_diag)

        def consume(xs: dict[str, torch.Tensor], gys: dict[str, torch.Tensor]) -> None:
            for name in bases:
                if isinstance(rules[name], SharedRule):  # its uses do not concatenate
                    add_diag(name, xs[name], gys[name])
                else:
                    gather.add(name, xs[name], gys[name])

        if io is not None and io.complete:
            with torch.no_grad():
                io.replay(Streamed(consume))
            n = io.n
        else:
            n = self.layer_pass(Streamed(consume), join=True)
        gather.flush()
        return {name: d / n for name, d in acc.items()}

    # -- matrix-free product ----------------------------------------------------
    def _tangents(
        self, v: PVector
    ) -> Iterator[tuple[int, list[int], slice, Any, torch.Tensor, torch.Tensor]]:
        """``(index, sizes, sl, piece, outputs, J v)`` by forward-mode AD.

        Per loader batch, per sub-batch ``piece = batch[sl]`` where :meth:`_split`
        cuts it, or per run of consecutive loader batches joined into one piece
        (``sl`` then covers all of it). ``sizes`` are the example counts of the
        loader batches the piece belongs to (one count unless joined), and
        ``index`` the first one's index. On CPU with ``sub_batch="auto"`` both
        cutting and joining go by the bytes the dual forward of one example
        saves for the backward (measured on the first batch, see
        :meth:`_dual_saved`): pieces under ``CPU_PIECE_BYTES``, runs joined
        under ``CPU_JOIN_BYTES``; with an int ``sub_batch``, batches are cut
        to that and never joined. The outputs stay attached to the parameters
        for one backward.
        """
        params = self.params
        # make_dual copies a tangent that views a larger storage: copy once here.
        tangents = {k: _own_storage(v[k].detach()) for k in params}
        saved: int | None = None

        def limit(index: int, batch: Any) -> int:
            nonlocal saved
            saved = self._dual_saved(index, batch, tangents)
            return 0 if saved is None else int(join_bytes() // max(saved, 1))

        with (
            self._guard(),
            padding_lookups_constant(self.model),
            linear_tangents(self.model),
        ):

            def forward(index: int, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
                primal, tangent = self._dual_forward(index, batch, tangents)
                return primal, torch.zeros_like(primal) if tangent is None else tangent

            for group, joined, counts in self._joined(limit):
                # a joined run whose outputs have one row per example is one
                # piece (else, which no layer check lets through, one by one)
                if counts is not None:
                    primal, tangent = self._replaying(forward, group, joined)
                    if primal.shape[0] == sum(counts):
                        yield group[0][0], counts, slice(None), joined, primal, tangent
                        # freed before the next run's forward, as layer_pass does
                        del primal, tangent, joined
                        continue
                for index, batch in group:
                    for sl, piece in self._split(batch, 1, 0.0, 0.0, saved):
                        primal, tangent = forward(index, piece)
                        sizes = [batch_size(batch) or primal.shape[0]]
                        # the consumer holds this piece's graph until the next
                        # forward; on CPU, freeing it first cost more in page
                        # faults than it saved (see CPU_PIECE_BYTES)
                        yield index, sizes, sl, piece, primal, tangent

    def _joined(
        self, limit: Callable[[int, Any], int]
    ) -> Iterator[tuple[list[tuple[int, Any]], Any, list[int] | None]]:
        """The loader's batches in runs of consecutive batches, joined.

        ``limit(index, batch)``, asked on the first batch with ``sub_batch="auto"``
        where examples are not coupled, is the most examples a run may hold
        (0: never join). A run holds batches of one
        :func:`join_layout` (same per-example shapes, dtypes and devices) of at
        most that many examples together; every other batch comes alone.
        Yields ``(group, batch, counts)``: the run's ``(index, batch)`` pairs,
        its batches joined into one, and their example counts (None for a
        run of one batch, ``batch`` then that batch).

        Raises:
            ValueError: a batch held for a run was written in place while the
                loader made the next one (a loader that reuses its tensors).
        """
        most: int | None = None
        run: list[tuple[int, Any]] = []
        stamps: list[list[int]] = []
        total = 0
        layout: tuple[Any, ...] | None = None

        def checked() -> tuple[list[tuple[int, Any]], Any, list[int] | None]:
            for (index, batch), stamp in zip(run, stamps, strict=True):
                if _versions(batch) != stamp:
                    raise ValueError(
                        f"batch {index} changed in place after the loader yielded "
                        "it: the loader reuses its tensors, and nnfim had kept the "
                        "batch to join it with the next ones. Yield new tensors "
                        "per batch, or pass sub_batch=None (batches as they come)."
                    )
            if len(run) == 1:
                return run, run[0][1], None
            counts = [batch_size(b) or 0 for _, b in run]
            return run, join_batches([b for _, b in run]), counts

        for index, batch in self._batches():
            if most is None:  # coupled examples (BatchNorm in train mode) never join
                auto = self.sub_batch == "auto" and not self._coupled()
                most = limit(index, batch) if auto else 0
            n = batch_size(batch)
            this = join_layout(batch) if most and n is not None and n < most else None
            if run and (this is None or this != layout or total + (n or 0) > most):
                yield checked()
                run, stamps, total = [], [], 0
            if this is None:
                yield [(index, batch)], batch, None
                continue
            run.append((index, batch))
            stamps.append(_versions(batch))
            total += n or 0
            layout = this
        if run:
            yield checked()

    def _dual_forward(
        self, index: int, batch: Any, tangents: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(outputs, J v)`` of one batch, the tangent None where ``J v`` is 0."""
        with fwAD.dual_level():
            duals = {k: fwAD.make_dual(p, tangents[k]) for k, p in self.params.items()}
            return fwAD.unpack_dual(self._forward(index, batch, duals))

    def _dual_saved(
        self, index: int, batch: Any, tangents: dict[str, torch.Tensor]
    ) -> int | None:
        """Bytes one example's dual forward saves for the backward, or None.

        The growth from a forward of 2 examples to one of 3 (parameters and
        their tangents, saved by both, cancel), taken from the batch (from
        copies of it where it has fewer than 3). Measured only where it bounds
        pieces (CPU, ``sub_batch="auto"``, examples not coupled) and once per
        loader; None where the batch cannot be cut or a cut forward fails (the
        whole batch's forward then raises what is wrong).
        """
        if self.device.type != "cpu" or self.sub_batch != "auto" or self._coupled():
            return None
        if self._dual_bytes is not None and self._dual_bytes[0] is self.loader:
            return self._dual_bytes[1]
        batch = repeated_to(batch, 3)  # small batches are worth joining
        n = batch_size(batch)
        if n is None or n < 3:
            return None
        totals = []
        for m in (2, 3):
            counter = _SavedBytes()
            try:
                with counter.hooks():
                    out, _ = self._dual_forward(
                        index, slice_batch(batch, slice(0, m), n), tangents
                    )
            except Exception:
                return None
            if out.shape[0] != m:
                return None
            del out
            totals.append(counter.total)
        saved = max(totals[1] - totals[0], 0)
        self._dual_bytes = (self.loader, saved)
        return saved

    def _backward(
        self, out: torch.Tensor, u: torch.Tensor, acc: list[torch.Tensor]
    ) -> None:
        """``acc += J^T u`` for one batch."""
        grads = torch.autograd.grad(
            out, list(self.params.values()), u, allow_unused=True
        )
        for a, g in zip(acc, grads, strict=True):
            if g is not None:
                a.add_(g)

    def _pvector(self, acc: list[torch.Tensor], scale: float) -> PVector:
        """The sums ``acc`` (this pass's own tensors) scaled in place."""
        if scale != 1.0:
            for a in acc:
                a.mul_(scale)
        return PVector(self.layer_collection, dict(zip(self.params, acc, strict=True)))

    def mv(self, v: PVector) -> PVector:
        """``F v`` in one pass: forward-mode ``J v``, the output Fisher, one backward."""
        rng = self._rng()
        acc = [torch.zeros_like(p) for p in self.params.values()]
        n_total = 0
        noise: torch.Tensor | None = None
        for index, sizes, sl, piece, out, tangent in self._tangents(v):
            if self.fisher_type == "exact":
                u = negligible_zeroed(self.variant.hvp(out.detach(), tangent)[None])[0]
            else:
                if sl.start in (None, 0):
                    noise = self._noise(rng, sizes, out)
                d = self._directions(
                    index, out, piece, None if noise is None else noise[:, sl]
                )
                u = torch.einsum(
                    "kni,kn->ni", d, torch.einsum("kni,ni->kn", d, tangent)
                )
            self._backward(out, u, acc)
            n_total += out.shape[0]
            if len(sizes) > 1:  # a joined run: freed before the next one's forward
                del out, tangent, piece, u
        return self._pvector(acc, 1.0 / n_total)

    def jvp(self, v: PVector) -> torch.Tensor:
        """``J v`` for every example, shape ``(n, C)``."""
        parts = [tangent.detach() for *_, tangent in self._tangents(v)]
        return torch.cat(parts)

    def vjp(self, u: torch.Tensor) -> PVector:
        """``sum_i J_i^T u_i`` for ``u`` of shape ``(n, C)``."""
        acc = [torch.zeros_like(p) for p in self.params.values()]
        start = 0
        with self._guard(math_kernel=False):  # one plain backward per batch
            for index, batch in self._batches():
                out = self._forward(index, batch)
                n = out.shape[0]
                if start + n > u.shape[0]:
                    raise ValueError(
                        f"vjp: the function-space vector has {u.shape[0]} examples, the "
                        "loader yields more."
                    )
                self._backward(out, u[start : start + n].to(out.dtype), acc)
                start += n
        if start != u.shape[0]:
            raise ValueError(
                f"vjp: the function-space vector has {u.shape[0]} examples, the loader "
                f"yields {start}."
            )
        return self._pvector(acc, 1.0)

    def _chunks(self, kn: tuple[int, ...], width: int) -> list[slice]:
        """Example slices keeping ``K * chunk * width`` within budget."""
        k, n = kn
        step = max(1, DEFAULT_CHUNK_ELEMENTS // max(k * width, 1))
        if self.chunk_size is not None:
            step = self.chunk_size
        return [slice(s, s + step) for s in range(0, n, step)]
