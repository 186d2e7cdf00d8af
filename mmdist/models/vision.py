"""The frozen vision encoder: Hugging Face towers (CLIP, SigLIP, ViT) or the user's own module.

Settings live here (`VisionConfig`); the encoder wrapper is filled in by the
model-core work.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

from mmdist.config.schema import SettingsBase, setting
from mmdist.models.llm import Dtype


@dataclass
class VisionConfig(SettingsBase):
    """Which image encoder to load, which of its outputs to use, and how images are prepared."""

    source: Literal["hf", "custom"] = setting("hf", "'hf' for a Hugging Face vision tower, 'custom' for your own nn.Module")
    name_or_path: str = setting("", "hub id or local folder (source=hf), e.g. openai/clip-vit-large-patch14-336")
    init_config: Optional[dict] = setting(None, "build a vision tower from this config dict (model_type: vit | clip_vision_model | siglip_vision_model)")
    init_seed: int = setting(0, "seed for the weights of a tower built from init_config (fixed, so runs are repeatable)")
    custom_class: Optional[str] = setting(None, "'package.module:Class' of your encoder (source=custom)")
    custom_kwargs: dict = setting(doc="keyword arguments for custom_class", factory=dict)
    checkpoint: Optional[str] = setting(None, "weights file for the encoder (loaded with weights_only=True)")
    checkpoint_key: Optional[str] = setting(None, "key of the state dict inside the checkpoint (e.g. 'state_dict', 'model'); default: auto")
    allow_partial_load: bool = setting(False, "accept missing/unexpected checkpoint keys (they are still listed)")
    hidden_size: Optional[int] = setting(None, "feature width of a custom encoder; default: read from the module or a probe forward")
    select_layer: int = setting(-2, "hidden layer whose output is used (-1 last, -2 penultimate as in LLaVA)")
    select_tokens: Literal["patch", "cls", "all"] = setting("patch", "use patch tokens, the class token only, or both")
    image_size: Optional[int] = setting(None, "input resolution; default: the encoder's own processor setting")
    image_mean: Optional[list[float]] = setting(None, "normalisation mean; default: the encoder's processor")
    image_std: Optional[list[float]] = setting(None, "normalisation std; default: the encoder's processor")
    pad_to_square: bool = setting(False, "pad images to a square with the mean colour before resizing (LLaVA-1.5)")
    dtype: Dtype = setting("bf16", "dtype of the frozen weights")
    freeze: bool = setting(True, "freeze the encoder (forward only, no optimizer state)")

    def check(self) -> list[tuple[str, str]]:
        out = []
        if self.source == "hf" and not self.name_or_path and not self.init_config:
            out.append(("name_or_path", "set a hub id / local path, or init_config, for source=hf"))
        if self.source == "hf" and self.name_or_path and self.init_config:
            out.append(("init_config", "give either name_or_path or init_config, not both"))
        if self.source == "custom":
            if not self.custom_class:
                out.append(("custom_class", "source=custom needs 'package.module:Class'"))
            elif ":" not in self.custom_class:
                out.append(("custom_class", f"{self.custom_class!r} is not of the form 'package.module:Class'"))
        for key in ("image_mean", "image_std"):
            value = getattr(self, key)
            if value is not None and len(value) not in (1, 3):
                out.append((key, "needs 1 or 3 values"))
        return out
