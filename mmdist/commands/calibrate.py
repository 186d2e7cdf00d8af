"""``mmdist plan --calibrate``: measure this machine's rates for the step-time model on ``--gpus`` local ranks.

Three launches of ``world`` local ranks (``torch.distributed.run``): the all-gather probe,
then ``mmdist train`` on the config at ZeRO-1 and at ZeRO-3 for a few steps each (the phase
timer on; no evaluation or export; a scratch run folder that is deleted afterwards). Both
trainer runs get the dtypes the config resolves to at ZeRO-3 on this device, so that they
compute alike. mmdist.plan.calibration turns the measurements into rates and this module
writes them with the raw figures. Run it on the node the job will use, with the recipe the
job will run (shrunk with overrides if it must be quick: the rates are per FLOP, per byte,
per module fetch, so they carry over to the full shape; benchmarks/step_time_model.py checks
how well).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Optional

from mmdist.config.run import RunConfig, load_config
from mmdist.launch_env import free_port
from mmdist.plan.calibration import (
    collective_probe,
    fit,
    layer_probe,
    machine_label,
    pooled,
    save_calibration,
    steady_phases,
)
from mmdist.plan.lengths import batch_tokens
from mmdist.plan.shapes import model_shapes
from mmdist.plan.speed import record_flops, step_inputs
from mmdist.plan.step_time import Calibration
from mmdist.precision import PART_KEYS, resolve_precision

__all__ = ["calibrate", "leg_overrides", "pinned_precision"]


def _device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def pinned_precision(cfg: RunConfig, device: str) -> list[str]:
    """Overrides that fix the engine precision and part dtypes to what the config resolves to at ZeRO-3 here."""
    at3 = dataclasses.replace(cfg, engine=dataclasses.replace(cfg.engine, zero_stage=3))
    resolved = resolve_precision(at3, device)[0]
    out = [f"engine.precision={resolved.engine.precision}"]
    for name, key in PART_KEYS.items():
        out.append(f"{key}={getattr(resolved.model, name).dtype}")
    return out


def leg_overrides(stage: int, steps: int, run_dir: Path) -> list[str]:
    """What a calibration run changes in the config: the ZeRO stage, a few steps, nothing kept."""
    return [f"engine.zero_stage={stage}", f"train.max_steps={steps}", f"run_dir={run_dir}", "data.eval=[]",
            "train.eval_every=0", "checkpoint.save_every=0", "checkpoint.export=false", "checkpoint.resume=never",
            "log.log_every=1"]


def _launch(world: int, module_args: list[str], env: dict, what: str) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(world), "--master_port",
           str(free_port()), *module_args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode:
        cause = rank_error(proc.stderr)
        raise RuntimeError(f"calibration {what} failed (exit {proc.returncode})" + (f": {cause}" if cause else "")
                           + f"\n{' '.join(cmd)}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")


def rank_error(stderr: str) -> str:
    """The last exception line a rank printed (``[rank0]: FileNotFoundError: ...``), without the rank prefix; the
    launcher's own traceback follows it and would push it out of a shortened message."""
    line = re.compile(r"^(?:\[rank\d+\]:\s*)?((?:[\w.]+\.)?\w*(?:Error|Exception|Interrupt)\b: .*)$", re.MULTILINE)
    found = [m.group(1) for m in line.finditer(stderr) if "ChildFailedError" not in m.group(1)]
    return found[-1].strip() if found else ""


def calibrate(config: str, overrides: Sequence[str], world: int, out: str | Path, steps: int = 8,
              log=print, repeats: int = 1) -> tuple[Calibration, dict]:
    """Measure on ``world`` local ranks and write the calibration to ``out``; (the calibration, the raw figures).

    ``repeats``: the ZeRO-1 and ZeRO-3 runs each that many times, in rounds (1, 3, 1, 3, ...), pooled: a machine
    whose speed moves from one process start to the next (a shared or throttled host) moves the rates less."""
    if repeats < 1:
        raise ValueError(f"calibration repeats must be at least 1, got {repeats}")
    device = _device()
    cfg = load_config(config, list(overrides))
    pins = pinned_precision(cfg, device)
    env = dict(os.environ, MMDIST_STEP_PHASES="1", PYTHONUNBUFFERED="1")
    if device == "cpu":
        env.setdefault("DS_ACCELERATOR", "cpu")
    scratch = Path(tempfile.mkdtemp(prefix="mmdist-calibrate-"))
    try:
        log(f"calibrating on {world} rank(s) of {machine_label(device)}: all-gather probe")
        probe_file = scratch / "probe.json"
        dtype = next(p for p in pins if p.startswith("engine.precision=")).partition("=")[2]
        _launch(world, ["-m", "mmdist.commands.calibrate", "--probe", str(probe_file), "--dtype", dtype], env,
                "all-gather and layer probes")
        probed = json.loads(probe_file.read_text())
        probe = {int(k): v for k, v in probed["all_gather"].items()}
        layers = {int(k): v for k, v in probed["layers"].items()}
        planned = load_config(config, [*overrides, *pins, "engine.zero_stage=1"])
        shapes = model_shapes(planned)
        ckpt = bool(planned.stage.llm_checkpointing(planned.model))

        def flops_of(record: dict) -> float:
            train, recompute = record_flops(shapes, record, world)
            return train + (recompute if ckpt else 0.0)

        legs: dict[int, list] = {1: [], 3: []}
        for round_ in range(repeats):
            for stage in (1, 3):
                log(f"calibrating: the trainer at ZeRO-{stage}, {steps} steps"
                    + (f" (round {round_ + 1} of {repeats})" if repeats > 1 else ""))
                run_dir = scratch / f"zero{stage}-{round_}"
                args = ["-m", "mmdist", "train", "--config", str(config), *overrides, *pins,
                        *leg_overrides(stage, steps, run_dir)]
                _launch(world, args, env, f"run at ZeRO-{stage}")
                records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
                legs[stage].append(steady_phases(records, flops_of=flops_of))
        phases = {stage: pooled(runs) for stage, runs in legs.items()}
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    inputs = step_inputs(planned, shapes, world, machine_label(device), tokens=batch_tokens(planned, shapes))
    machine = machine_label(device)
    cal = fit(inputs, world, phases[1], phases[3], probe, ckpt, device, machine, layers)
    raw = {"world": world, "device": device, "config": str(config), "overrides": [*overrides, *pins],
           "all_gather_s": {str(k): v for k, v in probe.items()}, "layer_flops": {str(k): v for k, v in layers.items()},
           "zero1": dataclasses.asdict(phases[1]), "zero3": dataclasses.asdict(phases[3]),
           "runs": {f"zero{stage}": [dataclasses.asdict(r) for r in runs] for stage, runs in legs.items()},
           "step_flops": phases[1].flops,  # per rank, the mean of the steps timed
           "planned_step_flops": inputs.model_flops + (inputs.recompute_flops if ckpt else 0.0),
           "modules": inputs.modules, "trainable_params": inputs.trainable_params}
    save_calibration(cal, out, raw)
    return cal, raw


def _probe_rank(out: str, dtype: str) -> int:
    """One rank of the all-gather and layer probes (``python -m mmdist.commands.calibrate --probe OUT`` under
    torchrun); ``dtype``: the engine precision the runs compute in."""
    import torch

    from mmdist import distributed as dist

    env = dist.init()
    device = torch.device(f"cuda:{env.local_rank}" if torch.cuda.is_available() else "cpu")
    try:
        figures = collective_probe(env.world_size, device)
        layers = layer_probe(device, {"bf16": torch.bfloat16, "fp16": torch.float16}.get(dtype, torch.float32))
        if env.rank == 0:
            Path(out).write_text(json.dumps({"all_gather": {str(k): v for k, v in figures.items()},
                                             "layers": {str(k): v for k, v in layers.items()}}))
    finally:
        dist.shutdown()
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m mmdist.commands.calibrate")
    parser.add_argument("--probe", required=True, help="where rank 0 writes the probes' figures")
    parser.add_argument("--dtype", default="fp32", help="the layer probe's dtype (the engine precision)")
    args = parser.parse_args(argv)
    return _probe_rank(args.probe, args.dtype)


if __name__ == "__main__":
    sys.exit(main())
