"""A perceiver-style resampler (Qwen-VL): a fixed number of learnable queries cross-attend to the image tokens.

Whatever the encoder and resolution (196 ViT patches, a 7x7 ResNet map, one
class token), the LLM gets ``num_queries`` image tokens. Each layer is pre-norm:
queries attend to the layer-normed image tokens, whose keys carry fixed 2-D
sin-cos positions, then a feed-forward block; a final layernorm and a linear
projection give ``out_dim``. The positions are computed from the token grid of
each input (a square, a square plus a leading class token, or the most
square-like factorisation of the count), on a fixed coordinate range, so any
grid size is placed on the same scale instead of interpolating a learnt table.

Used as the stage-1 image head (``connector.type: resampler``, ITC against a
frozen text encoder) and in stage 2 between the stage-1 module, or the tower,
and the projector (mmdist/models/build.py wires both). Written here because
transformers has no standalone module of this shape (Qwen-VL's lives inside
its remote code).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from mmdist.settings import SettingsBase, setting

POSITION_RANGE = 16.0  # every grid spans [0, 16) in both directions: positions mean the same at any resolution


@dataclass
class ResamplerConfig(SettingsBase):
    """Learnable queries that cross-attend to the image tokens (type=resampler, or before the stage-2 projector)."""

    num_queries: int = setting(64, "learnable queries = image tokens given to the LLM")
    num_layers: int = setting(2, "cross-attention + feed-forward layers")
    hidden_size: int = setting(256, "width of the queries (a multiple of 4 and of num_heads)")
    num_heads: int = setting(4, "attention heads")
    before_projector: bool = setting(
        False,
        "stage 2: a new trainable resampler between the stage-1 module "
        "(or the tower, without stage1_weights) and the projector",
    )

    def check(self) -> list[tuple[str, str]]:
        out = []
        if self.num_queries < 1:
            out.append(("num_queries", "must be at least 1"))
        if self.num_layers < 1:
            out.append(("num_layers", "must be at least 1"))
        if self.num_heads < 1 or self.hidden_size % self.num_heads:
            out.append(("hidden_size", f"{self.hidden_size} is not divisible by num_heads={self.num_heads}"))
        if self.hidden_size % 4:
            out.append(("hidden_size", "must be a multiple of 4 (2-D sin-cos positions: sin and cos per axis)"))
        return out


def token_grid(n: int) -> tuple[int, int, int]:
    """(leading non-grid tokens, height, width) of ``n`` image tokens.

    A square count is a square grid; a square plus one is a class token before a
    square grid; anything else is the factorisation h x w (h <= w) closest to a square.
    """
    side = math.isqrt(n)
    if side * side == n:
        return 0, side, side
    side = math.isqrt(n - 1)
    if n > 1 and side * side == n - 1:
        return 1, side, side
    h = max(d for d in range(1, math.isqrt(n) + 1) if n % d == 0)
    return 0, h, n // h


def sincos_positions_2d(n: int, dim: int, device: Optional[torch.device] = None) -> torch.Tensor:
    """Fixed positions [n, dim] for ``n`` tokens laid out as :func:`token_grid` says (zeros for a class token).

    Half the channels encode the row, half the column, each as sin and cos of the
    coordinate at ``dim / 4`` frequencies (MAE's 2-D sin-cos), with coordinates of
    cell centres scaled to [0, POSITION_RANGE).
    """
    prefix, h, w = token_grid(n)
    quarter = dim // 4
    freqs = 1.0 / (10000 ** (torch.arange(quarter, dtype=torch.float32, device=device) / max(quarter, 1)))
    rows = (torch.arange(h, dtype=torch.float32, device=device) + 0.5) * (POSITION_RANGE / h)
    cols = (torch.arange(w, dtype=torch.float32, device=device) + 0.5) * (POSITION_RANGE / w)
    yy, xx = torch.meshgrid(rows, cols, indexing="ij")
    ang_y, ang_x = yy.reshape(-1, 1) * freqs, xx.reshape(-1, 1) * freqs
    pos = torch.cat([ang_y.sin(), ang_y.cos(), ang_x.sin(), ang_x.cos()], 1)
    pos = F.pad(pos, (0, dim - pos.shape[1]))
    return torch.cat([torch.zeros(prefix, dim, device=device), pos], 0)


class ResamplerLayer(nn.Module):
    """Pre-norm cross-attention (queries -> image tokens, positions on the keys), then a pre-norm feed-forward block."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm_q, self.norm_kv, self.norm_ffn = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.query, self.key, self.value, self.out = (nn.Linear(dim, dim) for _ in range(4))
        self.ffn = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, queries: torch.Tensor, image: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        b, q, d = queries.shape
        h = self.heads

        def split(y: torch.Tensor) -> torch.Tensor:
            return y.view(b, -1, h, d // h).transpose(1, 2)

        kv = self.norm_kv(image)
        attn = F.scaled_dot_product_attention(split(self.query(self.norm_q(queries))), split(self.key(kv + positions)),
                                              split(self.value(kv)))
        queries = queries + self.out(attn.transpose(1, 2).reshape(b, q, d))
        return queries + self.ffn(self.norm_ffn(queries))


class Resampler(nn.Module):
    """Image tokens [N, n, in_dim] (any n) -> [N, num_queries, out_dim].

    With a ``text_head`` (stage 1, frozen text encoder) it also gives the ITC
    embeddings: the mean of the output tokens for an image, the head's output for a
    pooled caption vector (the interface of ``connectors.AlignHeads``).
    """

    def __init__(self, cfg: ResamplerConfig, in_dim: int, out_dim: int, text_head: Optional[nn.Module] = None):
        super().__init__()
        self.num_tokens, self.out_dim, self.dim = cfg.num_queries, out_dim, cfg.hidden_size
        self.queries = nn.Parameter(torch.randn(1, cfg.num_queries, cfg.hidden_size) * 0.02)
        self.image_in = nn.Linear(in_dim, cfg.hidden_size)
        self.layers = nn.ModuleList(ResamplerLayer(cfg.hidden_size, cfg.num_heads) for _ in range(cfg.num_layers))
        self.norm_out = nn.LayerNorm(cfg.hidden_size)
        self.proj = nn.Linear(cfg.hidden_size, out_dim)
        self.text_head = text_head

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Always reached through ``self(...)``: under ZeRO-3 the module call is what gathers ``self.queries``."""
        image = self.image_in(features.to(self.queries.dtype))
        positions = sincos_positions_2d(image.shape[1], self.dim, image.device).to(image.dtype)
        x = self.queries.expand(image.shape[0], -1, -1)
        for layer in self.layers:
            x = layer(x, image, positions)
        return self.proj(self.norm_out(x))

    def image_tokens_of(self, features: torch.Tensor) -> torch.Tensor:
        """Vision features [N, n, D] -> [N, num_queries, out_dim] (what stage 2 projects)."""
        return self(features)

    def image_embedding(self, features: torch.Tensor) -> torch.Tensor:
        return self(features).mean(1)

    def text_embedding(self, pooled: torch.Tensor) -> torch.Tensor:
        if self.text_head is None:
            raise ValueError("this resampler was built without a text head (stage 2): it gives no caption embeddings")
        return self.text_head(pooled.to(self.queries.dtype))
