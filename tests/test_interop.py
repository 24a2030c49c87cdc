"""Interop: SciPy operators, checkpoints (state dicts), ``.to`` and progress bars."""

from __future__ import annotations

import builtins
import copy
import io
import sys
from typing import Any

import numpy as np
import pytest
import test_pmat_contract as contract
import torch
from conftest import assert_same_state, make_case, model_state
from scipy.sparse.linalg import LinearOperator, cg, eigsh, svds
from test_pmat_contract import FACTORIES, STORABLE
from torch import nn

import nnfim
from nnfim import (
    FIM,
    NTK,
    FIM_MonteCarlo,
    FMatDense,
    FVector,
    Jacobian,
    LayerCollection,
    PMatAbstract,
    PMatDiag,
    PMatEKFAC,
    PMatImplicit,
    PMatKFAC,
    PVector,
    per_example_grads,
)

# the contract's fixtures: the same matrices, built from the same SPD reference
lc, spd, made = contract.lc, contract.spd, contract.made


# -- to_scipy -------------------------------------------------------------------
def test_to_scipy_products(made, lc) -> None:
    _, m, ref = made
    op = m.to_scipy()
    assert isinstance(op, LinearOperator)
    assert op.shape == (lc.numel(), lc.numel())
    assert op.dtype == np.float64
    x = np.random.default_rng(0).standard_normal((lc.numel(), 3))
    np.testing.assert_allclose(op @ x[:, 0], ref.numpy() @ x[:, 0], rtol=1e-10)
    np.testing.assert_allclose(op.rmatvec(x[:, 1]), ref.numpy() @ x[:, 1], rtol=1e-10)
    np.testing.assert_allclose(op.matmat(x), ref.numpy() @ x, rtol=1e-10)


def test_to_scipy_eigsh_and_cg(made, lc) -> None:
    _, m, ref = made
    op = m.to_scipy()
    top = eigsh(op, k=3, which="LA", return_eigenvectors=False, tol=1e-12)
    expected = torch.linalg.eigvalsh(ref)[-3:].numpy()
    np.testing.assert_allclose(np.sort(top), expected, rtol=1e-8)
    b = np.random.default_rng(1).standard_normal(lc.numel())
    x, info = cg(op, b, rtol=1e-12, maxiter=20 * lc.numel())
    assert info == 0
    np.testing.assert_allclose(
        x, torch.linalg.solve(ref, torch.from_numpy(b)).numpy(), rtol=1e-6
    )


def test_to_scipy_float32_casts_inputs(lc, spd) -> None:
    m = PMatDiag(lc, torch.diagonal(spd).float())
    op = m.to_scipy()
    assert op.dtype == np.float32
    out = op @ np.ones(lc.numel())  # float64 in, float32 product
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, torch.diagonal(spd).float().numpy(), rtol=1e-6)


def test_to_scipy_bfloat16_refused(lc, spd) -> None:
    m = PMatDiag(lc, torch.diagonal(spd).bfloat16())
    with pytest.raises(TypeError, match="NumPy counterpart"):
        m.to_scipy()


def test_to_scipy_without_scipy_says_so(lc, spd, monkeypatch) -> None:
    real_import = builtins.__import__

    def no_scipy(name: str, *args: Any, **kwargs: Any) -> Any:
        if name.startswith("scipy"):
            raise ImportError("No module named 'scipy'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_scipy)
    with pytest.raises(ImportError, match=r"PMatDiag.to_scipy\(\) needs scipy"):
        PMatDiag(lc, torch.diagonal(spd)).to_scipy()
    with pytest.raises(ImportError, match=r"FMatDense.to_scipy\(\) needs scipy"):
        FMatDense(torch.eye(4).reshape(2, 2, 2, 2)).to_scipy()


def test_fmat_to_scipy_square_and_cross() -> None:
    a = torch.randn(6, 6)
    gram = a @ a.t()
    k = FMatDense(gram.reshape(2, 3, 2, 3))
    top = eigsh(k.to_scipy(), k=2, which="LA", return_eigenvectors=False, tol=1e-12)
    np.testing.assert_allclose(
        np.sort(top), torch.linalg.eigvalsh(gram)[-2:].numpy(), rtol=1e-8
    )
    cross_flat = torch.randn(6, 4)
    cross = FMatDense(cross_flat.reshape(2, 3, 2, 2))
    op = cross.to_scipy()
    assert op.shape == (6, 4)
    y = np.arange(6.0)
    np.testing.assert_allclose(op.rmatvec(y), cross_flat.t().numpy() @ y, rtol=1e-12)
    s = svds(op, k=2, return_singular_vectors=False, tol=1e-12)
    expected = torch.linalg.svdvals(cross_flat)[:2].numpy()
    np.testing.assert_allclose(np.sort(s)[::-1], expected, rtol=1e-8)


def test_ntk_to_scipy_matches_dense() -> None:
    case = make_case("mlp", "regression")
    k = NTK(case.model, case.loader)
    x = np.random.default_rng(2).standard_normal(k.dense().shape[0])
    np.testing.assert_allclose(k.to_scipy() @ x, k.dense().numpy() @ x, rtol=1e-10)


# -- state_dict -----------------------------------------------------------------
def _roundtrip_bytes(sd: dict[str, Any]) -> Any:
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def test_state_dict_round_trip(made) -> None:
    name, m, ref = made
    if name not in STORABLE:
        with pytest.raises(NotImplementedError, match="stores no data"):
            m.state_dict()
        return
    sd = _roundtrip_bytes(m.state_dict())
    back = PMatAbstract.from_state_dict(sd)
    assert type(back) is type(m)
    assert back.layer_collection == m.layer_collection
    torch.testing.assert_close(back.dense(), ref)
    same = type(m).from_state_dict(sd)
    torch.testing.assert_close(same.dense(), ref)


def test_load_state_dict_in_place(made) -> None:
    name, m, ref = made
    if name not in STORABLE:
        return
    target = 3.0 * m
    target.load_state_dict(_roundtrip_bytes(m.state_dict()))
    torch.testing.assert_close(target.dense(), ref)
    torch.testing.assert_close(target.diag(), torch.diagonal(ref))


def test_from_state_dict_wrong_type(lc, spd) -> None:
    sd = PMatDiag(lc, torch.diagonal(spd)).state_dict()
    with pytest.raises(ValueError, match="holds a PMatDiag, not a PMatKFAC"):
        PMatKFAC.from_state_dict(sd)


def test_load_state_dict_other_layer_collection(lc, spd) -> None:
    m = PMatDiag(lc, torch.diagonal(spd))
    small = LayerCollection.from_model(nn.Linear(2, 1))
    other = PMatDiag(small, torch.ones(3))
    with pytest.raises(ValueError, match="load_state_dict: the state dict covers"):
        other.load_state_dict(m.state_dict())


@pytest.mark.parametrize(
    ("corrupt", "match"),
    [
        (lambda sd: {**sd, "format": "other"}, "not an nnfim matrix"),
        (lambda sd: {**sd, "version": 99}, "format version 99"),
        (lambda sd: {**sd, "type": "PMatImplicit"}, "unknown matrix type"),
        (lambda sd: {**sd, "tensors": {"diag": 3}}, "malformed tensors"),
        (lambda sd: {**sd, "tensors": {"diag": torch.ones(2)}}, "malformed PMatDiag"),
        (lambda sd: {**sd, "tensors": {}}, "malformed PMatDiag"),
        (lambda sd: {**sd, "layer_collection": [["x"]]}, "layer collection"),
        (lambda sd: [1, 2], "not an nnfim matrix"),
    ],
)
def test_malformed_state_dict(lc, spd, corrupt, match) -> None:
    sd = PMatDiag(lc, torch.diagonal(spd)).state_dict()
    with pytest.raises(ValueError, match=match):
        PMatAbstract.from_state_dict(corrupt(sd))


@pytest.mark.parametrize("drop", ["layer0.A", "layer0.G", "layer2.block"])
def test_malformed_kfac_state_dict(lc, spd, drop) -> None:
    m, _ = FACTORIES["kfac"](lc, spd)
    sd = m.state_dict()
    sd["tensors"] = {k: t for k, t in sd["tensors"].items() if k != drop}
    with pytest.raises(ValueError, match="malformed PMatKFAC"):
        PMatAbstract.from_state_dict(sd)


def test_ekfac_from_fim_state_dict_keeps_model_link() -> None:
    case = make_case("mlp", "classif_logits")
    m = FIM(case.model, case.loader, representation=PMatEKFAC)
    refit = copy.deepcopy(m).update_diag()
    restored = FIM(case.model, case.loader, representation=PMatEKFAC)
    restored.load_state_dict(_roundtrip_bytes(refit.state_dict()))
    torch.testing.assert_close(restored.dense(), refit.dense())
    before = model_state(case.model)
    restored.update_diag()  # still linked to the model
    assert_same_state(before, model_state(case.model))
    torch.testing.assert_close(restored.dense(), refit.dense())
    loaded = PMatEKFAC.from_state_dict(refit.state_dict())
    with pytest.raises(ValueError, match="update_diag needs the model"):
        loaded.update_diag()


def test_pvector_state_dict(lc) -> None:
    v = PVector.from_flat(lc, torch.randn(lc.numel()))
    back = PVector.from_state_dict(_roundtrip_bytes(v.state_dict()))
    assert back.layer_collection == lc
    torch.testing.assert_close(back.flatten(), v.flatten())
    target = PVector.from_flat(lc, torch.zeros(lc.numel()))
    target.load_state_dict(v.state_dict())
    torch.testing.assert_close(target.flatten(), v.flatten())
    other = PVector.from_model(nn.Linear(2, 1)).detach()
    with pytest.raises(ValueError, match="PVector.load_state_dict"):
        other.load_state_dict(v.state_dict())
    with pytest.raises(ValueError, match="not a PVector state dict"):
        PVector.from_state_dict({"format": "nnfim.fvector", "data": torch.ones(1, 1)})


def test_fvector_and_fmat_state_dict() -> None:
    f = FVector(torch.randn(2, 5))
    back = FVector.from_state_dict(_roundtrip_bytes(f.state_dict()))
    torch.testing.assert_close(back.data, f.data)
    g = FVector(torch.zeros(2, 5))
    g.load_state_dict(f.state_dict())
    torch.testing.assert_close(g.data, f.data)
    with pytest.raises(ValueError, match="FVector.load_state_dict"):
        FVector(torch.zeros(1, 5)).load_state_dict(f.state_dict())
    with pytest.raises(ValueError, match="not an FVector state dict"):
        FVector.from_state_dict(PVector.from_model(nn.Linear(2, 1)).state_dict())
    k = FMatDense(torch.randn(2, 3, 2, 3))
    kb = FMatDense.from_state_dict(_roundtrip_bytes(k.state_dict()))
    torch.testing.assert_close(kb.data, k.data)
    k2 = FMatDense(torch.zeros(2, 3, 2, 3))
    k2.load_state_dict(k.state_dict())
    torch.testing.assert_close(k2.data, k.data)
    with pytest.raises(ValueError, match="FMatDense.load_state_dict"):
        FMatDense(torch.zeros(1, 3, 1, 3)).load_state_dict(k.state_dict())
    with pytest.raises(ValueError, match="not an FMatDense state dict"):
        FMatDense.from_state_dict({"format": "nnfim.fmat", "data": [1]})


def test_checkpoint_file_with_everything(tmp_path, lc, spd) -> None:
    """A training checkpoint holding matrices and vectors reloads with weights_only."""
    m, ref = FACTORIES["ekfac"](lc, spd)
    anchor = PVector.from_flat(lc, torch.randn(lc.numel()))
    path = tmp_path / "ckpt.pt"
    torch.save({"fim": m.state_dict(), "anchor": anchor.state_dict(), "step": 7}, path)
    ck = torch.load(path, weights_only=True)
    torch.testing.assert_close(PMatAbstract.from_state_dict(ck["fim"]).dense(), ref)
    torch.testing.assert_close(
        PVector.from_state_dict(ck["anchor"]).flatten(), anchor.flatten()
    )


# -- .to ------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_to_round_trip(made, dtype) -> None:
    name, m, ref = made
    if name == "implicit":
        with pytest.raises(NotImplementedError, match="move the model"):
            m.to("cpu")
        return
    moved = m.to("cpu", dtype).to(dtype=torch.float64).to(torch.device("cpu"))
    assert moved.dtype == torch.float64 and moved.device.type == "cpu"
    assert moved.layer_collection == m.layer_collection
    tol = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {}
    torch.testing.assert_close(moved.dense(), ref, **tol)
    assert m.dtype == torch.float64  # the original is untouched


def test_vectors_and_fmat_to(lc) -> None:
    v = PVector.from_flat(lc, torch.randn(lc.numel()))
    v32 = v.to("cpu", torch.float32)
    assert v32.dtype == torch.float32 and v.dtype == torch.float64
    torch.testing.assert_close(v32.flatten(), v.flatten().float())
    f = FVector(torch.randn(2, 3))
    assert f.to(dtype=torch.float32).data.dtype == torch.float32
    k = FMatDense(torch.randn(2, 3, 2, 3))
    k32 = k.to("cpu", torch.float32)
    assert k32.dtype == torch.float32 and k.dtype == torch.float64
    torch.testing.assert_close(k32.data, k.data.float())


# -- progress bars ----------------------------------------------------------------
BUILDERS = {
    "FIM": lambda c, p: FIM(c.model, c.loader, representation=PMatDiag, progress=p),
    "FIM_MonteCarlo": lambda c, p: FIM_MonteCarlo(
        c.model, c.loader, representation=PMatDiag, progress=p
    ),
    "FIM_implicit_mv": lambda c, p: FIM(
        c.model, c.loader, representation=PMatImplicit, progress=p
    ).mv(PVector.from_model(c.model).detach()),
    "NTK": lambda c, p: NTK(c.model, c.loader, progress=p),
    "Jacobian": lambda c, p: Jacobian(c.model, c.loader, progress=p).dense(),
    "per_example_grads": lambda c, p: per_example_grads(c.model, c.loader, progress=p),
    "EKFAC_update_diag": lambda c, p: FIM(
        c.model, c.loader, representation=PMatEKFAC
    ).update_diag(progress=p),
}


def _run(capsys, name: str, progress: bool) -> tuple[str, str]:
    case = make_case("mlp", "classif_logits")
    before = model_state(case.model)
    capsys.readouterr()
    BUILDERS[name](case, progress)
    assert_same_state(before, model_state(case.model))
    return capsys.readouterr()


@pytest.mark.parametrize("name", list(BUILDERS))
def test_progress_bar_on_stderr(capsys, name) -> None:
    pytest.importorskip("tqdm")
    out, err = _run(capsys, name, True)
    assert out == ""
    assert "2/2" in err and "batch" in err
    out, err = _run(capsys, name, False)
    assert out == "" and err == ""


@pytest.mark.parametrize("name", ["FIM", "per_example_grads"])
def test_progress_silent_without_tqdm(capsys, monkeypatch, name) -> None:
    monkeypatch.setitem(sys.modules, "tqdm", None)  # import tqdm raises ImportError
    out, err = _run(capsys, name, True)
    assert out == "" and err == ""


def test_progress_same_result(capsys) -> None:
    case = make_case("cnn", "classif_logits")
    with_bar = FIM(case.model, case.loader, representation=PMatKFAC, progress=True)
    plain = FIM(case.model, case.loader, representation=PMatKFAC)
    torch.testing.assert_close(with_bar.dense(), plain.dense(), rtol=0, atol=0)
    assert "nnfim" in capsys.readouterr().err


def test_progress_closed_when_a_pass_raises(capsys) -> None:
    pytest.importorskip("tqdm")
    case = make_case("mlp", "classif_logits")
    before = model_state(case.model)
    bad = [*case.loader, (torch.randn(3, 4), torch.zeros(3, dtype=torch.long))]
    with pytest.raises(RuntimeError):
        FIM(case.model, bad, representation=PMatDiag, progress=True)
    assert_same_state(before, model_state(case.model))


def test_state_dict_names_exported() -> None:
    for name in ("state_dict", "from_state_dict", "load_state_dict", "to_scipy", "to"):
        assert hasattr(PMatAbstract, name)
        assert hasattr(FMatDense, name)
    assert nnfim.PMatAbstract is PMatAbstract
