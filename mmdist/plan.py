"""`mmdist plan`: predict per-GPU memory for every ZeRO stage and offload choice, before a job is submitted.

Why a planner of our own: DeepSpeed's estimators
(``estimate_zero2_model_states_mem_needs_all_cold``,
``estimate_zero3_model_states_mem_needs_all_cold``) count every parameter as
trainable: 16-18 bytes per parameter for a model of which, in stage 2, 99.8%
is frozen and needs 2 bytes and no gradient or optimizer state at all. They
also ignore activations, which for a frozen LLM that still passes gradients to
its inputs are the larger part. This module counts frozen parameters as frozen.

How it works, without loading a single weight:

1. Shapes. Each backbone's parameters are counted by building the model on
   ``torch.device("meta")`` from its config (exact, whatever the architecture).
   The config comes from ``init_config``, a local folder or GGUF file
   (``AutoConfig``), or a small built-in table for the reference models (the
   hub is not reachable everywhere the planner must run). The trainable
   connector is counted from its settings.
2. Model states per rank, following what DeepSpeed 0.19 actually allocates
   (checked against measured engines in benchmarks/memory_per_rank.py and
   tests/test_plan.py): module weights in the compute dtype (ZeRO-3: one
   1/N partition), gradients, fp32 master copy plus Adam m and v for trainable
   parameters only (ZeRO >= 1: 1/N each).
3. Activations for the configured micro-batch and ``data.max_len``, with and
   without gradient checkpointing of the LLM, including the fp32 logits the
   loss reads; communication buffers from the ZeRO bucket sizes.
4. What fits in ``--gpu-memory``, the largest micro-batch that fits per
   setting, and one recommended setting.

The activation figures are estimates from layer shapes (per token and layer:
what autograd keeps for an input-gradient backward through frozen weights);
the model-state figures are exact up to DeepSpeed's padding.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import re
import sys
from collections.abc import Sequence
from typing import Any, Optional

from mmdist.config.run import RunConfig, load_config
from mmdist.models import qwen1
from mmdist.models.quantize import plan_lines
from mmdist.settings import ConfigError

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
    if vis.source == "custom":
        if vis.hidden_size is None:
            raise ValueError("model.vision.hidden_size: the planner needs the feature width of a custom encoder")
        vdims = dict(hidden=vis.hidden_size, layers=0, intermediate=0, heads=1, tokens=cfg.model.connector.image_tokens or 256)
        out.append(ModuleShape("vision_encoder", _custom_vision_params(cfg), not vis.freeze, vis.dtype, 0, vdims))
    else:
        vconf = _hf_config("model.vision", vis.name_or_path, vis.init_config)
        vconf = getattr(vconf, "vision_config", None) or vconf
        params, largest = count_parameters(_meta_model(vconf, causal_lm=False))
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
    out.append(ModuleShape("llm", params, not llm.freeze, llm.dtype, largest, ldims))
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

    from mmdist.models.connectors import build_stage1_module

    conn = cfg.model.connector
    text_for_module = text_dim if (cfg.stage == "align" or conn.type == "qformer") else None
    with torch.device("meta"):
        module = build_stage1_module(conn, vision_dim, image_tokens, text_for_module or None)
    params = count_parameters(module)[0] + (1 if cfg.stage == "align" else 0)
    return params, int(module.out_dim), int(module.num_tokens)


# ---------------------------------------------------------------------------
# 2-3. memory per rank


@dataclasses.dataclass
class Setting:
    """One ZeRO stage and offload choice."""

    zero_stage: int
    offload_optimizer: bool = False
    offload_params: bool = False

    @property
    def label(self) -> str:
        off = "+".join(n for n, on in (("opt", self.offload_optimizer), ("param", self.offload_params)) if on) or "none"
        return f"ZeRO-{self.zero_stage} offload={off}"


ALL_SETTINGS = [Setting(0), Setting(1), Setting(1, True), Setting(2), Setting(2, True), Setting(3), Setting(3, True),
                Setting(3, True, True)]


@dataclasses.dataclass
class Estimate:
    """Per-rank bytes of one setting (GPU side unless named cpu_)."""

    setting: Setting
    frozen: dict  # dtype -> bytes
    trainable: int
    gradients: int
    optimizer: int
    activations: int
    activations_ckpt: int
    comm: int
    cpu: int
    per_sample: int
    per_sample_ckpt: int
    fixed_reserve: int

    @property
    def model_states(self) -> int:
        return sum(self.frozen.values()) + self.trainable + self.gradients + self.optimizer

    def total(self, checkpointing: bool) -> int:
        act = self.activations_ckpt if checkpointing else self.activations
        return self.model_states + act + self.comm + self.fixed_reserve

    def max_micro_batch(self, budget: int, checkpointing: bool) -> int:
        per = self.per_sample_ckpt if checkpointing else self.per_sample
        room = budget - (self.model_states + self.comm + self.fixed_reserve)
        return max(0, room // per) if per else 0


def held_dtype(module_dtype: str, precision: str) -> str:
    """The dtype a module's weights are held in inside a DeepSpeed engine.

    With bf16/fp16 enabled DeepSpeed casts every parameter (frozen ones too) to
    that dtype (engine._cast_module_mixed_precision, or zero.Init's dtype); with
    fp32 it leaves the loaded dtypes alone.
    """
    return precision if precision in ("bf16", "fp16") else module_dtype


def model_state_bytes(shapes: list[ModuleShape], setting: Setting, world: int, precision: str,
                      bucket: Optional[dict] = None) -> dict:
    """Per-rank bytes of frozen weights (by dtype), trainable weights, gradients, optimizer state, comm buffers, CPU.

    Trainable parameters: weights in the compute dtype (ZeRO-3: 1/N), gradients
    as held between the last backward and the step (ZeRO-0: full, compute dtype;
    ZeRO-1: full plus an fp32 partition; ZeRO-2/3: the rank's 1/N partition in the
    compute dtype, made fp32 only inside the step), Adam m and v in fp32 plus an
    fp32 master copy (ZeRO >= 1 always keeps one, flat and partitioned; ZeRO-0
    only when the compute dtype is not fp32). Frozen parameters: weights only.
    Measured against DeepSpeed 0.19.8 engines for fp32 and bf16 at ZeRO 0, 2, 3
    (benchmarks/memory_per_rank.py); ZeRO-1 follows the same code but is not measured.
    """
    z, n = setting.zero_stage, max(1, world)
    bucket = bucket or {}
    e = DTYPE_BYTES[precision]
    frozen: dict[str, int] = {}
    p_train = 0
    largest = 0
    for s in shapes:
        largest = max(largest, s.largest_layer)
        if s.trainable:
            p_train += s.params
            continue
        dt = held_dtype(s.dtype, precision)
        b = s.params * DTYPE_BYTES[dt]
        frozen[dt] = frozen.get(dt, 0) + (b // n if z == 3 else b)
    cpu = 0
    trainable = p_train * e // (n if z == 3 else 1)
    if z == 0:
        grads = p_train * e
        optim = p_train * (8 + (4 if e != 4 else 0))
    elif z == 1:
        grads = p_train * e + p_train * 4 // n
        optim = p_train * 12 // n
    else:
        grads = p_train * e // n
        optim = p_train * 12 // n
    if setting.offload_optimizer:
        cpu += optim + (p_train * 4 // n)
        optim = 0
        grads = p_train * e // (n if z >= 2 else 1)
    if setting.offload_params:
        cpu += sum(frozen.values()) + trainable
        frozen = {k: 0 for k in frozen}
        trainable = 0
    reduce_bucket = int(bucket.get("reduce_bucket_size", 5e8))
    allgather_bucket = int(bucket.get("allgather_bucket_size", 5e8))
    if z == 0:
        comm = min(reduce_bucket, p_train) * e if n > 1 else 0
    elif z in (1, 2):
        comm = reduce_bucket * (4 if z == 1 else e) + (min(allgather_bucket, p_train) * e if n > 1 else 0)
    else:
        prefetch = int(bucket.get("stage3_prefetch_bucket_size", 5e7))
        # gathered weights of the module running now and the prefetched next ones, plus the reduce bucket
        comm = (largest + prefetch) * e + min(reduce_bucket, p_train) * e
    return dict(frozen=frozen, trainable=trainable, gradients=grads, optimizer=optim, comm=comm, cpu=cpu, p_train=p_train)


def llm_activation_bytes(dims: dict, seq: int, e: int, trains: bool = False, eager: bool = False,
                         checkpointing: bool = False) -> int:
    """Bytes the LLM's decoder layers keep for backward for one row of ``seq`` tokens (``e`` bytes per element).

    Per layer and token: the two norm inputs upcast to fp32 (2 x h x 4 bytes), q, k
    and v repeated to every head and the attention output (4h), the MLP's gate, up
    and activation outputs (3i); eager attention adds its probabilities (heads x T,
    twice); a training LLM adds the inputs of its Linear layers (3h + i). With
    checkpointing: each layer's input (h), plus one layer recomputed in backward.
    """
    h, i, layers = dims["hidden"], dims["intermediate"], dims["layers"]
    per_token_layer = 2 * h * 4 + (4 * h + 3 * i) * e
    if eager:
        per_token_layer += 2 * dims["heads"] * seq * e
    if trains:
        per_token_layer += (3 * h + i) * e
    if checkpointing:
        return seq * (layers * h * e + per_token_layer)
    return seq * layers * per_token_layer


def activation_bytes_per_sample(shapes: list[ModuleShape], cfg: RunConfig, checkpointing: bool) -> int:
    """Activation bytes of one sample, counted as a full row of ``data.max_len`` tokens (an upper bound:
    padded rows are at most that long, packed rows hold several samples in that length).

    The LLM part is :func:`llm_activation_bytes`; the loss adds the logits, their
    fp32 copy and log-softmax (e + 8 bytes per vocabulary entry per token); the
    connector keeps its inputs and outputs in fp32; the frozen vision encoder runs
    without grad (one layer's working set); a text encoder (stage 1) keeps its own.
    """
    by_name = {s.name: s for s in shapes}
    e = DTYPE_BYTES[cfg.engine.precision]
    seq = cfg.data.max_len
    total = 0
    llm = by_name.get("llm")
    if llm is not None:
        d = llm.dims
        kept = llm_activation_bytes(d, seq, e, trains=llm.trainable or cfg.model.llm.lora.enabled,
                                    eager=cfg.model.llm.attn_implementation == "eager", checkpointing=checkpointing)
        h = d["hidden"]
        total += kept + seq * d["vocab"] * (e + 8) + seq * h * e * 2  # + inputs_embeds and its grad
    proj = by_name.get("projector") or by_name.get("stage1")
    vision = by_name["vision_encoder"]
    v = vision.dims
    if proj is not None:
        tokens = proj.dims.get("tokens", v["tokens"])
        total += tokens * (proj.dims.get("in", v["hidden"]) + 2 * (llm.dims["hidden"] if llm else 256)) * 4
    stage1 = by_name.get("stage1")
    if stage1 is not None and stage1.trainable and cfg.model.connector.type == "qformer":
        # a training Q-Former keeps, per layer, its queries' attention/FFN tensors and (in cross-attention
        # layers) the keys and values of every vision token, in fp32
        q = cfg.model.connector.qformer
        h = stage1.dims.get("width", q.hidden_size)
        cross = math.ceil(q.num_layers / max(1, q.cross_attention_every))
        total += (q.num_layers * q.num_queries * 16 * h + cross * v["tokens"] * (v["hidden"] + 2 * h)) * 4
    # frozen vision forward runs without grad: one layer's transient working set per image
    vseq = v.get("seq", v["tokens"])
    total += vseq * (4 * v["hidden"] + v["intermediate"]) * e
    text = by_name.get("text_encoder")
    if text is not None:
        td = text.dims
        tokens = cfg.model.text.max_length
        per = (2 * td["hidden"] + 2 * td["hidden"] + 2 * td["hidden"] + 3 * td["intermediate"])
        if text.trainable:
            per += 3 * td["hidden"] + td["intermediate"] + td["heads"] * tokens
        total += tokens * td["layers"] * per * e
    return int(total)


def parse_bytes(text: str) -> int:
    """'80GB', '80GiB', '80G', '24000MB' or a plain number of bytes -> bytes (GB means GiB, as GPU specs do)."""
    m = re.fullmatch(r"\s*([0-9.]+)\s*([KMGT]?)(i?B?)\s*", text, flags=re.IGNORECASE)
    if not m:
        raise ValueError(f"--gpu-memory {text!r}: expected a size such as 80GB, 141GiB or 24000MB")
    scale = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}[m.group(2).upper()]
    return int(float(m.group(1)) * scale)


def deepspeed_bucket_settings(cfg: RunConfig) -> dict:
    """Bucket sizes from the raw DeepSpeed keys of the config (defaults otherwise)."""
    zero = dict(cfg.engine.deepspeed.get("zero_optimization", {}))
    return {k: zero[k] for k in ("reduce_bucket_size", "allgather_bucket_size", "stage3_prefetch_bucket_size") if k in zero}


def estimate(cfg: RunConfig, shapes: list[ModuleShape], world: int, settings: Sequence[Setting] = ALL_SETTINGS,
             reserve_bytes: int = int(1.5 * GiB)) -> list[Estimate]:
    """One :class:`Estimate` per setting for ``world`` ranks (micro-batch and max_len from the config)."""
    b = cfg.train.micro_batch_size
    per = activation_bytes_per_sample(shapes, cfg, checkpointing=False)
    per_ckpt = activation_bytes_per_sample(shapes, cfg, checkpointing=True)
    out = []
    for s in settings:
        ms = model_state_bytes(shapes, s, world, cfg.engine.precision, deepspeed_bucket_settings(cfg))
        out.append(Estimate(s, ms["frozen"], ms["trainable"], ms["gradients"], ms["optimizer"], b * per, b * per_ckpt,
                            ms["comm"], ms["cpu"], per, per_ckpt, reserve_bytes))
    return out


def deepspeed_estimates(shapes: list[ModuleShape], world: int) -> dict[str, dict]:
    """DeepSpeed's own model-state estimators (all parameters counted as trainable), GPU bytes per rank."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    total = sum(s.params for s in shapes)
    largest = max(s.largest_layer for s in shapes)
    out = {}
    for label, off in (("ZeRO-2 offload=none", False), ("ZeRO-2 offload=opt", True)):
        cpu, gpu = estimate_zero2_model_states_mem_needs(total, world, 1, cpu_offload=off)
        out[label] = dict(gpu=gpu, cpu=cpu)
    for label, off, offp in (("ZeRO-3 offload=none", False, False), ("ZeRO-3 offload=opt", True, False),
                             ("ZeRO-3 offload=opt+param", True, True)):
        cpu, gpu, _ = estimate_zero3_model_states_mem_needs(total, largest, world, 1, cpu_offload=off,
                                                             cpu_offload_params=offp)
        out[label] = dict(gpu=gpu, cpu=cpu)
    return out


# ---------------------------------------------------------------------------
# 4. report


def _g(b: int) -> str:
    return f"{b / GiB:.2f}"


def recommend(estimates: list[Estimate], budget: int, configured_ckpt: bool) -> tuple[Estimate, bool]:
    """The setting to use: fits the configured micro-batch, least communication, largest micro-batch headroom.

    Lower ZeRO stages move less data per step (ZeRO-3 gathers every frozen weight
    twice per micro-step, as gradients flow back through the frozen LLM), and
    offloading costs PCIe time, so the first setting in this order that fits wins:
    no checkpointing before checkpointing, then ZeRO 0, 1, 2, 3, no offload first.
    """
    for ckpt in ([False, True] if not configured_ckpt else [True, False]):
        for est in estimates:
            if est.total(ckpt) <= budget:
                return est, ckpt
    return min(estimates, key=lambda e: e.total(True)), True


def format_plan(cfg: RunConfig, shapes: list[ModuleShape], estimates: list[Estimate], world: int, budget: int,
                ds: Optional[dict] = None) -> str:
    lines = []
    p_train = sum(s.params for s in shapes if s.trainable)
    p_frozen = sum(s.params for s in shapes if not s.trainable)
    lines.append(f"mmdist plan: stage {cfg.stage}, {world} GPU(s) of {_g(budget)} GiB, precision {cfg.engine.precision}, "
                 f"micro-batch {cfg.train.micro_batch_size} x {cfg.data.max_len} tokens")
    lines.append("")
    lines.append(f"{'module':<16}{'params':>16}{'trainable':>11}{'dtype':>7}")
    for s in shapes:
        lines.append(f"{s.name:<16}{s.params:>16,}{'yes' if s.trainable else 'no':>11}{s.dtype:>7}")
    lines.append(f"{'total':<16}{p_train + p_frozen:>16,}   trainable {p_train:,} ({100 * p_train / max(1, p_train + p_frozen):.3f}%)")
    lines.append("")
    lines.append("per-GPU GiB (activations for the configured micro-batch; total includes a "
                 f"{_g(estimates[0].fixed_reserve)} GiB CUDA context/allocator reserve)")
    head = (f"{'setting':<26}{'frozen':>16}{'train':>7}{'grads':>7}{'optim':>7}{'act':>8}{'act+ckpt':>9}{'comm':>7}"
            f"{'total':>8}{'tot+ckpt':>9}{'fits':>6}{'max mb':>7}{'mb+ckpt':>8}{'cpu':>7}")
    lines.append(head)
    for est in estimates:
        frozen = " ".join(f"{k}:{_g(v)}" for k, v in est.frozen.items()) or "-"
        fits = ("yes" if est.total(False) <= budget else "ckpt" if est.total(True) <= budget else "no")
        lines.append(f"{est.setting.label:<26}{frozen:>16}{_g(est.trainable):>7}{_g(est.gradients):>7}{_g(est.optimizer):>7}"
                     f"{_g(est.activations):>8}{_g(est.activations_ckpt):>9}{_g(est.comm):>7}{_g(est.total(False)):>8}"
                     f"{_g(est.total(True)):>9}{fits:>6}{est.max_micro_batch(budget, False):>7}"
                     f"{est.max_micro_batch(budget, True):>8}{_g(est.cpu):>7}")
    best, ckpt = recommend(estimates, budget, cfg.model.llm.gradient_checkpointing)
    lines.append("")
    if best.total(ckpt) <= budget:
        lines.append(f"recommended: {best.setting.label}, gradient_checkpointing={'true' if ckpt else 'false'}; "
                     f"largest micro-batch that fits: {best.max_micro_batch(budget, ckpt)} "
                     f"(configured {cfg.train.micro_batch_size}; {_g(best.total(ckpt))} GiB of {_g(budget)} GiB)")
        ckpt_override = f" model.llm.gradient_checkpointing={str(ckpt).lower()}" if cfg.stage == "fuse" else ""
        lines.append(f"  overrides: engine.zero_stage={best.setting.zero_stage} engine.offload_optimizer="
                     f"{str(best.setting.offload_optimizer).lower()} engine.offload_params={str(best.setting.offload_params).lower()}"
                     + ckpt_override)
    else:
        lines.append(f"nothing fits micro-batch {cfg.train.micro_batch_size}: closest is {best.setting.label} with "
                     f"checkpointing at {_g(best.total(True))} GiB; lower train.micro_batch_size or data.max_len, or add GPUs")
    if ds:
        lines.append("")
        lines.append("DeepSpeed's estimators (every parameter counted as trainable) vs this plan, model states per GPU, GiB:")
        lines.append(f"{'setting':<26}{'deepspeed gpu':>14}{'mmdist gpu':>12}{'deepspeed cpu':>15}{'mmdist cpu':>12}")
        for est in estimates:
            if est.setting.label in ds:
                d = ds[est.setting.label]
                lines.append(f"{est.setting.label:<26}{_g(d['gpu']):>14}{_g(est.model_states):>12}{_g(d['cpu']):>15}{_g(est.cpu):>12}")
        lines.append("  (deepspeed: estimate_zero2_model_states_mem_needs / estimate_zero3_model_states_mem_needs, the "
                     "functions behind *_all_cold; its cpu figure is per node and includes a 1.5x buffer factor)")
    return "\n".join(lines)


# Images/s one CPU core turns from photo-like JPEGs in tar shards into the tower's 336 px input with
# mmdist's loader (benchmarks/bench_images.py, 1 worker; docs/benchmarks.md records the run and the machine).
IMAGES_PER_CORE = 200.0  # measured 218 with 1 worker on a 2-core AMD EPYC (avx512), 2026-12-02
TOWER_MFU = 0.4  # the fraction of a GPU's dense peak a frozen ViT forward reaches in practice


def input_line(shapes: list[ModuleShape], gpu: str, gpus_per_node: int, cpus_per_node: int,
               images_per_core: float = IMAGES_PER_CORE) -> list[str]:
    """The images/s the frozen vision tower eats per GPU and the CPU cores per GPU that decoding them needs."""
    from mmdist.hardware import datasheet_peak

    vision = next((s for s in shapes if s.name == "vision_encoder"), None)
    row = datasheet_peak(gpu)
    if vision is None or not vision.dims.get("seq") or row is None or not (row.bf16 or row.fp16):
        why = "unknown GPU " + repr(gpu) if row is None else "custom vision encoder (no token count)"
        return [f"input: not estimated ({why})"]
    flops = 2 * vision.params * vision.dims["seq"]  # frozen forward over every token of the tower
    need = TOWER_MFU * (row.bf16 or row.fp16) / flops
    cores = need / images_per_core
    lines = [f"input: the vision tower ({vision.params / 1e6:.0f}M params x {vision.dims['seq']} tokens = "
             f"{flops / 1e12:.2f} TFLOP/image) at {TOWER_MFU:.0%} of a {row.label}'s peak eats {need:,.0f} images/s per GPU; "
             f"at {images_per_core:.0f} images/s per core (mmdist's loader) that is {cores:.1f} CPU cores per GPU"]
    if cpus_per_node and gpus_per_node and cpus_per_node / gpus_per_node < cores:
        lines.append(f"  warning: {cpus_per_node} cores for {gpus_per_node} GPUs is {cpus_per_node / gpus_per_node:.1f} per GPU: "
                     "the loader cannot keep the tower busy when it decodes pixels; cache the image features "
                     "(mmdist cache) or move decoding to more nodes")
    return lines


def resolve_auto_for_gpu(cfg: RunConfig, gpu: str, path: str, overrides: Sequence[str]) -> tuple[RunConfig, str]:
    """The config with every ``auto`` dtype as the target GPU would resolve it (bf16 where it has bf16, else fp16).

    The plan is for the cluster's GPUs, not for the machine it runs on, so this
    machine's hardware is not consulted (mmdist.precision does that at start-up).
    """
    from mmdist.hardware import datasheet_peak
    from mmdist.precision import ENGINE_KEY, PART_KEYS

    keys = [key for key in (ENGINE_KEY, *PART_KEYS.values()) if _setting(cfg, key) == "auto"]
    if not keys:
        return cfg, ""
    row = datasheet_peak(gpu)
    dtype = "fp16" if row is not None and row.bf16 is None else "bf16"
    resolved = load_config(path, [*overrides, *(f"{key}={dtype}" for key in keys)])
    return resolved, f"auto -> {dtype} for {row.label if row else gpu} ({', '.join(keys)})"


def _setting(cfg: Any, key: str) -> Any:
    node = cfg
    for part in key.split("."):
        node = getattr(node, part)
    return node


def cli_main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="mmdist plan", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="YAML run config (nothing is loaded but the model configs)")
    parser.add_argument("--gpus", type=int, default=None, help="data-parallel ranks (default: 8)")
    parser.add_argument("--gpu-memory", default="80GB", help="memory per GPU, e.g. 80GB, 141GB (GB = GiB)")
    parser.add_argument("--reserve", default="1.5GB", help="per-GPU memory kept back for the CUDA context and allocator")
    parser.add_argument("--no-deepspeed", action="store_true", help="skip DeepSpeed's own estimators (avoids importing it)")
    parser.add_argument("--gpu", default="H100 SXM", help="GPU model for the input estimate (a datasheet name, e.g. H100, A100, L40S)")
    parser.add_argument("--gpus-per-node", type=int, default=8, help="GPUs per node (input estimate)")
    parser.add_argument("--cpus-per-node", type=int, default=0, help="CPU cores per node; warns when they cannot feed the GPUs")
    parser.add_argument("--images-per-core", type=float, default=IMAGES_PER_CORE, help="measured loader images/s per core")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.micro_batch_size=4")
    args = parser.parse_args(list(argv))
    try:
        cfg = load_config(args.config, args.overrides)
        cfg, auto_note = resolve_auto_for_gpu(cfg, args.gpu, args.config, args.overrides)
        budget = parse_bytes(args.gpu_memory)
        reserve = parse_bytes(args.reserve)
        shapes = model_shapes(cfg)
    except (ConfigError, ValueError) as exc:
        print(exc, file=sys.stderr)
        return 2
    world = args.gpus or 8
    estimates = estimate(cfg, shapes, world, reserve_bytes=reserve)
    ds = None if args.no_deepspeed else deepspeed_estimates(shapes, world)
    if auto_note:
        print(auto_note)
    print(format_plan(cfg, shapes, estimates, world, budget, ds))
    for line in plan_lines(cfg, shapes, estimates, budget):  # quantized frozen bytes, or the quantization that fits
        print(line)
    if not cfg.data.feature_cache:
        print("\n".join(input_line(shapes, args.gpu, args.gpus_per_node, args.cpus_per_node, args.images_per_core)))
    return 0
