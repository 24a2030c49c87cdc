"""NTK Gram matrices, Jacobians, per-example gradients and low-rank truncation."""

from __future__ import annotations

import pytest
import torch
from conftest import MODELS, make_case
from torch import nn
from torch.func import functional_call, grad, vmap

from nnfim import (
    FIM,
    NTK,
    FMatDense,
    FVector,
    Jacobian,
    PMatLowRank,
    PVector,
    per_example_grads,
)
from nnfim.testing import reference_fisher, reference_jacobian


@pytest.mark.parametrize("model_name", MODELS)
def test_ntk_is_j_jt(model_name) -> None:
    case = make_case(model_name, "regression")
    jac, _ = reference_jacobian(case.model, case.loader)
    ntk = NTK(case.model, case.loader)
    torch.testing.assert_close(ntk.data, torch.einsum("nci,mdi->cndm", jac, jac))
    assert ntk.shape == (3, 10, 3, 10)


@pytest.mark.parametrize("model_name", MODELS)
def test_cross_ntk(model_name) -> None:
    case = make_case(model_name, "regression")
    other = [(torch.randn(3, *case.loader[0][0].shape[1:]), None)]
    other = [(b[0],) for b in other]
    j1, _ = reference_jacobian(case.model, case.loader)
    j2, _ = reference_jacobian(case.model, other)
    ntk = NTK(case.model, case.loader, other)
    torch.testing.assert_close(ntk.data, torch.einsum("nci,mdi->cndm", j1, j2))
    f = FVector(torch.randn(3, 3))
    torch.testing.assert_close(
        ntk.mv(f).data, torch.einsum("nci,mdi,dm->cn", j1, j2, f.data)
    )
    with pytest.raises(ValueError, match="square"):
        ntk.trace()


def test_ntk_operations() -> None:
    case = make_case("mlp", "regression")
    ntk = NTK(case.model, case.loader)
    flat = ntk.dense()
    torch.testing.assert_close(ntk.trace(), torch.trace(flat))
    torch.testing.assert_close(ntk.frobenius_norm(), torch.linalg.matrix_norm(flat))
    torch.testing.assert_close(ntk.eigvalsh(), torch.linalg.eigvalsh(flat))
    f = FVector(torch.randn(3, 10))
    x = ntk.solve(f, regul=0.1)
    torch.testing.assert_close(flat @ x.flatten() + 0.1 * x.flatten(), f.flatten())
    torch.testing.assert_close(ntk.vTMv(f), f.flatten() @ flat @ f.flatten())


def test_ntk_with_function_and_several_outputs() -> None:
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 5))
    loader = [torch.randn(3, 4), torch.randn(2, 4)]
    ntk = NTK(model, loader, function=lambda m, x: m(x)[:, :2] ** 2)
    ref_model = nn.Sequential(model, _SquareFirstTwo())
    jac, _ = reference_jacobian(ref_model, loader)
    torch.testing.assert_close(ntk.data, torch.einsum("nci,mdi->cndm", jac, jac))


class _SquareFirstTwo(nn.Module):
    def forward(self, x):
        return x[:, :2] ** 2


@pytest.mark.parametrize("variant", ["classif_logits", "classif_binary", "regression"])
def test_gram_dual_has_the_fisher_spectrum(variant) -> None:
    case = make_case("cnn", variant)
    gram = FIM(case.model, case.loader, FMatDense, variant=variant)
    fisher = reference_fisher(case.model, case.loader, variant)
    top = gram.eigvalsh().flip(0)
    ref = torch.linalg.eigvalsh(fisher).flip(0)
    m = min(top.shape[0], ref.shape[0])
    torch.testing.assert_close(top[:m], ref[:m], atol=1e-10, rtol=1e-8)


@pytest.mark.parametrize("chunk_size", [None, 1, 3])
@pytest.mark.parametrize("model_name", MODELS)
def test_jacobian(model_name, chunk_size) -> None:
    case = make_case(model_name, "regression")
    ref, _ = reference_jacobian(case.model, case.loader)
    jac = Jacobian(case.model, case.loader, chunk_size=chunk_size)
    torch.testing.assert_close(jac.dense(), ref.transpose(0, 1))
    v = PVector.from_flat(jac.layer_collection, torch.randn(ref.shape[2]))
    torch.testing.assert_close(jac.jvp(v).data, (ref @ v.flatten()).t())
    f = FVector(torch.randn(3, 10))
    torch.testing.assert_close(
        jac.vjp(f).flatten(), torch.einsum("nci,cn->i", ref, f.data)
    )


def test_jacobian_vjp_size_mismatch() -> None:
    case = make_case("mlp", "regression")
    with pytest.raises(ValueError, match="9 examples"):
        Jacobian(case.model, case.loader).vjp(FVector(torch.randn(3, 9)))


@pytest.mark.parametrize("variant", ["classif_logits", "classif_binary", "regression"])
def test_per_example_grads(variant) -> None:
    case = make_case("cnn", variant)
    params = {k: v.detach() for k, v in case.model.named_parameters()}
    loss_fn = {
        "classif_logits": lambda o, y: nn.functional.cross_entropy(o, y),
        "classif_binary": lambda o, y: nn.functional.binary_cross_entropy_with_logits(
            o, y, reduction="sum"
        ),
        "regression": lambda o, y: 0.5 * ((o - y) ** 2).sum(),
    }[variant]

    def loss(p, x, y):
        return loss_fn(functional_call(case.model, p, (x[None],)), y[None])

    x = torch.cat([b[0] for b in case.loader])
    y = torch.cat([b[1] for b in case.loader])
    g = vmap(grad(loss), (None, 0, 0))(params, x, y)
    ref = torch.cat([g[k].reshape(x.shape[0], -1) for k in params], 1)
    torch.testing.assert_close(
        per_example_grads(case.model, case.loader, variant, chunk_size=4), ref
    )


def test_lowrank_truncation_keeps_the_top_eigenpairs() -> None:
    case = make_case("mlp", "classif_logits")
    low = FIM(case.model, case.loader, PMatLowRank)
    dense = low.dense()
    w, q = torch.linalg.eigh(dense)
    k = 4
    best = q[:, -k:] @ torch.diag(w[-k:]) @ q[:, -k:].t()
    trunc = low.truncate(k)
    assert trunc.rank == k
    torch.testing.assert_close(trunc.dense(), best)
    assert low.rank == 2 * 10  # K = C - 1 directions times n examples


def test_lowrank_solve_is_woodbury() -> None:
    case = make_case("mlp", "classif_logits")
    low = FIM(case.model, case.loader, PMatLowRank)
    p = low.layer_collection.numel()
    v = PVector.from_flat(low.layer_collection, torch.randn(p))
    expected = torch.linalg.solve(low.dense() + 1e-2 * torch.eye(p), v.flatten())
    torch.testing.assert_close(low.solve(v, regul=1e-2).flatten(), expected)
    with pytest.raises(torch.linalg.LinAlgError, match="regul"):
        low.solve(v)
