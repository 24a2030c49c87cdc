"""Every layer rule against torch.func per-example gradients, on declarative cases."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from nnfim.generator.rules import _registry, find_rule


def _bn(cls: type, c: int) -> nn.Module:
    m = cls(c)
    with torch.no_grad():
        m.running_mean.normal_()
        m.running_var.uniform_(0.5, 2.0)
        m.weight.normal_()
        m.bias.normal_()
    return m.eval()


def _train_bn(cls: type, c: int) -> nn.Module:
    return _bn(cls, c).train()


def _affine(module: nn.Module) -> nn.Module:
    with torch.no_grad():
        for p in module.parameters():
            p.normal_()
    return module


@dataclass
class RuleCase:
    name: str
    make: object  # () -> nn.Module
    input_shape: tuple[int, ...]


CASES = [
    RuleCase("linear", lambda: nn.Linear(4, 3), (5, 4)),
    RuleCase("linear_nobias", lambda: nn.Linear(4, 3, bias=False), (5, 4)),
    RuleCase("linear_sequence", lambda: nn.Linear(4, 3), (5, 6, 4)),
    RuleCase(
        "linear_subclass", lambda: type("MyLinear", (nn.Linear,), {})(4, 2), (3, 4)
    ),
    RuleCase("conv2d", lambda: nn.Conv2d(2, 3, 3), (4, 2, 7, 6)),
    RuleCase(
        "conv2d_stride_pad",
        lambda: nn.Conv2d(2, 3, (3, 2), stride=(2, 1), padding=(1, 2)),
        (4, 2, 7, 6),
    ),
    RuleCase(
        "conv2d_dilation",
        lambda: nn.Conv2d(2, 3, 3, dilation=2, bias=False),
        (4, 2, 7, 7),
    ),
    RuleCase(
        "conv2d_groups", lambda: nn.Conv2d(4, 6, 3, groups=2, padding=1), (3, 4, 5, 5)
    ),
    RuleCase("conv2d_depthwise", lambda: nn.Conv2d(3, 3, 3, groups=3), (3, 3, 5, 5)),
    RuleCase(
        "conv2d_same_reflect",
        lambda: nn.Conv2d(2, 2, 3, padding="same", padding_mode="reflect"),
        (3, 2, 5, 5),
    ),
    RuleCase(
        "conv2d_circular",
        lambda: nn.Conv2d(2, 2, 3, padding=1, padding_mode="circular"),
        (3, 2, 5, 5),
    ),
    RuleCase(
        "conv1d",
        lambda: nn.Conv1d(2, 4, 3, stride=2, padding=1, dilation=2, groups=2),
        (3, 2, 11),
    ),
    RuleCase(
        "conv1d_reflect_nobias",
        lambda: nn.Conv1d(2, 3, 3, padding=2, padding_mode="reflect", bias=False),
        (3, 2, 7),
    ),
    RuleCase(
        "conv3d",
        lambda: nn.Conv3d(2, 4, 2, stride=(1, 2, 1), padding=1, groups=2),
        (2, 2, 4, 5, 3),
    ),
    RuleCase(
        "convtranspose1d",
        lambda: nn.ConvTranspose1d(
            2, 4, 3, stride=2, padding=1, output_padding=1, dilation=2, groups=2
        ),
        (3, 2, 5),
    ),
    RuleCase(
        "convtranspose2d",
        lambda: nn.ConvTranspose2d(3, 2, (3, 2), stride=(2, 1), padding=(1, 0)),
        (2, 3, 4, 4),
    ),
    RuleCase(
        "convtranspose2d_groups_nobias",
        lambda: nn.ConvTranspose2d(4, 6, 2, groups=2, bias=False),
        (2, 4, 3, 3),
    ),
    RuleCase(
        "convtranspose3d",
        lambda: nn.ConvTranspose3d(2, 2, 2, stride=2),
        (2, 2, 2, 3, 2),
    ),
    RuleCase("embedding", lambda: nn.Embedding(7, 3), "tokens"),
    RuleCase("embedding_padding", lambda: nn.Embedding(7, 3, padding_idx=2), "tokens"),
    RuleCase("batchnorm1d", lambda: _bn(nn.BatchNorm1d, 3), (5, 3)),
    RuleCase("batchnorm1d_sequence", lambda: _bn(nn.BatchNorm1d, 3), (5, 3, 4)),
    RuleCase("batchnorm2d", lambda: _bn(nn.BatchNorm2d, 3), (4, 3, 5, 5)),
    RuleCase("batchnorm3d", lambda: _bn(nn.BatchNorm3d, 2), (3, 2, 3, 3, 3)),
    RuleCase("batchnorm2d_train", lambda: _train_bn(nn.BatchNorm2d, 3), (4, 3, 5, 5)),
    RuleCase("batchnorm1d_train", lambda: _train_bn(nn.BatchNorm1d, 3), (5, 3)),
    RuleCase("layernorm", lambda: _affine(nn.LayerNorm(6)), (4, 6)),
    RuleCase(
        "layernorm_sequence_2d", lambda: _affine(nn.LayerNorm((3, 4))), (2, 5, 3, 4)
    ),
    RuleCase(
        "layernorm_nobias", lambda: _affine(nn.LayerNorm(6, bias=False)), (4, 3, 6)
    ),
    RuleCase("groupnorm", lambda: _affine(nn.GroupNorm(2, 4)), (3, 4, 5, 5)),
    RuleCase(
        "instancenorm2d",
        lambda: _affine(nn.InstanceNorm2d(3, affine=True)),
        (3, 3, 4, 4),
    ),
    RuleCase(
        "instancenorm1d_running",
        lambda: _affine(
            nn.InstanceNorm1d(3, affine=True, track_running_stats=True)
        ).eval(),
        (3, 3, 6),
    ),
]
K = 3


def _frozen_copy(module: nn.Module, x: torch.Tensor) -> nn.Module:
    """nnfim's definition for train-mode BatchNorm: eval mode with the batch's statistics."""
    import copy

    frozen = copy.deepcopy(module).eval()
    dims = [0, *range(2, x.dim())]
    with torch.no_grad():
        frozen.running_mean.copy_(x.mean(dims))
        frozen.running_var.copy_(x.var(dims, unbiased=False))
    return frozen


def oracle(
    module: nn.Module, x: torch.Tensor, gy: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Per-example gradients of sum(gy_k * module(x_i)) by vmap(grad)."""
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.training:
        module = _frozen_copy(module, x)
    params = {k: v.detach() for k, v in module.named_parameters()}

    def scalar(p, xi, gi):
        return (functional_call(module, p, (xi[None],))[0] * gi).sum()

    per_k = [
        vmap(grad(scalar), (None, 0, 0))(params, x, gy[k]) for k in range(gy.shape[0])
    ]
    return {name: torch.stack([g[name] for g in per_k]) for name in params}


@pytest.fixture(params=CASES, ids=lambda c: c.name)
def case(request):
    module = request.param.make()
    if request.param.input_shape == "tokens":
        x = torch.randint(0, 7, (4, 5))
        x[0, :2] = 2  # the padding token, where there is one
    else:
        x = torch.randn(request.param.input_shape)
    with torch.no_grad():
        y = module(x)
    gy = torch.randn(K, *y.shape)
    return module, x, gy


def prepared(module, x):
    return find_rule(module).prepare(module, x)


def test_per_example_grad(case) -> None:
    module, x, gy = case
    rule = find_rule(module)
    got = rule.per_example_grad(module, prepared(module, x), gy)
    expected = oracle(module, x, gy)
    assert set(got) == set(expected)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name])


def test_diag(case) -> None:
    module, x, gy = case
    got = find_rule(module).diag(module, prepared(module, x), gy)
    for name, g in oracle(module, x, gy).items():
        torch.testing.assert_close(got[name], (g**2).sum((0, 1)))


def test_weight_bias_cross(case) -> None:
    """The quasi-diagonal's cross terms against the torch.func gradients."""
    module, x, gy = case
    expected = oracle(module, x, gy)
    if set(expected) != {"weight", "bias"} or expected["bias"].shape[2:] != (
        expected["weight"].shape[2],
    ):
        pytest.skip("no weight-bias structure")
    got = find_rule(module).weight_bias_cross(module, prepared(module, x), gy)
    w, b = expected["weight"], expected["bias"]
    b = b.reshape(*b.shape, *([1] * (w.dim() - 3)))
    torch.testing.assert_close(got, (w * b).sum((0, 1)))


@pytest.mark.parametrize("chunk", [None, 1])
def test_add_diag_with_cross(case, chunk, monkeypatch) -> None:
    """Diagonal and cross terms in one call (per-example gradients formed once,
    also a few examples at a time) against the torch.func gradients."""
    module, x, gy = case
    expected = oracle(module, x, gy)
    if set(expected) != {"weight", "bias"} or expected["bias"].shape[2:] != (
        expected["weight"].shape[2],
    ):
        pytest.skip("no weight-bias structure")
    if chunk is not None:
        monkeypatch.setattr(_registry, "DEFAULT_CHUNK_ELEMENTS", chunk)
    rule = find_rule(module)
    x = prepared(module, x)
    acc: dict[str, torch.Tensor] = {}
    cross = rule.add_diag_with_cross(module, rule.diag_input(module, x), x, gy, acc)
    w, b = expected["weight"], expected["bias"]
    torch.testing.assert_close(acc["weight"], (w**2).sum((0, 1)))
    torch.testing.assert_close(acc["bias"], (b**2).sum((0, 1)))
    b = b.reshape(*b.shape, *([1] * (w.dim() - 3)))
    torch.testing.assert_close(cross, (w * b).sum((0, 1)))


def test_flat_grads(case) -> None:
    module, x, gy = case
    names = [n for n, _ in module.named_parameters()]
    got = find_rule(module).flat_grads(module, prepared(module, x), gy, names)
    expected = oracle(module, x, gy)
    rows = K * x.shape[0]
    torch.testing.assert_close(
        got, torch.cat([expected[n].reshape(rows, -1) for n in names], 1)
    )


def test_small_chunks_give_the_same_diag(case, monkeypatch) -> None:
    module, x, gy = case
    x = prepared(module, x)
    expected = find_rule(module).diag(module, x, gy)
    monkeypatch.setattr(_registry, "DEFAULT_CHUNK_ELEMENTS", 1)
    got = _registry.LayerRule.diag(find_rule(module), module, x, gy)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name])
    # the rule's own diagonal, one example at a time (where it chunks)
    own = find_rule(module).diag(module, x, gy)
    for name in expected:
        torch.testing.assert_close(own[name], expected[name])


def test_add_diag_accumulates(case) -> None:
    """Two calls of ``add_diag`` add up, the first writing fresh tensors."""
    module, x, gy = case
    x = prepared(module, x)
    rule = find_rule(module)
    expected = rule.diag(module, x, gy)
    acc: dict[str, torch.Tensor] = {}
    rule.add_diag(module, x, gy, acc)
    rule.add_diag(module, x, gy, acc)
    assert set(acc) == set(expected)
    for name in expected:
        torch.testing.assert_close(acc[name], 2 * expected[name])


def test_add_diag_of_some_parameters(case) -> None:
    """``names`` selects parameters: each alone equals its part of the diagonal."""
    module, x, gy = case
    x = prepared(module, x)
    rule = find_rule(module)
    expected = rule.diag(module, x, gy)
    for name in expected:
        acc: dict[str, torch.Tensor] = {}
        rule.add_diag(module, x, gy, acc, [name])
        assert set(acc) == {name}
        torch.testing.assert_close(acc[name], expected[name])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_squares_zero_only_below_the_normal_range(dtype) -> None:
    """Squares at or above ``finfo.tiny`` are exact; those below it are zero."""
    tiny = torch.finfo(dtype).tiny
    t = torch.tensor([0.0, 1e-3, -2.0, 1.1, 3.0], dtype=dtype)
    root = torch.tensor(tiny, dtype=dtype).sqrt()
    t = torch.cat(
        [t, torch.stack([root * 1.01, -root * 1.01, root * 0.5, -root * 1e-3])]
    )
    sq = _registry.squares(t)
    keep = t.abs() >= root
    torch.testing.assert_close(sq[keep], (t * t)[keep], rtol=0, atol=0)
    assert (sq[~keep] == 0).all()
    assert (sq[keep & (t != 0)] >= tiny).all()


def test_linear_diag_with_tiny_gradients_against_float64() -> None:
    """A confident example's tiny output gradients: the float32 diagonal stays
    within float32 rounding of the float64 one."""
    lin = nn.Linear(5, 7).double()
    x = torch.randn(6, 5, dtype=torch.float64)
    gy = torch.randn(1, 6, 7, dtype=torch.float64)
    gy[0, :3] *= 1e-21  # three examples whose gradients square to subnormals
    rule = find_rule(lin)
    exact = rule.diag(lin, x, gy)
    single = rule.diag(lin.float(), x.float(), gy.float())
    for name in exact:
        torch.testing.assert_close(
            single[name].double(), exact[name], rtol=1e-5, atol=0
        )


def test_attention_rule_against_torch_func() -> None:
    """The packed projection: inputs (n, T, D), output gradients for qkv (K, n, T, 3D)."""
    attn = nn.MultiheadAttention(6, 2, batch_first=True)
    x, gy = torch.randn(4, 5, 6), torch.randn(K, 4, 5, 18)
    rule = find_rule(attn)
    params = {
        "in_proj_weight": attn.in_proj_weight.detach(),
        "in_proj_bias": attn.in_proj_bias.detach(),
    }

    def scalar(p, xi, gi):
        return (
            nn.functional.linear(xi, p["in_proj_weight"], p["in_proj_bias"]) * gi
        ).sum()

    per_k = [vmap(grad(scalar), (None, 0, 0))(params, x, gy[k]) for k in range(K)]
    expected = {n: torch.stack([g[n] for g in per_k]) for n in params}
    got = rule.per_example_grad(attn, x, gy)
    for name in params:
        torch.testing.assert_close(got[name], expected[name])
        torch.testing.assert_close(
            rule.diag(attn, x, gy)[name], (expected[name] ** 2).sum((0, 1))
        )


def test_every_registered_rule_has_a_case() -> None:
    from nnfim.generator.rules.attention import AttentionRule

    covered = {type(find_rule(c.make())) for c in CASES} | {AttentionRule}
    registered = {
        type(rule)
        for klass, rule in _registry._RULES.items()
        if klass.__module__.startswith("torch")
    }
    assert registered <= covered, registered - covered
