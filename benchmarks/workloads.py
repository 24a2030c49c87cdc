"""The benchmark workloads: models and data, the same in every process.

Every workload is built from a seed in the process that times it (float32,
``THREADS`` threads): a model and a list of ``(x, y)`` batches, the loader
every library reads (NNGeometry gets a ``DataLoader`` over the same tensors).
``quick`` shrinks the data, never the model.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

SEED = 0
#: seed of the probe vector ``v`` of every ``mv``
PROBE_SEED = 1
#: torch threads of every timed process; ``--threads`` sets it for the children
#: through the environment
THREADS = int(os.environ.get("NNFIM_BENCH_THREADS", "2"))
N_CLASSES = 10
#: the transformer: vocabulary, width, sequence length, encoder layers
LM_VOCAB, LM_WIDTH, LM_SEQ, LM_LAYERS = 1000, 64, 32, 2

Batches = list[tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class Spec:
    """What a workload is: its model, example count and batch size (full, quick)."""

    description: str
    build: Callable[[], nn.Module]
    inputs: Callable[[int], torch.Tensor]
    n_classes: int
    examples: int
    batch: int
    quick_examples: int
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Workload:
    """A model, its data as a list of ``(x, y)`` batches, and where it came from."""

    kind: str
    model: nn.Module
    batches: Batches
    n_classes: int

    @property
    def n_examples(self) -> int:
        return sum(x.shape[0] for x, _ in self.batches)

    @property
    def params(self) -> list[nn.Parameter]:
        return list(self.model.parameters())


def mlp(sizes: tuple[int, ...]) -> nn.Sequential:
    """``Linear``/``ReLU`` layers with biases, no activation after the last."""
    layers: list[nn.Module] = []
    for fan_in, fan_out in zip(sizes[:-1], sizes[1:], strict=True):
        layers += [nn.Linear(fan_in, fan_out), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


def cnn(pool: nn.Module | None = None) -> nn.Sequential:
    """The CNN; ``pool`` replaces ``AdaptiveAvgPool2d(4)`` (same function needed)."""
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        pool if pool is not None else nn.AdaptiveAvgPool2d(4),
        nn.Flatten(),
        nn.Linear(512, N_CLASSES),
    )


def cnn_avgpool(model: nn.Module) -> nn.Module:
    """The CNN with ``AvgPool2d(8)``: ``AdaptiveAvgPool2d(4)``'s function on 32 x 32.

    For BackPACK, which has no ``AdaptiveAvgPool2d``; same weights.
    """
    other = cnn(nn.AvgPool2d(8))
    other.load_state_dict(model.state_dict())
    return other


class LM(nn.Module):
    """The small transformer of the layer-coverage issue.

    Token and position embeddings, ``LM_LAYERS`` ``TransformerEncoderLayer``s
    (4 heads, GELU, no dropout), a next-token head tied to the token embedding,
    read at the last position: outputs ``(n, LM_VOCAB)``.
    """

    def __init__(self) -> None:
        super().__init__()
        self.tok = nn.Embedding(LM_VOCAB, LM_WIDTH)
        self.pos = nn.Embedding(LM_SEQ, LM_WIDTH)
        self.layers = nn.ModuleList(
            [
                nn.TransformerEncoderLayer(
                    LM_WIDTH,
                    4,
                    2 * LM_WIDTH,
                    dropout=0.0,
                    batch_first=True,
                    activation="gelu",
                )
                for _ in range(LM_LAYERS)
            ]
        )
        self.head = nn.Linear(LM_WIDTH, LM_VOCAB)
        self.head.weight = self.tok.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.tok(ids) + self.pos(torch.arange(ids.shape[1], device=ids.device))
        for layer in self.layers:
            h = layer(h)
        return self.head(h[:, -1])


class Unregistered(nn.Module):
    """``nn.Linear``'s map without being an ``nn.Linear``: nnfim has no rule for it."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight.detach().clone())
        self.bias = nn.Parameter(bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


def mlp_fallback() -> nn.Sequential:
    """The MLP 784-256-256-10 with its middle layer as :class:`Unregistered`.

    Built from the same seed as ``mlp`` (and drawing nothing more): the same
    function, weights and data, so its Fisher equals the MLP's and only nnfim's
    path differs (``torch.func`` fallback for the middle layer).
    """
    model = mlp((784, 256, 256, 10))
    middle = model[2]
    assert isinstance(middle, nn.Linear)
    model[2] = Unregistered(middle.weight, middle.bias)
    return model


def _gaussian(*shape: int) -> Callable[[int], torch.Tensor]:
    return lambda n: torch.randn(n, *shape)


SPECS = {
    "mlp": Spec(
        "MLP 784-256-256-10",
        lambda: mlp((784, 256, 256, 10)),
        _gaussian(784),
        N_CLASSES,
        2048,
        256,
        512,
    ),
    "mlp_fallback": Spec(
        "MLP 784-256-256-10, middle layer unregistered (fallback)",
        mlp_fallback,
        _gaussian(784),
        N_CLASSES,
        2048,
        256,
        512,
    ),
    "small": Spec(
        "MLP 64-32-10 (2,410 parameters)",
        lambda: mlp((64, 32, 10)),
        _gaussian(64),
        N_CLASSES,
        1024,
        256,
        256,
    ),
    "ntk": Spec(
        "MLP 64-32-10",
        lambda: mlp((64, 32, 10)),
        _gaussian(64),
        N_CLASSES,
        256,
        64,
        128,
    ),
    "cnn": Spec(
        "CNN conv 3-16-32 (3x3, pad 1), pool 4, linear 10, 3x32x32 inputs",
        cnn,
        _gaussian(3, 32, 32),
        N_CLASSES,
        1024,
        128,
        256,
    ),
    "lm": Spec(
        f"transformer: vocab {LM_VOCAB}, d {LM_WIDTH}, {LM_LAYERS} layers, "
        f"seq {LM_SEQ}, tied head",
        LM,
        lambda n: torch.randint(0, LM_VOCAB, (n, LM_SEQ)),
        LM_VOCAB,
        128,
        32,
        64,
    ),
}


def describe(kind: str, quick: bool = False) -> str:
    """``SPECS[kind]``'s model and data: ``"MLP ..., 2048 examples / 256"``."""
    spec = SPECS[kind]
    n = spec.quick_examples if quick else spec.examples
    return f"{spec.description}, {n} examples / {spec.batch}"


def make_workload(kind: str, quick: bool = False, seed: int = SEED) -> Workload:
    """Build workload ``kind`` (a key of ``SPECS``) from ``seed``."""
    spec = SPECS[kind]
    torch.set_num_threads(THREADS)
    torch.manual_seed(seed)
    model = spec.build()
    if kind == "lm":
        model.eval()  # no dropout anyway; eval keeps every library on one path
    n = spec.quick_examples if quick else spec.examples
    x = spec.inputs(n)
    y = torch.randint(0, spec.n_classes, (n,))
    batches = list(zip(x.split(spec.batch), y.split(spec.batch), strict=True))
    return Workload(kind, model, batches, spec.n_classes)


def probe(model: nn.Module) -> dict[str, torch.Tensor]:
    """The vector ``v`` of every ``mv``: parameter name -> tensor, seeded."""
    gen = torch.Generator().manual_seed(PROBE_SEED)
    return {k: torch.randn(p.shape, generator=gen) for k, p in model.named_parameters()}


def flat(model: nn.Module, by_name: dict[str, torch.Tensor]) -> torch.Tensor:
    """Concatenate in ``named_parameters`` order: the common layout of results."""
    return torch.cat([by_name[k].reshape(-1) for k, _ in model.named_parameters()])


def named_order(model: nn.Module, names: tuple[str, ...]) -> torch.Tensor:
    """Indices that put a flat layout ordered by ``names`` in ``named_parameters`` order.

    ``out = x[..., idx]`` for ``x`` laid out parameter by parameter as in ``names``.
    """
    shapes = dict(model.named_parameters())
    start, where = 0, {}
    for name in names:
        size = shapes[name].numel()
        where[name] = torch.arange(start, start + size)
        start += size
    return torch.cat([where[k] for k, _ in model.named_parameters()])
