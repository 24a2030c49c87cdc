"""Shared fixtures: small float64 models and loaders, built from a seed."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest
import torch
from torch import nn

VARIANTS = [
    "classif_logits",
    "classif_logsoftmax",
    "classif_binary",
    "regression",
    "function",
]
MODELS = ["mlp", "mlp_nobias", "cnn"]
BATCH_SIZES = (6, 4)  # uneven on purpose: normalisation is by the total count

# Tiny tensors: threads only add overhead, and oversubscribe a busy 2-core machine.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _float64_and_seed() -> Any:
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    torch.manual_seed(0)
    yield
    torch.set_default_dtype(old)


@pytest.fixture
def unjoined(monkeypatch: pytest.MonkeyPatch) -> None:
    """The loader's batches as they come: no joining (``CPU_JOIN_BYTES = 0``),
    for tests that count forwards or backwards per batch."""
    from nnfim.generator import jacobian

    monkeypatch.setattr(jacobian, "CPU_JOIN_BYTES", 0)


def make_net(name: str, n_out: int) -> nn.Module:
    if name == "mlp":
        return nn.Sequential(
            nn.Linear(5, 7),
            nn.Tanh(),
            nn.Linear(7, 6),
            nn.ReLU(inplace=True),
            nn.Linear(6, n_out),
        )
    if name == "mlp_nobias":
        return nn.Sequential(
            nn.Linear(5, 7, bias=False), nn.Tanh(), nn.Linear(7, n_out, bias=False)
        )
    if name == "cnn":
        bn = nn.BatchNorm2d(4)
        with torch.no_grad():
            bn.running_mean.normal_()
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.normal_()
            bn.bias.normal_()
        return nn.Sequential(
            nn.Conv2d(2, 4, 3, padding=1),
            bn,
            nn.ReLU(),
            nn.Conv2d(4, 4, 3, stride=2, padding=1, dilation=1, groups=2),
            nn.Tanh(),
            nn.Conv2d(4, 2, 2, dilation=2, bias=False),
            nn.Flatten(),
            nn.Linear(2, n_out),
        ).eval()
    raise ValueError(name)


def input_shape(name: str) -> tuple[int, ...]:
    return (2, 6, 6) if name == "cnn" else (5,)


@dataclass
class Case:
    """A model, its loader, and the model the dense reference differentiates."""

    model: nn.Module
    loader: list[tuple[torch.Tensor, torch.Tensor]]
    variant: str
    reference_model: nn.Module
    function: Any = None


def _function(model: nn.Module, batch: Any) -> torch.Tensor:
    return torch.tanh(model(batch[0]))


def make_case(model_name: str, variant: str, seed: int = 0) -> Case:
    torch.manual_seed(seed)
    n_out = 2 if variant == "classif_binary" else 3
    net = make_net(model_name, n_out)
    model = (
        nn.Sequential(net, nn.LogSoftmax(-1))
        if variant == "classif_logsoftmax"
        else net
    )
    loader = []
    for n in BATCH_SIZES:
        x = torch.randn(n, *input_shape(model_name))
        if variant == "classif_binary":
            y = torch.randint(0, 2, (n, n_out)).double()
        elif variant in ("regression", "function"):
            y = torch.randn(n, n_out)
        else:
            y = torch.randint(0, n_out, (n,))
        loader.append((x, y))
    if variant == "function":
        return Case(model, loader, variant, nn.Sequential(model, nn.Tanh()), _function)
    return Case(model, loader, variant, model)


def model_state(model: nn.Module) -> dict[str, Any]:
    """Everything nnfim promises not to touch."""
    return {
        "params": {k: p.detach().clone() for k, p in model.named_parameters()},
        "buffers": {k: b.clone() for k, b in model.named_buffers()},
        "grads": {
            k: None if p.grad is None else p.grad.clone()
            for k, p in model.named_parameters()
        },
        "requires_grad": {k: p.requires_grad for k, p in model.named_parameters()},
        "training": {k: m.training for k, m in model.named_modules()},
        "hooks": {
            k: (
                len(m._forward_hooks),
                len(m._forward_pre_hooks),
                len(m._backward_hooks),
                len(m._backward_pre_hooks),
            )
            for k, m in model.named_modules()
        },
    }


def assert_same_state(before: dict[str, Any], after: dict[str, Any]) -> None:
    for key in ("requires_grad", "training", "hooks"):
        assert before[key] == after[key], key
    for key in ("params", "buffers"):
        for name, t in before[key].items():
            assert torch.equal(t, after[key][name]), (key, name)
    for name, g in before["grads"].items():
        other = after["grads"][name]
        assert (g is None) == (other is None), name
        if g is not None:
            assert torch.equal(g, other), name
