"""Steps 2-3 of the plan: bytes per rank for each ZeRO stage and offload choice, model states and activations.

The figures follow what DeepSpeed 0.19 allocates (checked against measured
engines in benchmarks/memory_per_rank.py and tests/test_plan.py); frozen
parameters hold no gradient or optimizer state.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Optional

from mmdist.config.run import RunConfig
from mmdist.plan.shapes import DTYPE_BYTES, GiB, ModuleShape, model_flops

if TYPE_CHECKING:
    from mmdist.plan.lengths import BatchTokens


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
    return dict(
        frozen=frozen, trainable=trainable, gradients=grads, optimizer=optim, comm=comm, cpu=cpu, p_train=p_train
    )


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


def resampler_activation_bytes(r: dict) -> int:
    """Bytes a training resampler (mmdist/models/resampler.py, fp32) keeps for backward per image, from the
    ``resampler`` dims of mmdist.plan.shapes: its input and projected input tokens, then per layer the keys and
    values of every input token (4 x n x d) and the queries' attention and feed-forward tensors (16 x q x d)."""
    n, d = r["in_tokens"], r["hidden"]
    return 4 * (n * (r["in_width"] + d) + r["layers"] * (4 * n * d + 16 * r["queries"] * d))


def activation_bytes_per_sample(shapes: list[ModuleShape], cfg: RunConfig, checkpointing: bool) -> int:
    """Activation bytes of one sample, counted as a full row of ``data.max_len`` tokens holding the costliest image
    (an upper bound: padded rows are at most that long, packed rows hold several samples in that length)."""
    images = {s.name: s for s in shapes}["vision_encoder"].dims.get("images", 1)
    return activation_bytes(shapes, cfg, checkpointing, cfg.data.max_len, images, cfg.data.max_len)


def activation_bytes(shapes: list[ModuleShape], cfg: RunConfig, checkpointing: bool, positions: float,
                     tower_images: float, row_len: int, supervised: Optional[float] = None) -> int:
    """Activation bytes of a micro-batch whose LLM runs on ``positions`` positions (rows x width, in rows of at most
    ``row_len``) and whose vision tower reads ``tower_images`` images (base images and tiles); ``supervised``: the
    tokens the loss is taken on (None: every position).

    The LLM part is :func:`llm_activation_bytes`; the loss adds the logits, their
    fp32 copy and log-softmax (e + 8 bytes per vocabulary entry per token), at the
    supervised tokens only where the model runs its LM head there alone (the FLOP
    count says so: ``per_supervised_token``, mmdist.models.fused), else at every position; the
    connector keeps its inputs and outputs in fp32 (a training Q-Former or resampler
    its layers' tensors too); the frozen vision encoder runs without grad (one layer's
    working set per image); a text encoder (stage 1) keeps its own, per sample.
    """
    by_name = {s.name: s for s in shapes}
    e = DTYPE_BYTES[cfg.engine.precision]
    seq = positions
    total = 0.0
    llm = by_name.get("llm")
    if llm is not None:
        d = llm.dims
        eager = cfg.model.llm.attn_implementation == "eager"
        kept = llm_activation_bytes(d, row_len, e, trains=llm.trainable or cfg.model.llm.lora.enabled, eager=eager,
                                    checkpointing=checkpointing) * seq / row_len
        h = d["hidden"]
        head = seq if supervised is None or not model_flops(shapes).per_supervised_token else min(seq, supervised)
        total += kept + head * d["vocab"] * (e + 8) + seq * h * e * 2  # + inputs_embeds and its grad
    proj = by_name.get("projector") or by_name.get("stage1")
    vision = by_name["vision_encoder"]
    v = vision.dims
    images = tower_images
    if proj is not None:
        per_image = proj.dims.get("tokens", v["tokens"]) / max(1, proj.dims.get("images", 1))
        total += images * per_image * (proj.dims.get("in", v["hidden"]) + 2 * (llm.dims["hidden"] if llm else 256)) * 4
    stage1 = by_name.get("stage1")
    if stage1 is not None and stage1.trainable and cfg.model.connector.type == "qformer":
        # a training Q-Former keeps, per layer, its queries' attention/FFN tensors and (in cross-attention
        # layers) the keys and values of every vision token, in fp32
        q = cfg.model.connector.qformer
        h = stage1.dims.get("width", q.hidden_size)
        cross = math.ceil(q.num_layers / max(1, q.cross_attention_every))
        total += images * (q.num_layers * q.num_queries * 16 * h + cross * v["tokens"] * (v["hidden"] + 2 * h)) * 4
    for part in (stage1, by_name.get("projector")):
        if part is not None and part.trainable and "resampler" in part.dims:
            total += images * resampler_activation_bytes(part.dims["resampler"])
    # frozen vision forward runs without grad: one layer's transient working set per image (mmdist.plan.towers)
    total += images * v["working_set"] * e
    text = by_name.get("text_encoder")
    if text is not None:
        td = text.dims
        tokens = cfg.model.text.max_length
        per = (2 * td["hidden"] + 2 * td["hidden"] + 2 * td["hidden"] + 3 * td["intermediate"])
        if text.trainable:
            per += 3 * td["hidden"] + td["intermediate"] + td["heads"] * tokens
        total += tokens * td["layers"] * per * e * tower_images
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
    return {
        k: zero[k] for k in ("reduce_bucket_size", "allgather_bucket_size", "stage3_prefetch_bucket_size") if k in zero
    }


def estimate(cfg: RunConfig, shapes: list[ModuleShape], world: int, settings: Sequence[Setting] = ALL_SETTINGS,
             reserve_bytes: int = int(1.5 * GiB), tokens: Optional[BatchTokens] = None) -> list[Estimate]:
    """One :class:`Estimate` per setting for ``world`` ranks: activations for the micro-batch ``tokens`` plans
    (mmdist.plan.lengths: its peak positions and tower images), or, without it, ``micro_batch_size`` full
    ``data.max_len`` rows. ``per_sample`` (the largest micro-batch that fits) is the micro-batch's share per sample."""
    b = cfg.train.micro_batch_size
    if tokens is None:
        per = activation_bytes_per_sample(shapes, cfg, checkpointing=False)
        per_ckpt = activation_bytes_per_sample(shapes, cfg, checkpointing=True)
        act, act_ckpt = b * per, b * per_ckpt
    else:
        act, act_ckpt = (activation_bytes(shapes, cfg, ckpt, tokens.peak_positions, tokens.peak_tower_images,
                                          tokens.row_len, tokens.peak_supervised_tokens) for ckpt in (False, True))
        per, per_ckpt = -(-act // max(1, b)), -(-act_ckpt // max(1, b))
    out = []
    for s in settings:
        ms = model_state_bytes(shapes, s, world, cfg.engine.precision, deepspeed_bucket_settings(cfg))
        out.append(Estimate(s, ms["frozen"], ms["trainable"], ms["gradients"], ms["optimizer"], act, act_ckpt,
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


