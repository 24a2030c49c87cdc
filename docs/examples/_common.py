"""Shared command line of the documentation examples (not an example itself).

Every ``docs/examples/NAME.py`` runs as ``python docs/examples/NAME.py [--quick]
[--out DIR]``: ``--quick`` is the small setting the tests run (under ~20 s on
2 cores), ``--out`` the folder for outputs (default ``runs/examples/NAME``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

#: ``run(rank, world, quick, out)`` of a distributed example
Run = Callable[[int, int, bool, Path], None]


def parse_args(name: str, doc: str | None) -> argparse.Namespace:
    """``--quick`` and ``--out`` (created), the convention of every example."""
    parser = argparse.ArgumentParser(description=(doc or "").strip().splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small, fast setting")
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("runs/examples") / name,
        help="folder for the outputs (default: runs/examples/%(default)s)",
    )
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    return args


def write_results(out: Path, results: Any) -> bool:
    """Write ``results`` to ``out/results.json``; False (said on stderr) if unwritable."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        print(f"cannot write to {out}: {err}", file=sys.stderr)
        return False
    (out / "results.json").write_text(json.dumps(results, indent=2))
    return True


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the Agg backend, or None without matplotlib."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def launch(run: Run, quick: bool, out: Path, world: int = 2) -> None:
    """Run ``run`` on every rank: torchrun's processes, or ``world`` gloo ones.

    Under ``torchrun`` (``RANK`` set) this process joins its group; otherwise
    ``world`` processes are started on loopback, meeting through a file store.
    """
    if "RANK" in os.environ:
        _joined(dist.get_rank, run, quick, out, None, None)
        return
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(
            _spawned, args=(run, world, f"file://{tmp}/store", quick, out), nprocs=world
        )


def _spawned(
    rank: int, run: Run, world: int, init: str, quick: bool, out: Path
) -> None:
    _joined(lambda: rank, run, quick, out, init, world)


def _joined(
    rank: Callable[[], int],
    run: Run,
    quick: bool,
    out: Path,
    init: str | None,
    world: int | None,
) -> None:
    torch.set_num_threads(1)
    timeout = datetime.timedelta(seconds=60)
    if init is None:  # torchrun's environment says where to meet
        dist.init_process_group("gloo", timeout=timeout)
    else:
        dist.init_process_group(
            "gloo", init_method=init, rank=rank(), world_size=world, timeout=timeout
        )
    try:
        run(dist.get_rank(), dist.get_world_size(), quick, out)
        # Every rank done before any tears its group down: a rank destroying
        # it while another still talks to it can abort the process ("terminate
        # called without an active exception" from gloo's threads).
        dist.barrier()
    finally:
        dist.destroy_process_group()
