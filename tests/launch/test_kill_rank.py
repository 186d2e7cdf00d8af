"""SIGKILL one rank mid-run: the job ends non-zero within a bound (no survivor waits forever in a collective),
and running the same command again resumes from the last complete checkpoint and finishes.

Under torchrun the agent notices the dead worker and stops the others; under
Slurm ``srun --kill-on-bad-exit=1`` (slurm/stage*.sh) does the same for a step.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
from helpers.launch_harness import (
    REPO,
    TRAIN_SCRIPT,
    check_run,
    environment,
    latest_checkpoint,
    python,
    run,
    train_args,
)

from mmdist.launch_env import free_port

pytestmark = [pytest.mark.multiproc, pytest.mark.slow]
STEPS, SAVE_EVERY = 40, 2  # a step takes ~0.1 s: enough steps that the kill lands mid-run
EXIT_BOUND_S = 120  # the launcher must have exited this long after the kill


def rank_pids(marker: str, rank: int, variable: str = "RANK") -> list[int]:
    """Processes whose command line contains ``marker`` and whose environment says ``variable=rank`` (the workers)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
            if marker.encode() not in cmdline or str(TRAIN_SCRIPT).encode() not in cmdline:
                continue
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"{variable}={rank}".encode() in environ:
            found.append(int(entry.name))
    return found


def test_sigkill_one_rank_ends_the_job_and_restart_resumes(tiny_recipe, tmp_path):
    run_dir = tmp_path / "run"
    cmd = [python(), "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           "--max-restarts", "0", str(TRAIN_SCRIPT), *train_args(tiny_recipe, run_dir, STEPS, SAVE_EVERY)]
    log_path = tmp_path / "first.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env=environment(), stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 600
        while latest_checkpoint(run_dir) is None:
            assert proc.poll() is None, (
                f"the run ended ({proc.returncode}) before its first checkpoint:\n" + log_path.read_text()[-4000:]
            )
            assert time.monotonic() < deadline, "no checkpoint within 600 s"
            time.sleep(0.05)
        victims = rank_pids(str(run_dir), rank=1)
        assert len(victims) == 1, f"expected one rank-1 worker, found {victims}"
        assert proc.poll() is None, "the run finished before the kill: raise STEPS"
        os.kill(victims[0], signal.SIGKILL)
        killed_at = time.monotonic()
        try:
            returncode = proc.wait(timeout=EXIT_BOUND_S)
        except subprocess.TimeoutExpired:
            pytest.fail(
                f"the job still runs {EXIT_BOUND_S} s after rank 1 was killed (hang):\n" + log_path.read_text()[-4000:]
            )
        exit_s = time.monotonic() - killed_at
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    first = log_path.read_text()
    assert returncode != 0, f"the job exited 0 although rank 1 was killed:\n{first[-4000:]}"
    assert not rank_pids(str(run_dir), rank=0), "rank 0 outlived the job"
    saved = latest_checkpoint(run_dir)
    assert saved is not None and saved.is_dir()
    saved_step = int(re.search(r"(\d+)$", saved.name).group(1))
    assert 0 < saved_step < STEPS, f"the kill did not land mid-run (checkpoint {saved.name})"
    print(f"job exited {returncode} {exit_s:.1f} s after SIGKILL of rank 1; last complete checkpoint {saved.name}")

    # The same command again: auto-resume from that checkpoint, then finish.
    cmd[cmd.index("--master_port") + 1] = str(free_port())
    again = run(cmd, 600)
    output = again.stdout + again.stderr
    assert again.returncode == 0, output[-4000:]
    assert re.search(rf"resumed from \S*{re.escape(saved.name)} at step {saved_step}\b", output), output[-4000:]
    check_run(run_dir, STEPS, output)


@pytest.mark.slurm
def test_sigkill_one_srun_task_fails_the_step_and_resubmission_resumes(slurm_cluster, tiny_recipe, tmp_path):
    run_dir = tmp_path / "run"
    env = environment(CONFIG=str(tiny_recipe), RUN_DIR=str(run_dir), STAGE1_EXPORT="", MMDIST_REPO=str(REPO),
                      TRAIN_SCRIPT=str(TRAIN_SCRIPT), PYTHON=python(),
                      OVERRIDES=" ".join(train_args(tiny_recipe, run_dir, STEPS, SAVE_EVERY)[2:]))
    args = ["--nodes=1", "--ntasks-per-node=2", "--gpus-per-node=0", "--cpus-per-task=1", "--time=00:15:00",
            f"--output={tmp_path}/slurm-%j.out"]
    job = slurm_cluster.sbatch(REPO / "slurm" / "stage2.sh", *args, env=env, cwd=tmp_path)
    deadline = time.monotonic() + 600
    while latest_checkpoint(run_dir) is None:
        state = slurm_cluster.job_info(job).get("JobState")
        assert state in ("PENDING", "RUNNING", "CONFIGURING"), f"job {job} is {state} before its first checkpoint"
        assert time.monotonic() < deadline, "no checkpoint within 600 s"
        time.sleep(0.05)
    victims = rank_pids(str(run_dir), rank=1, variable="SLURM_PROCID")
    assert len(victims) == 1, f"expected one task with SLURM_PROCID=1, found {victims}"
    os.kill(victims[0], signal.SIGKILL)
    killed_at = time.monotonic()
    info = slurm_cluster.wait(job, timeout=EXIT_BOUND_S)  # raises (and cancels) if the step hangs
    log = (tmp_path / f"slurm-{job}.out").read_text()
    assert info["JobState"] == "FAILED" and info["ExitCode"] != "0:0", (
        f"{info.get('JobState')} {info.get('ExitCode')}\n{log[-3000:]}"
    )
    print(
        f"job {job} {info['JobState']} ({info['ExitCode']}) "
        f"{time.monotonic() - killed_at:.1f} s after SIGKILL of task 1"
    )
    saved = latest_checkpoint(run_dir)
    saved_step = int(re.search(r"(\d+)$", saved.name).group(1))
    assert 0 < saved_step < STEPS

    again = slurm_cluster.sbatch(REPO / "slurm" / "stage2.sh", *args, env=env, cwd=tmp_path)
    info = slurm_cluster.wait(again, timeout=600)
    log = (tmp_path / f"slurm-{again}.out").read_text()
    assert info["JobState"] == "COMPLETED", log[-4000:]
    assert re.search(rf"resumed from \S*{re.escape(saved.name)} at step {saved_step}\b", log), log[-4000:]
    check_run(run_dir, STEPS, log)
