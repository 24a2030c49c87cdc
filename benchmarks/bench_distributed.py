"""Data-parallel Fisher: one process on all the data against two gloo processes.

Run ``python -m benchmarks.bench_distributed`` (``--quick`` for one timed run,
``--help`` for the options). The MLP workload of ``bench_core`` (784-256-256-10,
2,048 examples in batches of 256, float32). Every process uses one thread: the
single process has all 2,048 examples, each of the two ranks half of them with
``distributed=True`` (the result is the same matrix). Per representation the
script prints the median wall time of each, the speed-up, the CPU-time ratio
(one process's CPU time over the busier rank's: an estimate of the speed-up on
two otherwise idle cores, which load from elsewhere does not distort), and the
bytes each rank handed to collectives (all-reduce buffers, all-gather outputs,
broadcast buffers) during one build.
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import nnfim
from benchmarks._common import finish, markdown

SIZES = (784, 256, 256, 10)
N_EXAMPLES = 2048
BATCH_SIZE = 256
#: the NTK Gram is (C n)^2: on a subset
NTK_EXAMPLES = 256
WORLD = 2
RESULTS = Path(__file__).resolve().parent / "results" / "distributed.json"


def make_workload(rank: int, world: int) -> tuple[nn.Module, list[Any]]:
    """The model (same on every rank) and this rank's contiguous shard."""
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for fan_in, fan_out in zip(SIZES[:-1], SIZES[1:], strict=True):
        layers += [nn.Linear(fan_in, fan_out), nn.ReLU()]
    model = nn.Sequential(*layers[:-1])
    x = torch.randn(N_EXAMPLES, SIZES[0])
    y = torch.randint(0, SIZES[-1], (N_EXAMPLES,))
    per = N_EXAMPLES // world
    xs, ys = x[rank * per : (rank + 1) * per], y[rank * per : (rank + 1) * per]
    return model, list(zip(xs.split(BATCH_SIZE), ys.split(BATCH_SIZE), strict=True))


def cases(
    model: nn.Module, loader: list[Any], world: int, kw: dict[str, Any]
) -> dict[str, Any]:
    """name -> thunk building (and using) one representation."""
    v = nnfim.PVector.from_model(model).detach()
    implicit = nnfim.FIM(model, loader, nnfim.PMatImplicit, **kw)
    x, y = loader[0]
    small = [(x[: NTK_EXAMPLES // world], y[: NTK_EXAMPLES // world])]
    return {
        "PMatDiag": lambda: nnfim.FIM(model, loader, nnfim.PMatDiag, **kw),
        "PMatDiag (MC, 1 sample)": lambda: nnfim.FIM_MonteCarlo(
            model, loader, nnfim.PMatDiag, **kw
        ),
        "PMatKFAC": lambda: nnfim.FIM(model, loader, nnfim.PMatKFAC, **kw),
        "PMatEKFAC + update_diag": lambda: nnfim.FIM(
            model, loader, nnfim.PMatEKFAC, **kw
        ).update_diag(),
        "PMatImplicit.mv": lambda: implicit.mv(v),
        f"NTK ({NTK_EXAMPLES} examples)": lambda: nnfim.NTK(model, small, **kw),
    }


class Counter:
    """Bytes handed to torch.distributed collectives, by wrapping them."""

    def __init__(self) -> None:
        self.bytes = 0
        self.calls = 0
        self._orig: dict[str, Callable[..., Any]] = {}

    def install(self) -> None:
        def size(t: torch.Tensor) -> int:
            return t.numel() * t.element_size()

        def wrap(name: str, measure: Callable[..., int]) -> None:
            orig = getattr(dist, name)
            self._orig[name] = orig

            def counted(*args: Any, **kwargs: Any) -> Any:
                self.bytes += measure(*args)
                self.calls += 1
                return orig(*args, **kwargs)

            setattr(dist, name, counted)

        wrap("all_reduce", lambda t, *a: size(t))
        wrap("broadcast", lambda t, *a: size(t))
        wrap("all_gather", lambda out, t, *a: sum(size(o) for o in out))


def time_cases(
    model: nn.Module, loader: list[Any], world: int, repeats: int
) -> dict[str, dict[str, float]]:
    distributed = world > 1
    kw = {"distributed": True} if distributed else {}
    counter = Counter()
    if distributed:
        counter.install()
    out: dict[str, dict[str, float]] = {}
    for name, run in cases(model, loader, world, kw).items():
        run()  # warm-up, and the communication of one build
        bytes_, calls = counter.bytes, counter.calls
        counter.bytes = counter.calls = 0
        times, cpu = [], []
        for _ in range(repeats):
            if distributed:
                dist.barrier()
            start, start_cpu = time.perf_counter(), time.process_time()
            run()
            cpu.append(time.process_time() - start_cpu)
            if distributed:
                dist.barrier()
            times.append(time.perf_counter() - start)
        counter.bytes = counter.calls = 0
        out[name] = {
            "median_s": statistics.median(times),
            "cpu_s": statistics.median(cpu),
            "bytes": float(bytes_),
            "collectives": float(calls),
        }
    return out


def _rank(rank: int, world: int, init: str, out: str, repeats: int) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=init,
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=300),
    )
    model, loader = make_workload(rank, world)
    res = time_cases(model, loader, world, repeats)
    torch.save(res, os.path.join(out, f"rank{rank}.pt"))
    dist.destroy_process_group()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="one timed run")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    repeats = 1 if args.quick else args.repeats
    info: dict[str, Any] = {
        "loadavg_start": os.getloadavg(),
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "repeats": repeats,
    }
    torch.set_num_threads(1)
    model, loader = make_workload(0, 1)
    single = time_cases(model, loader, 1, repeats)
    with tempfile.TemporaryDirectory() as tmp:
        ctx = mp.get_context("spawn")
        init = f"file://{tmp}/store"
        procs = [
            ctx.Process(target=_rank, args=(r, WORLD, init, tmp, repeats))
            for r in range(WORLD)
        ]
        for p in procs:
            p.start()
        for p in procs:
            p.join()
        if any(p.exitcode != 0 for p in procs):
            raise SystemExit(f"a rank failed: exit codes {[p.exitcode for p in procs]}")
        ranks = [
            torch.load(Path(tmp) / f"rank{r}.pt", weights_only=True)
            for r in range(WORLD)
        ]
    lines, result = [], {}
    for name, one in single.items():
        two = max(r[name]["median_s"] for r in ranks)
        sent = max(r[name]["bytes"] for r in ranks)
        cpu = max(r[name]["cpu_s"] for r in ranks)
        calls = int(max(r[name]["collectives"] for r in ranks))
        result[name] = {
            "one_s": one["median_s"],
            "two_s": two,
            "one_cpu_s": one["cpu_s"],
            "two_cpu_s": cpu,
            "bytes": sent,
        }
        lines.append(
            [
                name,
                f"{one['median_s']:.3f}",
                f"{two:.3f}",
                f"{one['median_s'] / two:.2f} x",
                f"{one['cpu_s'] / cpu:.2f} x",
                f"{sent / 2**20:.3f} MiB",
                str(calls),
            ]
        )
    print(
        markdown(
            [
                "representation",
                "1 process (s)",
                f"{WORLD} processes (s)",
                "speed-up",
                "CPU-time ratio",
                "bytes per rank",
                "collectives",
            ],
            lines,
        )
    )
    info["loadavg_end"] = os.getloadavg()
    finish(info, {"cases": result}, args.out, threads=WORLD)


if __name__ == "__main__":
    main()
