"""NTK regression: predictions against dense Jacobian algebra in float64."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_same_state, model_state
from torch import nn

from nnfim import NTKRegressor, ntk_predict
from nnfim.testing import reference_jacobian


def make_problem(n_out: int, seed: int = 0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 12), nn.Tanh(), nn.Linear(12, n_out))
    x_train, x_test = torch.randn(10, 4), torch.randn(7, 4)
    y_train = torch.randn(10, n_out)
    train = [(x_train[:6], y_train[:6]), (x_train[6:], y_train[6:])]
    return model, train, [x_test[:3], x_test[3:]], x_train, y_train, x_test


def dense_parts(model, x_train, x_test):
    """Flattened Jacobians ``(C n, P)`` (output-major) and the outputs."""
    j, f0 = reference_jacobian(model, [x_train])
    jx, f0x = reference_jacobian(model, [x_test])
    return j.transpose(0, 1).reshape(-1, j.shape[2]), f0, jx, f0x


@pytest.mark.parametrize("n_out", [1, 3])
@pytest.mark.parametrize("regul", [0.0, 0.1])
def test_converged_prediction_is_the_linearised_least_squares(
    n_out: int, regul: float
) -> None:
    model, train, test, x_train, y_train, x_test = make_problem(n_out)
    j, f0, jx, f0x = dense_parts(model, x_train, x_test)
    r = (y_train - f0).t().reshape(-1)
    if regul == 0.0:
        # minimum-norm parameter change fitting the linearised model exactly
        delta = torch.linalg.pinv(j) @ r
    else:
        # ridge in parameter space: (J^T J + regul I)^{-1} J^T r
        p = j.shape[1]
        delta = torch.linalg.solve(j.t() @ j + regul * torch.eye(p), j.t() @ r)
    expected = f0x + torch.einsum("ncp,p->nc", jx, delta)
    pred = ntk_predict(model, train, test, regul=regul)
    torch.testing.assert_close(pred, expected, rtol=1e-7, atol=1e-9)
    if regul == 0.0:  # interpolates the training set
        torch.testing.assert_close(
            NTKRegressor(model).fit(train).predict(train), y_train, rtol=1e-7, atol=1e-8
        )


@pytest.mark.parametrize("regul", [0.0, 0.1])
def test_finite_time_is_gradient_flow_of_the_linearised_network(regul: float) -> None:
    model, train, test, x_train, y_train, x_test = make_problem(3)
    j, f0, jx, f0x = dense_parts(model, x_train, x_test)
    n = x_train.shape[0]
    k = j @ j.t() + regul * torch.eye(j.shape[0])
    r = (y_train - f0).t().reshape(-1)
    t = 3.0
    # closed form through the matrix exponential (no eigendecomposition)
    c = torch.linalg.solve(
        k, (torch.eye(k.shape[0]) - torch.linalg.matrix_exp(-k * t / n)) @ r
    )
    expected = (
        f0x
        + (jx.transpose(0, 1).reshape(-1, j.shape[1]) @ (j.t() @ c)).reshape(3, -1).t()
    )
    pred = ntk_predict(model, train, test, regul=regul, time=t)
    torch.testing.assert_close(pred, expected, rtol=1e-7, atol=1e-9)
    if regul == 0.0:
        # gradient descent with a small step on the linearised model, mean loss
        delta = torch.zeros(j.shape[1])
        steps = 3000
        lr = t / steps
        for _ in range(steps):
            resid = j @ delta - r
            delta = delta - lr * j.t() @ resid / n
        gd = f0x + torch.einsum("ncp,p->nc", jx, delta)
        torch.testing.assert_close(pred, gd, rtol=2e-3, atol=2e-3)


def test_time_zero_is_the_initial_network_and_large_time_converges() -> None:
    model, train, test, *_ = make_problem(2)
    reg = NTKRegressor(model, regul=1e-3).fit(train)
    x = torch.cat(test)
    with torch.no_grad():
        torch.testing.assert_close(reg.predict(test, time=0.0), model(x))
    torch.testing.assert_close(reg.predict(test, time=1e9), reg.predict(test))


def test_class_labels_are_one_hot() -> None:
    model, _, test, x_train, _, _ = make_problem(3)
    labels = torch.randint(0, 3, (10,))
    a = ntk_predict(model, [(x_train, labels)], test, regul=0.1)
    b = ntk_predict(
        model, [x_train], test, nn.functional.one_hot(labels, 3).double(), regul=0.1
    )
    torch.testing.assert_close(a, b)


def test_fit_leaves_the_model_and_later_training_does_not_change_predictions() -> None:
    model, train, test, *_ = make_problem(2)
    before = model_state(model)
    reg = NTKRegressor(model, regul=0.1).fit(train)
    first = reg.predict(test)
    assert_same_state(before, model_state(model))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    torch.testing.assert_close(reg.predict(test), first)


def test_errors() -> None:
    model, train, test, x_train, *_ = make_problem(2)
    with pytest.raises(ValueError, match="regul"):
        NTKRegressor(model, regul=-1.0)
    with pytest.raises(ValueError, match="fit"):
        NTKRegressor(model).predict(test)
    with pytest.raises(ValueError, match="no targets"):
        NTKRegressor(model).fit([x_train])
    with pytest.raises(ValueError, match=r"targets have shape \(10, 3\)"):
        NTKRegressor(model).fit([x_train], torch.randn(10, 3))
    with pytest.raises(ValueError, match="time"):
        NTKRegressor(model, 0.1).fit(train).predict(test, time=-1.0)
