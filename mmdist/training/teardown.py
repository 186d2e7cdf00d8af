"""Undo what DeepSpeed sets up in a process, so a second run in it starts clean and no run leaks shared memory.

The ZeRO-3 setting transformers reads, DeepSpeed's process groups, the patched
``F.linear``, ZeRO-3's method caches that hold the model, and the /dev/shm buffer
of its CPU all-reduce. ``mmdist.distributed``
only creates and destroys the torch process group; this is the DeepSpeed side.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Optional

from mmdist import distributed as dist
from mmdist.training.deepspeed_compat import clear_zero3_caches, restore_torch_linear

__all__ = ["deepspeed_shm_buffer", "release_deepspeed", "remove_deepspeed_shm_buffer"]


def release_deepspeed() -> None:
    """Undo DeepSpeed's process-wide state: the ZeRO-3 setting, its process groups, this rank's shm buffer.

    * transformers' ``HfDeepSpeedConfig`` is unset, so a later ``from_pretrained`` in
      this process is not partitioned as if ZeRO-3 were still on.
    * The process group is destroyed through DeepSpeed, so it also drops its cached
      sub-groups (a later run in the same process would otherwise use groups of a
      dead process group). DeepSpeed cannot drop them alone: the default torch group
      goes with them, and ``dist.shutdown()`` afterwards finds nothing left to destroy.
    * This rank's /dev/shm all-reduce buffer is unlinked (:func:`remove_deepspeed_shm_buffer`).
    * ``torch.nn.functional.linear`` is restored (:func:`~mmdist.training.deepspeed_compat.restore_torch_linear`):
      ZeRO-3's ``zero.Init`` replaces it and leaves it so, which changed every later linear layer of the process.
    * ZeRO-3's method caches that hold the last model are cleared
      (:func:`~mmdist.training.deepspeed_compat.clear_zero3_caches`).

    Safe to call any number of times, and when DeepSpeed was never imported.
    """
    hf_deepspeed = sys.modules.get("transformers.integrations.deepspeed")
    if hf_deepspeed is not None:
        hf_deepspeed.unset_hf_deepspeed_config()
    restore_torch_linear()
    clear_zero3_caches()
    comm = sys.modules.get("deepspeed.comm")
    if comm is None:
        return
    rank = os.environ.get("RANK", "")
    if dist.is_initialized():
        rank = str(dist.rank())
        try:
            comm.destroy_process_group()
        except Exception as exc:  # teardown after a dead peer may fail; dist.shutdown() still runs
            print(f"[mmdist] releasing DeepSpeed's process groups failed: {exc}", file=sys.stderr)
    if rank.isdigit():
        remove_deepspeed_shm_buffer(int(rank))


def deepspeed_shm_buffer(rank: int, environ: Optional[Mapping[str, str]] = None) -> Path:
    """The shared-memory file DeepSpeed's CPU all-reduce creates for ``rank`` (see below)."""
    env = os.environ if environ is None else environ
    name = f"deepspeed_allreduce_buffer_{os.getuid()}_{env.get('MASTER_ADDR', '')}_{env.get('MASTER_PORT', '')}_{rank}"
    return Path("/dev/shm") / name


def remove_deepspeed_shm_buffer(rank: int) -> bool:
    """Unlink this rank's DeepSpeed CPU all-reduce buffer; True if there was one.

    With the CPU accelerator and every rank on one node, DeepSpeed 0.19 creates a
    66 MB POSIX shared-memory file per rank per process
    (``ops/csrc/cpu/comm/shm.cpp``) and never unlinks it: /dev/shm is RAM, so every
    run leaked 66 MB per rank until the machine ran out (seen here: 19 GiB after a
    day of test runs). Peers have mapped it at initialisation; unlinking at teardown
    only drops the name.
    """
    path = deepspeed_shm_buffer(rank)
    try:
        path.unlink()
        return True
    except (FileNotFoundError, PermissionError, OSError):
        return False
