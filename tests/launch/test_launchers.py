"""The same tiny ZeRO-3 run under every launcher mmdist supports: 2 CPU ranks, gloo, loss goes down, checkpoint written.

Each launcher describes the job differently (torchrun's variables, the deepspeed
launcher's ``--local_rank`` argument, MPICH's PMI variables with the master
address broadcast over mpi4py, Slurm's task variables); a passing run means
``mmdist.launch_env`` found a consistent world of 2 in each.

torchrun's run of this kind is tests/launch/test_kill_rank.py's (the same command, checked the same way after its
restart), and `sbatch slurm/stage2.sh` on one node is the chained-jobs test below: neither runs twice.
"""

from __future__ import annotations

import shutil

import pytest
import yaml
from helpers.launch_harness import REPO, TRAIN_SCRIPT, check_run, common_overrides, environment, python, run, train_args

from mmdist.launch_env import free_port

pytestmark = [pytest.mark.multiproc, pytest.mark.slow]  # end-to-end runs, 30-60 s each
STEPS, SAVE_EVERY = 8, 4
TIMEOUT = 420


def test_deepspeed_launcher(tiny_recipe, tmp_path):
    run_dir = tmp_path / "run"
    # With DS_ACCELERATOR=cpu the launcher counts CPU "accelerators" as NUMA nodes; --num_gpus sets the ranks.
    cmd = [shutil.which("deepspeed") or "deepspeed", "--num_gpus", "2", "--master_port", str(free_port()),
           str(TRAIN_SCRIPT), *train_args(tiny_recipe, run_dir, STEPS, SAVE_EVERY)]
    out = run(cmd, TIMEOUT)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    check_run(run_dir, STEPS, out.stdout + out.stderr)


@pytest.mark.skipif(shutil.which("mpiexec") is None, reason="mpiexec not found (pip install mpich)")
def test_mpiexec(tiny_recipe, tmp_path):
    run_dir = tmp_path / "run"
    # No MASTER_ADDR/PORT: rank 0 picks them and broadcasts them over mpi4py.
    cmd = [
        shutil.which("mpiexec"),
        "-n",
        "2",
        python(),
        str(TRAIN_SCRIPT),
        *train_args(tiny_recipe, run_dir, STEPS, SAVE_EVERY),
    ]
    out = run(cmd, TIMEOUT)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    check_run(run_dir, STEPS, out.stdout + out.stderr)


@pytest.mark.slurm
def test_stage1_then_stage2_chained_with_afterok(slurm_cluster, tiny_recipes, tmp_path):
    """The documented chain: JOB1=$(sbatch --parsable slurm/stage1.sh);
    sbatch --dependency=afterok:$JOB1 slurm/stage2.sh.

    Also the plain `sbatch slurm/stage2.sh` run on one node with 2 tasks (a test of its own before, which ran the same
    stage2.sh job without the stage-1 export; that variant runs in test_kill_rank's Slurm resubmission).
    """
    align_dir, fuse_dir = tmp_path / "align", tmp_path / "fuse"
    sbatch_args = ["--nodes=1", "--ntasks-per-node=2", "--gpus-per-node=0", "--cpus-per-task=1", "--time=00:15:00",
                   f"--output={tmp_path}/slurm-%j.out"]
    common = dict(MMDIST_REPO=str(REPO), TRAIN_SCRIPT=str(TRAIN_SCRIPT), PYTHON=python())
    job1 = slurm_cluster.sbatch(
        REPO / "slurm" / "stage1.sh",
        *sbatch_args,
        cwd=tmp_path,
        env=environment(
            CONFIG=str(tiny_recipes["align"]),
            RUN_DIR=str(align_dir),
            OVERRIDES=" ".join(["train.max_steps=4", *common_overrides(4)]),
            **common,
        ),
    )
    # Submitted at once: the export does not exist yet; stage2.sh checks it when the job starts.
    job2 = slurm_cluster.sbatch(
        REPO / "slurm" / "stage2.sh",
        f"--dependency=afterok:{job1}",
        *sbatch_args,
        cwd=tmp_path,
        env=environment(
            CONFIG=str(tiny_recipes["fuse"]),
            RUN_DIR=str(fuse_dir),
            STAGE1_EXPORT=str(align_dir / "export"),
            OVERRIDES=" ".join(train_args(tiny_recipes["fuse"], fuse_dir, STEPS, SAVE_EVERY)[2:]),
            **common,
        ),
    )
    waiting = slurm_cluster.job_info(job2)
    assert waiting.get("JobState") == "PENDING", waiting
    info1 = slurm_cluster.wait(job1, timeout=TIMEOUT)
    info2 = slurm_cluster.wait(job2, timeout=TIMEOUT)
    log1, log2 = ((tmp_path / f"slurm-{j}.out").read_text() for j in (job1, job2))
    assert info1["JobState"] == "COMPLETED", log1[-4000:]
    assert info2["JobState"] == "COMPLETED", log2[-4000:]
    assert info2["StartTime"] >= info1["EndTime"], (info1["EndTime"], info2["StartTime"])  # ISO times sort as text
    for log in (log1, log2):
        assert f"master {slurm_cluster.node}:" in log  # each script found the master from the node list
    assert (align_dir / "export" / "manifest.json").exists() and (align_dir / "export" / "model.safetensors").exists()
    assert f"model.connector.stage1_weights={align_dir / 'export'}" in log2
    assert yaml.safe_load((fuse_dir / "config.yaml").read_text())["model"]["connector"]["stage1_weights"] == str(
        align_dir / "export"
    )
    check_run(fuse_dir, STEPS, log2)
