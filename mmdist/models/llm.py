"""The frozen language model: loading (hub id, local path, GGUF file, or a config dict), dtype, freezing.

Settings live here (`LLMConfig`, `LoRAConfig`); the loader is filled in by the
model-core work. Model code never imports DeepSpeed: ZeRO-3 partition-on-load is
arranged by the engine before this loader runs (see mmdist/training/engine.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

from mmdist.config.schema import SettingsBase, setting

Dtype = Literal["fp32", "bf16", "fp16"]


@dataclass
class LoRAConfig(SettingsBase):
    """Optional LoRA adapters on the LLM in stage 2 (through peft)."""

    enabled: bool = setting(False, "add LoRA adapters to the LLM (stage 2 only); the base weights stay frozen")
    r: int = setting(16, "LoRA rank")
    alpha: int = setting(32, "LoRA alpha (scaling = alpha / r)")
    dropout: float = setting(0.05, "dropout on the LoRA path")
    target_modules: list[str] = setting(doc="module names that get adapters", factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])

    def check(self) -> list[tuple[str, str]]:
        out = []
        if self.enabled and self.r <= 0:
            out.append(("r", "must be positive when LoRA is enabled"))
        if not 0.0 <= self.dropout < 1.0:
            out.append(("dropout", "must be in [0, 1)"))
        return out


@dataclass
class LLMConfig(SettingsBase):
    """Which causal LM to load and how."""

    name_or_path: str = setting("", "hub id or local folder of a Hugging Face causal LM (e.g. Qwen/Qwen2.5-14B); empty with init_config builds one from scratch")
    gguf_file: Optional[str] = setting(None, "GGUF file name inside name_or_path (or an absolute path); transformers dequantises it on load")
    init_config: Optional[dict] = setting(None, "build a randomly initialised model from this config dict (needs 'model_type'); used by tests and benchmarks")
    tokenizer: Optional[str] = setting(None, "tokenizer hub id or folder; default: same as name_or_path (or the GGUF file)")
    trust_remote_code: bool = setting(False, "allow the model repository's own Python code (needed by the original Qwen/Qwen-14B); off unless you trust it")
    dtype: Dtype = setting("bf16", "dtype of the frozen weights")
    freeze: bool = setting(True, "freeze the LLM: requires_grad=False, eval(), no optimizer state")
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = setting("sdpa", "attention kernel passed to from_pretrained")
    gradient_checkpointing: bool = setting(False, "recompute the LLM's activations in backward (inputs_embeds carry the grad)")
    image_token: str = setting("<image>", "placeholder token added to the tokenizer; each one expands to the image's tokens")
    lora: LoRAConfig = setting(doc="LoRA adapters (stage 2)", factory=LoRAConfig)

    def check(self) -> list[tuple[str, str]]:
        out = []
        if self.name_or_path and self.init_config:
            out.append(("init_config", "give either name_or_path or init_config, not both"))
        if self.init_config is not None and "model_type" not in self.init_config:
            out.append(("init_config", "needs a 'model_type' key (e.g. 'llama', 'qwen2')"))
        if self.gguf_file and not self.gguf_file.endswith(".gguf"):
            out.append(("gguf_file", f"{self.gguf_file!r} does not end in .gguf"))
        if self.lora.enabled and not self.freeze:
            out.append(("lora.enabled", "LoRA needs a frozen base LLM (set model.llm.freeze=true)"))
        return out
