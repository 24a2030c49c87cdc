"""The dense Fisher through outer factors (Linear layers) and rows (the rest)."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_same_state, make_case, model_state
from torch import nn

from nnfim import FIM, FIM_MonteCarlo, PMatBlockDiag, PMatDense, PMatLowRank
from nnfim.generator import Generator
from nnfim.generator.rules import find_rule
from nnfim.testing import reference_fisher


class _Scale(nn.Module):
    """A layer without a rule: falls back to torch.func rows."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale


class _Pool(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(1)


def _model(kind: str, c: int) -> nn.Module:
    torch.manual_seed(0)
    if kind == "mlp":
        return nn.Sequential(
            nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 4, bias=False), nn.Tanh(),
            nn.Linear(4, c),
        )  # fmt: skip
    if kind == "fallback":  # outer factors next to fallback rows
        return nn.Sequential(nn.Linear(5, 6), _Scale(6), nn.Tanh(), nn.Linear(6, c))
    # a Linear over positions (no single outer product) between plain ones
    return nn.Sequential(
        nn.Unflatten(1, (5, 1)), nn.Linear(1, 3), nn.Tanh(), _Pool(), nn.Linear(3, c)
    )


def _loader() -> list:
    gen = torch.Generator().manual_seed(1)
    return [
        (torch.randn(n, 5, generator=gen), torch.randint(0, 5, (n,), generator=gen))
        for n in (6, 4)
    ]


@pytest.mark.parametrize("chunk_size", [None, 1, 4])
@pytest.mark.parametrize("variant", ["classif_logits", "regression"])
@pytest.mark.parametrize("kind", ["mlp", "fallback", "positions"])
def test_dense_equals_the_reference(kind, variant, chunk_size) -> None:
    """C = 5 outputs: K = 4 (logits) or 5 (regression) directions, > 2."""
    model, loader = _model(kind, 5), _loader()
    if variant == "regression":
        loader = [(x, torch.randn(len(x), 5)) for x, _ in loader]
    state = model_state(model)
    fim = FIM(model, loader, PMatDense, variant=variant, chunk_size=chunk_size)
    assert_same_state(state, model_state(model))
    ref = reference_fisher(model, loader, variant)
    torch.testing.assert_close(fim.dense(), ref, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("kind", ["mlp", "fallback", "positions"])
def test_monte_carlo_dense_equals_its_rows(kind) -> None:
    """The same sampled matrix as the rows ``U^T U`` of the low-rank factor."""
    model, loader = _model(kind, 3), _loader()
    kw = {"trials": 5, "seed": 3}
    dense = FIM_MonteCarlo(model, loader, PMatDense, **kw).dense()
    rows = FIM_MonteCarlo(model, loader, PMatLowRank, **kw).dense()
    torch.testing.assert_close(dense, rows, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("chunk_size", [None, 1])
@pytest.mark.parametrize("kind", ["mlp", "fallback", "positions"])
def test_block_diag_equals_the_reference_blocks(kind, chunk_size) -> None:
    """Each layer's block alone: triangles of both factors, or rows."""
    model, loader = _model(kind, 5), _loader()
    fim = FIM(model, loader, PMatBlockDiag, chunk_size=chunk_size)
    ref = reference_fisher(model, loader)
    mask = torch.zeros_like(ref, dtype=torch.bool)
    for layer in fim.layer_collection:
        sl = fim.layer_collection.layer_slice(layer.name)
        mask[sl, sl] = True
    expected = torch.where(mask, ref, torch.zeros_like(ref))
    torch.testing.assert_close(fim.dense(), expected, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("model_name", ["mlp", "mlp_nobias", "cnn"])
def test_conftest_models_with_many_directions(model_name) -> None:
    """The suite's models with K = C = 3 regression directions."""
    case = make_case(model_name, "regression")
    dense = FIM(case.model, case.loader, PMatDense, variant="regression").dense()
    ref = reference_fisher(case.model, case.loader, "regression")
    torch.testing.assert_close(dense, ref, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("bias", [True, False])
def test_linear_outer_factors_are_the_per_example_gradients(bias) -> None:
    layer = nn.Linear(4, 3, bias=bias)
    x, gy = torch.randn(5, 4), torch.randn(2, 5, 3)
    rule = find_rule(layer)
    names = [n for n, _ in layer.named_parameters()]
    g, a, index = rule.outer_factors(layer, x, gy, names)
    rows = rule.flat_grads(layer, x, gy, names)
    outer = (g[..., :, None] * a[None, :, None, :]).reshape(10, -1)
    assert sorted(index.tolist()) == list(range(rows.shape[1]))
    torch.testing.assert_close(outer, rows[:, index])
    assert rule.outer_factors(layer, x[:, None], gy[:, :, None], names) is None
    if bias:
        assert rule.outer_factors(layer, x, gy, ["weight"]) is None


def test_few_directions_keep_the_rows() -> None:
    """With K <= 2 the rows' product is as cheap: no outer factors are formed."""
    case = make_case("mlp", "classif_logits")
    gen = Generator(case.model, case.loader)
    calls: list[int] = []
    rule = find_rule(case.model[0])
    original = type(rule).outer_factors

    def spy(self, *args):
        calls.append(1)
        return original(self, *args)

    type(rule).outer_factors = spy
    try:
        dense = gen.dense()
    finally:
        type(rule).outer_factors = original
    assert not calls
    ref = reference_fisher(case.model, case.loader)
    torch.testing.assert_close(dense, ref, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("representation", [PMatDense, PMatBlockDiag])
def test_assembly_in_small_pieces_changes_nothing(monkeypatch, representation) -> None:
    """The blocks are written a few factor rows at a time under a tiny budget."""
    from nnfim.generator import _dense

    model, loader = _model("fallback", 5), _loader()
    whole = FIM(model, loader, representation).dense()
    monkeypatch.setattr(_dense, "DEFAULT_CHUNK_ELEMENTS", 1)
    pieces = FIM(model, loader, representation).dense()
    torch.testing.assert_close(pieces, whole, rtol=0, atol=0)
    ref = reference_fisher(model, loader)
    if representation is PMatDense:
        torch.testing.assert_close(pieces, ref, rtol=1e-10, atol=1e-13)
