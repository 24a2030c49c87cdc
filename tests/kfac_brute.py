"""Brute-force K-FAC definitions, written with explicit loops.

Independent of nnfim's generator and rules: layer inputs come from plain
forward hooks, output gradients from one ``autograd.grad`` call per output
direction, convolution patches from explicit slicing.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from torch import nn

from nnfim.testing import reference_output_fisher


def _sqrt_psd(h: torch.Tensor) -> torch.Tensor:
    """Columns d_c with h = sum_c d_c d_c^T, per example: (n, C, C)."""
    w, q = torch.linalg.eigh(h)
    return q * w.clamp_min(0).sqrt()[:, None, :]


def layer_io(model: nn.Module, loader, variant: str, layer: nn.Module):
    """Per batch: layer input (n, ...) and output gradients (K, n, ...) of H's root."""
    out_batches = []
    for batch in loader:
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        store = {}

        def hook(module, args, output, store=store):
            store.update(x=args[0].detach(), y=output)
            return output.clone()  # a later in-place op must not change `output`

        handle = layer.register_forward_hook(hook)
        try:
            out = model(x)
        finally:
            handle.remove()
        roots = _sqrt_psd(reference_output_fisher(variant, out.detach()))
        grads = []
        for c in range(roots.shape[2]):
            (g,) = torch.autograd.grad(
                out, store["y"], roots[:, :, c], retain_graph=True
            )
            grads.append(g)
        out_batches.append((store["x"], torch.stack(grads)))
    return out_batches


def conv_patches(conv: nn.modules.conv._ConvNd, x: torch.Tensor) -> torch.Tensor:
    """(n, L, C_in * prod(kernel)) by explicit slicing (zero padding only), any dimension."""
    dim = x.dim() - 2
    pad = [q for p in reversed(conv.padding) for q in (p, p)]
    xp = F.pad(x, pad)
    ks, ss, ds = conv.kernel_size, conv.stride, conv.dilation
    outs = [
        (xp.shape[2 + d] - ds[d] * (ks[d] - 1) - 1) // ss[d] + 1 for d in range(dim)
    ]
    rows = []
    for pos in itertools.product(*(range(o) for o in outs)):
        window = []
        for offs in itertools.product(*(range(k) for k in ks)):
            index = tuple(pos[d] * ss[d] + offs[d] * ds[d] for d in range(dim))
            window.append(xp[(slice(None), slice(None), *index)])
        rows.append(torch.stack(window, -1).reshape(x.shape[0], -1))
    return torch.stack(rows, 1)


def brute_factors(model, loader, variant, layer, convention="expand"):
    """Per group (A, G) from the definitions, normalised by the example count."""
    groups = getattr(layer, "groups", 1)
    bias = layer.bias is not None
    a_sum, g_sum, n_total = 0.0, 0.0, 0
    for x, gy in layer_io(model, loader, variant, layer):  # noqa: B007
        n = x.shape[0]
        n_total += n
        if isinstance(layer, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            inp = conv_patches(layer, x)  # (n, L, C*k)
            gout = gy.flatten(3).transpose(2, 3)  # (K, n, L, C_out)
        else:
            inp = x.reshape(n, -1, x.shape[-1])
            gout = gy.reshape(gy.shape[0], n, -1, gy.shape[-1])
        per_group_in = inp.shape[-1] // groups
        per_group_out = gout.shape[-1] // groups
        a_parts, g_parts = [], []
        for gi in range(groups):
            xi = inp[..., gi * per_group_in : (gi + 1) * per_group_in]
            if bias:
                xi = torch.cat([xi, torch.ones_like(xi[..., :1])], -1)
            go = gout[..., gi * per_group_out : (gi + 1) * per_group_out]
            positions = xi.shape[1]
            a = torch.zeros(xi.shape[-1], xi.shape[-1])
            g = torch.zeros(go.shape[-1], go.shape[-1])
            for i in range(n):
                if convention == "expand":
                    for t in range(positions):
                        a += torch.outer(xi[i, t], xi[i, t]) / positions
                        for k in range(go.shape[0]):
                            g += torch.outer(go[k, i, t], go[k, i, t])
                else:
                    xm = xi[i].mean(0)
                    a += torch.outer(xm, xm)
                    for k in range(go.shape[0]):
                        gs = go[k, i].sum(0)
                        g += torch.outer(gs, gs)
            a_parts.append(a)
            g_parts.append(g)
        a_sum = a_sum + torch.stack(a_parts)
        g_sum = g_sum + torch.stack(g_parts)
    return a_sum / n_total, g_sum / n_total


def kfac_mv(layer: nn.Module, a: torch.Tensor, g: torch.Tensor, v_weight, v_bias):
    """(G kron A) applied to the layer's parameters, per group, by G V A."""
    groups = a.shape[0]
    b = v_weight.shape[0] // groups
    out_w, out_b = [], []
    for gi in range(groups):
        vw = v_weight[gi * b : (gi + 1) * b].reshape(b, -1)
        vmat = (
            torch.cat([vw, v_bias[gi * b : (gi + 1) * b, None]], 1)
            if v_bias is not None
            else vw
        )
        res = g[gi] @ vmat @ a[gi]
        if v_bias is not None:
            out_w.append(res[:, :-1])
            out_b.append(res[:, -1])
        else:
            out_w.append(res)
    w = torch.cat(out_w).reshape(v_weight.shape)
    return w, (torch.cat(out_b) if v_bias is not None else None)
