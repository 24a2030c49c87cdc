"""Every representation of one Fisher: what it stores and how far it is from the exact one.

Run: ``python docs/examples/representations.py [--quick] [--out DIR]``.
Writes ``representations.md`` (the table printed below).
"""

from __future__ import annotations

import torch
from _common import parse_args
from torch import nn

from nnfim import (
    FIM,
    PMatBlockDiag,
    PMatDense,
    PMatDiag,
    PMatEKFAC,
    PMatImplicit,
    PMatKFAC,
    PMatLowRank,
    PMatQuasiDiag,
    PVector,
)

args = parse_args("representations", __doc__)
torch.manual_seed(0)
n = 128 if args.quick else 2048

width = 4 if args.quick else 8  # channels; --quick keeps P small
model = nn.Sequential(
    nn.Conv2d(1, width, 3, padding=1),
    nn.ReLU(),
    nn.AvgPool2d(2),
    nn.Flatten(),
    nn.Linear(width * 4 * 4, 32),
    nn.Tanh(),
    nn.Linear(32, 10),
)
x, y = torch.randn(n, 1, 8, 8), torch.randint(0, 10, (n,))
loader = torch.utils.data.DataLoader(
    torch.utils.data.TensorDataset(x, y), batch_size=128
)

exact = FIM(model, loader, representation=PMatDense)
ref = exact.dense()
lc = exact.layer_collection
v = PVector.from_flat(lc, torch.randn(lc.numel()))
ref_mv = exact.mv(v).flatten()

rows = []
for rep in (
    PMatDense,
    PMatLowRank,
    PMatBlockDiag,
    PMatKFAC,
    PMatEKFAC,
    PMatQuasiDiag,
    PMatDiag,
    PMatImplicit,
):
    F = FIM(model, loader, representation=rep)
    if rep is PMatEKFAC:
        F.update_diag()
    mv = F.mv(v).flatten()
    stored = (
        sum(t.numel() for t in F.state_dict()["tensors"].values()) if F.storable else 0
    )
    err = float((mv - ref_mv).norm() / ref_mv.norm())
    trace_err = abs(float(F.trace() - exact.trace())) / float(exact.trace())
    rows.append(f"| `{rep.__name__}` | {stored:,} | {err:.1e} | {trace_err:.1e} |")

table = "\n".join(
    [
        f"P = {lc.numel():,} parameters, n = {n} examples, float32",
        "",
        "| representation | stored numbers | error of `mv(v)` | error of `trace()` |",
        "|---|---:|---:|---:|",
        *rows,
    ]
)
print(table)
(args.out / "representations.md").write_text(table + "\n")
