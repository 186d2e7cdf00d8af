"""Shared pieces of the launcher tests: the training command, its environment, and checks of a run folder.

Every launcher runs the same thing: ``launch/train.py`` with the tiny stage-2
recipe ``configs/tiny_fuse.yaml`` (its data paths pointed at demo shards written
into a temporary folder), ZeRO-3, two CPU ranks over gloo, a few steps, a
checkpoint. Only the command in front differs.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
TRAIN_SCRIPT = REPO / "launch" / "train.py"
TINY_FUSE = REPO / "configs" / "tiny_fuse.yaml"
# Variables of an enclosing launch that must not leak into the one under test.
_LAUNCH_VARS = re.compile(r"^(RANK|WORLD_SIZE|LOCAL_RANK|LOCAL_WORLD_SIZE|LOCAL_SIZE|MASTER_ADDR|MASTER_PORT|CROSS_\w+|"
                          r"TORCHELASTIC_\w+|GROUP_RANK|OMPI_\w+|PMI_\w+|PMIX_\w+|MPI_LOCAL\w+|HYDRA_\w+|SLURM_\w+)$")


def require_entry() -> None:
    missing = [str(p) for p in (TRAIN_SCRIPT, TINY_FUSE) if not p.exists()]
    if missing:
        pytest.skip(f"training entry point not present: {', '.join(missing)}")


def write_recipes(folder: Path) -> dict[str, Path]:
    """configs/tiny_align.yaml and tiny_fuse.yaml reading demo shards written under ``folder``: {stage: path}."""
    from mmdist.data.shards import shard_pattern, write_demo_shards

    written = write_demo_shards(folder / "demo", limit=400, samples_per_shard=50, overwrite=True)
    paths = {}
    for stage, name in (("align", "tiny_align.yaml"), ("fuse", "tiny_fuse.yaml")):
        recipe = yaml.safe_load((REPO / "configs" / name).read_text())
        recipe["data"]["train"] = [{"shards": [shard_pattern(written["train"])]}]
        recipe["data"]["eval"] = [{"shards": [shard_pattern(written["eval"])]}]
        paths[stage] = folder / name
        paths[stage].write_text(yaml.safe_dump(recipe, sort_keys=False))
    return paths


def train_args(config: Path, run_dir: Path, steps: int, save_every: int, *extra: str) -> list[str]:
    """Arguments after the script: the tiny recipe, ZeRO-3, metrics for every step, checkpoints every N.

    The learning rate is raised from the recipe's so that a handful of steps lowers the loss clearly.
    """
    return ["--config", str(config), f"run_dir={run_dir}", f"train.max_steps={steps}", "engine.zero_stage=3",
            *common_overrides(save_every), *extra]


def common_overrides(save_every: int) -> list[str]:
    return ["train.lr=0.005", "train.warmup_ratio=0.0", "train.eval_every=0", f"checkpoint.save_every={save_every}",
            "checkpoint.keep_last=2", "log.log_every=1", "log.progress_bar=false", "log.tensorboard=false",
            "log.param_table=false"]


def environment(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not _LAUNCH_VARS.match(k)}
    env.update({
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH", "")])),
        "DS_ACCELERATOR": "cpu",
        "OMP_NUM_THREADS": "1",
        "PYTHONUNBUFFERED": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "MMDIST_DIST_TIMEOUT": "120",
    })
    env.update(extra)
    return env


def run(cmd: list[str], timeout: float, **env: str) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(cmd, cwd=REPO, env=environment(**env), capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        out = (exc.stdout or b"").decode(errors="replace") if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        pytest.fail(f"{' '.join(cmd[:4])} ... hung: no exit within {timeout:.0f} s. Output tail:\n{out[-3000:]}")


def train_records(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    assert path.exists(), f"no {path}"
    return [r for r in map(json.loads, path.read_text().splitlines()) if r.get("split") == "train" and "loss" in r]


def latest_checkpoint(run_dir: Path) -> Path | None:
    pointer = run_dir / "checkpoints" / "latest"
    if not pointer.exists():
        return None
    return run_dir / "checkpoints" / pointer.read_text().strip()


def check_run(run_dir: Path, steps: int, output: str, world_size: int = 2) -> list[float]:
    """Assert a finished run: every step logged with a finite loss, loss went down, a checkpoint and export."""
    assert f"world={world_size}" in output, f"the run did not report world={world_size}:\n{output[-3000:]}"
    records = train_records(run_dir)
    by_step = {r["step"]: r["loss"] for r in records}
    assert sorted(by_step) == list(range(1, steps + 1)), f"logged steps {sorted(by_step)}"
    losses = [by_step[s] for s in range(1, steps + 1)]
    assert all(math.isfinite(x) for x in losses), losses
    half = max(len(losses) // 2, 1)
    assert sum(losses[-half:]) / half < sum(losses[:half]) / half, f"loss did not decrease: {losses}"
    ckpt = latest_checkpoint(run_dir)
    assert ckpt is not None and ckpt.is_dir(), f"no complete checkpoint under {run_dir / 'checkpoints'}"
    assert ckpt.name.endswith(f"{steps:06d}"), f"latest checkpoint {ckpt.name} is not the final step {steps}"
    assert any(f.stat().st_size > 0 for f in ckpt.rglob("*") if f.is_file()), f"{ckpt} holds no data"
    assert (run_dir / "config.yaml").exists()
    return losses


def python() -> str:
    return sys.executable
