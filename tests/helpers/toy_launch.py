"""Run the toy trainer worker (tests/helpers/trainer_toy.py's ``main``) under torchrun: ``launch`` starts one agent
with ``nproc`` ranks, ``launch_nodes`` one agent per simulated node on this machine. Both return rank 0's summary."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

WORKER = Path(__file__).resolve().with_name("trainer_toy.py")


def launch(
    workdir: Any,
    spec: dict,
    nproc: int = 2,
    timeout: float = 240,
    expect_rc: Optional[int] = 0,
    output: list | None = None,
) -> dict:
    """Run the worker's ``main`` under ``torchrun --nproc_per_node nproc``; returns rank 0's summary.

    ``expect_rc``: torchrun's exit code that counts as success (75 for a run stopped on a signal; None: any).
    The summary also holds every rank's (``ranks``) and the exit code (``returncode``).
    ``output``: a list that gets torchrun's (stdout, stderr). """
    import os
    import subprocess
    from pathlib import Path

    from mmdist.launch_env import free_port

    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    import uuid

    tag = uuid.uuid4().hex[:8]
    spec_file, out_file = workdir / f"spec-{tag}.json", workdir / f"out-{tag}.json"
    spec_file.write_text(json.dumps(spec))
    repo = Path(__file__).resolve().parents[2]
    env = dict(os.environ, DS_ACCELERATOR="cpu", PYTHONPATH=str(repo), OMP_NUM_THREADS="1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        str(nproc),
        "--master_port",
        str(free_port()),
        str(WORKER),
        str(spec_file),
        str(out_file),
    ]
    proc = subprocess.run(cmd, env=env, cwd=str(repo), capture_output=True, text=True, timeout=timeout)
    if output is not None:
        output.append((proc.stdout, proc.stderr))
    if expect_rc is not None and proc.returncode != expect_rc:
        raise AssertionError(
            f"torchrun exited {proc.returncode} (expected {expect_rc}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
        )
    if not out_file.exists():
        return {"returncode": proc.returncode}
    summary = json.loads(out_file.read_text())
    ranks = [Path(f"{out_file}.rank{r}") for r in range(nproc)]
    if all(p.exists() for p in ranks):  # training runs; the probes write rank 0's file only
        summary["ranks"] = [json.loads(p.read_text()) for p in ranks]
    summary["returncode"] = proc.returncode
    return summary


def launch_nodes(workdir: Any, spec: dict, nnodes: int = 2, nproc_per_node: int = 1, timeout: float = 300,
                 rendezvous: str = "c10d", expect_ok: bool = True, env: dict | None = None,
                 node_local: Sequence[Any] = ()) -> dict:
    """Run the worker's ``main`` as a ``nnodes``-node job on this machine: one ``torchrun`` agent per "node".

    Each agent gets ``--nnodes nnodes`` and its ``--node_rank``; ``rendezvous="c10d"`` joins them through a
    c10d rendezvous on 127.0.0.1 (what slurm/_launch.sh's torchrun mode does across real nodes, where the
    rendezvous assigns the node ranks), ``"static"`` through ``--master_addr/--master_port`` and the given
    node ranks. Every agent has its own TMPDIR (``workdir/node{i}-tmp``, its node-local scratch) and
    ``MMDIST_TEST_NODE=i``; the run folder, in ``spec["config"]``, is shared as on a cluster filesystem.
    Returns rank 0's summary with every rank's (``ranks``), the agents' exit codes (``returncodes``) and
    their output (``outputs``: (stdout, stderr) per agent). Raises when an agent fails, unless ``expect_ok``
    is False: then returns only ``returncodes`` and ``outputs``. ``env``: extra variables for every agent.
    ``node_local``: paths that are node-local storage: each agent runs in its own mount namespace
    (``unshare --mount``, root only; see :func:`node_local_supported`) where the path is a bind mount of
    ``workdir/node{i}-local/{j}``, so the same path holds other files on each "node", as on a cluster.
    """
    import os
    import shlex
    import subprocess
    import uuid

    from mmdist.launch_env import free_port

    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    tag = uuid.uuid4().hex[:8]
    spec_file, out_file = workdir / f"spec-{tag}.json", workdir / f"out-{tag}.json"
    spec_file.write_text(json.dumps(spec))
    repo = Path(__file__).resolve().parents[2]
    port = free_port()
    procs = []
    for node in range(nnodes):
        scratch = workdir / f"node{node}-tmp"
        scratch.mkdir(exist_ok=True)
        agent_env = dict(os.environ, DS_ACCELERATOR="cpu", PYTHONPATH=str(repo), OMP_NUM_THREADS="1",
                         MMDIST_TEST_NODE=str(node), TMPDIR=str(scratch), **(env or {}))
        for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "GROUP_RANK"):
            agent_env.pop(key, None)
        if rendezvous == "c10d":
            rdzv = ["--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", f"toy-{tag}"]
        elif rendezvous == "static":
            rdzv = ["--node_rank", str(node), "--master_addr", "127.0.0.1", "--master_port", str(port)]
        else:
            raise ValueError(f"rendezvous {rendezvous!r}: use c10d or static")
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nnodes",
            str(nnodes),
            "--nproc_per_node",
            str(nproc_per_node),
            "--max-restarts",
            "0",
            *rdzv,
            str(WORKER),
            str(spec_file),
            str(out_file),
        ]
        if node_local:
            mounts = []
            for j, target in enumerate(node_local):
                source = workdir / f"node{node}-local" / str(j)
                source.mkdir(parents=True, exist_ok=True)
                Path(target).mkdir(parents=True, exist_ok=True)
                mounts.append(f"mount --bind {shlex.quote(str(source))} {shlex.quote(str(target))} || exit 97")
            cmd = [
                "unshare",
                "--mount",
                "--propagation",
                "private",
                "sh",
                "-c",
                "; ".join(mounts) + '; exec "$@"',
                "sh",
                *cmd,
            ]
        procs.append(
            subprocess.Popen(
                cmd, env=agent_env, cwd=str(repo), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
            )
        )
    outputs, codes = [], []
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=timeout)
            outputs.append((out, err))
            codes.append(proc.returncode)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    if not expect_ok:
        return {"returncodes": codes, "outputs": outputs}
    if any(codes):
        detail = "\n".join(
            f"--- agent {i} (exit {c}):\n{o[-2000:]}\n{e[-4000:]}" for i, (c, (o, e)) in enumerate(zip(codes, outputs))
        )
        raise AssertionError(f"torchrun agents exited {codes}:\n{detail}")
    summary = json.loads(out_file.read_text())
    world = nnodes * nproc_per_node
    summary["ranks"] = [json.loads(Path(f"{out_file}.rank{r}").read_text()) for r in range(world)]
    summary["returncodes"], summary["outputs"] = codes, outputs
    return summary


def node_local_supported() -> bool:
    """Whether :func:`launch_nodes` can give each agent its own mount namespace (root with ``unshare``)."""
    import shutil
    import subprocess

    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "--mount", "--propagation", "private", "true"], capture_output=True, timeout=30)
    return probe.returncode == 0
