"""Hessian, GGN, Gram-dual spectrum, gradient statistics and landscapes vs torch.func."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import assert_same_state, make_case, model_state
from torch import nn
from torch.func import functional_call, grad, hessian, vmap

from nnfim import (
    FIM,
    LayerCollection,
    PMatBlockDiag,
    PMatDense,
    PMatDiag,
    PMatImplicit,
    PVector,
)
from nnfim.analysis import (
    GGN,
    Hessian,
    fim_spectrum,
    gradient_statistics,
    hessian_vector_product,
    landscape_1d,
    landscape_2d,
    random_direction,
    top_eigenvectors,
    weight_norms,
)
from nnfim.testing import _nll, reference_fisher

LOSS_VARIANTS = ["classif_logits", "classif_logsoftmax", "classif_binary", "regression"]


def reference_hessian(model: nn.Module, loader, variant: str) -> torch.Tensor:
    """``(1/n) sum_i d^2 l_i / dtheta^2`` by torch.func.hessian of a flat vector."""
    lc = LayerCollection.from_model(model)
    params = {k: v.detach() for k, v in lc.check_model(model).items()}
    flat0 = lc.flatten(params)
    x = torch.cat([b[0] for b in loader])
    y = torch.cat([b[1] for b in loader])

    def mean_loss(flat: torch.Tensor) -> torch.Tensor:
        out = functional_call(model, lc.unflatten(flat), (x,))
        if variant in ("classif_binary", "regression") and out.dim() == 1:
            out = out[:, None]
        return sum(_nll(variant, out[i], y[i]) for i in range(len(y))) / len(y)

    return hessian(mean_loss)(flat0)


@pytest.mark.parametrize("model_name", ["mlp", "cnn"])
@pytest.mark.parametrize("variant", LOSS_VARIANTS)
def test_hessian_dense_matches_torch_func(model_name: str, variant: str) -> None:
    case = make_case(model_name, variant)
    ref = reference_hessian(case.model, case.loader, variant)
    before = model_state(case.model)
    H = Hessian(case.model, case.loader, PMatDense, variant=variant, chunk_size=16)
    assert_same_state(before, model_state(case.model))
    torch.testing.assert_close(H.dense(), ref, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("variant", LOSS_VARIANTS)
def test_hessian_blockdiag_and_implicit(variant: str) -> None:
    case = make_case("mlp", variant)
    ref = reference_hessian(case.model, case.loader, variant)
    lc = LayerCollection.from_model(case.model)
    before = model_state(case.model)
    blocks = Hessian(case.model, case.loader, PMatBlockDiag, variant=variant)
    for name in lc.layer_names:
        sl = lc.layer_slice(name)
        torch.testing.assert_close(blocks.layer_blocks()[name], ref[sl, sl])
    implicit = Hessian(case.model, case.loader, PMatImplicit, variant=variant)
    v = torch.randn(lc.numel())
    out = implicit.mv(PVector.from_flat(lc, v)).flatten()
    torch.testing.assert_close(out, ref @ v)
    hv = hessian_vector_product(
        case.model, case.loader, PVector.from_flat(lc, v), variant=variant
    )
    torch.testing.assert_close(hv.flatten(), ref @ v)
    torch.testing.assert_close(implicit.diag(), torch.diagonal(ref))
    assert_same_state(before, model_state(case.model))


def test_hessian_custom_loss_fn() -> None:
    case = make_case("mlp", "regression")

    def loss_fn(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return 0.5 * (out - y).square().sum()

    H = Hessian(case.model, case.loader, PMatDense, loss_fn=loss_fn, variant="none")
    ref = reference_hessian(case.model, case.loader, "regression")
    torch.testing.assert_close(H.dense(), ref)


@pytest.mark.parametrize("variant", LOSS_VARIANTS)
def test_ggn_is_the_fisher_and_equals_hessian_for_linear_regression(
    variant: str,
) -> None:
    case = make_case("mlp", variant)
    ggn = GGN(case.model, case.loader, PMatDense, variant=variant)
    ref = reference_fisher(case.model, case.loader, variant)
    torch.testing.assert_close(ggn.dense(), ref)


def test_hessian_equals_ggn_for_linear_model_and_mse() -> None:
    model = nn.Linear(4, 3)
    loader = [(torch.randn(7, 4), torch.randn(7, 3))]
    h = Hessian(model, loader, PMatDense, variant="regression").dense()
    g = GGN(model, loader, PMatDense, variant="regression").dense()
    torch.testing.assert_close(h, g)


def test_hessian_top_eigenvectors() -> None:
    case = make_case("mlp", "classif_logits")
    ref_vals, ref_vecs = torch.linalg.eigh(
        reference_hessian(case.model, case.loader, "classif_logits")
    )
    H = Hessian(case.model, case.loader, PMatImplicit)
    vals, vecs = top_eigenvectors(H, 2, n_iter=H.layer_collection.numel())
    torch.testing.assert_close(vals, ref_vals.flip(0)[:2])
    overlap = abs(float(vecs[0].flatten() @ ref_vecs[:, -1]))
    assert overlap == pytest.approx(1.0, abs=1e-8)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"representation": PMatDiag}, "not available for the Hessian"),
        ({"variant": "function"}, "unknown variant"),
        ({"chunk_size": 0}, "chunk_size"),
    ],
)
def test_hessian_bad_arguments(kwargs, match) -> None:
    case = make_case("mlp", "classif_logits")
    with pytest.raises(ValueError, match=match):
        Hessian(case.model, case.loader, **kwargs)


def test_hessian_refuses_train_batchnorm_and_leaves_model_alone() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    loader = [(torch.randn(5, 3), torch.randint(0, 2, (5,)))]
    before = model_state(model)
    with pytest.raises(ValueError, match="model.eval"):
        Hessian(model, loader, PMatDense)
    assert_same_state(before, model_state(model))


def test_hessian_bad_batch_leaves_model_alone() -> None:
    case = make_case("mlp", "classif_logits")
    case.model(case.loader[0][0]).sum().backward()  # a .grad that must survive
    before = model_state(case.model)
    loader = [case.loader[0], case.loader[1][0]]  # second batch: no targets
    with pytest.raises(ValueError, match="inputs, targets"):
        Hessian(case.model, loader, PMatDense)
    assert_same_state(before, model_state(case.model))


@pytest.mark.parametrize(
    ("model_name", "variant", "n_out_examples"),
    [
        ("mlp", "classif_logits", 10),  # P = 109 > K n = 30: Fisher rank-deficient
        ("mlp_nobias", "classif_logits", 10),
        ("mlp", "regression", 60),  # K n = 180 > P = 109: Gram rank-deficient
        ("cnn", "classif_binary", 10),
    ],
)
def test_gram_dual_spectrum_equals_dense_fisher(
    model_name: str, variant: str, n_out_examples: int
) -> None:
    case = make_case(model_name, variant)
    x = torch.randn(n_out_examples, *case.loader[0][0].shape[1:])
    y = case.loader[0][1][:1].expand(n_out_examples, *case.loader[0][1].shape[1:])
    loader = [(x, y.clone())]
    before = model_state(case.model)
    spec = fim_spectrum(case.model, loader, variant=variant)
    assert_same_state(before, model_state(case.model))
    ref = torch.linalg.eigvalsh(reference_fisher(case.model, loader, variant)).flip(0)
    tol = 1e-10 * float(ref[0])
    ref_rank = int((ref > tol).sum())
    assert spec.rank == ref_rank
    torch.testing.assert_close(spec.nonzero, ref[:ref_rank], rtol=1e-8, atol=tol)
    assert spec.n_params == LayerCollection.from_model(case.model).numel()
    assert spec.condition_number == pytest.approx(
        float(ref[0] / ref[ref_rank - 1]), rel=1e-6
    )
    # the Gram's other eigenvalues are zeros
    assert (
        float(torch.cat([spec.eigenvalues[spec.rank :].abs(), torch.zeros(1)]).max())
        < tol
    )


@pytest.mark.parametrize("variant", ["classif_logits", "regression"])
def test_gradient_statistics_match_vmap(variant: str) -> None:
    case = make_case("mlp", variant)
    lc = LayerCollection.from_model(case.model)
    params = {k: v.detach() for k, v in lc.check_model(case.model).items()}
    x = torch.cat([b[0] for b in case.loader])
    y = torch.cat([b[1] for b in case.loader])

    def loss(p, xi, yi):
        return _nll(variant, functional_call(case.model, p, (xi[None],))[0], yi)

    g = vmap(grad(loss), (None, 0, 0))(params, x, y)
    rows = torch.cat([g[k].reshape(len(x), -1) for k in lc.param_names], 1)
    before = model_state(case.model)
    stats = gradient_statistics(case.model, case.loader, variant)
    assert_same_state(before, model_state(case.model))
    assert stats.n == len(x)
    torch.testing.assert_close(stats.mean.flatten(), rows.mean(0))
    torch.testing.assert_close(stats.variance.flatten(), rows.var(0, correction=0))
    noise = float(((rows - rows.mean(0)) ** 2).sum(1).mean())
    assert stats.noise == pytest.approx(noise, rel=1e-9)
    assert stats.snr == pytest.approx(float(rows.mean(0).norm() ** 2) / noise)


def test_weight_norms() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    norms = weight_norms(model)
    assert norms["l2"] == pytest.approx(float(flat.norm()))
    assert norms["linf"] == pytest.approx(float(flat.abs().max()))
    last = torch.cat([model[2].weight.reshape(-1), model[2].bias]).detach()
    assert norms["l2/2"] == pytest.approx(float(last.norm()))
    assert norms["linf/2"] == pytest.approx(float(last.abs().max()))


@pytest.mark.parametrize("model_name", ["mlp", "cnn"])
def test_landscapes_match_moved_copies(model_name: str) -> None:
    case = make_case(model_name, "classif_logits")
    w = PVector.from_model(case.model).detach().clone()
    d1 = random_direction(w, seed=1)
    d2 = random_direction(w, seed=2)
    assert float(d1.norm()) == pytest.approx(float(w.norm()))
    assert float((d1.flatten() - d2.flatten()).norm()) > 0
    alphas = torch.tensor([-0.5, 0.0, 0.25])
    betas = torch.tensor([0.1, -0.2])

    def moved_loss(a: float, b: float) -> float:
        other = copy.deepcopy(case.model)
        with torch.no_grad():
            for name, p in other.named_parameters():
                p.add_(a * d1[name] + b * d2[name])
        x = torch.cat([b_[0] for b_ in case.loader])
        y = torch.cat([b_[1] for b_ in case.loader])
        with torch.no_grad():
            return float(nn.functional.cross_entropy(other(x), y))

    before = model_state(case.model)
    one = landscape_1d(case.model, case.loader, d1, alphas)
    two = landscape_2d(case.model, case.loader, d1, d2, alphas, betas)
    assert_same_state(before, model_state(case.model))
    for i, a in enumerate(alphas.tolist()):
        assert float(one[i]) == pytest.approx(moved_loss(a, 0.0), rel=1e-10)
        for j, b in enumerate(betas.tolist()):
            assert float(two[i, j]) == pytest.approx(moved_loss(a, b), rel=1e-10)


def test_fim_spectrum_via_fim_gram_matches_implicit_lanczos() -> None:
    # the Gram dual's top eigenvalue is the one Lanczos finds on PMatImplicit
    case = make_case("mlp", "classif_logits")
    spec = fim_spectrum(case.model, case.loader)
    fim = FIM(case.model, case.loader, PMatImplicit)
    vals, _ = top_eigenvectors(fim, 1, n_iter=60)
    assert float(vals[0]) == pytest.approx(float(spec.eigenvalues[0]), rel=1e-8)


@pytest.mark.parametrize("representation", [PMatDense, PMatBlockDiag, PMatImplicit])
def test_hessian_on_a_layer_subset_is_the_sub_block(representation) -> None:
    case = make_case("mlp", "classif_logits")
    full = LayerCollection.from_model(case.model)
    sub = full.subset(names=["2", "4"], model=case.model)
    ref = reference_hessian(case.model, case.loader, "classif_logits")
    idx = torch.cat(
        [
            torch.arange(full.layer_slice(n).start, full.layer_slice(n).stop)
            for n in sub.layer_names
        ]
    )
    H = Hessian(case.model, case.loader, representation, layer_collection=sub)
    expected = ref[idx][:, idx]
    if representation is PMatBlockDiag:
        offsets = [0]
        for n in sub.layer_names:
            offsets.append(offsets[-1] + sub[n].numel)
        mask = torch.zeros_like(expected, dtype=torch.bool)
        for a, b in zip(offsets[:-1], offsets[1:], strict=True):
            mask[a:b, a:b] = True
        expected = torch.where(mask, expected, torch.zeros_like(expected))
    torch.testing.assert_close(H.dense(), expected)
