"""Keep freed memory in a CPU training process, so that each step reuses the pages of the last one.

A training step on the CPU allocates the same large temporaries every step: logits over a 30,522-word vocabulary and
their gradients, the head's and the embedding table's weight gradients, DeepSpeed's gradient buckets (tens of MB
each). glibc's malloc serves a block over its mmap threshold (32 MiB at most) with its own ``mmap`` and unmaps it on
``free``, and hands the heap's free top back to the kernel past ``M_TRIM_THRESHOLD``; the next step then faults the
same pages in again, each zero-filled by the kernel: about 270,000 page faults a step on the Q-Former demo's
stage 1 (benchmarks/qformer_engine_step.py; docs/benchmarks.md has the figures). ``M_MMAP_MAX=0`` serves every
block from the heap and ``M_TRIM_THRESHOLD=-1`` never trims it, so freed blocks stay in the process for the next
step: that step went from 2.35 to 1.63 s on a 2-core CPU. The price is resident memory up to the heap's high-water
mark (that process: 2.24 GB instead of 1.76 GB).
PyTorch's CPU tuning guide gets the same from jemalloc or tcmalloc, preloaded before the process starts; ``mallopt``
sets glibc's malloc from inside the process.

A setting of the process, not of a model, and it cannot be undone: it is applied only where the process exists to
train, by its entry point (``mmdist train`` and ``mmdist demo`` run as commands, ``launch/train.py`` and so every
rank a launcher starts), once the config is read and before the model is built (``engine.cpu_keep_freed_memory``, a
CPU device only; the trainer prints the reason). Never in ``build_engine`` or the trainer a library caller runs in
its own process: that process (a notebook, a test run) would keep every freed page for the rest of its life, and a
process that forks later (DataLoader workers) could then find no memory left to fork with. Under any other C library
nothing changes.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import platform
from typing import Optional

from mmdist.hardware import default_device
from mmdist.training.settings import EngineConfig

__all__ = ["for_training_process", "keep_freed_memory", "keeps_freed_memory", "process_setting"]

# mallopt parameters (glibc's malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4

_applied: list[str] = []  # the reason, once applied in this process
_asked: list[str] = []  # why it is kept or not, once a training process's entry point asked


def keep_freed_memory() -> tuple[bool, str]:
    """Set glibc's malloc to keep freed memory in the process (see the module doc); (whether it is set, why).

    Idempotent. Under another C library (macOS, musl) nothing changes and the reason says so. Only a training
    process's entry point should call it (through ``for_training_process``).
    """
    if _applied:
        return True, _applied[0]
    libc_name, version = platform.libc_ver()
    if libc_name != "glibc":
        return False, f"the C library is not glibc ({libc_name or 'unknown'}): its allocator's defaults are kept"
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    if not (libc.mallopt(M_MMAP_MAX, 0) and libc.mallopt(M_TRIM_THRESHOLD, -1)):
        return False, f"glibc {version} refused mallopt(M_MMAP_MAX, 0) / mallopt(M_TRIM_THRESHOLD, -1)"
    _applied.append(f"glibc {version} malloc keeps freed memory for the next step (M_MMAP_MAX=0, "
                    "M_TRIM_THRESHOLD=-1): large temporaries are not page-faulted in again each step")
    return True, _applied[0]


def for_training_process(*engines: EngineConfig) -> Optional[str]:
    """At a training process's entry, before the model is built: keep freed memory where the process trains on a
    CPU device and every stage it trains (``engines``) has ``engine.cpu_keep_freed_memory`` on; why it is kept (or,
    under another C library, why not), None where the setting is off or the device is a GPU."""
    if not engines or not all(e.cpu_keep_freed_memory for e in engines) or default_device() != "cpu":
        return None
    why = keep_freed_memory()[1]
    _asked[:] = [why]
    return why


def process_setting() -> Optional[str]:
    """What this process's entry point set (why freed memory is kept, or why it could not be); None where no training
    entry point asked, as in any library caller's process."""
    return _asked[0] if _asked else None


def keeps_freed_memory() -> bool:
    """Whether glibc's malloc keeps freed memory in this process (set by ``keep_freed_memory``)."""
    return bool(_applied)
