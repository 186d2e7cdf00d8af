"""How far an elastic resume's other data order moves the weights, beside how far the order alone moves them.

    python benchmarks/elastic_order.py [--out runs/bench-elastic] [--zero 3] [--worlds 2,1,3] [--order per_rank]

The tiny fuse recipe (configs/tiny_fuse.yaml) on 72 demo samples (6 shards of 12),
global batch 12, micro-batch 4, 6 steps = one epoch, gloo on this CPU. Four runs:

- ``init``: one step with lr 1e-30, for the initial trainable weights w0;
- ``full-N``: uninterrupted on N = worlds[0] ranks;
- ``full-1``: uninterrupted on 1 rank (the same epoch's samples in another order);
- ``elastic``: steps 1-2 on worlds[0] ranks, 3-4 on worlds[1], 5-6 on worlds[2], each part resuming the last.

Printed: ``|w_a - w_b| / |w_b - w0|`` over every trainable weight, for elastic vs
full-N and for full-1 vs full-N. Every run trains on each sample once; the
distances are the effect of which samples share a step. They measure the
per-rank order (``data.order=per_rank``, the default here); with ``--order
global`` every run trains on the same steps and both distances are float noise. The elastic run's exact
continuation (same batches -> same weights) is checked by
tests/training/test_elastic_data_position.py, not here.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _leg(spec_file: str) -> None:
    """One part of a run, as a torchrun rank (``--leg SPEC``)."""
    from mmdist.config.run import load_config
    from mmdist.training.loop import train

    spec = json.loads(Path(spec_file).read_text())
    train(load_config(base=spec["config"]), stop_after=spec["stop_after"])


def _run(out: Path, name: str, recipe: dict, world: int, stop_after: int | None = None) -> None:
    spec = out / f"{name}-{world}-{stop_after}.json"
    spec.write_text(json.dumps({"config": recipe, "stop_after": stop_after}))
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(world), "--master_port", str(_port()),
           str(Path(__file__).resolve()), "--leg", str(spec)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{name} on {world} rank(s) failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")


def _port() -> int:
    from mmdist.launch_env import free_port

    return free_port()


def _weights(run_dir: Path):
    import torch
    from safetensors.torch import load_file

    weights = load_file(str(run_dir / "export" / "model.safetensors"))
    return torch.cat([weights[k].float().flatten() for k in sorted(weights)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="runs/bench-elastic")
    parser.add_argument("--zero", type=int, default=3)
    parser.add_argument("--worlds", default="2,1,3")
    parser.add_argument("--order", default="per_rank", choices=["per_rank", "global"], help="data.order of every run")
    parser.add_argument("--leg", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.leg:
        return _leg(args.leg)
    import yaml

    from mmdist.data.shards import shard_pattern, write_demo_shards

    worlds = [int(w) for w in args.worlds.split(",")]
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    shards = write_demo_shards(out / "demo", image_size=16, samples_per_shard=12, limit=72, overwrite=True)
    recipe = yaml.safe_load((REPO / "configs" / "tiny_fuse.yaml").read_text())
    recipe["data"].update({"train": [{"shards": [shard_pattern(shards["train"])]}], "eval": [], "num_workers": 1,
                           "order": args.order})
    recipe["train"].update({"max_steps": 6, "global_batch_size": 12, "micro_batch_size": 4, "eval_every": 0})
    recipe["engine"]["zero_stage"] = args.zero
    recipe["checkpoint"].update({"save_every": 2})
    recipe["log"].update({"progress_bar": False, "tensorboard": False, "param_table": False, "peak_flops": 1e9})

    def config(name: str, **train: object) -> dict:
        c = copy.deepcopy(recipe)
        c["run_dir"] = str(out / name)
        c["train"].update(train)
        return c

    started = time.time()
    _run(out, "init", config("init", lr=1e-30, max_steps=1), 1)
    _run(out, "full-N", config(f"full-{worlds[0]}"), worlds[0])
    _run(out, "full-1", config("full-1"), 1)
    for world, stop in zip(worlds, (2, 4, None)):
        _run(out, "elastic", config("elastic"), world, stop)
    w0 = _weights(out / "init")
    full_n, full_1, elastic = _weights(out / f"full-{worlds[0]}"), _weights(out / "full-1"), _weights(out / "elastic")
    moved = (full_n - w0).norm()
    print(f"tiny fuse, ZeRO-{args.zero}, data.order={args.order}, 6 steps x global batch 12, elastic "
          f"{'->'.join(map(str, worlds))} ranks; "
          f"{time.time() - started:.0f} s")
    print(f"|w_full{worlds[0]} - w0|                          {moved:.4f}")
    print(f"elastic vs uninterrupted on {worlds[0]} ranks (relative)   {(elastic - full_n).norm() / moved:.3f}")
    print(f"uninterrupted on 1 vs on {worlds[0]} ranks (relative)      {(full_1 - full_n).norm() / moved:.3f}")


if __name__ == "__main__":
    main()
