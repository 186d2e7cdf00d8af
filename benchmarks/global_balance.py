"""Splitting the global batch by predicted cost against splitting it by sample count, on 4 gloo ranks.

    python benchmarks/global_balance.py [--out runs/bench-balance] [--steps 10] [--per-rank 16]

configs/tiny_fuse.yaml on a skewed mixture (``mmdist.data.shards.mixture_samples``:
text only, one image, one image in 5 rows with tiling (base + 2x2 tiles), three
images), ``data.image_tiling`` on, the global order, 4 ranks, global batch
4 x per-rank samples in micro-batches of 4, ZeRO-2, fp32. Two runs: ``data.balance``
true and false (equal sample counts per rank and micro-batch). Per run, from
``metrics.jsonl`` over the steps after the first: the per-rank predicted cost
max/mean (mean and worst step), the seconds ranks waited at the step's all-reduces
(mean over ranks, and the rank that waited longest; mmdist/training/step.py says
how they are timed) and the step time.

Then, from the predicted costs of the mixture's samples as the loader priced them,
what max/mean a step with the same samples per rank has at 64 and 512 ranks: global
batches drawn at random from those costs, split both ways, and the share of a step
the average rank spends waiting for the slowest, ``1 - mean/max``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WORLD = 4
MICRO = 4


def _leg(spec_file: str) -> None:
    """One run, as a torchrun rank (``--leg SPEC``)."""
    from mmdist.config.run import load_config
    from mmdist.training.loop import train

    spec = json.loads(Path(spec_file).read_text())
    train(load_config(base=spec["config"]))


def _run(out: Path, name: str, recipe: dict) -> list[dict]:
    from mmdist.launch_env import free_port

    spec = out / f"{name}.json"
    spec.write_text(json.dumps({"config": recipe}))
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        str(WORLD),
        "--master_port",
        str(free_port()),
        str(Path(__file__).resolve()),
        "--leg",
        str(spec),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{name} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    lines = (Path(recipe["run_dir"]) / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r.get("split") == "train" and "loss" in r]


def _measured(records: list[dict]) -> dict:
    steady = records[1:]  # the first step pays for start-up (workers, the first exchange)
    times = [b["time"] - a["time"] for a, b in zip(records, records[1:])]
    return {"imbalance": statistics.mean(r["cost_imbalance"] for r in steady),
            "worst": max(r["cost_imbalance"] for r in steady),
            "wait": statistics.mean(r["allreduce_wait_s"] for r in steady),
            "wait_max": statistics.mean(r["allreduce_wait_max_s"] for r in steady),
            "step": statistics.median(times)}


def _sample_costs(recipe: dict, count: int) -> list[float]:
    """The loader's predicted cost of the first ``count`` samples of the run (one process reads every stream)."""
    from mmdist.config.run import load_config
    from mmdist.data.loader import build_loader
    from mmdist.materialize import build_run_model

    cfg = load_config(base=recipe)
    model = build_run_model(cfg)
    loader = build_loader(cfg, model.processors, "train", 0, 1)
    costs: list[float] = []
    data = loader.dataset
    data.hosted = list(range(data.streams))
    for item in data:
        costs += [sample["__cost__"] for _, _, sample in item["samples"]]
        if len(costs) >= count:
            return costs[:count]
    return costs


def _projected(costs: list[float], ranks: int, per_rank: int, trials: int, seed: int = 0) -> dict:
    from mmdist.data.balance import loads_of, split_global_batch
    from mmdist.data.cost import imbalance

    rng = random.Random(seed)
    accumulation = per_rank // MICRO
    out = {"balanced": [], "count": []}
    for _ in range(trials):
        batch = [rng.choice(costs) for _ in range(ranks * per_rank)]
        hosts = [i % ranks for i in range(len(batch))]
        for name, by_cost in (("balanced", True), ("count", False)):
            split = split_global_batch(batch, ranks, accumulation, hosts=hosts, by_cost=by_cost)
            out[name].append(imbalance(loads_of(split, batch, ranks, accumulation)[0]))
    return {name: statistics.mean(values) for name, values in out.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="runs/bench-balance")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--per-rank", type=int, default=16, help="samples per rank and step (a multiple of 4)")
    parser.add_argument("--trials", type=int, default=5, help="random global batches per projected world size")
    parser.add_argument("--leg", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.leg:
        return _leg(args.leg)
    import yaml

    from mmdist.data.shards import mixture_samples, shard_pattern, write_shards

    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    samples = WORLD * args.per_rank * args.steps
    summary = write_shards(
        mixture_samples(samples), out / "mixture", prefix="train", samples_per_shard=16, overwrite=True
    )
    recipe = yaml.safe_load((REPO / "configs" / "tiny_fuse.yaml").read_text())
    recipe["data"].update(
        {
            "train": [{"shards": [shard_pattern(summary)]}],
            "eval": [],
            "num_workers": 1,
            "max_len": 512,
            "order": "global",
            "image_tiling": {"enabled": True},
            "shuffle_buffer": 64,
        }
    )
    recipe["train"].update(
        {
            "max_steps": args.steps,
            "global_batch_size": WORLD * args.per_rank,
            "micro_batch_size": MICRO,
            "eval_every": 0,
        }
    )
    recipe["engine"].update({"zero_stage": 2, "precision": "fp32"})
    recipe["checkpoint"].update({"save_every": 0, "export": False})
    recipe["log"].update({"progress_bar": False, "tensorboard": False, "param_table": False, "peak_flops": 1e9})

    started = time.time()
    measured = {}
    for name, balance in (("balanced", True), ("count", False)):
        config = copy.deepcopy(recipe)
        config["run_dir"] = str(out / name)
        config["data"]["balance"] = balance
        measured[name] = _measured(_run(out, name, config))
    costs = _sample_costs(dict(recipe, run_dir=str(out / "costs")), samples)
    projected = {ranks: _projected(costs, ranks, args.per_rank, args.trials) for ranks in (WORLD, 64, 512)}

    print(
        f"tiny fuse, skewed mixture (text / 1 image / 5 tiles / 3 images), {WORLD} gloo ranks, {args.per_rank} samples "
        f"per rank and step in micro-batches of {MICRO}, {args.steps} steps; {time.time() - started:.0f} s"
    )
    print(
        f"predicted cost per sample: min {min(costs):.0f}, median {statistics.median(costs):.0f}, max {max(costs):.0f} "
        f"(LLM tokens + image rows x placeholders)"
    )
    print()
    print(
        "| split | per-rank cost max/mean (mean, worst step) "
        "| all-reduce wait per step (mean rank, longest) | step time |"
    )
    print("|---|---|---|---|")
    for name, label in (("balanced", "by predicted cost"), ("count", "by sample count")):
        m = measured[name]
        print(
            f"| {label} | {m['imbalance']:.3f}, {m['worst']:.3f} | "
            f"{m['wait'] * 1e3:.0f} ms, {m['wait_max'] * 1e3:.0f} ms "
            f"| {m['step']:.2f} s |"
        )
    print()
    print(f"| ranks ({args.per_rank} samples each) | by predicted cost: max/mean, avg rank waits | "
          "by sample count: max/mean, avg rank waits |")
    print("|---|---|---|")
    for ranks, p in projected.items():
        print(
            f"| {ranks} | {p['balanced']:.3f}, {1 - 1 / p['balanced']:.1%} "
            f"| {p['count']:.3f}, {1 - 1 / p['count']:.1%} |"
        )


if __name__ == "__main__":
    main()
