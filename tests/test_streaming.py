"""Output directions streamed one at a time to additive consumers.

Where the directions are backpropagated one after the other (graphs with
convolutions), diagonals, K-FAC, dense and block-diagonal Fishers and EKFAC
refits receive one direction at a time instead of ``K`` stacked copies; the
Gram/NTK and per-example rows still receive every direction at once. Every
result is checked against ``torch.func`` / brute-force definitions or against
the batched (stacked) path, in float64.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from conftest import assert_same_state, make_case, model_state
from kfac_brute import brute_factors
from test_fisher import check_against
from torch import nn
from torch.func import functional_call, grad, vmap

from nnfim import (
    FIM,
    NTK,
    PMatBlockDiag,
    PMatDense,
    PMatDiag,
    PMatEKFAC,
    PMatKFAC,
    PMatQuasiDiag,
)
from nnfim import metrics as metrics_module
from nnfim.generator import jacobian
from nnfim.generator._passes import Additive, Gather, LayerIO
from nnfim.generator.rules import conv as conv_rules
from nnfim.generator.rules import find_rule
from nnfim.testing import reference_fisher, reference_jacobian

# the tests count backward passes per loader batch
pytestmark = pytest.mark.usefixtures("unjoined")

REPRESENTATIONS = [PMatDiag, PMatDense, PMatBlockDiag, PMatQuasiDiag]


def wide_cnn() -> tuple[nn.Module, list[tuple[torch.Tensor, torch.Tensor]]]:
    """Convolutions with short (27) and long (72) patches, groups, stride, dilation."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.Tanh(),
        nn.Conv2d(16, 8, 3, stride=2, padding=2, dilation=2, groups=2),
        nn.Tanh(),
        nn.Conv2d(8, 4, 3, padding=1, bias=False),
        nn.Flatten(),
        nn.Linear(36, 3),
    )
    loader = [(torch.randn(n, 3, 6, 6), torch.randint(0, 3, (n,))) for n in (5, 3)]
    return model, loader


@pytest.fixture(scope="module")
def wide() -> tuple[nn.Module, list[Any], torch.Tensor]:
    torch.set_default_dtype(torch.float64)
    try:
        model, loader = wide_cnn()
        return model, loader, reference_fisher(model, loader)
    finally:
        torch.set_default_dtype(torch.float32)


class Spy:
    """Records the leading (direction) size of every gradient a pass hands out."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.streamed = 0
        original = jacobian.direction_grads

        def counting(*args: Any, **kwargs: Any) -> Any:
            for grads in original(*args, **kwargs):
                assert all(g.shape[0] == 1 for g in grads)
                self.streamed += 1
                yield grads

        monkeypatch.setattr(jacobian, "direction_grads", counting)


def force(monkeypatch: pytest.MonkeyPatch, looped: bool) -> None:
    """Directions looped (streamed to additive consumers) or batched."""
    monkeypatch.setattr(jacobian, "batching_is_slow", lambda out: looped)


@pytest.mark.parametrize(
    ("patch_max", "batch_patches"),
    [(0, 1 << 23), (10**6, 0), (10**6, 1 << 23)],
    ids=["grouped_conv", "patches_per_direction", "patches_per_batch"],
)
@pytest.mark.parametrize("representation", REPRESENTATIONS, ids=lambda r: r.__name__)
def test_streamed_cnn_equals_torch_func(
    wide, monkeypatch, representation, patch_max, batch_patches
) -> None:
    """Every per-example weight-gradient path of Conv2d, against the dense reference.

    The (quasi-)diagonal's patches are unfolded per direction, or once per batch.
    """
    model, loader, ref = wide
    monkeypatch.setattr(conv_rules, "PATCH_PRODUCT_MAX", patch_max)
    monkeypatch.setattr(conv_rules, "PATCH_BATCH_ELEMENTS", batch_patches)
    unfolded = []
    diag_input = conv_rules.ConvRule.diag_input

    def spy_input(self, module, x):
        out = diag_input(self, module, x)
        unfolded.append(isinstance(out, conv_rules.Patched))
        return out

    monkeypatch.setattr(conv_rules.ConvRule, "diag_input", spy_input)
    spy = Spy(monkeypatch)
    before = model_state(model)
    check_against(FIM(model, loader, representation), ref)
    assert_same_state(before, model_state(model))
    # one backward per direction and batch: C - 1 = 2 for the exact softmax Fisher
    assert spy.streamed == 2 * len(loader)
    if representation in (PMatDiag, PMatQuasiDiag):  # 3 convolutions per batch
        assert unfolded == [patch_max > 0 and batch_patches > 0] * 3 * len(loader)


@pytest.mark.parametrize("chunk", [1, 1 << 21])
@pytest.mark.parametrize("convention", ["expand", "reduce"])
def test_streamed_cnn_kfac_factors_equal_brute_force(
    wide, monkeypatch, convention, chunk
) -> None:
    """``A`` once per batch (unfolded example by example, or whole), ``G`` per direction."""
    model, loader, _ = wide
    monkeypatch.setattr(conv_rules, "PATCH_CHUNK_ELEMENTS", chunk)
    spy = Spy(monkeypatch)
    kfac = FIM(model, loader, PMatKFAC, kfac_convention=convention)
    assert spy.streamed == 2 * len(loader)  # C - 1 directions
    for name in ("0", "2", "4", "6"):
        a, g = brute_factors(
            model, loader, "classif_logits", model[int(name)], convention
        )
        torch.testing.assert_close(kfac.factors[name][0], a)
        torch.testing.assert_close(kfac.factors[name][1], g)


@pytest.mark.parametrize("refit_pass", ["kept", "second"])
def test_streamed_ekfac_refit_equals_batched(wide, monkeypatch, refit_pass) -> None:
    """The refit replays the kept chunks of directions, or runs a streamed pass."""
    model, loader, _ = wide
    if refit_pass == "second":
        monkeypatch.setattr(metrics_module, "EKFAC_IO_ELEMENTS", 10)
    force(monkeypatch, looped=False)
    batched = FIM(model, loader, PMatEKFAC, ekfac_refit=True)
    force(monkeypatch, looped=True)
    spy = Spy(monkeypatch)
    streamed = FIM(model, loader, PMatEKFAC, ekfac_refit=True)
    assert spy.streamed == (1 if refit_pass == "kept" else 2) * 2 * len(
        loader
    )  # C - 1 = 2 directions
    for name, d in batched.diags.items():
        torch.testing.assert_close(streamed.diags[name], d)
    torch.testing.assert_close(streamed.dense(), batched.dense())


@pytest.mark.parametrize(
    "representation",
    [*REPRESENTATIONS, PMatKFAC, PMatEKFAC],
    ids=lambda r: r.__name__,
)
def test_mlp_forced_to_stream_equals_batched(monkeypatch, representation) -> None:
    case = make_case("mlp", "classif_logits")
    kwargs = {"ekfac_refit": True} if representation is PMatEKFAC else {}
    force(monkeypatch, looped=False)
    batched = FIM(case.model, case.loader, representation, **kwargs)
    force(monkeypatch, looped=True)
    spy = Spy(monkeypatch)
    streamed = FIM(case.model, case.loader, representation, **kwargs)
    assert spy.streamed > 0
    torch.testing.assert_close(streamed.dense(), batched.dense())


def test_gram_and_rows_get_every_direction(wide, monkeypatch) -> None:
    """Non-additive consumers still see ``(K, n, ...)``: the NTK, the Jacobian rows."""
    model, loader, _ = wide
    spy = Spy(monkeypatch)
    gen = jacobian.Generator(model, loader)
    for _xs, gys in gen.layer_io():
        assert {g.shape[0] for g in gys.values()} == {3}
    assert not gen._batched and spy.streamed == 0
    ntk = NTK(model, loader).data
    jac, _ = reference_jacobian(model, loader)  # (n, C, P)
    torch.testing.assert_close(ntk, torch.einsum("icp,jdp->cidj", jac, jac))
    assert spy.streamed == 0


def test_switch_to_a_loop_mid_pass_gathers_both_shapes(monkeypatch) -> None:
    """A first batch backpropagated batched, the next streamed: K-FAC and EKFAC agree."""
    import warnings

    case = make_case("mlp", "classif_logits")
    force(monkeypatch, looped=False)
    expected = FIM(case.model, case.loader, PMatEKFAC, ekfac_refit=True)
    original = torch.autograd.grad

    def warns_when_batched(*args: Any, **kwargs: Any) -> Any:
        if kwargs.get("is_grads_batched"):
            warnings.warn(
                "There is a performance drop because we have not yet implemented "
                "the batching rule for aten::x",
                UserWarning,
                stacklevel=2,
            )
        return original(*args, **kwargs)

    monkeypatch.setattr(torch.autograd, "grad", warns_when_batched)
    spy = Spy(monkeypatch)
    got = FIM(case.model, case.loader, PMatEKFAC, ekfac_refit=True)
    assert (
        spy.streamed == 2
    )  # C - 1 directions of the second batch; the refit replays the kept pass
    for name, d in expected.diags.items():
        torch.testing.assert_close(got.diags[name], d)
    torch.testing.assert_close(got.dense(), expected.dense())


def test_consumer_raising_mid_stream_leaves_the_model_alone(wide) -> None:
    model, loader, _ = wide
    before = model_state(model)

    class Fails(Additive):
        def directions(self, xs, gys) -> None:
            raise RuntimeError("consumer failed")

    with pytest.raises(RuntimeError, match="consumer failed"):
        jacobian.Generator(model, loader).layer_pass(Fails())
    assert_same_state(before, model_state(model))


@pytest.mark.parametrize(
    ("patch_max", "chunk"),
    [(0, 1 << 20), (10**6, 1 << 20), (10**6, 1)],
    ids=["grouped_conv", "patches", "patches_per_example"],
)
@pytest.mark.parametrize(
    ("make", "shape"),
    [
        (lambda: nn.Conv2d(8, 4, 3, padding=1), (4, 8, 7, 6)),
        (
            lambda: nn.Conv2d(8, 6, (3, 2), stride=(2, 1), dilation=(1, 2), groups=2),
            (4, 8, 7, 6),
        ),
        (
            lambda: nn.Conv2d(8, 4, 3, padding="same", padding_mode="reflect"),
            (4, 8, 7, 6),
        ),
        (lambda: nn.Conv1d(8, 6, 3, stride=2, dilation=2, groups=2), (4, 8, 11)),
        (
            lambda: nn.Conv3d(4, 3, 2, padding=1, padding_mode="circular"),
            (3, 4, 3, 4, 3),
        ),
    ],
    ids=["plain", "strided_dilated_groups", "reflect", "conv1d", "conv3d"],
)
def test_conv_rule_per_direction_against_torch_func(
    make, shape, patch_max, chunk, monkeypatch
):
    """Per-example gradients and the diagonal, per direction, against vmap(grad)."""
    monkeypatch.setattr(conv_rules, "PATCH_PRODUCT_MAX", patch_max)
    monkeypatch.setattr(conv_rules, "PATCH_CHUNK_ELEMENTS", chunk)
    module = make()
    x = torch.randn(shape)
    with torch.no_grad():
        gy = torch.randn(3, *module(x).shape)
    params = {k: v.detach() for k, v in module.named_parameters()}

    def scalar(p, xi, gi):
        return (functional_call(module, p, (xi[None],))[0] * gi).sum()

    per_k = [vmap(grad(scalar), (None, 0, 0))(params, x, g) for g in gy]
    rule = find_rule(module)
    xp = rule.prepare(module, x)
    got = rule.per_example_grad(module, xp, gy)
    diag = rule.diag(module, xp, gy)
    # patches unfolded once for every direction where they are short
    batch_diag = rule.diag(module, rule.diag_input(module, xp), gy)
    for name in params:
        expected = torch.stack([g[name] for g in per_k])
        torch.testing.assert_close(got[name], expected)
        torch.testing.assert_close(diag[name], (expected**2).sum((0, 1)))
        torch.testing.assert_close(batch_diag[name], (expected**2).sum((0, 1)))


def test_gather_flushes_when_shapes_change() -> None:
    """Two direction counts never concatenate; each lot is handed over whole."""
    seen: list[tuple[int, ...]] = []
    gather = Gather(lambda name, x, gy: seen.append(tuple(gy.shape)))
    gather.add("l", torch.ones(2, 3), torch.ones(4, 2, 5))
    gather.add("l", torch.ones(1, 3), torch.ones(4, 1, 5))
    gather.add("l", torch.ones(2, 3), torch.ones(1, 2, 5))
    gather.flush()
    assert seen == [(4, 3, 5), (1, 2, 5)]


def test_layer_io_replays_chunks_and_respects_its_budget() -> None:
    io = LayerIO(budget=100)
    io.names = ["l"]
    io.batch({"l": torch.ones(2, 3)})
    for _ in range(2):
        io.add({"l": torch.ones(1, 2, 4)})
    calls: list[str] = []

    class Record(Additive):
        def batch(self, xs) -> None:
            calls.append("batch")

        def directions(self, xs, gys) -> None:
            calls.append(f"dir{gys['l'].shape[0]}")

        def batch_end(self) -> None:
            calls.append("end")

    io.replay(Record())
    assert calls == ["batch", "dir1", "dir1", "end"] and io.complete
    io.add({"l": torch.ones(1, 100)})
    assert not io.complete and io.items == []


def test_rule_overriding_kfac_factors_gets_every_direction(wide, monkeypatch) -> None:
    """A rule without ``kfac_a`` / ``kfac_g`` is handed a batch's directions together."""
    from nnfim.generator.rules import _registry
    from nnfim.generator.rules.linear import LinearRule

    class Head(nn.Linear):
        pass

    seen: list[int] = []

    class HeadRule(LinearRule):
        def kfac_factors(self, module, x, gy, convention):
            seen.append(gy.shape[0])
            return LinearRule.kfac_factors(self, module, x, gy, convention)

    monkeypatch.setitem(_registry._RULES, Head, HeadRule())
    model, loader, _ = wide
    custom = nn.Sequential(*list(model)[:-1], Head(36, 3))
    custom[-1].load_state_dict(model[-1].state_dict())
    spy = Spy(monkeypatch)
    got = FIM(custom, loader, PMatKFAC)
    # the batches may be gathered into one call; never fewer than K directions
    assert spy.streamed == 2 * len(loader) and seen and set(seen) == {2}  # C - 1
    expected = FIM(model, loader, PMatKFAC)
    for name, (a, g) in expected.factors.items():
        torch.testing.assert_close(got.factors[name][0], a)
        torch.testing.assert_close(got.factors[name][1], g)
