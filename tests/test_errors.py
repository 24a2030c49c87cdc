"""Bad input gets a clear error, and the model is left exactly as it was."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_same_state, make_case, model_state
from torch import nn

from nnfim import (
    FIM,
    FIM_MonteCarlo,
    LayerCollection,
    LayerRule,
    PMatBlockDiag,
    PMatDense,
    PMatDiag,
    PMatImplicit,
    PVector,
    load,
    register_rule,
)
from nnfim.testing import reference_fisher

REPRESENTATIONS = [PMatDense, PMatDiag, PMatBlockDiag, PMatImplicit]


class Custom(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(3))

    def forward(self, x):
        return x * self.scale


def _use(fim) -> None:
    """Force the lazy representations to run their passes."""
    v = PVector.from_flat(
        fim.layer_collection, torch.ones(fim.layer_collection.numel())
    )
    fim.mv(v)
    fim.diag()


def test_unsupported_layer_lists_supported_types_and_ways_out() -> None:
    model = nn.Sequential(nn.Linear(4, 3), Custom())
    loader = [(torch.randn(5, 4), torch.randint(0, 3, (5,)))]
    with pytest.raises(ValueError) as info:
        FIM(model, loader, PMatDiag, strict=True)
    message = str(info.value)
    for needle in (
        "strict",
        "'1'",
        "Custom",
        "Linear",
        "Conv2d",
        "register_rule",
        "layer_collection=",
    ):
        assert needle in message


def test_unsupported_layer_works_with_implicit_and_with_a_subset() -> None:
    model = nn.Sequential(nn.Linear(4, 3), Custom())
    loader = [(torch.randn(5, 4), torch.randint(0, 3, (5,)))]
    ref = reference_fisher(model, loader)
    fim = FIM(model, loader, PMatImplicit)
    v = torch.randn(ref.shape[0])
    torch.testing.assert_close(
        fim.mv(PVector.from_flat(fim.layer_collection, v)).flatten(), ref @ v
    )
    lc = LayerCollection.from_model(model, names=["0"])
    sub = FIM(model, loader, PMatDense, layer_collection=lc)
    torch.testing.assert_close(sub.dense(), ref[:15, :15])


def test_user_rule_through_register_rule() -> None:
    class Scale(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.randn(3))

        def forward(self, x):
            return x * self.weight

    @register_rule(Scale)
    class ScaleRule(LayerRule):
        def per_example_grad(self, module, x, gy):
            return {"weight": gy * x}

    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), Scale())
    loader = [(torch.randn(6, 4), torch.randint(0, 3, (6,)))]
    torch.testing.assert_close(
        FIM(model, loader, PMatDense).dense(), reference_fisher(model, loader)
    )


def test_wrong_n_output() -> None:
    case = make_case("mlp", "classif_logits")
    with pytest.raises(ValueError, match="3 outputs but n_output=4"):
        FIM(case.model, case.loader, PMatDiag, n_output=4)


def test_bad_output_shape() -> None:
    model = nn.Linear(4, 3)
    with pytest.raises(ValueError, match="logits of shape"):
        FIM(
            nn.Sequential(model, nn.Unflatten(1, (3, 1))), [torch.randn(2, 4)], PMatDiag
        )


@pytest.mark.parametrize("representation", REPRESENTATIONS, ids=lambda r: r.__name__)
def test_empty_loader(representation) -> None:
    with pytest.raises(ValueError, match="no batches"):
        _use(FIM(nn.Linear(4, 3), [], representation))


def test_nan_outputs_name_the_batch() -> None:
    model = nn.Linear(4, 3)
    x = torch.randn(3, 4)
    bad = x.clone()
    bad[1, 2] = float("nan")
    with pytest.raises(ValueError, match="batch 1: .*NaN"):
        FIM(model, [x, bad], PMatDiag)


def test_labels_missing_for_empirical_fisher() -> None:
    with pytest.raises(ValueError, match="batch 0: the empirical Fisher needs labels"):
        FIM(nn.Linear(4, 3), [torch.randn(3, 4)], PMatDiag, fisher_type="empirical")


def test_bad_labels() -> None:
    loader = [(torch.randn(3, 4), torch.tensor([0, 1, 5]))]
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\)"):
        FIM(nn.Linear(4, 3), loader, PMatDiag, fisher_type="empirical")


def test_logsoftmax_variant_rejects_logits() -> None:
    with pytest.raises(ValueError, match="log-probabilities"):
        FIM(
            nn.Linear(4, 3),
            [torch.randn(3, 4) * 5],
            PMatDiag,
            variant="classif_logsoftmax",
        )


def test_unknown_names() -> None:
    model, loader = nn.Linear(4, 3), [torch.randn(3, 4)]
    with pytest.raises(ValueError, match="unknown variant 'foo'.*classif_logits"):
        FIM(model, loader, PMatDiag, variant="foo")
    with pytest.raises(ValueError, match="unknown fisher_type"):
        FIM(model, loader, PMatDiag, fisher_type="bar")
    with pytest.raises(ValueError, match="unknown representation"):
        FIM(model, loader, dict)
    with pytest.raises(ValueError, match="mc_samples"):
        FIM_MonteCarlo(model, loader, PMatDiag, trials=0)
    with pytest.raises(ValueError, match="variant='function' needs function"):
        FIM(model, loader, PMatDiag, variant="function")


def test_dtype_mix() -> None:
    with pytest.raises(
        ValueError,
        match="inputs are torch.float32 but the model's parameters are torch.float64",
    ):
        FIM(nn.Linear(4, 3), [torch.randn(3, 4, dtype=torch.float32)], PMatDiag)


class Twice(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 3)

    def forward(self, x):
        return self.lin(torch.tanh(self.lin(x)))


class Functional(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 3)
        self.out = nn.Linear(3, 3)

    def forward(self, x):
        return self.out(
            torch.nn.functional.linear(x, self.lin.weight, self.lin.bias).tanh()
        )


def _tied() -> nn.Module:
    a, b = nn.Linear(3, 3), nn.Linear(3, 3)
    b.weight = a.weight
    return nn.Sequential(a, nn.Tanh(), b)


class TiedToUnregistered(nn.Module):
    """A Linear whose weight is also held by a module type without a rule."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 3)
        self.other = Unregistered(3)
        self.other.weight = self.lin.weight

    def forward(self, x):
        return self.other(torch.tanh(self.lin(x)))


class Unregistered(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(d, d))

    def forward(self, x):
        return x @ self.weight.t()


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (Functional, "not called as a module"),
        (TiedToUnregistered, "shared with module 'other' of type Unregistered"),
    ],
    ids=["functional", "tied_to_unregistered"],
)
def test_strict_refuses_what_would_fall_back(make, message) -> None:
    with pytest.raises(ValueError, match=message):
        FIM(make(), [torch.randn(2, 3)], PMatDiag, strict=True)


@pytest.mark.parametrize(
    "representation", [PMatDense, PMatDiag, PMatBlockDiag], ids=lambda r: r.__name__
)
@pytest.mark.parametrize(
    "make",
    [Twice, Functional, _tied, TiedToUnregistered],
    ids=["reused", "functional", "tied", "tied_to_unregistered"],
)
def test_fallback_is_exact_for_reuse_functional_and_tied(make, representation) -> None:
    model = make()
    loader = [torch.randn(4, 3), torch.randn(3, 3)]
    ref = reference_fisher(model, loader)
    fim = FIM(model, loader, representation)
    if representation is PMatDense:
        torch.testing.assert_close(fim.dense(), ref)
    else:
        torch.testing.assert_close(fim.diag(), torch.diagonal(ref))


def test_tied_parameters_are_listed_once() -> None:
    lc = LayerCollection.from_model(_tied())
    assert lc.param_names == ("0.weight", "0.bias", "2.bias")


def _bad_batch_loader(x: torch.Tensor):
    bad = x.clone()
    bad[0, 0] = float("inf")
    return [
        (x, torch.zeros(len(x), dtype=torch.long)),
        (bad, torch.zeros(len(x), dtype=torch.long)),
    ]


@pytest.mark.parametrize("fails", [False, True], ids=["ok", "raises"])
@pytest.mark.parametrize("representation", REPRESENTATIONS, ids=lambda r: r.__name__)
@pytest.mark.parametrize("fisher_type", ["exact", "mc", "empirical"])
def test_model_left_untouched(representation, fisher_type, fails) -> None:
    case = make_case("cnn", "classif_logits")
    model = case.model
    # A user's state that must survive: some grads, a frozen parameter, a hook.
    model[0].weight.grad = torch.randn_like(model[0].weight)
    model[1].bias.requires_grad_(False)
    model[3].register_forward_hook(lambda *a: None)
    loader = _bad_batch_loader(case.loader[0][0]) if fails else case.loader
    before = model_state(model)
    if fails:
        with pytest.raises(ValueError, match="batch 1"):
            _use(FIM(model, loader, representation, fisher_type=fisher_type))
    else:
        _use(FIM(model, loader, representation, fisher_type=fisher_type))
    assert_same_state(before, model_state(model))


def test_frozen_parameters_in_an_explicit_collection() -> None:
    case = make_case("mlp", "classif_logits")
    model = case.model
    for p in model.parameters():
        p.requires_grad_(False)
    lc = LayerCollection.from_model(model, trainable_only=False)
    before = model_state(model)
    fim = FIM(model, case.loader, PMatDense, layer_collection=lc)
    assert_same_state(before, model_state(model))
    torch.testing.assert_close(
        fim.dense(), reference_fisher(model, case.loader, layer_collection=lc)
    )


def test_call_under_no_grad() -> None:
    case = make_case("mlp", "classif_logits")
    with torch.no_grad():
        fim = FIM(case.model, case.loader, PMatDense)
    torch.testing.assert_close(fim.dense(), reference_fisher(case.model, case.loader))


def test_mismatched_vectors() -> None:
    a = PVector.from_model(nn.Linear(3, 2))
    b = PVector.from_model(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="different layer collections"):
        a + b
    m = PMatDiag(a.layer_collection, torch.ones(8))
    with pytest.raises(ValueError, match="covers"):
        m.mv(b)
    with pytest.raises(ValueError, match="float32 .* float64|torch.float32"):
        m.mv(a.to(dtype=torch.float32))
    with pytest.raises(TypeError):
        m.mv(torch.ones(8))


def test_matrices_over_different_collections_do_not_combine() -> None:
    a = PMatDiag(LayerCollection.from_model(nn.Linear(3, 2)), torch.ones(8))
    b = PMatDiag(
        LayerCollection.from_model(nn.Linear(2, 2, bias=True)).subset(names=[""]),
        torch.ones(6),
    )
    with pytest.raises(ValueError, match="different layer collections"):
        a + b


def test_malformed_files(tmp_path) -> None:
    lc = LayerCollection.from_model(nn.Linear(3, 2))
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="not a readable nnfim matrix"):
        load(garbage)
    plain = tmp_path / "plain.pt"
    torch.save({"a": torch.ones(2)}, plain)
    with pytest.raises(ValueError, match="not an nnfim matrix file"):
        load(plain)
    good = tmp_path / "good.pt"
    PMatDiag(lc, torch.ones(8)).save(good)
    payload = torch.load(good, weights_only=True)
    payload["tensors"]["diag"] = torch.ones(7)
    torch.save(payload, tmp_path / "shape.pt")
    with pytest.raises(ValueError, match="malformed PMatDiag"):
        load(tmp_path / "shape.pt")
    payload["type"] = "PMatImplicit"
    torch.save(payload, tmp_path / "kind.pt")
    with pytest.raises(ValueError, match="unknown matrix type"):
        load(tmp_path / "kind.pt")
    with pytest.raises(ValueError, match="holds a PMatDiag, not a PMatDense"):
        PMatDense.load(good)


def test_loading_never_unpickles_code(tmp_path) -> None:
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / "evil.pt"
    torch.save(
        {"format": "nnfim.pmat", "version": 1, "type": "PMatDiag", "x": Evil()}, path
    )
    with pytest.raises(ValueError, match="not a readable nnfim matrix"):
        load(path)
