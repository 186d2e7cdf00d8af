"""A two-node Slurm job on the local cluster: slurm/stage2.sh with ``--nodes=2``, one rank per node.

Both launch modes of slurm/_launch.sh: ``srun`` (one task per rank) and
``torchrun`` (one torchrun agent per node, joined by a c10d rendezvous at the
master address).

The two nodes (n1, n2) are two slurmd of this host (helpers.slurm_cluster,
``nodes=2``); their names do not resolve as host names, so the batch script
must take the master address from the first node's NodeAddr, as on clusters
whose node names are aliases. The job must run as one world of 2 spread over
both nodes (SLURM_NODEID 0 and 1, in the trainer's roll call), and write its
logs, checkpoints and export once, into the shared run folder.
"""

from __future__ import annotations

import json
import re

import pytest
from helpers.launch_harness import REPO, TRAIN_SCRIPT, check_run, environment, python, train_args

pytestmark = [pytest.mark.slurm, pytest.mark.slow, pytest.mark.multiproc]
STEPS, SAVE_EVERY = 6, 3
TIMEOUT = 420


@pytest.mark.parametrize("mode", ["srun", "torchrun"])
def test_two_node_stage2_job(slurm_cluster_2nodes, tiny_recipe, tmp_path, mode):
    cluster = slurm_cluster_2nodes
    run_dir = tmp_path / "run"
    overrides = " ".join(train_args(tiny_recipe, run_dir, STEPS, SAVE_EVERY)[2:])
    env = environment(CONFIG=str(tiny_recipe), RUN_DIR=str(run_dir), OVERRIDES=overrides, STAGE1_EXPORT="",
                      MMDIST_REPO=str(REPO), TRAIN_SCRIPT=str(TRAIN_SCRIPT), PYTHON=python(), LAUNCH_MODE=mode)
    job = cluster.sbatch(
        REPO / "slurm" / "stage2.sh",
        "--nodes=2",
        "--ntasks-per-node=1",
        "--gpus-per-node=0",
        "--cpus-per-task=1",
        "--time=00:15:00",
        f"--output={tmp_path}/slurm-%j.out",
        env=env,
        cwd=tmp_path,
    )
    info = cluster.wait(job, timeout=TIMEOUT)
    log = (tmp_path / f"slurm-{job}.out").read_text()
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", (
        f"job {job}: {info.get('JobState')}\n{log[-5000:]}"
    )
    assert info["NumNodes"] == "2" and info["NodeList"] == "n[1-2]", info
    # n1 is no host name: the master is its NodeAddr, and both ranks reached it
    port = 20000 + int(job) % 20000
    assert "master node n1 does not resolve here; using its NodeAddr 127.0.0.1" in log, log[-3000:]
    assert f"mode {mode}, master 127.0.0.1:{port}" in log
    # the roll call: one rank on each node, SLURM_NODEID 0 on n1 and 1 on n2
    host = cluster.host
    if mode == "srun":
        assert (f"[mmdist] 2 ranks on 2 node(s) (slurm, master 127.0.0.1:{port}): node 0 (n1@{host}): rank(s) 0; "
                f"node 1 (n2@{host}): rank(s) 1") in log, log[-3000:]
    else:  # the c10d rendezvous decides which node's rank is 0
        assert f"--rdzv_endpoint=127.0.0.1:{port}" in log
        call = re.search(
            rf"\[mmdist\] 2 ranks on 2 node\(s\) \(torchrun, master \S+\): node 0 \(n1@{host}\): rank\(s\) ([01]); "
            rf"node 1 \(n2@{host}\): rank\(s\) ([01])",
            log,
        )
        assert call and {call.group(1), call.group(2)} == {"0", "1"}, log[-3000:]
    check_run(run_dir, STEPS, log)
    # written once per job, not once per node
    records = [
        json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.startswith("{")
    ]
    steps = [r["step"] for r in records if r.get("split") == "train" and "loss" in r]
    assert steps == list(range(1, STEPS + 1)), steps
    assert log.count(f"[mmdist] checkpoint {run_dir / 'checkpoints' / f'step_{STEPS:06d}'}") == 1
    ckpt = run_dir / "checkpoints" / f"step_{STEPS:06d}"
    names = sorted(p.name for p in ckpt.iterdir())
    assert names.count("trainable_state.pt") == 1
    assert [n for n in names if n.startswith("client_state_rank")] == [
        "client_state_rank00000.pt",
        "client_state_rank00001.pt",
    ]
    assert sorted(p.name for p in (run_dir / "export").iterdir()) == ["manifest.json", "model.safetensors"]
    assert log.count("[mmdist] exported trainable weights to") == 1
    assert f"job {job} finished" in log
