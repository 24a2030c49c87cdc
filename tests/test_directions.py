"""The exact softmax Fisher through C - 1 output directions instead of C."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_same_state, make_case, model_state
from torch import nn

from nnfim import (
    FIM,
    FMatDense,
    PMatDense,
    PMatDiag,
    PMatEKFAC,
    PMatKFAC,
    PMatLowRank,
    PVector,
)
from nnfim.generator import Generator
from nnfim.generator.variants import get_variant
from nnfim.testing import reference_fisher


def _logits(kind: str, n: int, c: int, dtype: torch.dtype) -> torch.Tensor:
    """Random, saturated (probabilities underflow to 0), tied and one-hot logits."""
    gen = torch.Generator().manual_seed(0)
    if kind == "random":
        return torch.randn(n, c, generator=gen, dtype=dtype) * 3
    if kind == "saturated":
        return torch.randn(n, c, generator=gen, dtype=dtype) * 1e3
    if kind == "tied":  # the pivot is one of several equally likely classes
        out = torch.zeros(n, c, dtype=dtype)
        out[:, 1:3] = 5.0
        return out
    out = torch.full((n, c), -1e4, dtype=dtype)  # one class takes all the mass
    out[torch.arange(n), torch.arange(n) % c] = 0.0
    return out


def _output_fisher(variant: str, out: torch.Tensor) -> torch.Tensor:
    """``diag(p) - p p^T`` per example in float64, ``(n, C, C)``."""
    f = out.double()
    p = torch.softmax(f, -1) if variant == "classif_logits" else f.exp()
    return torch.diag_embed(p) - p[:, :, None] * p[:, None, :]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("kind", ["random", "saturated", "tied", "onehot"])
@pytest.mark.parametrize("variant", ["classif_logits", "classif_logsoftmax"])
@pytest.mark.parametrize("c", [2, 3, 10])
def test_factor_reproduces_the_output_fisher(variant, kind, dtype, c) -> None:
    """``sum_k d_k d_k^T = diag(p) - p p^T`` with ``C - 1`` finite directions."""
    out = _logits(kind, 12, c, dtype)
    if variant == "classif_logsoftmax":
        out = torch.log_softmax(out, -1)
    d = get_variant(variant).fisher_directions(out)
    assert d.shape == (c - 1, 12, c)
    assert d.dtype == dtype
    assert bool(torch.isfinite(d).all())
    got = torch.einsum("kni,knj->nij", d.double(), d.double())
    tol = 1e-15 if dtype == torch.float64 else 3e-7
    torch.testing.assert_close(got, _output_fisher(variant, out), rtol=0, atol=tol)


@pytest.mark.parametrize("variant", ["classif_logits", "classif_logsoftmax"])
def test_factor_spans_the_output_fisher(variant) -> None:
    """The directions lie in the range of ``H`` (orthogonal to ``1``)."""
    out = _logits("random", 8, 5, torch.float64)
    if variant == "classif_logsoftmax":
        out = torch.log_softmax(out, -1)
    d = get_variant(variant).fisher_directions(out)
    torch.testing.assert_close(d.sum(-1), torch.zeros(4, 8, dtype=torch.float64))


def test_one_output_has_one_zero_direction() -> None:
    d = get_variant("classif_logits").fisher_directions(torch.randn(5, 1))
    assert d.shape == (1, 5, 1)
    assert not bool(d.any())


@pytest.mark.usefixtures("unjoined")
@pytest.mark.parametrize(
    ("variant", "fisher_type", "k"),
    [
        ("classif_logits", "exact", 2),
        ("classif_logsoftmax", "exact", 2),
        ("classif_binary", "exact", 2),
        ("regression", "exact", 3),
        ("classif_logits", "mc", 4),
        ("classif_logits", "empirical", 1),
    ],
)
def test_generator_backpropagates_the_fewest_directions(
    variant, fisher_type, k
) -> None:
    """The rules see ``K = C - 1`` for the exact softmax Fisher (C = 3 here), the
    Monte-Carlo samples or one label otherwise; the Gram dual keeps all ``C``."""
    case = make_case("mlp", variant)
    gen = Generator(
        case.model,
        case.loader,
        variant=variant,
        fisher_type=fisher_type,
        mc_samples=4,
    )
    seen: list[int] = []
    gen.layer_pass(lambda xs, gys: seen.append(next(iter(gys.values())).shape[0]))
    assert seen == [k, k]
    full = len(next(iter(gen.layer_io()[0][1].values())))
    c = 2 if variant == "classif_binary" else 3
    assert full == (c if fisher_type == "exact" else k)
    assert not gen._all_directions


@pytest.mark.parametrize("variant", ["classif_logits", "classif_logsoftmax"])
def test_low_rank_factor_has_c_minus_1_rows_per_example(variant) -> None:
    case = make_case("mlp", variant)
    fim = FIM(case.model, case.loader, PMatLowRank, variant=variant)
    assert fim.factor.shape[0] == 2 * 10  # (C - 1) n, C = 3, n = 10
    ref = reference_fisher(case.model, case.loader, variant)
    torch.testing.assert_close(fim.dense(), ref, rtol=1e-9, atol=1e-12)


def test_gram_dual_keeps_the_c_directions() -> None:
    """``FIM(.., FMatDense)`` is still ``(1/n) [g_ki . g_lj]`` over all C classes."""
    case = make_case("mlp", "classif_logits")
    gram = FIM(case.model, case.loader, FMatDense)
    assert gram.shape == (3, 10, 3, 10)
    rows = Generator(case.model, case.loader)
    rows._all_directions = True
    parts: list[torch.Tensor] = []
    rows.row_pass(parts.append)
    u = torch.cat(parts, 1).reshape(30, -1)
    torch.testing.assert_close(gram.data.reshape(30, 30), u @ u.t() / 10)


def _saturated_case(dtype: torch.dtype) -> tuple[nn.Module, list]:
    """A classifier so confident that most probabilities underflow to 0."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 5)).to(dtype)
    with torch.no_grad():
        model[2].weight.mul_(300.0)
    loader = [(torch.randn(7, 4, dtype=dtype), torch.zeros(7, dtype=torch.long))]
    return model, loader


@pytest.mark.parametrize(
    "representation", [PMatDense, PMatDiag, PMatEKFAC, PMatLowRank]
)
def test_saturated_outputs_match_the_reference(representation) -> None:
    """Exact where the structure is: EKFAC after its refit keeps the trace."""
    model, loader = _saturated_case(torch.float64)
    p = torch.softmax(model(loader[0][0]), -1)
    assert bool((p < 1e-30).any())  # really saturated
    state = model_state(model)
    fim = FIM(model, loader, representation, ekfac_refit=True)
    assert_same_state(state, model_state(model))
    ref = reference_fisher(model, loader)
    if representation in (PMatDense, PMatLowRank):
        torch.testing.assert_close(fim.dense(), ref, rtol=1e-9, atol=1e-12)
    elif representation is PMatEKFAC:
        torch.testing.assert_close(fim.trace(), torch.trace(ref), rtol=1e-9, atol=0)
    else:
        torch.testing.assert_close(
            fim.diag(), torch.diagonal(ref), rtol=1e-9, atol=1e-12
        )


def test_saturated_outputs_in_float32_are_finite_and_accurate() -> None:
    model, loader = _saturated_case(torch.float32)
    fim = FIM(model, loader, PMatDense).dense()
    assert bool(torch.isfinite(fim).all())
    ref = reference_fisher(model.double(), [(loader[0][0].double(), loader[0][1])])
    err = (fim.double() - ref).abs().max() / ref.abs().max()
    assert float(err) < 1e-4


@pytest.mark.parametrize("representation", [PMatKFAC, PMatEKFAC])
@pytest.mark.parametrize("variant", ["classif_logits", "classif_logsoftmax"])
def test_kronecker_factors_equal_those_of_the_c_directions(
    representation, variant
) -> None:
    """K-FAC's ``G`` and EKFAC's refit sum over directions: C - 1 give the same."""
    case = make_case("mlp", variant)
    kw = {"variant": variant, "ekfac_refit": True}
    fim = FIM(case.model, case.loader, representation, **kw)
    gen = Generator(case.model, case.loader, variant=variant)
    gen._all_directions = True
    factors, _ = gen.kfac()
    if representation is PMatKFAC:
        for name, (a, g) in factors.items():
            torch.testing.assert_close(fim.factors[name][0], a)
            torch.testing.assert_close(fim.factors[name][1], g)
    else:
        diags = gen.ekfac_diag(fim.bases)
        for name, d in diags.items():
            torch.testing.assert_close(fim.diags[name], d)
    v = PVector.from_flat(
        fim.layer_collection, torch.randn(fim.layer_collection.numel())
    )
    assert bool(torch.isfinite(fim.mv(v).flatten()).all())


@pytest.mark.parametrize("variant", ["classif_logits", "classif_logsoftmax"])
def test_sampled_label_is_the_inverse_cdf(variant) -> None:
    """Label ``y`` with ``cdf[y - 1] <= u < cdf[y]``: zero-probability classes are
    never drawn (not even at ``u = 0``), and the gradient is that of ``-log p_y``."""
    v = get_variant(variant)
    p = torch.tensor([0.2, 0.0, 0.5, 0.3])
    u = torch.tensor([0.0, 0.1, 0.2 + 1e-9, 0.69, 0.7 + 1e-9, 0.999])
    expected = torch.tensor([0, 0, 2, 2, 3, 3])
    rows = p.expand(len(u), -1)
    out = rows.log() if variant == "classif_logsoftmax" else rows.log() + 1.5
    grads = v.sample_grad(out, u[:, None])
    onehot = torch.nn.functional.one_hot(expected, 4).to(p.dtype)
    torch.testing.assert_close(
        grads, (rows - onehot) if variant == "classif_logits" else -onehot
    )
    # a first class of probability 0 is skipped at u = 0
    first = torch.tensor([[0.0, 0.5, 0.5]]).log()
    assert v.sample_grad(first, torch.zeros(1, 1))[0].argmin() == 1
