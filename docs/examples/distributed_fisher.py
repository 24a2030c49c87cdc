"""A Fisher matrix over data sharded across processes, equal to one process's.

Run it as ``python docs/examples/distributed_fisher.py [--quick] [--out DIR]``:
it starts 2 gloo processes on loopback itself. Under torchrun it uses the
processes torchrun started::

    torchrun --nproc-per-node 2 docs/examples/distributed_fisher.py --quick

Every rank builds the same MLP, reads its shard of a synthetic data set
through a ``DistributedSampler``, and calls ``nnfim.FIM(..., distributed=True)``.
Rank 0 then checks each matrix against one process on the whole data set and
writes ``DIR/distributed_fisher.json``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch
from _common import launch, parse_args
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import nnfim


def setup(quick: bool) -> tuple[nn.Module, TensorDataset]:
    """The same model and data set on every rank (same seed)."""
    torch.manual_seed(0)
    width, n = (32, 256) if quick else (128, 2048)
    model = nn.Sequential(nn.Linear(20, width), nn.Tanh(), nn.Linear(width, 5))
    x = torch.randn(n, 20)
    y = torch.randint(0, 5, (n,))
    return model, TensorDataset(x, y)


def build(model: nn.Module, loader: Any, distributed: bool) -> dict[str, Any]:
    """The matrices compared, as plain tensors."""
    v = nnfim.PVector.from_model(model).detach()
    kfac = nnfim.FIM(model, loader, nnfim.PMatKFAC, distributed=distributed)
    implicit = nnfim.FIM(model, loader, nnfim.PMatImplicit, distributed=distributed)
    return {
        "PMatDiag": nnfim.FIM(
            model, loader, nnfim.PMatDiag, distributed=distributed
        ).diag(),
        "PMatKFAC": kfac.dense(),
        "PMatEKFAC": nnfim.FIM(model, loader, nnfim.PMatEKFAC, distributed=distributed)
        .update_diag()
        .dense(),
        "PMatImplicit.mv": implicit.mv(v).flatten(),
        "PMatImplicit.solve (CG)": implicit.solve(v, regul=1e-2).flatten(),
    }


def run(rank: int, world: int, quick: bool, out: Path) -> None:
    """What every rank does once the process group is up."""
    model, data = setup(quick)
    # shuffle=False keeps the union in data set order; the data set size is a
    # multiple of the world size, so DistributedSampler pads nothing
    sampler = DistributedSampler(data, num_replicas=world, rank=rank, shuffle=False)
    loader = DataLoader(data, batch_size=64, sampler=sampler)
    start = time.perf_counter()
    mine = build(model, loader, distributed=True)
    seconds = time.perf_counter() - start
    if rank != 0:
        return
    whole = build(model, DataLoader(data, batch_size=64), distributed=False)
    report = {
        "world_size": world,
        "examples": len(data),
        "seconds_distributed": seconds,
        "relative_error": {
            k: float((mine[k] - whole[k]).norm() / whole[k].norm()) for k in mine
        },
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "distributed_fisher.json").write_text(json.dumps(report, indent=2) + "\n")
    for name, err in report["relative_error"].items():
        print(f"{name:<26} relative error vs one process: {err:.1e}")
        assert err < 1e-5, name
    print(f"wrote {out / 'distributed_fisher.json'}")


def main() -> None:
    args = parse_args("distributed_fisher", __doc__)
    launch(run, args.quick, args.out)


if __name__ == "__main__":
    main()
