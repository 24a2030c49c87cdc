"""Optimizers: every step against the explicit formula computed densely in float64.

The references never use nnfim's generator: Kronecker factors come from the
brute-force definitions of ``kfac_brute``, exact Fishers and per-example
gradients from ``torch.func`` (``nnfim.testing``), and the preconditioned step
from explicit Kronecker products and ``torch.linalg.solve``.
"""

from __future__ import annotations

import copy
import io
import math
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_same_state, input_shape, make_net, model_state
from kfac_brute import _sqrt_psd, brute_factors
from torch import nn

from nnfim import (
    EKFAC,
    KFAC,
    NaturalGradient,
    PMatBlockDiag,
    PMatDense,
    PMatDiag,
    PMatImplicit,
    PMatKFAC,
)
from nnfim.layers import LayerCollection
from nnfim.testing import (
    reference_empirical_fisher,
    reference_fisher,
    reference_jacobian,
    reference_output_fisher,
)

N_BATCH = 16  # > the widest layer input: K-FAC factors have distinct eigenvalues


def make_problem(model_name: str, n_batches: int = 3, seed: int = 0):
    torch.manual_seed(seed)
    model = make_net(model_name, 3)
    batches = [
        (
            torch.randn(N_BATCH, *input_shape(model_name)),
            torch.randint(0, 3, (N_BATCH,)),
        )
        for _ in range(n_batches)
    ]
    return model, batches


def flat_params(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def flat_grad(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()])


def backward(model: nn.Module, batch) -> torch.Tensor:
    for p in model.parameters():
        p.grad = None
    loss = F.cross_entropy(model(batch[0]), batch[1])
    loss.backward()
    return loss.detach()


# -- independent dense references ----------------------------------------------------
def kron_layers(model: nn.Module) -> dict[str, nn.Module]:
    return {
        n: m for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))
    }


def to_kron(module: nn.Module, flat: torch.Tensor, groups: int) -> torch.Tensor:
    """``(..., p_l)`` layer parameters -> ``(..., groups, b, a)``, bias as last column."""
    lead = flat.shape[:-1]
    n_weight = module.weight.numel()
    b = module.weight.shape[0] // groups
    m = flat[..., :n_weight].reshape(*lead, groups, b, -1)
    if module.bias is not None:
        m = torch.cat([m, flat[..., n_weight:].reshape(*lead, groups, b, 1)], -1)
    return m


def from_kron(module: nn.Module, m: torch.Tensor) -> torch.Tensor:
    if module.bias is None:
        return m.reshape(-1)
    return torch.cat([m[..., :-1].reshape(-1), m[..., -1].reshape(-1)])


def batch_curvature(model: nn.Module, batch):
    """Brute-force K-FAC factors of the Kronecker layers, exact blocks of the others."""
    lc = LayerCollection.from_model(model)
    kron = kron_layers(model)
    factors = {
        n: brute_factors(model, [batch], "classif_logits", m) for n, m in kron.items()
    }
    full = reference_fisher(model, [batch])
    blocks = {
        n: full[lc.layer_slice(n), lc.layer_slice(n)]
        for n in lc.layer_names
        if n not in kron
    }
    return factors, blocks


def batch_scalings(model: nn.Module, batch, bases) -> dict[str, torch.Tensor]:
    """``(1/n) sum_i sum_k (Q_G^T dW_ik Q_A)^2`` from torch.func per-example rows."""
    lc = LayerCollection.from_model(model)
    jac, out = reference_jacobian(model, [batch])
    roots = _sqrt_psd(reference_output_fisher("classif_logits", out))
    rows = torch.einsum("ncp,nck->nkp", jac, roots)
    mods = dict(model.named_modules())
    out_s = {}
    for name, (qa, qg) in bases.items():
        m = to_kron(mods[name], rows[..., lc.layer_slice(name)], qa.shape[0])
        rotated = qg.mT @ m @ qa
        out_s[name] = (rotated**2).sum(1).mean(0)
    return out_s


class Reference:
    """Running curvature and the dense preconditioner of each optimizer."""

    def __init__(self, kind: str, model: nn.Module, **opts: Any) -> None:
        self.kind, self.model, self.opts = kind, model, opts
        self.lc = LayerCollection.from_model(model)
        self.mods = dict(model.named_modules())
        self.factors: dict[str, Any] = {}
        self.blocks: dict[str, torch.Tensor] = {}
        self.snapshot: tuple[dict, dict] = ({}, {})
        self.scalings: dict[str, torch.Tensor] = {}
        self.bases: dict[str, Any] = {}
        self.fisher: torch.Tensor | None = None

    def refresh(self, batch, k: int) -> None:
        if self.kind == "ng":
            if k % self.opts.get("update_every", 1) == 0:
                self.fisher = self.ng_fisher(batch)
            return
        decay = self.opts["decay"]
        factors, blocks = batch_curvature(self.model, batch)
        if not self.factors:
            self.factors, self.blocks = factors, blocks
        else:
            self.factors = {
                n: (
                    decay * a + (1 - decay) * factors[n][0],
                    decay * g + (1 - decay) * factors[n][1],
                )
                for n, (a, g) in self.factors.items()
            }
            self.blocks = {
                n: decay * b + (1 - decay) * blocks[n] for n, b in self.blocks.items()
            }
        if k % self.opts["eigen_every"] == 0:
            self.snapshot = (dict(self.factors), dict(self.blocks))
            if self.kind == "ekfac":
                self.bases = {
                    n: (torch.linalg.eigh(a)[1], torch.linalg.eigh(g)[1])
                    for n, (a, g) in self.factors.items()
                }
                self.scalings = batch_scalings(self.model, batch, self.bases)
        elif self.kind == "ekfac":
            fresh = batch_scalings(self.model, batch, self.bases)
            self.scalings = {
                n: decay * s + (1 - decay) * fresh[n] for n, s in self.scalings.items()
            }

    def ng_fisher(self, batch) -> torch.Tensor:
        rep, fisher_type = self.opts["representation"], self.opts["fisher_type"]
        if fisher_type == "empirical":
            full = reference_empirical_fisher(self.model, [batch])
        else:
            full = reference_fisher(self.model, [batch])
        if rep is PMatDiag:
            return torch.diag(torch.diagonal(full))
        if rep is PMatBlockDiag:
            out = torch.zeros_like(full)
            for n in self.lc.layer_names:
                sl = self.lc.layer_slice(n)
                out[sl, sl] = full[sl, sl]
            return out
        return full

    def damped(self, damping: float) -> torch.Tensor:
        """The ``(P, P)`` matrix the step inverts."""
        if self.kind == "ng":
            assert self.fisher is not None
            return self.fisher + damping * torch.eye(self.fisher.shape[0])
        factors, blocks = self.snapshot
        p = self.lc.numel()
        out = torch.zeros(p, p)
        for name in self.lc.layer_names:
            sl = self.lc.layer_slice(name)
            if name in blocks:
                out[sl, sl] = blocks[name] + damping * torch.eye(blocks[name].shape[0])
                continue
            mod = self.mods[name]
            a, g = factors[name]
            groups, (b, na) = a.shape[0], (g.shape[1], a.shape[1])
            # the layer's matrix in Kronecker order, then moved to flat order
            kron_blocks = []
            for gi in range(groups):
                if self.kind == "ekfac":
                    qa, qg = self.bases[name]
                    q = torch.kron(qg[gi], qa[gi])
                    d = self.scalings[name][gi].reshape(-1) + damping
                    kron_blocks.append(q @ torch.diag(d) @ q.T)
                elif self.opts.get("damping_method") == "factored":
                    pi = math.sqrt(
                        float(torch.diagonal(a, dim1=1, dim2=2).mean())
                        / float(torch.diagonal(g, dim1=1, dim2=2).mean())
                    )
                    r = math.sqrt(damping)
                    kron_blocks.append(
                        torch.kron(
                            g[gi] + pi * r * torch.eye(b),
                            a[gi] + r / pi * torch.eye(na),
                        )
                    )
                else:
                    kron_blocks.append(
                        torch.kron(g[gi], a[gi]) + damping * torch.eye(b * na)
                    )
            k_mat = torch.block_diag(*kron_blocks)
            index = from_kron(mod, torch.arange(groups * b * na).reshape(groups, b, na))
            # flat position j holds Kronecker entry index[j]
            out[sl, sl] = k_mat[index[:, None], index[None, :]]
        return out


def expected_step(
    ref: Reference, group: dict[str, Any], w: torch.Tensor, g: torch.Tensor, buf
):
    g_wd = g + group["weight_decay"] * w
    v = torch.linalg.solve(ref.damped(group["damping"]), g_wd)
    if group["kl_clip"] is not None:
        vg = float(v @ g_wd) * group["lr"] ** 2
        v = min(1.0, math.sqrt(group["kl_clip"] / vg)) * v
    buf = v if buf is None or not group["momentum"] else group["momentum"] * buf + v
    return w - group["lr"] * buf, buf


HYPER = {
    "plain": {"momentum": 0.0, "weight_decay": 0.0, "kl_clip": None},
    "full": {"momentum": 0.6, "weight_decay": 0.05, "kl_clip": 1e-4},
}


def run_lockstep(opt, ref: Reference, model, batches, after_step=None) -> int:
    """Step the optimizer and the reference together; returns the clipped steps."""
    buf = None
    for k, batch in enumerate(batches):
        backward(model, batch)
        w, g = flat_params(model), flat_grad(model)
        ref.refresh(batch, k)
        expected, buf = expected_step(ref, opt.param_groups[0], w, g, buf)
        opt.step(batch=batch)
        torch.testing.assert_close(flat_params(model), expected, rtol=1e-9, atol=1e-11)
        if after_step is not None:
            after_step(k, opt)
    return len(batches)


@pytest.mark.parametrize("hyper", sorted(HYPER))
@pytest.mark.parametrize("model_name", ["mlp", "cnn"])
@pytest.mark.parametrize(
    ("kind", "opts"),
    [
        ("kfac", {"damping_method": "exact"}),
        ("kfac", {"damping_method": "factored"}),
        ("ekfac", {}),
    ],
    ids=["kfac-exact", "kfac-factored", "ekfac"],
)
def test_kronecker_steps_equal_the_dense_formula(
    kind: str, opts: dict, model_name: str, hyper: str
) -> None:
    model, batches = make_problem(model_name)
    common = {"decay": 0.7, "eigen_every": 2}
    cls = KFAC if kind == "kfac" else EKFAC
    opt = cls(
        model,
        lr=0.5,
        damping=0.03,
        fisher_type="exact",
        **common,
        **opts,
        **HYPER[hyper],
    )
    ref = Reference(kind, model, **common, **opts)
    run_lockstep(opt, ref, model, batches)


@pytest.mark.parametrize(
    ("rep", "fisher_type"),
    [
        (PMatDense, "exact"),
        (PMatDense, "empirical"),
        (PMatDiag, "exact"),
        (PMatBlockDiag, "exact"),
        (PMatImplicit, "exact"),
    ],
    ids=lambda x: getattr(x, "__name__", str(x)),
)
@pytest.mark.parametrize("hyper", sorted(HYPER))
def test_natural_gradient_steps_equal_the_dense_formula(
    rep: type, fisher_type: str, hyper: str
) -> None:
    model, batches = make_problem("mlp")
    opt = NaturalGradient(
        model,
        rep,
        lr=0.5,
        damping=0.03,
        update_every=2,
        fisher_type=fisher_type,
        solve_options={"rtol": 1e-13} if rep is PMatImplicit else None,
        **HYPER[hyper],
    )
    ref = Reference("ng", model, representation=rep, fisher_type=fisher_type)
    ref.opts["update_every"] = 2
    if rep is PMatImplicit:
        # the implicit Fisher reads the model at its current weights: refresh always
        opt.param_groups[0]["update_every"] = 1
        ref.opts["update_every"] = 1
    run_lockstep(opt, ref, model, batches)


def test_natural_gradient_with_kfac_is_the_kfac_step() -> None:
    model, batches = make_problem("cnn", n_batches=1)
    opt = NaturalGradient(model, PMatKFAC, lr=0.5, damping=0.03, fisher_type="exact")
    ref = Reference("kfac", model, decay=0.0, eigen_every=1)
    run_lockstep(opt, ref, model, batches)


@pytest.mark.parametrize("cls", [KFAC, EKFAC, NaturalGradient])
def test_scheduler_and_manual_changes_take_effect(cls: type) -> None:
    model, batches = make_problem("mlp")
    kwargs = {"lr": 0.5, "damping": 0.03, "momentum": 0.3, "fisher_type": "exact"}
    if cls is NaturalGradient:
        opt = cls(model, PMatDense, **kwargs)
        ref = Reference("ng", model, representation=PMatDense, fisher_type="exact")
    else:
        opt = cls(model, decay=0.7, eigen_every=2, **kwargs)
        kind = "kfac" if cls is KFAC else "ekfac"
        ref = Reference(kind, model, decay=0.7, eigen_every=2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    seen = []

    def after_step(k: int, o) -> None:
        sched.step()
        o.param_groups[0]["damping"] *= 10.0
        seen.append((o.param_groups[0]["lr"], o.param_groups[0]["damping"]))

    run_lockstep(opt, ref, model, batches, after_step)
    assert seen[-1][0] == pytest.approx(0.5 * 0.5**3)
    assert seen[-1][1] == pytest.approx(0.03 * 10**3)


def _make(cls: type, model: nn.Module):
    if cls is NaturalGradient:
        return cls(model, PMatKFAC, lr=0.3, damping=0.05, momentum=0.5, update_every=3)
    return cls(model, lr=0.3, damping=0.05, momentum=0.5, eigen_every=3, kl_clip=1e-2)


@pytest.mark.parametrize("cls", [KFAC, EKFAC, NaturalGradient])
def test_state_dict_round_trip(cls: type) -> None:
    model, batches = make_problem("cnn", n_batches=4)
    opt = _make(cls, model)
    for batch in batches[:2]:
        backward(model, batch)
        opt.step(batch=batch)
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    twin = copy.deepcopy(model)
    restored = _make(cls, twin)
    restored.load_state_dict(state)
    for batch in batches[2:]:
        for m, o in ((model, opt), (twin, restored)):
            backward(m, batch)
            o.step(batch=batch)
        assert torch.equal(flat_params(model), flat_params(twin))


def test_adaptive_damping_follows_the_levenberg_marquardt_rule() -> None:
    model, batches = make_problem("mlp", n_batches=2)
    opt = KFAC(
        model,
        lr=1.0,
        damping=0.5,
        adaptive_damping=True,
        damping_factor=0.9,
        fisher_type="exact",
    )
    ref = Reference("kfac", model, decay=0.95, eigen_every=10)
    for k, batch in enumerate(batches):

        def closure(batch=batch) -> torch.Tensor:
            return backward(model, batch)

        loss = closure()
        w, g = flat_params(model), flat_grad(model)
        ref.refresh(batch, k)
        damping = opt.param_groups[0]["damping"]
        new_w, _ = expected_step(ref, opt.param_groups[0], w, g, None)
        opt.step(closure, batch=batch)
        torch.testing.assert_close(flat_params(model), new_w)
        delta = new_w - w
        predicted = g @ delta + 0.5 * delta @ ref.damped(damping) @ delta
        with torch.no_grad():
            new_loss = F.cross_entropy(model(batch[0]), batch[1])
        rho = float((new_loss - loss) / predicted)
        assert opt.last_rho == pytest.approx(rho, rel=1e-9)
        factor = 0.9 if rho > 0.75 else (1 / 0.9 if rho < 0.25 else 1.0)
        assert opt.param_groups[0]["damping"] == pytest.approx(damping * factor)


@pytest.mark.parametrize("cls", [KFAC, EKFAC, NaturalGradient])
def test_steps_leave_hooks_modes_and_flags(cls: type) -> None:
    model, batches = make_problem("cnn", n_batches=1)
    model.register_forward_hook(lambda *a: None)
    opt = cls(model) if cls is not NaturalGradient else cls(model, PMatDiag)
    backward(model, batches[0])
    before = model_state(model)
    opt.step(batch=batches[0])
    after = model_state(model)
    assert not torch.equal(
        flat_params(model),
        torch.cat([p.reshape(-1) for p in before["params"].values()]),
    )
    # everything but the parameters is as it was (.grad included)
    assert_same_state({**before, "params": {}}, {**after, "params": {}})


@pytest.mark.parametrize("cls", [KFAC, EKFAC, NaturalGradient])
def test_errors(cls: type) -> None:
    model, batches = make_problem("mlp", n_batches=1)
    with pytest.raises(TypeError, match="pass the model"):
        cls(model.parameters())
    with pytest.raises(ValueError, match="lr must be >= 0"):
        cls(model, lr=-1.0)
    with pytest.raises(ValueError, match="kl_clip"):
        cls(model, kl_clip=0.0)
    opt = cls(model)
    backward(model, batches[0])
    before = model_state(model)
    with pytest.raises(ValueError, match="no curvature yet"):
        opt.step()
    assert_same_state(before, model_state(model))
    with pytest.raises(ValueError, match="nnfim"):
        opt.load_state_dict(torch.optim.SGD(model.parameters()).state_dict())
    opt.add_param_group({"params": [nn.Parameter(torch.zeros(1))]})
    with pytest.raises(ValueError, match="one parameter group"):
        opt.step(batch=batches[0])


def test_kfac_rejects_an_unknown_damping_method() -> None:
    model, _ = make_problem("mlp", n_batches=1)
    with pytest.raises(ValueError, match="damping_method"):
        KFAC(model, damping_method="cholesky")


class Scale(nn.Module):
    """A layer without a rule: the generator falls back to torch.func for it."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(1.0 + 0.1 * torch.randn(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight


@pytest.mark.parametrize("kind", ["kfac", "ekfac"])
def test_fallback_layers_use_their_exact_block(kind: str) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), Scale(7), nn.Tanh(), nn.Linear(7, 3))
    batches = [(torch.randn(N_BATCH, 5), torch.randint(0, 3, (N_BATCH,)))] * 2
    cls = KFAC if kind == "kfac" else EKFAC
    opt = cls(
        model, lr=0.5, damping=0.03, decay=0.5, eigen_every=1, fisher_type="exact"
    )
    run_lockstep(opt, Reference(kind, model, decay=0.5, eigen_every=1), model, batches)
