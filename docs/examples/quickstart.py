"""Quickstart: one Fisher in several representations, an EWC penalty, a solve.

Run: ``python docs/examples/quickstart.py [--quick] [--out DIR]``.
"""

from __future__ import annotations

import torch
from _common import parse_args
from torch import nn

from nnfim import FIM, PMatDense, PMatDiag, PMatKFAC, PVector

args = parse_args("quickstart", __doc__)
torch.manual_seed(0)
n = 256 if args.quick else 2048

# -- the ten lines ------------------------------------------------------------
model = nn.Sequential(nn.Linear(20, 32), nn.Tanh(), nn.Linear(32, 5))
x, y = torch.randn(n, 20), torch.randint(0, 5, (n,))
loader = torch.utils.data.DataLoader(
    torch.utils.data.TensorDataset(x, y), batch_size=64
)

F_diag = FIM(model, loader, representation=PMatDiag)  # P numbers
F_kfac = FIM(model, loader, representation=PMatKFAC)  # two small factors per layer
F_dense = FIM(model, loader, representation=PMatDense)  # P x P, exact

w_anchor = PVector.from_model(model).detach().clone()  # EWC anchor
with torch.no_grad():
    model[0].weight.add_(0.01 * torch.randn_like(model[0].weight))  # "training" moves w
delta = PVector.from_model(model).detach() - w_anchor
print(
    f"EWC penalty  diag {F_diag.vTMv(delta):.3e}  kfac {F_kfac.vTMv(delta):.3e}  "
    f"dense {F_dense.vTMv(delta):.3e}"
)

grad = PVector.from_flat(
    w_anchor.layer_collection, torch.randn(delta.flatten().numel())
)
step = F_kfac.solve(grad, regul=1e-3)  # natural-gradient direction
# -----------------------------------------------------------------------------

exact = F_dense.solve(grad, regul=1e-3)
cos = step.dot(exact) / (step.norm() * exact.norm())
print(f"parameters   {F_dense.layer_collection.numel()}")
print(
    f"trace        diag {F_diag.trace():.4f}  kfac {F_kfac.trace():.4f}  "
    f"dense {F_dense.trace():.4f}"
)
print(f"cosine(K-FAC natural gradient, exact one) = {cos:.3f}")
F_kfac.save(args.out / "fisher_kfac.pt")
print(f"wrote {args.out / 'fisher_kfac.pt'}")
