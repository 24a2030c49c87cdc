"""Lanczos, SLQ and the randomised estimators against dense float64 algebra."""

from __future__ import annotations

import math

import pytest
import torch

from nnfim import FMatDense, LayerCollection, PMatDense, PVector
from nnfim.linalg import (
    as_operator,
    condition_number,
    frobenius_norm_estimate,
    hutchinson_diag,
    hutchinson_trace,
    hutchpp_diag,
    hutchpp_trace,
    lanczos,
    nonzero_condition_number,
    slq,
)


def spd(n: int, seed: int, rank: int | None = None) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(n, rank or n, generator=gen, dtype=torch.float64)
    return a @ a.T / n + (0 if rank else 1e-2) * torch.eye(n, dtype=torch.float64)


def gapped(n: int, seed: int) -> torch.Tensor:
    """Symmetric, well-separated extreme eigenvalues, a random eigenbasis."""
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    evals = torch.cat(
        [
            torch.tensor([-5.0, -3.0]),
            torch.linspace(-1, 1, n - 4, dtype=torch.float64),
            torch.tensor([4.0, 8.0]),
        ]
    ).to(torch.float64)
    return q @ torch.diag(evals) @ q.T


@pytest.mark.parametrize("which", ["largest", "smallest", "both"])
@pytest.mark.parametrize("seed", [0, 1])
def test_lanczos_full_iterations_exact(which: str, seed: int) -> None:
    a = spd(30, seed)
    ref = torch.linalg.eigvalsh(a)
    vals, vecs = lanczos(a, 3, which=which, n_iter=30, seed=seed)
    expected = {
        "largest": ref[-3:],
        "smallest": ref[:3],
        "both": torch.cat([ref[:3], ref[-3:]]),
    }[which]
    torch.testing.assert_close(vals, expected, rtol=1e-9, atol=1e-10)
    # eigenvectors: A v = lambda v, orthonormal
    torch.testing.assert_close(a @ vecs, vecs * vals, rtol=0, atol=1e-8)
    torch.testing.assert_close(
        vecs.T @ vecs, torch.eye(vecs.shape[1], dtype=torch.float64), atol=1e-8, rtol=0
    )


@pytest.mark.parametrize("which", ["largest", "smallest"])
def test_lanczos_converges_before_the_dimension(which: str) -> None:
    a = gapped(200, 3)
    ref = torch.linalg.eigvalsh(a)
    vals, _ = lanczos(a, 2, which=which, n_iter=60)
    expected = ref[-2:] if which == "largest" else ref[:2]
    torch.testing.assert_close(vals, expected, rtol=1e-8, atol=1e-8)


def test_lanczos_restarts_on_invariant_subspace() -> None:
    # a start vector in an invariant subspace: the identity breaks down at once
    a = torch.diag(torch.tensor([1.0, 1.0, 1.0, 2.0, 3.0], dtype=torch.float64))
    vals, _ = lanczos(a, 5, which="largest", n_iter=5)
    torch.testing.assert_close(vals, torch.linalg.eigvalsh(a))


def test_lanczos_on_pmat_and_fmat_and_function() -> None:
    a = spd(12, 5)
    lc = LayerCollection.from_model(torch.nn.Linear(3, 3))
    pmat = PMatDense(lc, a)
    ref = torch.linalg.eigvalsh(a)[-2:]
    for matrix, kw in (
        (pmat, {}),
        (FMatDense(a.reshape(3, 4, 3, 4)), {}),
        (lambda x: a @ x, {"size": 12, "dtype": torch.float64}),
    ):
        vals, vecs = lanczos(matrix, 2, n_iter=12, **kw)
        torch.testing.assert_close(vals, ref)
    top = PVector.from_flat(lc, vecs[:, -1])
    torch.testing.assert_close(pmat.mv(top).flatten(), ref[-1] * vecs[:, -1])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"k": 0}, "k=0"),
        ({"k": 7, "which": "both"}, "size 12"),
        ({"which": "top"}, "which"),
        ({"k": 3, "n_iter": 2}, "n_iter"),
    ],
)
def test_lanczos_bad_arguments(kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        lanczos(spd(12, 0), **kwargs)


def test_as_operator_errors() -> None:
    with pytest.raises(ValueError, match="size="):
        as_operator(lambda x: x)
    with pytest.raises(ValueError, match="square"):
        as_operator(torch.zeros(2, 3))
    with pytest.raises(TypeError, match="got str"):
        as_operator("matrix")


@pytest.mark.parametrize("power", [0, 1, 2, 5])
def test_slq_moments_are_exact(power: int) -> None:
    # m Lanczos steps integrate polynomials of degree < 2m exactly: the
    # quadrature of t^k equals v^T A^k v / ||v||^2 for each probe.
    a = spd(40, 7)
    m = 4
    dens = slq(a, n_probes=3, n_iter=m, seed=2)
    gen = torch.Generator().manual_seed(2)
    expected = []
    for _ in range(3):
        v = (torch.randint(0, 2, (40,), generator=gen).to(torch.float64) * 2) - 1
        expected.append(v @ torch.linalg.matrix_power(a, power) @ v / (v @ v))
    quad = (dens.weights * dens.nodes**power).sum(1)
    torch.testing.assert_close(quad, torch.stack(expected), rtol=1e-9, atol=1e-12)


def test_slq_full_iterations_nodes_are_the_spectrum() -> None:
    a = spd(25, 4)
    ref = torch.linalg.eigvalsh(a)
    dens = slq(a, n_probes=2, n_iter=25)
    for i in range(2):
        torch.testing.assert_close(dens.nodes[i], ref, rtol=1e-9, atol=1e-10)
        torch.testing.assert_close(dens.weights[i].sum(), torch.tensor(1.0).double())


def test_slq_density_matches_smoothed_eigenvalues() -> None:
    a = gapped(120, 6) + 6 * torch.eye(120, dtype=torch.float64)
    ref = torch.linalg.eigvalsh(a)
    dens = slq(a, n_probes=40, n_iter=40)
    grid = torch.linspace(0, 15, 300, dtype=torch.float64)
    sigma = 0.5
    est = dens.density(grid, sigma)
    exact = torch.exp(-0.5 * ((grid[:, None] - ref[None]) / sigma) ** 2).sum(1) / (
        sigma * math.sqrt(2 * math.pi) * 120
    )
    step = float(grid[1] - grid[0])
    assert abs(float(est.sum()) * step - 1.0) < 1e-3
    assert float((est - exact).abs().max()) < 0.1 * float(exact.max())
    # trace of A and of A^2 within a few percent (Hutchinson error, 40 probes)
    assert abs(float(dens.trace()) / float(ref.sum()) - 1) < 0.03
    tr2 = float(dens.trace(lambda t: t**2))
    assert abs(tr2 / float((ref**2).sum()) - 1) < 0.05


def test_hutchinson_exact_on_diagonal() -> None:
    d = torch.linspace(0.1, 3.0, 17, dtype=torch.float64)
    a = torch.diag(d)
    torch.testing.assert_close(hutchinson_trace(a, 3), d.sum())
    torch.testing.assert_close(hutchinson_diag(a, 3), d)
    torch.testing.assert_close(frobenius_norm_estimate(a, 3), d.norm())


@pytest.mark.parametrize("seed", [0, 1])
def test_hutchpp_exact_on_low_rank(seed: int) -> None:
    a = spd(50, seed, rank=5)
    torch.testing.assert_close(hutchpp_trace(a, 15, seed=seed), torch.trace(a))
    torch.testing.assert_close(hutchpp_diag(a, 15, seed=seed), torch.diagonal(a))


def test_estimators_unbiased_on_dense() -> None:
    a = spd(60, 9)
    ref_tr = float(torch.trace(a))
    assert abs(float(hutchinson_trace(a, 400)) / ref_tr - 1) < 0.05
    assert abs(float(hutchpp_trace(a, 60)) / ref_tr - 1) < 0.05
    diag_err = hutchinson_diag(a, 400) - torch.diagonal(a)
    assert float(diag_err.abs().max()) < 0.3 * float(torch.diagonal(a).max())
    ref_fro = float(torch.linalg.matrix_norm(a))
    assert abs(float(frobenius_norm_estimate(a, 400)) / ref_fro - 1) < 0.05


def test_condition_number() -> None:
    a = spd(20, 2)
    ref = torch.linalg.eigvalsh(a)
    torch.testing.assert_close(condition_number(a, n_iter=20), ref[-1] / ref[0])
    singular = spd(20, 2, rank=3)
    evals = torch.linalg.eigvalsh(singular)
    expected = evals[-1] / evals[-3]
    torch.testing.assert_close(nonzero_condition_number(evals), expected)
    assert math.isinf(float(condition_number(-a, n_iter=20)))


def test_estimators_reject_bad_counts() -> None:
    with pytest.raises(ValueError, match="positive int"):
        hutchinson_trace(spd(4, 0), 0)
    with pytest.raises(ValueError, match="n_matvecs >= 3"):
        hutchpp_trace(spd(4, 0), 2)
