"""Dense reference implementations for tests, ours and users'.

Everything here is computed independently of the generator, per example with
``torch.func`` (``vmap``, ``jacrev``, ``grad``, ``hessian``) and explicit dense
algebra. It is slow and meant for small models in float64.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from torch.func import functional_call, grad, hessian, jacrev, vmap

from nnfim.layers import LayerCollection

__all__ = [
    "reference_empirical_fisher",
    "reference_fisher",
    "reference_jacobian",
    "reference_output_fisher",
]


def _stack(loader: Iterable[Any]) -> tuple[torch.Tensor, torch.Tensor | None]:
    xs, ys = [], []
    for batch in loader:
        if isinstance(batch, (tuple, list)):
            xs.append(batch[0])
            ys.append(batch[1] if len(batch) > 1 else None)
        else:
            xs.append(batch)
            ys.append(None)
    y = None if any(t is None for t in ys) else torch.cat(ys)  # type: ignore[arg-type]
    return torch.cat(xs), y


def reference_jacobian(
    model: nn.Module,
    loader: Iterable[Any],
    layer_collection: LayerCollection | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-example Jacobians of the outputs by ``vmap(jacrev)``.

    Returns:
        ``(J, out)``: ``J`` of shape ``(n, C, P)`` in the collection's flat
        order, and the outputs ``(n, C)``.
    """
    lc = layer_collection or LayerCollection.from_model(model)
    x, _ = _stack(loader)
    params = {k: v.detach() for k, v in lc.check_model(model).items()}

    def f(p: dict[str, torch.Tensor], xi: torch.Tensor) -> torch.Tensor:
        out = functional_call(model, p, (xi[None],))[0]
        return out.reshape(-1)

    from nnfim.generator._passes import math_attention

    try:
        with math_attention():
            jac = vmap(jacrev(f), (None, 0))(params, x)
        n, c = jac[next(iter(params))].shape[:2]
        flat = torch.cat([jac[name].reshape(n, c, -1) for name in lc.param_names], 2)
    except RuntimeError:  # no batching rule (recurrent layers): one example at a time
        flat = torch.stack([_loop_jacobian(f, params, lc, xi) for xi in x])
    with torch.no_grad():
        out = model(x).reshape(flat.shape[:2])
    return flat, out


def _loop_jacobian(f, params, lc: LayerCollection, xi: torch.Tensor) -> torch.Tensor:
    """``(C, P)`` Jacobian of one example by ``torch.autograd.functional``."""
    names = list(lc.param_names)

    def g(*values: torch.Tensor) -> torch.Tensor:
        return f(dict(zip(names, values, strict=True)), xi)

    jac = torch.autograd.functional.jacobian(g, tuple(params[k] for k in names))
    c = jac[0].shape[0]
    return torch.cat([j.reshape(c, -1) for j in jac], 1)


def _nll(variant: str, f: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Negative log-likelihood of one example, written from the definitions."""
    if variant == "classif_logits":
        return -torch.log_softmax(f, -1).gather(0, y.reshape(1))[0]
    if variant == "classif_logsoftmax":
        return -f.gather(0, y.reshape(1))[0]
    if variant == "classif_binary":
        return torch.nn.functional.binary_cross_entropy_with_logits(
            f, y, reduction="sum"
        )
    if variant in ("regression", "function"):
        return 0.5 * ((f - y) ** 2).sum()
    raise ValueError(f"no reference for variant {variant!r}")


def reference_output_fisher(variant: str, out: torch.Tensor) -> torch.Tensor:
    """Fisher of the predictive distribution in output space, ``(n, C, C)``.

    Classification variants enumerate every label ``y`` and sum
    ``p(y|f) g_y g_y^T`` with ``g_y`` the gradient of ``-log p(y|f)``;
    regression takes the Hessian of the Gaussian negative log-likelihood.
    """
    n, c = out.shape
    if variant in ("regression", "function"):
        h = hessian(lambda f: _nll("regression", f, torch.zeros_like(f)))
        return vmap(h)(out)
    if variant == "classif_binary":
        labels = [
            torch.tensor(y, dtype=out.dtype)
            for y in itertools.product((0.0, 1.0), repeat=c)
        ]
    else:
        labels = [torch.tensor(y) for y in range(c)]
    total = torch.zeros(n, c, c, dtype=out.dtype)
    for y in labels:

        def nll(f: torch.Tensor, y: torch.Tensor = y) -> torch.Tensor:
            return _nll(variant, f, y)

        g = vmap(grad(nll))(out)
        logp = -vmap(nll)(out)
        total += logp.exp()[:, None, None] * g[:, :, None] * g[:, None, :]
    return total


def reference_fisher(
    model: nn.Module,
    loader: Iterable[Any],
    variant: str = "classif_logits",
    layer_collection: LayerCollection | None = None,
) -> torch.Tensor:
    """Exact Fisher ``(1/n) sum_i J_i^T H_i J_i`` as a ``(P, P)`` tensor."""
    jac, out = reference_jacobian(model, loader, layer_collection)
    h = reference_output_fisher(variant, out)
    return torch.einsum("nci,ncd,ndj->ij", jac, h, jac) / jac.shape[0]


def reference_empirical_fisher(
    model: nn.Module,
    loader: Iterable[Any],
    variant: str = "classif_logits",
    layer_collection: LayerCollection | None = None,
) -> torch.Tensor:
    """Empirical Fisher ``(1/n) sum_i g_i g_i^T`` at the true labels, ``(P, P)``."""
    jac, out = reference_jacobian(model, loader, layer_collection)
    _, y = _stack(loader)
    if y is None:
        raise ValueError("the empirical Fisher needs labels")
    if variant in ("classif_binary", "regression") and y.dim() == 1:
        y = y[:, None]
    if variant in ("classif_binary", "regression"):
        y = y.to(out.dtype)
    g_out = vmap(grad(lambda f, yi: _nll(variant, f, yi)))(out, y)
    g = torch.einsum("nci,nc->ni", jac, g_out)
    return g.t() @ g / g.shape[0]
