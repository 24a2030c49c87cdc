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
    PMatEKFAC,
    PMatImplicit,
    PMatKFAC,
    PMatLowRank,
    PMatQuasiDiag,
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


def kron_positions(lc: LayerCollection, name: str) -> list[int]:
    """Flat positions of a weight+bias layer in (b, a) order, bias last, by hand."""
    shapes = dict(lc[name].params)
    out = shapes["weight"][0]
    per = int(torch.tensor(shapes["weight"][1:]).prod())
    start = lc.layer_slice(name).start
    order = []
    for o in range(out):
        order += [start + o * per + j for j in range(per)]
        if "bias" in shapes:
            order.append(start + out * per + o)
    return order


def place(
    lc: LayerCollection, blocks: dict[str, torch.Tensor], kron_layers: set[str]
) -> torch.Tensor:
    """Assemble per-layer matrices (Kronecker order for kron_layers) into (P, P)."""
    p = lc.numel()
    full = torch.zeros(p, p)
    for name, block in blocks.items():
        if name in kron_layers:
            pos = torch.tensor(kron_positions(lc, name))
        else:
            sl = lc.layer_slice(name)
            pos = torch.arange(sl.start, sl.stop)
        full[pos[:, None], pos[None, :]] = block
    return full


def _factor_pair(
    a_spd: torch.Tensor, lc: LayerCollection, name: str
) -> tuple[torch.Tensor, torch.Tensor]:
    shapes = dict(lc[name].params)
    b = shapes["weight"][0]
    a = lc[name].numel // b
    return (a_spd[:a, :a] + torch.eye(a))[None], (a_spd[-b:, -b:] + 0.5 * torch.eye(b))[
        None
    ]


KRON = (
    "0",
    "2",
)  # the two Linear layers as factors; the Conv1d given as an exact block


def kfac(lc: LayerCollection, a: torch.Tensor) -> tuple[PMatAbstract, torch.Tensor]:
    factors = {n: _factor_pair(a, lc, n) for n in KRON}
    blocks = {"3": _blocks(lc, a)["3"]}
    kron = {n: torch.kron(g[0], f[0]) for n, (f, g) in factors.items()}
    return PMatKFAC(lc, factors, blocks), place(lc, {**kron, **blocks}, set(KRON))


def ekfac(lc: LayerCollection, a: torch.Tensor) -> tuple[PMatAbstract, torch.Tensor]:
    bases, diags, kron = {}, {}, {}
    for n in KRON:
        fa, fg = _factor_pair(a, lc, n)
        qa, qg = torch.linalg.eigh(fa)[1], torch.linalg.eigh(fg)[1]
        s = torch.rand(1, fg.shape[1], fa.shape[1]) + 0.1
        bases[n], diags[n] = (qa, qg), s
        q = torch.kron(qg[0], qa[0])
        kron[n] = q @ torch.diag(s.reshape(-1)) @ q.t()
    blocks = {"3": _blocks(lc, a)["3"]}
    return PMatEKFAC(lc, bases, diags, blocks), place(lc, {**kron, **blocks}, set(KRON))


def lowrank(lc: LayerCollection, a: torch.Tensor) -> tuple[PMatAbstract, torch.Tensor]:
    factor = torch.cat([torch.linalg.cholesky(a).t(), 0.1 * torch.randn(2, lc.numel())])
    return PMatLowRank(lc, factor), factor.t() @ factor


def quasidiag(
    lc: LayerCollection, a: torch.Tensor
) -> tuple[PMatAbstract, torch.Tensor]:
    d = torch.diagonal(a).clone() + 1.0
    cross = 0.1 * a[:4, 4:7].clone()
    ref = torch.diag(d)
    start = lc.layer_slice("0").start
    for o in range(4):
        for j in range(3):
            ref[start + o * 3 + j, start + 12 + o] = cross[o, j]
            ref[start + 12 + o, start + o * 3 + j] = cross[o, j]
    return PMatQuasiDiag(lc, d, {"0": cross}), ref


FACTORIES: dict[str, Factory] = {
    "dense": dense,
    "diag": diag,
    "blockdiag": blockdiag,
    "kfac": kfac,
    "ekfac": ekfac,
    "lowrank": lowrank,
    "quasidiag": quasidiag,
    "implicit": implicit,
}
SAME_TYPE_INVERSE = {"dense", "diag", "blockdiag", "ekfac"}
STORABLE = set(FACTORIES) - {"implicit"}


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
    if name == "implicit":
        with pytest.raises(NotImplementedError, match="solve"):
            m.inverse()
        return
    inv = m.inverse(regul=0.2)
    if name in SAME_TYPE_INVERSE:
        assert type(inv) is type(m)
    torch.testing.assert_close(
        inv.dense(), torch.linalg.inv(ref + 0.2 * torch.eye(lc.numel()))
    )


def test_eigen(made) -> None:
    name, m, ref = made
    torch.testing.assert_close(m.eigvalsh(), torch.linalg.eigvalsh(ref))
    values, vectors = m.eigh()
    if name != "lowrank":  # low rank: only the nonzero part
        torch.testing.assert_close(values, torch.linalg.eigvalsh(ref))
    torch.testing.assert_close(vectors.t() @ vectors, torch.eye(values.shape[0]))
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


@pytest.mark.parametrize("name", list(FACTORIES))
def test_conversions(lc, spd, name) -> None:
    m, ref = FACTORIES[name](lc, spd)
    torch.testing.assert_close(PMatDense.from_pmat(m).dense(), ref)
    torch.testing.assert_close(PMatDiag.from_pmat(m).diag(), torch.diagonal(ref))
    blocks = PMatBlockDiag.from_pmat(m)
    for layer in lc:
        sl = lc.layer_slice(layer.name)
        torch.testing.assert_close(blocks.blocks[layer.name], ref[sl, sl])


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
    zero_first = torch.cat([torch.zeros(1), torch.ones(p - 1)])
    for name in ("dense", "diag", "blockdiag", "implicit"):
        m, _ = FACTORIES[name](lc, singular)
        if isinstance(m, PMatDiag):
            m = PMatDiag(lc, zero_first)
        with pytest.raises(torch.linalg.LinAlgError, match="regul"):
            m.solve(v)
        m.solve(v, regul=1e-3)  # damping makes it solvable
    singular_kron = {
        n: (f.clone(), g)
        for n, (f, g) in FACTORIES["kfac"](lc, torch.eye(p))[0].factors.items()
    }
    singular_kron["0"][0][0, 0, :] = 0
    singular_kron["0"][0][0, :, 0] = 0
    others = [
        PMatKFAC(lc, singular_kron, {"3": torch.eye(3)}),
        PMatLowRank(lc, torch.randn(3, p)),
        PMatQuasiDiag(lc, zero_first),
    ]
    for m in others:
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


@pytest.mark.parametrize("rows", [5, 60])
def test_lowrank_uses_the_smaller_side(lc, rows) -> None:
    """Wide factors (m < P) go through the Gram matrix, tall ones through
    ``U^T U``: same solve, spectrum and norm as the dense matrix either way."""
    factor = torch.randn(rows, lc.numel())
    m, ref = PMatLowRank(lc, factor, -0.5), -0.5 * factor.t() @ factor
    assert m._tall() is (rows > lc.numel())
    b = torch.randn(lc.numel())
    eye = torch.eye(lc.numel())
    torch.testing.assert_close(
        m.solve(PVector.from_flat(lc, b), regul=50.0).flatten(),
        torch.linalg.solve(ref + 50.0 * eye, b),
    )
    torch.testing.assert_close(m.eigvalsh(), torch.linalg.eigvalsh(ref))
    torch.testing.assert_close(m.frobenius_norm(), torch.linalg.matrix_norm(ref))
