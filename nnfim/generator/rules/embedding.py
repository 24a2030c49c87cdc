"""Rule for ``nn.Embedding`` (``padding_idx`` honoured)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nnfim.generator.rules._registry import LayerRule, register_rule


@register_rule(nn.Embedding)
class EmbeddingRule(LayerRule):
    """A lookup is a Linear layer on one-hot inputs without bias.

    The weight ``(V, d)`` has the tokens on its rows, so in the K-FAC layout
    ``G V A`` the row factor (``G`` slot, ``(V, V)``) holds the input side: it
    is diagonal, the token counts; the column factor (``A`` slot, ``(d, d)``)
    holds the output gradients. The padding token has no gradient.
    """

    kronecker = True
    broadcastable = True
    sparse_grads = True

    def check(self, module: nn.Module) -> None:
        """``max_norm`` rewrites the weight during the forward pass.

        Raises:
            ValueError: ``max_norm`` is set.
        """
        assert isinstance(module, nn.Embedding)
        if module.max_norm is not None:
            raise ValueError(
                "nn.Embedding with max_norm renormalises its weight in place during "
                "the forward pass; nnfim cannot follow it. Leave it out with "
                "layer_collection=."
            )

    def _one_hot(
        self, module: nn.Embedding, x: torch.Tensor, dtype: torch.dtype
    ) -> torch.Tensor:
        """``(n, T, V)`` one-hot tokens, zero for the padding token."""
        one_hot = F.one_hot(x.reshape(x.shape[0], -1), module.num_embeddings).to(dtype)
        if module.padding_idx is not None:
            one_hot[..., module.padding_idx] = 0
        return one_hot

    def _masked(self, module: nn.Embedding, x: torch.Tensor, gy: torch.Tensor):
        """Tokens ``(n, T)`` and output gradients ``(K, n, T, d)``, padding zeroed."""
        k, n = gy.shape[:2]
        tokens = x.reshape(n, -1)
        g = gy.reshape(k, n, tokens.shape[1], gy.shape[-1])
        if module.padding_idx is not None:
            g = g * (tokens != module.padding_idx)[None, :, :, None].to(g.dtype)
        return tokens, g

    def slot_sums(
        self, module: nn.Module, x: torch.Tensor, gy: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-example gradient rows, one slot per position.

        A token seen several times in one example has one gradient row, the
        sum over its positions: it is put in the slot of its first position,
        and the slots of its later positions are zero. Every nonzero row of the
        per-example gradient ``(V, d)`` is thus one slot, without forming it.

        Returns:
            ``(tokens (n, T), sums (K, n, T, d))``.
        """
        assert isinstance(module, nn.Embedding)
        tokens, g = self._masked(module, x, gy)
        t = tokens.shape[1]
        if t == 1:
            return tokens, g
        same = tokens[:, :, None] == tokens[:, None, :]  # (n, T, T)
        first = same.to(torch.int64).argmax(2)  # first position of each token
        k, n = g.shape[:2]
        index = (first + t * torch.arange(n, device=x.device)[:, None]).reshape(-1)
        sums = torch.zeros_like(g).reshape(k, n * t, -1)
        sums.index_add_(1, index, g.reshape(k, n * t, -1))
        return tokens, sums.reshape(g.shape)

    def per_example_grad(
        self, module: nn.Module, x: torch.Tensor, gy: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """Gradients of shape ``(K, n, V, d)``, scattered (no one-hot product)."""
        assert isinstance(module, nn.Embedding)
        tokens, g = self._masked(module, x, gy)
        k, n, t, d = g.shape
        v = module.num_embeddings
        index = (tokens + v * torch.arange(n, device=x.device)[:, None]).reshape(-1)
        out = g.new_zeros(k, n * v, d)
        out.index_add_(1, index, g.reshape(k, n * t, d))
        return {"weight": out.reshape(k, n, v, d)}

    def add_grad(
        self,
        module: nn.Module,
        x: torch.Tensor,
        gy: torch.Tensor,
        name: str,
        out: torch.Tensor,
        overwrite: bool,
    ) -> None:
        """Each position's gradient added into its token's row of ``out``."""
        assert isinstance(module, nn.Embedding)
        tokens, g = self._masked(module, x, gy)
        if overwrite:
            out.zero_()
        k, n, t, d = g.shape
        example = torch.arange(n, device=x.device)[:, None].expand(n, t)
        # (n, V, K, d) view: one (example, token) index pair per position
        out.permute(1, 2, 0, 3).index_put_(
            (example.reshape(-1), tokens.reshape(-1)),
            g.permute(1, 2, 0, 3).reshape(n * t, k, d),
            accumulate=True,
        )

    def diag(
        self, module: nn.Module, x: torch.Tensor, gy: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """Squares of the slot sums, scattered to their tokens' rows."""
        assert isinstance(module, nn.Embedding)
        tokens, sums = self.slot_sums(module, x, gy)
        sq = (sums * sums).sum(0).reshape(-1, sums.shape[-1])
        out = sq.new_zeros(module.num_embeddings, sq.shape[1])
        return {"weight": out.index_add_(0, tokens.reshape(-1), sq)}

    def kfac_factors(
        self, module: nn.Module, x: torch.Tensor, gy: torch.Tensor, convention: str
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A, G) = (gradient moment (d, d), token moment (V, V))``."""
        assert isinstance(module, nn.Embedding)
        k, n = gy.shape[:2]
        one_hot = self._one_hot(module, x, gy.dtype)
        g = gy.reshape(k, n, -1, gy.shape[-1])
        positions = one_hot.shape[1]
        if convention == "reduce" or positions == 1:
            counts = one_hot.mean(1)
            gs = g.sum(2).reshape(k * n, -1)
            return (gs.t() @ gs)[None], (counts.t() @ counts)[None]
        gf = g.reshape(-1, g.shape[-1])
        counts = one_hot.sum((0, 1)) / positions
        return (gf.t() @ gf)[None], torch.diag(counts)[None]
