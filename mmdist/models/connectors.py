"""Connectors between the vision encoder and the rest: stage-1 heads, Q-Former, resampler, stage-2 projectors.

Settings live here (`ConnectorConfig`, `QFormerConfig`; `ResamplerConfig` beside
its module) with the modules:

* a stage-1 module maps frozen vision features to image tokens and, in stage 1,
  gives one embedding per image and per caption for ITC. `AlignHeads` (linear /
  mlp, for a frozen text encoder), the Q-Former (mmdist/models/qformer.py) and
  the resampler (mmdist/models/resampler.py) are registered in `STAGE1_MODULES`;
  a new type adds one entry there and nothing else changes.
* `Projector` maps image tokens into the LLM's embedding space (stage 2);
  `ResampledProjector` first resamples them to a fixed number of queries.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, Optional

import torch
import torch.nn.functional as F
from torch import nn

from mmdist.models.flops import FlopCount, compute_dtype, matmul_layers, train_flops
from mmdist.models.qformer import QFormer
from mmdist.models.resampler import Resampler, ResamplerConfig
from mmdist.settings import SettingsBase, setting


@dataclass
class QFormerConfig(SettingsBase):
    """BLIP-2 style Q-Former: learnable queries, self-attention, cross-attention to image features."""

    num_queries: int = setting(32, "learnable query tokens = image tokens given to the LLM")
    num_layers: int = setting(2, "transformer layers (BLIP-2 uses 12, initialised from BERT-base)")
    hidden_size: int = setting(256, "width of the Q-Former (taken from the text encoder when init_from_text)")
    num_heads: int = setting(4, "attention heads")
    cross_attention_every: int = setting(1, "insert cross-attention to the image every N layers (BLIP-2: 2)")
    init_from_text: bool = setting(
        True, "initialise self-attention/FFN weights from the text encoder's first layers, as BLIP-2 does"
    )
    tie_lm_head: bool = setting(
        True, "ITG's output layer is the text encoder's token table (and a trained bias), as BLIP-2 ties its decoder "
              "to the word embeddings: it trains with the table and is frozen with model.text.freeze_word_embeddings; "
              "needs the Q-Former at the text encoder's width. false: a separate head of vocabulary x width weights, "
              "initialised from the table, that always trains"
    )
    itm_weight: float = setting(1.0, "weight of image-text matching (hard negatives) in stage 1")
    itg_weight: float = setting(1.0, "weight of image-grounded text generation in stage 1")

    def check(self) -> list[tuple[str, str]]:
        out = []
        if self.num_queries < 1:
            out.append(("num_queries", "must be at least 1"))
        if self.hidden_size % self.num_heads:
            out.append(("hidden_size", f"{self.hidden_size} is not divisible by num_heads={self.num_heads}"))
        return out


@dataclass
class ConnectorConfig(SettingsBase):
    """The trainable pieces: stage-1 alignment module and the stage-2 projector into the LLM."""

    type: Literal["linear", "mlp", "qformer", "resampler"] = setting(
        "mlp",
        "stage-1 module: 'linear'/'mlp' heads or 'resampler' "
        "(frozen text encoder), or 'qformer' (trainable text encoder)",
    )
    align_dim: int = setting(256, "width of the shared image-text space the stage-1 heads map into")
    image_tokens: int = setting(0, "linear/mlp: pool the patch grid to this many tokens (0 keeps every patch)")
    projector_layers: int = setting(2, "stage-2 projector depth: 1 = Linear, N = MLP with GELU (LLaVA-1.5: 2)")
    temperature: float = setting(0.07, "initial ITC temperature (learnable)")
    stage1_weights: Optional[str] = setting(
        None, "stage 2: path of the stage-1 export (folder with model.safetensors + manifest.json)"
    )
    train_stage1_module: bool = setting(
        True, "stage 2: keep training the stage-1 module with the projector (False freezes it)"
    )
    qformer: QFormerConfig = setting(doc="Q-Former settings (type=qformer)", factory=QFormerConfig)
    resampler: ResamplerConfig = setting(
        doc="resampler settings (type=resampler, or resampler.before_projector in stage 2)", factory=ResamplerConfig
    )

    def check(self) -> list[tuple[str, str]]:
        out = []
        if self.align_dim < 1:
            out.append(("align_dim", "must be positive"))
        if self.image_tokens < 0:
            out.append(("image_tokens", "must be 0 (keep all) or positive"))
        if self.projector_layers < 1:
            out.append(("projector_layers", "must be at least 1"))
        if not 0.0 < self.temperature < 1.0:
            out.append(("temperature", "must be in (0, 1)"))
        if self.type == "resampler" and self.resampler.before_projector:
            out.append(
                (
                    "resampler.before_projector",
                    "type=resampler already resamples: before_projector is for linear/mlp/qformer stage-1 modules",
                )
            )
        if self.type == "resampler" and self.image_tokens:
            out.append(
                (
                    "image_tokens",
                    "type=resampler gives resampler.num_queries tokens; image_tokens pools for linear/mlp only",
                )
            )
        return out


# ---------------------------------------------------------------------------
# modules


def mlp(in_dim: int, out_dim: int, layers: int) -> nn.Module:
    """1 layer: Linear; N layers: Linear, then (GELU, Linear) x (N-1), all of width out_dim (LLaVA-1.5)."""
    if layers <= 1:
        return nn.Linear(in_dim, out_dim)
    mods: list[nn.Module] = [nn.Linear(in_dim, out_dim)]
    for _ in range(layers - 1):
        mods += [nn.GELU(), nn.Linear(out_dim, out_dim)]
    return nn.Sequential(*mods)


def pool_tokens(features: torch.Tensor, k: int) -> torch.Tensor:
    """[N, n, D] -> [N, k, D] by adaptive average pooling (2-D when both n and k are squares)."""
    n = features.shape[1]
    if k <= 0 or k == n:
        return features
    side, kside = math.isqrt(n), math.isqrt(k)
    x = features.transpose(1, 2)  # [N, D, n]
    if side * side == n and kside * kside == k:
        x = F.adaptive_avg_pool2d(x.reshape(x.shape[0], x.shape[1], side, side), kside).flatten(2)
    else:
        x = F.adaptive_avg_pool1d(x, k)
    return x.transpose(1, 2)


class AlignHeads(nn.Module):
    """Linear/MLP heads for a frozen text encoder.

    ``image_head`` maps every vision token to ``align_dim`` (these tokens are what
    stage 2 projects into the LLM); ``text_head`` maps the pooled caption vector.
    The image embedding for ITC is the mean of the mapped tokens.
    """

    def __init__(self, cfg: ConnectorConfig, vision_dim: int, vision_tokens: int, text_dim: Optional[int]):
        super().__init__()
        layers = 1 if cfg.type == "linear" else 2
        self.image_tokens = cfg.image_tokens
        self.num_tokens = cfg.image_tokens or vision_tokens
        self.out_dim = cfg.align_dim
        self.image_head = mlp(vision_dim, cfg.align_dim, layers)
        self.text_head = mlp(text_dim, cfg.align_dim, layers) if text_dim else None

    def image_tokens_of(self, features: torch.Tensor) -> torch.Tensor:
        """Vision features [N, n, Dv] -> image tokens [N, k, align_dim]."""
        features = features.to(self.image_head_dtype)
        return self.image_head(pool_tokens(features, self.image_tokens))

    @property
    def image_head_dtype(self) -> torch.dtype:
        return next(self.image_head.parameters()).dtype

    def image_embedding(self, features: torch.Tensor) -> torch.Tensor:
        return self.image_tokens_of(features).mean(1)

    def text_embedding(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.text_head(pooled.to(self.image_head_dtype))

    def flop_count(self) -> FlopCount:
        """Training FLOPs (mmdist.models.contract.CountsOwnFlops): the image head at each of its tokens per image,
        the text head once per caption (stage 1); both read features that carry no gradient."""
        image = train_flops(matmul_layers(self.image_head)[0], self.num_tokens)
        text = train_flops(matmul_layers(self.text_head)[0], 1) if self.text_head is not None else 0.0
        return FlopCount.of(compute_dtype(self), per_image=image, per_sample=text)


class Projector(nn.Module):
    """Stage-2 projector: image tokens -> LLM embedding width (Linear or LLaVA-style MLP)."""

    def __init__(self, in_dim: int, llm_dim: int, layers: int):
        super().__init__()
        self.in_dim, self.out_dim, self.layers = in_dim, llm_dim, layers
        self.net = mlp(in_dim, llm_dim, layers)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.net(tokens.to(next(self.net.parameters()).dtype))


class ResampledProjector(nn.Module):
    """Stage-2 projector behind a new resampler: image tokens (any count) -> ``num_queries`` tokens -> LLM width.

    The resampler's output keeps its own width; the projector net (Linear or MLP, as
    ``Projector``'s) maps it into the LLM.
    """

    def __init__(self, cfg: ResamplerConfig, in_dim: int, llm_dim: int, layers: int):
        super().__init__()
        self.in_dim, self.out_dim, self.layers = in_dim, llm_dim, layers
        self.num_tokens = cfg.num_queries
        self.resampler = Resampler(cfg, in_dim, cfg.hidden_size)
        self.net = mlp(cfg.hidden_size, llm_dim, layers)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.net(self.resampler(tokens))


def _build_heads(
    cfg: ConnectorConfig, vision_dim: int, vision_tokens: int, text_dim: Optional[int], text_encoder=None, gather=None
) -> nn.Module:
    return AlignHeads(cfg, vision_dim, vision_tokens, text_dim)


def _build_qformer(
    cfg: ConnectorConfig, vision_dim: int, vision_tokens: int, text_dim: Optional[int], text_encoder=None, gather=None
) -> nn.Module:
    return QFormer(cfg, vision_dim, text_dim, text_encoder=text_encoder, gather=gather, vision_tokens=vision_tokens)


def _build_resampler(
    cfg: ConnectorConfig, vision_dim: int, vision_tokens: int, text_dim: Optional[int], text_encoder=None, gather=None
) -> nn.Module:
    text_head = mlp(text_dim, cfg.align_dim, 2) if text_dim else None  # as the mlp heads' text side
    return Resampler(cfg.resampler, vision_dim, cfg.align_dim, text_head)


# type -> builder(cfg, vision_dim, vision_tokens, text_dim, text_encoder, gather) -> module with
# image_tokens_of(features), num_tokens, out_dim
STAGE1_MODULES: dict[str, Callable[..., nn.Module]] = {
    "linear": _build_heads,
    "mlp": _build_heads,
    "qformer": _build_qformer,
    "resampler": _build_resampler,
}


def build_stage1_module(cfg: ConnectorConfig, vision_dim: int, vision_tokens: int, text_dim: Optional[int] = None,
                        text_encoder=None, gather=None) -> nn.Module:
    """The stage-1 module of ``cfg.type`` (see STAGE1_MODULES)."""
    try:
        builder = STAGE1_MODULES[cfg.type]
    except KeyError:
        raise ValueError(f"model.connector.type={cfg.type!r} is not one of {', '.join(STAGE1_MODULES)}") from None
    return builder(cfg, vision_dim, vision_tokens, text_dim, text_encoder, gather)
