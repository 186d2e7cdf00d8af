"""The stage-1 text encoder (BERT-style, via AutoModel), frozen or trainable.

Settings live here (`TextConfig`); the wrapper is filled in by the model-core work.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

from mmdist.config.schema import SettingsBase, setting
from mmdist.models.llm import Dtype


@dataclass
class TextConfig(SettingsBase):
    """Which BERT-style text encoder stage 1 aligns images with."""

    name_or_path: str = setting("", "hub id or local folder of a BERT-style encoder (AutoModel); 'minilm' = the packaged all-MiniLM-L6-v2")
    init_config: Optional[dict] = setting(None, "build an encoder from this config dict (tests)")
    freeze: bool = setting(True, "frozen: Linear heads align the spaces; trainable: a Q-Former is trained (BLIP-2)")
    dtype: Dtype = setting("fp32", "dtype of the encoder weights (frozen copies may be bf16/fp16)")
    max_length: int = setting(64, "caption tokens kept by the text encoder's tokenizer")
    pooling: Literal["cls", "mean"] = setting("mean", "how a caption becomes one vector (mean over tokens, or [CLS])")

    def check(self) -> list[tuple[str, str]]:
        out = []
        if self.name_or_path and self.init_config:
            out.append(("init_config", "give either name_or_path or init_config, not both"))
        if self.max_length < 4:
            out.append(("max_length", "must be at least 4"))
        return out
