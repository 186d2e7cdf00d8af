"""Where this process sits in the job: rank discovery for every launcher.

A training job is started by one of four launchers, each describing the job in
its own variables:

- ``torchrun`` (and anything torch-elastic): ``RANK``, ``WORLD_SIZE``,
  ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``;
- the ``deepspeed`` launcher: the same variables plus ``LOCAL_SIZE`` and
  ``CROSS_RANK``, and it appends ``--local_rank=N`` to the script's arguments;
- Slurm (one task per GPU with ``srun``): ``SLURM_PROCID``, ``SLURM_LOCALID``,
  ``SLURM_NTASKS``, the tasks per node and the node list, whose first host is the
  master (expanded here like ``scontrol show hostnames``; a node name that does
  not resolve is replaced by its ``NodeAddr``, see :func:`master_address`);
- MPI (``mpiexec``/``mpirun``): Open MPI's ``OMPI_COMM_WORLD_*``, MPICH/Hydra's
  ``PMI_RANK``/``PMI_SIZE``/``MPI_LOCALRANKID``, or, failing both, mpi4py; the
  master address and a free port are broadcast from rank 0 when not given.

:func:`discover` reads them (explicit ``MASTER_ADDR``/``MASTER_PORT`` always win)
and returns one :class:`DistEnv`; it has no side effects except the MPI broadcast,
so it is unit-tested with fake environments. Joining the process group with that
``DistEnv`` is :mod:`mmdist.distributed`'s job.

This module imports neither torch nor deepspeed (mpi4py only for an MPI launch
that does not name its rank or master).
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Optional

DEFAULT_PORT = 29500


class DistError(RuntimeError):
    """The launcher's variables are missing, malformed or contradict each other."""


@dataclass(frozen=True)
class DistEnv:
    """This process's place in the job, as the launcher described it."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    master_addr: str
    master_port: int
    launcher: str  # torchrun | deepspeed | slurm | mpi | single

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def node_rank(self) -> int:
        return self.rank // max(self.local_world_size, 1)

    def as_environ(self) -> dict[str, str]:
        """The variables ``torch.distributed`` (``env://``) and DeepSpeed read."""
        return {
            "RANK": str(self.rank),
            "WORLD_SIZE": str(self.world_size),
            "LOCAL_RANK": str(self.local_rank),
            "LOCAL_WORLD_SIZE": str(self.local_world_size),
            "LOCAL_SIZE": str(self.local_world_size),
            "MASTER_ADDR": self.master_addr,
            "MASTER_PORT": str(self.master_port),
        }


# ---------------------------------------------------------------------------
# discovery


def discover(
    argv: Optional[Sequence[str]] = None,
    environ: Optional[Mapping[str, str]] = None,
    *,
    comm: Any = None,
) -> DistEnv:
    """Work out rank, world size, local rank and master address from the launcher's variables.

    ``argv`` defaults to ``sys.argv`` (only ``--local_rank`` is read from it),
    ``environ`` to ``os.environ``. ``comm`` is an mpi4py communicator for the MPI
    broadcast of the master address (default: ``mpi4py.MPI.COMM_WORLD``, imported
    only when an MPI launch is detected and the address is not given).
    Precedence: torchrun / deepspeed variables, then MPI, then Slurm, then a
    single process. MPI goes before Slurm because ``mpiexec`` inside an
    ``sbatch`` script sees the batch step's ``SLURM_PROCID=0`` on every rank.
    """
    env = dict(os.environ if environ is None else environ)
    args = list(sys.argv[1:] if argv is None else argv)
    arg_local_rank = local_rank_from_argv(args)

    if arg_local_rank is not None or ("RANK" in env and "WORLD_SIZE" in env):
        return _from_torch_vars(env, arg_local_rank)
    if _mpi_detected(env):
        return _from_mpi(env, comm)
    if _slurm_step_detected(env):
        return _from_slurm(env)
    addr = env.get("MASTER_ADDR", "127.0.0.1")
    port = _int(env, "MASTER_PORT") if "MASTER_PORT" in env else free_port()
    return DistEnv(0, 1, 0, 1, addr, port, "single")


def local_rank_from_argv(argv: Sequence[str]) -> Optional[int]:
    """The ``--local_rank=N`` / ``--local-rank N`` argument the deepspeed launcher appends, if any."""
    for i, arg in enumerate(argv):
        for flag in ("--local_rank", "--local-rank"):
            if arg == flag and i + 1 < len(argv):
                return _parse_int(argv[i + 1], flag)
            if arg.startswith(flag + "="):
                return _parse_int(arg.split("=", 1)[1], flag)
    return None


def strip_local_rank(argv: Sequence[str]) -> list[str]:
    """``argv`` without the deepspeed launcher's ``--local_rank`` argument (for argparse-free parsers)."""
    out, skip = [], False
    for i, arg in enumerate(argv):
        if skip:
            skip = False
            continue
        if arg in ("--local_rank", "--local-rank"):
            skip = i + 1 < len(argv)
            continue
        if arg.startswith(("--local_rank=", "--local-rank=")):
            continue
        out.append(arg)
    return out


def _from_torch_vars(env: dict, arg_local_rank: Optional[int]) -> DistEnv:
    is_deepspeed = arg_local_rank is not None or "CROSS_RANK" in env
    launcher = "deepspeed" if is_deepspeed else "torchrun"
    if "RANK" not in env or "WORLD_SIZE" not in env:
        raise DistError(
            f"--local_rank={arg_local_rank} was given but RANK/WORLD_SIZE are not set: start the script with the "
            "`deepspeed` launcher (which sets both), or drop --local_rank"
        )
    rank, world = _int(env, "RANK"), _int(env, "WORLD_SIZE")
    if arg_local_rank is not None:
        local_rank = arg_local_rank
    else:
        local_rank = _int(env, "LOCAL_RANK") if "LOCAL_RANK" in env else 0
    # Each launcher's own variable first: a stale one inherited from the parent shell must not win.
    for key in ("LOCAL_SIZE", "LOCAL_WORLD_SIZE") if is_deepspeed else ("LOCAL_WORLD_SIZE", "LOCAL_SIZE"):
        if key in env:
            local_world = _int(env, key)
            break
    else:
        local_world = world  # an old launcher without the variable: assume one node
    port = _int(env, "MASTER_PORT") if "MASTER_PORT" in env else DEFAULT_PORT
    return _checked(DistEnv(rank, world, local_rank, local_world, env.get("MASTER_ADDR", "127.0.0.1"), port, launcher))


_MPI_MARKERS = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "PMI_FD", "MV2_COMM_WORLD_SIZE", "HYDRA_CONTROL_FD")


def _mpi_detected(env: Mapping[str, str]) -> bool:
    return any(key in env for key in _MPI_MARKERS)


def _from_mpi(env: dict, comm: Any) -> DistEnv:
    """Open MPI, MPICH/Hydra, MVAPICH variables; mpi4py when none of them give the rank."""
    rank = world = local_rank = local_world = None
    for r, s, lr, ls in (
        ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_SIZE"),
        ("PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID", "MPI_LOCALNRANKS"),
        ("MV2_COMM_WORLD_RANK", "MV2_COMM_WORLD_SIZE", "MV2_COMM_WORLD_LOCAL_RANK", "MV2_COMM_WORLD_LOCAL_SIZE"),
    ):
        if r in env and s in env:
            rank, world = _int(env, r), _int(env, s)
            local_rank = _int(env, lr) if lr in env else None
            local_world = _int(env, ls) if ls in env else None
            break
    need_comm = rank is None or local_rank is None or "MASTER_ADDR" not in env or "MASTER_PORT" not in env
    if need_comm and comm is None:
        comm = _mpi_world()
    if rank is None:
        rank, world = comm.Get_rank(), comm.Get_size()
    if local_rank is None:
        node = comm.Split_type(_mpi_shared_type(), key=rank)
        local_rank, local_world = node.Get_rank(), node.Get_size()
        node.Free()
    if local_world is None:
        local_world = world
    addr, port = env.get("MASTER_ADDR"), env.get("MASTER_PORT")
    if addr is None or port is None:
        # Rank 0 names itself and a free port; everyone else takes its word.
        mine = (addr or _host_address(), int(port) if port else free_port()) if rank == 0 else None
        addr, port = comm.bcast(mine, root=0)
    return _checked(DistEnv(rank, world, local_rank, local_world, str(addr), int(port), "mpi"))


def _mpi_world() -> Any:
    try:
        from mpi4py import MPI
    except ImportError as exc:  # pragma: no cover - mpi4py is a dependency
        raise DistError(
            "an MPI launch was detected (PMI/OMPI variables) but mpi4py cannot be imported to read the rank: "
            f"{exc}. Install mpi4py built against the same MPI as mpiexec, or set MASTER_ADDR/MASTER_PORT"
        ) from exc
    return MPI.COMM_WORLD


def _mpi_shared_type() -> Any:
    from mpi4py import MPI

    return MPI.COMM_TYPE_SHARED


def _slurm_step_detected(env: Mapping[str, str]) -> bool:
    # Only a job *step* (srun) has one process per task; the batch script itself
    # runs once per job even when SLURM_NTASKS says 8, so it is a single process.
    return "SLURM_PROCID" in env and ("SLURM_STEP_ID" in env or "SLURM_STEPID" in env) and _slurm_step_is_not_batch(env)


def _slurm_step_is_not_batch(env: Mapping[str, str]) -> bool:
    step = env.get("SLURM_STEP_ID", env.get("SLURM_STEPID", ""))
    # The batch step's id is reported as "batch" or 4294967294 (SLURM_BATCH_SCRIPT) by different versions.
    return step not in ("batch", "extern", "4294967294", "4294967295")


def _from_slurm(env: dict) -> DistEnv:
    rank = _int(env, "SLURM_PROCID")
    world = _int(env, "SLURM_STEP_NUM_TASKS") if "SLURM_STEP_NUM_TASKS" in env else _int(env, "SLURM_NTASKS")
    local_rank = _int(env, "SLURM_LOCALID") if "SLURM_LOCALID" in env else 0
    local_world = _slurm_local_world_size(env)
    addr = env.get("MASTER_ADDR")
    if not addr:
        nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
        if not nodelist:
            raise DistError("srun step without SLURM_JOB_NODELIST: cannot tell the master node; set MASTER_ADDR")
        addr = master_address(nodelist, env)
    if "MASTER_PORT" in env:
        port = _int(env, "MASTER_PORT")
    else:
        # Derived from the job id so two jobs sharing a node do not collide, and the same on every rank.
        job = env.get("SLURM_JOB_ID", env.get("SLURM_JOBID", "0"))
        port = 20000 + int(job) % 20000 if job.isdigit() else DEFAULT_PORT
    return _checked(DistEnv(rank, world, local_rank, local_world, addr, port, "slurm"))


def _slurm_local_world_size(env: Mapping[str, str]) -> int:
    for key in ("SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE"):
        if key in env:
            counts = tasks_per_node(env[key])
            node = _int(env, "SLURM_NODEID") if "SLURM_NODEID" in env else 0
            if node >= len(counts):
                raise DistError(f"{key}={env[key]!r} lists {len(counts)} nodes but SLURM_NODEID={node}")
            return counts[node]
    if "SLURM_NTASKS_PER_NODE" in env:
        return _int(env, "SLURM_NTASKS_PER_NODE")
    return 1


def tasks_per_node(spec: str) -> list[int]:
    """Expand Slurm's tasks-per-node notation: ``"2(x3),1"`` -> ``[2, 2, 2, 1]``."""
    out = []
    for part in spec.split(","):
        m = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", part)
        if not m:
            raise DistError(f"cannot read the Slurm tasks-per-node value {spec!r} (expected e.g. '2(x3),1')")
        out += [int(m.group(1))] * int(m.group(2) or 1)
    return out


# ---------------------------------------------------------------------------
# Slurm host lists


def master_address(nodelist: str, environ: Optional[Mapping[str, str]] = None) -> str:
    """The rendezvous host of a Slurm allocation: its first node, by a name or address the nodes can reach.

    Slurm lists nodes by ``NodeName``; the network knows them by ``NodeAddr``
    (which defaults to the same name). Where the first name resolves, it is the
    master address as is: the usual cluster, whose node names are host names.
    Where it does not (node names that are aliases, such as a cluster naming
    nodes by rack position, or several slurmd on one host as in the tests),
    the node's ``NodeAddr`` from ``scontrol show node NAME`` is used. When
    neither works the name is returned, and the rendezvous error will name it.
    slurm/_launch.sh applies the same rule before it exports ``MASTER_ADDR``.
    """
    first = hostnames(nodelist)[0]
    if _resolves(first):
        return first
    return node_address(first, environ) or first


def node_address(node: str, environ: Optional[Mapping[str, str]] = None) -> Optional[str]:
    """``NodeAddr`` of a Slurm node (``scontrol show node``), or None without scontrol or an answer."""
    if not shutil.which("scontrol"):
        return None
    env = {**os.environ, **(environ or {})}
    try:
        out = subprocess.run(
            ["scontrol", "show", "node", "-o", node], capture_output=True, text=True, timeout=30, env=env
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    m = re.search(r"(?:^|\s)NodeAddr=(\S+)", out.stdout) if out.returncode == 0 else None
    return m.group(1) if m else None


def _resolves(host: str) -> bool:
    try:
        socket.getaddrinfo(host, None)
        return True
    except (OSError, UnicodeError):
        return False


def hostnames(nodelist: str, *, use_scontrol: bool = True) -> list[str]:
    """Expand a Slurm host list like ``scontrol show hostnames``: ``node[01-03,07],gpu5`` -> 5 names.

    Written here (not only a call to scontrol) because compute nodes of some
    clusters, and containers, have no Slurm client installed. When the string is
    not in a form this parser knows, ``scontrol show hostnames`` decides.
    """
    try:
        return expand_hostlist(nodelist)
    except ValueError as exc:
        if use_scontrol and shutil.which("scontrol"):
            out = subprocess.run(
                ["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, timeout=30
            )
            if out.returncode == 0 and out.stdout.split():
                return out.stdout.split()
        raise DistError(f"cannot expand the Slurm node list {nodelist!r}: {exc}") from exc


def expand_hostlist(nodelist: str) -> list[str]:
    """Pure-Python Slurm host-list expansion; raises ValueError on malformed input.

    Handles comma-separated items, several bracket groups per name
    (``rack[1-2]-n[1-2]`` -> 4 names, first bracket outermost), ranges that keep
    zero padding (``[08-10]`` -> 08, 09, 10) and stepless lists inside brackets.
    """
    names: list[str] = []
    for item in _split_top_level(nodelist.strip()):
        names += _expand_item(item)
    if not names:
        raise ValueError("empty host list")
    return names


def _split_top_level(text: str) -> list[str]:
    items, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch == "[":
            depth += 1
            if depth > 1:
                raise ValueError(f"nested '[' at position {i}")
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise ValueError(f"unmatched ']' at position {i}")
        elif ch == "," and depth == 0:
            items.append(text[start:i])
            start = i + 1
    if depth != 0:
        raise ValueError("unclosed '['")
    items.append(text[start:])
    if any(not item.strip() for item in items):
        raise ValueError("empty item between commas")
    return [item.strip() for item in items]


def _expand_item(item: str) -> list[str]:
    m = re.search(r"\[([^\]]*)\]", item)
    if not m:
        if re.search(r"[\s\[\]]", item):
            raise ValueError(f"bad host name {item!r}")
        return [item]
    prefix, rest = item[: m.start()], item[m.end():]
    tails = _expand_item(rest) if rest else [""]
    return [prefix + value + tail for value in _expand_range_list(m.group(1)) for tail in tails]


def _expand_range_list(body: str) -> list[str]:
    values = []
    for part in body.split(","):
        part = part.strip()
        if re.fullmatch(r"\d+", part):
            values.append(part)
            continue
        m = re.fullmatch(r"(\d+)-(\d+)", part)
        if not m:
            raise ValueError(f"bad range {part!r} in [{body}]")
        lo, hi = m.group(1), m.group(2)
        if int(hi) < int(lo):
            raise ValueError(f"range {part!r} runs backwards")
        width = len(lo) if lo.startswith("0") and len(lo) > 1 else 0
        values += [str(n).zfill(width) for n in range(int(lo), int(hi) + 1)]
    return values


# ---------------------------------------------------------------------------
# helpers


def free_port() -> int:
    """A TCP port that was free a moment ago (for single-process and MPI rank-0 use)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]


def _host_address() -> str:
    host = socket.gethostname()
    try:
        return socket.gethostbyname(host)
    except OSError:
        return host


def _int(env: Mapping[str, str], key: str) -> int:
    return _parse_int(env[key], key)


def _parse_int(value: str, key: str) -> int:
    try:
        return int(str(value).strip())
    except ValueError:
        raise DistError(f"{key}={value!r} is not an integer; check how the job was launched") from None


def _checked(env: DistEnv) -> DistEnv:
    problems = []
    if env.world_size < 1:
        problems.append(f"world size {env.world_size} < 1")
    if not 0 <= env.rank < env.world_size:
        problems.append(f"rank {env.rank} outside [0, {env.world_size})")
    if env.local_world_size < 1 or not 0 <= env.local_rank < env.local_world_size:
        problems.append(f"local rank {env.local_rank} outside [0, {env.local_world_size})")
    if not 0 < env.master_port < 65536:
        problems.append(f"master port {env.master_port} out of range")
    if problems:
        raise DistError(f"inconsistent {env.launcher} launch variables: {'; '.join(problems)}")
    return env
