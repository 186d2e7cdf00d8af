"""Step 4 of the plan: what fits, the recommended setting, the table a person reads, and the input-rate warning.

Kept apart from the arithmetic so the estimate can be used (benchmarks, tests)
without the wording.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional

from mmdist.config.run import RunConfig, load_config
from mmdist.hardware import datasheet_peak
from mmdist.plan.lengths import BatchTokens
from mmdist.plan.memory import Estimate, Setting
from mmdist.plan.shapes import GiB, ModuleShape
from mmdist.plan.speed import Choice
from mmdist.precision import ENGINE_KEY, PART_KEYS


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


def setting_overrides(setting: Setting, checkpointing: Optional[bool] = None) -> str:
    """The dotted overrides that run ``setting`` (and ``model.llm.gradient_checkpointing`` when given)."""
    out = (f"engine.zero_stage={setting.zero_stage} engine.offload_optimizer={str(setting.offload_optimizer).lower()} "
           f"engine.offload_params={str(setting.offload_params).lower()}")
    if checkpointing is not None:
        out += f" model.llm.gradient_checkpointing={str(checkpointing).lower()}"
    return out


def image_lines(cfg: RunConfig, shapes: list[ModuleShape]) -> list[str]:
    """What one sample's image costs: tower output, LLM tokens, tiles and separators (mmdist.plan.images)."""
    by_name = {s.name: s for s in shapes}
    v = by_name["vision_encoder"].dims
    kind = {"tokens": "ViT-like", "conv": "convolutional"}.get(v["kind"], v["kind"])
    tower = f"images: the {kind} tower gives {v['tokens']} tokens of width {v['hidden']} per image"
    if "image_size" in v:
        tower += f" at {v['image_size']} px"
    proj = by_name.get("projector")
    if proj is None:  # stage align: the stage-1 module reads one image per caption
        stage1 = by_name.get("stage1")
        return [tower + (f"; the stage-1 module makes them {stage1.dims['tokens']}" if stage1 else "")]
    d = proj.dims
    line = tower + f"; the LLM gets {d['tokens_per_image']} per image"
    if d["images"] > 1:
        line += (
            f"; tiled (data.image_tiling): up to {d['images']} images per sample (base + {d['images'] - 1} tiles) = "
            f"{d['tokens']} image tokens, {d['positions']} positions with separators ({d['separator_tokens']} tokens "
            f"each: {d['separator_note']})"
        )
    lines = [line]
    if d["positions"] > cfg.data.max_len:
        lines.append(
            f"  warning: one image takes up to {d['positions']} positions, more than data.max_len={cfg.data.max_len}: "
            "such samples lose the image to truncation (raise data.max_len or drop large grids)"
        )
    return lines


def format_plan(cfg: RunConfig, shapes: list[ModuleShape], estimates: list[Estimate], world: int, budget: int,
                ds: Optional[dict] = None, fastest: Optional[Choice] = None,
                tokens: Optional[BatchTokens] = None) -> str:
    """The plan a person reads; ``fastest`` (mmdist.plan.speed.choose) is the recommendation by predicted step
    time among what fits, else the first setting that fits in :func:`recommend`'s order; ``tokens`` the
    micro-batch the estimates were made for (mmdist.plan.lengths; default every sample a full row)."""
    lines = []
    p_train = sum(s.params for s in shapes if s.trainable)
    p_frozen = sum(s.params for s in shapes if not s.trainable)
    head = (f"mmdist plan: stage {cfg.stage}, {world} GPU(s) of {_g(budget)} GiB, precision {cfg.engine.precision}, "
            f"micro-batch {cfg.train.micro_batch_size} samples")
    if tokens is None or tokens.source == "worst case":
        lines.append(head + f", each counted as a full row of {cfg.data.max_len} tokens "
                     f"({'packed' if cfg.data.packing and cfg.stage.packs else 'padded'}: at most "
                     f"{cfg.train.micro_batch_size * cfg.data.max_len:,} tokens)")
    else:
        lines.append(head + f" of {tokens.per_sample_tokens:,.0f} tokens on average ({tokens.tokens:,.0f} per "
                     f"micro-batch, {tokens.positions:,.0f} positions in {tokens.rows:.1f} row(s); memory for "
                     f"{tokens.peak_positions:,})")
    if tokens is not None:
        lines.append(f"micro-batch tokens from the {tokens.note}")
    lines += image_lines(cfg, shapes)
    lines.append("")
    lines.append(f"{'module':<16}{'params':>16}{'trainable':>11}{'dtype':>7}")
    for s in shapes:
        lines.append(f"{s.name:<16}{s.params:>16,}{'yes' if s.trainable else 'no':>11}{s.dtype:>7}")
    lines.append(
        f"{'total':<16}{p_train + p_frozen:>16,}   trainable "
        f"{p_train:,} ({100 * p_train / max(1, p_train + p_frozen):.3f}%)"
    )
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
    if fastest is not None:
        best, ckpt = fastest.estimate, fastest.checkpointing
    else:
        best, ckpt = recommend(estimates, budget, cfg.model.llm.gradient_checkpointing)
    lines.append("")
    if best.total(ckpt) <= budget:
        why = (f"predicted fastest that fits ({fastest.time.step_s:.2f} s/step on {world} GPU(s)); "
               if fastest is not None else "")
        lines.append(f"recommended: {best.setting.label}, gradient_checkpointing={'true' if ckpt else 'false'}; {why}"
                     f"largest micro-batch that fits: {best.max_micro_batch(budget, ckpt)} "
                     f"(configured {cfg.train.micro_batch_size}; {_g(best.total(ckpt))} GiB of {_g(budget)} GiB)")
        lines.append("  overrides: " + setting_overrides(best.setting, ckpt if cfg.stage.builds("llm") else None))
    else:
        lines.append(
            f"nothing fits micro-batch {cfg.train.micro_batch_size}: closest is {best.setting.label} with "
            f"checkpointing at {_g(best.total(True))} GiB; lower train.micro_batch_size or data.max_len, or add GPUs"
        )
    if ds:
        lines.append("")
        lines.append(
            "DeepSpeed's estimators (every parameter counted as trainable) vs this plan, model states per GPU, GiB:"
        )
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

    vision = next((s for s in shapes if s.name == "vision_encoder"), None)
    row = datasheet_peak(gpu)
    if vision is None or not vision.dims.get("flops_per_image") or row is None or not (row.bf16 or row.fp16):
        why = "unknown GPU " + repr(gpu) if row is None else "custom vision encoder (no FLOP count)"
        return [f"input: not estimated ({why})"]
    flops = vision.dims["flops_per_image"]  # one frozen forward of the tower (mmdist.plan.towers)
    need = TOWER_MFU * (row.bf16 or row.fp16) / flops
    images = vision.dims.get("images", 1)  # tower images per decoded image: the base image and its tiles
    cores = need / images / images_per_core
    how = (f"{vision.params / 1e6:.0f}M params x {vision.dims['seq']} tokens" if vision.dims.get("seq")
           else f"{vision.params / 1e6:.0f}M params at {vision.dims['image_size']} px")
    tiled = (f" = {need / images:,.0f} decoded images/s of {images} tower images each (base + tiles; at least, as "
             "tiling adds resizing)" if images > 1 else "")
    lines = [
        f"input: the vision tower ({how} = {flops / 1e12:.2f} TFLOP/image) at {TOWER_MFU:.0%} of a {row.label}'s "
        f"peak eats {need:,.0f} images/s per GPU{tiled}; at {images_per_core:.0f} images/s per core (mmdist's loader) "
        f"that is {cores:.1f} CPU cores per GPU"
    ]
    if cpus_per_node and gpus_per_node and cpus_per_node / gpus_per_node < cores:
        lines.append(
            f"  warning: {cpus_per_node} cores for {gpus_per_node} "
            f"GPUs is {cpus_per_node / gpus_per_node:.1f} per GPU: "
            "the loader cannot keep the tower busy when it decodes pixels; cache the image features "
            "(mmdist cache) or move decoding to more nodes"
        )
    return lines


def resolve_auto_for_gpu(cfg: RunConfig, gpu: str, path: str, overrides: Sequence[str]) -> tuple[RunConfig, str]:
    """The config with every ``auto`` dtype as the target GPU would resolve it (bf16 where it has bf16, else fp16).

    The plan is for the cluster's GPUs, not for the machine it runs on, so this
    machine's hardware is not consulted (mmdist.precision does that at start-up).
    """

    keys = [key for key in (ENGINE_KEY, *PART_KEYS.values()) if _setting(cfg, key) == "auto"]
    if not keys:
        return cfg, ""
    row = datasheet_peak(gpu)
    dtype = "fp16" if row is not None and row.bf16 is None else "bf16"
    resolved = load_config(path, [*overrides, *(f"{key}={dtype}" for key in keys)])
    return resolved, f"auto -> {dtype} for {row.label if row else gpu} ({', '.join(keys)})"


def _setting(cfg: RunConfig, key: str) -> Any:
    node = cfg
    for part in key.split("."):
        node = getattr(node, part)
    return node
