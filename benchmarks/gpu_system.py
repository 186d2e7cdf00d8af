"""The trainer against its own model, in one run: tokens/s of each, their ratio, MFU/HFU, memory, a step breakdown.

At the Qwen-14B shape on one H200 the bare model (gpu_throughput.py) reached 34% MFU
with checkpointing while ``launch/train.py`` at ZeRO-3 reached ~16% (docs/benchmarks.md).
This benchmark runs both sides at the same shapes and the same real tokens per step:

1. **the training path**: ``mmdist.training.loop.train`` itself (DeepSpeed engine,
   ZeRO-3 by default, the webdataset loader with packing, the metrics, the step)
   on demo-digit shards written first (images at the tower's size), a config built
   like that run: configs/tiny_fuse.yaml with the Qwen-14B and CLIP
   ViT-L/14-336 shapes as ``init_config``, ``data.max_len=2048``, ``data.packing=true``,
   micro-batch 16 (one micro-batch per step), gradient checkpointing;
2. **the bare model**: the same FusedVLM built straight on the device, torch AdamW,
   no DeepSpeed, replaying the trainer's steps: step i gets rows that hold exactly
   the real tokens, images and answer tokens the trainer's step i held.

Both count FLOPs with the model's own ``flop_count()`` (the trainer's bar and
metrics.jsonl use it too): ``mfu`` is that count per second over the device peak;
``hfu`` adds the LLM forward that gradient checkpointing recomputes. Steady state
only: the first ``--warmup`` steps (at least the trainer's own warm-up step) are left
out of every figure. The trainer runs with ``MMDIST_STEP_PHASES=1``, so its step
times its phases (one synchronize per phase on a GPU: the breakdown is exact, the
step a little slower); the bare side times the same phases the same way. Under
ZeRO-3 the host time in DeepSpeed's per-module parameter fetch/release hooks (the
gathers included) is shown too, as a part of the forward and backward.

``--packed-attention {auto,sdpa_per_sample,flex}`` sets ``model.llm.packed_attention``
on both sides (mmdist/models/packed_attention.py) and runs both on sdpa (the packed
kernels replace sdpa's path; flash_attn is otherwise preferred where installed). The
bare rows are then packed too, holding as many samples as the trainer's step did, so
both sides run the same kernel over the same samples. Without the flag: the trainer's
default (auto) and one sample per bare row.

Run: ``python benchmarks/gpu_system.py`` on one GPU (6 steps a side at the reference
shapes; about 4 minutes on an H100/H200, most of it building the two 14B models);
``--tiny`` runs the same code at toy shapes on the CPU in well under a minute
(tests/benchmarks/test_gpu_system.py).
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
from pathlib import Path  # noqa: E402
from types import SimpleNamespace  # noqa: E402

import torch  # noqa: E402
import yaml  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout's mmdist, without install

from common import format_table, tiny_recipe  # noqa: E402
from gpu_throughput import CLIP_L_336, QWEN_14B, TINY_LLM, TINY_VISION, attention_kernel, device_peak  # noqa: E402

PHASES = ("data_wait", "to_device", "vision", "llm_forward", "backward", "optimizer", "host_sync", "logging", "other")
#: Shown below the phases, already inside them: host time in ZeRO-3's per-module parameter fetch and release hooks.
INSIDE = ("zero3_fetch_release",)


def run_config(
    tiny: bool,
    device: torch.device,
    workdir: Path,
    shards: str,
    *,
    micro_batch: int,
    max_len: int,
    steps: int,
    zero_stage: int | str,
    checkpointing: bool,
    peak: float,
    workers: int,
    packed_attention: str | None = None,
):
    """The reference run: tiny_fuse.yaml with the two shapes as init_config, packing, one micro-batch per step;
    ``packed_attention`` (when given) set as model.llm.packed_attention, on sdpa."""
    from mmdist.config.run import load_config

    recipe = tiny_recipe("fuse")
    llm_shape, vision_shape = (TINY_LLM, TINY_VISION) if tiny else (QWEN_14B, CLIP_L_336)
    half = "bf16" if device.type == "cuda" else "fp32"
    recipe["model"]["llm"].update(init_config=dict(llm_shape), dtype=half, gradient_checkpointing=checkpointing,
                                  attn_implementation=attention_kernel(device) if packed_attention is None else "sdpa")
    if packed_attention is not None:
        recipe["model"]["llm"]["packed_attention"] = packed_attention
    recipe["model"]["vision"].update(init_config=dict(vision_shape), dtype=half, select_layer=-2, select_tokens="patch")
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


def run_trainer(cfg, device: torch.device) -> tuple[list[dict], dict]:
    """``loop.train`` on the config; returns its metrics.jsonl train records and the run's peak memory."""
    from mmdist.materialize import build_run_model
    from mmdist.training.loop import train

    def builder(cfg, gather):
        model = build_run_model(cfg, gather=gather)
        time_vision(model, device)
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
                                                              "zero_stage": written["engine"]["zero_stage"]}


def peak_memory(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2**30  # the process's, both sides so far


def build_bare(cfg, device: torch.device) -> torch.nn.Module:
    """The same FusedVLM (cfg.model's shapes and connector), built straight on the device: no DeepSpeed, no loader."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from mmdist.models.freeze import torch_dtype
    from mmdist.models.fused import FusedVLM
    from mmdist.models.vision import VisionTower

    shape = dict(cfg.model.llm.init_config)
    config = AutoConfig.for_model(shape.pop("model_type"), **shape)
    config._attn_implementation = cfg.model.llm.attn_implementation
    torch.manual_seed(0)
    with torch.device(device):
        llm = AutoModelForCausalLM.from_config(config, dtype=torch_dtype(cfg.model.llm.dtype))
        vision = VisionTower(cfg.model.vision)
    processors = SimpleNamespace(image_token_id=config.vocab_size - 1, tokenizer=SimpleNamespace(pad_token_id=0))
    model = FusedVLM(cfg.model, processors, vision, llm).to(device)
    model.train()
    return model


def bare_batch(model, rows: int, tokens: int, images: int, supervised: int, device: torch.device,
               generator: torch.Generator, samples: int | None = None) -> dict:
    """``rows`` rows holding exactly ``tokens`` real tokens, ``images`` images and ``supervised`` answer tokens.

    Images are dealt round-robin to the rows, the text evenly; shorter rows are padded
    (attention mask 0), as the trainer's packed rows are. With ``samples`` the rows are
    packed: that many samples dealt round-robin to the rows, each row cut evenly before
    its answers (``sequence_ids``, ``position_ids`` restarting), so the packed-attention
    kernel sees as many samples as the trainer's (an image run may straddle a cut: the
    attention work is the same).
    """
    n_img = model.num_image_tokens
    text = tokens - images * n_img
    if text < rows or supervised > text - rows:
        raise ValueError(
            f"{tokens} tokens cannot hold {images} images of {n_img} tokens and {supervised} answers in {rows} rows"
        )
    vocab = model.llm.get_input_embeddings().weight.shape[0] - 1
    img_per_row = [images // rows + (r < images % rows) for r in range(rows)]
    text_per_row = [text // rows + (r < text % rows) for r in range(rows)]
    sup_per_row = [supervised // rows + (r < supervised % rows) for r in range(rows)]
    width = max(i * n_img + t for i, t in zip(img_per_row, text_per_row))
    ids = torch.zeros(rows, width, dtype=torch.long)
    labels = torch.full((rows, width), -100, dtype=torch.long)
    mask = torch.zeros(rows, width, dtype=torch.long)
    seq = torch.full((rows, width), -1, dtype=torch.long)
    pos = torch.zeros(rows, width, dtype=torch.long)
    for r in range(rows):
        row_text = torch.randint(0, vocab, (text_per_row[r],), generator=generator)
        pieces, lead = [], 1  # one text token before each image, the rest after the last
        for _ in range(img_per_row[r]):
            pieces += [row_text[:lead], torch.full((n_img,), model.image_token_id)]
            row_text = row_text[lead:]
        row = torch.cat(pieces + [row_text])
        ids[r, :len(row)] = row
        mask[r, :len(row)] = 1
        if sup_per_row[r]:  # the loss is on the next token: the answers are the row's last text tokens
            labels[r, len(row) - sup_per_row[r]:len(row)] = row[len(row) - sup_per_row[r]:]
        if samples is not None:  # cuts before the answers' preceding token, so the supervised count stays
            before = len(row) - sup_per_row[r]
            k = max(1, min(samples // rows + (r < samples % rows), before))
            cuts = [0] + [i * before // k for i in range(1, k)] + [len(row)]
            for i in range(k):
                seq[r, cuts[i]:cuts[i + 1]] = i
                pos[r, cuts[i]:cuts[i + 1]] = torch.arange(cuts[i + 1] - cuts[i])
    size = model.vision.image_size
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels,
             "pixel_values": torch.randn(images, 3, size, size, generator=generator)}
    if samples is not None:
        batch.update(sequence_ids=seq, position_ids=pos)
    return {k: v.to(device) for k, v in batch.items()}


def run_bare(cfg, device: torch.device, steps: list[dict], packed: bool = False) -> tuple[list[dict], dict]:
    """gpu_throughput's loop (forward, backward, AdamW) over batches replaying the trainer's ``steps``' counts
    (and with ``packed`` its samples, in packed rows)."""
    from mmdist.training.step import phases

    t0 = time.perf_counter()
    model = build_bare(cfg, device)
    build_s = time.perf_counter() - t0
    time_vision(model, device)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.train.lr,
                                  fused=device.type == "cuda")
    gen = torch.Generator().manual_seed(0)
    batches = [
        bare_batch(
            model,
            cfg.train.micro_batch_size,
            s["step_tokens"],
            s["step_images"],
            s["step_supervised_tokens"],
            device,
            gen,
            samples=s["step_samples"] if packed else None,
        )
        for s in steps
    ]
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
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        with phases.phase("host_sync"):
            value = float(loss.detach())
        seconds = time.perf_counter() - t
        counts = model.batch_counts(batch)
        out.append(
            {
                "step": step,
                "step_s": seconds,
                "loss": value,
                "step_tokens": counts.tokens,
                "step_images": counts.images,
                "step_samples": counts.samples,
                "step_supervised_tokens": counts.supervised_tokens,
                "step_image_tokens": counts.image_tokens,
                **{f"phase_{k}_s": v for k, v in phases.take().items()},
            }
        )
    memory = peak_memory(device)
    flops = model.flop_count()  # the structure the trainer built too: the FLOPs of both sides
    del model, optimizer, batches
    return out, {"peak_memory_gib": memory, "build_s": build_s, "flops": flops}


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


def run(
    tiny: bool = False,
    steps: int = 6,
    warmup: int = 1,
    micro_batch: int = 16,
    max_len: int = 2048,
    zero_stage: int | str = "auto",
    checkpointing: bool = True,
    device: str | None = None,
    workdir: str | None = None,
    workers: int | None = None,
    packed_attention: str | None = None,
) -> dict:
    from mmdist.data.shards import shard_pattern, write_demo_shards
    from mmdist.training.metrics import WARMUP_STEPS

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() and not tiny else "cpu"))
    warmup = max(warmup, WARMUP_STEPS)
    if steps <= warmup:
        raise ValueError(f"--steps {steps} must exceed the {warmup} warm-up step(s)")
    if packed_attention == "flex" and dev.type == "cpu":
        raise ValueError("--packed-attention flex trains on a GPU only: torch has no FlexAttention backward on CPU "
                         "(its CPU equality is tests/models/test_packed_attention_flex.py)")
    folder = Path(workdir or tempfile.mkdtemp(prefix="gpu_system_"))
    tower = (TINY_VISION if tiny else CLIP_L_336)["image_size"]
    image_tokens = (tower // (TINY_VISION if tiny else CLIP_L_336)["patch_size"]) ** 2
    samples = steps * micro_batch * max(1, max_len // (image_tokens + 8)) + 64  # enough for every packed row
    written = write_demo_shards(folder / "demo", image_size=tower, samples_per_shard=200, overwrite=True,
                                limit=min(samples, 1400))
    peak, peak_source = device_peak(dev, torch.bfloat16 if dev.type == "cuda" else torch.float32)
    cfg = run_config(tiny, dev, folder, shard_pattern(written["train"]), micro_batch=micro_batch, max_len=max_len,
                     steps=steps, zero_stage=zero_stage, checkpointing=checkpointing, peak=peak,
                     workers=2 if tiny and workers is None else (4 if workers is None else workers),
                     packed_attention=packed_attention)

    trainer_steps, trainer_info = run_trainer(cfg, dev)
    resolved_stage = trainer_info.pop("zero_stage")
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    bare_steps, bare_info = run_bare(cfg, dev, trainer_steps, packed=packed_attention is not None)

    steady_t = [s for s in trainer_steps if s["step"] > warmup]
    steady_b = [s for s in bare_steps if s["step"] > warmup]
    times = [r["time"] for r in trainer_steps]
    # record to record: the loop's period
    trainer_seconds = [times[i] - times[i - 1] for i in range(warmup, len(times))]
    bare_model_flops = bare_info.pop("flops")
    trainer = side_summary(steady_t, trainer_seconds, bare_model_flops, peak, checkpointing)
    bare = side_summary(steady_b, [s["step_s"] for s in steady_b], bare_model_flops, peak, checkpointing)
    trainer.update(trainer_info, reported_tokens_per_s=steady_t[-1]["tokens_per_s"], reported_mfu=steady_t[-1]["mfu"],
                   reported_mfu_steady_from_step=steady_t[-1]["mfu_steady_from_step"])
    bare.update(bare_info)
    return {
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "shapes": "tiny" if tiny else "Qwen-14B + CLIP ViT-L/14-336", "zero_stage": resolved_stage,
        "zero_stage_setting": zero_stage,
        "checkpointing": checkpointing, "micro_batch": micro_batch, "max_len": max_len, "steps": steps,
        "packed_attention": cfg.model.llm.packed_attention, "packed_attention_flag": packed_attention,
        "attn_implementation": cfg.model.llm.attn_implementation, "bare_rows_packed": packed_attention is not None,
        "warmup_steps": warmup, "peak_flops": peak, "peak_source": peak_source,
        "trainer": trainer, "bare": bare, "ratio": trainer["tokens_per_s"] / bare["tokens_per_s"],
    }


def report(res: dict) -> str:
    """The printed result: one line per figure (``name  trainer  bare``), then the step breakdown table."""
    t, b = res["trainer"], res["bare"]
    rows = "both sides, bare rows packed" if res["bare_rows_packed"] else "trainer only, bare rows one sample each"
    lines = [
        f"device  {res['device']}  ({res['shapes']}, ZeRO-{res['zero_stage']} "
        f"({res.get('zero_stage_setting')}), micro-batch {res['micro_batch']}, "
        f"max_len {res['max_len']}, checkpointing {res['checkpointing']}, peak {res['peak_flops']:.4g} FLOP/s "
        f"from {res['peak_source']}, attention {res['attn_implementation']}, packed attention {res['packed_attention']}"
        f" ({rows}))",
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
        f"peak_memory_gib  {t['peak_memory_gib']:.3f}  {b['peak_memory_gib']:.3f}",
        f"step_s  {t['step_s']:.6g}  {b['step_s']:.6g}",
        "",
    ]
    rows = [{"phase (s/step)": k, "trainer": t["breakdown_s"][k], "bare": b["breakdown_s"][k]} for k in PHASES]
    rows += [{"phase (s/step)": f"({k}, inside the above)", "trainer": t["breakdown_s"][k], "bare": b["breakdown_s"][k]}
             for k in INSIDE]
    lines.append(format_table(rows, ["phase (s/step)", "trainer", "bare"]))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="toy shapes on the CPU (the test mode)")
    parser.add_argument("--steps", type=int, default=6, help="steps a side, warm-up included")
    parser.add_argument(
        "--warmup", type=int, default=1, help="steps left out of every figure (at least the trainer's 1)"
    )
    parser.add_argument("--micro-batch", type=int, default=None, help="rows per step, default 16 (tiny: 2)")
    parser.add_argument("--max-len", type=int, default=None, help="packed row length, default 2048 (tiny: 128)")
    parser.add_argument(
        "--zero-stage",
        default="auto",
        choices=["auto", "0", "1", "2", "3"],
        help="the trainer's engine.zero_stage; auto (default): what `mmdist plan` picks for this device",
    )
    parser.add_argument("--no-checkpointing", action="store_true")
    parser.add_argument("--packed-attention", choices=["auto", "sdpa_per_sample", "flex"], default=None,
                        help="model.llm.packed_attention on both sides, on sdpa, with the bare rows packed like the "
                             "trainer's (default: not set: the trainer's auto, bare rows one sample each)")
    parser.add_argument("--device", default=None)
    parser.add_argument("--workers", type=int, default=None, help="loader workers, default 4 (tiny: 2)")
    parser.add_argument("--workdir", help="where the demo shards and the run go (default: a temporary folder)")
    parser.add_argument("--json", help="also write the result here")
    args = parser.parse_args(argv)
    res = run(
        tiny=args.tiny,
        steps=args.steps,
        warmup=args.warmup,
        micro_batch=args.micro_batch or (2 if args.tiny else 16),
        max_len=args.max_len or (128 if args.tiny else 2048),
        zero_stage=args.zero_stage if args.zero_stage == "auto" else int(args.zero_stage),
        checkpointing=not args.no_checkpointing,
        device=args.device,
        workdir=args.workdir,
        workers=args.workers,
        packed_attention=args.packed_attention,
    )
    print(report(res), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
