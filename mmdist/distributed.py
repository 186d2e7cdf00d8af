"""Where this process sits in the default process group, and the few collectives mmdist needs.

Every helper works without a process group too (one rank: rank 0, world size 1,
collectives return their input), so the same code runs in a test, a notebook and
a job. One copy for the whole package: the trainer (:mod:`mmdist.training.dist`,
which also joins and leaves the group), the export and the contrastive loss use
these. A core leaf: imports torch lazily and nothing of mmdist.
"""

from __future__ import annotations

from typing import Any


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
    """Ranks in the default group (mmdist runs data parallel only: every rank's gradients are averaged); 1 without one."""
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
