r"""Second-order optimizers: natural gradient with any representation, K-FAC, EKFAC.

All three are ``torch.optim.Optimizer`` objects over the parameters of one
model, with one parameter group whose entries (``lr``, ``damping``,
``momentum``, ``weight_decay``, ``kl_clip``, ...) are read at every step, so
a scheduler or a manual change takes effect at the next step. The curvature
is refreshed from the batch passed to ``step(batch=...)`` (or
``update_curvature(batch)``) through nnfim's builders: the model's
parameters, gradients, hooks and modes are left as they are.

One step, with ``g`` the gradient, ``w`` the weights, ``C`` the curvature
(the Fisher of the chosen representation, or the K-FAC / EKFAC matrix) and
``lambda`` the damping:

.. math::

    \tilde g = g + \mathrm{wd}\, w,\quad
    v = (C + \lambda I)^{-1} \tilde g,\quad
    \nu = \min\Big(1, \sqrt{\kappa / (\eta^2\, v \cdot \tilde g)}\Big),\quad
    b \leftarrow \mu b + \nu v,\quad
    w \leftarrow w - \eta b

(``kappa = kl_clip``, skipped when ``None``; ``mu = momentum``, ``b`` starts at 0).
"""

from __future__ import annotations

from nnfim.apps.optim.ekfac import EKFAC
from nnfim.apps.optim.kfac import KFAC
from nnfim.apps.optim.natural import NaturalGradient

__all__ = ["EKFAC", "KFAC", "NaturalGradient"]
