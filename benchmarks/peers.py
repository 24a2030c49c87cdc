"""The peer libraries' cases: NNGeometry, BackPACK and curvlinops.

Each ``prepare`` imports its library (the suite checks it is installed first),
builds what the timer must not see (loaders, probe vectors in the library's
own type, extended modules) and returns the timed thunk and the converter of
its result to the group's common layout: ``named_parameters`` order, mean over
examples, nnfim's conventions (see ``benchmarks/README.md``).
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn

from benchmarks.func import PEG_ROWS
from benchmarks.suite import Convert, Thunk
from benchmarks.workloads import Workload, cnn_avgpool, flat, probe


def _cat(out: list[torch.Tensor] | tuple[torch.Tensor, ...]) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in out])


# -- NNGeometry -----------------------------------------------------------------
def nngeometry_loader(w: Workload) -> Any:
    """A DataLoader (NNGeometry counts examples with ``len(loader.sampler)``).

    It hands out slices of the stored tensors (``__getitems__``, no collation):
    a default ``TensorDataset`` loader would add ~20-50 ms of indexing and
    collating per pass that the other libraries, reading a list, do not pay.
    """
    from torch.utils.data import DataLoader, TensorDataset

    class Slices(TensorDataset):
        def __getitems__(self, index: list[int]) -> list[torch.Tensor]:
            sl = slice(index[0], index[-1] + 1)
            return [t[sl].clone() for t in self.tensors]

    x = torch.cat([x for x, _ in w.batches])
    y = torch.cat([y for _, y in w.batches])
    size = w.batches[0][0].shape[0]
    return DataLoader(Slices(x, y), batch_size=size, collate_fn=lambda b: b)


def nngeometry_vector(w: Workload) -> Any:
    from nngeometry.layercollection import LayerCollection
    from nngeometry.object import PVector

    lc = LayerCollection.from_model(w.model)
    v = probe(w.model)
    return PVector(
        lc,
        dict_repr={
            layer: tuple(v[f"{layer}.{p}"] for p in ("weight", "bias"))
            for layer in lc.layers
        },
    )


def nngeometry_flat(w: Workload, out: Any) -> torch.Tensor:
    """A PVector, or a flat tensor in NNGeometry's layer order, in ours."""
    from nngeometry.layercollection import LayerCollection
    from nngeometry.object import PVector

    if not isinstance(out, PVector):
        out = PVector(LayerCollection.from_model(w.model), vector_repr=out)
    by_name = {
        f"{layer}.{p}": t
        for layer, ts in out.to_dict().items()
        for p, t in zip(("weight", "bias"), ts, strict=False)
    }
    return flat(w.model, by_name)


def nngeometry_diag(w: Workload, mc: bool = False) -> tuple[Thunk, Convert]:
    from nngeometry.metrics import FIM, FIM_MonteCarlo
    from nngeometry.object import PMatDiag

    loader = nngeometry_loader(w)

    def run() -> torch.Tensor:
        if mc:
            return FIM_MonteCarlo(w.model, loader, PMatDiag, trials=1).get_diag()
        return FIM(w.model, loader, PMatDiag, variant="classif_logits").get_diag()

    return run, lambda out: nngeometry_flat(w, out)


def nngeometry_kfac(w: Workload, ekfac: bool = False) -> tuple[Thunk, Convert]:
    from nngeometry.metrics import FIM
    from nngeometry.object import PMatEKFAC, PMatKFAC

    loader, v = nngeometry_loader(w), nngeometry_vector(w)

    def run() -> Any:
        if ekfac:
            fim = FIM(w.model, loader, PMatEKFAC, variant="classif_logits")
            fim.update_diag(loader)
        else:
            fim = FIM(w.model, loader, PMatKFAC, variant="classif_logits")
        return fim.mv(v)

    return run, lambda out: nngeometry_flat(w, out)


def nngeometry_dense(w: Workload) -> tuple[Thunk, Convert]:
    from nngeometry.metrics import FIM
    from nngeometry.object import PMatDense

    loader = nngeometry_loader(w)
    # NNGeometry's order is ours for these Sequential models (layer by layer,
    # weight then bias); the agreement check would show any difference
    return lambda: FIM(w.model, loader, PMatDense).to_torch(), lambda out: out


def nngeometry_mv(w: Workload) -> tuple[Thunk, Convert]:
    from nngeometry.metrics import FIM
    from nngeometry.object import PMatImplicit

    loader, v = nngeometry_loader(w), nngeometry_vector(w)

    def run() -> Any:
        return FIM(w.model, loader, PMatImplicit, variant="classif_logits").mv(v)

    return run, lambda out: nngeometry_flat(w, out)


def nngeometry_ntk(w: Workload) -> tuple[Thunk, Convert]:
    from nngeometry.metrics import FIM
    from nngeometry.object import FMatDense

    loader = nngeometry_loader(w)

    def run() -> Any:
        return FIM(w.model, loader, FMatDense, variant="regression")

    return run, lambda out: out.data


# -- BackPACK -------------------------------------------------------------------
def _backpack_model(w: Workload, reduction: str = "mean") -> tuple[nn.Module, Any]:
    """The extended model and loss (CNN: ``AvgPool2d(8)``, no adaptive pooling)."""
    from backpack import extend

    # BackPACK's hooks: harmless here (the inputs do not require gradients)
    warnings.filterwarnings("ignore", message="Full backward hook is firing")
    model = cnn_avgpool(w.model) if w.kind == "cnn" else w.model
    return extend(model), extend(nn.CrossEntropyLoss(reduction=reduction))


def _backpack_mean(
    w: Workload, extension: Any, attr: str
) -> tuple[list[nn.Parameter], Thunk]:
    """Per batch ``loss.backward()`` under ``extension``; ``attr`` averaged.

    With ``reduction="mean"`` each batch's quantity is a batch mean: weighting
    by batch size gives the data mean.
    """
    from backpack import backpack

    model, loss_fn = _backpack_model(w)
    params = list(model.parameters())

    def run() -> list[torch.Tensor]:
        acc = [torch.zeros_like(p) for p in params]
        for x, y in w.batches:
            loss = loss_fn(model(x), y)
            with backpack(extension):
                loss.backward()
            for a, p in zip(acc, params, strict=True):
                a.add_(getattr(p, attr), alpha=x.shape[0] / w.n_examples)
        return acc

    return params, run


def backpack_diag(w: Workload, mc: bool = False) -> tuple[Thunk, Convert]:
    from backpack.extensions import DiagGGNExact, DiagGGNMC

    ext, attr = (
        (DiagGGNMC(mc_samples=1), "diag_ggn_mc")
        if mc
        else (DiagGGNExact(), "diag_ggn_exact")
    )
    _, run = _backpack_mean(w, ext, attr)
    return run, _cat


def backpack_kfac(w: Workload) -> tuple[Thunk, Convert]:
    """KFLR (exact loss Hessian) factors of every batch, averaged, then ``G V A``."""
    from backpack import backpack
    from backpack.extensions import KFLR

    model, loss_fn = _backpack_model(w)
    params = list(model.parameters())
    v = list(probe(model).values())

    def run() -> list[torch.Tensor]:
        acc: list[list[torch.Tensor]] = []
        for x, y in w.batches:
            loss = loss_fn(model(x), y)
            with backpack(KFLR()):
                loss.backward()
            for i, p in enumerate(params):
                if len(acc) <= i:
                    acc.append([f.clone() for f in p.kflr])
                else:
                    for a, f in zip(acc[i], p.kflr, strict=True):
                        a.add_(f)
        out = []
        for factors, vec in zip(acc, v, strict=True):
            g = factors[0] / len(w.batches)
            if len(factors) == 1:
                out.append(g @ vec)
            else:
                a = factors[1] / len(w.batches)
                out.append((g @ vec.reshape(vec.shape[0], -1) @ a).reshape(vec.shape))
        return out

    return run, _cat


def backpack_dense(w: Workload) -> tuple[Thunk, Convert]:
    """``SqrtGGNExact`` per batch (``V^T``, ``G = V V^T``), accumulated densely."""
    from backpack import backpack
    from backpack.extensions import SqrtGGNExact

    model, loss_fn = _backpack_model(w)
    params = list(model.parameters())
    n_params = sum(p.numel() for p in params)

    def run() -> torch.Tensor:
        total = torch.zeros(n_params, n_params)
        for x, y in w.batches:
            loss = loss_fn(model(x), y)
            with backpack(SqrtGGNExact()):
                loss.backward()
            vt = torch.cat([p.sqrt_ggn_exact.flatten(2) for p in params], 2).flatten(
                0, 1
            )
            total.addmm_(vt.T, vt, alpha=x.shape[0] / w.n_examples)
        return total

    return run, lambda out: out


def backpack_mv(w: Workload) -> tuple[Thunk, Convert]:
    """``ggn_vector_product_from_plist`` (R-op, loss Hessian, L-op) per batch."""
    from backpack.hessianfree.ggnvp import ggn_vector_product_from_plist

    model = cnn_avgpool(w.model) if w.kind == "cnn" else w.model
    params = list(model.parameters())
    v = list(probe(model).values())
    loss_fn = nn.CrossEntropyLoss()

    def run() -> list[torch.Tensor]:
        acc = [torch.zeros_like(p) for p in params]
        for x, y in w.batches:
            out = model(x)
            gv = ggn_vector_product_from_plist(loss_fn(out, y), out, params, v)
            for a, g in zip(acc, gv, strict=True):
                a.add_(g.detach(), alpha=x.shape[0] / w.n_examples)
        return acc

    return run, _cat


def backpack_pegrads(w: Workload) -> tuple[Thunk, Convert]:
    """``BatchGrad`` with a summed loss: each example's own gradient, ``(n, P)``."""
    from backpack import backpack
    from backpack.extensions import BatchGrad

    model, loss_fn = _backpack_model(w, reduction="sum")
    params = list(model.parameters())

    def run() -> torch.Tensor:
        rows = []
        for x, y in w.batches:
            loss = loss_fn(model(x), y)
            with backpack(BatchGrad()):
                loss.backward()
            rows.append(torch.cat([p.grad_batch.flatten(1) for p in params], 1))
        return torch.cat(rows)

    return run, lambda out: out[:PEG_ROWS]


# -- curvlinops -----------------------------------------------------------------
def _curvlinops_common(w: Workload) -> dict[str, Any]:
    # both known here: skip the passes that would infer or check them
    return {"num_data": w.n_examples, "check_deterministic": False}


def curvlinops_kfac(w: Workload, ekfac: bool = False) -> tuple[Thunk, Convert]:
    """Exact ("type-2") Fisher of the mean cross-entropy, KFAC-expand, bias joint."""
    from curvlinops import EKFACLinearOperator, KFACLinearOperator

    cls = EKFACLinearOperator if ekfac else KFACLinearOperator
    v = list(probe(w.model).values())

    def run() -> Any:
        op = cls(
            w.model,
            nn.CrossEntropyLoss(),
            w.params,
            w.batches,
            fisher_type="type-2",
            kfac_approx="expand",
            separate_weight_and_bias=False,
            num_per_example_loss_terms=1,
            **_curvlinops_common(w),
        )
        return op @ v

    return run, _cat


def curvlinops_ggn(w: Workload) -> Any:
    from curvlinops import GGNLinearOperator

    return GGNLinearOperator(
        w.model, nn.CrossEntropyLoss(), w.params, w.batches, **_curvlinops_common(w)
    )


def curvlinops_mv(w: Workload) -> tuple[Thunk, Convert]:
    """``GGNLinearOperator(...) @ v`` (mean cross-entropy: GGN = exact Fisher)."""
    v = list(probe(w.model).values())
    return lambda: curvlinops_ggn(w) @ v, _cat


def curvlinops_dense(w: Workload) -> tuple[Thunk, Convert]:
    """``GGNLinearOperator(...) @ eye(P)``: every column in one vmapped pass."""
    n_params = sum(p.numel() for p in w.params)
    eye = torch.eye(n_params)
    return lambda: curvlinops_ggn(w) @ eye, lambda out: out
