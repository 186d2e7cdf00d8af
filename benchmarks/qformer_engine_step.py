"""The demo's Q-Former stage-1 step as the trainer runs it: engine precision x CPU memory setting, side by side.

Builds the demo's Q-Former stage 1 (configs/demo_align.yaml with ``mmdist demo --connector qformer``'s overrides,
``--set`` adds more) in a DeepSpeed engine, and times ``train_step`` (forward, backward, the engine's optimizer step)
on one batch of the feature cache's shape. Each variant runs in its own process, which sets glibc's malloc as a
training process's entry point does (``engine.cpu_keep_freed_memory``, mmdist/training/cpu_memory.py: once per
process), the variants taking turns for ``--rounds`` rounds so that a shared machine's drifting load hits them
alike. Prints each variant's median seconds per step, CPU seconds per step, page faults per step, and resident
memory.

    python benchmarks/qformer_engine_step.py [--precision fp32 bf16] [--memory default keep] [--rounds 2]
        [--engine NAME=KEY=VALUE[,KEY=VALUE...] ...]

``--engine`` adds variants that differ in settings (say ``zero0=engine.zero_stage=0``); ``recipe`` (no change) is
always one of them.

bf16 pays only on a CPU with native bf16 (``avx512_bf16``, AMX): elsewhere it is emulated and far slower.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the checkout's mmdist, without install
os.environ.setdefault("DS_ACCELERATOR", "cpu")


def one_variant(precision: str, memory: str, steps: int, threads: int, overrides: list[str]) -> dict:
    """Build the engine in this process and time ``steps`` train steps after two warm-up steps."""
    import tempfile

    import torch

    from mmdist import distributed as dist
    from mmdist.commands.demo import CONNECTORS
    from mmdist.config.recipes import packaged_recipes
    from mmdist.config.run import load_config
    from mmdist.precision import resolve_precision
    from mmdist.training import cpu_memory
    from mmdist.training.engine import build_engine
    from mmdist.training.step import TrainState, train_step

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from qformer_step import demo_batch

    torch.set_num_threads(threads)
    dist.init(dist.discover(argv=[], environ={}), backend="gloo", timeout_s=60)
    run_dir = tempfile.mkdtemp(prefix="qformer_engine_step_")
    over = [*CONNECTORS["qformer"][0], f"engine.precision={precision}", f"run_dir={run_dir}",
            f"engine.cpu_keep_freed_memory={str(memory == 'keep').lower()}", *overrides]
    cfg, _ = resolve_precision(load_config(packaged_recipes() / "demo_align.yaml", over), "cpu")
    cpu_memory.for_training_process(cfg.engine)  # as `mmdist train` does, before the model is built
    torch.manual_seed(0)
    bundle = build_engine(cfg, world_size=1)
    model = bundle.model
    model.vision_dtype_for_cache = next(model.vision.parameters()).dtype  # the cache holds the tower's dtype
    b = demo_batch(model, cfg.train.micro_batch_size)
    batch = {"image_features": b["image_features"], "text_input_ids": b["ids"], "text_attention_mask": b["mask"],
             "caption_group": b["group"]}
    batches, state = itertools.repeat(batch), TrainState()
    for _ in range(2):
        train_step(bundle.engine, batches, state, max_nonfinite_steps=1)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(steps):
        record = train_step(bundle.engine, batches, state, max_nonfinite_steps=1)
    out = {"s_per_step": (time.perf_counter() - wall) / steps, "cpu_s_per_step": (time.process_time() - cpu) / steps,
           "faults_per_step": (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / steps,
           "max_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "loss": float(record["loss"])}
    bundle.close()
    dist.shutdown()
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--precision", nargs="+", default=["fp32"], choices=["fp32", "bf16"])
    parser.add_argument("--memory", nargs="+", default=["default", "keep"], choices=["default", "keep"],
                        help="glibc's malloc as it comes, or keeping freed memory (engine.cpu_keep_freed_memory)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=4, help="timed steps per turn")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--set", action="append", default=[], help="stage-1 recipe override (repeatable)")
    parser.add_argument("--engine", action="append", default=[], metavar="NAME=KEY=VALUE[,KEY=VALUE...]",
                        help="a variant with these settings besides the recipe's (repeatable)")
    parser.add_argument("--one", nargs=2, metavar=("PRECISION", "MEMORY"), help=argparse.SUPPRESS)  # a variant's turn
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(one_variant(*args.one, args.steps, args.threads, args.set)))
        return 0
    engines = {"recipe": []}
    for spec in args.engine:
        name, _, settings = spec.partition("=")
        if not name or "=" not in settings:
            parser.error(f"--engine {spec!r}: use NAME=KEY=VALUE[,KEY=VALUE...]")
        engines[name] = settings.split(",")
    variants = list(itertools.product(args.precision, args.memory, engines))
    results: dict[tuple[str, str, str], list[dict]] = {v: [] for v in variants}
    for r in range(args.rounds):
        for precision, memory, engine in variants:
            sets = [*args.set, *engines[engine]]
            cmd = [sys.executable, __file__, "--one", precision, memory, "--steps", str(args.steps),
                   "--threads", str(args.threads), *itertools.chain.from_iterable(("--set", s) for s in sets)]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode:
                print(done.stderr[-3000:], file=sys.stderr)
                return done.returncode
            result = json.loads(done.stdout.strip().splitlines()[-1])
            results[precision, memory, engine].append(result)
            print(f"round {r + 1}: {precision} {memory} {engine}: {result['s_per_step']:.3f} s/step, "
                  f"{result['faults_per_step']:.0f} faults/step, load {os.getloadavg()[0]:.1f}", flush=True)
    print(f"\nQ-Former stage-1 train step through the engine (the demo's batch, {args.threads} torch threads), "
          f"load average {os.getloadavg()[0]:.1f}")
    for name, settings in engines.items():
        print(f"  {name}: {', '.join(settings) or 'the recipe as shipped'}")
    print(f"{'precision':10s}{'memory':9s}{'engine':12s}{'median s/step':>14s}{'CPU s/step':>12s}{'faults/step':>13s}"
          f"{'max RSS GB':>12s}{'loss':>8s}")
    for (precision, memory, engine), runs in results.items():
        median = {key: statistics.median(run[key] for run in runs)
                  for key in ("s_per_step", "cpu_s_per_step", "faults_per_step")}
        print(f"{precision:10s}{memory:9s}{engine:12s}{median['s_per_step']:14.3f}{median['cpu_s_per_step']:12.3f}"
              f"{median['faults_per_step']:13.0f}{max(run['max_rss_gb'] for run in runs):12.2f}"
              f"{runs[-1]['loss']:8.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
