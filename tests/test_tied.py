"""Tied weights and reused modules through the layer rules, against torch.func."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_same_state, model_state
from kfac_brute import _sqrt_psd
from test_fisher import check_against
from test_layers import Encoder
from torch import nn

import nnfim
import nnfim.generator.shared as shared
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
    PMatQuasiDiag,
    PVector,
)
from nnfim.generator.fallback import FallbackRule
from nnfim.generator.jacobian import Generator
from nnfim.generator.shared import SharedRule
from nnfim.jacobian import per_example_grads
from nnfim.testing import (
    reference_empirical_fisher,
    reference_fisher,
    reference_jacobian,
    reference_output_fisher,
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
    # the encoder's positional embedding is expanded over the batch
    assert fallback == set()


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


class _Twice(nn.Module):
    """Calls ``lin`` a second time on batches of more than 3 examples."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(D, D)

    def forward(self, x):
        h = self.lin(x)
        return self.lin(h) if len(x) > 3 else h


@pytest.mark.parametrize("sizes", [(3, 4), (6,)])
def test_calls_must_match_the_layer_check(sizes) -> None:
    """The check sees a first batch of 3 whole, or the first 2 and 3 examples of
    a batch of 6: a module called more often in a larger batch stops the pass
    with an error, never a rule read from the wrong calls."""
    loader = [torch.randn(n, D) for n in sizes]
    with pytest.raises(ValueError, match="called once in the layer check's .* 2 times"):
        FIM(_Twice(), loader, PMatDiag)


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


# -- K-FAC ---------------------------------------------------------------------
def _calls_io(model: nn.Module, loader, module: nn.Module):
    """Per batch, every call's input ``(n, ...)`` and output gradients ``(K, n, ...)``.

    Plain hooks and one ``autograd.grad`` per output direction (the columns of
    a square root of the output Fisher), independent of nnfim's generator.
    """
    out_batches = []
    for batch in loader:
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        calls: list[tuple[torch.Tensor, torch.Tensor]] = []
        handle = module.register_forward_hook(
            lambda m, a, o, store=calls: store.append((a[0].detach(), o))
        )
        try:
            out = model(x)
        finally:
            handle.remove()
        roots = _sqrt_psd(reference_output_fisher("classif_logits", out.detach()))
        grads = [
            torch.autograd.grad(
                out, [y for _, y in calls], roots[:, :, c], retain_graph=True
            )
            for c in range(roots.shape[2])
        ]
        out_batches.append(
            [
                (xi, torch.stack([g[j] for g in grads]))
                for j, (xi, _) in enumerate(calls)
            ]
        )
    return out_batches


def _linear_factors(model, loader, module, convention, bias):
    """A Linear's factors with its calls stacked as positions, from the definition."""
    a_sum, g_sum, n_total = 0.0, 0.0, 0
    for calls in _calls_io(model, loader, module):
        n = calls[0][0].shape[0]
        n_total += n
        x = torch.cat([xi.reshape(n, -1, xi.shape[-1]) for xi, _ in calls], 1)
        gy = torch.cat([g.reshape(g.shape[0], n, -1, g.shape[-1]) for _, g in calls], 2)
        if bias:
            x = torch.cat([x, torch.ones_like(x[..., :1])], -1)
        t = x.shape[1]
        if convention == "expand":
            a_sum = a_sum + torch.einsum("nti,ntj->ij", x, x) / t
            g_sum = g_sum + torch.einsum("knto,kntp->op", gy, gy)
        else:
            xm, gs = x.mean(1), gy.sum(2)
            a_sum = a_sum + xm.t() @ xm
            g_sum = g_sum + torch.einsum("kno,knp->op", gs, gs)
    return a_sum / n_total, g_sum / n_total


def _embedding_factors(model, loader, module):
    """An Embedding's expand factors ``(A (d, d), G (V, V))`` from the definition."""
    v = module.num_embeddings
    a_sum, g_sum, n_total = 0.0, 0.0, 0
    for calls in _calls_io(model, loader, module):
        ((ids, gy),) = calls
        n, t = ids.shape
        n_total += n
        keep = torch.ones(n, t) if module.padding_idx is None else (ids != 0).double()
        counts = torch.zeros(v)
        for i in range(n):
            for s in range(t):
                counts[ids[i, s]] += keep[i, s]
        # a lookup is a Linear map of one-hot inputs (zero for the padding
        # token): every position's output gradient enters, as in Linear's G
        a_sum = a_sum + torch.einsum("knti,kntj->ij", gy, gy)
        g_sum = g_sum + torch.diag(counts) / t
    return a_sum / n_total, g_sum / n_total


@pytest.mark.parametrize("convention", ["expand", "reduce"])
@pytest.mark.parametrize("name", ["reused", "reused_shapes"])
def test_reused_module_kfac_is_its_calls_stacked_as_positions(name, convention) -> None:
    model, loader = _case(name)
    kfac = FIM(model, loader, PMatKFAC, kfac_convention=convention)
    assert not kfac.terms and "lin" in kfac.factors
    a, g = _linear_factors(model, loader, model.lin, convention, bias=True)
    torch.testing.assert_close(kfac.factors["lin"][0][0], a)
    torch.testing.assert_close(kfac.factors["lin"][1][0], g)


def _tied_block(model, loader, name: str) -> torch.Tensor:
    """The tied layer's K-FAC block, ``sum_t G_t kron A_t`` by dense algebra."""
    if name == "encoder":
        a_tok, g_tok = _embedding_factors(model, loader, model.tok)
        # the head's own bias is not the embedding's: no bias border
        a_head, g_head = _linear_factors(model, loader, model.head, "expand", False)
        return torch.kron(g_tok, a_tok) + torch.kron(g_head, a_head)
    # shared_linear: layer "a" is [W | b_a]; "b" uses W only (zero bias column)
    a_a, g_a = _linear_factors(model, loader, model.a, "expand", True)
    a_b, g_b = _linear_factors(model, loader, model.b, "expand", False)
    a_b = torch.nn.functional.pad(a_b, (0, 1, 0, 1))
    return torch.kron(g_a, a_a) + torch.kron(g_b, a_b)


def _kron_to_flat(block: torch.Tensor, d_out: int, bias: bool) -> torch.Tensor:
    """Reorder a block over row-major ``[W | b]`` into the flat order ``(W, b)``."""
    if not bias:
        return block
    cols = block.shape[0] // d_out
    order = torch.arange(block.shape[0]).reshape(d_out, cols)
    flat = torch.cat([order[:, :-1].reshape(-1), order[:, -1]])
    return block[flat][:, flat]


@pytest.mark.parametrize("name", ["encoder", "shared_linear"])
def test_tied_kfac_is_an_exact_sum_of_kronecker_terms(name) -> None:
    model, loader = _case(name)
    before = model_state(model)
    kfac = FIM(model, loader, PMatKFAC)
    assert_same_state(before, model_state(model))
    layer = "tok" if name == "encoder" else "a"
    assert list(kfac.terms) == [layer] and len(kfac.terms[layer]) == 2
    expected = _kron_to_flat(_tied_block(model, loader, name), D, name != "encoder")
    sl = kfac.layer_collection.layer_slice(layer)
    torch.testing.assert_close(kfac.dense()[sl, sl], expected)
    # EKFAC cannot hold the sum: the layer is then an exact block, as before
    ekfac = FIM(model, loader, PMatEKFAC)
    assert layer in ekfac.blocks
    torch.testing.assert_close(
        ekfac.blocks[layer], FIM(model, loader, PMatBlockDiag).blocks[layer]
    )


def test_kfac_with_terms_operations(tmp_path) -> None:
    model, loader = _case("encoder")
    kfac = FIM(model, loader, PMatKFAC)
    dense = kfac.dense()
    lc = kfac.layer_collection
    p = dense.shape[0]
    v = PVector.from_flat(lc, torch.randn(p))
    torch.testing.assert_close(kfac.mv(v).flatten(), dense @ v.flatten())
    torch.testing.assert_close(kfac.vTMv(v), v.flatten() @ dense @ v.flatten())
    torch.testing.assert_close(kfac.diag(), torch.diagonal(dense))
    torch.testing.assert_close(kfac.trace(), torch.trace(dense))
    torch.testing.assert_close(kfac.frobenius_norm(), torch.linalg.matrix_norm(dense))
    torch.testing.assert_close((2.0 * kfac).dense(), 2.0 * dense)
    # the binary table: sums and differences are exact
    diag = FIM(model, loader, PMatDiag)
    torch.testing.assert_close((kfac + diag).dense(), dense + diag.dense())
    torch.testing.assert_close((kfac - kfac).dense(), torch.zeros_like(dense))
    torch.testing.assert_close(PMatDense.from_pmat(kfac).dense(), dense)
    # storage: the terms survive a round trip (weights_only loading)
    kfac.save(tmp_path / "kfac.pt")
    loaded = nnfim.load(tmp_path / "kfac.pt")
    assert isinstance(loaded, PMatKFAC) and list(loaded.terms) == ["tok"]
    torch.testing.assert_close(loaded.dense(), dense)
    # solve: eigenbases for plain layers, conjugate gradients on the sum
    x = kfac.solve(v, regul=0.1)
    expected = torch.linalg.solve(dense + 0.1 * torch.eye(p), v.flatten())
    torch.testing.assert_close(x.flatten(), expected)
    for call in (kfac.eigh, kfac.eigvalsh, lambda: kfac.inverse(0.1)):
        with pytest.raises(ValueError, match=r"\['tok'\].*lanczos"):
            call()
    with pytest.raises(ValueError, match="sums of Kronecker terms"):
        kfac.pow(0.5)


def test_kfac_terms_are_checked() -> None:
    model, loader = _case("shared_linear")
    kfac = FIM(model, loader, PMatKFAC)
    (a1, g1), (a2, _) = kfac.terms["a"]
    with pytest.raises(ValueError, match="the layer has 20 parameters"):
        PMatKFAC(
            kfac.layer_collection,
            kfac.factors,
            kfac.blocks,
            {"a": [(a1, g1), (a2[:, :2, :2], g1)]},
        )
    with pytest.raises(ValueError, match="both factors and terms"):
        PMatKFAC(
            kfac.layer_collection,
            {**kfac.factors, "a": (a1, g1)},
            kfac.blocks,
            kfac.terms,
        )
    # one term is a plain K-FAC layer
    one = PMatKFAC(kfac.layer_collection, kfac.factors, kfac.blocks, {"a": [(a1, g1)]})
    assert "a" in one.factors and not one.terms


class FunctionalHead(nn.Module):
    """A tied head written as a product in the parent's forward: no module call."""

    def __init__(self) -> None:
        super().__init__()
        self.tok = nn.Embedding(6, D)
        self.lin = nn.Linear(D, D)

    def forward(self, ids):
        h = self.lin(torch.tanh(self.tok(ids)).mean(1))
        return h @ self.tok.weight.t()


def test_a_use_outside_module_calls_falls_back() -> None:
    """The graph uses ``tok.weight`` twice, hooks see one call: torch.func computes it."""
    torch.manual_seed(0)
    model, loader = FunctionalHead(), [_tokens(4, 3, 6), _tokens(3, 3, 6)]
    rules = Generator(model, loader).rules()
    assert isinstance(rules["tok"], FallbackRule)
    assert not isinstance(rules["lin"], FallbackRule)
    with pytest.raises(ValueError, match="'weight' is used 2 times.*only 1"):
        FIM(model, loader, PMatDiag, strict=True)
    torch.testing.assert_close(
        FIM(model, loader, PMatDense).dense(), reference_fisher(model, loader)
    )


@pytest.mark.parametrize("refit", [False, True], ids=["update_diag", "refit"])
def test_ekfac_of_a_reused_module_refits_the_exact_diagonal(refit) -> None:
    """``S = diag(Q^T F Q)`` in the K-FAC basis of the stacked calls."""
    model, loader = _case("reused")
    ekfac = FIM(model, loader, PMatEKFAC, ekfac_refit=refit)
    if not refit:
        ekfac = ekfac.update_diag()
    qa, qg = ekfac.bases["lin"]
    q = torch.kron(qg[0], qa[0])
    sl = ekfac.layer_collection.layer_slice("lin")
    block = _reference("reused", "exact")[sl, sl]
    order = torch.arange(block.shape[0]).reshape(D, -1)
    # flat position -> Kronecker index, inverted
    kron = torch.argsort(torch.cat([order[:, :-1].reshape(-1), order[:, -1]]))
    expected = torch.diagonal(q.t() @ block[kron][:, kron] @ q)
    torch.testing.assert_close(ekfac.diags["lin"].reshape(-1), expected)


def test_distributed_world_of_one_with_tied_weights() -> None:
    """The gathered uses of a tied layer (NTK) and the reduced Kronecker terms."""
    import torch.distributed as dist

    model, loader = _case("encoder")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        ntk = NTK(model, loader, distributed=True)
        kfac = FIM(model, loader, PMatKFAC, distributed=True)
    finally:
        dist.destroy_process_group()
    torch.testing.assert_close(ntk.data, NTK(model, loader).data)
    assert list(kfac.terms) == ["tok"]
    torch.testing.assert_close(kfac.dense(), FIM(model, loader, PMatKFAC).dense())
