"""Output-space models: how each Fisher variant weights the output directions.

For an example with network output ``f`` (shape ``(C,)``) the Fisher is
``J^T H J`` with ``H`` the Fisher of the predictive distribution in output
space. A variant gives ``H`` in three forms:

- ``directions``: ``D`` of shape ``(C, n, C)`` with ``H = sum_c D_c D_c^T`` (the
  exact Fisher backpropagates these ``C`` directions);
- ``fisher_directions``: the fewest such directions, ``(K, n, C)``: ``K = C - 1``
  for the softmax Fisher (``H 1 = 0``), else the ``C`` of ``directions``; only
  quantities that sum over directions (diagonals, blocks, K-FAC, rows of
  ``F = U^T U``) use them;
- ``sample_grad``: the gradient of ``-log p(y | f)`` for ``y`` sampled from the
  model (Monte-Carlo Fisher), a deterministic function of noise drawn by
  ``draw`` for a whole loader batch (so that splitting a batch, or computing
  products matrix-free, never changes the samples);
- ``label_grad``: the same gradient at the true label (empirical Fisher);

and ``hvp`` applies the exact ``H`` to output-space vectors (implicit products).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["VARIANTS", "Variant", "get_variant"]


def _identity_directions(out: torch.Tensor) -> torch.Tensor:
    n, c = out.shape
    eye = torch.eye(c, dtype=out.dtype, device=out.device)
    return eye[:, None, :].expand(c, n, c)


def _label_uniforms(
    self: Variant, gen: torch.Generator, samples: int, n: int, out: torch.Tensor
) -> torch.Tensor:
    """One uniform per label, ``(samples, n, 1)``: inverse transform sampling.

    The ``draw`` of the categorical variants (one label per example).
    """
    return torch.rand(
        (samples, n, 1), generator=gen, dtype=out.dtype, device=out.device
    )


class Variant:
    """Base output-space model; see the module docstring."""

    name = "abstract"
    #: what the model's output is, for error messages
    output_doc = ""

    def check_output(self, out: torch.Tensor) -> None:
        """Raise ``ValueError`` when ``out`` cannot be this variant's output."""

    def directions(self, out: torch.Tensor) -> torch.Tensor:
        """Square-root factor of the output Fisher, shape ``(C, n, C)``."""
        raise NotImplementedError

    def fisher_directions(self, out: torch.Tensor) -> torch.Tensor:
        """The fewest directions with ``H = sum_k D_k D_k^T``, shape ``(K, n, C)``."""
        return self.directions(out)

    def n_fisher_directions(self, c: int) -> int:
        """``K`` of :meth:`fisher_directions` for ``C = c`` outputs."""
        return c

    def hvp(self, out: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """``H u`` per example, shape ``(n, C)``."""
        d = self.directions(out)
        return torch.einsum("kni,kn->ni", d, torch.einsum("kni,ni->kn", d, u))

    def draw(
        self, gen: torch.Generator, samples: int, n: int, out: torch.Tensor
    ) -> torch.Tensor:
        """Noise for ``samples`` labels of ``n`` examples: uniforms ``(samples, n, C)``."""
        shape = (samples, n, out.shape[1])
        return torch.rand(shape, generator=gen, dtype=out.dtype, device=out.device)

    def sample_grad(self, out: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Gradient of ``-log p(y|f)`` w.r.t. ``f`` at ``y`` sampled with ``noise``.

        Args:
            out: outputs ``(n, C)``.
            noise: one sample's slice of :meth:`draw`, ``(n, C)``.

        Returns:
            Tensor of shape ``(n, C)``.
        """
        raise NotImplementedError(
            f"variant {self.name!r} has no Monte-Carlo Fisher; use the exact one."
        )

    def label_grad(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Gradient of ``-log p(y|f)`` w.r.t. ``f`` at the true ``y``, shape ``(n, C)``."""
        raise NotImplementedError(
            f"variant {self.name!r} has no empirical Fisher; use the exact one."
        )


class ClassifLogits(Variant):
    """Cross-entropy on logits: ``H = diag(p) - p p^T`` with ``p = softmax(f)``."""

    name = "classif_logits"
    output_doc = "logits of shape (n, C)"

    def directions(self, out: torch.Tensor) -> torch.Tensor:
        """``D_c = sqrt(p_c) (e_c - p)``."""
        p = torch.softmax(out, -1)
        eye = torch.eye(out.shape[1], dtype=out.dtype, device=out.device)
        return p.t().sqrt()[:, :, None] * (eye[:, None, :] - p[None])

    def fisher_directions(self, out: torch.Tensor) -> torch.Tensor:
        """``C - 1`` directions of ``diag(p) - p p^T`` (see :func:`_softmax_factor`)."""
        return _softmax_factor(torch.softmax(out, -1))

    def n_fisher_directions(self, c: int) -> int:
        """``C - 1`` (one is enough for ``C = 1``, where ``H = 0``)."""
        return max(c - 1, 1)

    def hvp(self, out: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """``p * u - p (p . u)``."""
        p = torch.softmax(out, -1)
        return p * u - p * (p * u).sum(-1, keepdim=True)

    draw = _label_uniforms

    def sample_grad(self, out: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """``p - onehot(y)``, ``y ~ Categorical(p)``."""
        p = torch.softmax(out, -1)
        y = _categorical(p, noise)
        return p.scatter_add_(-1, y, p.new_full(y.shape, -1.0))

    def label_grad(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``p - onehot(y)`` at integer class labels ``y`` of shape ``(n,)``."""
        p = torch.softmax(out, -1)
        return p - F.one_hot(_class_labels(y, out), out.shape[1]).to(out.dtype)


class ClassifLogSoftmax(Variant):
    """The model outputs log-probabilities: ``H = diag(p)`` with ``p = exp(f)``."""

    name = "classif_logsoftmax"
    output_doc = "log-probabilities of shape (n, C) (e.g. a final LogSoftmax)"

    def check_output(self, out: torch.Tensor) -> None:
        """The outputs must be normalised log-probabilities."""
        err = torch.logsumexp(out.detach(), -1).abs().max()
        if float(err) > 1e-3:
            raise ValueError(
                "variant 'classif_logsoftmax' expects log-probabilities (each row's "
                f"logsumexp is 0), got rows off by {float(err):.3g}; end the model "
                "with nn.LogSoftmax(-1), or use variant='classif_logits' for logits."
            )

    def directions(self, out: torch.Tensor) -> torch.Tensor:
        """``D_c = sqrt(p_c) e_c``."""
        return out.exp().sqrt().t()[:, :, None] * _identity_directions(out)

    def fisher_directions(self, out: torch.Tensor) -> torch.Tensor:
        """``C - 1`` directions of ``diag(p) - p p^T``, which gives the same Fisher.

        The outputs are normalised log-probabilities as functions of the
        parameters (a final log-softmax), so ``p^T J = 0``: the Jacobian of
        ``sum_c exp(f_c) = 1`` vanishes, and ``J^T p p^T J = 0``.
        """
        return _softmax_factor(out.exp())

    def n_fisher_directions(self, c: int) -> int:
        """``C - 1`` (one is enough for ``C = 1``)."""
        return max(c - 1, 1)

    def hvp(self, out: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """``p * u``."""
        return out.exp() * u

    draw = _label_uniforms

    def sample_grad(self, out: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """``-onehot(y)``, ``y ~ Categorical(exp(f))``."""
        y = _categorical(out.exp(), noise)
        return out.new_zeros(out.shape).scatter_(-1, y, -1.0)

    def label_grad(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``-onehot(y)`` at integer class labels."""
        return -F.one_hot(_class_labels(y, out), out.shape[1]).to(out.dtype)


class ClassifBinary(Variant):
    """Independent Bernoullis on logits (BCE with logits): ``H = diag(s (1 - s))``."""

    name = "classif_binary"
    output_doc = "logits of shape (n, C), one independent binary label each"

    def directions(self, out: torch.Tensor) -> torch.Tensor:
        """``D_c = sqrt(s_c (1 - s_c)) e_c``."""
        s = torch.sigmoid(out)
        return (s * (1 - s)).sqrt().t()[:, :, None] * _identity_directions(out)

    def hvp(self, out: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """``s (1 - s) u``."""
        s = torch.sigmoid(out)
        return s * (1 - s) * u

    def sample_grad(self, out: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """``s - y``, ``y ~ Bernoulli(s)``."""
        s = torch.sigmoid(out)
        return s - (noise < s).to(out.dtype)

    def label_grad(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``s - y`` at 0/1 labels of shape ``(n, C)`` (or ``(n,)`` when ``C = 1``)."""
        return torch.sigmoid(out) - _dense_labels(y, out)


class Regression(Variant):
    """Gaussian likelihood ``N(f, I)`` (loss ``||y - f||^2 / 2``): ``H = I``."""

    name = "regression"
    output_doc = "predictions of shape (n, C)"

    def directions(self, out: torch.Tensor) -> torch.Tensor:
        """``D_c = e_c``."""
        return _identity_directions(out)

    def hvp(self, out: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """``u``."""
        return u

    def draw(
        self, gen: torch.Generator, samples: int, n: int, out: torch.Tensor
    ) -> torch.Tensor:
        """Standard normal noise ``(samples, n, C)``."""
        shape = (samples, n, out.shape[1])
        return torch.randn(shape, generator=gen, dtype=out.dtype, device=out.device)

    def sample_grad(self, out: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """``f - y = -eps``, ``eps ~ N(0, I)``."""
        return -noise

    def label_grad(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``f - y`` at targets of shape ``(n, C)`` (or ``(n,)`` when ``C = 1``)."""
        return out - _dense_labels(y, out)


class Function(Regression):
    """A user function's outputs: the Jacobian covariance ``J^T J`` (``H = I``)."""

    name = "function"
    output_doc = "the values of shape (n, C) returned by `function`"

    def sample_grad(self, out: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Not defined: there is no likelihood to sample from."""
        return Variant.sample_grad(self, out, noise)

    def label_grad(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Not defined: there is no likelihood."""
        return Variant.label_grad(self, out, y)


def _softmax_factor(p: torch.Tensor) -> torch.Tensor:
    r"""``D`` of shape ``(C - 1, n, C)`` with ``sum_k D_k D_k^T = diag(p) - p p^T``.

    ``H = diag(p) - p p^T`` (rows of ``p`` summing to 1) has ``H 1 = 0``, so it
    only sees differences to a pivot class ``c*`` (the most probable one, for
    conditioning): ``H = M^T S M`` with ``M u = (u_c - u_{c*})_{c != c*}`` and
    ``S = diag(q) - q q^T``, ``q`` the other classes' probabilities. ``S`` has
    the closed-form factor ``diag(sqrt q) (I - a sqrt(q) sqrt(q)^T)`` with
    ``a = 1 / (1 + sqrt(p_{c*}))`` (square it: ``a^2 |q| - 2 a + 1 = 0`` as
    ``|q| = 1 - p_{c*}``), and ``M^T`` of its column for class ``c`` is

    .. math::
        d_c = \sqrt{p_c}\,(e_c - a\,q - \sqrt{p_{c^*}}\,e_{c^*}).

    No factorisation is computed: probabilities that underflow to 0 give
    zero directions, never a failed Cholesky or a NaN.

    Args:
        p: probabilities ``(n, C)``, ``C >= 2``; for ``C = 1`` the one zero
            direction.

    Returns:
        Tensor of shape ``(C - 1, n, C)`` (``(1, n, 1)`` for ``C = 1``).
    """
    n, c = p.shape
    if c == 1:
        return torch.zeros_like(p)[None]
    pivot = p.argmax(-1)
    p_star = p.gather(1, pivot[:, None])
    q = p.scatter(1, pivot[:, None], 0.0)
    a = 1.0 / (1.0 + p_star.sqrt())
    eye = torch.eye(c, dtype=p.dtype, device=p.device)
    # rows (n, C, C): direction of class c, before dropping the pivot's own row
    rows = eye[None] - a[:, :, None] * q[:, None, :]
    rows = rows - p_star.sqrt()[:, :, None] * F.one_hot(pivot, c).to(p.dtype)[:, None]
    rows = q.sqrt()[:, :, None] * rows
    # keep the C - 1 classes other than the pivot, in order
    keep = torch.arange(c - 1, device=p.device)[None, :]
    keep = keep + (keep >= pivot[:, None]).long()
    rows = rows.gather(1, keep[:, :, None].expand(n, c - 1, c))
    return rows.transpose(0, 1)


def _categorical(p: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Class index per row ``(n, 1)`` by inverse transform sampling with ``noise[:, :1]``.

    The first class whose cumulative probability exceeds the uniform ``u`` in
    ``[0, 1)``, scaled by the row's total (which rounding keeps near, not at,
    1): a class of probability 0 is never drawn, even at ``u = 0``.
    """
    cdf = torch.cumsum(p, -1)
    y = torch.searchsorted(cdf, noise[:, :1] * cdf[:, -1:], right=True)
    return y.clamp_max_(p.shape[1] - 1)


def _class_labels(y: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    if y.dtype.is_floating_point or y.dim() != 1 or y.shape[0] != out.shape[0]:
        raise ValueError(
            f"expected integer class labels of shape ({out.shape[0]},), got "
            f"{y.dtype} of shape {tuple(y.shape)}."
        )
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= out.shape[1]):
        raise ValueError(
            f"class labels must lie in [0, {out.shape[1]}), got [{int(y.min())}, "
            f"{int(y.max())}]."
        )
    return y


def _dense_labels(y: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    if y.dim() == 1 and out.shape[1] == 1:
        y = y[:, None]
    if tuple(y.shape) != tuple(out.shape):
        raise ValueError(
            f"expected targets of shape {tuple(out.shape)}, got {tuple(y.shape)}."
        )
    return y.to(out.dtype)


VARIANTS: dict[str, Variant] = {
    v.name: v
    for v in (
        ClassifLogits(),
        ClassifLogSoftmax(),
        ClassifBinary(),
        Regression(),
        Function(),
    )
}


def get_variant(name: str) -> Variant:
    """The variant called ``name``.

    Raises:
        ValueError: an unknown name (the message lists the known ones).
    """
    if name not in VARIANTS:
        raise ValueError(f"unknown variant {name!r}; choose one of {sorted(VARIANTS)}.")
    return VARIANTS[name]
