"""Data-parallel Fisher: each process builds on its shard, one all-reduce merges.

Run: ``python docs/examples/distributed.py [--quick] [--out DIR]``.
Starts two CPU processes (``torch.distributed``, gloo backend, on this machine)
and checks the merged matrices against one process reading all the data.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from _common import parse_args
from torch import nn

from nnfim import FIM, PMatAbstract, PMatDiag, PMatEKFAC, PMatKFAC

WORLD = 2


def make(n: int) -> tuple[nn.Module, list[tuple[torch.Tensor, torch.Tensor]]]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 16), nn.Tanh(), nn.Linear(16, 4))
    x, y = torch.randn(n, 10), torch.randint(0, 4, (n,))
    return model, list(zip(x.split(32), y.split(32), strict=True))


def all_reduce_mean(m: PMatAbstract, n_local: int) -> PMatAbstract:
    """The matrix over the union of the shards, from each rank's mean.

    Exact for structures whose stored tensors are means over examples (dense,
    diagonal, block-diagonal, quasi-diagonal, and K-FAC's factors A and G
    separately, whose Kronecker product is then the K-FAC of all the data).
    """
    total = torch.tensor(float(n_local))
    dist.all_reduce(total)
    sd = m.state_dict()
    for t in sd["tensors"].values():
        t.mul_(n_local / total)
        dist.all_reduce(t)
    return PMatAbstract.from_state_dict(sd)


def worker(rank: int, init: str, n: int, out: str) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=WORLD)
    model, batches = make(n)
    shard = batches[rank::WORLD]  # this rank's batches
    n_local = sum(x.shape[0] for x, _ in shard)
    merged = {
        rep.__name__: all_reduce_mean(FIM(model, shard, representation=rep), n_local)
        for rep in (PMatDiag, PMatKFAC)
    }
    # EKFAC: the merged K-FAC's basis on every rank, refit on the shard, merged.
    ekfac = FIM(model, shard, representation=PMatEKFAC)  # linked to the model
    ekfac.load_state_dict(PMatEKFAC.from_kfac(merged["PMatKFAC"]).state_dict())
    merged["PMatEKFAC"] = all_reduce_mean(ekfac.update_diag(), n_local)
    if rank == 0:
        lines = []
        for name, m in merged.items():
            single = FIM(model, batches, representation=type(m))  # all the data
            if isinstance(single, PMatEKFAC):
                single.update_diag()
            err = float((m.dense() - single.dense()).norm() / single.dense().norm())
            lines.append(
                f"{name:10s} merged from {WORLD} ranks vs one process: {err:.1e}"
            )
            assert err < 1e-5, err
        print("\n".join(lines))
        with open(f"{out}/errors.txt", "w") as f:
            f.write("\n".join(lines) + "\n")
    dist.destroy_process_group()


if __name__ == "__main__":
    args = parse_args("distributed", __doc__)
    n = 256 if args.quick else 4096
    store = (args.out / "rendezvous").resolve()
    store.unlink(missing_ok=True)
    mp.spawn(worker, args=(f"file://{store}", n, str(args.out)), nprocs=WORLD)
