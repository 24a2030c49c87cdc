"""Elastic weight consolidation (Kirkpatrick et al., 2017), any representation."""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from nnfim.layers import LayerCollection
from nnfim.metrics import FIM
from nnfim.pmat import PMatAbstract, PMatDiag, PMatImplicit
from nnfim.vector import PVector

__all__ = ["EWC"]


class _Term:
    """One weighted quadratic ``weight * (w - anchor)^T F (w - anchor)``."""

    def __init__(
        self,
        weight: float,
        fisher: PMatAbstract,
        anchor: PVector,
        snapshot: nn.Module | None,
    ) -> None:
        self.weight = weight
        self.fisher = fisher
        self.anchor = anchor
        # PMatImplicit: the frozen copy of the model its products read (kept alive here).
        self.snapshot = snapshot


class EWC:
    r"""Elastic weight consolidation penalty over one or several past tasks.

    After training on a task, :meth:`consolidate` computes the Fisher ``F_t``
    of that task in the chosen representation and keeps a copy ``w_t`` of the
    weights (the anchor). :meth:`penalty` returns

    .. math::

        \frac{\lambda}{2} \sum_t (w - w_t)^\top F_t (w - w_t)

    as a scalar differentiable with respect to the model's parameters (the
    Fishers and anchors are constants), to add to the next task's loss.

    With ``online=True`` (online EWC, Schwarz et al., 2018) there is one anchor,
    the weights at the last consolidation, and one running Fisher
    ``F <- gamma F + F_t``. Where the sum of two matrices keeps the
    representation (``PMatDiag``, ``PMatDense``, ``PMatBlockDiag``,
    ``PMatQuasiDiag``, ``PMatLowRank``) it is stored as one matrix; a sum of
    Kronecker-factored matrices (``PMatKFAC``, ``PMatEKFAC``) is not Kronecker
    factored, so for those the decayed terms are kept side by side (same
    anchor): memory stays that of the representation, once per task.

    ``PMatImplicit`` stores no matrix: its products run the model. To keep
    ``F_t`` the Fisher at the anchor, :meth:`consolidate` then keeps a frozen
    copy of the model (``copy.deepcopy``, never trained) and a
    reference to ``loader``, which must yield the same batches at every
    :meth:`penalty` (one pass over it per task). Training the live model never
    changes ``F_t``. Its penalty has the exact value and the exact gradient
    ``lambda F_t (w - w_t)``, but no second derivative.

    Args:
        lam: the penalty strength ``lambda``.
        representation: default matrix class (``PMatDiag``: the original EWC).
        online: one anchor and a decayed running Fisher.
        gamma: decay of the running Fisher (``online=True`` only), in ``[0, 1]``.
        **fim_options: default keyword arguments of :func:`nnfim.FIM`
            (``variant``, ``fisher_type``, ``mc_samples``, ``seed``, ...).

    Raises:
        ValueError: ``lam < 0``, ``gamma`` outside ``[0, 1]``, or ``gamma``
            without ``online``.

    >>> from torch import nn
    >>> model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    >>> loader = [(torch.randn(16, 4), torch.randint(0, 3, (16,)))]
    >>> ewc = EWC(lam=100.0)
    >>> ewc.consolidate(model, loader)
    >>> float(ewc.penalty(model).detach())
    0.0
    >>> with torch.no_grad():
    ...     _ = model[0].weight.add_(0.1)
    >>> bool(ewc.penalty(model) > 0)
    True
    """

    def __init__(
        self,
        lam: float = 1.0,
        representation: type = PMatDiag,
        *,
        online: bool = False,
        gamma: float | None = None,
        **fim_options: Any,
    ) -> None:
        if lam < 0:
            raise ValueError(f"EWC: lam must be >= 0, got {lam}.")
        if gamma is not None and not online:
            raise ValueError(
                "EWC: gamma is the decay of online EWC; pass online=True with it."
            )
        gamma = 1.0 if gamma is None else gamma
        if not 0.0 <= gamma <= 1.0:
            raise ValueError(f"EWC: gamma must be in [0, 1], got {gamma}.")
        self.lam = lam
        self.representation = representation
        self.online = online
        self.gamma = gamma
        self.fim_options = fim_options
        self._terms: list[_Term] = []
        self._n_tasks = 0
        self.layer_collection: LayerCollection | None = None

    @property
    def n_tasks(self) -> int:
        """Number of consolidated tasks so far."""
        return self._n_tasks

    @property
    def fishers(self) -> list[PMatAbstract]:
        """The stored matrices, with their decay weights applied (online)."""
        return [
            t.fisher if t.weight == 1.0 else t.weight * t.fisher for t in self._terms
        ]

    def consolidate(
        self,
        model: nn.Module,
        loader: Iterable[Any],
        representation: type | None = None,
        **fim_options: Any,
    ) -> None:
        """Store the Fisher of the task just learnt and the current weights.

        Args:
            model: the network after training on the task (left untouched).
            loader: the task's batches ``(inputs, labels)`` (or ``inputs`` for
                the exact and Monte-Carlo Fishers).
            representation: the matrix class for this task (default: the one
                given at construction).
            **fim_options: keyword arguments of :func:`nnfim.FIM` overriding the
                constructor's.

        Raises:
            ValueError: the model's parameters differ from the earlier tasks',
                or anything :func:`nnfim.FIM` refuses.
        """
        representation = representation or self.representation
        options = {**self.fim_options, **fim_options}
        lc = options.pop("layer_collection", None) or LayerCollection.from_model(model)
        if self.layer_collection is not None and lc != self.layer_collection:
            raise ValueError(
                "EWC.consolidate: the model's parameters differ from the earlier "
                f"tasks' ({lc} vs {self.layer_collection}); use the same model."
            )
        snapshot = None
        source = model
        if representation is PMatImplicit:
            snapshot = _frozen_copy(model)
            source = snapshot
        fisher = FIM(source, loader, representation, layer_collection=lc, **options)
        anchor = PVector.from_model(model, lc).detach().clone()
        self.layer_collection = lc
        self._n_tasks += 1
        if not self.online:
            self._terms.append(_Term(1.0, fisher, anchor, snapshot))
            return
        for term in self._terms:
            term.weight *= self.gamma
            term.anchor = anchor
        self._terms = [t for t in self._terms if t.weight != 0.0]
        merged = self._merge(fisher)
        if merged is not None:
            self._terms = [_Term(1.0, merged, anchor, None)]
        else:
            self._terms.append(_Term(1.0, fisher, anchor, snapshot))

    def _merge(self, fisher: PMatAbstract) -> PMatAbstract | None:
        """``sum_t w_t F_t + F`` as one matrix when that keeps the structure."""
        if len(self._terms) > 1 or isinstance(fisher, PMatImplicit):
            return None
        if not self._terms:
            return fisher
        old = self._terms[0]
        if type(old.fisher) is not type(fisher):
            return None
        try:
            total = old.weight * old.fisher + fisher
        except NotImplementedError:
            return None
        return total if type(total) is type(fisher) else None

    def penalty(self, model: nn.Module) -> torch.Tensor:
        """``(lambda / 2) sum_t (w - w_t)^T F_t (w - w_t)``, differentiable in ``w``.

        Args:
            model: the network being trained (the same architecture).

        Returns:
            A 0-dim tensor (0 before any :meth:`consolidate`).

        Raises:
            ValueError: the model does not have the consolidated parameters.
        """
        if not self._terms or self.layer_collection is None:
            p = next(model.parameters(), None)
            if p is None:
                return torch.zeros(())
            return torch.zeros((), dtype=p.dtype, device=p.device)
        w = PVector.from_model(model, self.layer_collection)
        total = torch.zeros((), dtype=w.dtype, device=w.device)
        for term in self._terms:
            d = w - term.anchor
            if isinstance(term.fisher, PMatImplicit):
                # The product runs the frozen copy and is not differentiable in d:
                # lam d.Fd - lam/2 d.Fd has the value lam/2 d^T F d and the
                # gradient lam F d (F symmetric, F d a constant).
                fd = term.fisher.mv(d.detach())
                quad = 2.0 * d.dot(fd) - d.detach().dot(fd)
            else:
                quad = term.fisher.vTMv(d)
            total = total + term.weight * quad
        return 0.5 * self.lam * total


def _frozen_copy(model: nn.Module) -> nn.Module:
    """A deep copy (without ``.grad``) for a Fisher that must not follow training."""
    frozen = copy.deepcopy(model)
    for p in frozen.parameters():
        p.grad = None
    return frozen
