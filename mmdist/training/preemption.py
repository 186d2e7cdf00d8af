"""Preemption and time limits: catch the warning signal, stop every rank at the same step, leave a marker.

A cluster ends a job in two ways it warns about: Slurm's ``--signal=USR1@LEAD``
before the time limit (and preemption, which sends SIGTERM and waits
``GraceTime``), and launchers outside Slurm (torchrun, deepspeed, mpiexec)
that forward SIGTERM to their workers. The handler here only sets a flag;
nothing happens inside the signal handler. The trainer asks at each optimizer
step boundary whether to stop, and the answer is a collective: an all-reduce
(MAX) of the flag over the default process group, so every rank stops after
the same step even when only one rank received the signal (``srun`` delivers
to all tasks, but not at the same instant: a rank that acts on its own leaves
the others waiting in the next collective). The trainer then writes a
checkpoint on every rank, rank 0 writes ``RUN_DIR/preempted.json``, and the
process exits with :data:`PREEMPTED_EXIT`.

Why both an exit code and a marker file: ``srun --kill-on-bad-exit`` kills the
remaining tasks with SIGKILL as soon as the first one exits non-zero, and
srun's own exit code is then the highest of its tasks (137 for a killed one),
so the code alone does not reliably reach the batch script. The marker, written
after the checkpoint is complete, does. slurm/_launch.sh requeues the job
when it sees either.

Cost: one 4-byte all-reduce per optimizer step (microseconds beside a step).
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any, Optional, Union

from mmdist import distributed as dist
from mmdist.atomic import write_text_atomic

__all__ = [
    "DEFAULT_SIGNALS",
    "MARKER",
    "PREEMPTED_EXIT",
    "PreemptionFlag",
    "install",
    "read_marker",
    "record_stop",
    "stop_agreed",
]

#: Exit code of a rank that stopped on a preemption/time-limit signal after writing its checkpoint.
#: 75 is EX_TEMPFAIL in sysexits.h: "a temporary failure; the user is invited to retry". Nothing else in
#: the stack uses it (Python: 1 on an exception, 2 on bad arguments; signals: 128+N; the watchdog: 124),
#: so slurm/_launch.sh can tell "checkpointed, requeue me" from a failure. slurm/_launch.sh repeats it.
PREEMPTED_EXIT = 75

#: Written by rank 0 into the run folder once the preemption checkpoint is complete.
MARKER = "preempted.json"

DEFAULT_SIGNALS: tuple[signal.Signals, ...] = (signal.SIGUSR1, signal.SIGTERM)

_Handler = Union[Callable[[int, Optional[FrameType]], Any], int, None]


class PreemptionFlag:
    """Set by SIGUSR1/SIGTERM; read at step boundaries through :func:`stop_agreed`.

    ``install()`` replaces the handlers of ``signals`` and remembers the old
    ones; ``uninstall()`` puts them back (also as a context manager), so a
    second run in the same process (stage 2 after stage 1, tests) starts clean.
    A previous handler that is a Python function (another library's) is still
    called after the flag is set; the defaults (terminate for SIGTERM and
    SIGUSR1) are not, since replacing them is the point.
    """

    def __init__(self, signals: tuple[signal.Signals, ...] = DEFAULT_SIGNALS):
        self.signals = tuple(signals)
        self.signum: Optional[int] = None
        self.received_at: Optional[float] = None
        self._previous: dict[int, _Handler] = {}

    @property
    def requested(self) -> bool:
        """True once one of the signals arrived in this process (only this rank's view)."""
        return self.signum is not None

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else ""

    def request(self, signum: int = signal.SIGUSR1) -> None:
        """Set the flag as the signal would (for callers that learn of a stop another way, and tests)."""
        if self.signum is None:
            self.signum, self.received_at = int(signum), time.time()

    def install(self) -> bool:
        """Install the handlers; False (and nothing installed) outside the main thread, where Python forbids it."""
        if threading.current_thread() is not threading.main_thread():
            return False
        for sig in self.signals:
            if sig not in self._previous:
                self._previous[sig] = signal.signal(sig, self._handle)
        return True

    def uninstall(self) -> None:
        """Put the handlers that were there before back."""
        if threading.current_thread() is not threading.main_thread():
            return
        for sig, previous in self._previous.items():
            signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
        self._previous.clear()

    def __enter__(self) -> PreemptionFlag:
        self.install()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.uninstall()

    def _handle(self, signum: int, frame: Optional[FrameType]) -> None:
        first = self.signum is None
        self.request(signum)
        if first:
            # os.write, not print: a handler may run while the main thread is inside a print to stderr.
            name = signal.Signals(signum).name
            os.write(2, f"[mmdist] {name} received (pid {os.getpid()}): stopping after the current optimizer step, "
                        "with a checkpoint\n".encode())
        previous = self._previous.get(signum)
        if callable(previous) and previous is not signal.default_int_handler:
            previous(signum, frame)


def install(signals: tuple[signal.Signals, ...] = DEFAULT_SIGNALS) -> PreemptionFlag:
    """A new flag with its handlers installed (when called from the main thread)."""
    flag = PreemptionFlag(signals)
    flag.install()
    return flag


def stop_agreed(flag: Union[PreemptionFlag, bool], device: Any = None) -> bool:
    """Whether any rank has been asked to stop; every rank gets the same answer (collective).

    Call it on every rank at the same point of every optimizer step (after
    ``engine.step()``), never conditionally, or the ranks' collectives go out of
    step. Single process (or no process group): just the local flag. ``device``:
    where the one-element tensor lives; default CUDA's current device for NCCL,
    else CPU.
    """
    local = flag.requested if isinstance(flag, PreemptionFlag) else bool(flag)
    if dist.world_size() == 1:
        return local
    import torch
    import torch.distributed as tdist

    if device is None:
        device = (
            torch.device("cuda", torch.cuda.current_device())
            if "nccl" in str(tdist.get_backend())
            else torch.device("cpu")
        )
    return dist.all_reduce([1.0 if local else 0.0], device, op="max")[0] > 0


def record_stop(run_dir: Union[str, os.PathLike], *, step: int, checkpoint: Union[str, os.PathLike, None],
                signal_name: str = "", rank: int = 0) -> Optional[Path]:
    """Rank 0 writes ``RUN_DIR/preempted.json`` (after the checkpoint is complete); other ranks do nothing.

    slurm/_launch.sh removes the marker before it starts the job step and
    requeues the job when the step leaves one behind.
    """
    if rank != 0:
        return None
    info = {
        "step": int(step),
        "checkpoint": str(checkpoint) if checkpoint is not None else None,
        "signal": signal_name,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
        "slurm_restart_count": os.environ.get("SLURM_RESTART_COUNT"),
    }
    return write_text_atomic(Path(run_dir) / MARKER, json.dumps(info, indent=2) + "\n")


def read_marker(run_dir: Union[str, os.PathLike]) -> Optional[dict]:
    """The marker's contents, or None when the last run did not stop on a signal."""
    path = Path(run_dir) / MARKER
    return json.loads(path.read_text()) if path.is_file() else None
