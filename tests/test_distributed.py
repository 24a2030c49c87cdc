"""Data-parallel Fisher over torch.distributed: gloo processes on loopback.

One spawn per world size computes every quantity on each rank's shard with
``distributed=True``; the parent compares with the single-process result on
the union of the shards (float64). Shards are uneven on purpose.
"""

from __future__ import annotations

import copy
import datetime
import gc
import itertools
import os
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import assert_same_state, make_case, model_state
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from nnfim import (
    FIM,
    NTK,
    FMatDense,
    FVector,
    Jacobian,
    PMatBlockDiag,
    PMatDense,
    PMatDiag,
    PMatEKFAC,
    PMatImplicit,
    PMatKFAC,
    PMatLowRank,
    PMatQuasiDiag,
    PVector,
    per_example_grads,
)
from nnfim.distributed import (
    DistributedError,
    all_reduce_mean,
    assign_by_cost,
    distributed_eigh,
    rank_seed,
)

JOIN_TIMEOUT = 120.0  # seconds the parent waits for all ranks, well above normal
MODELS = ("mlp", "cnn")
#: examples per batch of each rank's shard, per world size (uneven shards)
SHARDS = {2: [[6, 4], [3]], 3: [[4, 1], [5], [2, 3, 2]]}
DENSE_REPS = {
    "dense": PMatDense,
    "diag": PMatDiag,
    "blockdiag": PMatBlockDiag,
    "kfac": PMatKFAC,
    "quasidiag": PMatQuasiDiag,
}
MC_SEED = 3
#: the world size whose spawn also checks failures (rank 1 raises, then leaves)
FAILURE_WORLD = 2


# -- process plumbing -----------------------------------------------------------------
def _entry(
    target: Callable[..., dict[str, Any]],
    rank: int,
    world: int,
    init: str,
    out: str,
    pg_timeout: float,
    args: tuple[Any, ...],
) -> None:
    torch.set_num_threads(1)
    torch.set_default_dtype(torch.float64)
    threads_before = _os_threads()
    dist.init_process_group(
        "gloo",
        init_method=init,
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=pg_timeout),
    )
    try:
        results = target(rank, world, *args)
    except BaseException:
        results = {"error": traceback.format_exc()}
    torch.save(results, os.path.join(out, f"rank{rank}.pt"))
    dist.destroy_process_group()
    gc.collect()
    threads = (threads_before, _os_threads())
    torch.save(threads, os.path.join(out, f"threads{rank}.pt"))


def _os_threads() -> int | None:
    """This process's threads, C++ ones included (Linux); None without /proc."""
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:
        return None


def _spawn(
    target: Callable[..., dict[str, Any]],
    world: int,
    out: Path,
    *args: Any,
    pg_timeout: float = 60.0,
) -> list[dict[str, Any]]:
    """Run ``target(rank, world, *args)`` in ``world`` gloo processes; their results."""
    ctx = mp.get_context("spawn")
    init = f"file://{out / 'store'}"
    procs = [
        ctx.Process(
            target=_entry, args=(target, r, world, init, str(out), pg_timeout, args)
        )
        for r in range(world)
    ]
    for p in procs:
        p.start()
    deadline = time.monotonic() + JOIN_TIMEOUT
    for p in procs:
        p.join(max(deadline - time.monotonic(), 0.0))
    hung = [r for r, p in enumerate(procs) if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    assert not hung, f"ranks {hung} hung"
    results = []
    for r in range(world):
        path = out / f"rank{r}.pt"
        assert path.exists(), f"rank {r} exited with code {procs[r].exitcode}"
        res = torch.load(path, weights_only=True)
        threads = out / f"threads{r}.pt"
        if threads.exists():  # (threads before init_process_group, after destroy)
            res["os_threads"] = torch.load(threads, weights_only=True)
        results.append(res)
    return results


# -- data -------------------------------------------------------------------------------
def _shards(model_name: str, world: int) -> tuple[nn.Module, list[list[Any]]]:
    case = make_case(model_name, "classif_logits", seed=1)
    gen = torch.Generator().manual_seed(2)
    x0, y0 = case.loader[0]
    shards = [
        [
            (
                torch.randn(n, *x0.shape[1:], generator=gen),
                torch.randint(0, 3, (n,), generator=gen),
            )
            for n in sizes
        ]
        for sizes in SHARDS[world]
    ]
    return case.model, shards


def _probe(model: nn.Module, n_total: int) -> tuple[PVector, FVector]:
    gen = torch.Generator().manual_seed(5)
    v = PVector.from_model(model).apply(
        lambda p: torch.randn(p.shape, generator=gen, dtype=p.dtype)
    )
    f = FVector(torch.randn(3, n_total, generator=gen))
    return v, f


def _quantities(
    model: nn.Module,
    loader: list[Any],
    loader2: list[Any],
    n_total: int,
    distributed: bool,
) -> dict[str, torch.Tensor]:
    """Every quantity checked; on the union (parent) or a shard (a rank)."""
    v, f = _probe(model, n_total)
    kw: dict[str, Any] = {"distributed": True} if distributed else {}
    out = {k: FIM(model, loader, rep, **kw).dense() for k, rep in DENSE_REPS.items()}
    out["lowrank_factor"] = FIM(model, loader, PMatLowRank, **kw).factor
    ekfac = FIM(model, loader, PMatEKFAC, **kw)
    out["ekfac_before_refit"] = ekfac.dense()
    out["ekfac"] = ekfac.update_diag().dense()
    out["ekfac_refit_at_build"] = FIM(
        model, loader, PMatEKFAC, ekfac_refit=True, **kw
    ).dense()
    implicit = FIM(model, loader, PMatImplicit, **kw)
    out["implicit_mv"] = implicit.mv(v).flatten()
    out["implicit_diag"] = implicit.diag()
    out["gram_dual"] = FIM(model, loader, FMatDense, **kw).data
    out["ntk"] = NTK(model, loader, **kw).data
    out["ntk_cross"] = NTK(model, loader, loader2, **kw).data
    jac = Jacobian(model, loader, **kw)
    out["jacobian"] = jac.dense()
    out["jvp"] = jac.jvp(v).data
    out["vjp"] = jac.vjp(f).flatten()
    out["per_example_grads"] = per_example_grads(model, loader, **kw)
    return out


def _mc(model: nn.Module, loader: list[Any], seed: int, **kw: Any) -> torch.Tensor:
    return FIM(
        model, loader, PMatDiag, fisher_type="mc", mc_samples=2, seed=seed, **kw
    ).diag()


def _sampled() -> tuple[nn.Module, TensorDataset]:
    """A data set of 12 examples: DistributedSampler pads nothing for 2 or 3 ranks."""
    model, shards = _shards("mlp", 2)
    x, y = (torch.cat(t)[:12] for t in zip(*shards[0] + shards[1], strict=True))
    return model, TensorDataset(x, y)


def _building_blocks() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(9)
    mats = {}
    for name, (b, d) in {"a": (1, 7), "b": (2, 3), "c": (1, 12), "d": (1, 1)}.items():
        x = torch.randn(b, d, d + 2, generator=gen)
        mats[name] = x @ x.transpose(1, 2)
    return mats


def _worker(rank: int, world: int, out_dir: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for model_name in MODELS:
        model, shards = _shards(model_name, world)
        n_total = sum(x.shape[0] for s in shards for x, _ in s)
        before = model_state(model)
        res = _quantities(
            model, shards[rank], shards[rank][::-1], n_total, distributed=True
        )
        res["mc"] = _mc(model, shards[rank], MC_SEED, distributed=True)
        assert_same_state(before, model_state(model))
        out.update({f"{model_name}/{k}": t for k, t in res.items()})
    model, dataset = _sampled()
    sampler = DistributedSampler(dataset, world, rank, shuffle=False)
    loader = DataLoader(dataset, batch_size=4, sampler=sampler)
    out["sampler/kfac"] = FIM(model, loader, PMatKFAC, distributed=True).dense()
    ekfac = FIM(model, loader, PMatEKFAC, distributed=True).update_diag()
    out["sampler/ekfac"] = ekfac.dense()
    for name, (evals, evecs) in distributed_eigh(_building_blocks()).items():
        out[f"eigh/{name}/values"] = evals
        out[f"eigh/{name}/vectors"] = evecs
    (mean,) = all_reduce_mean([torch.full((2, 3), float(rank))], weight=rank + 1.0)
    out["all_reduce_mean"] = mean
    if world == FAILURE_WORLD:  # last: rank 1 leaves the group at the end
        _failures(rank, world, out_dir, out)
    return out


_RUNS: dict[int, list[dict[str, Any]]] = {}


def _run(size: int, tmp_path_factory: Any) -> list[dict[str, Any]]:
    """One spawn per world size, shared by every test that reads it."""
    if size not in _RUNS:
        out = tmp_path_factory.mktemp(f"world{size}")
        _RUNS[size] = _spawn(_worker, size, out, str(out), pg_timeout=10.0)
    return _RUNS[size]


@pytest.fixture(scope="module", params=sorted(SHARDS))
def world(request: pytest.FixtureRequest, tmp_path_factory: Any) -> Any:
    return request.param, _run(request.param, tmp_path_factory)


def _reference(model_name: str, world: int) -> dict[str, torch.Tensor]:
    model, shards = _shards(model_name, world)
    union = [b for s in shards for b in s]
    n_total = sum(x.shape[0] for x, _ in union)
    union2 = [b for s in shards for b in s[::-1]]
    ref = _quantities(model, union, union2, n_total, distributed=False)
    counts = [sum(x.shape[0] for x, _ in s) for s in shards]
    ref["mc"] = sum(
        _mc(model, s, rank_seed(MC_SEED, r)) * (counts[r] / n_total)
        for r, s in enumerate(shards)
    )
    return ref


QUANTITIES = [
    *DENSE_REPS,
    "lowrank_factor",
    "ekfac_before_refit",
    "ekfac",
    "ekfac_refit_at_build",
] + [
    "implicit_mv",
    "implicit_diag",
    "gram_dual",
    "ntk",
    "ntk_cross",
    "jacobian",
    "jvp",
    "vjp",
    "per_example_grads",
    "mc",
]


@pytest.fixture(scope="module")
def references() -> dict[tuple[str, int], dict[str, torch.Tensor]]:
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        return {(m, w): _reference(m, w) for m in MODELS for w in SHARDS}
    finally:
        torch.set_default_dtype(old)


# -- tests ------------------------------------------------------------------------------
def _errors(results: list[dict[str, Any]]) -> str:
    return "\n".join(str(r["error"]) for r in results if "error" in r)


@pytest.mark.parametrize("model_name", MODELS)
@pytest.mark.parametrize("quantity", QUANTITIES)
def test_equals_single_process_on_union(
    world: Any, references: Any, model_name: str, quantity: str
) -> None:
    size, results = world
    assert not _errors(results), _errors(results)
    expected = references[(model_name, size)][quantity]
    for rank, res in enumerate(results):
        got = res[f"{model_name}/{quantity}"]
        assert got.dtype == torch.float64
        assert got.shape == expected.shape, (rank, got.shape, expected.shape)
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("model_name", MODELS)
@pytest.mark.parametrize("quantity", QUANTITIES)
def test_every_rank_holds_the_same_result(
    world: Any, model_name: str, quantity: str
) -> None:
    _, results = world
    assert not _errors(results), _errors(results)
    key = f"{model_name}/{quantity}"
    for res in results[1:]:
        assert torch.equal(res[key], results[0][key]), key


def assert_group_released(
    size: int, results: list[dict[str, Any]], failure_world: int
) -> None:
    """No thread of the group outlives ``destroy_process_group()`` on any rank.

    A group kept alive past it is torn down during interpreter exit, which can
    abort the process (see the import in ``nnfim/distributed/collectives.py``).
    Rank 1 of the ``failure_world`` spawn exits without destroying its group.
    """
    if _os_threads() is None:
        pytest.skip("counting a process's threads needs /proc/self/task (Linux)")
    ranks = range(1) if size == failure_world else range(size)
    for r in ranks:
        assert "os_threads" in results[r], f"rank {r} did not get past destroy"
        before, after = results[r]["os_threads"]
        assert after == before, (
            f"rank {r}: {before} threads before init_process_group, {after} "
            "after destroy_process_group"
        )


def test_destroy_process_group_releases_the_group(world: Any) -> None:
    assert_group_released(*world, FAILURE_WORLD)


@pytest.mark.parametrize("representation", [PMatKFAC, PMatEKFAC])
def test_distributed_sampler_shards(world: Any, representation: type) -> None:
    _, results = world
    assert not _errors(results), _errors(results)
    model, dataset = _sampled()
    whole = FIM(model, DataLoader(dataset, batch_size=5), representation)
    if representation is PMatEKFAC:
        whole.update_diag()
    key = f"sampler/{'kfac' if representation is PMatKFAC else 'ekfac'}"
    for res in results:
        torch.testing.assert_close(res[key], whole.dense(), rtol=1e-10, atol=1e-12)


def test_distributed_eigh_matches_local(world: Any) -> None:
    _, results = world
    assert not _errors(results), _errors(results)
    for name, m in _building_blocks().items():
        evals, evecs = torch.linalg.eigh(m)
        for res in results:
            torch.testing.assert_close(res[f"eigh/{name}/values"], evals)
            q = res[f"eigh/{name}/vectors"]
            torch.testing.assert_close(q @ torch.diag_embed(evals) @ q.mT, m)
            assert torch.equal(q, results[0][f"eigh/{name}/vectors"])


def test_all_reduce_mean_weights(world: Any) -> None:
    size, results = world
    weights = [r + 1.0 for r in range(size)]
    expected = sum(w * r for r, w in enumerate(weights)) / sum(weights)
    for res in results:
        torch.testing.assert_close(res["all_reduce_mean"], torch.full((2, 3), expected))


# -- failures ------------------------------------------------------------------------------
def _failures(rank: int, world: int, out_dir: str, out: dict[str, Any]) -> None:
    """Rank 1 raises in several ways, then exits; the results go into ``out``."""
    model, shards = _shards("mlp", world)
    bad = [(x.float(), y) for x, y in shards[rank]] if rank == 1 else shards[rank]
    other = copy.deepcopy(model)
    if rank == 1:
        with torch.no_grad():
            next(other.parameters())[0, 0] += 1e-6
    v = PVector.from_model(model).detach()
    before = model_state(model)
    for what, call in {
        "diag": lambda: FIM(model, bad, PMatDiag, distributed=True),
        "mv": lambda: FIM(model, bad, PMatImplicit, distributed=True).mv(v),
        "empty": lambda: FIM(
            model, [] if rank == 1 else shards[rank], PMatDiag, distributed=True
        ),
        "differ_diag": lambda: FIM(other, shards[rank], PMatDiag, distributed=True),
        "differ_mv": lambda: FIM(
            other, shards[rank], PMatImplicit, distributed=True
        ).mv(v),
    }.items():
        start = time.monotonic()
        try:
            call()
            out[what] = "no error"
        except Exception as exc:
            out[what] = f"{type(exc).__name__}: {exc}"
        out[f"{what}_seconds"] = time.monotonic() - start
    assert_same_state(before, model_state(model))
    if rank == 1:  # leaves without reaching the next collective
        torch.save(out, os.path.join(out_dir, "rank1.pt"))
        os._exit(0)
    start = time.monotonic()
    try:
        FIM(model, shards[rank], PMatDiag, distributed=True)
        out["left"] = "no error"
    except Exception as exc:
        out["left"] = f"{type(exc).__name__}: {exc}"
    out["left_seconds"] = time.monotonic() - start


@pytest.fixture(scope="module")
def failures(tmp_path_factory: Any) -> list[dict[str, Any]]:
    return _run(FAILURE_WORLD, tmp_path_factory)


@pytest.mark.parametrize(
    ("what", "cause"),
    [
        ("diag", "inputs are torch.float32"),
        ("mv", "inputs are torch.float32"),
        ("empty", "the loader yielded no batches"),
    ],
)
def test_a_rank_that_raises_stops_the_others(
    failures: Any, what: str, cause: str
) -> None:
    rank0, rank1 = failures
    assert "error" not in rank0, rank0.get("error")
    assert "error" not in rank1, rank1.get("error")
    assert rank1[what].startswith("ValueError"), rank1[what]
    assert cause in rank1[what]
    assert rank0[what].startswith("DistributedError"), rank0[what]
    assert "rank(s) [1] raised" in rank0[what]
    assert rank0[f"{what}_seconds"] < 10.0


@pytest.mark.parametrize("what", ["differ_diag", "differ_mv"])
def test_models_that_differ_between_ranks_are_refused(failures: Any, what: str) -> None:
    for res in failures:
        assert res[what].startswith("ValueError"), res[what]
        assert "rank(s) [1] differ from rank 0" in res[what]


def test_a_rank_that_leaves_fails_the_others_within_the_timeout(
    failures: Any,
) -> None:
    rank0 = failures[0]
    assert rank0["left"].startswith("DistributedError"), rank0["left"]
    assert "another rank probably raised or exited" in rank0["left"].lower()
    assert rank0["left_seconds"] < 30.0


def test_needs_an_initialised_group() -> None:
    model = nn.Linear(2, 2)
    with pytest.raises(RuntimeError, match="init_process_group"):
        FIM(model, [torch.randn(3, 2)], PMatDiag, distributed=True)


# -- no process group needed ----------------------------------------------------------------
def _makespan(costs: list[float], owners: list[int], world: int) -> float:
    loads = [0.0] * world
    for c, o in zip(costs, owners, strict=True):
        loads[o] += c
    return max(loads)


@pytest.mark.parametrize(
    ("costs", "world"),
    [
        ([8.0, 1.0, 4.0, 4.0], 2),
        ([5.0, 5.0, 4.0, 3.0, 3.0, 3.0], 2),
        ([27.0, 8.0, 64.0, 1.0, 125.0, 8.0, 8.0], 3),
        ([1.0, 2.0], 4),
        ([], 3),
    ],
)
def test_assign_by_cost_is_balanced(costs: list[float], world: int) -> None:
    owners = assign_by_cost(costs, world)
    assert owners == assign_by_cost(costs, world)
    assert len(owners) == len(costs) and all(0 <= o < world for o in owners)
    best = min(
        (
            _makespan(costs, list(a), world)
            for a in itertools.product(range(world), repeat=len(costs))
        ),
        default=0.0,
    )
    # Graham's bound for longest-processing-time first
    assert _makespan(costs, owners, world) <= (4 / 3 - 1 / (3 * world)) * best + 1e-12


@pytest.mark.parametrize(("costs", "world"), [([1.0], 0), ([-1.0], 2)])
def test_assign_by_cost_rejects(costs: list[float], world: int) -> None:
    with pytest.raises(ValueError, match="assign_by_cost"):
        assign_by_cost(costs, world)


def test_rank_seed_differs_per_rank_and_is_reproducible() -> None:
    seeds = [rank_seed(11, r) for r in range(8)]
    assert seeds[0] == 11 and len(set(seeds)) == 8
    assert seeds == [rank_seed(11, r) for r in range(8)]
    assert all(0 <= s < 2**63 for s in seeds)


def test_distributed_error_is_a_runtime_error() -> None:
    assert issubclass(DistributedError, RuntimeError)


# -- one process in a group: distributed=True is the plain result ------------------------
@pytest.fixture
def group_of_one() -> Any:
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.mark.parametrize(
    "representation", [PMatDense, PMatKFAC, PMatLowRank, PMatQuasiDiag, FMatDense]
)
@pytest.mark.parametrize("fisher_type", ["exact", "mc"])
def test_world_of_one_is_the_plain_result(
    group_of_one: Any, representation: type, fisher_type: str
) -> None:
    case = make_case("mlp", "classif_logits")
    before = model_state(case.model)
    got = FIM(
        case.model,
        case.loader,
        representation,
        fisher_type=fisher_type,
        distributed=True,
    )
    assert_same_state(before, model_state(case.model))
    want = FIM(case.model, case.loader, representation, fisher_type=fisher_type)
    if representation is FMatDense:
        torch.testing.assert_close(got.data, want.data, rtol=1e-12, atol=1e-14)
    else:
        torch.testing.assert_close(got.dense(), want.dense(), rtol=1e-12, atol=1e-14)


def test_reduction_order_does_not_depend_on_key_order() -> None:
    """Ranks may build a result's dicts in different orders; leaves pair by key."""
    from nnfim.distributed.generator import _leaves, _rebuild

    a, b = torch.tensor([1.0]), torch.tensor([2.0])
    one = {"x": (a, {"p": b, "q": a}), "y": b}
    other = {"y": b, "x": (a, {"q": a, "p": b})}
    assert [t.item() for t in _leaves(one)] == [t.item() for t in _leaves(other)]
    rebuilt = _rebuild(other, iter(_leaves(other)))
    assert list(rebuilt) == ["y", "x"] and list(rebuilt["x"][1]) == ["q", "p"]
    assert rebuilt["y"] is b and rebuilt["x"][1]["p"] is b
