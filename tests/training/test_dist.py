"""Rank discovery from fake launcher environments, Slurm host-list expansion, and the process group's life."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap

import pytest

from mmdist import distributed as dist
from mmdist import launch_env
from mmdist.launch_env import DistEnv, DistError, discover, expand_hostlist, hostnames, tasks_per_node

# --- torchrun / deepspeed -----------------------------------------------------


def test_torchrun_variables():
    env = {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4",
           "MASTER_ADDR": "10.0.0.7", "MASTER_PORT": "29600", "TORCHELASTIC_RUN_ID": "x"}
    got = discover(argv=[], environ=env)
    assert got == DistEnv(5, 8, 1, 4, "10.0.0.7", 29600, "torchrun")
    assert got.node_rank == 1 and not got.is_main


def test_deepspeed_launcher_local_rank_argument_wins():
    # What deepspeed/launcher/launch.py exports, plus the --local_rank it appends to the script's arguments.
    env = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "3", "LOCAL_SIZE": "2", "CROSS_RANK": "1",
           "CROSS_SIZE": "2", "MASTER_ADDR": "nodeA", "MASTER_PORT": "29501"}
    got = discover(argv=["--config", "c.yaml", "--local_rank=1"], environ=env)
    assert (got.rank, got.world_size, got.local_rank, got.local_world_size) == (3, 4, 1, 2)
    assert got.launcher == "deepspeed" and got.master_addr == "nodeA" and got.master_port == 29501
    # Space-separated form too.
    assert discover(argv=["--local_rank", "0"], environ={**env, "RANK": "2"}).local_rank == 0


def test_deepspeed_launcher_ignores_a_stale_inherited_local_world_size():
    env = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "LOCAL_SIZE": "2", "CROSS_RANK": "0",
           "LOCAL_WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}
    assert discover(argv=["--local_rank=1"], environ=env).local_world_size == 2


def test_deepspeed_no_local_rank_flag_still_detected_by_its_variables():
    env = {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "LOCAL_SIZE": "2", "CROSS_RANK": "0",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}
    got = discover(argv=[], environ=env)
    assert got.launcher == "deepspeed" and got.local_world_size == 2


def test_local_rank_without_launcher_variables_is_an_error():
    with pytest.raises(DistError, match="RANK/WORLD_SIZE are not set"):
        discover(argv=["--local_rank=0"], environ={})


def test_strip_local_rank():
    argv = ["--config", "x.yaml", "--local_rank=1", "a=b", "--local_rank", "2", "c=d"]
    assert launch_env.strip_local_rank(argv) == ["--config", "x.yaml", "a=b", "c=d"]


def test_inconsistent_variables_are_refused_with_the_numbers():
    with pytest.raises(DistError, match="rank 4 outside"):
        discover(argv=[], environ={"RANK": "4", "WORLD_SIZE": "4", "MASTER_PORT": "1"})
    with pytest.raises(DistError, match="RANK='x'"):
        discover(argv=[], environ={"RANK": "x", "WORLD_SIZE": "4"})


def test_single_process_gets_a_free_port():
    got = discover(argv=[], environ={})
    assert (got.rank, got.world_size, got.local_rank, got.launcher) == (0, 1, 0, "single")
    assert got.master_addr == "127.0.0.1" and 0 < got.master_port < 65536


# --- Slurm --------------------------------------------------------------------


def _srun_env(**extra):
    env = {"SLURM_JOB_ID": "4242", "SLURM_STEP_ID": "0", "SLURM_PROCID": "6", "SLURM_LOCALID": "2",
           "SLURM_NODEID": "1", "SLURM_NTASKS": "8", "SLURM_TASKS_PER_NODE": "4(x2)",
           "SLURM_JOB_NODELIST": "gpu[07-08]"}
    env.update(extra)
    return env


def test_slurm_step():
    got = discover(argv=[], environ=_srun_env())
    assert (got.rank, got.world_size, got.local_rank, got.local_world_size) == (6, 8, 2, 4)
    assert got.launcher == "slurm" and got.master_addr == "gpu07"
    # The port comes from the job id: equal on every rank, different for another job.
    assert got.master_port == 20000 + 4242 % 20000
    assert discover(argv=[], environ=_srun_env(SLURM_JOB_ID="4243")).master_port != got.master_port


def test_slurm_explicit_master_wins_and_step_counts_override_job_counts():
    env = _srun_env(MASTER_ADDR="10.1.1.1", MASTER_PORT="31000", SLURM_STEP_NUM_TASKS="6",
                    SLURM_STEP_TASKS_PER_NODE="3(x2)", SLURM_PROCID="5")
    got = discover(argv=[], environ=env)
    assert (got.world_size, got.local_world_size, got.master_addr, got.master_port) == (6, 3, "10.1.1.1", 31000)


def test_slurm_uneven_tasks_per_node():
    env = _srun_env(SLURM_TASKS_PER_NODE="2(x2),1", SLURM_NODEID="2", SLURM_PROCID="4", SLURM_LOCALID="0",
                    SLURM_NTASKS="5", SLURM_JOB_NODELIST="a1,b[3-4]")
    got = discover(argv=[], environ=env)
    assert got.local_world_size == 1 and got.master_addr == "a1"


def _fake_scontrol(tmp_path, monkeypatch, answer: str) -> None:
    """`scontrol show node -o NAME` prints ``answer`` (a line of NAME's record); the call is logged."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(f"#!/bin/sh\necho \"$*\" >> {tmp_path}/calls\n"
                                      f"[ \"$1 $2\" = \"show node\" ] || exit 3\necho '{answer}'\n")
    (bin_dir / "scontrol").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")


def test_slurm_master_is_the_first_nodes_address_when_its_name_does_not_resolve(tmp_path, monkeypatch):
    """Node names that are not host names (n1, n2 on one host; aliases on real clusters): NodeAddr is the master."""
    _fake_scontrol(
        tmp_path, monkeypatch, "NodeName=zz-unresolvable-n1 Arch=x86_64 NodeAddr=10.9.8.7 NodeHostName=vm Port=7818"
    )
    got = discover(argv=[], environ=_srun_env(SLURM_JOB_NODELIST="zz-unresolvable-n[1-2]"))
    assert got.master_addr == "10.9.8.7"
    assert (tmp_path / "calls").read_text().split() == ["show", "node", "-o", "zz-unresolvable-n1"]


def test_slurm_master_name_that_resolves_is_used_as_is(tmp_path, monkeypatch):
    import socket

    _fake_scontrol(tmp_path, monkeypatch, "NodeName=x NodeAddr=10.9.8.7")
    host = socket.gethostname()  # resolves here (the Slurm tests rely on that too)
    assert discover(argv=[], environ=_srun_env(SLURM_JOB_NODELIST=host)).master_addr == host
    assert not (tmp_path / "calls").exists()  # no scontrol call when the name resolves


def test_slurm_master_falls_back_to_the_name_without_an_answer(tmp_path, monkeypatch):
    _fake_scontrol(tmp_path, monkeypatch, "")
    assert (
        discover(argv=[], environ=_srun_env(SLURM_JOB_NODELIST="zz-unresolvable-n1")).master_addr
        == "zz-unresolvable-n1"
    )


def test_slurm_batch_script_itself_is_a_single_process():
    # The batch script runs once even when the allocation has 8 tasks: it must not wait for 7 peers.
    env = {"SLURM_JOB_ID": "7", "SLURM_PROCID": "0", "SLURM_NTASKS": "8", "SLURM_JOB_NODELIST": "n1"}
    assert discover(argv=[], environ=env).world_size == 1
    assert discover(argv=[], environ={**env, "SLURM_STEP_ID": "batch"}).world_size == 1


def test_torchrun_inside_slurm_uses_torchrun_variables():
    env = _srun_env(RANK="1", WORLD_SIZE="16", LOCAL_RANK="1", LOCAL_WORLD_SIZE="8",
                    MASTER_ADDR="gpu07", MASTER_PORT="29500")
    got = discover(argv=[], environ=env)
    assert got.launcher == "torchrun" and got.world_size == 16


@pytest.mark.parametrize(
    "nodelist, expected",
    [
        ("node[01-03,07],gpu5", ["node01", "node02", "node03", "node07", "gpu5"]),
        ("n1", ["n1"]),
        ("gpu[8-11]", ["gpu8", "gpu9", "gpu10", "gpu11"]),
        ("gpu[08-11]", ["gpu08", "gpu09", "gpu10", "gpu11"]),
        ("rack[1-2]-n[1,3]", ["rack1-n1", "rack1-n3", "rack2-n1", "rack2-n3"]),
        ("a[1],b,c[002-003].ib", ["a1", "b", "c002.ib", "c003.ib"]),
    ],
)
def test_expand_hostlist(nodelist, expected):
    assert expand_hostlist(nodelist) == expected


@pytest.mark.parametrize("bad", ["node[01-03", "node]1", "n[3-1]", "n[a-b]", "", "a,,b", "n[1[2]]"])
def test_expand_hostlist_rejects_malformed(bad):
    with pytest.raises(ValueError):
        expand_hostlist(bad)
    with pytest.raises(DistError, match="cannot expand"):
        hostnames(bad, use_scontrol=False)


@pytest.mark.skipif(shutil.which("scontrol") is None, reason="scontrol not installed (Slurm client missing)")
@pytest.mark.parametrize("nodelist", ["node[01-03,07],gpu5", "rack[1-2]-n[1,3]", "gpu[8-11]"])
def test_expand_hostlist_agrees_with_scontrol(nodelist, tmp_path):
    # `scontrol show hostnames` expands offline; it only needs some config file to read.
    conf = tmp_path / "slurm.conf"
    conf.write_text("ClusterName=x\nSlurmctldHost=localhost\nNodeName=localhost CPUs=1\nPartitionName=p Nodes=ALL\n")
    out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, timeout=30,
                         env={**os.environ, "SLURM_CONF": str(conf)})
    assert out.returncode == 0, out.stderr
    assert expand_hostlist(nodelist) == out.stdout.split()


def test_hostnames_falls_back_to_scontrol(tmp_path, monkeypatch):
    # A form our parser does not know goes to `scontrol show hostnames` (here a stand-in on PATH).
    fake = tmp_path / "scontrol"
    fake.write_text('#!/bin/sh\n[ "$1 $2 $3" = "show hostnames odd[1-2" ] && printf "odd1\\nodd2\\n"\n')
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    assert hostnames("odd[1-2") == ["odd1", "odd2"]
    with pytest.raises(DistError, match="cannot expand"):
        hostnames("other[1-2")  # scontrol fails too: the error names the node list


def test_tasks_per_node():
    assert tasks_per_node("2(x3),1") == [2, 2, 2, 1]
    assert tasks_per_node("8") == [8]
    with pytest.raises(DistError, match="tasks-per-node"):
        tasks_per_node("2x3")


# --- MPI ----------------------------------------------------------------------


def test_openmpi_variables():
    env = {"OMPI_COMM_WORLD_RANK": "3", "OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_LOCAL_RANK": "1",
           "OMPI_COMM_WORLD_LOCAL_SIZE": "2", "MASTER_ADDR": "h0", "MASTER_PORT": "29555"}
    assert discover(argv=[], environ=env) == DistEnv(3, 4, 1, 2, "h0", 29555, "mpi")


def test_mpich_hydra_variables_beat_the_batch_steps_slurm_procid():
    # mpiexec inside an sbatch script: every rank sees SLURM_PROCID=0 of the batch step.
    env = {"PMI_RANK": "1", "PMI_SIZE": "2", "MPI_LOCALRANKID": "1", "MPI_LOCALNRANKS": "2", "PMI_FD": "9",
           "SLURM_PROCID": "0", "SLURM_STEP_ID": "0", "SLURM_NTASKS": "2", "MASTER_ADDR": "x", "MASTER_PORT": "2"}
    got = discover(argv=[], environ=env)
    assert (got.rank, got.world_size, got.local_rank, got.local_world_size, got.launcher) == (1, 2, 1, 2, "mpi")


class FakeComm:
    """Stands in for mpi4py's COMM_WORLD: what rank 0 broadcasts, every rank receives."""

    def __init__(self, rank, size, root_value=None):
        self.rank, self.size, self.root_value, self.sent = rank, size, root_value, None

    def Get_rank(self):
        return self.rank

    def Get_size(self):
        return self.size

    def bcast(self, value, root=0):
        assert root == 0
        if self.rank == 0:
            self.sent = value
            return value
        assert value is None, "non-root ranks must not invent an address"
        return self.root_value

    def Free(self):
        pass


def test_mpi_master_address_is_broadcast_from_rank_0():
    env = {"PMI_RANK": "0", "PMI_SIZE": "2", "MPI_LOCALRANKID": "0", "MPI_LOCALNRANKS": "2"}
    root = FakeComm(0, 2)
    got0 = discover(argv=[], environ=env, comm=root)
    addr, port = root.sent
    assert (got0.master_addr, got0.master_port) == (addr, port) and 0 < port < 65536
    got1 = discover(argv=[], environ={**env, "PMI_RANK": "1", "MPI_LOCALRANKID": "1"},
                    comm=FakeComm(1, 2, root_value=(addr, port)))
    assert (got1.rank, got1.master_addr, got1.master_port) == (1, addr, port)


def test_mpi_rank_from_communicator_when_variables_lack_it():
    class SplitComm(FakeComm):
        def Split_type(self, kind, key=0):
            return FakeComm(self.rank % 2, 2)

    comm = SplitComm(3, 4, root_value=("h0", 29999))
    got = discover(argv=[], environ={"PMIX_RANK": "3"}, comm=comm)
    assert (got.rank, got.world_size, got.local_rank, got.local_world_size) == (3, 4, 1, 2)
    assert (got.master_addr, got.master_port) == ("h0", 29999)


# --- process group ----------------------------------------------------------------


def test_init_and_shutdown_single_process_gloo(monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "LOCAL_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    import torch
    import torch.distributed as tdist

    env = dist.init(discover(argv=[], environ={}), backend="auto", timeout_s=30)
    try:
        assert tdist.is_initialized() and tdist.get_backend() == "gloo"
        assert os.environ["WORLD_SIZE"] == "1" and os.environ["MASTER_PORT"] == str(env.master_port)
        t = torch.ones(3)
        tdist.all_reduce(t)
        assert t.tolist() == [1.0, 1.0, 1.0]
        assert dist.init(env) == env  # a second call keeps the existing group
    finally:
        dist.shutdown()
    assert not tdist.is_initialized()
    # The variables init() exported are gone again: a later run in this process is not taken for torchrun.
    assert "WORLD_SIZE" not in os.environ and "MASTER_PORT" not in os.environ
    assert discover(argv=[]).launcher == "single"
    dist.shutdown()  # idempotent


def test_backend_choice():
    assert dist.resolve_backend("gloo") == "gloo"
    with pytest.raises(DistError, match="engine.backend='mpi'"):
        dist.resolve_backend("mpi")


@pytest.mark.multiproc
def test_uncaught_exception_still_destroys_the_group(tmp_path):
    # Two real ranks over gloo; rank 1 raises after init. Both must exit without an abort
    # ("terminate called ..."), rank 1 with the exception's status, and the group must be gone at exit.
    script = tmp_path / "worker.py"
    script.write_text(
        textwrap.dedent("""
        import atexit, os, sys, torch, torch.distributed as tdist
        from mmdist import distributed as dist
        from mmdist import launch_env
        # atexit runs handlers last-registered first: this probe, registered before init(), runs after shutdown().
        atexit.register(
            lambda: print(f"rank{os.environ['RANK']} group_alive_at_exit={tdist.is_initialized()}", flush=True)
        )
        env = dist.init(launch_env.discover(), timeout_s=20)
        t = torch.tensor([float(env.rank + 1)])
        tdist.all_reduce(t)
        print(f"rank{env.rank} sum={t.item()}", flush=True)
        if env.rank == 1:
            raise RuntimeError("boom")
    """)
    )
    port = launch_env.free_port()
    procs = []
    for rank in range(2):
        env = {**os.environ, "PYTHONPATH": os.getcwd(), "RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank),
               "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "DS_ACCELERATOR": "cpu"}
        procs.append(subprocess.Popen([sys.executable, str(script)], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert procs[0].returncode == 0, outs[0]
    assert procs[1].returncode == 1, outs[1]
    for rank, out in enumerate(outs):
        assert f"rank{rank} sum=3.0" in out, out
        assert f"rank{rank} group_alive_at_exit=False" in out, out
        assert "terminate called" not in out and "Aborted" not in out, out
    assert "RuntimeError: boom" in outs[1]


_PROBE = textwrap.dedent("""
    import json, os, sys, torch, torch.distributed as tdist
    from mmdist import distributed as dist
    from mmdist import launch_env
    env = dist.init(launch_env.discover(), timeout_s=60)
    t = torch.tensor([float(env.rank + 1)])
    tdist.all_reduce(t)
    # One file per rank: lines printed by two ranks into one pipe can interleave.
    with open(os.path.join(os.path.dirname(__file__), f"probe-{env.rank}.json"), "w") as fh:
        json.dump({**env.__dict__, "sum": t.item(), "args": sys.argv[1:]}, fh)
""")


def _launch_probe(tmp_path, launcher_cmd):
    script = tmp_path / "probe.py"
    script.write_text(_PROBE)
    launch_vars = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "LOCAL_SIZE", "MASTER_ADDR", "MASTER_PORT")
    env = {k: v for k, v in os.environ.items() if k not in launch_vars}
    env.update({"PYTHONPATH": os.getcwd(), "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"})
    out = subprocess.run([*launcher_cmd, str(script), "--flag"], env=env, capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    import json

    probes = [json.loads(path.read_text()) for path in sorted(tmp_path.glob("probe-*.json"))]
    assert sorted(p["rank"] for p in probes) == [0, 1], out.stdout
    assert {(p["world_size"], p["sum"]) for p in probes} == {(2, 3.0)}  # both joined one group: 1 + 2
    assert len({(p["master_addr"], p["master_port"]) for p in probes}) == 1
    assert all(p["args"][-1] == "--flag" for p in probes)
    return probes


@pytest.mark.multiproc
@pytest.mark.skipif(shutil.which("mpiexec") is None, reason="mpiexec not found (pip install mpich)")
def test_mpiexec_ranks_and_broadcast_master(tmp_path):
    # MPICH's Hydra sets PMI_RANK/PMI_SIZE and no MASTER_*: rank 0's address and free port travel over mpi4py.
    probes = _launch_probe(tmp_path, [shutil.which("mpiexec"), "-n", "2", sys.executable])
    assert {p["launcher"] for p in probes} == {"mpi"}
    assert sorted(p["local_rank"] for p in probes) == [0, 1]


@pytest.mark.multiproc
def test_torchrun_ranks(tmp_path):
    probes = _launch_probe(tmp_path, [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                                      "--master_port", str(launch_env.free_port())])
    assert {p["launcher"] for p in probes} == {"torchrun"}


@pytest.mark.multiproc
@pytest.mark.skipif(shutil.which("deepspeed") is None, reason="deepspeed launcher not on PATH")
def test_deepspeed_launcher_ranks(tmp_path):
    probes = _launch_probe(
        tmp_path, [shutil.which("deepspeed"), "--num_gpus", "2", "--master_port", str(launch_env.free_port())]
    )
    assert {p["launcher"] for p in probes} == {"deepspeed"}
    # The launcher puts --local_rank=N in front of the script's own arguments.
    assert sorted(p["args"][0] for p in probes) == ["--local_rank=0", "--local_rank=1"]
