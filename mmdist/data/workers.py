"""Starting data workers in a process that has held a process group.

A DataLoader starts its workers by ``fork``: each is a copy of the parent, with every
object the parent held, garbage waiting for the collector included. When a worker's
collector then frees such an object, its destructor runs in the worker. For a gloo
process group the parent has already shut down (a stage before in the same process, as
in ``mmdist demo``; an earlier test in a test run), that destructor waits on the group's
threads, which do not exist in the child: the worker hangs for good, and the step with
it. ``gc.freeze()`` before the fork puts everything the parent holds out of the
collector's reach in the child; the parent thaws it at once.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator

__all__ = ["forking_workers"]


@contextlib.contextmanager
def forking_workers() -> Iterator[None]:
    """Around ``iter(DataLoader)`` (where its workers start): the workers never collect what the parent held."""
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()
