"""Training with K-FAC under DistributedDataParallel: the same step on every rank.

Run it as ``python docs/examples/distributed_kfac.py [--quick] [--out DIR]``:
it starts 2 gloo processes on loopback itself. Under torchrun it uses the
processes torchrun started::

    torchrun --nproc-per-node 2 docs/examples/distributed_kfac.py --quick

Every rank builds the same MLP, wraps it in ``DistributedDataParallel``, reads
its shard of a synthetic classification set through a ``DistributedSampler``
and steps ``nnfim.KFAC(ddp_model, ..., distributed=True)``: the factors are
those of the union of the ranks' batches, the eigendecompositions are shared
out between the ranks and broadcast. Rank 0 writes the loss per epoch and
checks that every rank ends with the same parameters, bit for bit, in
``DIR/distributed_kfac.json``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from _common import launch, parse_args
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import nnfim


def setup(quick: bool) -> tuple[nn.Module, TensorDataset]:
    """The same model and data set on every rank (same seed)."""
    torch.manual_seed(0)
    width, n = (32, 512) if quick else (128, 4096)
    teacher = nn.Sequential(nn.Linear(20, 64), nn.Tanh(), nn.Linear(64, 5))
    x = torch.randn(n, 20)
    with torch.no_grad():
        y = teacher(x).argmax(1)
    model = nn.Sequential(nn.Linear(20, width), nn.Tanh(), nn.Linear(width, 5))
    return model, TensorDataset(x, y)


def run(rank: int, world: int, quick: bool, out: Path) -> None:
    """What every rank does once the process group is up."""
    model, data = setup(quick)
    ddp = DistributedDataParallel(model)  # broadcasts rank 0's parameters
    sampler = DistributedSampler(data, num_replicas=world, rank=rank, seed=0)
    loader = DataLoader(data, batch_size=64, sampler=sampler)
    opt = nnfim.KFAC(
        ddp, lr=0.1, damping=1e-2, kl_clip=1e-2, eigen_every=5, distributed=True
    )
    losses = []
    start = time.perf_counter()
    for epoch in range(3 if quick else 10):
        sampler.set_epoch(epoch)
        total = torch.zeros(2)
        for x, y in loader:
            opt.zero_grad()
            loss = F.cross_entropy(ddp(x), y)
            loss.backward()  # DDP averages the gradients over the ranks
            opt.step(batch=(x, y))  # curvature of the union of the ranks' batches
            total += torch.tensor([loss.item() * len(y), len(y)])
        dist.all_reduce(total)
        losses.append(float(total[0] / total[1]))
    seconds = time.perf_counter() - start
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    every = [torch.empty_like(flat) for _ in range(world)]
    dist.all_gather(every, flat)
    identical = all(torch.equal(f, every[0]) for f in every)
    if rank != 0:
        return
    report = {
        "world_size": world,
        "examples": len(data),
        "loss_per_epoch": losses,
        "seconds": seconds,
        "parameters_identical_on_every_rank": identical,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "distributed_kfac.json").write_text(json.dumps(report, indent=2) + "\n")
    for epoch, loss in enumerate(losses):
        print(f"epoch {epoch}: mean training loss {loss:.4f}")
    print(f"parameters identical on every rank: {identical}")
    assert identical and losses[-1] < losses[0]
    print(f"wrote {out / 'distributed_kfac.json'}")


def main() -> None:
    args = parse_args("distributed_kfac", __doc__)
    launch(run, args.quick, args.out)


if __name__ == "__main__":
    main()
