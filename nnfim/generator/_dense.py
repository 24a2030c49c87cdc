r"""Dense Fishers without per-example rows where gradients are outer products.

A layer whose per-example gradient is one outer product ``g_ki a_i^T`` (a
Linear layer without shared positions: ``g`` the output gradient, ``a = [x, 1]``)
has, with any other such layer, the block

.. math::
    \sum_{k,i} (g_{ki} a_i^T) \otimes (g'_{ki} a_i'^T)
    = \sum_i \Big(\sum_k g_{ki} g'^T_{ki}\Big) \otimes (a_i a_i'^T),

one matrix product of inner size ``n`` instead of ``K n``: ``K`` times fewer
multiply-adds than ``U^T U`` on the rows ``U`` of per-example gradients. A
layer's own block keeps only the upper triangles of both symmetric factors
(a quarter of the products). Layers without that structure contribute their
rows as before, and their blocks with the structured layers through those
layers' rows.
"""

from __future__ import annotations

import torch

from nnfim.generator.rules._registry import DEFAULT_CHUNK_ELEMENTS, xtx

#: ``(g (K, n, b), a (n, c), index (b * c,))`` of a layer, see ``LayerRule.outer_factors``
Outer = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def _triangle(size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Upper-triangle pairs ``(2, size (size + 1) / 2)`` and their columns.

    The map ``(size, size)`` gives the column of a pair in either order.
    """
    pairs = torch.triu_indices(size, size, device=device)
    where = torch.empty(size, size, dtype=torch.long, device=device)
    cols = torch.arange(pairs.shape[1], device=device)
    where[pairs[0], pairs[1]] = cols
    where[pairs[1], pairs[0]] = cols
    return pairs, where


class DenseMoments:
    """``sum_{k,i} u_ki u_ki^T`` over the flat per-example gradients ``u_ki``.

    Args:
        widths: layer name -> number of parameters, in flat order.
    """

    def __init__(self, widths: dict[str, int]) -> None:
        self.widths = widths
        self.starts: dict[str, int] = {}
        start = 0
        for name, width in widths.items():
            self.starts[name] = start
            start += width
        self.numel = start
        #: the layers given as outer factors: name -> (b, c, index); set by the first add
        self.outer: dict[str, tuple[int, int, torch.Tensor]] | None = None
        self.kron: dict[tuple[str, str], torch.Tensor] = {}
        self.cross: dict[str, torch.Tensor] = {}
        self.rows: torch.Tensor | None = None
        self._tri: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def rows_layers(self) -> list[str]:
        """Layers given as rows (all of them before the first :meth:`add`)."""
        outer = self.outer or {}
        return [n for n in self.widths if n not in outer]

    def per_example(self, k: int, outer: dict[str, Outer]) -> int:
        """Elements held per example of a chunk (to size chunks)."""
        rows = sum(self.widths[n] for n in self.widths if n not in outer)
        shapes = [(g.shape[-1], a.shape[-1]) for g, a, _ in outer.values()]
        pairs = max([b1 * b2 + c1 * c2 for b1, c1 in shapes for b2, c2 in shapes] + [0])
        own = max([k * b * b for b, _ in shapes] + [0])
        materialised = max([b * c for b, c in shapes] + [0]) if rows else 0
        return k * (rows + materialised) + pairs + own

    def _pairs(self, size: int, device: torch.device) -> torch.Tensor:
        if size not in self._tri:
            self._tri[size] = _triangle(size, device)
        return self._tri[size][0]

    def add(self, outer: dict[str, Outer], rows: torch.Tensor | None) -> None:
        """Add one chunk of examples.

        Args:
            outer: the structured layers' factors for these examples.
            rows: the other layers' rows ``(K * chunk, p_rows)``, in flat order
                (None when every layer is structured).
        """
        if self.outer is None:
            self.outer = {
                n: (g.shape[-1], a.shape[-1], idx) for n, (g, a, idx) in outer.items()
            }
        assert set(outer) == set(self.outer)
        names = list(outer)
        for i, left in enumerate(names):
            g1, a1, _ = outer[left]
            n = a1.shape[0]
            tri_g = self._pairs(g1.shape[-1], g1.device)
            tri_a = self._pairs(a1.shape[-1], a1.device)
            gg = (g1[:, :, tri_g[0]] * g1[:, :, tri_g[1]]).sum(0)
            aa = a1[:, tri_a[0]] * a1[:, tri_a[1]]
            self._acc((left, left), gg.t(), aa)
            for right in names[i + 1 :]:
                g2, a2, _ = outer[right]
                gg = torch.einsum("kib,kid->ibd", g1, g2).reshape(n, -1)
                aa = (a1[:, :, None] * a2[:, None, :]).reshape(n, -1)
                self._acc((left, right), gg.t(), aa)
            if rows is not None:
                flat = (g1[:, :, :, None] * a1[None, :, None, :]).reshape(
                    rows.shape[0], -1
                )
                self._acc_cross(left, flat.t(), rows)
        if rows is not None:
            self.rows = xtx(rows, out=self.rows)

    def _acc(
        self, key: tuple[str, str], left: torch.Tensor, right: torch.Tensor
    ) -> None:
        if key in self.kron:
            self.kron[key].addmm_(left, right)
        else:
            self.kron[key] = left @ right

    def _acc_cross(self, key: str, left: torch.Tensor, right: torch.Tensor) -> None:
        if key in self.cross:
            self.cross[key].addmm_(left, right)
        else:
            self.cross[key] = left @ right

    def result(self, like: torch.Tensor) -> torch.Tensor:
        """The ``(P, P)`` sum, in the dtype and device of ``like``."""
        outer = self.outer or {}
        if not outer and self.rows is not None:
            return self.rows  # every layer as rows, in flat order
        out = like.new_zeros(self.numel, self.numel)
        spread = {
            n: self.starts[n] + idx for n, (_, _, idx) in outer.items()
        }  # flat position of each factor entry
        plain = torch.cat(
            [
                torch.arange(
                    self.starts[n], self.starts[n] + self.widths[n], device=out.device
                )
                for n in self.rows_layers()
            ]
            + [torch.zeros(0, dtype=torch.long, device=out.device)]
        )
        if self.rows is not None:
            out[plain[:, None], plain[None, :]] = self.rows
        for (left, right), acc in self.kron.items():
            b1, c1, _ = outer[left]
            b2, c2, _ = outer[right]
            # a few rows of the factor g at a time: temporaries stay small
            step = max(1, DEFAULT_CHUNK_ELEMENTS // (b2 * c1 * c2))
            for start in range(0, b1, step):
                rows = slice(start, min(start + step, b1))
                if left == right:
                    where_g = self._tri[b1][1][rows]
                    where_a = self._tri[c1][1]
                    block = acc[where_g[:, :, None, None], where_a[None, None]]
                else:
                    block = acc.reshape(b1, b2, c1, c2)[rows]
                block = block.permute(0, 2, 1, 3).reshape(-1, b2 * c2)
                at = spread[left].reshape(b1, c1)[rows].reshape(-1)
                out[at[:, None], spread[right][None, :]] = block
                if left != right:
                    out[spread[right][:, None], at[None, :]] = block.t()
        for name, acc in self.cross.items():
            out[spread[name][:, None], plain[None, :]] = acc
            out[plain[:, None], spread[name][None, :]] = acc.t()
        return out
