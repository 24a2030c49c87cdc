"""PVector, FVector and LayerCollection."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from nnfim import FVector, LayerCollection, PVector


@pytest.fixture
def model() -> nn.Module:
    return nn.Sequential(
        nn.Linear(3, 4), nn.ReLU(), nn.Conv1d(1, 2, 2, bias=False), nn.BatchNorm1d(2)
    )


def test_layer_collection_order_and_numel(model) -> None:
    lc = LayerCollection.from_model(model)
    assert lc.layer_names == ("0", "2", "3")
    assert lc.param_names == ("0.weight", "0.bias", "2.weight", "3.weight", "3.bias")
    assert lc.numel() == sum(p.numel() for p in model.parameters())
    assert lc.layer_slice("2") == slice(16, 20)
    assert [layer.kind for layer in lc] == ["Linear", "Conv1d", "BatchNorm1d"]


def test_layer_collection_subsets(model) -> None:
    lc = LayerCollection.from_model(model)
    assert lc.subset(names=["3", "0"]).layer_names == ("0", "3")
    assert LayerCollection.from_model(
        model, types=[nn.Linear, nn.Conv1d]
    ).layer_names == ("0", "2")
    with pytest.raises(ValueError, match="no layer named \\['9'\\]"):
        lc.subset(names=["9"])
    with pytest.raises(ValueError, match="needs model"):
        lc.subset(types=[nn.Linear])


def test_layer_collection_trainable_only(model) -> None:
    model[0].bias.requires_grad_(False)
    assert "0.bias" not in LayerCollection.from_model(model).param_names
    assert (
        "0.bias" in LayerCollection.from_model(model, trainable_only=False).param_names
    )


def test_layer_collection_state_round_trip(model) -> None:
    lc = LayerCollection.from_model(model)
    assert LayerCollection.from_state(lc.state()) == lc
    with pytest.raises(ValueError, match="malformed"):
        LayerCollection.from_state([["a", "Linear", [["w", ["x"]]]]])


def test_from_model_shares_storage_and_clone_does_not(model) -> None:
    v = PVector.from_model(model)
    assert v["0.weight"] is model[0].weight
    snapshot = v.clone()
    with torch.no_grad():
        model[0].weight.add_(1.0)
    assert not torch.equal(snapshot["0.weight"], model[0].weight)


def test_flatten_unflatten_round_trip(model) -> None:
    v = PVector.from_model(model).detach()
    flat = v.flatten()
    assert flat.shape == (LayerCollection.from_model(model).numel(),)
    back = PVector.from_flat(v.layer_collection, flat)
    for name, t in v.items():
        assert torch.equal(back[name], t)
    assert torch.equal(v.unflatten(2 * flat).flatten(), 2 * flat)


def test_arithmetic_matches_flat_tensors(model) -> None:
    lc = LayerCollection.from_model(model)
    a_flat, b_flat = torch.randn(lc.numel()), torch.randn(lc.numel())
    a, b = PVector.from_flat(lc, a_flat), PVector.from_flat(lc, b_flat)
    torch.testing.assert_close((a + 0.5 * b).flatten(), a_flat + 0.5 * b_flat)
    torch.testing.assert_close((a - b / 4).flatten(), a_flat - b_flat / 4)
    torch.testing.assert_close((a * b).flatten(), a_flat * b_flat)
    torch.testing.assert_close((-a).flatten(), -a_flat)
    torch.testing.assert_close(a.dot(b), a_flat @ b_flat)
    torch.testing.assert_close(a.norm(), torch.linalg.vector_norm(a_flat))
    torch.testing.assert_close(a.norm(1), a_flat.abs().sum())
    with pytest.raises(TypeError):
        a + 1.0


def test_from_model_grad_and_copy_to_model(model) -> None:
    with pytest.raises(ValueError, match="has no .grad.*backward"):
        PVector.from_model_grad(model)
    model(torch.randn(5, 1, 3)).sum().backward()
    g = PVector.from_model_grad(model)
    assert g["0.weight"] is model[0].weight.grad
    w = PVector.from_model(model).detach().clone()
    (w * 0.0).copy_to_model(model)
    assert float(PVector.from_model(model).detach().norm()) == 0.0
    w.copy_to_model(model)
    assert torch.equal(PVector.from_model(model).flatten(), w.flatten())


def test_pvector_rejects_wrong_shapes(model) -> None:
    lc = LayerCollection.from_model(model)
    with pytest.raises(ValueError, match="missing"):
        PVector(lc, {})
    with pytest.raises(ValueError, match="expected a flat tensor"):
        PVector.from_flat(lc, torch.ones(3))


def test_pvector_to(model) -> None:
    v = PVector.from_model(model).detach().to(dtype=torch.float32)
    assert v.dtype == torch.float32 and v.device.type == "cpu"


def test_fvector() -> None:
    a, b = FVector(torch.randn(3, 5)), FVector(torch.randn(3, 5))
    torch.testing.assert_close((a + 2 * b).data, a.data + 2 * b.data)
    torch.testing.assert_close(a.dot(b), (a.data * b.data).sum())
    assert (a.n_output, a.n_examples) == (3, 5)
    assert a.flatten().shape == (15,)
    with pytest.raises(ValueError, match="shapes"):
        a + FVector(torch.randn(2, 5))
    with pytest.raises(ValueError, match="n_output, n_examples"):
        FVector(torch.randn(3))
