"""The representation contract: every structure built from one random SPD matrix.

Each factory returns the matrix and the dense tensor it represents exactly
(a diagonal keeps the diagonal of the SPD matrix, a block diagonal its
blocks); every operation is checked against ``torch.linalg`` on that tensor.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn

from nnfim import (
    LayerCollection,
    PMatBlockDiag,
    PMatDense,
    PMatDiag,
    PMatImplicit,
    PVector,
    load,
)
from nnfim.pmat import PMatAbstract

Factory = Callable[[LayerCollection, torch.Tensor], tuple[PMatAbstract, torch.Tensor]]


def _blocks(lc: LayerCollection, a: torch.Tensor) -> dict[str, torch.Tensor]:
    return {
        layer.name: a[lc.layer_slice(layer.name), lc.layer_slice(layer.name)].clone()
        for layer in lc
    }


def dense(lc: LayerCollection, a: torch.Tensor) -> tuple[PMatAbstract, torch.Tensor]:
    return PMatDense(lc, a), a


def diag(lc: LayerCollection, a: torch.Tensor) -> tuple[PMatAbstract, torch.Tensor]:
    return PMatDiag(lc, torch.diagonal(a).clone()), torch.diag(torch.diagonal(a))


def blockdiag(
    lc: LayerCollection, a: torch.Tensor
) -> tuple[PMatAbstract, torch.Tensor]:
    blocks = _blocks(lc, a)
    return PMatBlockDiag(lc, blocks), torch.block_diag(*blocks.values())


def implicit(lc: LayerCollection, a: torch.Tensor) -> tuple[PMatAbstract, torch.Tensor]:
    return PMatImplicit(lc, lambda v: v.unflatten(a @ v.flatten()), dtype=a.dtype), a


FACTORIES: dict[str, Factory] = {
    "dense": dense,
    "diag": diag,
    "blockdiag": blockdiag,
    "implicit": implicit,
}
EXACT_INVERSE = {"dense", "diag", "blockdiag"}
STORABLE = {"dense", "diag", "blockdiag"}


@pytest.fixture
def lc() -> LayerCollection:
    model = nn.Sequential(
        nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2, bias=False), nn.Conv1d(1, 1, 2)
    )
    return LayerCollection.from_model(model)


@pytest.fixture
def spd(lc: LayerCollection) -> torch.Tensor:
    p = lc.numel()
    q, _ = torch.linalg.qr(torch.randn(p, p))
    return q @ torch.diag(torch.logspace(-2, 1, p)) @ q.t()


@pytest.fixture(params=list(FACTORIES))
def made(request, lc, spd) -> tuple[str, PMatAbstract, torch.Tensor]:
    m, ref = FACTORIES[request.param](lc, spd)
    return request.param, m, ref


def vec(lc: LayerCollection) -> PVector:
    return PVector.from_flat(lc, torch.randn(lc.numel()))


def test_mv_and_matmul(made, lc) -> None:
    _, m, ref = made
    v = vec(lc)
    torch.testing.assert_close(m.mv(v).flatten(), ref @ v.flatten())
    torch.testing.assert_close((m @ v).flatten(), ref @ v.flatten())


def test_vTMv(made, lc) -> None:
    _, m, ref = made
    v = vec(lc)
    torch.testing.assert_close(m.vTMv(v), v.flatten() @ ref @ v.flatten())


def test_dense_diag_trace_frobenius(made) -> None:
    _, m, ref = made
    torch.testing.assert_close(m.dense(), ref)
    torch.testing.assert_close(m.diag(), torch.diagonal(ref))
    torch.testing.assert_close(m.trace(), torch.trace(ref))
    torch.testing.assert_close(m.frobenius_norm(), torch.linalg.matrix_norm(ref))


@pytest.mark.parametrize("regul", [0.0, 0.3])
def test_solve(made, lc, regul) -> None:
    _, m, ref = made
    v = vec(lc)
    expected = torch.linalg.solve(ref + regul * torch.eye(lc.numel()), v.flatten())
    torch.testing.assert_close(m.solve(v, regul=regul).flatten(), expected)


def test_solve_by_cg_matches(made, lc) -> None:
    _, m, ref = made
    v = vec(lc)
    expected = torch.linalg.solve(ref + 0.1 * torch.eye(lc.numel()), v.flatten())
    torch.testing.assert_close(m.solve(v, regul=0.1, method="cg").flatten(), expected)


def test_inverse(made, lc) -> None:
    name, m, ref = made
    if name not in EXACT_INVERSE:
        with pytest.raises(NotImplementedError, match="solve"):
            m.inverse()
        return
    inv = m.inverse(regul=0.2)
    assert type(inv) is type(m)
    torch.testing.assert_close(
        inv.dense(), torch.linalg.inv(ref + 0.2 * torch.eye(lc.numel()))
    )


def test_eigen(made) -> None:
    _, m, ref = made
    torch.testing.assert_close(m.eigvalsh(), torch.linalg.eigvalsh(ref))
    values, vectors = m.eigh()
    torch.testing.assert_close(values, torch.linalg.eigvalsh(ref))
    torch.testing.assert_close(vectors @ torch.diag(values) @ vectors.t(), ref)


def test_scalar_arithmetic(made, lc) -> None:
    _, m, ref = made
    v = vec(lc)
    for result, factor in ((2.5 * m, 2.5), (m * 2.5, 2.5), (-m, -1.0), (m / 4, 0.25)):
        assert type(result) is type(m)
        torch.testing.assert_close(result.mv(v).flatten(), factor * ref @ v.flatten())
        torch.testing.assert_close(result.diag(), factor * torch.diagonal(ref))


@pytest.mark.parametrize("other_name", list(FACTORIES))
@pytest.mark.parametrize("op", ["+", "-", "@"])
def test_binary_table(made, lc, spd, other_name, op) -> None:
    _, a, ref_a = made
    b, ref_b = FACTORIES[other_name](lc, spd.flip(0).flip(1) + torch.eye(lc.numel()))
    fn = {"+": lambda x, y: x + y, "-": lambda x, y: x - y, "@": lambda x, y: x @ y}[op]
    result = fn(a, b)
    assert isinstance(result, PMatAbstract)
    torch.testing.assert_close(result.dense(), fn(ref_a, ref_b))
    v = vec(lc)
    torch.testing.assert_close(result.mv(v).flatten(), fn(ref_a, ref_b) @ v.flatten())


def test_dense_plus_diag_is_not_a_broadcast(lc, spd) -> None:
    d = PMatDiag(lc, torch.arange(lc.numel(), dtype=spd.dtype))
    total = PMatDense(lc, spd) + d
    torch.testing.assert_close(total.dense(), spd + torch.diag(d.data))


def test_save_load_round_trip(made, tmp_path) -> None:
    name, m, ref = made
    path = tmp_path / "m.pt"
    if name not in STORABLE:
        with pytest.raises(NotImplementedError):
            m.save(path)
        return
    m.save(path)
    back = load(path)
    assert type(back) is type(m)
    assert back.layer_collection == m.layer_collection
    torch.testing.assert_close(back.dense(), ref)
    assert type(m).load(path).layer_collection == m.layer_collection


def test_to_dtype(made, lc) -> None:
    name, m, ref = made
    if name == "implicit":
        with pytest.raises(NotImplementedError):
            m.to(dtype=torch.float32)
        return
    m32 = m.to(dtype=torch.float32)
    assert m32.dtype == torch.float32
    torch.testing.assert_close(m32.dense(), ref.float())


def test_singular_solve_without_regul_raises(lc) -> None:
    p = lc.numel()
    low = torch.randn(p, 3)
    singular = low @ low.t()
    v = vec(lc)
    for factory in FACTORIES.values():
        m, _ = factory(lc, singular)
        if isinstance(m, PMatDiag):
            m = PMatDiag(lc, torch.cat([torch.zeros(1), torch.ones(p - 1)]))
        with pytest.raises(torch.linalg.LinAlgError, match="regul"):
            m.solve(v)
        m.solve(v, regul=1e-3)  # damping makes it solvable


def test_structures_that_do_not_meet_raise(lc) -> None:
    from nnfim.pmat import _binary

    class Other(PMatDense):
        pass

    a = Other(lc, torch.eye(lc.numel()))
    b = PMatDiag(lc, torch.ones(lc.numel()))
    assert (Other, PMatDiag) not in _binary._TABLE
    with pytest.raises(
        NotImplementedError, match="Other . PMatDiag|Other \\+ PMatDiag"
    ):
        a + b


def test_deprecated_aliases(lc, spd) -> None:
    m = PMatDense(lc, spd)
    with pytest.warns(DeprecationWarning):
        torch.testing.assert_close(m.get_dense_tensor(), spd)
    with pytest.warns(DeprecationWarning):
        torch.testing.assert_close(m.get_diag(), torch.diagonal(spd))
