"""Data-parallel Fisher matrices over ``torch.distributed`` (see docs/distributed.md)."""

from nnfim.distributed.collectives import (
    DistributedError,
    agree,
    all_reduce_mean,
    all_reduce_sum,
    assign_by_cost,
    broadcast_by_owner,
    distributed_eigh,
    gather_cat,
    rank_seed,
)
from nnfim.distributed.generator import DistributedGenerator, make_generator

__all__ = [
    "DistributedError",
    "DistributedGenerator",
    "agree",
    "all_reduce_mean",
    "all_reduce_sum",
    "assign_by_cost",
    "broadcast_by_owner",
    "distributed_eigh",
    "gather_cat",
    "make_generator",
    "rank_seed",
]
