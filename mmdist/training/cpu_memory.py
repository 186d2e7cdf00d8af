"""Keep freed memory in a CPU training process, so that each step reuses the pages of the last one.

A training step on the CPU allocates the same large temporaries every step: logits over a 30,522-word vocabulary and
their gradients, the head's and the embedding table's weight gradients, DeepSpeed's gradient buckets (tens of MB
each). glibc's malloc serves a block over its mmap threshold (32 MiB at most) with its own ``mmap`` and unmaps it on
``free``, and hands the heap's free top back to the kernel past ``M_TRIM_THRESHOLD``; the next step then faults the
same pages in again, each zero-filled by the kernel: about 350,000 page faults a step on the Q-Former demo's
stage 1, a quarter of its step on a 2-core CPU (docs/benchmarks.md). ``M_MMAP_MAX=0`` serves every block from the
heap and ``M_TRIM_THRESHOLD=-1`` never trims it, so freed blocks stay in the process for the next step. The price is
resident memory up to the heap's high-water mark (that stage: 2.5 GB instead of 1.9 GB). PyTorch's CPU tuning guide
gets the same from jemalloc or tcmalloc, preloaded before the process starts; ``mallopt`` sets glibc's malloc from
inside the process.

A setting of the process, not of a model: applied once, on a CPU device, by ``build_engine`` before it builds the
model (``engine.cpu_keep_freed_memory``; the trainer prints the reason), and left alone under any other C library.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import platform

__all__ = ["keep_freed_memory"]

# mallopt parameters (glibc's malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4

_applied: list[str] = []  # the reason, once applied in this process


def keep_freed_memory() -> tuple[bool, str]:
    """Set glibc's malloc to keep freed memory in the process (see the module doc); (whether it is set, why).

    Idempotent. Under another C library (macOS, musl) nothing changes and the reason says so.
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
