"""Built-in small models for 8x8 single-channel images (the digits)."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["MODELS", "build_model"]

MODELS = ("mlp", "cnn", "resnet")


class _Block(nn.Module):
    """Residual block: conv-norm-relu-conv-norm plus the identity."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.norm1 = nn.GroupNorm(2, width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.norm2 = nn.GroupNorm(2, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.norm1(self.conv1(x)))
        return torch.relu(x + self.norm2(self.conv2(h)))


def build_model(name: str, n_classes: int = 10, seed: int = 0) -> nn.Module:
    """A small network for ``(n, 1, 8, 8)`` inputs, initialised from ``seed``.

    ``"mlp"``: 64-32-10 with ReLU (2,410 parameters); ``"cnn"``: two 3x3
    convolutions and a linear head; ``"resnet"``: a stem and two residual
    blocks with GroupNorm (no BatchNorm, so every Fisher is per example),
    global pooling and a linear head.

    Raises:
        ValueError: an unknown name.

    >>> sum(p.numel() for p in build_model("mlp").parameters())
    2410
    """
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}.")
    torch.manual_seed(seed)
    if name == "mlp":
        return nn.Sequential(
            nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, n_classes)
        )
    if name == "cnn":
        return nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(8, 8, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(8 * 4 * 4, n_classes),
        )
    width = 8
    return nn.Sequential(
        nn.Conv2d(1, width, 3, padding=1, bias=False),
        nn.GroupNorm(2, width),
        nn.ReLU(),
        _Block(width),
        _Block(width),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(width, n_classes),
    )
