"""K-FAC and EKFAC: exact where they must be, equal to their definitions elsewhere."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import make_case
from kfac_brute import brute_factors, kfac_mv
from torch import nn

from nnfim import (
    FIM,
    FIM_MonteCarlo,
    LayerCollection,
    PMatDense,
    PMatEKFAC,
    PMatKFAC,
    PVector,
)
from nnfim.testing import reference_fisher


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("variant", ["classif_logits", "classif_binary", "regression"])
def test_one_linear_layer_one_example_is_exact(variant, bias) -> None:
    model = nn.Linear(4, 3, bias=bias)
    y = torch.ones(1, 3) if variant != "classif_logits" else torch.tensor([1])
    loader = [(torch.randn(1, 4), y)]
    kfac = FIM(model, loader, PMatKFAC, variant=variant)
    torch.testing.assert_close(kfac.dense(), reference_fisher(model, loader, variant))


@pytest.mark.parametrize("bias", [True, False])
def test_one_linear_layer_with_mse_is_exact(bias) -> None:
    model = nn.Linear(4, 3, bias=bias)
    loader = [
        (torch.randn(6, 4), torch.randn(6, 3)),
        (torch.randn(3, 4), torch.randn(3, 3)),
    ]
    kfac = FIM(model, loader, PMatKFAC, variant="regression")
    torch.testing.assert_close(
        kfac.dense(), reference_fisher(model, loader, "regression")
    )


def _seq_model() -> nn.Module:
    return nn.Sequential(
        nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2), nn.Flatten(), nn.Linear(10, 3)
    )


KFAC_CASES = {
    "mlp": (lambda: make_case("mlp", "classif_logits"), "classif_logits"),
    "cnn": (lambda: make_case("cnn", "classif_logits"), "classif_logits"),
    "cnn_regression": (lambda: make_case("cnn", "regression"), "regression"),
}


def _sequence_case():
    model = _seq_model()
    loader = [
        (torch.randn(4, 5, 3), torch.randint(0, 3, (4,))),
        (torch.randn(2, 5, 3), torch.randint(0, 3, (2,))),
    ]
    return model, loader


@pytest.mark.parametrize("convention", ["expand", "reduce"])
@pytest.mark.parametrize("case_name", list(KFAC_CASES) + ["sequence"])
def test_kfac_equals_its_definition(case_name, convention) -> None:
    if case_name == "sequence":
        model, loader = _sequence_case()
        variant = "classif_logits"
    else:
        make, variant = KFAC_CASES[case_name]
        case = make()
        model, loader = case.model, case.loader
    kfac = FIM(model, loader, PMatKFAC, variant=variant, kfac_convention=convention)
    reference = reference_fisher(model, loader, variant)
    modules = dict(model.named_modules())
    v = PVector.from_flat(
        kfac.layer_collection, torch.randn(kfac.layer_collection.numel())
    )
    got = kfac.mv(v)
    for layer in kfac.layer_collection:
        module = modules[layer.name]
        sl = kfac.layer_collection.layer_slice(layer.name)
        if isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            a, g = brute_factors(model, loader, variant, module, convention)
            torch.testing.assert_close(kfac.factors[layer.name][0], a)
            torch.testing.assert_close(kfac.factors[layer.name][1], g)
            bias_name = layer.full_name("bias")
            w, b = kfac_mv(
                module,
                a,
                g,
                v[layer.full_name("weight")],
                v[bias_name] if module.bias is not None else None,
            )
            torch.testing.assert_close(got[layer.full_name("weight")], w)
            if b is not None:
                torch.testing.assert_close(got[bias_name], b)
        else:  # layers without Kronecker structure are exact blocks
            torch.testing.assert_close(kfac.blocks[layer.name], reference[sl, sl])


CONVS = {
    "conv2d": (
        lambda: nn.Conv2d(4, 6, 3, stride=2, padding=1, dilation=2, groups=2),
        (4, 7, 7),
    ),
    "conv1d": (
        lambda: nn.Conv1d(4, 6, 3, stride=2, padding=2, dilation=2, groups=2),
        (4, 9),
    ),
    "conv3d": (
        lambda: nn.Conv3d(2, 4, (2, 3, 2), stride=(1, 2, 1), padding=1, groups=2),
        (2, 3, 5, 4),
    ),
    "conv3d_no_bias": (
        lambda: nn.Conv3d(2, 3, 2, dilation=(1, 2, 1), bias=False),
        (2, 3, 5, 3),
    ),
}


@pytest.mark.parametrize("convention", ["expand", "reduce"])
@pytest.mark.parametrize("conv", list(CONVS))
def test_conv_with_stride_dilation_groups_equals_definition(conv, convention) -> None:
    make, shape = CONVS[conv]
    model = nn.Sequential(make(), nn.Tanh(), nn.Flatten(), nn.LazyLinear(3))
    x = torch.randn(3, *shape)
    model(x)
    loader = [(x, torch.randint(0, 3, (3,)))]
    kfac = FIM(model, loader, PMatKFAC, kfac_convention=convention)
    layer = model[0]
    a, g = brute_factors(model, loader, "classif_logits", layer, convention)
    per_group = layer.in_channels // layer.groups * math.prod(layer.kernel_size)
    side = per_group + (layer.bias is not None)
    assert kfac.factors["0"][0].shape == (layer.groups, side, side)
    torch.testing.assert_close(kfac.factors["0"][0], a)
    torch.testing.assert_close(kfac.factors["0"][1], g)
    v = PVector.from_flat(
        kfac.layer_collection, torch.randn(kfac.layer_collection.numel())
    )
    w, b = kfac_mv(
        layer, a, g, v["0.weight"], v["0.bias"] if layer.bias is not None else None
    )
    got = kfac.mv(v)
    torch.testing.assert_close(got["0.weight"], w)
    if b is not None:
        torch.testing.assert_close(got["0.bias"], b)


@pytest.mark.parametrize("conv", ["conv1d", "conv3d"])
def test_conv_one_example_one_position_is_exact(conv) -> None:
    """A convolution whose output has one position is a linear layer: one example is exact."""
    make = {
        "conv1d": lambda: nn.Conv1d(3, 4, 5),
        "conv3d": lambda: nn.Conv3d(2, 3, (2, 3, 2)),
    }[conv]
    shape = {"conv1d": (3, 5), "conv3d": (2, 2, 3, 2)}[conv]
    model = nn.Sequential(
        make(), nn.Flatten(), nn.Tanh(), nn.Linear(4 if conv == "conv1d" else 3, 3)
    )
    loader = [(torch.randn(1, *shape), torch.randint(0, 3, (1,)))]
    lc = LayerCollection.from_model(model, names=["0"])
    kfac = FIM(model, loader, PMatKFAC, layer_collection=lc)
    dense = FIM(model, loader, PMatDense, layer_collection=lc)
    torch.testing.assert_close(kfac.dense(), dense.dense())


def test_kfac_and_dense_agree_on_a_single_example_mlp_layerwise() -> None:
    """One example: each Linear block of KFAC equals the exact Fisher's block."""
    case = make_case("mlp", "classif_logits")
    loader = [(case.loader[0][0][:1], case.loader[0][1][:1])]
    kfac = FIM(case.model, loader, PMatKFAC)
    ref = reference_fisher(case.model, loader)
    for layer in kfac.layer_collection:
        sl = kfac.layer_collection.layer_slice(layer.name)
        torch.testing.assert_close(kfac.dense()[sl, sl], ref[sl, sl])


def test_ekfac_starts_as_kfac() -> None:
    case = make_case("cnn", "classif_logits")
    kfac = FIM(case.model, case.loader, PMatKFAC)
    ekfac = FIM(case.model, case.loader, PMatEKFAC)
    torch.testing.assert_close(ekfac.dense(), kfac.dense())


def _basis_matrix(ekfac: PMatEKFAC, name: str) -> torch.Tensor:
    """Columns: the Kronecker eigenvectors in flat parameter order, built by hand."""
    qa, qg = ekfac.bases[name]
    layer = ekfac.layer_collection[name]
    shapes = dict(layer.params)
    groups, b, a = qa.shape[0], qg.shape[1], qa.shape[1]
    n_weight = (
        shapes["weight"].numel()
        if hasattr(shapes["weight"], "numel")
        else int(torch.tensor(shapes["weight"]).prod())
    )
    columns = []
    for gi in range(groups):
        for j in range(b):
            for k in range(a):
                mat = torch.zeros(groups, b, a)
                mat[gi] = torch.outer(qg[gi][:, j], qa[gi][:, k])
                w = mat[..., : a - ("bias" in shapes)].reshape(-1)
                parts = [w] + ([mat[..., -1].reshape(-1)] if "bias" in shapes else [])
                col = torch.cat(parts)
                assert col.numel() == layer.numel and w.numel() == n_weight
                columns.append(col)
    return torch.stack(columns, 1)


@pytest.mark.parametrize("fisher", ["exact", "mc", "empirical"])
@pytest.mark.parametrize("model_name", ["mlp", "cnn"])
def test_ekfac_refit_is_the_diagonal_in_the_kfac_basis(model_name, fisher) -> None:
    case = make_case(model_name, "classif_logits")
    kwargs = {"fisher_type": fisher, "seed": 1, "mc_samples": 2}
    ekfac = FIM(case.model, case.loader, PMatEKFAC, **kwargs).update_diag()
    exact = FIM(case.model, case.loader, PMatDense, **kwargs).dense()
    for name in ekfac.bases:
        sl = ekfac.layer_collection.layer_slice(name)
        basis = _basis_matrix(ekfac, name)
        torch.testing.assert_close(basis.t() @ basis, torch.eye(basis.shape[1]))
        expected = torch.diagonal(basis.t() @ exact[sl, sl] @ basis)
        torch.testing.assert_close(ekfac.diags[name].reshape(-1), expected)
        torch.testing.assert_close(
            ekfac.dense()[sl, sl], basis @ torch.diag(expected) @ basis.t()
        )


@pytest.mark.parametrize("fisher", ["exact", "mc", "empirical"])
def test_ekfac_refit_of_an_embedding(fisher) -> None:
    """Integer inputs: the refit's accumulator takes the gradients' dtype."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Embedding(7, 3), nn.Flatten(), nn.Tanh(), nn.Linear(12, 4)
    ).double()
    loader = [(torch.randint(0, 7, (5, 4)), torch.randint(0, 4, (5,)))]
    kwargs = {"fisher_type": fisher, "seed": 1}
    ekfac = FIM(model, loader, PMatEKFAC, **kwargs).update_diag()
    exact = FIM(model, loader, PMatDense, **kwargs).dense()
    assert "0" in ekfac.bases
    for name in ekfac.bases:
        sl = ekfac.layer_collection.layer_slice(name)
        basis = _basis_matrix(ekfac, name)
        expected = torch.diagonal(basis.t() @ exact[sl, sl] @ basis)
        torch.testing.assert_close(ekfac.diags[name].reshape(-1), expected)


@pytest.mark.parametrize("budget", ["kept", "over"])
@pytest.mark.parametrize("fisher", ["exact", "mc"])
@pytest.mark.parametrize("model_name", ["mlp", "cnn"])
def test_ekfac_refit_at_build_equals_update_diag(
    monkeypatch, model_name, fisher, budget
) -> None:
    """``ekfac_refit=True`` reuses the K-FAC pass (or runs a second one when the
    layer inputs and gradients pass the budget): same matrix as ``update_diag()``."""
    from nnfim import metrics

    if budget == "over":
        monkeypatch.setattr(metrics, "EKFAC_IO_ELEMENTS", 10)
    case = make_case(model_name, "classif_logits")
    kwargs = {"fisher_type": fisher, "seed": 3, "mc_samples": 2}
    forwards = []
    handle = case.model.register_forward_hook(lambda *_: forwards.append(1))
    try:
        refit = FIM(case.model, case.loader, PMatEKFAC, ekfac_refit=True, **kwargs)
        n_refit = len(forwards)
        forwards.clear()
        FIM(case.model, case.loader, PMatKFAC, **kwargs)
        n_kfac = len(forwards)
    finally:
        handle.remove()
    later = FIM(case.model, case.loader, PMatEKFAC, **kwargs).update_diag()
    for name in later.diags:
        torch.testing.assert_close(refit.diags[name], later.diags[name])
    torch.testing.assert_close(refit.dense(), later.dense())
    if budget == "kept":
        assert n_refit == n_kfac
    else:
        assert n_refit > n_kfac


def test_ekfac_update_diag_on_another_loader() -> None:
    case = make_case("mlp", "classif_logits")
    ekfac = FIM(case.model, case.loader, PMatEKFAC)
    first = ekfac.update_diag(case.loader[:1])
    alone = FIM(case.model, case.loader[:1], PMatEKFAC)
    # same basis? no: the basis comes from all data; only check the refit used one batch
    exact = FIM(case.model, case.loader[:1], PMatDense).dense()
    for name in first.bases:
        sl = first.layer_collection.layer_slice(name)
        basis = _basis_matrix(first, name)
        torch.testing.assert_close(
            first.diags[name].reshape(-1),
            torch.diagonal(basis.t() @ exact[sl, sl] @ basis),
        )
    assert alone is not first


def test_ekfac_loaded_from_file_cannot_refit(tmp_path) -> None:
    from nnfim import load

    case = make_case("mlp", "classif_logits")
    ekfac = FIM(case.model, case.loader, PMatEKFAC)
    ekfac.save(tmp_path / "e.pt")
    back = load(tmp_path / "e.pt")
    torch.testing.assert_close(back.dense(), ekfac.dense())
    with pytest.raises(ValueError, match="needs the model"):
        back.update_diag()


def test_factored_damping_solves_the_factored_matrix() -> None:
    case = make_case("mlp", "classif_logits")
    kfac = FIM(case.model, case.loader, PMatKFAC)
    regul = 0.3
    v = PVector.from_flat(
        kfac.layer_collection, torch.randn(kfac.layer_collection.numel())
    )
    got = kfac.solve(v, regul, method="factored").flatten()
    damped = kfac.pow(1.0, regul=regul)  # the factored-damped matrix itself
    expected = torch.linalg.solve(damped.dense(), v.flatten())
    torch.testing.assert_close(got, expected)
    for name, (a, g) in kfac.factors.items():
        pi = torch.sqrt(
            torch.diagonal(a, dim1=1, dim2=2).mean()
            / torch.diagonal(g, dim1=1, dim2=2).mean()
        )
        da, dg = damped.factors[name]
        torch.testing.assert_close(da, a + regul**0.5 / pi * torch.eye(a.shape[1]))
        torch.testing.assert_close(dg, g + regul**0.5 * pi * torch.eye(g.shape[1]))


def test_pow_and_inverse() -> None:
    case = make_case("cnn", "regression")
    kfac = FIM(case.model, case.loader, PMatKFAC, variant="regression")
    eye = torch.eye(kfac.layer_collection.numel())
    dense = kfac.dense()
    torch.testing.assert_close(kfac.pow(2.0).dense(), dense @ dense)
    half = kfac.pow(0.5, regul=0.0).dense()
    torch.testing.assert_close(half @ half, dense, atol=1e-8, rtol=1e-6)
    torch.testing.assert_close(
        kfac.inverse(0.2).dense(), torch.linalg.inv(dense + 0.2 * eye)
    )
    assert isinstance(kfac.inverse(0.2), PMatEKFAC)
    assert isinstance(kfac.inverse(0.2, method="factored"), PMatKFAC)


def test_kfac_mc_is_seeded() -> None:
    case = make_case("cnn", "classif_logits")
    a = FIM_MonteCarlo(case.model, case.loader, PMatKFAC, seed=4)
    b = FIM_MonteCarlo(case.model, case.loader, PMatKFAC, seed=4)
    torch.testing.assert_close(a.dense(), b.dense(), rtol=0, atol=0)


@pytest.mark.parametrize("model_name", ["cnn", "mlp"])
def test_kfac_factors_come_in_layer_order(model_name) -> None:
    """Ranks reduce the factors leaf by leaf: their order is the layers', never a set's."""
    from nnfim.generator.jacobian import Generator

    case = make_case(model_name, "classif_logits")
    gen = Generator(case.model, case.loader)
    factors, blocks = gen.kfac()
    names = [layer.name for layer in gen.layer_collection]
    assert list(factors) == [n for n in names if n in factors]
    assert list(blocks) == [n for n in names if n in blocks]


def test_unknown_convention() -> None:
    case = make_case("mlp", "classif_logits")
    with pytest.raises(ValueError, match="unknown KFAC convention"):
        FIM(case.model, case.loader, PMatKFAC, kfac_convention="sideways")


@pytest.mark.parametrize(("m", "d"), [(7, 3), (40, 250), (30, 257), (20, 785)])
def test_blockwise_xtx_is_the_product(m, d) -> None:
    from nnfim.generator.rules._registry import xtx

    x = torch.randn(m, d)
    torch.testing.assert_close(xtx(x), x.t() @ x)
    torch.testing.assert_close(xtx(x[:, 1:]), x[:, 1:].t() @ x[:, 1:])  # strided
    acc = torch.randn(d, d)
    expected = acc + x.t() @ x
    assert xtx(x, out=acc) is acc
    torch.testing.assert_close(acc, expected)
