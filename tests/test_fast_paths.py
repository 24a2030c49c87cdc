"""The MLP speed paths: rows written in place, the reused layer check, the Linear tangent.

Each path is checked against ``torch.func`` in float64 (``nnfim.testing``), on
the MLP, the CNN and the transformer of ``test_layers``, and for its edge cases.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from conftest import assert_same_state, make_case, model_state
from test_layers import VOCAB, encoder_case
from torch import nn
from torch.func import functional_call, jvp

from nnfim import (
    FIM,
    Jacobian,
    LayerCollection,
    PMatDiag,
    PMatImplicit,
    PVector,
    per_example_grads,
)
from nnfim.generator._jvp import linear_tangents
from nnfim.generator.fallback import FallbackRule
from nnfim.generator.jacobian import Generator
from nnfim.generator.rules import find_rule
from nnfim.testing import reference_jacobian


def _labelled(name: str) -> tuple[nn.Module, list[Any]]:
    if name == "encoder":
        model, ids = encoder_case()
        return model, [(x, torch.randint(0, VOCAB, (x.shape[0],))) for x in ids]
    case = make_case(name, "classif_logits")
    return case.model, case.loader


def _reference_grads(model: nn.Module, loader: list[Any]) -> torch.Tensor:
    """Per-example cross-entropy gradients ``(n, P)`` from ``vmap(jacrev)``."""
    jac, out = reference_jacobian(model, loader)
    y = torch.cat([b[1] for b in loader])
    g_out = torch.softmax(out, -1) - F.one_hot(y, out.shape[1]).to(out.dtype)
    return torch.einsum("nci,nc->ni", jac, g_out)


class _Batches:
    """A re-iterable loader that is not a list: its size is unknown up front."""

    def __init__(self, batches: list[Any]) -> None:
        self.batches = batches

    def __iter__(self) -> Iterator[Any]:
        return iter(self.batches)


@pytest.mark.parametrize("name", ["mlp", "mlp_nobias", "cnn", "encoder"])
@pytest.mark.parametrize("kind", ["list", "iterable"])
@pytest.mark.parametrize("chunk_size", [None, 3])
def test_per_example_grads_in_place(name, kind, chunk_size) -> None:
    model, loader = _labelled(name)
    ref = _reference_grads(model, loader)
    before = model_state(model)
    data = loader if kind == "list" else _Batches(loader)
    got = per_example_grads(model, data, chunk_size=chunk_size)
    assert_same_state(before, model_state(model))
    torch.testing.assert_close(got, ref)
    assert got.is_contiguous()


@pytest.mark.parametrize("rows", ["more", "fewer"])
def test_rows_with_other_counts_than_the_batch_sizes(rows) -> None:
    """A ``function`` giving more or fewer rows than the batches announce."""
    case = make_case("mlp", "regression")

    def inputs(x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, 2 * x]) if rows == "more" else x[:-1]

    def function(model: nn.Module, batch: Any) -> torch.Tensor:
        return model(inputs(batch[0]))

    jac = Jacobian(case.model, case.loader, function=function).dense()
    ref, _ = reference_jacobian(case.model, [inputs(x) for x, _ in case.loader])
    torch.testing.assert_close(jac, ref.permute(1, 0, 2))


@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_jacobian_dense_in_place(name) -> None:
    case = make_case(name, "regression")
    ref, _ = reference_jacobian(case.model, case.loader)
    got = Jacobian(case.model, case.loader, chunk_size=2).dense()
    torch.testing.assert_close(got, ref.permute(1, 0, 2))


_LAYERS = {
    "linear": lambda: (nn.Linear(5, 4), (6, 5)),
    "linear_nobias": lambda: (nn.Linear(5, 4, bias=False), (6, 5)),
    "linear_positions": lambda: (nn.Linear(5, 4), (6, 3, 5)),  # derived path
    "conv": lambda: (nn.Conv2d(2, 3, 3), (6, 2, 5, 5)),
}


@pytest.mark.parametrize("layer", list(_LAYERS))
@pytest.mark.parametrize("subset", [False, True])
def test_write_grads_into_strided_columns(layer, subset) -> None:
    """``write_grads`` equals ``flat_grads`` when writing into a column slice."""
    module, shape = _LAYERS[layer]()
    x = torch.randn(shape)
    rule = find_rule(module)
    assert rule is not None
    names = [n for n, _ in module.named_parameters()]
    if subset:
        names = names[-1:]
    gy = torch.randn(2, *module(x).shape)
    ref = rule.flat_grads(module, x, gy, names).reshape(2, x.shape[0], -1)
    wide = torch.full((2, x.shape[0], ref.shape[-1] + 7), float("nan"))
    rule.write_grads(module, x, gy, names, wide[..., 3 : 3 + ref.shape[-1]])
    torch.testing.assert_close(wide[..., 3 : 3 + ref.shape[-1]], ref)
    assert wide[..., :3].isnan().all() and wide[..., 3 + ref.shape[-1] :].isnan().all()


class _CountingForward(nn.Module):
    """Records the batch size of every forward call."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net
        self.sizes: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.sizes.append(x.shape[0])
        return self.net(x)


@pytest.mark.usefixtures("unjoined")
@pytest.mark.parametrize("fisher_type", ["exact", "mc", "empirical"])
@pytest.mark.parametrize("name", ["mlp_nobias", "mlp"])
def test_layer_check_forwards_2_and_3_examples(fisher_type, name) -> None:
    """The check costs two small forwards; then each batch runs once ("mlp" has a
    ReLU(inplace=True) changing a layer output: seen in the small forwards)."""
    case = make_case(name, "classif_logits")
    model = _CountingForward(case.model)
    diag = FIM(model, case.loader, PMatDiag, fisher_type=fisher_type).diag()
    sizes = [x.shape[0] for x, _ in case.loader]
    assert sizes[0] >= 4
    assert model.sizes == [2, 3, *sizes]
    ref = FIM(case.model, case.loader, PMatDiag, fisher_type=fisher_type).diag()
    torch.testing.assert_close(diag, ref)
    gen = Generator(model, case.loader, fisher_type=fisher_type)
    gen.diag()
    model.sizes.clear()
    gen.diag()  # the check is cached: no extra forward on a second pass
    assert model.sizes == sizes


@pytest.mark.parametrize("fisher_type", ["exact", "mc"])
@pytest.mark.parametrize("name", ["mlp_nobias", "mlp"])
def test_layer_check_reuses_a_short_first_batch(fisher_type, name) -> None:
    """Where batches are neither cut nor joined (``sub_batch=None``), a first
    batch of 3 examples is checked whole (and with 2 of them); that forward is
    kept for the pass, except where a layer output is changed in place
    ("mlp"): its first batch runs again with the outputs cloned."""
    case = make_case(name, "classif_logits")
    (x0, y0), *rest = case.loader
    loader = [(x0[:3], y0[:3]), *rest]
    model = _CountingForward(case.model)
    kw = {"fisher_type": fisher_type, "sub_batch": None}
    diag = FIM(model, loader, PMatDiag, **kw).diag()
    again = [3] if name == "mlp" else []
    assert model.sizes == [3, 2, *again, *[x.shape[0] for x, _ in rest]]
    ref = Generator(case.model, loader, **kw)
    ref._kept = None  # no reuse: the check and the pass run apart
    ref.rules()
    torch.testing.assert_close(diag, ref.diag())


@pytest.mark.parametrize("fisher_type", ["exact", "mc"])
@pytest.mark.parametrize("name", ["mlp_nobias", "mlp"])
def test_layer_check_probes_copies_of_a_short_first_batch(fisher_type, name) -> None:
    """On CPU with ``sub_batch="auto"``, a first batch of 3 examples is probed
    on 2 and 3 of 6 copies of it, which sizes the joining: the pass then runs
    it joined with the next batch, and the diagonal is that of the batches one
    by one."""
    case = make_case(name, "classif_logits")
    (x0, y0), *rest = case.loader
    loader = [(x0[:3], y0[:3]), *rest]
    model = _CountingForward(case.model)
    diag = FIM(model, loader, PMatDiag, fisher_type=fisher_type).diag()
    assert model.sizes == [2, 3, 3 + sum(x.shape[0] for x, _ in rest)]
    ref = FIM(case.model, loader, PMatDiag, fisher_type=fisher_type, sub_batch=None)
    torch.testing.assert_close(diag, ref.diag())


class _GrowsWithBatch(nn.Module):
    """Calls ``extra`` only on batches of more than 3 examples."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(3, 4)
        self.extra = nn.Linear(4, 4)
        self.b = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.a(x))
        if x.shape[0] > 3:
            h = torch.tanh(self.extra(h))
        return self.b(h)


def test_layer_check_whole_batch_decides_calls_that_depend_on_it() -> None:
    """The small forwards leave ``extra`` uncalled: the whole batch is checked,
    and ``extra`` gets its rule rather than falling back."""
    model = _GrowsWithBatch()
    loader = [(torch.randn(6, 3), torch.randint(0, 2, (6,)))]
    gen = Generator(model, loader, strict=True)
    rules = gen.rules()
    assert gen._calls == {"a": 1, "extra": 1, "b": 1}
    assert not any(isinstance(r, FallbackRule) for r in rules.values())
    # the reference backpropagates each example's loss through the whole batch
    # (under vmap the model would see one example and skip ``extra``)
    (x, y), params = loader[0], list(model.parameters())
    losses = F.cross_entropy(model(x), y, reduction="none")
    ref = torch.stack(
        [
            torch.cat(
                [
                    g.flatten()
                    for g in torch.autograd.grad(loss, params, retain_graph=True)
                ]
            )
            for loss in losses
        ]
    )
    torch.testing.assert_close(per_example_grads(model, loader), ref)


class _BroadcastPositions(nn.Module):
    def __init__(self, t: int) -> None:
        super().__init__()
        self.t = t
        self.pos = nn.Embedding(t, 4)
        self.lin = nn.Linear(4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin((x + self.pos(torch.arange(self.t))).mean(1))


@pytest.mark.parametrize("n", [2, 3, 4])
def test_layer_check_detects_positions_as_many_as_examples(n) -> None:
    """With ``T == n`` the small forward still tells ``pos`` from a batch layer:
    it is expanded over the batch, its rows never read as examples."""
    model = _BroadcastPositions(n)
    loader = [(torch.randn(n, n, 4), torch.randint(0, 5, (n,)))]
    gen = Generator(model, loader)
    rules = gen.rules()
    assert gen._broadcast == {"pos"}
    assert not any(isinstance(r, FallbackRule) for r in rules.values())
    torch.testing.assert_close(
        per_example_grads(model, loader), _reference_grads(model, loader)
    )


class _Switch(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(3, 3)
        self.b = nn.Linear(3, 2)
        self.mode = "once"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "twice":
            x = self.a(x)
        return self.b(self.a(x) if self.mode != "skip" else x)


@pytest.mark.parametrize(
    "mode, match", [("twice", "2 times in this batch"), ("skip", "not called")]
)
def test_cached_layer_check_sees_modules_change(mode, match) -> None:
    """A generator reused after the model changed raises instead of reading stale rules."""
    model = _Switch()
    loader = [(torch.randn(4, 3), torch.randint(0, 2, (4,)))]
    gen = Generator(model, loader)
    gen.diag()
    model.mode = mode
    before = model_state(model)
    with pytest.raises(ValueError, match=match):
        gen.diag()
    assert_same_state(before, model_state(model))


def test_kept_forward_with_an_output_changed_in_place() -> None:
    """``ReLU(inplace=True)`` after a Linear: the kept forward is not reused."""
    case = make_case("mlp", "classif_logits")  # holds ReLU(inplace=True)
    ref = _reference_grads(case.model, case.loader)
    torch.testing.assert_close(per_example_grads(case.model, case.loader), ref)


class _OwnForward(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * 2


def _jvp_reference(model: nn.Module, x: torch.Tensor, v: dict[str, torch.Tensor]):
    params = {k: p.detach() for k, p in model.named_parameters()}
    fixed = {k: p for k, p in params.items() if k not in v}

    def f(p: dict[str, torch.Tensor]) -> torch.Tensor:
        return functional_call(model, {**fixed, **p}, (x,))

    return jvp(f, ({k: params[k] for k in v},), (v,))[1]


@pytest.mark.parametrize("shape", [(6, 5), (6, 3, 5)])
@pytest.mark.parametrize("skip", [None, "0.weight", "0.bias", "2.weight"])
@pytest.mark.parametrize("bias", [True, False])
def test_linear_tangents(shape, skip, bias) -> None:
    """Tangents and reverse-mode gradients equal torch.func's, whatever has a tangent."""
    model = nn.Sequential(
        nn.Linear(5, 4, bias=bias), nn.Tanh(), _OwnForward(4, 3), nn.Linear(3, 2)
    )
    x = torch.randn(shape)
    v = {k: torch.randn_like(p) for k, p in model.named_parameters() if k != skip}
    ref = _jvp_reference(model, x, v)
    u = torch.randn_like(ref)
    params = dict(model.named_parameters())
    ref_grads = torch.autograd.grad(model(x), [params[k] for k in v], u)
    with linear_tangents(model), fwAD.dual_level():
        assert "forward" in vars(model[0]) and "forward" not in vars(model[2])
        duals = {k: fwAD.make_dual(params[k], t) for k, t in v.items()}
        out = functional_call(model, duals, (x,))
        primal, tangent = fwAD.unpack_dual(out)
        grads = torch.autograd.grad(primal, [params[k] for k in v], u)
    torch.testing.assert_close(tangent, ref)
    for g, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r)
    assert all("forward" not in vars(m) for m in model.modules())


def test_linear_tangents_restored_on_error() -> None:
    model = nn.Sequential(nn.Linear(3, 2))
    with pytest.raises(RuntimeError, match="boom"), linear_tangents(model):
        raise RuntimeError("boom")
    assert "forward" not in vars(model[0])


@pytest.mark.parametrize("name", ["mlp", "cnn", "encoder"])
def test_jvp_and_mv_with_linear_tangents(name) -> None:
    """``J v`` and ``F v`` of the generator against dense torch.func references."""
    model, loader = _labelled(name)
    lc = LayerCollection.from_model(model)
    jac, out = reference_jacobian(model, loader)
    v = PVector.from_flat(lc, torch.randn(lc.numel()))
    gen = Generator(model, loader)
    before = model_state(model)
    got = gen.jvp(v)
    torch.testing.assert_close(got, torch.einsum("nci,i->nc", jac, v.flatten()))
    p = torch.softmax(out, -1)
    h = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    fisher = torch.einsum("nci,ncd,ndj->ij", jac, h, jac) / jac.shape[0]
    torch.testing.assert_close(gen.mv(v).flatten(), fisher @ v.flatten())
    assert_same_state(before, model_state(model))


# -- negligible direction entries zeroed -------------------------------------------
def _confident_mlp() -> tuple[nn.Module, list[Any]]:
    """Logits spread over hundreds: probabilities far below 1e-30."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 30))
    with torch.no_grad():
        model[2].weight.mul_(60.0)
    return model, [(torch.randn(5, 6), torch.randint(0, 30, (5,)))]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_negligible_entries_zeroed_per_example(dtype) -> None:
    from nnfim.generator._passes import negligible_zeroed

    eps2 = torch.finfo(dtype).eps ** 2
    d = torch.tensor(
        [[[1.0, 0.5 * eps2, 2 * eps2], [1e-3, 1e-3 * 0.5 * eps2, 1e-3 * 2 * eps2]]],
        dtype=dtype,
    )  # (K=1, n=2, C=3): the second example's scale is its own largest entry
    got = negligible_zeroed(d.expand(2, 2, 3))
    kept = torch.tensor(
        [[[1.0, 0.0, 2 * eps2], [1e-3, 0.0, 1e-3 * 2 * eps2]]], dtype=dtype
    )
    assert torch.equal(got, kept.expand(2, 2, 3))
    ids = torch.arange(6).reshape(1, 2, 3)
    assert negligible_zeroed(ids) is ids


@pytest.mark.parametrize("fisher_type", ["exact", "mc", "empirical"])
def test_confident_softmax_in_float32_matches_float64(fisher_type) -> None:
    """Zeroed negligible entries change nothing visible: float32 against float64."""
    model, loader = _confident_mlp()
    kwargs = {"fisher_type": fisher_type, "seed": 3}
    got = FIM(model, loader, PMatDiag, **kwargs).diag()
    v = PVector.from_flat(LayerCollection.from_model(model), got)
    mv = FIM(model, loader, PMatImplicit, **kwargs).mv(v).flatten()
    model64 = model.double()
    loader64 = [(x.double(), y) for x, y in loader]
    probs = torch.softmax(model64(loader64[0][0]), -1)
    assert probs.min() < 1e-30  # products of these are subnormal in float32
    ref = FIM(model64, loader64, PMatDiag, **kwargs).diag()
    v64 = PVector.from_flat(LayerCollection.from_model(model64), got.double())
    ref_mv = FIM(model64, loader64, PMatImplicit, **kwargs).mv(v64).flatten()
    model.float()
    assert (got.double() - ref).abs().max() / ref.abs().max() < 1e-5
    assert (mv.double() - ref_mv).abs().max() / ref_mv.abs().max() < 1e-5


_HEAP_CHECK = """
import ctypes, torch
from nnfim import FIM, PMatDiag
from nnfim.generator import _passes

class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd",
        "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

mallinfo2 = ctypes.CDLL(None).mallinfo2
mallinfo2.restype = Info

def mapped(nbytes):  # a block, kept alive; was it served by mmap?
    before = mallinfo2().hblkhd
    block = torch.empty(nbytes, dtype=torch.uint8)
    return block, mallinfo2().hblkhd - before >= nbytes

first, first_mapped = mapped(16 << 20)
model = torch.nn.Linear(3, 2)
FIM(model, [(torch.randn(4, 3), torch.zeros(4, dtype=torch.long))], PMatDiag)
second, second_mapped = mapped(16 << 20)
print(first_mapped, second_mapped, _passes._heap_primed)
"""


@pytest.mark.skipif(
    __import__("platform").libc_ver() < ("glibc", "2.33"), reason="glibc's mallinfo2"
)
@pytest.mark.parametrize("prime", [True, False])
def test_a_cpu_pass_raises_the_heaps_mmap_threshold(prime: bool) -> None:
    """Before nnfim's first CPU pass, glibc serves a 16 MiB block by ``mmap``
    (and would hand it back on free); after it (``prime_heap``), from its heap,
    which keeps freed blocks. With ``NNFIM_PRIME_HEAP=0`` the allocator is
    left alone. In a fresh process: this one's heap has seen larger blocks."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "NNFIM_PRIME_HEAP"}
    if not prime:
        env["NNFIM_PRIME_HEAP"] = "0"
    proc = subprocess.run(
        [sys.executable, "-c", _HEAP_CHECK],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
        env=env,
    )
    first, second, primed = proc.stdout.split()
    assert first == "True"
    assert second == ("False" if prime else "True")
    assert primed == "True"
