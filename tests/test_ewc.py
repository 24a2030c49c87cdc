"""EWC: penalty values and gradients against dense float64 references."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import assert_same_state, make_case, model_state

from nnfim import (
    EWC,
    PMatBlockDiag,
    PMatDense,
    PMatDiag,
    PMatEKFAC,
    PMatImplicit,
    PMatKFAC,
    PMatLowRank,
    PMatQuasiDiag,
    PVector,
)
from nnfim.layers import LayerCollection
from nnfim.testing import reference_fisher

LAM = 3.0


def _flat(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def _perturb(model: torch.nn.Module, scale: float = 0.1) -> None:
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn_like(p))


def _reference(rep: type, model, loader, stored) -> torch.Tensor:
    """The dense matrix the penalty must use: exact where the structure is exact.

    Call it with the model at the anchor; ``stored`` is the matrix EWC holds.
    """
    full = reference_fisher(model, loader)
    if rep in (PMatDense, PMatImplicit, PMatLowRank):
        return full
    if rep is PMatDiag:
        return torch.diag(torch.diagonal(full))
    if rep is PMatBlockDiag:
        lc = LayerCollection.from_model(model)
        out = torch.zeros_like(full)
        for name in lc.layer_names:
            sl = lc.layer_slice(name)
            out[sl, sl] = full[sl, sl]
        return out
    # K-FAC, EKFAC, quasi-diagonal: approximations tested against their own
    # references in test_kfac / test_pmat_contract; here the penalty must use them.
    return stored.dense().detach()


ALL = [
    PMatDense,
    PMatDiag,
    PMatBlockDiag,
    PMatKFAC,
    PMatEKFAC,
    PMatLowRank,
    PMatQuasiDiag,
    PMatImplicit,
]


@pytest.mark.parametrize("rep", ALL, ids=lambda r: r.__name__)
@pytest.mark.parametrize("model_name", ["mlp", "cnn"])
def test_penalty_value_and_gradient(rep: type, model_name: str) -> None:
    case = make_case(model_name, "classif_logits")
    model, loader = case.model, case.loader
    anchor = _flat(model)
    ewc = EWC(LAM, rep)
    before = model_state(model)
    ewc.consolidate(model, loader)
    assert_same_state(before, model_state(model))
    ref = _reference(rep, model, loader, ewc.fishers[0])
    _perturb(model)
    d = _flat(model) - anchor
    pen = ewc.penalty(model)
    expected = 0.5 * LAM * d @ ref @ d
    torch.testing.assert_close(pen, expected, rtol=1e-9, atol=1e-12)
    grads = torch.autograd.grad(pen, list(model.parameters()))
    flat_grad = torch.cat([g.reshape(-1) for g in grads])
    torch.testing.assert_close(flat_grad, LAM * ref @ d, rtol=1e-8, atol=1e-11)


def test_implicit_keeps_the_fisher_at_the_anchor() -> None:
    case = make_case("mlp", "classif_logits")
    model, loader = case.model, case.loader
    at_anchor = copy.deepcopy(model)
    ewc = EWC(LAM, PMatImplicit)
    ewc.consolidate(model, loader)
    _perturb(model, 0.5)  # "training" the live model
    ref = reference_fisher(at_anchor, loader)
    d = _flat(model) - _flat(at_anchor)
    torch.testing.assert_close(ewc.penalty(model), 0.5 * LAM * d @ ref @ d)
    # the live model's Fisher is a different matrix: the penalty did not follow it
    moved = reference_fisher(model, loader)
    assert not torch.allclose(d @ moved @ d, d @ ref @ d, rtol=1e-3)


@pytest.mark.parametrize("rep", [PMatDiag, PMatKFAC], ids=lambda r: r.__name__)
def test_several_tasks_sum_their_penalties(rep: type) -> None:
    a = make_case("mlp", "classif_logits", seed=0)
    b = make_case("mlp", "classif_logits", seed=1)
    model = a.model
    ewc = EWC(LAM, rep)
    ewc.consolidate(model, a.loader)
    w1, f1 = _flat(model), ewc.fishers[0].dense()
    _perturb(model)
    ewc.consolidate(model, b.loader)
    w2, f2 = _flat(model), ewc.fishers[1].dense()
    _perturb(model)
    w = _flat(model)
    expected = 0.5 * LAM * ((w - w1) @ f1 @ (w - w1) + (w - w2) @ f2 @ (w - w2))
    torch.testing.assert_close(ewc.penalty(model), expected)
    assert ewc.n_tasks == 2


@pytest.mark.parametrize(
    ("rep", "terms"),
    [(PMatDiag, 1), (PMatDense, 1), (PMatKFAC, 2), (PMatImplicit, 2)],
    ids=lambda x: getattr(x, "__name__", str(x)),
)
def test_online_ewc_decays_one_running_fisher(rep: type, terms: int) -> None:
    a = make_case("mlp", "classif_logits", seed=0)
    b = make_case("mlp", "classif_logits", seed=1)
    model, gamma = a.model, 0.25
    ewc = EWC(LAM, rep, online=True, gamma=gamma)
    ewc.consolidate(model, a.loader)
    ref1 = _reference(rep, model, a.loader, ewc.fishers[0])
    _perturb(model)
    ewc.consolidate(model, b.loader)
    ref2 = _reference(rep, model, b.loader, ewc.fishers[-1])
    anchor = _flat(model)
    _perturb(model)
    d = _flat(model) - anchor
    expected = 0.5 * LAM * d @ (gamma * ref1 + ref2) @ d
    torch.testing.assert_close(ewc.penalty(model), expected)
    # memory stays that of the representation: merged where the sum keeps it
    assert len(ewc.fishers) == terms
    assert all(type(f) is rep for f in ewc.fishers)


def test_penalty_is_zero_before_consolidate_and_at_the_anchor() -> None:
    case = make_case("mlp", "classif_logits")
    ewc = EWC(LAM)
    assert float(ewc.penalty(case.model)) == 0.0
    ewc.consolidate(case.model, case.loader)
    assert float(ewc.penalty(case.model).detach()) == 0.0


def test_errors() -> None:
    with pytest.raises(ValueError, match="lam"):
        EWC(-1.0)
    with pytest.raises(ValueError, match="online=True"):
        EWC(1.0, gamma=0.5)
    with pytest.raises(ValueError, match=r"gamma must be in \[0, 1\]"):
        EWC(1.0, online=True, gamma=2.0)
    a = make_case("mlp", "classif_logits")
    b = make_case("mlp_nobias", "classif_logits")
    ewc = EWC(LAM)
    ewc.consolidate(a.model, a.loader)
    with pytest.raises(ValueError, match="differ from the earlier tasks"):
        ewc.consolidate(b.model, b.loader)
    with pytest.raises(ValueError):
        ewc.penalty(b.model)


def test_failed_consolidate_leaves_the_model() -> None:
    case = make_case("cnn", "classif_logits")
    model = case.model
    loader = [case.loader[0], (case.loader[1][0].float(), case.loader[1][1])]
    before = model_state(model)
    ewc = EWC(LAM, PMatDiag)
    with pytest.raises(ValueError, match="float32"):
        ewc.consolidate(model, loader)
    assert_same_state(before, model_state(model))
    assert ewc.n_tasks == 0


def test_penalty_trains_back_towards_the_anchor() -> None:
    case = make_case("mlp", "classif_logits")
    model = case.model
    ewc = EWC(10.0, PMatDiag)
    ewc.consolidate(model, case.loader)
    anchor = PVector.from_model(model).detach().clone()
    _perturb(model, 0.3)
    start = (PVector.from_model(model).detach() - anchor).norm()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(20):
        opt.zero_grad()
        ewc.penalty(model).backward()
        opt.step()
    end = (PVector.from_model(model).detach() - anchor).norm()
    assert end < start
