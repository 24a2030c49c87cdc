"""Transformer-, ResNet- and RNN-shaped models end to end, against torch.func references."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from kfac_brute import brute_factors
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from nnfim import (
    FIM,
    NTK,
    PMatBlockDiag,
    PMatDense,
    PMatDiag,
    PMatEKFAC,
    PMatImplicit,
    PMatKFAC,
    PMatLowRank,
    PVector,
)
from nnfim.generator.fallback import FallbackRule
from nnfim.generator.jacobian import Generator
from nnfim.generator.rules.attention import decomposed_attention
from nnfim.testing import (
    reference_empirical_fisher,
    reference_fisher,
    reference_jacobian,
)

VOCAB, D, T = 11, 8, 5


class Encoder(nn.Module):
    """Token + positional embeddings, attention, LayerNorm, GELU MLP, tied head."""

    def __init__(self) -> None:
        super().__init__()
        self.tok = nn.Embedding(VOCAB, D, padding_idx=0)
        self.pos = nn.Embedding(T, D)
        self.attn = nn.MultiheadAttention(D, 2, batch_first=True)
        self.ln1 = nn.LayerNorm(D)
        self.mlp = nn.Sequential(nn.Linear(D, 16), nn.GELU(), nn.Linear(16, D))
        self.ln2 = nn.LayerNorm(D)
        self.head = nn.Linear(D, VOCAB)
        self.head.weight = self.tok.weight

    def forward(self, ids):
        h = self.tok(ids) + self.pos(torch.arange(ids.shape[1], device=ids.device))
        a, _ = self.attn(h, h, h)
        h = self.ln1(h + a)
        h = self.ln2(h + self.mlp(h))
        return self.head(h.mean(1))


class ResBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(4)
        self.skip = nn.Conv2d(3, 4, 1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        h = torch.relu(self.bn1(self.conv1(x)))
        h = self.bn2(self.conv2(h))
        h = torch.relu(h + self.skip(x))
        return self.fc(F.adaptive_avg_pool2d(h, 1).flatten(1))


class GRUClassifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gru = nn.GRU(3, 4, batch_first=True)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        out, _ = self.gru(x)
        return self.head(out[:, -1])


class SeqConv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = nn.ConvTranspose1d(2, 3, 3, stride=2)
        self.down = nn.Conv1d(3, 2, 3, stride=2, groups=1)
        self.gn = nn.GroupNorm(1, 2)
        self.fc = nn.Linear(2, 3)

    def forward(self, x):
        return self.fc(self.gn(self.down(torch.tanh(self.up(x)))).mean(-1))


def _init_bn(model: nn.Module) -> nn.Module:
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, _BatchNorm):
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2.0)
                m.weight.normal_()
                m.bias.normal_()
    return model


def encoder_case():
    torch.manual_seed(0)
    return Encoder().eval(), [
        torch.randint(0, VOCAB, (4, T)),
        torch.randint(0, VOCAB, (3, T)),
    ]


def resnet_eval_case():
    torch.manual_seed(0)
    return _init_bn(ResBlock()).eval(), [
        torch.randn(4, 3, 5, 5),
        torch.randn(3, 3, 5, 5),
    ]


def gru_case():
    torch.manual_seed(0)
    return GRUClassifier(), [torch.randn(4, 6, 3), torch.randn(3, 6, 3)]


def seqconv_case():
    torch.manual_seed(0)
    return SeqConv(), [torch.randn(4, 2, 6), torch.randn(2, 2, 6)]


CASES = {
    "encoder": encoder_case,
    "resnet_eval": resnet_eval_case,
    "gru": gru_case,
    "seqconv": seqconv_case,
}
_REFS: dict[str, torch.Tensor] = {}


def reference(name: str) -> torch.Tensor:
    if name not in _REFS:
        model, loader = CASES[name]()
        _REFS[name] = reference_fisher(model, loader)
    return _REFS[name]


def _check(fim, ref: torch.Tensor) -> None:
    p = ref.shape[0]
    if isinstance(fim, (PMatDense, PMatLowRank)):
        torch.testing.assert_close(fim.dense(), ref)
    elif isinstance(fim, PMatImplicit):
        v = torch.randn(p)
        torch.testing.assert_close(
            fim.mv(PVector.from_flat(fim.layer_collection, v)).flatten(), ref @ v
        )
    elif isinstance(fim, PMatBlockDiag):
        for layer in fim.layer_collection:
            sl = fim.layer_collection.layer_slice(layer.name)
            torch.testing.assert_close(fim.blocks[layer.name], ref[sl, sl])
    else:
        torch.testing.assert_close(fim.diag(), torch.diagonal(ref))


@pytest.mark.parametrize(
    "representation",
    [PMatDense, PMatDiag, PMatBlockDiag, PMatLowRank, PMatImplicit],
    ids=lambda r: r.__name__,
)
@pytest.mark.parametrize("case_name", list(CASES))
def test_models_against_torch_func(case_name, representation) -> None:
    model, loader = CASES[case_name]()
    _check(FIM(model, loader, representation), reference(case_name))


@pytest.mark.parametrize("case_name", list(CASES))
def test_ntk_with_fallback_layers(case_name) -> None:
    """The NTK Gram goes through every rule's ``gram``, the fallback's included."""
    model, loader = CASES[case_name]()
    jac, _ = reference_jacobian(model, loader)
    ntk = NTK(model, loader)
    torch.testing.assert_close(ntk.data, torch.einsum("nci,mdi->cndm", jac, jac))


def test_encoder_needs_no_fallback() -> None:
    model, loader = encoder_case()
    gen = Generator(model, loader, strict=True)
    rules = gen.rules()
    # the positional embedding, shared by the batch, is expanded over it; the
    # tied token embedding sums its two uses through the rules; the
    # attention's projections, LayerNorms, MLP and head bias keep their rules
    assert not any(isinstance(r, FallbackRule) for r in rules.values())
    assert gen._broadcast == {"pos"}
    assert type(rules["pos"]).__name__ == "EmbeddingRule"
    assert type(rules["tok"]).__name__ == "SharedRule"
    assert type(rules["attn"]).__name__ == "AttentionRule"
    assert type(rules["attn.out_proj"]).__name__ == "LinearRule"


def test_cross_attention_falls_back() -> None:
    class Cross(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn = nn.MultiheadAttention(4, 2, batch_first=True)
            self.fc = nn.Linear(4, 3)

        def forward(self, x):
            a, _ = self.attn(x, x.flip(1), x.flip(1))
            return self.fc(a.mean(1))

    model, loader = Cross(), [torch.randn(3, 5, 4)]
    rules = Generator(model, loader).rules()
    assert isinstance(rules["attn"], FallbackRule)
    _check(FIM(model, loader, PMatDense), reference_fisher(model, loader))


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("need_weights", [True, False])
def test_decomposed_attention_is_the_same_function(batch_first, need_weights) -> None:
    attn = nn.MultiheadAttention(8, 2, batch_first=batch_first)
    x = torch.randn(3, 5, 8) if batch_first else torch.randn(5, 3, 8)
    mask = torch.ones(5, 5, dtype=torch.bool).triu(1)
    pad = torch.zeros(3, 5, dtype=torch.bool)
    pad[0, -1] = True
    kwargs = {"need_weights": need_weights, "attn_mask": mask, "key_padding_mask": pad}
    expected = attn(x, x, x, **kwargs)
    with decomposed_attention(attn):
        got = attn(x, x, x, **kwargs)
    assert "forward" not in vars(attn)
    torch.testing.assert_close(got[0], expected[0])
    if need_weights:
        torch.testing.assert_close(got[1], expected[1])


@pytest.mark.parametrize("case_name", ["encoder", "resnet_eval"])
def test_kfac_on_real_models(case_name) -> None:
    """Kronecker layers equal their definition; every other layer is an exact block."""
    model, loader = CASES[case_name]()
    kfac = FIM(model, loader, PMatKFAC)
    ref = reference(case_name)
    modules = dict(model.named_modules())
    assert kfac.factors, "some layers must be Kronecker-factored"
    for layer in kfac.layer_collection:
        sl = kfac.layer_collection.layer_slice(layer.name)
        if layer.name in kfac.blocks:
            torch.testing.assert_close(kfac.blocks[layer.name], ref[sl, sl])
        elif layer.name in kfac.terms:  # the tied embedding: see test_tied.py
            assert layer.name == "tok"
        elif layer.name == "pos":
            # expanded over the batch: see test_shared_inputs_kfac_equals_per_example_inputs
            assert isinstance(modules["pos"], nn.Embedding)
        elif isinstance(modules[layer.name], nn.MultiheadAttention):
            # the packed projection: A is the moment of [x; 1] over positions
            xs = []
            hook = modules[layer.name].register_forward_pre_hook(
                lambda m, a, store=xs: store.append(a[0].detach())
            )
            for batch in loader:
                model(batch)
            hook.remove()
            x = torch.cat(xs)
            x1 = torch.cat([x, torch.ones(*x.shape[:2], 1)], -1)
            a = torch.einsum("nti,ntj->ij", x1, x1) / (x.shape[0] * x.shape[1])
            torch.testing.assert_close(kfac.factors[layer.name][0][0], a)
        else:  # out_proj is called as a module only in the decomposed attention
            with decomposed_attention(model):
                a, g = brute_factors(
                    model, loader, "classif_logits", modules[layer.name]
                )
            torch.testing.assert_close(kfac.factors[layer.name][0], a)
            torch.testing.assert_close(kfac.factors[layer.name][1], g)
    ekfac = FIM(model, loader, PMatEKFAC).update_diag()
    assert ekfac.dense().shape == ref.shape


def test_embedding_kfac_is_exact_for_one_token_one_example() -> None:
    model = nn.Sequential(nn.Embedding(6, 3), nn.Flatten(), nn.Tanh(), nn.Linear(3, 4))
    loader = [torch.tensor([[2]])]
    kfac = FIM(model, loader, PMatKFAC)
    assert "0" in kfac.factors
    sl = kfac.layer_collection.layer_slice("0")
    torch.testing.assert_close(
        kfac.dense()[sl, sl], reference_fisher(model, loader)[sl, sl]
    )


def _frozen_reference(model: nn.Module, loader) -> torch.Tensor:
    """nnfim's train-mode BatchNorm: per batch, eval mode with that batch's statistics."""
    total, count = 0.0, 0
    for x in loader:
        probe = copy.deepcopy(model)
        inputs = {}
        for name, m in probe.named_modules():
            if isinstance(m, _BatchNorm):
                m.register_forward_hook(
                    lambda mod, a, o, name=name, store=inputs: store.__setitem__(
                        name, a[0].detach()
                    )
                )
        with torch.no_grad():
            probe(x)
        frozen = copy.deepcopy(model).eval()
        with torch.no_grad():
            for name, m in frozen.named_modules():
                if isinstance(m, _BatchNorm):
                    dims = [0, *range(2, inputs[name].dim())]
                    m.running_mean.copy_(inputs[name].mean(dims))
                    m.running_var.copy_(inputs[name].var(dims, unbiased=False))
        total = total + x.shape[0] * reference_fisher(frozen, [x])
        count += x.shape[0]
    return total / count


@pytest.mark.parametrize(
    "representation",
    [PMatDense, PMatDiag, PMatKFAC, PMatImplicit],
    ids=lambda r: r.__name__,
)
def test_resnet_in_train_mode(representation) -> None:
    model = _init_bn(ResBlock()).train()
    loader = [torch.randn(6, 3, 5, 5), torch.randn(4, 3, 5, 5)]
    stats = {k: b.clone() for k, b in model.named_buffers()}
    ref = _frozen_reference(model, loader)
    fim = FIM(model, loader, representation)
    if isinstance(fim, PMatKFAC):
        for name, block in fim.blocks.items():
            sl = fim.layer_collection.layer_slice(name)
            torch.testing.assert_close(block, ref[sl, sl])
    else:
        _check(fim, ref)
    for k, b in model.named_buffers():
        assert torch.equal(b, stats[k]), k  # running statistics untouched
    assert model.training


def test_batchnorm_train_mode_with_a_fallback_layer_is_refused() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), GRUWrapper())
    with pytest.raises(ValueError, match="BatchNorm in train mode"):
        FIM(model, [torch.randn(5, 3)], PMatDiag)


class GRUWrapper(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gru = nn.GRU(4, 3, batch_first=True)

    def forward(self, x):
        return self.gru(x[:, None])[0][:, -1]


def test_scaled_dot_product_attention_everywhere() -> None:
    """Fused attention has no forward-mode rule; the math kernel is used instead."""

    class Attention(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.qkv = nn.Linear(4, 12)
            self.out = nn.Linear(4, 3)

        def forward(self, x):
            q, k, v = self.qkv(x).chunk(3, -1)
            a = F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None])[:, 0]
            return self.out(a.mean(1))

    model, loader = Attention(), [torch.randn(3, 5, 4)]
    ref = reference_fisher(model, loader)
    for representation in (PMatImplicit, PMatDense):
        _check(FIM(model, loader, representation), ref)


@pytest.mark.parametrize(
    "representation",
    [PMatDense, PMatDiag, PMatBlockDiag, PMatLowRank, PMatKFAC],
    ids=lambda r: r.__name__,
)
def test_fallback_rows_split_into_pieces(monkeypatch, representation) -> None:
    """Batches split to bound the fallback's rows give the same matrix."""
    from nnfim.generator import fallback, jacobian

    model, loader = gru_case()
    numel = sum(p.numel() for p in model.gru.parameters())
    k = 3  # C - 1 directions of the exact Fisher
    # room for the rows of 1 example: batches of 4 and 3 go one example at a time
    monkeypatch.setattr(jacobian, "FALLBACK_ROW_ELEMENTS", k * numel + 1)
    sizes: list[int] = []
    rows = fallback.fallback_rows

    def counted(forward_one, params, examples, directions):
        sizes.append(directions.shape[1])
        return rows(forward_one, params, examples, directions)

    monkeypatch.setattr(jacobian, "fallback_rows", counted)
    fim = FIM(model, loader, representation)
    if isinstance(fim, PMatKFAC):  # the GRU is an exact block: check it alone
        sl = fim.layer_collection.layer_slice("gru")
        torch.testing.assert_close(fim.blocks["gru"], reference("gru")[sl, sl])
    else:
        _check(fim, reference("gru"))
    assert sizes and set(sizes) == {1}, sizes


@pytest.mark.parametrize("convention", ["expand", "reduce"])
def test_fallback_overhead_path_is_exact_with_mc(convention) -> None:
    """Monte-Carlo samples are the same for rule and fallback layers."""
    model, loader = gru_case()
    kwargs = {
        "fisher_type": "mc",
        "mc_samples": 2,
        "seed": 5,
        "kfac_convention": convention,
    }
    dense = FIM(model, loader, PMatDense, **kwargs).dense()
    diag = FIM(model, loader, PMatDiag, **kwargs).diag()
    torch.testing.assert_close(diag, torch.diagonal(dense))


@pytest.mark.parametrize(
    "representation", [PMatDiag, PMatKFAC, PMatImplicit], ids=lambda r: r.__name__
)
@pytest.mark.parametrize("make", ["encoder", "resnet_train", "gru"])
def test_model_left_untouched(make, representation) -> None:
    from conftest import assert_same_state, model_state

    if make == "resnet_train":
        model, loader = _init_bn(ResBlock()).train(), [torch.randn(4, 3, 5, 5)]
    else:
        model, loader = CASES[make]()
    before = model_state(model)
    fim = FIM(model, loader, representation)
    fim.mv(
        PVector.from_flat(
            fim.layer_collection, torch.ones(fim.layer_collection.numel())
        )
    )
    assert_same_state(before, model_state(model))


def test_kfac_refuses_a_huge_exact_block(monkeypatch) -> None:
    from nnfim.generator import jacobian

    monkeypatch.setattr(jacobian, "MAX_EXACT_BLOCK", 100)
    model, loader = encoder_case()
    with pytest.raises(ValueError, match="exact .* block .*layer_collection="):
        FIM(model, loader, PMatKFAC)


@pytest.mark.parametrize("case_name", ["encoder", "gru"])
def test_fallback_results_do_not_track_gradients(case_name) -> None:
    model, loader = CASES[case_name]()
    for representation in (PMatDiag, PMatDense):
        assert not FIM(model, loader, representation).dense().requires_grad


class TorchEncoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, D)
        self.layer = nn.TransformerEncoderLayer(D, 2, 16, dropout=0.0, batch_first=True)
        self.fc = nn.Linear(D, 3)

    def forward(self, ids):
        return self.fc(self.layer(self.emb(ids)).mean(1))


@pytest.mark.parametrize(
    "representation", [PMatDense, PMatDiag, PMatImplicit], ids=lambda r: r.__name__
)
def test_torch_transformer_encoder_layer(representation) -> None:
    torch.manual_seed(0)
    model = TorchEncoder().eval()
    loader = [torch.randint(0, VOCAB, (4, T)), torch.randint(0, VOCAB, (3, T))]
    rules = Generator(model, loader).rules()
    assert not any(isinstance(r, FallbackRule) for r in rules.values())
    _check(FIM(model, loader, representation), reference_fisher(model, loader))


def _reference_diag(model, loader, fisher_type: str) -> torch.Tensor:
    """The exact or empirical Fisher's diagonal from torch.func."""
    if fisher_type == "exact":
        return torch.diagonal(reference_fisher(model, loader))
    return torch.diagonal(reference_empirical_fisher(model, loader))


@pytest.mark.parametrize("fisher_type", ["exact", "empirical", "mc"])
def test_attention_kernel_of_each_pass(monkeypatch, fisher_type) -> None:
    """One output direction per batch (empirical, one Monte-Carlo sample):
    attention runs through the fused kernel, and the diagonal stays exact.
    Several directions (exact): through the math kernel, which has the
    batching rule the batched backward needs."""
    from nnfim.generator import jacobian

    entered = []
    math_attention = jacobian.math_attention

    def counted():
        entered.append(1)
        return math_attention()

    monkeypatch.setattr(jacobian, "math_attention", counted)
    torch.manual_seed(0)
    model = TorchEncoder().eval()
    loader = [
        (torch.randint(0, VOCAB, (n, T)), torch.randint(0, 3, (n,))) for n in (5, 4)
    ]
    diag = FIM(model, loader, PMatDiag, fisher_type=fisher_type).diag()
    assert bool(entered) == (fisher_type == "exact")
    if fisher_type == "mc":  # its draws have no independent reference
        assert torch.isfinite(diag).all() and (diag >= 0).all()
        return
    torch.testing.assert_close(diag, _reference_diag(model, loader, fisher_type))


class _MaskedAttention(nn.Module):
    """Self-attention with a causal mask and a padded last position."""

    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(D, 2, batch_first=True)
        self.fc = nn.Linear(D, 3)

    def forward(self, x):
        t = x.shape[1]
        causal = torch.ones(t, t, dtype=torch.bool, device=x.device).triu(1)
        pad = torch.zeros(x.shape[:2], dtype=torch.bool, device=x.device)
        pad[:, -1] = True
        a, _ = self.attn(
            x, x, x, attn_mask=causal, key_padding_mask=pad, need_weights=False
        )
        return self.fc(a.mean(1))


@pytest.mark.parametrize("fisher_type", ["exact", "empirical"])
def test_masked_attention_on_both_kernels(fisher_type) -> None:
    """Masks through the math kernel (exact) and the fused one (empirical)."""
    torch.manual_seed(0)
    model = _MaskedAttention()
    loader = [(torch.randn(n, T, D), torch.randint(0, 3, (n,))) for n in (5, 4)]
    rules = Generator(model, loader).rules()
    assert not any(isinstance(r, FallbackRule) for r in rules.values())
    diag = FIM(model, loader, PMatDiag, fisher_type=fisher_type).diag()
    torch.testing.assert_close(diag, _reference_diag(model, loader, fisher_type))


class _BroadcastPositions(nn.Module):
    """A positional embedding of ``arange(T)``, broadcast over the batch."""

    def __init__(self, t: int) -> None:
        super().__init__()
        self.t = t
        self.pos = nn.Embedding(t, 4)
        self.lin = nn.Linear(4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin((x + self.pos(torch.arange(self.t))).mean(1))


@pytest.mark.parametrize("n", [3, 5])
@pytest.mark.parametrize("fisher_type", ["exact", "empirical"])
def test_broadcast_output_with_as_many_rows_as_examples(n, fisher_type) -> None:
    """``pos`` returns ``(T, D)``; with ``T == n`` its leading size looks per-example
    but does not follow the batch: it is expanded over the batch, never read as
    if its rows were examples."""
    torch.manual_seed(0)
    model = _BroadcastPositions(3)
    loader = [(torch.randn(n, 3, 4), torch.randint(0, 5, (n,)))]
    gen = Generator(model, loader)
    rules = gen.rules()
    assert gen._broadcast == {"pos"}
    assert not any(isinstance(r, FallbackRule) for r in rules.values())
    diag = FIM(model, loader, PMatDiag, fisher_type=fisher_type).diag()
    torch.testing.assert_close(diag, _reference_diag(model, loader, fisher_type))


class _SharedInputs(nn.Module):
    """Layers called once on an input shared by the batch, used in several ways.

    With ``per_example`` the same function reads per-example copies of the
    shared inputs instead (``arange(T)`` expanded to ``(n, T)`` before the
    lookup): the layers then follow the batch without any expansion by nnfim.
    """

    def __init__(self, how: str, per_example: bool = False) -> None:
        super().__init__()
        self.how, self.per_example = how, per_example
        self.pos = nn.Embedding(T, D)
        self.proj = nn.Linear(D, D)
        self.register_buffer("query", torch.randn(T, D))
        self.head = nn.Linear(D, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ids, query = torch.arange(T), self.query
        if self.per_example:
            ids, query = ids.expand(x.shape[0], T), query.expand(x.shape[0], T, D)
        p = self.pos(ids)
        if self.how == "added":  # (n, T, D) + (T, D), and a Linear on a buffer
            h = x + p + self.proj(query)
        elif self.how == "reduced":  # reads the shared output's leading axis
            h = x + p.sum(0) + self.proj(query)
        else:  # writes into the shared output
            p += self.proj(query)
            h = x + p
        return self.head(torch.tanh(h).mean(1))


@pytest.mark.parametrize(
    "how, broadcast",
    [("added", {"pos", "proj"}), ("reduced", {"proj"}), ("in_place", set())],
)
@pytest.mark.parametrize(
    "representation",
    [PMatDense, PMatDiag, PMatBlockDiag, PMatLowRank, PMatImplicit],
    ids=lambda r: r.__name__,
)
def test_shared_inputs_expand_only_where_the_output_is_unchanged(
    how, broadcast, representation
) -> None:
    """Expanded where the model's output stays the same; else the torch.func fallback.

    ``p.sum(0)`` sums over positions unexpanded but over examples expanded, and
    an in-place write into an expanded view raises: both must fall back.
    """
    torch.manual_seed(0)
    model = _SharedInputs(how).double()
    loader = [torch.randn(4, T, D, dtype=torch.float64)]
    gen = Generator(model, loader)
    rules = gen.rules()
    assert gen._broadcast == broadcast
    fallback = {n for n, r in rules.items() if isinstance(r, FallbackRule)}
    assert fallback == {"pos", "proj"} - broadcast
    _check(FIM(model, loader, representation), reference_fisher(model, loader))


@pytest.mark.parametrize("convention", ["expand", "reduce"])
def test_shared_inputs_kfac_equals_per_example_inputs(convention) -> None:
    """K-FAC of expanded layers equals that of the same layers fed per-example copies.

    The per-example model runs the plain rules, whose factors are checked
    against their brute-force definition in test_kfac.py.
    """
    torch.manual_seed(0)
    model = _SharedInputs("added").double()
    twin = copy.deepcopy(model)
    twin.per_example = True
    loader = [torch.randn(4, T, D, dtype=torch.float64)]
    plain = Generator(twin, loader)
    plain.rules()
    assert not plain._broadcast
    a = FIM(model, loader, PMatKFAC, kfac_convention=convention)
    b = FIM(twin, loader, PMatKFAC, kfac_convention=convention)
    assert set(a.factors) == set(b.factors) == {"pos", "proj", "head"}
    for name in a.factors:
        for fa, fb in zip(a.factors[name], b.factors[name], strict=True):
            torch.testing.assert_close(fa, fb)


def test_shared_input_expanded_with_strict() -> None:
    """A positional embedding needs no fallback, so ``strict=True`` accepts it."""
    model = _BroadcastPositions(3)
    loader = [(torch.randn(4, 3, 4), torch.randint(0, 5, (4,)))]
    diag = FIM(model, loader, PMatDiag, strict=True).diag()
    torch.testing.assert_close(diag, torch.diagonal(reference_fisher(model, loader)))
