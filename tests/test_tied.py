"""Tied weights and reused modules through the layer rules, against torch.func."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_same_state, model_state
from test_fisher import check_against
from test_layers import Encoder
from torch import nn

import nnfim.generator.shared as shared
from nnfim import (
    FIM,
    NTK,
    PMatBlockDiag,
    PMatDense,
    PMatDiag,
    PMatImplicit,
    PMatLowRank,
    PMatQuasiDiag,
)
from nnfim.generator.fallback import FallbackRule
from nnfim.generator.jacobian import Generator
from nnfim.generator.shared import SharedRule
from nnfim.jacobian import per_example_grads
from nnfim.testing import (
    reference_empirical_fisher,
    reference_fisher,
    reference_jacobian,
)

D = 4


class Reused(nn.Module):
    """``f(x) = lin(relu(lin(x)))`` with one square ``lin``, then a head."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(D, D)
        self.head = nn.Linear(D, 3)

    def forward(self, x):
        return self.head(self.lin(torch.relu(self.lin(x))))


class ReusedShapes(nn.Module):
    """One Linear on ``(n, D)`` and on a sequence ``(n, T, D)``: general cross terms."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(D, D)
        self.head = nn.Linear(D, 3)

    def forward(self, x):
        seq = torch.tanh(self.lin(x))[:, None, :] * torch.arange(1.0, 4.0)[:, None]
        return self.head(self.lin(seq).mean(1))


class SharedLinear(nn.Module):
    """Two Linear layers holding one weight, each with its own bias."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(D, D)
        self.b = nn.Linear(D, D)
        self.b.weight = self.a.weight
        self.head = nn.Linear(D, 3, bias=False)

    def forward(self, x):
        return self.head(torch.tanh(self.b(torch.tanh(self.a(x)))))


class TwoEmbeddings(nn.Module):
    """Encoder and decoder embeddings sharing one table, a head on every position."""

    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Embedding(6, D, padding_idx=1)
        self.dec = nn.Embedding(6, D)
        self.dec.weight = self.enc.weight
        self.head = nn.Linear(D, 6)
        self.head.weight = self.enc.weight

    def forward(self, ids):
        h = torch.tanh(self.enc(ids) + self.dec(ids.flip(1)))
        return self.head(h).mean(1)


def _tokens(n: int, t: int, vocab: int) -> torch.Tensor:
    # repeated tokens in one example on purpose: their gradients add up
    ids = torch.randint(0, vocab, (n, t))
    ids[:, -1] = ids[:, 0]
    return ids


def _case(name: str):
    torch.manual_seed(0)
    if name == "encoder":
        model, vocab, t = Encoder().eval(), 11, 5
    elif name == "two_embeddings":
        model, vocab, t = TwoEmbeddings(), 6, 4
    else:
        model = {"reused": Reused, "reused_shapes": ReusedShapes}.get(
            name, SharedLinear
        )()
        xs = [torch.randn(4, D), torch.randn(3, D)]
        return model, [(x, torch.randint(0, 3, (len(x),))) for x in xs]
    ids = [_tokens(4, t, vocab), _tokens(3, t, vocab)]
    return model, [(x, torch.randint(0, vocab, (len(x),))) for x in ids]


#: model -> layers that sum several uses through the rules
SHARED = {
    "encoder": {"tok"},
    "reused": {"lin"},
    "reused_shapes": {"lin"},
    "shared_linear": {"a"},
    "two_embeddings": {"enc"},
}
_REFS: dict[tuple[str, str], torch.Tensor] = {}


def _reference(name: str, fisher_type: str) -> torch.Tensor:
    if (name, fisher_type) not in _REFS:
        model, loader = _case(name)
        ref = reference_fisher if fisher_type == "exact" else reference_empirical_fisher
        _REFS[name, fisher_type] = ref(model, loader)
    return _REFS[name, fisher_type]


@pytest.mark.parametrize("name", list(SHARED))
def test_no_fallback_for_shared_uses(name) -> None:
    model, loader = _case(name)
    rules = Generator(model, loader, strict=name != "encoder").rules()
    shared_layers = {n for n, r in rules.items() if isinstance(r, SharedRule)}
    assert shared_layers == SHARED[name]
    fallback = {n for n, r in rules.items() if isinstance(r, FallbackRule)}
    # only the encoder's positional embedding, broadcast over the batch
    assert fallback == ({"pos"} if name == "encoder" else set())


@pytest.mark.parametrize("fisher_type", ["exact", "empirical"])
@pytest.mark.parametrize(
    "representation",
    [PMatDiag, PMatDense, PMatBlockDiag, PMatLowRank, PMatQuasiDiag, PMatImplicit],
    ids=lambda r: r.__name__,
)
@pytest.mark.parametrize("name", list(SHARED))
def test_representations_are_exact(name, representation, fisher_type) -> None:
    model, loader = _case(name)
    before = model_state(model)
    fim = FIM(model, loader, representation, fisher_type=fisher_type)
    assert_same_state(before, model_state(model))
    check_against(fim, _reference(name, fisher_type))


@pytest.mark.parametrize("name", list(SHARED))
def test_per_example_grads_and_ntk(name) -> None:
    model, loader = _case(name)
    jac, out = reference_jacobian(model, loader)
    labels = torch.cat([y for _, y in loader])
    g_out = torch.softmax(out, -1) - torch.nn.functional.one_hot(labels, out.shape[1])
    expected = torch.einsum("nci,nc->ni", jac, g_out)
    torch.testing.assert_close(per_example_grads(model, loader), expected)
    ntk = NTK(model, loader)
    torch.testing.assert_close(ntk.data, torch.einsum("nci,mdi->cndm", jac, jac))


@pytest.mark.parametrize("name", ["reused_shapes", "two_embeddings"])
def test_small_chunks(name, monkeypatch) -> None:
    """Cross terms and rows in chunks of a few examples and directions."""
    monkeypatch.setattr(shared, "DEFAULT_CHUNK_ELEMENTS", 50)
    model, loader = _case(name)
    ref = _reference(name, "exact")
    torch.testing.assert_close(FIM(model, loader, PMatDiag).diag(), torch.diagonal(ref))
    torch.testing.assert_close(FIM(model, loader, PMatDense).dense(), ref)


def test_no_side_effects_when_a_call_raises() -> None:
    model, loader = _case("shared_linear")
    before = model_state(model)
    with pytest.raises(ValueError, match="n_output=5"):
        FIM(model, loader, PMatDiag, n_output=5)
    assert_same_state(before, model_state(model))


def test_calls_must_match_the_first_batch() -> None:
    class Sometimes(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(D, D)

        def forward(self, x):
            h = self.lin(x)
            return self.lin(h) if len(x) == 4 else h

    loader = [torch.randn(3, D), torch.randn(4, D)]
    with pytest.raises(ValueError, match="called once in the first batch"):
        FIM(Sometimes(), loader, PMatDiag)


def test_shared_module_not_called_falls_back() -> None:
    """A parameter held by a module that is never called: its use is unseen."""

    class Unused(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(D, 3)
            self.b = nn.Linear(D, 3)
            self.b.weight = self.a.weight

        def forward(self, x):
            return self.a(x) + x[:, :3] @ self.b.weight[:, :3].t()

    model, loader = Unused(), [torch.randn(4, D)]
    with pytest.raises(ValueError, match="shared with module 'b'.*not called"):
        FIM(model, loader, PMatDiag, strict=True)
    torch.testing.assert_close(
        FIM(model, loader, PMatDense).dense(), reference_fisher(model, loader)
    )
