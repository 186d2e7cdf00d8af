"""The trainer against its own model on the same rows: tokens/s of each, their ratio, MFU/HFU, memory, a breakdown.

Both sides run the same model (``mmdist.materialize.build_run_model`` on the same
config, so the same attention kernel) over the same batches:

1. **the training path**: ``mmdist.training.loop.train`` itself (DeepSpeed engine,
   the ZeRO stage ``engine.zero_stage: auto`` picks unless ``--zero-stage``, the
   webdataset loader with packing, the metrics, the step) on demo-digit shards
   written first (images at the tower's size): configs/tiny_fuse.yaml with the
   shapes below as ``init_config``, ``data.packing=true``, one micro-batch per step,
   gradient checkpointing. A forward pre-hook on the model keeps every batch the
   model is called with (references: no copy, no sync): the trainer's exact rows
   (the collator's packed ``input_ids``, ``sequence_ids``, ``position_ids``, images);
2. **the bare model**: the same FusedVLM built straight on the device (checkpointed
   the way the engine does it), torch AdamW over the trainer's optimizer groups,
   gradient clipping as ``train.grad_clip`` asks, no DeepSpeed, no loader, replaying
   those recorded batches, step i the trainer's step i.

The result records, per steady step and side, the rows (count x width), the real
tokens and the attention path the model took (``FusedVLM.attention_path``), and
whether the two sides' batches were equal tensor for tensor.

Both count FLOPs with the model's own ``flop_count()`` (the trainer's bar and
metrics.jsonl use it too): ``mfu`` is that count per second over the device peak;
``hfu`` adds the LLM forward that gradient checkpointing recomputes. Steady state
only: the first ``--warmup`` steps (at least the trainer's own warm-up step) are left
out of every figure. The trainer runs with ``MMDIST_STEP_PHASES=1``, so its step
times its phases (one synchronize per phase on a GPU: the breakdown is exact, the
step a little slower); the bare side times the same phases the same way. The
trainer's fixed cost per step is its phase time minus the bare model's on the same
rows. Under ZeRO-3 the host time in DeepSpeed's per-module parameter fetch/release
hooks (the gathers included) is shown too, as a part of the forward and backward.

``--packed-attention {auto,sdpa_per_sample,flex}`` sets ``model.llm.packed_attention``
and ``attn_implementation: sdpa`` (the packed kernels replace sdpa's path;
flash_attn is otherwise preferred where installed); both sides take it.

Shapes: the default is Qwen-14B + CLIP ViT-L/14-336 on one GPU (micro-batch 16,
``max_len`` 2048; 6 steps a side, about 4 minutes on an H100/H200, most of it building
the two 14B models); ``--cpu`` a mid-size model on the CPU whose steps take about a
second on two cores (the trainer's overhead against real work); ``--tiny`` toy
shapes on the CPU in well under a minute (tests/benchmarks/test_gpu_system.py), where
the step is mostly fixed cost.
"""

from __future__ import annotations

import os

os.environ["MMDIST_STEP_PHASES"] = "1"  # read once when mmdist.training.step is imported, below

import argparse  # noqa: E402
import contextlib  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import resource  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import yaml  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout's mmdist, without install

from common import format_table, tiny_recipe  # noqa: E402
from gpu_throughput import CLIP_L_336, QWEN_14B, TINY_LLM, TINY_VISION, attention_kernel, device_peak  # noqa: E402

PHASES = ("data_wait", "to_device", "vision", "llm_forward", "backward", "optimizer", "host_sync", "logging", "other")
#: Shown below the phases, already inside them: host time in ZeRO-3's per-module parameter fetch and release hooks.
INSIDE = ("zero3_fetch_release",)
#: What each phase holds on the trainer's side, for the fixed-cost table.
PHASE_NOTES = {"data_wait": "next batch from the loader", "to_device": "host-to-device copy and cast",
               "vision": "the frozen tower's forward", "llm_forward": "forward less vision (the engine's hooks in it)",
               "backward": "backward (recompute, gradient reduction)", "optimizer": "clip, step, zero the gradients",
               "host_sync": "collectives and loss reads (NaN check, loss terms, step reduce)",
               "logging": "metrics record, bar, metrics.jsonl", "other": "the rest of the loop (watchdog, preemption)"}

#: The --cpu shape: a qwen2 LLM of 8 x 512 and a CLIP tower of 4 x 256 giving 64 image tokens, so that a step of
#: 8 demo samples packed into rows of 512 tokens is real work on a CPU (about a second on two cores).
MID_LLM = dict(model_type="qwen2", vocab_size=4096, hidden_size=512, intermediate_size=1536, num_hidden_layers=8,
               num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=1024, tie_word_embeddings=False)
MID_VISION = dict(model_type="clip_vision_model", hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
                  num_attention_heads=4, image_size=64, patch_size=8, num_channels=3, projection_dim=256)


@dataclass(frozen=True)
class Shape:
    """One benchmark shape: the two towers, samples per step, the packed row length, loader workers (None: auto)."""

    name: str
    llm: dict
    vision: dict
    micro_batch: int
    max_len: int
    workers: int | None


SHAPES = {
    "gpu": Shape("Qwen-14B + CLIP ViT-L/14-336", QWEN_14B, CLIP_L_336, micro_batch=16, max_len=2048, workers=4),
    "cpu": Shape("mid-size CPU (qwen2 8 x 512, CLIP 4 x 256)", MID_LLM, MID_VISION, micro_batch=8, max_len=512,
                 workers=None),
    "tiny": Shape("tiny", TINY_LLM, TINY_VISION, micro_batch=2, max_len=128, workers=2),
}


def run_config(shape: Shape, device: torch.device, workdir: Path, shards: str, *, micro_batch: int, max_len: int,
               steps: int, zero_stage: int | str, checkpointing: bool, peak: float, workers: int | None,
               packed_attention: str | None = None):
    """The reference run: tiny_fuse.yaml with the shape's towers as init_config, packing, one micro-batch per step;
    ``packed_attention`` (when given) set as model.llm.packed_attention, on sdpa."""
    from mmdist.config.run import load_config

    recipe = tiny_recipe("fuse")
    half = "bf16" if device.type == "cuda" else "fp32"
    recipe["model"]["llm"].update(init_config=dict(shape.llm), dtype=half, gradient_checkpointing=checkpointing,
                                  attn_implementation=attention_kernel(device) if packed_attention is None else "sdpa")
    if packed_attention is not None:
        recipe["model"]["llm"]["packed_attention"] = packed_attention
    recipe["model"]["vision"].update(init_config=dict(shape.vision), dtype=half, select_layer=-2, select_tokens="patch")
    recipe["model"]["text"]["dtype"] = half
    recipe["data"].update(train=[{"shards": [shards]}], eval=[], max_len=max_len, packing=True, num_workers=workers)
    recipe["train"].update(max_steps=steps, global_batch_size=micro_batch, micro_batch_size=micro_batch, eval_every=0,
                           warmup_ratio=0.0, lr_scheduler="constant")
    recipe["engine"].update(zero_stage=zero_stage, precision=half, backend="nccl" if device.type == "cuda" else "gloo")
    recipe["checkpoint"].update(save_every=0, export=False, resume="never")
    recipe["log"] = {
        "log_every": 1,
        "progress_bar": False,
        "tensorboard": False,
        "param_table": False,
        "peak_flops": peak,
    }
    recipe["run_dir"] = str(workdir / "run")
    return load_config(base=recipe)


class BatchRecorder:
    """A forward pre-hook that keeps every batch a model is called with, and the attention path the model takes over
    it: references, no copy, so no host time and no sync in the step it watches. The trainer's are the collator's
    packed rows as the model got them (on the device, cast); the bare side replays them."""

    def __init__(self) -> None:
        self.batches: list[dict] = []
        self.attention: list[str] = []

    def attach(self, model: torch.nn.Module) -> None:
        model.register_forward_pre_hook(self._hook)

    def _hook(self, module: torch.nn.Module, args: tuple) -> None:
        batch = args[0]
        self.batches.append(dict(batch))
        self.attention.append(f"{module.llm.config._attn_implementation}/{module.attention_path(batch)}")

    def layouts(self, records: list[dict]) -> list[dict]:
        """Per step: rows x width of the batch, the attention path, and the step's counts from ``records``."""
        keys = ("step_tokens", "step_samples", "step_images", "step_supervised_tokens")
        return [{"rows": int(batch["input_ids"].shape[0]), "width": int(batch["input_ids"].shape[1]),
                 "attention": attention, **{k.removeprefix("step_"): record[k] for k in keys}}
                for batch, attention, record in zip(self.batches, self.attention, records)]


def same_batches(first: list[dict], second: list[dict]) -> bool:
    """Whether two sides' batches are equal, step for step, key for key, tensor for tensor."""
    if len(first) != len(second):
        return False
    for a, b in zip(first, second):
        if a.keys() != b.keys():
            return False
        for key, value in a.items():
            other = b[key]
            if isinstance(value, torch.Tensor):
                if not (isinstance(other, torch.Tensor) and value.shape == other.shape and torch.equal(value, other)):
                    return False
            elif value != other:
                return False
    return True


def time_vision(model: torch.nn.Module, device: torch.device) -> None:
    """Forward hooks around the vision tower that add its time to the step's phase timer (the ``vision`` phase)."""
    from mmdist.training.step import phases

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def before(module, args):
        sync()
        module._bench_t0 = time.perf_counter()

    def after(module, args, output):
        sync()
        phases.add("vision", time.perf_counter() - module._bench_t0)

    model.vision.register_forward_pre_hook(before)
    model.vision.register_forward_hook(after)


def time_zero3_hooks(cfg) -> contextlib.AbstractContextManager:
    """Within the block, the host time of ZeRO-3's fetch_sub_module/release_sub_module (the forward and backward hooks
    that gather and free each module's parameters, waits for the gathers included) goes to the
    ``zero3_fetch_release`` phase; the hooks are put back afterwards (mmdist.training.deepspeed_compat).

    Wall-clock on the host, no synchronize (one per module would serialize the gathers this measures): where the
    GPU waits for the host, this is the time those hooks cost; where it does not, it overlaps the kernels.
    """
    if cfg.engine.zero_stage not in (3, "auto"):  # auto is resolved inside train(); the hooks cost nothing off ZeRO-3
        return contextlib.nullcontext()
    from mmdist.training.deepspeed_compat import timed_zero3_fetch_release
    from mmdist.training.step import phases

    return timed_zero3_fetch_release(lambda seconds: phases.add("zero3_fetch_release", seconds))


def run_trainer(cfg, device: torch.device) -> tuple[list[dict], dict, BatchRecorder]:
    """``loop.train`` on the config; returns its metrics.jsonl train records, the run's peak memory and the batches
    its model was called with."""
    from mmdist.materialize import build_run_model
    from mmdist.training.loop import train

    recorder = BatchRecorder()

    def builder(cfg, gather):
        model = build_run_model(cfg, gather=gather)
        time_vision(model, device)
        recorder.attach(model)
        return model

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    with time_zero3_hooks(cfg):
        train(cfg, model_builder=builder)
    wall = time.perf_counter() - t0
    records = [json.loads(line) for line in (Path(cfg.run_dir) / "metrics.jsonl").read_text().splitlines()]
    written = yaml.safe_load((Path(cfg.run_dir) / "config.yaml").read_text())  # the stage `auto` resolved to
    return [r for r in records if r.get("split") == "train"], {"peak_memory_gib": peak_memory(device), "wall_s": wall,
                                                              "zero_stage": written["engine"]["zero_stage"]}, recorder


def peak_memory(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2**30  # the process's, both sides so far


def build_bare(cfg, device: torch.device) -> torch.nn.Module:
    """The trainer's model without its engine: ``build_run_model`` on the same config (the same modules, processors
    and attention kernel), built on the device, its frozen layers checkpointed as the engine checkpoints them."""
    from mmdist.materialize import build_run_model
    from mmdist.training.engine import enable_frozen_gradient_checkpointing

    torch.manual_seed(cfg.train.seed)
    with torch.device(device):
        model = build_run_model(cfg)
    model.to(device)
    if cfg.model.llm.gradient_checkpointing:
        enable_frozen_gradient_checkpointing(model)
    model.train()
    return model


def run_bare(cfg, device: torch.device, batches: list[dict]) -> tuple[list[dict], dict, BatchRecorder]:
    """Forward, backward, clip (``train.grad_clip``), torch AdamW over the trainer's optimizer groups: one step per
    batch of ``batches`` (the trainer's, already on the device and cast)."""
    from mmdist.training.optimizer import build_optimizer_groups
    from mmdist.training.step import phases

    # what the process still holds of the trainer's side (its recorded batches, anything not yet freed): part of
    # the bare side's peak below, not of its own use
    held = torch.cuda.memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0
    t0 = time.perf_counter()
    model = build_bare(cfg, device)
    build_s = time.perf_counter() - t0
    time_vision(model, device)
    recorder = BatchRecorder()
    recorder.attach(model)
    groups = build_optimizer_groups(model, cfg.train)
    trainable = [p for g in groups for p in g["params"]]
    optimizer = torch.optim.AdamW(groups, lr=cfg.train.lr, betas=tuple(cfg.train.betas),
                                  weight_decay=cfg.train.weight_decay, fused=device.type == "cuda")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    phases.device = device
    phases.take()
    out = []
    for step, batch in enumerate(batches, start=1):
        t = time.perf_counter()
        with phases.phase("forward"):
            loss = model(batch)["loss"]
        with phases.phase("backward"):
            loss.backward()
        with phases.phase("optimizer"):
            if cfg.train.grad_clip:
                torch.nn.utils.clip_grad_norm_(trainable, cfg.train.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        with phases.phase("host_sync"):
            value = float(loss.detach())
        seconds = time.perf_counter() - t
        out.append({"step": step, "step_s": seconds, "loss": value,
                    **{f"phase_{k}_s": v for k, v in phases.take().items()}})
    memory = peak_memory(device)
    flops = model.flop_count()  # the structure the trainer built too: the FLOPs of both sides
    for record, batch in zip(out, recorder.batches):  # what the bare model got, counted as the trainer counts
        counts = model.batch_counts(batch)
        record.update(step_tokens=counts.tokens, step_images=counts.images, step_samples=counts.samples,
                      step_supervised_tokens=counts.supervised_tokens, step_image_tokens=counts.image_tokens)
    del model, optimizer
    return out, {"peak_memory_gib": memory, "held_before_gib": held, "build_s": build_s, "flops": flops}, recorder


def side_summary(steps: list[dict], step_seconds: list[float], flops, peak: float, checkpointing: bool) -> dict:
    """Tokens/s, MFU and HFU over ``steps`` (steady ones), their mean phase breakdown per step."""
    seconds = sum(step_seconds)
    tokens = sum(s["step_tokens"] for s in steps)
    done = sum(flops.step(s["step_tokens"], s["step_supervised_tokens"], s["step_image_tokens"],
                          s.get("step_images", 0), s.get("step_samples", 0)) for s in steps)
    recompute = 0.5 * flops.per_token * tokens if checkpointing else 0.0  # the frozen LLM's forward again (2 of its 4)
    n = len(steps)
    breakdown = {k: sum(s.get(f"phase_{k}_s", 0.0) for s in steps) / n for k in PHASES}
    breakdown["llm_forward"] = sum(s.get("phase_forward_s", 0.0) for s in steps) / n - breakdown["vision"]
    breakdown["other"] = seconds / n - sum(v for k, v in breakdown.items() if k != "other")
    breakdown.update({k: sum(s.get(f"phase_{k}_s", 0.0) for s in steps) / n for k in INSIDE})
    return {"steps": n, "real_tokens": tokens, "images": sum(s["step_images"] for s in steps),
            "samples": sum(s.get("step_samples", 0) for s in steps), "step_s": seconds / n,
            "tokens_per_s": tokens / seconds, "mfu": done / seconds / peak, "hfu": (done + recompute) / seconds / peak,
            "breakdown_s": breakdown}


def planned_split(cfg, device: torch.device) -> dict:
    """What ``mmdist plan`` recommends for ``cfg`` (its global batch) on one rank of this device
    (mmdist.plan.micro_batch.fastest_split over the stages ``auto`` considers, the budget ``auto`` reads: the card's
    memory or MMDIST_DEVICE_MEMORY, the rates MMDIST_CALIBRATION names or the shipped defaults): micro-batch,
    accumulation, checkpointing, ZeRO stage, predicted step and memory, and the line saying so."""
    from mmdist.plan.auto import auto_candidates, calibration_from_env, device_budget, planned_precision
    from mmdist.plan.micro_batch import fastest_split
    from mmdist.plan.shapes import GiB, model_shapes
    from mmdist.plan.step_time import interconnect_for

    budget, name, source = device_budget(device.type)
    planned = planned_precision(cfg, device.type)
    shapes = model_shapes(planned)
    best, _ = fastest_split(planned, shapes, 1, name, interconnect_for(name, gpus_per_node=1), budget,
                            auto_candidates(planned, planned.engine.precision), int(1.5 * GiB), calibration_from_env())
    if best is None:
        raise RuntimeError(f"mmdist plan finds no micro-batch of the global batch {cfg.train.global_batch_size} that "
                           f"fits {budget / GiB:.1f} GiB ({source})")
    need = best.choice.estimate.total(best.choice.checkpointing) / GiB
    return {"micro_batch": best.micro_batch, "accumulation": best.accumulation,
            "checkpointing": best.choice.checkpointing, "zero_stage": best.choice.setting.zero_stage,
            "predicted_step_s": best.step_s, "predicted_gib": need,
            "line": f"mmdist plan on {name} ({budget / GiB:.1f} GiB, {source}): {best.label}, "
                    f"{best.step_s:.3g} s per step of {cfg.train.global_batch_size} samples, {need:.1f} GiB predicted"}


def run(shape: str = "gpu", steps: int = 6, warmup: int = 1, micro_batch: int | None = None,
        max_len: int | None = None, zero_stage: int | str = "auto", checkpointing: bool = True,
        device: str | None = None, workdir: str | None = None, workers: int | None = None,
        packed_attention: str | None = None, plan: bool = False) -> dict:
    from mmdist.data.loader import resolve_num_workers
    from mmdist.data.shards import shard_pattern, write_demo_shards
    from mmdist.training.metrics import WARMUP_STEPS

    spec = SHAPES[shape]
    micro_batch = micro_batch or spec.micro_batch
    max_len = max_len or spec.max_len
    on_gpu = shape == "gpu" and torch.cuda.is_available()
    dev = torch.device(device or ("cuda" if on_gpu else "cpu"))
    warmup = max(warmup, WARMUP_STEPS)
    if steps <= warmup:
        raise ValueError(f"--steps {steps} must exceed the {warmup} warm-up step(s)")
    if packed_attention == "flex" and dev.type == "cpu":
        raise ValueError("--packed-attention flex trains on a GPU only: torch has no FlexAttention backward on CPU "
                         "(its CPU equality is tests/models/test_packed_attention_flex.py)")
    folder = Path(workdir or tempfile.mkdtemp(prefix="gpu_system_"))
    tower = spec.vision["image_size"]
    image_tokens = (tower // spec.vision["patch_size"]) ** 2
    samples = steps * micro_batch * max(1, max_len // (image_tokens + 8)) + 64  # enough for every packed row
    written = write_demo_shards(folder / "demo", image_size=tower, samples_per_shard=200, overwrite=True,
                                limit=min(samples, 1400))
    peak, peak_source = device_peak(dev, torch.bfloat16 if dev.type == "cuda" else torch.float32)
    settings = dict(max_len=max_len, steps=steps, peak=peak, workers=spec.workers if workers is None else workers,
                    packed_attention=packed_attention)
    cfg = run_config(spec, dev, folder, shard_pattern(written["train"]), micro_batch=micro_batch,
                     zero_stage=zero_stage, checkpointing=checkpointing, **settings)
    plan_info = None
    if plan:  # the plan's micro-batch, checkpointing and stage for a global batch of ``micro_batch`` samples
        plan_info = planned_split(cfg, dev)
        print(plan_info["line"], flush=True)
        micro_batch, checkpointing = plan_info["micro_batch"], plan_info["checkpointing"]
        zero_stage = plan_info["zero_stage"]
        cfg = run_config(spec, dev, folder, shard_pattern(written["train"]), micro_batch=micro_batch,
                         zero_stage=zero_stage, checkpointing=checkpointing, **settings)

    trainer_steps, trainer_info, trainer_batches = run_trainer(cfg, dev)
    resolved_stage = trainer_info.pop("zero_stage")
    accumulation = len(trainer_batches.batches) // max(len(trainer_steps), 1)
    if accumulation != 1 or len(trainer_batches.batches) != len(trainer_steps):
        raise RuntimeError(f"the trainer's model ran {len(trainer_batches.batches)} forwards in {len(trainer_steps)} "
                           "steps; the bare side replays one batch a step (a non-finite loss skipped, or accumulation)")
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    bare_steps, bare_info, bare_batches = run_bare(cfg, dev, trainer_batches.batches)

    bare_model_flops = bare_info.pop("flops")
    trainer_layouts, bare_layouts = trainer_batches.layouts(trainer_steps), bare_batches.layouts(bare_steps)
    identical = same_batches(trainer_batches.batches, bare_batches.batches)
    del trainer_batches, bare_batches

    steady_t = [s for s in trainer_steps if s["step"] > warmup]
    steady_b = [s for s in bare_steps if s["step"] > warmup]
    times = [r["time"] for r in trainer_steps]
    # record to record: the loop's period
    trainer_seconds = [times[i] - times[i - 1] for i in range(warmup, len(times))]
    trainer = side_summary(steady_t, trainer_seconds, bare_model_flops, peak, checkpointing)
    bare = side_summary(steady_b, [s["step_s"] for s in steady_b], bare_model_flops, peak, checkpointing)
    trainer.update(trainer_info, reported_tokens_per_s=steady_t[-1]["tokens_per_s"], reported_mfu=steady_t[-1]["mfu"],
                   reported_mfu_steady_from_step=steady_t[-1]["mfu_steady_from_step"],
                   layouts=trainer_layouts[warmup:], step_tokens=[s["step_tokens"] for s in steady_t])
    bare.update(bare_info, layouts=bare_layouts[warmup:], step_tokens=[s["step_tokens"] for s in steady_b])
    attention = sorted({shape["attention"] for side in (trainer, bare) for shape in side["layouts"]})
    return {
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "shape": shape, "shapes": spec.name, "zero_stage": resolved_stage, "zero_stage_setting": zero_stage,
        "checkpointing": checkpointing, "micro_batch": micro_batch, "max_len": max_len, "steps": steps,
        "workers": resolve_num_workers(cfg.data.num_workers),
        "packed_attention": cfg.model.llm.packed_attention, "packed_attention_flag": packed_attention,
        "attn_implementation": cfg.model.llm.attn_implementation, "attention_paths": attention,
        "same_batches": identical, "torch_threads": torch.get_num_threads(), "plan": plan_info,
        "warmup_steps": warmup, "peak_flops": peak, "peak_source": peak_source,
        "trainer": trainer, "bare": bare, "ratio": trainer["tokens_per_s"] / bare["tokens_per_s"],
        "fixed_cost_ms": {k: 1e3 * (trainer["breakdown_s"][k] - bare["breakdown_s"][k]) for k in PHASES},
    }


def report(res: dict) -> str:
    """The printed result: one line per figure (``name  trainer  bare``), the step breakdown in ms with the trainer's
    fixed cost per phase (trainer minus bare on the same rows)."""
    t, b = res["trainer"], res["bare"]
    rows = sorted({(s["rows"], s["width"]) for s in t["layouts"]})
    lines = [f"device  {res['device']}  ({res['shapes']}, ZeRO-{res['zero_stage']} ({res.get('zero_stage_setting')}), "
             f"micro-batch {res['micro_batch']}, max_len {res['max_len']}, checkpointing {res['checkpointing']}, peak "
             f"{res['peak_flops']:.4g} FLOP/s from {res['peak_source']}, {res['torch_threads']} torch thread(s), "
             f"{res['workers']} loader worker(s))",
             *([f"plan  {res['plan']['line']}; run here: one micro-batch of {res['plan']['micro_batch']} a step"
                + (f" (the plan's {res['plan']['accumulation']} accumulation steps repeat it before the optimizer step)"
                   if res["plan"]["accumulation"] > 1 else "")] if res.get("plan") else []),
             f"rows  same batches on both sides: {res['same_batches']}; rows x width per step "
             f"{' '.join(f'{r}x{w}' for r, w in rows)}; attention {', '.join(res['attention_paths'])}",
             f"steady_steps  {t['steps']}  {b['steps']}  (first {res['warmup_steps']} left out)",
             f"real_tokens  {t['real_tokens']}  {b['real_tokens']}",
             f"images  {t['images']}  {b['images']}",
             f"samples  {t['samples']}  {b['samples']}",
             f"tokens_per_s  {t['tokens_per_s']:.6g}  {b['tokens_per_s']:.6g}",
             f"ratio  {res['ratio']:.4f}  (trainer tokens/s over bare tokens/s)",
             f"mfu  {t['mfu']:.4f}  {b['mfu']:.4f}",
             f"hfu  {t['hfu']:.4f}  {b['hfu']:.4f}",
             f"trainer_reported  tokens_per_s={t['reported_tokens_per_s']:.6g} mfu={t['reported_mfu']:.4f} "
             f"(metrics.jsonl, steady from step {t['reported_mfu_steady_from_step']})",
             f"peak_memory_gib  {t['peak_memory_gib']:.3f}  {b['peak_memory_gib']:.3f}  (bare: "
             f"{b.get('held_before_gib', 0.0):.3f} of it still held from the trainer's side when it started)",
             f"step_s  {t['step_s']:.6g}  {b['step_s']:.6g}",
             ""]
    table = [{"phase (ms/step)": k, "trainer": 1e3 * t["breakdown_s"][k], "bare": 1e3 * b["breakdown_s"][k],
              "fixed cost": res["fixed_cost_ms"][k], "what": PHASE_NOTES[k]} for k in PHASES]
    table += [{"phase (ms/step)": f"({k}, inside the above)", "trainer": 1e3 * t["breakdown_s"][k],
               "bare": 1e3 * b["breakdown_s"][k], "fixed cost": 1e3 * (t["breakdown_s"][k] - b["breakdown_s"][k]),
               "what": "ZeRO-3 parameter fetch/release hooks"} for k in INSIDE]
    table.append({"phase (ms/step)": "step", "trainer": 1e3 * t["step_s"], "bare": 1e3 * b["step_s"],
                  "fixed cost": 1e3 * (t["step_s"] - b["step_s"]), "what": "the loop's period; bare: its step"})
    lines.append(format_table(table, ["phase (ms/step)", "trainer", "bare", "fixed cost", "what"]))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--tiny", action="store_true", help="toy shapes on the CPU (the test mode)")
    size.add_argument("--cpu", action="store_true", help="a mid-size model on the CPU, about a second a step on two "
                                                         "cores: the trainer's overhead against real work")
    parser.add_argument("--steps", type=int, default=None, help="steps a side, warm-up included (default 6; cpu: 8)")
    parser.add_argument("--warmup", type=int, default=None,
                        help="steps left out of every figure (at least the trainer's 1; default 1, cpu: 2)")
    parser.add_argument("--micro-batch", type=int, default=None, help="samples per step, default 16 (cpu: 8, tiny: 2)")
    parser.add_argument("--max-len", type=int, default=None,
                        help="packed row length, default 2048 (cpu: 512, tiny: 128)")
    parser.add_argument(
        "--zero-stage",
        default="auto",
        choices=["auto", "0", "1", "2", "3"],
        help="the trainer's engine.zero_stage; auto (default): what `mmdist plan` picks for this device",
    )
    parser.add_argument("--no-checkpointing", action="store_true")
    parser.add_argument("--plan", action="store_true",
                        help="run the micro-batch, checkpointing and ZeRO stage `mmdist plan` recommends on this "
                             "device for a global batch of --micro-batch samples (one micro-batch a step)")
    parser.add_argument("--packed-attention", choices=["auto", "sdpa_per_sample", "flex"], default=None,
                        help="model.llm.packed_attention, on sdpa (default: not set: the trainer's default kernel); "
                             "both sides run it, over the same packed rows")
    parser.add_argument("--device", default=None)
    parser.add_argument("--workers", type=int, default=None,
                        help="loader workers, default 4 (cpu: the trainer's auto, the CPUs less one; tiny: 2)")
    parser.add_argument("--workdir", help="where the demo shards and the run go (default: a temporary folder)")
    parser.add_argument("--json", help="also write the result here")
    args = parser.parse_args(argv)
    shape = "tiny" if args.tiny else "cpu" if args.cpu else "gpu"
    res = run(shape=shape, steps=args.steps or (8 if shape == "cpu" else 6),
              warmup=args.warmup or (2 if shape == "cpu" else 1), micro_batch=args.micro_batch, max_len=args.max_len,
              zero_stage=args.zero_stage if args.zero_stage == "auto" else int(args.zero_stage),
              checkpointing=not args.no_checkpointing, device=args.device, workdir=args.workdir, workers=args.workers,
              packed_attention=args.packed_attention, plan=args.plan)
    print(report(res), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
