"""The Q-Former's blocks: BERT's post-norm attention and feed-forward, and a layer that runs queries and caption
rows through them with the passes mmdist/models/qformer.py combines (keys and values computed once and reused).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

KV = tuple[torch.Tensor, torch.Tensor]


class Attention(nn.Module):
    """Multi-head attention with BERT's post-norm residual: LN(x + O(attn(x, ctx))).

    ``kv`` and ``attend`` are the two halves of ``forward``, so that keys and
    values computed once (the image's, the queries') serve several passes.
    """

    def __init__(self, dim: int, heads: int, kv_dim: Optional[int] = None, eps: float = 1e-12):
        super().__init__()
        kv_dim = kv_dim or dim
        self.heads = heads
        self.query, self.key, self.value = nn.Linear(dim, dim), nn.Linear(kv_dim, dim), nn.Linear(kv_dim, dim)
        self.out = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim, eps=eps)

    def split(self, y: torch.Tensor) -> torch.Tensor:
        """[N, T, dim] -> [N, heads, T, dim / heads]."""
        n, t, _ = y.shape
        return y.view(n, t, self.heads, -1).transpose(1, 2)

    def kv(self, context: torch.Tensor) -> KV:
        """Keys and values of ``context`` [N, T, kv_dim], split into heads."""
        return self.split(self.key(context)), self.split(self.value(context))

    def attend(self, x: torch.Tensor, kv: KV, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """LN(x + O(attn(Q(x), kv))); ``mask`` broadcasts to [N, heads, T, keys] (True = may attend)."""
        n, t, d = x.shape
        k, v = kv
        if k.shape[0] != n:  # keys shared by the whole batch (the first layer's queries)
            k, v = k.expand(n, -1, -1, -1), v.expand(n, -1, -1, -1)
        attn = F.scaled_dot_product_attention(self.split(self.query(x)), k, v, attn_mask=mask)
        return self.norm(x + self.out(attn.transpose(1, 2).reshape(n, t, d)))

    def forward(self, x: torch.Tensor, context: Optional[torch.Tensor] = None,
                allowed: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.attend(x, self.kv(x if context is None else context), None if allowed is None else allowed[:, None])


class FeedForward(nn.Module):
    """BERT FFN block: LN(x + W2 gelu(W1 x))."""

    def __init__(self, dim: int, hidden: int, eps: float = 1e-12):
        super().__init__()
        self.inter, self.out, self.norm = nn.Linear(dim, hidden), nn.Linear(hidden, dim), nn.LayerNorm(dim, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x + self.out(F.gelu(self.inter(x))))


class QFormerLayer(nn.Module):
    def __init__(self, dim: int, heads: int, vision_dim: int, cross: bool, with_text: bool):
        super().__init__()
        self.self_attn = Attention(dim, heads)
        self.cross_attn = Attention(dim, heads, kv_dim=vision_dim) if cross else None
        self.ffn_query = FeedForward(dim, 4 * dim)
        self.ffn_text = FeedForward(dim, 4 * dim) if with_text else None

    def forward(self, x: torch.Tensor, n_queries: int, image: torch.Tensor,
                allowed: Optional[torch.Tensor]) -> torch.Tensor:
        image_kv = self.cross_attn.kv(image) if self.cross_attn is not None else None
        return self.joint(x, n_queries, image_kv, None if allowed is None else allowed[:, None])

    def joint(self, x: torch.Tensor, n_queries: int, image_kv: Optional[KV], mask: Optional[torch.Tensor],
              queries_only: bool = False) -> torch.Tensor:
        """Queries and text [N, Q + L, dim] through the layer; ``queries_only``: return the query rows alone
        (the ITM head reads nothing else after the last layer)."""
        kv = self.self_attn.kv(x)
        if queries_only:
            queries, text = self.self_attn.attend(x[:, :n_queries], kv, mask), x[:, :0]
        else:
            x = self.self_attn.attend(x, kv, mask)
            queries, text = x[:, :n_queries], x[:, n_queries:]
        if self.cross_attn is not None:
            queries = self.cross_attn.attend(queries, image_kv)
        queries = self.ffn_query(queries)
        if text.shape[1]:
            text = self.ffn_text(text)
        return torch.cat([queries, text], 1) if text.shape[1] else queries

    def queries_step(self, queries: torch.Tensor, image_kv: Optional[KV], batch: int) -> tuple[torch.Tensor, KV]:
        """Queries alone (ITC, stage 2); returns them and their self-attention keys and values (what ITG's text
        attends to). ``queries`` may be [1, Q, dim] (the learnable queries before any image): the self-attention
        then runs once for the whole batch of ``batch`` images."""
        kv = self.self_attn.kv(queries)
        queries = self.self_attn.attend(queries, kv)
        if queries.shape[0] != batch:
            queries = queries.expand(batch, -1, -1)
        if self.cross_attn is not None:
            queries = self.cross_attn.attend(queries, image_kv)
        return self.ffn_query(queries), kv

    def text_step(self, text: torch.Tensor, queries_kv: KV, mask: torch.Tensor) -> torch.Tensor:
        """Caption rows alone, attending to the queries' keys and values (from :meth:`queries_step`) and to
        themselves under ``mask`` [N, 1, L, Q + L] (ITG: the queries never see the caption, so theirs are ITC's)."""
        n = text.shape[0]
        k_text, v_text = self.self_attn.kv(text)
        k_q, v_q = queries_kv
        kv = (torch.cat([k_q.expand(n, -1, -1, -1), k_text], 2), torch.cat([v_q.expand(n, -1, -1, -1), v_text], 2))
        return self.ffn_text(self.self_attn.attend(text, kv, mask))
