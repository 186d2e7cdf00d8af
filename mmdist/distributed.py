"""The process group: join it with the launcher's ranks, leave it cleanly, and the few collectives mmdist needs.

Where this process sits in the job (torchrun, the deepspeed launcher, Slurm or
MPI) is worked out by :func:`mmdist.launch_env.discover`. :func:`init` exports
the variables torch and DeepSpeed read and creates the process group (gloo on
CPU, NCCL on GPU) with a timeout, so a collective waiting on a dead peer fails
instead of hanging; :func:`shutdown` destroys it, is idempotent and runs at exit
(also after an uncaught exception), so no rank ends in "terminate called without
an active exception".

Every other helper works without a process group too (one rank: rank 0, world
size 1, collectives return their input), so the same code runs in a test, a
notebook and a job. The one module for all of it: the trainer, evaluation, the
export and the contrastive loss use it. A core module: it imports torch lazily,
never deepspeed, and of mmdist only the launcher discovery.
"""

from __future__ import annotations

import atexit
import datetime as _dt
import os
import sys
from typing import Any, Optional

from mmdist.launch_env import DistEnv, DistError, discover

__all__ = ["DEFAULT_TIMEOUT_S", "TIMEOUT_ENV", "DistEnv", "DistError", "all_gather_object", "all_reduce", "barrier",
           "broadcast_object", "discover", "init", "is_initialized", "node_identity", "rank", "resolve_backend",
           "shutdown", "world_size"]


# ---------------------------------------------------------------------------
# where this process sits, and the collectives


def is_initialized() -> bool:
    try:
        import torch.distributed as tdist
    except ImportError:  # pragma: no cover
        return False
    return tdist.is_available() and tdist.is_initialized()


def rank() -> int:
    """This process's rank in the default group; 0 without one."""
    import torch.distributed as tdist

    return tdist.get_rank() if tdist.is_available() and tdist.is_initialized() else 0


def world_size() -> int:
    """Ranks in the default group (mmdist runs data parallel
    only: every rank's gradients are averaged); 1 without one."""
    import torch.distributed as tdist

    return tdist.get_world_size() if tdist.is_available() and tdist.is_initialized() else 1


def barrier() -> None:
    """Wait for every rank; nothing without a process group."""
    import torch.distributed as tdist

    if tdist.is_available() and tdist.is_initialized():
        tdist.barrier()


def all_reduce(values: list[float], device: Any, op: str = "sum") -> list[float]:
    """``values`` (float64) reduced over every rank with ``op`` (sum, min or max); as they are on one rank."""
    if world_size() == 1:  # no tensor: on a GPU that would be a copy to the device and a sync back, every step
        return [float(v) for v in values]
    import torch
    import torch.distributed as tdist

    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    tdist.all_reduce(tensor, op={"sum": tdist.ReduceOp.SUM, "min": tdist.ReduceOp.MIN, "max": tdist.ReduceOp.MAX}[op])
    return tensor.tolist()


def all_gather_object(obj: Any) -> list:
    """Every rank's picklable ``obj`` in rank order; ``[obj]`` on one rank."""
    import torch.distributed as tdist

    if world_size() == 1:
        return [obj]
    gathered: list[Any] = [None] * world_size()
    tdist.all_gather_object(gathered, obj)
    return gathered


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s picklable ``obj`` on every rank; ``obj`` on one rank."""
    import torch.distributed as tdist

    if world_size() == 1:
        return obj
    box = [obj]
    tdist.broadcast_object_list(box, src=src)
    return box[0]


# ---------------------------------------------------------------------------
# the process group's life


DEFAULT_TIMEOUT_S = 600.0
TIMEOUT_ENV = "MMDIST_DIST_TIMEOUT"
_atexit_registered = False
_saved_environ: dict[str, Optional[str]] = {}  # what init() overwrote, put back by shutdown()


def init(env: Optional[DistEnv] = None, backend: str = "auto", timeout_s: Optional[float] = None) -> DistEnv:
    """Export the launcher-neutral variables and create the default process group.

    ``backend``: ``auto`` (NCCL when CUDA is usable and ``DS_ACCELERATOR`` is not
    ``cpu``, else gloo), ``nccl`` or ``gloo``. ``timeout_s`` (default
    ``$MMDIST_DIST_TIMEOUT`` or 600 s) bounds every collective, so a rank whose
    peer died fails (and the launcher ends the job) instead of waiting forever.
    Calling it again when the group exists returns the env unchanged.
    """
    import torch
    import torch.distributed as tdist

    global _atexit_registered
    env = env or discover()
    exported = env.as_environ()
    if not _saved_environ:
        _saved_environ.update({key: os.environ.get(key) for key in exported})
    os.environ.update(exported)
    if timeout_s is None:
        timeout_s = float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT_S))
    backend = resolve_backend(backend)
    if backend == "nccl":
        # Errors and timeouts on NCCL collectives abort the process instead of hanging it.
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
        torch.cuda.set_device(env.local_rank % max(torch.cuda.device_count(), 1))
    if not _atexit_registered:
        atexit.register(shutdown)
        _atexit_registered = True
    if tdist.is_available() and tdist.is_initialized():
        return env
    kwargs: dict[str, Any] = {}
    if backend == "nccl":
        kwargs["device_id"] = torch.device("cuda", torch.cuda.current_device())
    try:
        tdist.init_process_group(
            backend=backend,
            init_method="env://",
            rank=env.rank,
            world_size=env.world_size,
            timeout=_dt.timedelta(seconds=timeout_s),
            **kwargs,
        )
    except Exception as exc:
        raise DistError(
            f"rank {env.rank}/{env.world_size} ({env.launcher}) could not join the process group at "
            f"{env.master_addr}:{env.master_port} with {backend}: {exc}. Check that every rank sees the same "
            "MASTER_ADDR/MASTER_PORT and that the port is reachable"
        ) from exc
    if env.world_size > 1:
        _roll_call(env)
    return env


def node_identity(env: DistEnv, environ: Optional[dict] = None) -> tuple[int, str]:
    """(node index, node name) of this process as its launcher numbers and names it.

    Slurm: ``SLURM_NODEID`` and ``SLURMD_NODENAME`` (written ``name@host`` when the
    node name is not the host name, as with several slurmd on one host);
    torchrun: the rendezvous's ``GROUP_RANK``; otherwise rank // local world size.
    """
    import socket

    environ = os.environ if environ is None else environ
    host = socket.gethostname().split(".")[0]
    for key in ("SLURM_NODEID", "GROUP_RANK"):
        if str(environ.get(key, "")).isdigit():
            index = int(environ[key])
            break
    else:
        index = env.node_rank
    name = environ.get("SLURMD_NODENAME") or host
    return index, name if name == host else f"{name}@{host}"


def _roll_call(env: DistEnv) -> None:
    """One collective at start-up; rank 0 prints which ranks run on which node (where a multi-node job landed)."""
    import torch.distributed as tdist

    mine = (env.rank, *node_identity(env))
    everyone: list = [None] * env.world_size
    tdist.all_gather_object(everyone, mine)
    if env.rank == 0:
        nodes: dict[tuple[int, str], list[int]] = {}
        for rank, index, name in everyone:
            nodes.setdefault((index, name), []).append(rank)
        where = "; ".join(f"node {index} ({name}): rank(s) {','.join(map(str, ranks))}"
                          for (index, name), ranks in sorted(nodes.items()))
        print(f"[mmdist] {env.world_size} ranks on {len(nodes)} node(s) ({env.launcher}, master "
              f"{env.master_addr}:{env.master_port}): {where}", flush=True)


def resolve_backend(backend: str = "auto") -> str:
    """``auto`` -> ``nccl`` on a usable GPU, else ``gloo``; other names pass through."""
    if backend != "auto":
        if backend not in ("nccl", "gloo"):
            raise DistError(f"engine.backend={backend!r}: use auto, nccl or gloo")
        return backend
    import torch

    on_cpu = os.environ.get("DS_ACCELERATOR", "").lower() == "cpu"
    return "nccl" if torch.cuda.is_available() and not on_cpu else "gloo"


def shutdown() -> None:
    """Destroy the default process group if there is one and put back the variables init() overwrote.

    Safe to call any number of times. Restoring the environment keeps a second
    run in the same process (tests, notebooks) from inheriting this run's rank
    variables and taking them for a torchrun launch.
    """
    try:
        import torch.distributed as tdist
    except ImportError:  # pragma: no cover
        return
    if tdist.is_available() and tdist.is_initialized():
        try:
            tdist.destroy_process_group()
        except Exception as exc:  # a dead peer can make teardown fail; exiting matters more
            print(f"[mmdist.dist] destroying the process group failed: {exc}", file=sys.stderr)
    for key, value in _saved_environ.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    _saved_environ.clear()
