"""SciPy interop: eigsh and cg on ``F.to_scipy()``, matrix-free or structured.

Run: ``python docs/examples/scipy_interop.py [--quick] [--out DIR]``.
Needs scipy (``pip install scipy``); writes ``spectrum.png`` when matplotlib
is installed.
"""

from __future__ import annotations

import numpy as np
import torch
from _common import parse_args
from scipy.sparse.linalg import LinearOperator, cg, eigsh
from torch import nn

from nnfim import FIM, NTK, PMatDense, PMatImplicit, PMatKFAC

args = parse_args("scipy_interop", __doc__)
torch.manual_seed(0)
n = 128 if args.quick else 2048
k = 6

model = nn.Sequential(nn.Linear(20, 32), nn.Tanh(), nn.Linear(32, 5))
x, y = torch.randn(n, 20), torch.randint(0, 5, (n,))
loader = torch.utils.data.DataLoader(
    torch.utils.data.TensorDataset(x, y), batch_size=128
)

# Matrix-free: every product is one pass over the loader, nothing P x P is stored.
F_implicit = FIM(model, loader, representation=PMatImplicit)
top_implicit = eigsh(F_implicit.to_scipy(), k=k, which="LA", return_eigenvectors=False)
F_kfac = FIM(model, loader, representation=PMatKFAC)
top_kfac = eigsh(F_kfac.to_scipy(), k=k, which="LA", return_eigenvectors=False)
exact = FIM(model, loader, representation=PMatDense).eigvalsh()[-k:].numpy()

print(f"top {k} eigenvalues (P = {F_kfac.layer_collection.numel()})")
print("  dense eigvalsh   ", np.array2string(exact[::-1], precision=4))
print("  eigsh, implicit  ", np.array2string(np.sort(top_implicit)[::-1], precision=4))
print("  eigsh, K-FAC     ", np.array2string(np.sort(top_kfac)[::-1], precision=4))

# Damped solve (F + 1e-3 I) x = g with scipy's CG on the matrix-free operator.
op = F_implicit.to_scipy()
damped = LinearOperator(op.shape, matvec=lambda v: op @ v + 1e-3 * v, dtype=op.dtype)
g = np.random.default_rng(0).standard_normal(op.shape[0]).astype(op.dtype)
sol, info = cg(damped, g, rtol=1e-5, maxiter=200)
resid = np.linalg.norm(damped @ sol - g) / np.linalg.norm(g)
print(f"scipy cg on the implicit Fisher: info={info}, relative residual {resid:.1e}")

# Function space: the NTK Gram matrix (C n x C n) is an operator too.
K = NTK(model, [x[:64]])
top_ntk = eigsh(K.to_scipy(), k=3, which="LA", return_eigenvectors=False)
print("  NTK top 3        ", np.array2string(np.sort(top_ntk)[::-1], precision=3))

try:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
except ImportError:
    print("matplotlib not installed: no plot")
else:
    fig, ax = plt.subplots(figsize=(5, 3.2))
    full = FIM(model, loader, representation=PMatDense).eigvalsh().flip(0).numpy()
    ax.semilogy(np.arange(1, len(full) + 1), np.clip(full, 1e-12, None), label="dense")
    ax.semilogy(
        np.arange(1, k + 1), np.sort(top_kfac)[::-1], "o", label="eigsh on K-FAC"
    )
    ax.semilogy(
        np.arange(1, k + 1), np.sort(top_implicit)[::-1], "x", label="eigsh, implicit"
    )
    ax.set_xlabel("index")
    ax.set_ylabel("eigenvalue")
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out / "spectrum.png", dpi=100)
    print(f"wrote {args.out / 'spectrum.png'}")
