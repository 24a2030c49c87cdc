"""Layer coverage: the small transformer of issue 4, and the fallback's overhead.

``.venv/bin/python -m benchmarks.bench_layers`` prints ratios measured side by
side in one run (float32, 2 threads, round robin, medians):

- the transformer (d_model 64, 2 encoder layers, sequence 32, vocabulary 1,000,
  batches of 32, next-token head tied to the token embedding): Monte-Carlo
  diagonal Fisher (one sample, so ``C = 1``) against one forward and backward,
  and K-FAC without the tied embedding (which has no Kronecker factors and is
  too large for an exact block);
- the fallback: the exact diagonal of an MLP 784-256-256-10 whose middle layer is
  a ``Linear`` (a rule) or the same map as an unregistered module (the
  ``torch.func`` fallback).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

import nnfim
from benchmarks._common import floor_c, markdown

THREADS = 2
ROUNDS = 5
V, D, T, LAYERS, N, BATCHES = 1000, 64, 32, 2, 32, 4


class LM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.tok = nn.Embedding(V, D)
        self.pos = nn.Embedding(T, D)
        self.layers = nn.ModuleList(
            [
                nn.TransformerEncoderLayer(
                    D, 4, 128, dropout=0.0, batch_first=True, activation="gelu"
                )
                for _ in range(LAYERS)
            ]
        )
        self.head = nn.Linear(D, V)
        self.head.weight = self.tok.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.tok(ids) + self.pos(torch.arange(ids.shape[1], device=ids.device))
        for layer in self.layers:
            h = layer(h)
        return self.head(h[:, -1])


class Unregistered(nn.Module):
    """``nn.Linear``'s map without being an ``nn.Linear``: no rule, so the fallback."""

    def __init__(self, d_in: int, d_out: int) -> None:
        super().__init__()
        ref = nn.Linear(d_in, d_out)
        self.weight = nn.Parameter(ref.weight.detach().clone())
        self.bias = nn.Parameter(ref.bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


def fwd_bwd(model: nn.Module, loader: list) -> Callable[[], None]:
    params = [p for p in model.parameters() if p.requires_grad]

    def run() -> None:
        for batch in loader:
            x = batch[0] if isinstance(batch, tuple) else batch
            out = model(x)
            torch.autograd.grad(out, params, torch.randn_like(out))

    return run


def main() -> int:
    torch.set_num_threads(THREADS)
    torch.manual_seed(0)
    lm = LM().eval()
    tokens = [torch.randint(0, V, (N, T)) for _ in range(BATCHES)]
    without_tied = nnfim.LayerCollection.from_model(lm).subset(
        names=[
            n for n in nnfim.LayerCollection.from_model(lm).layer_names if n != "tok"
        ]
    )
    mlp_rule = nn.Sequential(
        nn.Linear(784, 256),
        nn.ReLU(),
        nn.Linear(256, 256),
        nn.ReLU(),
        nn.Linear(256, 10),
    )
    mlp_fallback = nn.Sequential(
        mlp_rule[0], nn.ReLU(), Unregistered(256, 256), nn.ReLU(), mlp_rule[4]
    )
    with torch.no_grad():
        mlp_fallback[2].weight.copy_(mlp_rule[2].weight)
        mlp_fallback[2].bias.copy_(mlp_rule[2].bias)
    data = [(torch.randn(256, 784), torch.randint(0, 10, (256,))) for _ in range(2)]

    cases: dict[str, Callable[[], object]] = {
        "lm fwd+bwd": fwd_bwd(lm, tokens),
        "lm mc diag": lambda: nnfim.FIM(lm, tokens, nnfim.PMatDiag, fisher_type="mc"),
        "lm mc kfac (no tok)": lambda: nnfim.FIM(
            lm, tokens, nnfim.PMatKFAC, fisher_type="mc", layer_collection=without_tied
        ),
        "mlp floor_C": floor_c(mlp_rule, data, 10),
        "mlp diag, rule": lambda: nnfim.FIM(mlp_rule, data, nnfim.PMatDiag),
        "mlp diag, fallback": lambda: nnfim.FIM(mlp_fallback, data, nnfim.PMatDiag),
    }
    diag_rule = nnfim.FIM(mlp_rule, data, nnfim.PMatDiag).diag()
    diag_fb = nnfim.FIM(mlp_fallback, data, nnfim.PMatDiag).diag()
    agreement = float((diag_rule - diag_fb).norm() / diag_rule.norm())  # no autograd
    seconds: dict[str, list[float]] = {k: [] for k in cases}
    for fn in cases.values():
        fn()
    for _ in range(ROUNDS):
        for name, fn in cases.items():
            start = time.perf_counter()
            fn()
            seconds[name].append(time.perf_counter() - start)
    med = {k: statistics.median(v) for k, v in seconds.items()}
    ratios = {
        "lm mc diag": ("lm fwd+bwd", 3.0),
        "lm mc kfac (no tok)": ("lm fwd+bwd", 3.0),
        "mlp diag, rule": ("mlp floor_C", None),
        "mlp diag, fallback": ("mlp diag, rule", None),
    }
    lines = []
    for name, value in med.items():
        ref, target = ratios.get(name, (None, None))
        ratio = f"{value / med[ref]:.2f} x {ref}" if ref else "-"
        status = (
            "-"
            if target is None
            else ("pass" if value / med[ref] <= target else "FAIL")
        )
        lines.append(
            [
                name,
                f"{value:.4f}",
                ratio,
                "-" if target is None else f"<= {target}",
                status,
            ]
        )
    print(f"torch {torch.__version__}, {THREADS} threads, {ROUNDS} rounds, medians\n")
    print(markdown(["case", "median s", "ratio", "target", "status"], lines))
    print(f"\nfallback vs rule diagonal: relative difference {agreement:.1e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
