"""Smoke test of the benchmark suite (``python -m benchmarks``), no peers needed.

Runs the suite's machinery end to end on the NTK group with its reduced data:
fresh child processes, timing, agreement between nnfim and torch.func, the
report and its files; a peer that is not installed is reported, not run.
Nothing here times anything against a target.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # the benchmarks package lives next to nnfim
    sys.path.insert(0, str(ROOT))

from benchmarks import suite, workloads  # noqa: E402
from benchmarks.__main__ import run, select  # noqa: E402
from benchmarks.suite import Case, Timings, summarize, target_of  # noqa: E402


@pytest.fixture
def threads(monkeypatch: pytest.MonkeyPatch) -> object:
    """One thread in the children (as in the tests); keep this process's setting."""
    before = torch.get_num_threads()
    monkeypatch.setenv("NNFIM_BENCH_THREADS", "1")
    monkeypatch.setattr(workloads, "THREADS", 1)
    yield
    torch.set_num_threads(before)


def _absent(case: Case) -> Case:
    return Case(case.group, "absentpeer", case.prepare, needs="no_such_peer_module")


def test_suite_runs_one_group(tmp_path: Path, threads: object) -> None:
    cases = select(["ntk/nnfim", "ntk/torch.func"], quick=True)
    assert [c.lib for c in cases] == ["nnfim", "torch.func"]
    cases.append(_absent(cases[0]))
    rows = run(cases, rounds=1, inner=1, quick=True, out=tmp_path)
    by_lib = {r["lib"]: r for r in rows}
    for lib in ("nnfim", "torch.func"):
        assert by_lib[lib]["error"] is None, by_lib[lib]["error"]
        assert by_lib[lib]["median_s"] > 0
        assert len(by_lib[lib]["runs_s"]) == 1
    # torch.func is a peer: nnfim's row is compared with it and gets the rule
    assert by_lib["nnfim"]["ratio_fastest_peer"] is not None
    assert by_lib["nnfim"]["status"] in ("pass", "FAIL")
    # the two Gram matrices agree (float32): the conventions line up
    assert by_lib["torch.func"]["relative_error"] < 1e-4
    assert by_lib["torch.func"]["agrees"] is True
    absent = by_lib["absentpeer"]
    assert absent["installed"] is False and absent["median_s"] is None
    saved = json.loads((tmp_path / "bench.json").read_text())
    assert saved["meta"]["versions"]["torch"] == torch.__version__
    assert [r["case"] for r in saved["summary"]] == [c.name for c in cases]
    text = (tmp_path / "bench.md").read_text()
    assert "| absentpeer | not installed |" in text
    assert "**ntk**" in text


@pytest.mark.parametrize(
    ("ours", "peer", "floor", "text", "status"),
    [
        (0.4, 1.0, None, "<= 0.5 x fastest peer", "pass"),
        (0.6, 1.0, None, "<= 0.5 x fastest peer", "FAIL"),
        (0.6, 1.0, 0.6, "<= 1.1 x floor", "pass"),  # 0.66 > 0.5: the floor bound
        (0.7, 1.0, 0.6, "<= 1.1 x floor", "FAIL"),
        (0.45, 1.0, 0.3, "<= 0.5 x fastest peer", "pass"),  # 0.33 < 0.5
        (0.1, None, 0.3, None, "-"),  # no peer, no target
    ],
)
def test_target_rule(
    ours: float, peer: float | None, floor: float | None, text: str, status: str
) -> None:
    got = target_of(ours, peer, floor)
    assert got["target"] == text and got["status"] == status


def test_summary_ratios() -> None:
    cases = select(["ntk/*"], quick=True)
    names = [c.name for c in cases]
    seconds = dict(zip(names, ([1.0, 3.0], [2.0], [4.0, 4.0, 5.0], [8.0]), strict=True))
    t = Timings(seconds, {n: [] for n in names}, {}, {})
    rows = {r["lib"]: r for r in summarize(cases, t, {})}
    # medians 2, 2, 4, 8: floor, nnfim, nngeometry, torch.func
    assert rows["nnfim"]["ratio_floor"] == 1.0
    assert rows["nnfim"]["fastest_peer"] == "ntk/nngeometry"
    assert rows["nnfim"]["ratio_fastest_peer"] == 0.5
    assert rows["torch.func"]["ratio_fastest_peer"] == 2.0
    assert rows["nnfim"]["status"] == "pass"  # 2 <= max(0.5 x 4, 1.1 x 2)
    assert rows["floor"]["spread"] == 3.0


def test_round_robin_shares_floors_and_reports_failures(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cases = select(["mlp_diag/floor", "mlp_kfac/floor", "mlp_kfac/nnfim"], quick=True)
    calls: list[str] = []

    def fake_spawn(module: str, case: Case, inner: int, quick: bool, save: Path | None):
        calls.append(case.name)
        if case.lib == "nnfim":
            return {"error": "Traceback ...\nValueError: boom"}
        return {"seconds": [0.1 * len(calls)] * inner, "warmup_s": 0.0, "peak_mib": 1.0}

    monkeypatch.setattr(suite, "spawn", fake_spawn)
    t = suite.time_cases("benchmarks", cases, 2, 3, True, tmp_path, log=lambda s: None)
    # one floor process per round for both groups; the failing case runs once
    assert calls == ["mlp_diag/floor", "mlp_kfac/nnfim", "mlp_diag/floor"]
    assert t.seconds["mlp_kfac/floor"] == t.seconds["mlp_diag/floor"]
    assert len(t.seconds["mlp_diag/floor"]) == 6
    assert t.errors == {"mlp_kfac/nnfim": "Traceback ...\nValueError: boom"}


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_bounds_count_the_floor_as_the_flop_counter_does(
    kind: str, threads: object
) -> None:
    """``bench_bounds``' multiply-adds of the floor (forward, and per output a
    backward to the weights and the inputs past the first layer), with one and
    with two outputs, against PyTorch's count."""
    from torch.utils.flop_counter import FlopCounterMode

    from benchmarks.bench_bounds import mv_multiply_adds

    model = workloads.make_workload(kind, quick=True).model
    x = torch.randn(2, 784) if kind == "mlp" else torch.randn(2, 3, 32, 32)
    params = [p for p in model.parameters() if p.requires_grad]
    one, two, fv = mv_multiply_adds(kind)
    for outputs, floor in ((1, one), (2, two)):
        with FlopCounterMode(display=False) as counter:
            out = model(x)
            for _ in range(outputs):
                torch.autograd.grad(
                    out, params, torch.ones_like(out), retain_graph=True
                )
        assert counter.get_total_flops() == 2 * 2 * floor
    assert one < fv == two


def _small_mlp() -> tuple[torch.nn.Module, list, workloads.Workload, dict]:
    """A float64 MLP (6-5-4-3), three batches of 8, its workload and a vector ``v``."""
    torch.manual_seed(0)
    model = workloads.mlp((6, 5, 4, 3)).double()
    batches = [
        (torch.randn(8, 6, dtype=torch.float64), torch.zeros(8)) for _ in range(3)
    ]
    w = workloads.Workload("mlp", model, batches, 3)
    v = {k: torch.randn_like(p) for k, p in model.named_parameters()}
    return model, batches, w, v


def test_bounds_hand_written_mv_is_nnfims_mv() -> None:
    """The ``F v`` bound computes nnfim's exact Fisher-vector product (float64)."""
    import nnfim
    from benchmarks.bench_bounds import hand_mv

    model, batches, w, v = _small_mlp()
    by_hand = hand_mv(w, v)()
    lc = nnfim.LayerCollection.from_model(model)
    fv = nnfim.FIM(model, batches, nnfim.PMatImplicit).mv(nnfim.PVector(lc, v))
    for got, (name, _) in zip(by_hand, model.named_parameters(), strict=True):
        torch.testing.assert_close(got, fv[name], rtol=1e-10, atol=1e-12)


def test_bounds_hand_written_ekfac_is_nnfims_ekfac() -> None:
    """The EKFAC bound computes what nnfim does: the refit diagonal, then ``F v``
    (float64, three batches, a model small enough that the factors have full rank)."""
    import nnfim
    from benchmarks.bench_bounds import hand_ekfac

    model, batches, w, v = _small_mlp()
    by_hand = hand_ekfac(w, v)()
    fim = nnfim.FIM(model, batches, nnfim.PMatEKFAC, ekfac_refit=True)
    fv = fim.mv(nnfim.PVector(nnfim.LayerCollection.from_model(model), v))
    for i, k in enumerate(["0", "2", "4"]):
        ref = torch.cat([fv[f"{k}.weight"], fv[f"{k}.bias"][:, None]], 1)
        torch.testing.assert_close(by_hand[i], ref, rtol=1e-9, atol=1e-12)
    # and the refit is not the K-FAC diagonal: the check would see a wrong basis
    kfac = nnfim.FIM(model, batches, nnfim.PMatKFAC)
    kv = kfac.mv(nnfim.PVector(nnfim.LayerCollection.from_model(model), v))
    assert not torch.allclose(kv["0.weight"], fv["0.weight"], rtol=1e-3)


def test_memory_table_applies_both_rules() -> None:
    """``bench_memory``: each setting's time and peak against the floor and peers."""
    from benchmarks import bench_memory

    names = [c.name for c in bench_memory.CASES if c.group.name == "mlp_mc_diag"]
    assert "mlp_mc_diag/nnfim" in names and "mlp_mc_diag/nnfim sub_batch=None" in names
    # nnfim rows take the suite's case names, the peers their suite cases
    assert all(bench_memory.CASE_BY_NAME[n].group.name == "mlp_mc_diag" for n in names)
    seconds = {
        "mlp_mc_diag/floor": [0.010],
        "mlp_mc_diag/nngeometry": [0.020],  # fastest peer; target 1.1 x floor
        "mlp_mc_diag/backpack": [0.030],
        "mlp_mc_diag/nnfim": [0.0104],
        "mlp_mc_diag/nnfim sub_batch=None": [0.0120],
    }
    peaks = {
        "mlp_mc_diag/nngeometry": [9.0],
        "mlp_mc_diag/backpack": [6.0],  # the least memory
        "mlp_mc_diag/nnfim": [30.0],
        "mlp_mc_diag/nnfim sub_batch=None": [6.0],
    }
    text = bench_memory.table(
        seconds, peaks, {"mlp_mc_diag/nnfim sub_batch=None": 1e-7}
    )
    rows = {line.split(" | ")[1]: line for line in text.splitlines()[2:]}
    assert rows["nnfim"].endswith("| 1.04 | 0.52 | 30 | 5.00 | pass | FAIL | - |")
    assert rows["nnfim sub_batch=None"].endswith(
        "| 1.20 | 0.60 | 6 | 1.00 | FAIL | pass | 1.0e-07 |"
    )
    assert rows["floor"].startswith("| **mlp_mc_diag** |")
    assert "sub_batch=64" not in text  # cases without timings are left out
