"""The planner's view of a backbone: its config without the hub, built on the meta device, its parameters counted.

The configs of the reference models are listed here (``BUILTIN_CONFIGS``) so the
planner runs where the hub cannot be reached; anything else comes from
``init_config``, a local folder or GGUF file (``AutoConfig``). Building on
``torch.device("meta")`` gives exact parameter counts without memory or weights.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

from mmdist.models import qwen1
from mmdist.models.flops import FlopCount

GiB = 1024**3
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}

# Config dicts of the reference models, so the planner runs without the hub.
# Qwen/Qwen-14B (Qwen1, model_type "qwen") is counted as mmdist loads it: its published config.json mapped onto
# Qwen2 by mmdist.models.qwen1 (fused c_attn with bias = q/k/v with bias, 40 key/value heads, w1/w2/c_proj =
# up/gate/down with 13696 = 27392 / 2; 14.17B parameters).
BUILTIN_CONFIGS: dict[str, dict] = {
    **{name: {"model_type": "qwen2", **qwen1.qwen2_config_fields(raw, where=name)}
       for name, raw in qwen1.QWEN1_KNOWN_CONFIGS.items()},
    "qwen/qwen2.5-14b": dict(model_type="qwen2", vocab_size=152064, hidden_size=5120, intermediate_size=13824,
                             num_hidden_layers=48, num_attention_heads=40, num_key_value_heads=8,
                             max_position_embeddings=32768, tie_word_embeddings=False),
    "openai/clip-vit-large-patch14-336": dict(model_type="clip_vision_model", hidden_size=1024, intermediate_size=4096,
                                              num_hidden_layers=24, num_attention_heads=16, image_size=336,
                                              patch_size=14, projection_dim=768),
    "bert-base-uncased": dict(model_type="bert", vocab_size=30522, hidden_size=768, intermediate_size=3072,
                              num_hidden_layers=12, num_attention_heads=12, max_position_embeddings=512),
    "huggingfacetb/smollm2-135m": dict(model_type="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536,
                                       num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                                       max_position_embeddings=8192, tie_word_embeddings=True),
    "minilm": dict(model_type="bert", vocab_size=30522, hidden_size=384, intermediate_size=1536,
                   num_hidden_layers=6, num_attention_heads=12, max_position_embeddings=512),
}
_ALIASES = {
    "qwen/qwen2.5-14b-instruct": "qwen/qwen2.5-14b",
    "google-bert/bert-base-uncased": "bert-base-uncased",
    "huggingfacetb/smollm2-135m-instruct": "huggingfacetb/smollm2-135m",
    "sentence-transformers/all-minilm-l6-v2": "minilm",
}


def builtin_config(name: str, gguf_file: Optional[str] = None) -> Optional[dict]:
    """The built-in shape dict for a reference model name (hub id, or a path/GGUF file naming it), or None."""
    key = name.lower().rstrip("/")
    key = _ALIASES.get(key, key)
    if key in BUILTIN_CONFIGS:
        return dict(BUILTIN_CONFIGS[key])
    hay = f"{name} {gguf_file or ''}".lower()
    if "smollm2-135m" in hay or "smollm2" in hay and "135m" in hay or key == "smollm2":  # 'smollm2': the packaged GGUF
        return dict(BUILTIN_CONFIGS["huggingfacetb/smollm2-135m"])
    if "minilm" in hay:
        return dict(BUILTIN_CONFIGS["minilm"])
    return None


@dataclasses.dataclass
class ModuleShape:
    """One top-level module of the model as the planner sees it."""

    name: str
    params: int
    trainable: bool
    dtype: str
    largest_layer: int = 0
    dims: dict = dataclasses.field(default_factory=dict)
    # the last entry of mmdist.plan.shapes.model_shapes: the whole model's training FLOP rates as the progress bar
    # counts them (the model code's own count on the meta-device modules)
    flops: Optional[FlopCount] = None
    modules: int = 0  # submodules holding parameters of their own: what ZeRO-3 fetches one by one


def hf_config(section: str, name_or_path: str, init_config: Optional[dict], gguf_file: Optional[str] = None,
               trust_remote_code: bool = False) -> Any:
    """A transformers config object for a backbone, from init_config, the built-in table, or AutoConfig."""
    from transformers import AutoConfig

    if init_config:
        data = dict(init_config)
        return AutoConfig.for_model(data.pop("model_type"), **data)
    raw = None if gguf_file else qwen1.read_qwen1_config(name_or_path, local_only=True)
    if raw is not None:  # a Qwen1 folder (or cached hub config): the Qwen2 shape mmdist loads it as
        return AutoConfig.for_model("qwen2", **qwen1.qwen2_config_fields(raw, where=f"{name_or_path}/config.json"))
    table = builtin_config(name_or_path, gguf_file)
    if table is not None:
        return AutoConfig.for_model(table.pop("model_type"), **table)
    try:
        kwargs = {"gguf_file": gguf_file} if gguf_file else {}
        return AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code, **kwargs)
    except Exception as exc:  # offline hub, missing folder, remote code refused
        raise ValueError(
            f"{section}: cannot read the model config of {name_or_path!r} ({type(exc).__name__}: {exc}). "
            f"Point {section}.name_or_path at a local folder, give {section}.init_config, or use one of the "
            f"built-in shapes: {', '.join(sorted(BUILTIN_CONFIGS))}"
        ) from None


def meta_model(hf_config: Any, causal_lm: bool) -> Any:
    """Build the model on the meta device: exact parameter counts, no memory, no weights.

    BERT-style text encoders are built without their pooler, as mmdist/models/text.py does.
    """
    import torch
    from transformers import AutoModel, AutoModelForCausalLM

    with torch.device("meta"):
        if causal_lm:
            return AutoModelForCausalLM.from_config(hf_config)
        if hf_config.model_type == "bert":
            return AutoModel.from_config(hf_config, add_pooling_layer=False)
        return AutoModel.from_config(hf_config)


def param_modules(module: Any) -> int:
    """Submodules holding parameters of their own: ZeRO-3 gathers each one's weights, in one call, per pass."""
    return sum(1 for m in module.modules() if next(m.parameters(recurse=False), None) is not None)


def count_parameters(module: Any) -> tuple[int, int]:
    """(unique parameter count, largest single module's own parameters) as DeepSpeed counts them."""
    unique = {id(p): p.numel() for p in module.parameters()}
    largest = max((sum(p.numel() for p in m.parameters(recurse=False)) for m in module.modules()), default=0)
    return sum(unique.values()), largest
