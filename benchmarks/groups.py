"""Every group of the suite and the library cases that compute it.

A group is one row of the issue's target table (or a transformer or fallback
row); its cases are the floor, nnfim, and every peer that can compute the same
quantity. ``CASES`` is the table the suite runs; ``--only GLOB`` selects from
it by ``group/lib`` name.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from benchmarks import func, peers
from benchmarks.suite import Case, Convert, Group, Thunk, floor_case
from benchmarks.workloads import Workload, flat, named_order, probe

#: relative error of a one-sample Monte-Carlo diagonal against the exact one
#: above which it is flagged: seen 0.13-0.16 on the MLP with 512 examples
#: (--quick), for all four libraries; the noise shrinks as 1/sqrt(n); a wrong
#: scale (sum for mean, a factor 2) gives 1 or more
MC_RTOL = 0.4
#: nnfim's ``sub_batch`` argument: ``"auto"`` (the default), ``None`` or a size
SubBatch = int | str | None


# -- nnfim ------------------------------------------------------------------------
def _lc(w: Workload) -> Any:
    import nnfim

    return nnfim.LayerCollection.from_model(w.model)


def _to_named(w: Workload) -> Callable[[torch.Tensor], torch.Tensor]:
    """nnfim's flat layout (LayerCollection order) to ``named_parameters`` order."""
    idx = named_order(w.model, _lc(w).param_names)
    return lambda t: t[..., idx]


def nnfim_diag(
    w: Workload, mc: bool = False, sub_batch: SubBatch = "auto"
) -> tuple[Thunk, Convert]:
    import nnfim

    fisher = "mc" if mc else "exact"

    def run() -> torch.Tensor:
        return nnfim.FIM(
            w.model, w.batches, nnfim.PMatDiag, fisher_type=fisher, sub_batch=sub_batch
        ).diag()

    return run, _to_named(w)


def nnfim_kfac(
    w: Workload, ekfac: bool = False, sub_batch: SubBatch = "auto"
) -> tuple[Thunk, Convert]:
    import nnfim

    v = nnfim.PVector(_lc(w), probe(w.model))
    to_named = _to_named(w)

    def run() -> Any:
        if ekfac:  # the refit reuses the K-FAC pass's layer inputs and gradients
            fim = nnfim.FIM(
                w.model,
                w.batches,
                nnfim.PMatEKFAC,
                ekfac_refit=True,
                sub_batch=sub_batch,
            )
        else:
            fim = nnfim.FIM(w.model, w.batches, nnfim.PMatKFAC, sub_batch=sub_batch)
        return fim.mv(v)

    return run, lambda out: to_named(out.flatten())


def nnfim_dense(w: Workload) -> tuple[Thunk, Convert]:
    import nnfim

    idx = named_order(w.model, _lc(w).param_names)

    def run() -> torch.Tensor:
        return nnfim.FIM(w.model, w.batches, nnfim.PMatDense).dense()

    return run, lambda out: out[idx][:, idx]


def nnfim_mv(w: Workload, sub_batch: SubBatch = "auto") -> tuple[Thunk, Convert]:
    import nnfim

    v = nnfim.PVector(_lc(w), probe(w.model))
    to_named = _to_named(w)

    def run() -> Any:  # building the implicit matrix is part of the product
        fim = nnfim.FIM(w.model, w.batches, nnfim.PMatImplicit, sub_batch=sub_batch)
        return fim.mv(v)

    return run, lambda out: to_named(out.flatten())


def nnfim_pegrads(w: Workload) -> tuple[Thunk, Convert]:
    import nnfim

    to_named = _to_named(w)

    def run() -> torch.Tensor:
        return nnfim.per_example_grads(w.model, w.batches)

    return run, lambda out: to_named(out[: func.PEG_ROWS])


def nnfim_ntk(w: Workload) -> tuple[Thunk, Convert]:
    import nnfim

    return lambda: nnfim.NTK(w.model, w.batches), lambda out: out.data


def nnfim_lm_kfac(w: Workload) -> tuple[Thunk, Convert]:
    """Monte-Carlo K-FAC of the whole transformer, tied embedding and head included.

    The tied token embedding is held as an exact sum of two Kronecker terms
    (its embedding use and its head use, :mod:`nnfim.generator.shared`).
    """
    import nnfim

    def run() -> Any:
        return nnfim.FIM(w.model, w.batches, nnfim.PMatKFAC, fisher_type="mc")

    return run, lambda out: None


def backpack_kfac_reference(w: Workload) -> torch.Tensor:
    """nnfim's K-FAC factors in BackPACK's conventions, applied to the probe vector.

    BackPACK treats weight and bias as two blocks (no cross terms): the weight
    gets ``A`` without nnfim's constant-1 row and column, the bias ``G`` alone.
    For a Conv2d its ``A`` sums the patches over the ``T`` output positions
    (``T`` x nnfim's KFAC-expand ``A``) and its ``G`` sums the output gradients
    over positions before the outer product (nnfim's KFAC-reduce ``G``).
    """
    import nnfim

    expand = nnfim.FIM(w.model, w.batches, nnfim.PMatKFAC)
    reduce = nnfim.FIM(w.model, w.batches, nnfim.PMatKFAC, kfac_convention="reduce")
    v, out = probe(w.model), {}
    for name, module in w.model.named_modules():
        if not isinstance(module, (nn.Linear, nn.Conv2d)):
            continue
        # same padding, stride 1: as many output positions as input pixels
        positions = 32 * 32 if isinstance(module, nn.Conv2d) else 1
        a = expand.factors[name][0][0, :-1, :-1] * positions
        g = reduce.factors[name][1][0]
        vw = v[f"{name}.weight"]
        out[f"{name}.weight"] = (g @ vw.reshape(vw.shape[0], -1) @ a).reshape(vw.shape)
        out[f"{name}.bias"] = g @ v[f"{name}.bias"]
    return flat(w.model, out)


def exact_diag_reference(w: Workload) -> torch.Tensor:
    """The exact diagonal (nnfim's; checked against every peer in ``*_diag``)."""
    thunk, convert = nnfim_diag(w)
    out = convert(thunk())
    assert out is not None
    return out


def _mc(fn: Callable[..., tuple[Thunk, Convert]]) -> Any:
    return lambda w: fn(w, mc=True)


def _ekfac(fn: Callable[..., tuple[Thunk, Convert]]) -> Any:
    return lambda w: fn(w, ekfac=True)


_KFLR: dict[str, Any] = {
    "reference": backpack_kfac_reference,
    "against": "nnfim factors in BackPACK's convention",
}


# -- the groups -------------------------------------------------------------------
_MC_AGREEMENT: dict[str, Any] = {
    "reference": exact_diag_reference,
    "against": "exact diag",
    "rtol": MC_RTOL,
}
G = {
    g.name: g
    for g in (
        Group("mlp_diag", "mlp", "exact diagonal", 10, quick=True),
        Group(
            "mlp_mc_diag",
            "mlp",
            "MC diagonal, one sample",
            1,
            quick=True,
            **_MC_AGREEMENT,
        ),
        Group("mlp_kfac", "mlp", "KFAC + one mv", 10, quick=True),
        Group("mlp_ekfac", "mlp", "EKFAC with diagonal refit + one mv", 10),
        Group("small_dense", "small", "dense FIM (2,410 x 2,410)", 10, quick=True),
        Group("mlp_mv", "mlp", "implicit Fisher-vector product", 2, quick=True),
        Group("mlp_pegrads", "mlp", "per-example gradients (n, P)", 1),
        Group("cnn_diag", "cnn", "exact diagonal", 10),
        Group("cnn_kfac", "cnn", "KFAC + one mv", 10),
        Group("cnn_mv", "cnn", "implicit Fisher-vector product", 2),
        Group("ntk", "ntk", "NTK Gram (C, n, C, n)", 10, quick=True),
        Group(
            "lm_mc_diag",
            "lm",
            "MC diagonal, one sample",
            1,
            agreement_note="none: no exact reference (C = 1,000), MC draws differ",
            compare=False,
        ),
        Group(
            "lm_kfac",
            "lm",
            "MC KFAC, tied embedding and head as two Kronecker terms",
            1,
            agreement_note="no peer handles attention",
        ),
        Group("lm_pegrads", "lm", "per-example gradients (n, P)", 1),
        Group(
            "fallback_diag",
            "mlp_fallback",
            "exact diagonal, middle layer through the torch.func fallback",
            10,
            target=False,
        ),
    )
}
CASES: tuple[Case, ...] = (
    floor_case(G["mlp_diag"]),
    Case(G["mlp_diag"], "nnfim", nnfim_diag),
    Case(G["mlp_diag"], "nngeometry", peers.nngeometry_diag, "nngeometry"),
    Case(G["mlp_diag"], "backpack", peers.backpack_diag, "backpack"),
    Case(G["mlp_diag"], "torch.func", func.func_diag, quick=False),
    floor_case(G["mlp_mc_diag"]),
    Case(G["mlp_mc_diag"], "nnfim", _mc(nnfim_diag)),
    Case(G["mlp_mc_diag"], "nngeometry", _mc(peers.nngeometry_diag), "nngeometry"),
    Case(G["mlp_mc_diag"], "backpack", _mc(peers.backpack_diag), "backpack"),
    Case(G["mlp_mc_diag"], "torch.func", func.func_mc_diag, quick=False),
    floor_case(G["mlp_kfac"]),
    Case(G["mlp_kfac"], "nnfim", nnfim_kfac),
    Case(G["mlp_kfac"], "nngeometry", peers.nngeometry_kfac, "nngeometry"),
    Case(G["mlp_kfac"], "backpack", peers.backpack_kfac, "backpack", **_KFLR),
    Case(G["mlp_kfac"], "curvlinops", peers.curvlinops_kfac, "curvlinops"),
    floor_case(G["mlp_ekfac"]),
    Case(G["mlp_ekfac"], "nnfim", _ekfac(nnfim_kfac)),
    Case(G["mlp_ekfac"], "nngeometry", _ekfac(peers.nngeometry_kfac), "nngeometry"),
    Case(G["mlp_ekfac"], "curvlinops", _ekfac(peers.curvlinops_kfac), "curvlinops"),
    floor_case(G["small_dense"]),
    Case(G["small_dense"], "nnfim", nnfim_dense),
    Case(G["small_dense"], "nngeometry", peers.nngeometry_dense, "nngeometry"),
    Case(G["small_dense"], "backpack", peers.backpack_dense, "backpack"),
    Case(
        G["small_dense"],
        "curvlinops",
        peers.curvlinops_dense,
        "curvlinops",
        quick=False,
    ),
    Case(G["small_dense"], "torch.func", func.func_dense),
    floor_case(G["mlp_mv"]),
    Case(G["mlp_mv"], "nnfim", nnfim_mv),
    Case(G["mlp_mv"], "nngeometry", peers.nngeometry_mv, "nngeometry"),
    Case(G["mlp_mv"], "backpack", peers.backpack_mv, "backpack"),
    Case(G["mlp_mv"], "curvlinops", peers.curvlinops_mv, "curvlinops"),
    Case(G["mlp_mv"], "torch.func", func.func_mv),
    floor_case(G["mlp_pegrads"]),
    Case(G["mlp_pegrads"], "nnfim", nnfim_pegrads),
    Case(G["mlp_pegrads"], "backpack", peers.backpack_pegrads, "backpack"),
    Case(G["mlp_pegrads"], "torch.func", func.func_pegrads),
    floor_case(G["cnn_diag"]),
    Case(G["cnn_diag"], "nnfim", nnfim_diag),
    Case(G["cnn_diag"], "nngeometry", peers.nngeometry_diag, "nngeometry"),
    Case(G["cnn_diag"], "backpack", peers.backpack_diag, "backpack"),
    Case(G["cnn_diag"], "torch.func", func.func_diag),
    floor_case(G["cnn_kfac"]),
    Case(G["cnn_kfac"], "nnfim", nnfim_kfac),
    Case(G["cnn_kfac"], "nngeometry", peers.nngeometry_kfac, "nngeometry"),
    Case(G["cnn_kfac"], "backpack", peers.backpack_kfac, "backpack", **_KFLR),
    Case(G["cnn_kfac"], "curvlinops", peers.curvlinops_kfac, "curvlinops"),
    floor_case(G["cnn_mv"]),
    Case(G["cnn_mv"], "nnfim", nnfim_mv),
    Case(G["cnn_mv"], "nngeometry", peers.nngeometry_mv, "nngeometry"),
    Case(G["cnn_mv"], "backpack", peers.backpack_mv, "backpack"),
    Case(G["cnn_mv"], "curvlinops", peers.curvlinops_mv, "curvlinops"),
    Case(G["cnn_mv"], "torch.func", func.func_mv),
    floor_case(G["ntk"]),
    Case(G["ntk"], "nnfim", nnfim_ntk),
    Case(G["ntk"], "nngeometry", peers.nngeometry_ntk, "nngeometry"),
    Case(G["ntk"], "torch.func", func.func_ntk),
    floor_case(G["lm_mc_diag"]),
    Case(G["lm_mc_diag"], "nnfim", _mc(nnfim_diag)),
    Case(G["lm_mc_diag"], "torch.func", func.func_mc_diag),
    floor_case(G["lm_kfac"]),
    Case(G["lm_kfac"], "nnfim", nnfim_lm_kfac),
    floor_case(G["lm_pegrads"]),
    Case(G["lm_pegrads"], "nnfim", nnfim_pegrads),
    Case(G["lm_pegrads"], "torch.func", func.func_pegrads),
    floor_case(G["fallback_diag"]),
    Case(G["fallback_diag"], "nnfim", nnfim_diag),
    Case(G["fallback_diag"], "torch.func", func.func_diag),
)
CASE_BY_NAME = {case.name: case for case in CASES}
