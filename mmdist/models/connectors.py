"""Connectors between the vision encoder and the rest: stage-1 heads, Q-Former, stage-2 projectors.

Settings live here (`ConnectorConfig`, `QFormerConfig`); the modules are filled
in by the model-core work. New connector types (a resampler, say) register in
one table here without touching the rest.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

from mmdist.config.schema import SettingsBase, setting


@dataclass
class QFormerConfig(SettingsBase):
    """BLIP-2 style Q-Former: learnable queries, self-attention, cross-attention to image features."""

    num_queries: int = setting(32, "learnable query tokens = image tokens given to the LLM")
    num_layers: int = setting(2, "transformer layers (BLIP-2 uses 12, initialised from BERT-base)")
    hidden_size: int = setting(256, "width of the Q-Former (taken from the text encoder when init_from_text)")
    num_heads: int = setting(4, "attention heads")
    cross_attention_every: int = setting(1, "insert cross-attention to the image every N layers (BLIP-2: 2)")
    init_from_text: bool = setting(True, "initialise self-attention/FFN weights from the text encoder's first layers, as BLIP-2 does")
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

    type: Literal["linear", "mlp", "qformer"] = setting("mlp", "stage-1 module: 'linear'/'mlp' heads (frozen text encoder) or 'qformer' (trainable text encoder)")
    align_dim: int = setting(256, "width of the shared image-text space the stage-1 heads map into")
    image_tokens: int = setting(0, "linear/mlp: pool the patch grid to this many tokens (0 keeps every patch)")
    projector_layers: int = setting(2, "stage-2 projector depth: 1 = Linear, N = MLP with GELU (LLaVA-1.5: 2)")
    temperature: float = setting(0.07, "initial ITC temperature (learnable)")
    stage1_weights: Optional[str] = setting(None, "stage 2: path of the stage-1 export (folder with model.safetensors + manifest.json)")
    train_stage1_module: bool = setting(True, "stage 2: keep training the stage-1 module with the projector (False freezes it)")
    qformer: QFormerConfig = setting(doc="Q-Former settings (type=qformer)", factory=QFormerConfig)

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
        return out
