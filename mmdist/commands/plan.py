"""`mmdist plan --config C`: predict per-GPU memory and step time for each ZeRO stage before submitting a job."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from mmdist.config.run import load_config
from mmdist.plan import (
    IMAGES_PER_CORE,
    deepspeed_estimates,
    estimate,
    format_plan,
    input_line,
    model_shapes,
    parse_bytes,
    resolve_auto_for_gpu,
)
from mmdist.plan.auto import ZERO0_HALF_PRECISION, auto_candidates, auto_reason
from mmdist.plan.calibration import CALIBRATION_ENV, load_calibration
from mmdist.plan.lengths import batch_tokens
from mmdist.plan.micro_batch import fastest_split, micro_batch_sizes
from mmdist.plan.quantized import plan_lines
from mmdist.plan.report import setting_overrides
from mmdist.plan.shapes import GiB
from mmdist.plan.speed import choose, step_inputs
from mmdist.plan.step_time import interconnect_for, scaling_table
from mmdist.settings import ConfigError


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="mmdist plan", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="YAML run config (nothing is loaded but the model configs)")
    parser.add_argument("--gpus", type=int, default=None, help="data-parallel ranks (default: 8)")
    parser.add_argument("--gpu-memory", default="80GB", help="memory per GPU, e.g. 80GB, 141GB (GB = GiB)")
    parser.add_argument(
        "--reserve", default="1.5GB", help="per-GPU memory kept back for the CUDA context and allocator"
    )
    parser.add_argument(
        "--no-deepspeed", action="store_true", help="skip DeepSpeed's own estimators (avoids importing it)"
    )
    parser.add_argument(
        "--gpu", default="H100 SXM", help="GPU model for the input estimate (a datasheet name, e.g. H100, A100, L40S)"
    )
    parser.add_argument("--gpus-per-node", type=int, default=8, help="GPUs per node (input and step-time estimates)")
    parser.add_argument(
        "--intra-gbps",
        type=float,
        default=None,
        help="NCCL bus bandwidth per GPU inside a node, GB/s (default: from --gpu, e.g. 360 for H100/H200 NVLink)",
    )
    parser.add_argument(
        "--inter-gbps",
        type=float,
        default=None,
        help="NCCL bus bandwidth per GPU across nodes, GB/s (default: from --gpu, e.g. 40 for one 400G NIC per GPU)",
    )
    parser.add_argument("--pcie-gbps", type=float, default=None,
                        help="host <-> GPU copies per GPU for offload, GB/s (default 25, a PCIe Gen4 x16 figure, "
                             "not a measurement)")
    parser.add_argument("--data", nargs="+", default=None, metavar="SHARDS",
                        help="shard patterns whose stats.json sizes the micro-batch (default: the config's data.train; "
                             "without statistics: data.mean_tokens_per_sample, else full data.max_len rows)")
    parser.add_argument(
        "--cpus-per-node", type=int, default=0, help="CPU cores per node; warns when they cannot feed the GPUs"
    )
    parser.add_argument(
        "--images-per-core", type=float, default=IMAGES_PER_CORE, help="measured loader images/s per core"
    )
    parser.add_argument("--calibrate", metavar="OUT", default=None,
                        help="measure this node's rates for the step-time model on --gpus local ranks (default 1) "
                             "with this config (a few steps at ZeRO-1 and ZeRO-3), write them to OUT (JSON) and stop")
    parser.add_argument("--calibrate-steps", type=int, default=8, help="steps per calibration run (default 8)")
    parser.add_argument("--calibrate-repeats", type=int, default=1,
                        help="runs of each calibration setting, pooled (default 1; 2 or more on a host whose speed "
                             "moves between runs)")
    parser.add_argument("--calibration", metavar="FILE", default=os.environ.get(CALIBRATION_ENV) or None,
                        help="predict step times with the rates in FILE (from --calibrate; default $"
                             f"{CALIBRATION_ENV}, else the shipped defaults, printed as such)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.micro_batch_size=4")
    args = parser.parse_args(list(argv))
    if args.calibrate:
        return _calibrate(args)
    try:
        calibration = load_calibration(args.calibration) if args.calibration else None
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
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
    try:
        tokens = batch_tokens(cfg, shapes, args.data)
    except (OSError, ValueError, KeyError) as exc:
        print(f"error: cannot plan from the shards' statistics ({args.data or 'data.train'}): {exc}", file=sys.stderr)
        return 2
    estimates = estimate(cfg, shapes, world, reserve_bytes=reserve, tokens=tokens)
    ds = None if args.no_deepspeed else deepspeed_estimates(shapes, world)
    link = interconnect_for(args.gpu, args.intra_gbps, args.inter_gbps, args.gpus_per_node, args.pcie_gbps)
    inputs = step_inputs(cfg, shapes, world, args.gpu, tokens=tokens, calibration=calibration)
    configured_ckpt = bool(cfg.stage.llm_checkpointing(cfg.model))
    half = cfg.engine.precision in ("bf16", "fp16")  # no ZeRO-0 then: see mmdist.plan.auto.ZERO0_HALF_PRECISION
    usable = [e for e in estimates if not (half and e.setting.zero_stage == 0)]
    fastest, _ = choose(usable, inputs, world, link, budget, [False, True] if cfg.stage.builds("llm") else [False])
    if auto_note:
        print(auto_note)
    print(format_plan(cfg, shapes, estimates, world, budget, ds, fastest if fastest.fits else None, tokens))
    for line in plan_lines(cfg, shapes, estimates, budget):  # quantized frozen bytes, or the quantization that fits
        print(line)
    if half:
        print(f"  (not recommended: {ZERO0_HALF_PRECISION})")
    auto_settings = {s.label for s in auto_candidates(cfg, cfg.engine.precision)}
    auto_pick, auto_all = choose([e for e in estimates if e.setting.label in auto_settings], inputs, world, link,
                                 budget, [configured_ckpt])
    print(f"engine.zero_stage=auto on {world} GPU(s) of this size picks ZeRO-{auto_pick.setting.zero_stage} "
          f"(gradient_checkpointing={str(configured_ckpt).lower()} as configured"
          f"{'' if auto_pick.fits else '; nothing fits, the least memory'})")
    print("  why: " + auto_reason(auto_pick, auto_all, budget, f"--gpu-memory {args.gpu_memory}", world, tokens))
    per_pass = cfg.train.micro_batch_size * world
    if cfg.train.global_batch_size < per_pass:
        print(
            f"\nnote: train.global_batch_size={cfg.train.global_batch_size} "
            f"is smaller than micro-batch x GPUs = {per_pass}: "
            f"the trainer refuses it on {world} GPU(s); the times below assume one micro-batch per rank"
        )
    for ckpt in sorted({fastest.checkpointing, configured_ckpt}):
        fitting = sorted({e.setting.zero_stage for e in estimates
                          if not (e.setting.offload_optimizer or e.setting.offload_params) and e.total(ckpt) <= budget})
        print("")
        if not fitting:
            print(f"step time (gradient_checkpointing={str(ckpt).lower()}): no setting without offload fits")
            continue
        print(f"step time of the stages that fit on {world} GPU(s), gradient_checkpointing={str(ckpt).lower()} "
              f"({inputs.micro_batches} micro-batch(es) of {cfg.train.micro_batch_size} samples, "
              f"{tokens.positions:,.0f} positions, per rank "
              f"and step: {(inputs.model_flops + (inputs.recompute_flops if ckpt else 0)) / 1e12:,.0f} TFLOP by the "
              "progress bar's formula, recomputation included):")
        print("\n".join(scaling_table(inputs, fitting, link, ckpt, worlds=(1, 8, 64, 512))))
    if cfg.stage.builds("llm"):
        print("")
        print("\n".join(split_lines(cfg, shapes, world, args, link, budget, [e.setting for e in usable], reserve,
                                    calibration)))
    if not cfg.data.feature_cache:
        print("\n".join(input_line(shapes, args.gpu, args.gpus_per_node, args.cpus_per_node, args.images_per_core)))
    return 0


def split_lines(cfg, shapes, world: int, args: argparse.Namespace, link, budget: int, settings, reserve: int,
                calibration) -> list[str]:
    """The micro-batch and checkpointing that run the global batch fastest (mmdist.plan.micro_batch), as a table of
    the best setting per micro-batch and the overrides of the fastest."""
    best, splits = fastest_split(cfg, shapes, world, args.gpu, link, budget, settings, reserve, calibration, args.data)
    head = (f"micro-batch and checkpointing: the global batch of {cfg.train.global_batch_size} on {world} GPU(s) as "
            "micro-batch x accumulation x GPUs (the optimisation is the same; speed and memory are not)")
    if not micro_batch_sizes(cfg, world):
        return [head, f"  {world} GPU(s) cannot share {cfg.train.global_batch_size} samples evenly: the trainer "
                      "refuses that; run on a number of GPUs that divides the global batch"]
    if best is None:
        return [head, "  no micro-batch that divides a GPU's share fits, with or without checkpointing"]
    lines = [head, f"{'micro-batch':>11} {'accum':>5} {'ckpt':>5}  {'setting':<24}{'GiB':>7}{'s/step':>8}"
                   f"{'tokens/s/GPU':>13}"]
    configured = next((s for s in splits if s.micro_batch == cfg.train.micro_batch_size), None)
    for split in splits:
        c = split.choice
        mark = "  <- fastest" if split is best else ""
        mark += "  (configured)" if split is configured else ""
        tokens = split.tokens.tokens * split.accumulation / split.step_s
        lines.append(f"{split.micro_batch:>11} {split.accumulation:>5} {str(c.checkpointing).lower():>5}  "
                     f"{c.setting.label:<24}{c.estimate.total(c.checkpointing) / GiB:>7.1f}{split.step_s:>8.3g}"
                     f"{tokens:>13,.0f}{mark}")
    lines.append(f"recommended: {best.label}: {best.step_s:.3g} s/step predicted"
                 + (f" (configured micro-batch {configured.micro_batch}: best {configured.step_s:.3g} s/step)"
                    if configured else ""))
    lines.append(f"  overrides: train.micro_batch_size={best.micro_batch} "
                 + setting_overrides(best.choice.setting, best.choice.checkpointing))
    return lines


def _calibrate(args: argparse.Namespace) -> int:
    """``--calibrate OUT``: measure, write, print the rates and where each came from."""
    from mmdist.commands.calibrate import calibrate

    try:
        cal, _ = calibrate(args.config, args.overrides, args.gpus or 1, args.calibrate, steps=args.calibrate_steps,
                           repeats=args.calibrate_repeats)
    except (ConfigError, ValueError, RuntimeError, OSError) as exc:
        print(f"error: calibration failed: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {args.calibrate}: rates of {cal.machine} on {cal.world} rank(s)")
    for name, source in cal.sources.items():
        value = getattr(cal, name)
        shown = (", ".join(f"{w}: {f / 1e9:.3g}G" for w, f in value.items()) if isinstance(value, dict)
                 else f"{value:.4g}")
        print(f"  {name:<18} {shown:<12} {source}")
    print(f"use it: mmdist plan --calibration {args.calibrate} ..., or {CALIBRATION_ENV}={args.calibrate} for "
          "engine.zero_stage=auto at start-up")
    return 0
