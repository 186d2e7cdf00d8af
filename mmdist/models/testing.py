"""Tiny models and tokenizers built entirely in code, for tests, CPU smoke runs and benchmarks.

Nothing here downloads anything. The tokenizers are named by the special
values ``mmdist:tiny-bytes`` (a byte-level BPE with no merges, for the tiny LLM)
and ``mmdist:tiny-wordpiece`` (a character WordPiece, for the tiny BERT text
encoder), so a config file can point at them and every process (data workers,
other ranks) rebuilds the identical tokenizer without shared files.

Other helpers import the factories: ``tiny_llm_config()``, ``tiny_vision_config()``,
``tiny_text_config()`` (settings dicts) and ``tiny_run_config(stage)`` (a whole
RunConfig dict for stage ``align`` or ``fuse``).
"""

from __future__ import annotations

import copy
from typing import Any, Optional

from mmdist.models.tokenizers import TINY_BYTES, TINY_WORDPIECE, builtin_tokenizer, tiny_byte_tokenizer, tiny_wordpiece_tokenizer  # noqa: F401

# ---------------------------------------------------------------------------
# settings dicts


def tiny_llm_config(**overrides: Any) -> dict:
    """model.llm settings for a 2-layer llama-type LLM (hidden 64), fp32, with the byte tokenizer.

    vocab_size equals the tokenizer's 259 ids, so the added image placeholder is
    *outside* the embedding matrix: this exercises the no-resize path.
    """
    cfg = {
        "init_config": {
            "model_type": "llama",
            "vocab_size": 259,
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 512,
            "tie_word_embeddings": True,
            "bos_token_id": 257,
            "eos_token_id": 258,
            "pad_token_id": 256,
        },
        "tokenizer": TINY_BYTES,
        "dtype": "fp32",
        "attn_implementation": "sdpa",
    }
    return _merge(cfg, overrides)


def tiny_vision_config(**overrides: Any) -> dict:
    """model.vision settings for a 2-layer HF ViT (hidden 32, 16x16 images, 4x4 patches = 16 patch tokens)."""
    cfg = {
        "source": "hf",
        "init_config": {
            "model_type": "vit",
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "image_size": 16,
            "patch_size": 4,
            "num_channels": 3,
        },
        "init_seed": 0,
        "select_layer": -1,
        "select_tokens": "patch",
        "dtype": "fp32",
    }
    return _merge(cfg, overrides)


def tiny_text_config(**overrides: Any) -> dict:
    """model.text settings for a 2-layer BERT (hidden 32) with the character WordPiece tokenizer."""
    vocab_size = len(tiny_wordpiece_tokenizer())
    cfg = {
        "init_config": {
            "model_type": "bert",
            "vocab_size": vocab_size,
            "hidden_size": 32,
            "intermediate_size": 128,  # 4 x hidden, as the Q-Former's FFN, so init_from_text copies it
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "max_position_embeddings": 64,
        },
        "tokenizer": TINY_WORDPIECE,
        "max_length": 32,
        "dtype": "fp32",
    }
    return _merge(cfg, overrides)


def tiny_run_config(stage: str = "fuse", connector: str = "mlp", **overrides: Any) -> dict:
    """A whole RunConfig dict with tiny models for ``stage`` ('align' or 'fuse').

    ``connector`` is 'linear', 'mlp' or 'qformer' (qformer in align trains the text
    encoder). The data source points at a placeholder shard pattern; data tests
    override ``data.train``. ``overrides`` are merged in as a nested dict.
    """
    text = tiny_text_config(freeze=connector != "qformer")
    cfg: dict = {
        "stage": stage,
        "name": f"tiny-{stage}",
        "run_dir": "runs/tiny",
        "model": {
            "vision": tiny_vision_config(),
            "text": text,
            "connector": {
                "type": connector,
                "align_dim": 32,
                "projector_layers": 2,
                "qformer": {"num_queries": 4, "num_layers": 2, "hidden_size": 32, "num_heads": 4, "cross_attention_every": 1},
            },
        },
        "data": {"train": [{"shards": ["data/tiny-{000000..000001}.tar"]}], "max_len": 128, "num_workers": 0},
        "train": {"max_steps": 2, "global_batch_size": 4, "micro_batch_size": 2, "lr": 1e-3},
        "engine": {"zero_stage": 0, "precision": "fp32", "torch_adam": True, "backend": "gloo"},
    }
    if stage == "fuse":
        cfg["model"]["llm"] = tiny_llm_config()
    return _merge(cfg, overrides)


def _merge(base: dict, overrides: Optional[dict]) -> dict:
    out = copy.deepcopy(base)
    for key, value in (overrides or {}).items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


# ---------------------------------------------------------------------------
# a custom vision encoder (the `source: custom` path), small enough for tests

try:
    import torch as _torch

    class TinyCNN(_torch.nn.Module):
        """A user-style encoder: patchify conv + GELU + 1x1 conv; returns a feature map [N, width, H/p, W/p]."""

        def __init__(self, width: int = 24, patch: int = 4, image_size: int = 16):
            super().__init__()
            self.image_size = image_size
            self.stem = _torch.nn.Conv2d(3, width, kernel_size=patch, stride=patch)
            self.act = _torch.nn.GELU()
            self.mix = _torch.nn.Conv2d(width, width, kernel_size=1)
            self.norm = _torch.nn.BatchNorm2d(width)

        def forward(self, x):
            return self.norm(self.mix(self.act(self.stem(x))))
except ImportError:  # torch is a hard dependency of the model code; settings alone do not need it
    pass


def tiny_custom_vision_config(checkpoint: Optional[str] = None, **overrides: Any) -> dict:
    """model.vision settings for :class:`TinyCNN` (16 tokens of width 24 from 16x16 images)."""
    cfg = {
        "source": "custom",
        "custom_class": "mmdist.models.testing:TinyCNN",
        "custom_kwargs": {"width": 24, "patch": 4, "image_size": 16},
        "checkpoint": checkpoint,
        "dtype": "fp32",
    }
    return _merge(cfg, overrides)
