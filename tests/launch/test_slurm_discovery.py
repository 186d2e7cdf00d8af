"""The local Slurm cluster runs a two-task step, and every task finds its rank through mmdist.launch_env."""

from __future__ import annotations

import json
import os

import pytest

from mmdist.launch_env import expand_hostlist

pytestmark = [pytest.mark.slurm, pytest.mark.multiproc]


def test_srun_tasks_discover_their_ranks(slurm_cluster, tmp_path):
    script = tmp_path / "probe.sh"
    out = tmp_path / "probe-%j.out"
    probe = ("import json, sys; from mmdist.launch_env import discover; "
             "print(sys.argv[1], json.dumps(discover([]).__dict__))")
    script.write_text(f"""#!/bin/bash
#SBATCH --nodes=1 --ntasks-per-node=2 --time=00:02:00 --output={out}
# The batch script itself is one process, whatever SLURM_NTASKS says.
python -c '{probe}' BATCH
srun --kill-on-bad-exit=1 python -c '{probe}' TASK
""")
    job = slurm_cluster.sbatch(script, env={"PYTHONPATH": os.getcwd()}, cwd=tmp_path)
    info = slurm_cluster.wait(job, timeout=120)
    text = (tmp_path / f"probe-{job}.out").read_text()
    assert info["JobState"] == "COMPLETED", text
    batch = [json.loads(line.split(" ", 1)[1]) for line in text.splitlines() if line.startswith("BATCH ")]
    tasks = [json.loads(line.split(" ", 1)[1]) for line in text.splitlines() if line.startswith("TASK ")]
    assert [(b["rank"], b["world_size"], b["launcher"]) for b in batch] == [(0, 1, "single")]
    assert sorted((t["rank"], t["local_rank"]) for t in tasks) == [(0, 0), (1, 1)]
    assert {(t["world_size"], t["local_world_size"], t["launcher"]) for t in tasks} == {(2, 2, "slurm")}
    # Both tasks agree on the rendezvous point: the first node of the allocation and a port from the job id.
    assert {(t["master_addr"], t["master_port"]) for t in tasks} == {(slurm_cluster.node, 20000 + int(job) % 20000)}


def test_scontrol_hostnames_agrees_with_our_expansion(slurm_cluster):
    for nodelist in ("node[01-03,07],gpu5", "rack[1-2]-n[1,3]", "gpu[8-11]", slurm_cluster.node):
        out = slurm_cluster.run("scontrol", "show", "hostnames", nodelist)
        assert out.returncode == 0, out.stderr
        assert expand_hostlist(nodelist) == out.stdout.split()
