"""Step 1 of the plan: every module's parameter count, from configs alone (meta-device builds and a built-in table).

No weight is read and the hub is not needed: the reference models' configs are
listed here, the trainable connector is counted from its settings.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

from mmdist.config.run import RunConfig
from mmdist.models import qwen1
from mmdist.models.connectors import build_stage1_module
from mmdist.training.metrics import FlopCount, flop_count

GiB = 1024**3
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}

# ---------------------------------------------------------------------------
# 1. shapes

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
    # stage 2's LLM entry: the FLOPs of the LLM and the vision tower as the progress bar counts them
    # (mmdist.training.metrics.flop_count on the meta-device modules; the connector is added by mmdist.plan.speed)
    flops: Optional[FlopCount] = None


def _hf_config(section: str, name_or_path: str, init_config: Optional[dict], gguf_file: Optional[str] = None,
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


def _meta_model(hf_config: Any, causal_lm: bool) -> Any:
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


def count_parameters(module: Any) -> tuple[int, int]:
    """(unique parameter count, largest single module's own parameters) as DeepSpeed counts them."""
    unique = {id(p): p.numel() for p in module.parameters()}
    largest = max((sum(p.numel() for p in m.parameters(recurse=False)) for m in module.modules()), default=0)
    return sum(unique.values()), largest


def _text_dims(hf_config: Any) -> dict:
    c = getattr(hf_config, "text_config", None) or hf_config
    heads = getattr(c, "num_attention_heads", 1)
    return dict(hidden=c.hidden_size, layers=c.num_hidden_layers, intermediate=getattr(c, "intermediate_size", 4 * c.hidden_size),
                heads=heads, kv_heads=getattr(c, "num_key_value_heads", None) or heads,
                vocab=getattr(c, "vocab_size", 0))


def _lora_params(model: Any, cfg: RunConfig) -> int:
    import torch

    lora = cfg.model.llm.lora
    total = 0
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name.split(".")[-1] in lora.target_modules:
            total += lora.r * (module.in_features + module.out_features)
    return total


def model_shapes(cfg: RunConfig) -> list[ModuleShape]:
    """Every top-level module of the configured stage, with parameter counts, trainability and dtype."""
    out: list[ModuleShape] = []
    vis = cfg.model.vision
    vision_model = None
    if vis.source == "custom":
        if vis.hidden_size is None:
            raise ValueError("model.vision.hidden_size: the planner needs the feature width of a custom encoder")
        vdims = dict(hidden=vis.hidden_size, layers=0, intermediate=0, heads=1, tokens=cfg.model.connector.image_tokens or 256)
        out.append(ModuleShape("vision_encoder", _custom_vision_params(cfg), not vis.freeze, vis.dtype, 0, vdims))
    else:
        vconf = _hf_config("model.vision", vis.name_or_path, vis.init_config)
        vconf = getattr(vconf, "vision_config", None) or vconf
        vision_model = _meta_model(vconf, causal_lm=False)
        params, largest = count_parameters(vision_model)
        grid = (vconf.image_size // vconf.patch_size) ** 2
        has_cls = not vconf.model_type.startswith("siglip")
        tokens = {"patch": grid, "cls": 1, "all": grid + int(has_cls)}[vis.select_tokens]
        vdims = dict(hidden=vconf.hidden_size, layers=vconf.num_hidden_layers, intermediate=vconf.intermediate_size,
                     heads=vconf.num_attention_heads, tokens=tokens, seq=grid + 1)
        out.append(ModuleShape("vision_encoder", params, not vis.freeze, vis.dtype, largest, vdims))

    conn = cfg.model.connector
    vision_dim = vdims["hidden"]
    image_tokens = vdims["tokens"]
    text_dim = 0
    if cfg.stage == "align" or conn.type == "qformer":
        text = cfg.model.text
        tconf = _hf_config("model.text", text.name_or_path, text.init_config)
        if cfg.stage == "align":
            params, largest = count_parameters(_meta_model(tconf, causal_lm=False))
            out.append(ModuleShape("text_encoder", params, not text.freeze, text.dtype, largest, _text_dims(tconf)))
        text_dim = tconf.hidden_size

    stage1_params, stage1_out, image_tokens = _stage1_module(cfg, vision_dim, text_dim, image_tokens)
    if cfg.stage == "align":
        out.append(ModuleShape("stage1", stage1_params, True, "fp32", stage1_params, {"tokens": image_tokens, "width": stage1_out}))
        return out

    llm = cfg.model.llm
    lconf = _hf_config("model.llm", llm.name_or_path, llm.init_config, llm.gguf_file, llm.trust_remote_code)
    lmodel = _meta_model(lconf, causal_lm=True)
    params, largest = count_parameters(lmodel)
    ldims = _text_dims(lconf)
    out.append(ModuleShape("llm", params, not llm.freeze, llm.dtype, largest, ldims,
                           flops=_fused_flops(lmodel, vision_model, not llm.freeze, vision_runs=not cfg.data.feature_cache)))
    if llm.lora.enabled:
        out.append(ModuleShape("lora", _lora_params(lmodel, cfg), True, "fp32"))
    if cfg.model.connector.stage1_weights is not None:
        out.append(ModuleShape("stage1", stage1_params, conn.train_stage1_module, "fp32", stage1_params,
                               {"tokens": image_tokens, "width": stage1_out}))
        proj_in = stage1_out
    else:
        proj_in = vision_dim
        image_tokens = conn.image_tokens or vdims["tokens"]
    proj = _mlp_params(proj_in, ldims["hidden"], ldims["hidden"], conn.projector_layers)
    out.append(ModuleShape("projector", proj, True, "fp32", _mlp_largest(proj_in, ldims["hidden"], conn.projector_layers),
                           {"tokens": image_tokens, "in": proj_in}))
    return out


def _fused_flops(llm: Any, vision: Any, llm_trains: bool, vision_runs: bool) -> FlopCount:
    """The stage-2 FLOP rates of the LLM and the vision tower by the bar's formula (metrics.flop_count): the same
    formula metrics.jsonl, the progress bar's MFU and benchmarks/throughput.py use, applied to meta-device modules."""
    import torch

    holder = torch.nn.Module()
    holder.llm = llm.requires_grad_(llm_trains)
    if vision is not None:
        holder.vision = vision.requires_grad_(False)
    return flop_count(holder, "fuse", vision_runs=vision_runs)


def _custom_vision_params(cfg: RunConfig) -> int:
    import importlib

    import torch

    module_name, cls_name = cfg.model.vision.custom_class.split(":")
    cls = getattr(importlib.import_module(module_name), cls_name)
    with torch.device("meta"):
        return count_parameters(cls(**cfg.model.vision.custom_kwargs))[0]


def _mlp_params(d_in: int, d_hidden: int, d_out: int, layers: int) -> int:
    if layers == 1:
        return d_in * d_out + d_out
    return d_in * d_hidden + d_hidden + (layers - 2) * (d_hidden * d_hidden + d_hidden) + d_hidden * d_out + d_out


def _mlp_largest(d_in: int, d_out: int, layers: int) -> int:
    return max(d_in * d_out + d_out, (d_out * d_out + d_out) if layers > 1 else 0)


def _stage1_module(cfg: RunConfig, vision_dim: int, text_dim: int, image_tokens: int) -> tuple[int, int, int]:
    """(parameters, output width, image tokens) of the stage-1 module (heads or Q-Former), exact: built on
    the meta device from mmdist's own connector code. Stage 2 keeps only the image side of linear/mlp
    heads; stage 1 adds the text head and the temperature.
    """
    import torch

    conn = cfg.model.connector
    text_for_module = text_dim if (cfg.stage == "align" or conn.type == "qformer") else None
    with torch.device("meta"):
        module = build_stage1_module(conn, vision_dim, image_tokens, text_for_module or None)
    params = count_parameters(module)[0] + (1 if cfg.stage == "align" else 0)
    return params, int(module.out_dim), int(module.num_tokens)


