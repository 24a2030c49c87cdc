"""Register a rule for your own layer, and check it against a torch.func reference.

Run: ``python docs/examples/custom_rule.py [--quick] [--out DIR]``.
"""

from __future__ import annotations

import torch
from _common import parse_args
from torch import nn

from nnfim import FIM, LayerRule, PMatDense, PMatDiag, register_rule
from nnfim.testing import reference_fisher

args = parse_args("custom_rule", __doc__)
torch.manual_seed(0)
torch.set_default_dtype(torch.float64)  # exact comparison with the reference


class Scale(nn.Module):
    """``y = x * weight``: an elementwise gain nnfim has no rule for."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(1.0 + 0.1 * torch.randn(d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight


model = nn.Sequential(nn.Linear(8, 16), Scale(16), nn.Tanh(), nn.Linear(16, 3))
n = 64 if args.quick else 512
loader = [(torch.randn(n, 8), torch.randint(0, 3, (n,)))]

# 1. Without a rule: strict=True refuses and says how to extend nnfim ...
try:
    FIM(model, loader, representation=PMatDiag, strict=True)
except ValueError as err:
    print("strict=True without a rule:", str(err).splitlines()[0][:100], "...")

# ... and the default falls back to exact per-example gradients (torch.func).
fallback = FIM(model, loader, representation=PMatDense)


# 2. The rule: one method, per-example gradients from the layer input x and the
#    output gradients gy of the K output directions.
@register_rule(Scale)
class ScaleRule(LayerRule):
    def per_example_grad(self, module, x, gy):
        # x: (n, d), gy: (K, n, d) -> {"weight": (K, n, d)}
        return {"weight": gy * x}


with_rule = FIM(model, loader, representation=PMatDense, strict=True)

# 3. Check against the dense torch.func reference, in float64.
ref = reference_fisher(model, loader)
err_rule = float((with_rule.dense() - ref).norm() / ref.norm())
err_fallback = float((fallback.dense() - ref).norm() / ref.norm())
print(f"relative error with the rule     {err_rule:.1e}")
print(f"relative error with the fallback {err_fallback:.1e}")
assert err_rule < 1e-12 and err_fallback < 1e-12
(args.out / "errors.txt").write_text(
    f"rule {err_rule:.3e}\nfallback {err_fallback:.3e}\n"
)
