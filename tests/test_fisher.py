"""Every representation x variant x model against the torch.func dense reference."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from conftest import MODELS, VARIANTS, make_case
from torch import nn

from nnfim import (
    FIM,
    FIM_MonteCarlo,
    LayerCollection,
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
from nnfim.generator.jacobian import Generator
from nnfim.testing import reference_empirical_fisher, reference_fisher

REPRESENTATIONS = [
    PMatDense,
    PMatDiag,
    PMatBlockDiag,
    PMatImplicit,
    PMatLowRank,
    PMatQuasiDiag,
]
_REFS: dict[tuple[str, str, str], torch.Tensor] = {}


def reference(model_name: str, variant: str, fisher_type: str) -> torch.Tensor:
    key = (model_name, variant, fisher_type)
    if key not in _REFS:
        case = make_case(model_name, variant)
        fn = reference_fisher if fisher_type == "exact" else reference_empirical_fisher
        _REFS[key] = fn(
            case.reference_model,
            case.loader,
            "regression" if variant == "function" else variant,
        )
    return _REFS[key]


def block_mask(fim, p: int) -> torch.Tensor:
    mask = torch.zeros(p, p, dtype=torch.bool)
    for layer in fim.layer_collection:
        sl = fim.layer_collection.layer_slice(layer.name)
        mask[sl, sl] = True
    return mask


def quasi_mask(fim, p: int) -> torch.Tensor:
    """The diagonal plus, for weight+bias layers, each bias with its unit's weights."""
    mask = torch.eye(p, dtype=torch.bool)
    for layer in fim.layer_collection:
        shapes = dict(layer.params)
        if list(shapes) != ["weight", "bias"]:
            continue
        start = fim.layer_collection.layer_slice(layer.name).start
        out = shapes["weight"][0]
        per = int(torch.tensor(shapes["weight"][1:]).prod())
        for o in range(out):
            w = slice(start + o * per, start + (o + 1) * per)
            b = start + out * per + o
            mask[w, b] = True
            mask[b, w] = True
    return mask


def check_against(fim, ref: torch.Tensor) -> None:
    """Compare a representation with the dense reference where it must be exact."""
    p = ref.shape[0]
    atol = 1e-10 * max(1.0, float(ref.abs().max()))
    torch.testing.assert_close(fim.diag(), torch.diagonal(ref), rtol=1e-9, atol=atol)
    if isinstance(fim, (PMatDense, PMatLowRank)):
        torch.testing.assert_close(fim.dense(), ref, rtol=1e-9, atol=atol)
    elif isinstance(fim, PMatBlockDiag):
        expected = torch.where(block_mask(fim, p), ref, torch.zeros_like(ref))
        torch.testing.assert_close(fim.dense(), expected, rtol=1e-9, atol=atol)
    elif isinstance(fim, PMatImplicit):
        v = torch.randn(p)
        got = fim.mv(PVector.from_flat(fim.layer_collection, v)).flatten()
        torch.testing.assert_close(got, ref @ v, rtol=1e-9, atol=atol)
    elif isinstance(fim, PMatQuasiDiag):
        keep = quasi_mask(fim, p)
        expected = torch.where(keep, ref, torch.zeros_like(ref))
        torch.testing.assert_close(fim.dense(), expected, rtol=1e-9, atol=atol)
    elif isinstance(fim, PMatDiag):
        torch.testing.assert_close(
            fim.dense(), torch.diag(torch.diagonal(ref)), rtol=1e-9, atol=atol
        )


@pytest.mark.parametrize("representation", REPRESENTATIONS, ids=lambda r: r.__name__)
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("model_name", MODELS)
def test_exact_fisher(model_name: str, variant: str, representation: type) -> None:
    case = make_case(model_name, variant)
    fim = FIM(
        case.model,
        case.loader,
        representation,
        variant=variant,
        function=case.function,
    )
    check_against(fim, reference(model_name, variant, "exact"))


@pytest.mark.parametrize("representation", REPRESENTATIONS, ids=lambda r: r.__name__)
@pytest.mark.parametrize("variant", [v for v in VARIANTS if v != "function"])
@pytest.mark.parametrize("model_name", MODELS)
def test_empirical_fisher(model_name: str, variant: str, representation: type) -> None:
    case = make_case(model_name, variant)
    fim = FIM(
        case.model,
        case.loader,
        representation,
        variant=variant,
        fisher_type="empirical",
    )
    check_against(fim, reference(model_name, variant, "empirical"))


@pytest.mark.parametrize("model_name", MODELS)
def test_classif_logits_fisher_is_the_ggn(model_name: str) -> None:
    """For cross-entropy on logits the Fisher equals the Gauss-Newton matrix J^T (d2 loss) J."""
    from torch.func import hessian, vmap

    from nnfim.testing import reference_jacobian

    case = make_case(model_name, "classif_logits")
    jac, out = reference_jacobian(case.model, case.loader)
    h = vmap(hessian(lambda f: torch.logsumexp(f, -1)))(out)  # d2 CE / d f2, label-free
    ggn = torch.einsum("nci,ncd,ndj->ij", jac, h, jac) / jac.shape[0]
    fim = FIM(case.model, case.loader, PMatDense)
    torch.testing.assert_close(fim.dense(), ggn)


@pytest.mark.parametrize("variant", [v for v in VARIANTS if v != "function"])
def test_mc_fisher_is_reproducible_and_independent_of_global_rng(variant: str) -> None:
    case = make_case("mlp", variant)
    torch.manual_seed(123)
    a = FIM_MonteCarlo(
        case.model, case.loader, PMatDense, variant=variant, trials=3, seed=7
    )
    torch.manual_seed(999)
    torch.randn(10)
    b = FIM_MonteCarlo(
        case.model, case.loader, PMatDense, variant=variant, trials=3, seed=7
    )
    c = FIM_MonteCarlo(
        case.model, case.loader, PMatDense, variant=variant, trials=3, seed=8
    )
    assert torch.equal(a.dense(), b.dense())
    assert not torch.equal(a.dense(), c.dense())


@pytest.mark.parametrize(
    "representation", [PMatDiag, PMatBlockDiag, PMatImplicit], ids=lambda r: r.__name__
)
@pytest.mark.parametrize("variant", ["classif_logits", "classif_binary", "regression"])
def test_mc_representations_hold_the_same_matrix(
    variant: str, representation: type
) -> None:
    """With one seed every representation is a view of the same sampled Fisher."""
    case = make_case("cnn", variant)
    kwargs = {"variant": variant, "trials": 2, "seed": 3}
    dense = FIM_MonteCarlo(case.model, case.loader, PMatDense, **kwargs).dense()
    fim = FIM_MonteCarlo(case.model, case.loader, representation, **kwargs)
    check_against(fim, dense)


@pytest.mark.parametrize(
    "variant", ["classif_logits", "classif_logsoftmax", "classif_binary", "regression"]
)
def test_mc_fisher_converges_to_exact(variant: str) -> None:
    case = make_case("mlp", variant)
    exact = reference(case_name := "mlp", variant, "exact")
    errors = []
    for trials in (4, 4096):
        mc = FIM_MonteCarlo(
            case.model, case.loader, PMatDense, variant=variant, trials=trials, seed=0
        )
        errors.append(
            float(
                torch.linalg.matrix_norm(mc.dense() - exact)
                / torch.linalg.matrix_norm(exact)
            )
        )
    assert case_name == "mlp"
    # Monte-Carlo error shrinks like 1/sqrt(samples): 32x fewer, with margin.
    assert errors[1] < 0.05
    assert errors[1] < errors[0] / 8


def test_layer_collection_subset_gives_the_submatrix() -> None:
    from nnfim import LayerCollection

    case = make_case("mlp", "classif_logits")
    full = reference("mlp", "classif_logits", "exact")
    lc = LayerCollection.from_model(case.model, names=["0", "4"])
    fim = FIM(case.model, case.loader, PMatDense, layer_collection=lc)
    full_lc = LayerCollection.from_model(case.model)
    idx = torch.cat(
        [
            torch.arange(full_lc.layer_slice(n).start, full_lc.layer_slice(n).stop)
            for n in ("0", "4")
        ]
    )
    torch.testing.assert_close(fim.dense(), full[idx][:, idx])


def test_results_do_not_track_gradients() -> None:
    case = make_case("mlp", "classif_logits")
    for representation in (PMatDense, PMatDiag, PMatBlockDiag):
        fim = FIM(case.model, case.loader, representation)
        assert not fim.dense().requires_grad


@pytest.mark.parametrize("fisher_type", ["exact", "mc", "empirical"])
@pytest.mark.parametrize(
    "representation", [PMatDense, PMatDiag, PMatImplicit], ids=lambda r: r.__name__
)
def test_splitting_batches_changes_nothing(representation, fisher_type) -> None:
    """Sub-batches and chunks bound memory; the matrix (MC samples included) is the same."""
    case = make_case("cnn", "classif_logits")
    kwargs = {"fisher_type": fisher_type, "mc_samples": 3, "seed": 2}
    whole = FIM(case.model, case.loader, PMatDense, sub_batch=None, **kwargs).dense()
    for options in (
        {"sub_batch": 1},
        {"sub_batch": "auto", "chunk_size": 1},
        {"sub_batch": 4},
    ):
        fim = FIM(case.model, case.loader, representation, **kwargs, **options)
        check_against(fim, whole)


@pytest.mark.usefixtures("unjoined")
@pytest.mark.parametrize(("budget", "split"), [(1 << 24, False), (60, True)])
def test_auto_split_follows_the_element_budget(monkeypatch, budget, split) -> None:
    """Whole batches while K copies of the layer outputs fit the budget; else
    sub-batches of at least 2 n / K examples, as many as that takes and of
    equal sizes (batches of 6 and 4, K = C = 3 for the regression Fisher)."""
    from nnfim.generator import jacobian

    monkeypatch.setattr(jacobian, "SUB_BATCH_ELEMENTS", budget)
    case = make_case("mlp", "regression")
    kw = {"variant": "regression"}
    calls: list[int] = []
    handle = case.model.register_forward_hook(
        lambda _m, inputs, _o: calls.append(inputs[0].shape[0])
    )
    try:
        whole = FIM(case.model, case.loader, PMatDiag, sub_batch=None, **kw).diag()
        whole_calls = list(calls)
        calls.clear()
        diag = FIM(case.model, case.loader, PMatDiag, **kw).diag()
    finally:
        handle.remove()
    torch.testing.assert_close(diag, whole)
    if split:  # ceil(2 n / K) at most: 6 -> 4 + 2 -> 3 + 3, 4 -> 3 + 1 -> 2 + 2
        assert whole_calls == [2, 3, 6, 4]  # the layer check's 2 and 3 first
        assert calls == [2, 3, 3, 3, 2, 2]
    else:
        assert calls == whole_calls


@pytest.mark.usefixtures("unjoined")
@pytest.mark.parametrize(("budget", "split"), [(1 << 30, False), (1, True)])
def test_cpu_split_follows_the_saved_bytes(monkeypatch, budget, split) -> None:
    """On CPU, sub-batches keep the graph's saved bytes and the K output
    gradients under ``CPU_PIECE_BYTES`` (down to one example); the first batch,
    sized by the layer check, is then never run whole."""
    from nnfim.generator import jacobian

    monkeypatch.setattr(jacobian, "CPU_PIECE_BYTES", budget)
    case = make_case("cnn", "classif_logits")
    calls: list[int] = []
    handle = case.model.register_forward_hook(
        lambda _m, inputs, _o: calls.append(inputs[0].shape[0])
    )
    try:
        whole = FIM(case.model, case.loader, PMatDiag, sub_batch=None).diag()
        whole_calls = list(calls)
        calls.clear()
        diag = FIM(case.model, case.loader, PMatDiag).diag()
    finally:
        handle.remove()
    torch.testing.assert_close(diag, whole)
    probe = [2, 3]  # the layer check's forwards
    assert calls[:2] == whole_calls[:2] == probe
    if split:
        assert calls[2:] == [1] * sum(x.shape[0] for x, _ in case.loader)
    else:
        assert calls == whole_calls


@contextlib.contextmanager
def _forward_sizes(model: nn.Module) -> Iterator[list[int]]:
    """The batch size of every forward of ``model`` while the block runs."""
    calls: list[int] = []
    handle = model.register_forward_hook(
        lambda _m, inputs, _o: calls.append(inputs[0].shape[0])
    )
    try:
        yield calls
    finally:
        handle.remove()


def _random_vector(model: nn.Module) -> PVector:
    lc = LayerCollection.from_model(model)
    return PVector(lc, {k: torch.randn_like(p) for k, p in model.named_parameters()})


@pytest.mark.parametrize("fisher_type", ["exact", "mc", "empirical"])
@pytest.mark.parametrize(("budget", "split"), [(1 << 30, False), (1, True)])
def test_cpu_mv_splits_by_the_dual_forward(monkeypatch, fisher_type, budget, split):
    """On CPU, ``F v`` and ``J v`` cut a batch where the bytes its dual forward
    saves would pass ``CPU_PIECE_BYTES`` (measured once per loader by dual
    forwards of 2 and 3 examples), and join consecutive batches that fit in it
    together; the products, Monte-Carlo draws included, are those of the
    loader's batches as they come."""
    from nnfim.generator import jacobian

    monkeypatch.setattr(jacobian, "CPU_PIECE_BYTES", budget)
    case = make_case("cnn", "classif_logits")
    kw = {"fisher_type": fisher_type, "mc_samples": 2, "seed": 3}
    v = _random_vector(case.model)
    with _forward_sizes(case.model) as calls:
        whole = FIM(case.model, case.loader, PMatImplicit, sub_batch=None, **kw)
        whole_mv = whole.mv(v)
        assert calls == [6, 4]
        calls.clear()
        fim = FIM(case.model, case.loader, PMatImplicit, **kw)
        fv = fim.mv(v)
        first = list(calls)
        calls.clear()
        again = fim.mv(v)  # the same loader: not measured again
    for got in (fv, again):
        torch.testing.assert_close(
            got.flatten(), whole_mv.flatten(), rtol=1e-10, atol=1e-12
        )
    assert first[:2] == [2, 3]
    assert first[2:] == calls == ([1] * 10 if split else [10])
    gen = Generator(case.model, case.loader, sub_batch=None)
    jv = Generator(case.model, case.loader).jvp(v)
    torch.testing.assert_close(jv, gen.jvp(v), rtol=1e-12, atol=1e-12)


def _loader(sizes: list[int], seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Batches of the ``mlp`` test case's inputs and labels, of these sizes."""
    gen = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn(n, 5, generator=gen, dtype=torch.float64),
            torch.randint(0, 3, (n,), generator=gen),
        )
        for n in sizes
    ]


def _join_at_most(monkeypatch, model: nn.Module, loader: list[Any], most: int) -> None:
    """Set ``CPU_JOIN_BYTES`` so that runs of joined batches hold ``most`` examples."""
    from nnfim.generator import jacobian

    gen = Generator(model, loader)
    gen.mv(_random_vector(model))  # measures what one example's dual forward saves
    assert gen._dual_bytes is not None and gen._dual_bytes[1] > 0
    saved = gen._dual_bytes[1]
    monkeypatch.setattr(jacobian, "CPU_JOIN_BYTES", most * saved + saved // 2)


@pytest.mark.parametrize("fisher_type", ["exact", "mc", "empirical"])
def test_cpu_mv_joins_consecutive_batches_within_the_budget(
    monkeypatch, fisher_type
) -> None:
    """Batches of 3, 3, 4, 2 and 5 examples, at most 7 to a run: joined as
    3 + 3, 4 + 2, then 5 alone. ``F v`` (Monte-Carlo labels drawn per loader
    batch, in order), ``J v`` (rows in the loader's order) and ``J^T u`` are
    those of the batches one by one, and against the dense reference."""
    case = make_case("mlp", "classif_logits")
    loader = _loader([3, 3, 4, 2, 5])
    _join_at_most(monkeypatch, case.model, loader, 7)
    kw = {"fisher_type": fisher_type, "mc_samples": 2, "seed": 5}
    v = _random_vector(case.model)
    with _forward_sizes(case.model) as calls:
        fv = FIM(case.model, loader, PMatImplicit, **kw).mv(v)
    assert calls == [2, 3, 6, 6, 5]  # the measuring forwards, then the runs
    one_by_one = FIM(case.model, loader, PMatImplicit, sub_batch=None, **kw).mv(v)
    torch.testing.assert_close(fv.flatten(), one_by_one.flatten(), rtol=1e-10, atol=0)
    dense = FIM(case.model, loader, PMatDense, sub_batch=None, **kw).mv(v)
    torch.testing.assert_close(fv.flatten(), dense.flatten(), rtol=1e-10, atol=1e-12)
    jv = Generator(case.model, loader).jvp(v)
    rows = torch.cat(
        [Generator(case.model, [b], sub_batch=None).jvp(v) for b in loader]
    )
    torch.testing.assert_close(jv, rows, rtol=1e-12, atol=1e-12)


def test_cpu_mv_joins_single_examples(monkeypatch) -> None:
    """A loader of one example at a time (measured on copies of the first) is
    run 4 examples at a time, with the product of the examples one by one."""
    case = make_case("mlp", "classif_logits")
    loader = _loader([1] * 7)
    _join_at_most(monkeypatch, case.model, loader, 4)
    v = _random_vector(case.model)
    with _forward_sizes(case.model) as calls:
        fv = FIM(case.model, loader, PMatImplicit, fisher_type="mc").mv(v)
    assert calls == [2, 3, 4, 3]
    one_by_one = FIM(case.model, loader, PMatImplicit, fisher_type="mc", sub_batch=None)
    torch.testing.assert_close(
        fv.flatten(), one_by_one.mv(v).flatten(), rtol=1e-10, atol=0
    )


def test_cpu_mv_joins_only_batches_of_one_layout(monkeypatch) -> None:
    """Batches join only where every tensor has the same per-example shape and
    dtype: inputs of another width, a batch with an extra tensor and a dict
    batch come alone, and runs start again after them."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(6, 3)).double()
    gen = torch.Generator().manual_seed(1)

    def x(n: int, *shape: int) -> torch.Tensor:
        return torch.randn(n, *shape, generator=gen, dtype=torch.float64)

    loader: list[Any] = [
        (x(2, 6), torch.zeros(2)),
        (x(2, 6), torch.zeros(2)),
        (x(2, 2, 3), torch.zeros(2)),  # the same width, another shape
        (x(2, 6), torch.zeros(2), torch.ones(2)),
        (x(2, 6), torch.zeros(2)),
        (x(1, 6), torch.zeros(1)),
    ]
    _join_at_most(monkeypatch, model, loader, 100)
    v = _random_vector(model)
    with _forward_sizes(model) as calls:
        fv = FIM(model, loader, PMatImplicit).mv(v)
    assert calls == [2, 3, 4, 2, 2, 3]
    one_by_one = FIM(model, loader, PMatImplicit, sub_batch=None).mv(v)
    torch.testing.assert_close(fv.flatten(), one_by_one.flatten(), rtol=1e-12, atol=0)
    # an int sub_batch never joins
    with _forward_sizes(model) as calls:
        FIM(model, loader, PMatImplicit, sub_batch=4).mv(v)
    assert calls == [2, 2, 2, 2, 2, 1]


def test_cpu_mv_names_the_batch_of_a_joined_run_that_fails(monkeypatch) -> None:
    """A joined run whose outputs hold NaN names the loader batch they come
    from, as the batches one by one would."""
    case = make_case("mlp", "classif_logits")
    loader = _loader([3, 3, 4])
    _join_at_most(monkeypatch, case.model, loader, 100)
    loader[2][0][1, 0] = float("nan")
    v = _random_vector(case.model)
    with _forward_sizes(case.model) as calls:
        with pytest.raises(
            ValueError, match=r"^batch 2: the model's outputs contain NaN"
        ):
            FIM(case.model, loader, PMatImplicit).mv(v)
    assert calls[2:] == [10, 3, 3, 4]  # the run, then one by one to name the batch


def _join_passes_at_most(
    monkeypatch, model: nn.Module, loader: list[Any], most: int, **kw: Any
) -> None:
    """Set ``CPU_JOIN_BYTES`` so that a layer pass joins ``most`` examples a run:
    per example, what the forward saves and the ``K`` output gradients."""
    from nnfim.generator import jacobian

    gen = Generator(model, loader, **kw)
    gen.rules()
    sizes = gen._sizes
    assert sizes is not None and sizes.saved is not None
    k = gen._n_directions(sizes.width)
    piece = sizes.saved + k * sum(sizes.outputs.values()) * 8  # float64
    monkeypatch.setattr(jacobian, "CPU_JOIN_BYTES", most * piece + piece // 2)


@pytest.mark.parametrize("fisher_type", ["exact", "mc", "empirical"])
@pytest.mark.parametrize(
    ("representation", "forwards"),
    [
        (PMatDiag, [6, 6, 5]),
        (PMatQuasiDiag, [6, 6, 5]),
        (PMatKFAC, [6, 6, 5]),
        (PMatEKFAC, [6, 6, 5]),
        # per-example rows grow with the piece: batches as they come
        (PMatBlockDiag, [3, 3, 4, 2, 5]),
        (PMatDense, [3, 3, 4, 2, 5]),
    ],
)
def test_cpu_layer_pass_joins_consecutive_batches(
    monkeypatch, representation, forwards, fisher_type
) -> None:
    """The sums of per-example products (diagonals, K-FAC, EKFAC) join batches
    of 3, 3, 4, 2 and 5 examples, at most 7 to a run, as 3 + 3, 4 + 2 and 5,
    after the layer check's forwards of 2 and 3 examples; every representation
    (Monte-Carlo labels drawn per loader batch) is that of the batches one by
    one."""
    case = make_case("mlp", "classif_logits")
    loader = _loader([3, 3, 4, 2, 5])
    kw = {"fisher_type": fisher_type, "mc_samples": 2, "seed": 7}
    _join_passes_at_most(monkeypatch, case.model, loader, 7, **kw)
    with _forward_sizes(case.model) as calls:
        joined = FIM(case.model, loader, representation, **kw)
    assert calls[:2] == [2, 3]
    assert calls[2 : 2 + len(forwards)] == forwards
    one_by_one = FIM(case.model, loader, representation, sub_batch=None, **kw)
    torch.testing.assert_close(
        joined.dense(), one_by_one.dense(), rtol=1e-10, atol=1e-13
    )


def test_batches_cut_from_one_tensor_join_without_a_copy(monkeypatch) -> None:
    """Loader batches that lie end to end in one tensor (``x.split``) are
    joined as a view of it; others (a gap, a tensor that requires gradients)
    are copied. Either way the matrices are those of the batches one by one,
    and the data is untouched."""
    from nnfim.generator._passes import join_batches

    x = torch.randn(12, 5, dtype=torch.float64)
    joined = join_batches(list(x.split(5)))
    assert joined.data_ptr() == x.data_ptr() and torch.equal(joined, x)
    pair = join_batches([(x[2:4], x[2:4, 0]), (x[4:9], x[4:9, 0])])
    assert pair[0].data_ptr() == x[2].data_ptr() and torch.equal(pair[0], x[2:9])
    assert torch.equal(pair[1], x[2:9, 0])  # strided parts: a copy
    for parts in ([x[:3], x[4:6]], [x[4:6], x[:3]], list(x.requires_grad_().split(5))):
        out = join_batches(parts)
        assert out.data_ptr() != x.data_ptr() and torch.equal(out, torch.cat(parts))
    x.requires_grad_(False)
    lazy = torch.randn(6, 2, dtype=torch.complex128).conj()  # a flag of the view
    out = join_batches(list(lazy.split(3)))
    assert torch.equal(out, lazy) and not out.is_conj()

    case = make_case("mlp", "classif_logits")
    data = _loader([3, 3, 4, 2, 5])
    xs, ys = (torch.cat(t) for t in zip(*data, strict=True))
    before = xs.clone()
    sizes = [3, 3, 4, 2, 5]
    loader = list(zip(xs.split(sizes), ys.split(sizes), strict=True))
    kw = {"fisher_type": "mc", "seed": 3}
    _join_passes_at_most(monkeypatch, case.model, loader, 7, **kw)
    with _forward_sizes(case.model) as calls:
        joined_fim = FIM(case.model, loader, PMatDiag, **kw)
    assert calls[2:] == [6, 6, 5]
    one_by_one = FIM(case.model, data, PMatDiag, sub_batch=None, **kw)
    torch.testing.assert_close(joined_fim.diag(), one_by_one.diag(), rtol=1e-10, atol=0)
    _join_at_most(monkeypatch, case.model, loader, 7)
    v = _random_vector(case.model)
    torch.testing.assert_close(
        FIM(case.model, loader, PMatImplicit).mv(v).flatten(),
        FIM(case.model, data, PMatImplicit, sub_batch=None).mv(v).flatten(),
        rtol=1e-10,
        atol=1e-13,
    )
    assert torch.equal(xs, before)


def test_cpu_layer_pass_names_the_batch_of_a_joined_run_that_fails(
    monkeypatch,
) -> None:
    """A joined run whose outputs hold NaN names the loader batch it comes from."""
    case = make_case("mlp", "classif_logits")
    loader = _loader([3, 3, 4])
    _join_passes_at_most(monkeypatch, case.model, loader, 100)
    loader[1][0][2, 1] = float("nan")
    with _forward_sizes(case.model) as calls:
        with pytest.raises(
            ValueError, match=r"^batch 1: the model's outputs contain NaN or inf"
        ):
            FIM(case.model, loader, PMatDiag)
    assert calls[2:] == [10, 3, 3]  # the run, then one by one up to the bad batch


def test_a_loader_that_reuses_its_tensors_is_refused_where_batches_join() -> None:
    """A loader writing every batch into the same tensors would have the held
    batches overwritten before they are joined: refused, with what to do;
    with ``sub_batch=None`` each batch is used before the next is made."""
    case = make_case("mlp", "classif_logits")
    data = _loader([3, 3, 4, 2])
    x_buf, y_buf = torch.empty(4, 5, dtype=torch.float64), torch.empty(4).long()

    class Reusing:
        def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
            for x, y in data:
                x_buf[: len(x)].copy_(x)
                y_buf[: len(y)].copy_(y)
                yield x_buf[: len(x)], y_buf[: len(y)]

    v = _random_vector(case.model)
    for representation in (PMatDiag, PMatImplicit):
        with pytest.raises(
            ValueError, match="batch 0 changed in place.*sub_batch=None"
        ):
            FIM(case.model, Reusing(), representation).mv(v)
    got = FIM(case.model, Reusing(), PMatDiag, sub_batch=None).diag()
    want = FIM(case.model, data, PMatDiag, sub_batch=None).diag()
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)


def test_mv_takes_a_users_sub_batch_in_equal_pieces() -> None:
    """An int ``sub_batch`` cuts the product's batches too, with no measuring
    forwards: 6 by at most 4 -> 3 + 3, 4 -> 4."""
    case = make_case("mlp", "classif_logits")
    v = _random_vector(case.model)
    with _forward_sizes(case.model) as calls:
        fv = FIM(case.model, case.loader, PMatImplicit, sub_batch=4).mv(v)
    assert calls == [3, 3, 4]
    whole = FIM(case.model, case.loader, PMatDense, sub_batch=None).mv(v)
    torch.testing.assert_close(fv.flatten(), whole.flatten(), rtol=1e-10, atol=1e-12)


def test_dual_forward_bytes_count_the_inputs_kept() -> None:
    """A Linear layer's dual forward keeps at least its input per example (5
    float64 values) and far less than the batch: the growth from 2 to 3
    examples, parameters and their tangents cancelling."""
    model = nn.Linear(5, 7).double()
    batch = (torch.randn(8, 5, dtype=torch.float64), torch.zeros(8))
    gen = Generator(model, [batch])
    tangents = {k: torch.ones_like(p) for k, p in gen.params.items()}
    saved = gen._dual_saved(0, batch, tangents)
    assert saved is not None and 5 * 8 <= saved <= 4 * 5 * 8
    assert (
        Generator(model, [batch], sub_batch=None)._dual_saved(0, batch, tangents)
        is None
    )


def test_layer_check_measures_per_example_sizes() -> None:
    """The 2- and 3-example forwards give each layer's output elements per
    example and the bytes the graph saves per example: Linear(5, 7) saves its
    input (5), Tanh its output (7), the in-place ReLU its output (6), which the
    last Linear reads (the same tensor, counted once)."""
    case = make_case("mlp", "classif_logits")
    gen = Generator(case.model, case.loader)
    gen.rules()
    sizes = gen._sizes
    assert sizes is not None and sizes.loader is case.loader
    assert sizes.width == 3
    assert sizes.outputs == {"0": 7, "2": 6, "4": 3}
    assert sizes.shared == {}
    assert sizes.saved == (5 + 7 + 6) * 8  # float64
    assert not sizes.slow_batching
    # a sub-batch size of the user's: nothing to bound, nothing counted
    fixed = Generator(case.model, case.loader, sub_batch=4)
    fixed.rules()
    assert fixed._sizes is not None and fixed._sizes.saved is None
    # another loader: the first batch is forwarded whole to size the pass
    other = gen.with_loader(case.loader[1:])
    assert other._sizes is not None and other._sizes.loader is not other.loader


def test_saved_bytes_count_each_tensor_once_and_skip_sparse() -> None:
    from nnfim.generator.jacobian import _SavedBytes

    counter = _SavedBytes()
    t = torch.zeros(4, 3)
    for saved in (t, t, t[1:], torch.eye(3).to_sparse()):
        assert counter.pack(saved) is saved
    assert counter.total == (12 + 9) * t.element_size()


def test_layer_check_sizes_a_shared_table_per_example() -> None:
    """A positional table's output does not grow with the batch: it is held
    apart, and the pass counts it per example once the layer is expanded."""

    class Positions(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.pos = nn.Embedding(3, 4)
            self.lin = nn.Linear(4, 5)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.lin((x + self.pos(torch.arange(3))).mean(1))

    torch.manual_seed(0)
    model = Positions()
    loader = [(torch.randn(6, 3, 4), torch.randint(0, 5, (6,)))]
    gen = Generator(model, loader)
    gen.rules()
    assert gen._broadcast == {"pos"}
    assert gen._sizes is not None
    assert gen._sizes.outputs == {"pos": 0, "lin": 5}
    assert gen._sizes.shared == {"pos": 12}


def test_bad_split_options() -> None:
    case = make_case("mlp", "classif_logits")
    with pytest.raises(ValueError, match="sub_batch"):
        FIM(case.model, case.loader, PMatDiag, sub_batch=0)
    with pytest.raises(ValueError, match="chunk_size"):
        FIM(case.model, case.loader, PMatDense, chunk_size=-1)


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
@pytest.mark.parametrize(
    "representation", [PMatDense, PMatDiag], ids=lambda r: r.__name__
)
def test_looped_directions_equal_batched(monkeypatch, kind, representation) -> None:
    """Directions backpropagated one by one or batched: the same matrix."""
    from nnfim.generator import jacobian

    case = make_case(kind, "classif_logits")
    monkeypatch.setattr(jacobian, "batching_is_slow", lambda out: False)
    batched = jacobian.Generator(case.model, case.loader)
    looped = jacobian.Generator(case.model, case.loader)
    looped._batched = False
    if representation is PMatDense:
        torch.testing.assert_close(looped.dense(), batched.dense())
    else:
        torch.testing.assert_close(looped.diag(), batched.diag())
    assert batched._batched and not looped._batched


@pytest.mark.parametrize(("kind", "batched"), [("mlp", True), ("cnn", False)])
def test_convolutions_backpropagate_directions_one_by_one(kind, batched) -> None:
    """Convolution and pooling batching rules loop internally: a loop is faster."""
    from nnfim.generator.jacobian import Generator

    case = make_case(kind, "classif_logits")
    gen = Generator(case.model, case.loader)
    gen.diag()
    assert gen._batched is batched


def test_missing_batching_rule_switches_to_a_loop(monkeypatch) -> None:
    import warnings

    from nnfim.generator.jacobian import Generator

    original = torch.autograd.grad

    def warns_when_batched(*args, **kwargs):
        if kwargs.get("is_grads_batched"):
            warnings.warn(
                "There is a performance drop because we have not yet implemented the batching rule for aten::x",
                UserWarning,
                stacklevel=2,
            )
        return original(*args, **kwargs)

    monkeypatch.setattr(torch.autograd, "grad", warns_when_batched)
    case = make_case("cnn", "classif_logits")
    gen = Generator(case.model, case.loader)
    diag = gen.diag()
    assert (
        not gen._batched
    )  # switched after the first batch, without a warning escaping
    torch.testing.assert_close(
        diag, torch.diagonal(reference("cnn", "classif_logits", "exact"))
    )
