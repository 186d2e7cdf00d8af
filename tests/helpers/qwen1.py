"""A tiny Qwen1 checkpoint in Qwen1's own layout and key names, and Qwen1's forward pass from its equations.

Shared by tests/models/test_qwen1.py and the multi-process ZeRO-3 workers
(tests/helpers/zero3_load_worker.py). Written from modeling_qwen.py's equations,
independent of transformers.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

VOCAB = 151936
HIDDEN, HEADS, LAYERS, FFN = 64, 4, 2, 2 * 96  # FFN: Qwen1's intermediate size, twice the MLP width
SEQ_LENGTH = 256
REPO_ROOT = Path(__file__).resolve().parents[2]


def tiktoken_path() -> Path | None:
    env = os.environ.get("MMDIST_QWEN_TIKTOKEN")
    # ../shared beside the checkout (a git worktree may sit one level deeper)
    beside = [folder / "shared" / "qwen1" / "qwen.tiktoken" for folder in REPO_ROOT.parents]
    for candidate in ([Path(env)] if env else []) + beside:
        if candidate.is_file():
            return candidate
    return None


def needs_tiktoken_file() -> Path:
    path = tiktoken_path()
    if path is None:
        pytest.skip("Qwen1's qwen.tiktoken not found (../shared/qwen1/qwen.tiktoken or $MMDIST_QWEN_TIKTOKEN)")
    return path


# ---------------------------------------------------------------------------
# a tiny Qwen1 checkpoint, in Qwen1's own layout


def qwen1_config(spelling: str) -> dict:
    common = {
        "model_type": "qwen",
        "architectures": ["QWenLMHeadModel"],
        "auto_map": {
            "AutoConfig": "configuration_qwen.QWenConfig",
            "AutoModelForCausalLM": "modeling_qwen.QWenLMHeadModel",
        },
        "layer_norm_epsilon": 1e-6,
        "rotary_emb_base": 10000,
        "rotary_pct": 1.0,
        "seq_length": SEQ_LENGTH,
        "kv_channels": HIDDEN // HEADS,
        "no_bias": True,
        "tie_word_embeddings": False,
        "use_dynamic_ntk": True,
        "use_logn_attn": True,
        "max_position_embeddings": 8192,
    }
    if spelling == "early":  # the first Qwen-7B release
        return {**common, "n_embd": HIDDEN, "n_head": HEADS, "n_layer": LAYERS, "ffn_hidden_size": FFN,
                "padded_vocab_size": VOCAB, "vocab_size": 151851}
    return {**common, "hidden_size": HIDDEN, "num_attention_heads": HEADS, "num_hidden_layers": LAYERS,
            "intermediate_size": FFN, "vocab_size": VOCAB}


def qwen1_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=0.08):
        return torch.randn(*shape, generator=g) * scale

    sd = {"transformer.wte.weight": rand(VOCAB, HIDDEN, scale=0.5)}
    for i in range(LAYERS):
        p = f"transformer.h.{i}."
        sd[p + "ln_1.weight"] = 1 + rand(HIDDEN, scale=0.1)
        sd[p + "attn.c_attn.weight"] = rand(3 * HIDDEN, HIDDEN)
        sd[p + "attn.c_attn.bias"] = rand(3 * HIDDEN, scale=0.1)
        sd[p + "attn.c_proj.weight"] = rand(HIDDEN, HIDDEN)
        sd[p + "ln_2.weight"] = 1 + rand(HIDDEN, scale=0.1)
        sd[p + "mlp.w1.weight"] = rand(FFN // 2, HIDDEN)
        sd[p + "mlp.w2.weight"] = rand(FFN // 2, HIDDEN)
        sd[p + "mlp.c_proj.weight"] = rand(HIDDEN, FFN // 2)
    sd["transformer.ln_f.weight"] = 1 + rand(HIDDEN, scale=0.1)
    sd["lm_head.weight"] = rand(VOCAB, HIDDEN, scale=0.5)
    return sd


def write_qwen1_checkpoint(folder: Path, sd: dict, fmt: str, spelling: str, chat: bool = False) -> Path:
    """Two shards plus index, as Qwen1 releases ship them (.safetensors or .bin)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(qwen1_config(spelling)))
    (folder / "generation_config.json").write_text(json.dumps(
        {"chat_format": "chatml" if chat else "raw", "eos_token_id": 151643, "max_window_size": 6144}))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "QWenTokenizer", "auto_map": {"AutoTokenizer": ["tokenization_qwen.QWenTokenizer", None]}}))
    keys = list(sd)
    shards = [keys[: len(keys) // 2], keys[len(keys) // 2:]]
    weight_map = {}
    for n, shard_keys in enumerate(shards, 1):
        part = {k: sd[k].contiguous() for k in shard_keys}
        if fmt == "safetensors":
            from safetensors.torch import save_file

            name = f"model-{n:05d}-of-{len(shards):05d}.safetensors"
            save_file(part, str(folder / name), metadata={"format": "pt"})
        else:
            name = f"pytorch_model-{n:05d}-of-{len(shards):05d}.bin"
            torch.save(part, folder / name)
        weight_map.update({k: name for k in shard_keys})
    index = "model.safetensors.index.json" if fmt == "safetensors" else "pytorch_model.bin.index.json"
    total = sum(t.numel() * t.element_size() for t in sd.values())
    (folder / index).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    return folder


# ---------------------------------------------------------------------------
# Qwen1's forward pass from its equations (modeling_qwen.py), fp32


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def qwen1_reference_logits(sd: dict, ids: torch.Tensor, eps: float = 1e-6, base: float = 10000.0) -> torch.Tensor:
    head_dim = HIDDEN // HEADS
    batch, length = ids.shape
    inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    freqs = torch.outer(torch.arange(length, dtype=torch.float32), inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos()[None, :, None, :], emb.sin()[None, :, None, :]
    causal = torch.ones(length, length, dtype=torch.bool).tril()

    x = sd["transformer.wte.weight"][ids]
    for i in range(LAYERS):
        p = f"transformer.h.{i}."
        h = rms_norm(x, sd[p + "ln_1.weight"], eps)
        qkv = h @ sd[p + "attn.c_attn.weight"].T + sd[p + "attn.c_attn.bias"]
        q, k, v = (t.reshape(batch, length, HEADS, head_dim) for t in qkv.split(HIDDEN, dim=-1))
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(head_dim)
        probs = scores.masked_fill(~causal, float("-inf")).softmax(-1)
        attn = torch.einsum("bhqk,bkhd->bqhd", probs, v).reshape(batch, length, HIDDEN)
        x = x + attn @ sd[p + "attn.c_proj.weight"].T
        h = rms_norm(x, sd[p + "ln_2.weight"], eps)
        a1, a2 = h @ sd[p + "mlp.w1.weight"].T, h @ sd[p + "mlp.w2.weight"].T
        x = x + (a1 * F.silu(a2)) @ sd[p + "mlp.c_proj.weight"].T
    return rms_norm(x, sd["transformer.ln_f.weight"], eps) @ sd["lm_head.weight"].T
