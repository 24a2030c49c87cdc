"""K-FAC, EKFAC and natural gradient under DistributedDataParallel (gloo, loopback).

One spawn per world size: every rank wraps the same float64 model in
``DistributedDataParallel``, takes its part of each batch (parts of different
sizes) and steps with ``distributed=True``; the parent steps one process on the
union of the parts with the gradient of the union's mean loss and compares.
Each rank scales its summed loss by ``world / N`` so that DDP's mean over ranks
of the gradients is the gradient of the union's mean loss.
"""

from __future__ import annotations

import copy
import os
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from conftest import assert_same_state, model_state
from test_distributed import _spawn, assert_group_released
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from nnfim import EKFAC, KFAC, NaturalGradient, PMatDense
from nnfim.distributed import assign_by_cost

#: examples of each rank's part of the batch at each step, per world size
PARTS = {2: [[12, 5, 9], [6, 14, 10]], 3: [[7, 3, 8], [5, 9, 2], [8, 6, 9]]}
N_STEPS = 3
#: optimizer, keyword arguments; eigen_every=2: eigendecompositions at steps 0 and 2
CONFIGS: dict[str, tuple[type, dict[str, Any]]] = {
    "kfac": (
        KFAC,
        {"lr": 0.5, "damping": 1e-2, "momentum": 0.5, "weight_decay": 1e-3},
    ),
    "kfac_factored_adaptive": (
        KFAC,
        {
            "lr": 0.3,
            "damping": 1e-2,
            "damping_method": "factored",
            "kl_clip": 1e-2,
            "adaptive_damping": True,
            "damping_factor": 0.5,
        },
    ),
    "ekfac": (EKFAC, {"lr": 0.5, "damping": 1e-2, "momentum": 0.5}),
    "natural_dense": (
        NaturalGradient,
        {"representation": PMatDense, "lr": 0.5, "damping": 1e-2},
    ),
}
COMMON: dict[str, Any] = {"fisher_type": "exact"}
KRON_COMMON: dict[str, Any] = {"decay": 0.7, "eigen_every": 2}
EIGEN_REFRESHES = 2  # steps 0 and 2 of 3
FAILURE_WORLD = 2
PG_TIMEOUT = 10.0


def _kwargs(name: str) -> dict[str, Any]:
    cls, kw = CONFIGS[name]
    extra = KRON_COMMON if cls in (KFAC, EKFAC) else {}
    return {**COMMON, **extra, **kw}


def _model() -> nn.Module:
    """Three Kronecker layers and a LayerNorm (an exact running block)."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(5, 7),
        nn.Tanh(),
        nn.LayerNorm(7),
        nn.Linear(7, 6),
        nn.ReLU(),
        nn.Linear(6, 3),
    ).to(torch.float64)


def _parts(world: int) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
    """``[step][rank] -> (x, y)``."""
    gen = torch.Generator().manual_seed(4)
    return [
        [
            (
                torch.randn(sizes[t], 5, generator=gen, dtype=torch.float64),
                torch.randint(0, 3, (sizes[t],), generator=gen),
            )
            for sizes in PARTS[world]
        ]
        for t in range(N_STEPS)
    ]


def _flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def _closure(
    net: nn.Module, params: list[torch.Tensor], batch: Any, scale: float
) -> Callable[[], torch.Tensor]:
    def closure() -> torch.Tensor:
        for p in params:
            p.grad = None
        loss = F.cross_entropy(net(batch[0]), batch[1], reduction="sum") * scale
        loss.backward()
        return loss.detach()

    return closure


class _CountEigh:
    """Counts ``torch.linalg.eigh`` calls in this process while active."""

    def __init__(self) -> None:
        self.calls = 0
        self._orig = torch.linalg.eigh

    def __enter__(self) -> _CountEigh:
        def counting(*args: Any, **kwargs: Any) -> Any:
            self.calls += 1
            return self._orig(*args, **kwargs)

        torch.linalg.eigh = counting
        return self

    def __exit__(self, *exc: Any) -> None:
        torch.linalg.eigh = self._orig


def _train(name: str, rank: int, world: int) -> dict[str, Any]:
    """``N_STEPS`` steps of DDP training on this rank's parts."""
    cls, _ = CONFIGS[name]
    model = _model()
    ddp = DistributedDataParallel(model)
    opt = cls(ddp, distributed=True, **_kwargs(name))
    params = list(model.parameters())
    out: dict[str, Any] = {}
    with _CountEigh() as counter:
        for t, parts in enumerate(_parts(world)):
            n_total = sum(x.shape[0] for x, _ in parts)
            closure = _closure(ddp, params, parts[rank], world / n_total)
            opt.step(closure, batch=parts[rank])
            out[f"{name}/params{t}"] = _flat(model)
    out[f"{name}/damping"] = opt.group["damping"]
    out[f"{name}/rho"] = opt.last_rho
    out[f"{name}/eigh_calls"] = counter.calls
    # no side effects on the model or its wrapper, also from a refresh alone
    before, before_ddp = model_state(model), model_state(ddp)
    opt.update_curvature(_parts(world)[0][rank])
    assert_same_state(before, model_state(model))
    assert_same_state(before_ddp, model_state(ddp))
    out[f"{name}/hooks"] = len(model[0]._forward_hooks) + len(
        model[0]._forward_pre_hooks
    )
    return out


def _worker(rank: int, world: int, out_dir: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in CONFIGS:
        out.update(_train(name, rank, world))
    # the default Monte-Carlo Fisher: ranks draw different labels, steps agree
    model = _model()
    ddp = DistributedDataParallel(model)
    opt = KFAC(ddp, distributed=True, eigen_every=2)
    for t, parts in enumerate(_parts(world)):
        n_total = sum(x.shape[0] for x, _ in parts)
        opt.step(
            _closure(ddp, list(model.parameters()), parts[rank], world / n_total),
            batch=parts[rank],
        )
        out[f"mc/params{t}"] = _flat(model)
    if world == FAILURE_WORLD:  # last: rank 1 leaves the group at the end
        _failures(rank, world, out_dir, out)
    return out


def _attempt(call: Callable[[], Any], out: dict[str, Any], what: str) -> None:
    start = time.monotonic()
    try:
        call()
        out[what] = "no error"
    except Exception as exc:
        out[what] = f"{type(exc).__name__}: {exc}"
    out[f"{what}_seconds"] = time.monotonic() - start


def _failures(rank: int, world: int, out_dir: str, out: dict[str, Any]) -> None:
    """Rank 1 raises during ``step`` in several ways, then exits."""
    parts = _parts(world)[0]
    x, y = parts[rank]
    bad = (x.float(), y) if rank == 1 else (x, y)
    n_total = sum(p[0].shape[0] for p in parts)
    for what, good_steps in (("bad_first_step", 0), ("bad_later_step", 1)):
        model = _model()
        ddp = DistributedDataParallel(model)
        opt = KFAC(ddp, distributed=True, fisher_type="exact")
        closure = _closure(ddp, list(model.parameters()), (x, y), world / n_total)
        for _ in range(good_steps):
            opt.step(closure, batch=(x, y))
        closure()
        before = model_state(model)
        _attempt(lambda: opt.step(batch=bad), out, what)  # noqa: B023
        try:
            assert_same_state(before, model_state(model))
            out[f"{what}_state"] = "kept"
        except AssertionError:
            out[f"{what}_state"] = traceback.format_exc()
    # parameters that differ between ranks (no DDP to broadcast them)
    other = _model()
    if rank == 1:
        with torch.no_grad():
            other[0].weight[0, 0] += 1e-6
    opt = EKFAC(other, distributed=True, fisher_type="exact")
    _attempt(lambda: opt.step(batch=(x, y)), out, "differ")
    # a rank that exits: the other's next step fails within the group's timeout
    model = _model()
    opt = KFAC(model, distributed=True, fisher_type="exact")
    if rank == 1:
        torch.save(out, os.path.join(out_dir, "rank1.pt"))
        os._exit(0)
    _attempt(lambda: opt.step(batch=(x, y)), out, "left")


_RUNS: dict[int, list[dict[str, Any]]] = {}


def _run(world: int, tmp_path_factory: Any) -> list[dict[str, Any]]:
    if world not in _RUNS:
        out: Path = tmp_path_factory.mktemp(f"optim_world{world}")
        _RUNS[world] = _spawn(_worker, world, out, str(out), pg_timeout=PG_TIMEOUT)
    return _RUNS[world]


@pytest.fixture(scope="module", params=sorted(PARTS))
def world(request: pytest.FixtureRequest, tmp_path_factory: Any) -> Any:
    results = _run(request.param, tmp_path_factory)
    errors = "\n".join(str(r["error"]) for r in results if "error" in r)
    assert not errors, errors
    return request.param, results


def _reference(name: str, world: int) -> tuple[list[torch.Tensor], float, float | None]:
    """One process stepping on the union of the parts, gradient of the mean loss."""
    cls, _ = CONFIGS[name]
    model = _model()
    opt = cls(model, **_kwargs(name))
    params = list(model.parameters())
    flats = []
    for parts in _parts(world):
        union = (torch.cat([x for x, _ in parts]), torch.cat([y for _, y in parts]))
        opt.step(_closure(model, params, union, 1 / union[0].shape[0]), batch=union)
        flats.append(_flat(model))
    return flats, opt.group["damping"], opt.last_rho


# -- tests ----------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_every_rank_steps_as_one_process_on_the_union(world: Any, name: str) -> None:
    size, results = world
    flats, damping, rho = _reference(name, size)
    for res in results:
        for t, want in enumerate(flats):
            torch.testing.assert_close(
                res[f"{name}/params{t}"], want, rtol=1e-10, atol=1e-12
            )
        assert res[f"{name}/damping"] == pytest.approx(damping, rel=1e-12)
        # adaptive damping: rho from the mean over ranks of the closures' losses
        assert (res[f"{name}/rho"] is None) == (rho is None)
        if rho is not None:
            assert res[f"{name}/rho"] == pytest.approx(rho, rel=1e-8)
    # the parameters moved: the comparison is not between initial values
    assert not torch.allclose(flats[-1], _flat(_model()))


@pytest.mark.parametrize("name", [*sorted(CONFIGS), "mc"])
def test_parameters_are_bitwise_identical_across_ranks(world: Any, name: str) -> None:
    _, results = world
    for t in range(N_STEPS):
        key = f"{name}/params{t}"
        for res in results[1:]:
            assert torch.equal(res[key], results[0][key]), key


@pytest.mark.parametrize("name", ["kfac", "kfac_factored_adaptive", "ekfac"])
def test_eigendecompositions_are_spread_by_cost(world: Any, name: str) -> None:
    size, results = world
    opt = CONFIGS[name][0](_model(), **_kwargs(name))
    batch = _parts(size)[0][0]
    opt.update_curvature(batch)
    mats = [a for a, _ in opt.factors.values()] + [g for _, g in opt.factors.values()]
    mats += list(opt.blocks.values())
    costs = [float(m.numel() // m.shape[-1] ** 2) * m.shape[-1] ** 3 for m in mats]
    owners = assign_by_cost(costs, size)
    calls = [res[f"{name}/eigh_calls"] for res in results]
    assert sum(calls) == EIGEN_REFRESHES * len(mats)
    assert calls == [EIGEN_REFRESHES * owners.count(r) for r in range(size)]
    assert all(c > 0 for c in calls), calls


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_no_hooks_left_on_the_inner_module(world: Any, name: str) -> None:
    _, results = world
    assert all(res[f"{name}/hooks"] == 0 for res in results)


def test_destroy_process_group_releases_the_group(world: Any) -> None:
    # constructing the first optimizer imports torch._dynamo, after the group
    assert_group_released(*world, FAILURE_WORLD)


@pytest.fixture(scope="module")
def failures(tmp_path_factory: Any) -> list[dict[str, Any]]:
    results = _run(FAILURE_WORLD, tmp_path_factory)
    errors = "\n".join(str(r["error"]) for r in results if "error" in r)
    assert not errors, errors
    return results


@pytest.mark.parametrize(
    ("what", "during"),
    [
        ("bad_first_step", "KFAC's first curvature refresh"),
        ("bad_later_step", "kfac"),
    ],
)
def test_a_rank_that_raises_in_step_stops_the_others(
    failures: Any, what: str, during: str
) -> None:
    rank0, rank1 = failures
    assert rank1[what].startswith("ValueError"), rank1[what]
    assert "torch.float32" in rank1[what]
    assert rank0[what].startswith("DistributedError"), rank0[what]
    assert f"rank(s) [1] raised during {during}" in rank0[what]
    assert rank0[f"{what}_seconds"] < PG_TIMEOUT
    for res in failures:
        assert res[f"{what}_state"] == "kept", res[f"{what}_state"]


def test_parameters_that_differ_are_refused_at_the_first_step(failures: Any) -> None:
    for res in failures:
        assert res["differ"].startswith("ValueError"), res["differ"]
        assert "EKFAC's first curvature refresh" in res["differ"]
        assert "rank(s) [1] differ from rank 0" in res["differ"]


def test_a_rank_that_leaves_fails_the_other_within_the_timeout(failures: Any) -> None:
    rank0 = failures[0]
    assert rank0["left"].startswith("DistributedError"), rank0["left"]
    assert "another rank probably raised or exited" in rank0["left"].lower()
    assert rank0["left_seconds"] < 3 * PG_TIMEOUT


# -- argument checks (a group of one) ------------------------------------------------------
@pytest.fixture
def group_of_one() -> Any:
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.mark.parametrize("cls", [KFAC, EKFAC, NaturalGradient])
def test_a_ddp_model_needs_distributed(group_of_one: Any, cls: type) -> None:
    ddp = DistributedDataParallel(_model())
    with pytest.raises(ValueError, match="distributed=True"):
        cls(ddp)


@pytest.mark.parametrize("cls", [KFAC, EKFAC, NaturalGradient])
def test_distributed_must_be_a_bool_or_a_group(cls: type) -> None:
    with pytest.raises(TypeError, match="ProcessGroup"):
        cls(_model(), distributed="yes")


@pytest.mark.parametrize("cls", [KFAC, EKFAC, NaturalGradient])
def test_distributed_needs_an_initialised_group(cls: type) -> None:
    with pytest.raises(RuntimeError, match="init_process_group"):
        cls(_model(), distributed=True)


@pytest.mark.parametrize("cls", [KFAC, EKFAC])
def test_group_of_one_steps_as_without_distributed(
    group_of_one: Any, cls: type
) -> None:
    parts = _parts(2)
    flats = []
    for distributed in (True, False):
        model = _model()
        net = DistributedDataParallel(model) if distributed else model
        opt = cls(net, distributed=distributed, fisher_type="mc", eigen_every=2)
        for step in parts:
            batch = step[0]
            opt.step(
                _closure(net, list(model.parameters()), batch, 1 / len(batch[1])),
                batch=batch,
            )
        flats.append(_flat(model))
    # the same numbers, up to the eigenvectors' memory layout (rounding of products)
    # (steps reach weights of 1e4 and more: rounding relative to the largest)
    scale = float(flats[1].abs().max())
    torch.testing.assert_close(flats[0], flats[1], rtol=1e-10, atol=1e-12 * scale)


def test_the_wrapper_and_its_module_give_the_same_optimizer(group_of_one: Any) -> None:
    model = _model()
    ddp = DistributedDataParallel(model)
    a = KFAC(ddp, distributed=True)
    b = KFAC(copy.deepcopy(model), distributed=True)
    assert a.model is model
    assert a.layer_collection.layer_names == b.layer_collection.layer_names
