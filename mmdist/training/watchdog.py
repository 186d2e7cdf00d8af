"""Hang watchdog: a rank that makes no progress for too long dumps every thread's stack and exits.

A stalled rank (a collective one peer never joins, a dead file system, a
deadlocked data worker) otherwise waits until the process-group timeout, or
forever where that timeout does not apply, and the job burns its allocation
without a word. The trainer beats the watchdog after every optimizer step; a
daemon thread checks the time since the last beat. Long phases (loading the
frozen backbones, building the engine, evaluation, saving a checkpoint) run
inside ``watchdog.phase(...)`` with their own, longer limit (or none).

When the limit passes, the thread writes every thread's Python stack
(:func:`faulthandler.dump_traceback`) to stderr (the job log) and to
``RUN_DIR/stacks/rank{N}.txt``, prints one line naming the rank, the last step
and the seconds, and ends the process with :data:`WATCHDOG_EXIT` through
``os._exit`` (the main thread is stuck, so a normal exit could not run).
``srun --kill-on-bad-exit=1`` then ends the other ranks; in a real hang they
are usually stuck as well and fire within the same poll interval, so the log
holds every rank's stack.

Every rank's watchdog also answers SIGUSR2 with a stack dump to stderr without
stopping (``scancel --signal=USR2 JOBID``): a look at a slow job without ending it.

Limit: this is a Python thread, so it needs the GIL; a C extension that holds
the GIL while blocked would stall it too. torch's collectives release the GIL
while they wait, and the process group's own timeout (``MMDIST_DIST_TIMEOUT``)
remains the backstop.
"""

from __future__ import annotations

import contextlib
import faulthandler
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Optional, Union

from mmdist.training.settings import WatchdogConfig

__all__ = ["WATCHDOG_EXIT", "Watchdog", "WatchdogConfig"]

#: Exit code of a rank the watchdog ended. 124 is what GNU ``timeout`` returns for a command that ran
#: out of time, which is what happened; it differs from PREEMPTED_EXIT (75), so the Slurm scripts never
#: requeue a hang (a deterministic hang would loop), and from a crash (1) or a signal (128+N).
WATCHDOG_EXIT = 124


class Watchdog:
    """One per process: ``start()``, ``beat(step)`` after every step, ``phase(name)`` around long work, ``stop()``.

    ``timeout_s`` 0 makes every method a no-op (no thread is started).
    ``dump_dir`` (``RUN_DIR/stacks``) gets ``rank{N}.txt``; None writes to stderr only.
    """

    def __init__(
        self,
        timeout_s: float,
        *,
        rank: int = 0,
        dump_dir: Union[str, os.PathLike, None] = None,
        phase_timeout_s: float = 0.0,
        poll_s: Optional[float] = None,
        exit_code: int = WATCHDOG_EXIT,
        dump_signal: Optional[signal.Signals] = signal.SIGUSR2,
    ):
        self.timeout_s = float(timeout_s)
        self.phase_timeout_s = float(phase_timeout_s)
        self.rank = rank
        self.dump_dir = Path(dump_dir) if dump_dir is not None else None
        self.poll_s = float(poll_s) if poll_s else max(0.05, min(10.0, self.timeout_s / 10 if self.timeout_s else 10.0))
        self.exit_code = exit_code
        self.dump_signal = dump_signal
        self.step: Optional[int] = None
        self._phase: Optional[str] = None
        self._phase_limit = 0.0
        self._last_beat = time.monotonic()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    @classmethod
    def from_config(cls, cfg: WatchdogConfig, *, rank: int, run_dir: Union[str, os.PathLike]) -> Watchdog:
        return cls(
            cfg.timeout_s,
            rank=rank,
            dump_dir=Path(run_dir) / "stacks",
            phase_timeout_s=cfg.phase_timeout_s,
            poll_s=cfg.poll_s,
        )

    @property
    def enabled(self) -> bool:
        return self.timeout_s > 0

    # -- the trainer's side ---------------------------------------------------

    def start(self) -> Watchdog:
        if not self.enabled or self._thread is not None:
            return self
        self._last_beat = time.monotonic()
        self._stop.clear()
        if self.dump_signal is not None and threading.current_thread() is threading.main_thread():
            faulthandler.register(self.dump_signal, file=_stderr(), all_threads=True, chain=False)
        self._thread = threading.Thread(target=self._watch, name=f"mmdist-watchdog-rank{self.rank}", daemon=True)
        self._thread.start()
        return self

    def beat(self, step: Optional[int] = None) -> None:
        """Progress: an optimizer step finished (or any other sign of life)."""
        if step is not None:
            self.step = step
        self._last_beat = time.monotonic()

    @contextlib.contextmanager
    def phase(self, name: str, timeout_s: Optional[float] = None) -> Iterator[None]:
        """Run a long phase under its own limit (default ``phase_timeout_s``; 0 pauses the watchdog)."""
        outer = (self._phase, self._phase_limit)
        self._phase = name
        self._phase_limit = self.phase_timeout_s if timeout_s is None else float(timeout_s)
        self.beat()
        try:
            yield
        finally:
            self._phase, self._phase_limit = outer
            self.beat()

    def stop(self) -> None:
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join(timeout=max(1.0, 2 * self.poll_s))
        self._thread = None
        if self.dump_signal is not None and threading.current_thread() is threading.main_thread():
            faulthandler.unregister(self.dump_signal)

    def __enter__(self) -> Watchdog:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- the thread -------------------------------------------------------------

    def _limit(self) -> float:
        return self._phase_limit if self._phase is not None else self.timeout_s

    def _watch(self) -> None:
        while not self._stop.wait(self.poll_s):
            limit = self._limit()
            idle = time.monotonic() - self._last_beat
            if limit > 0 and idle > limit:
                self._fire(idle, limit)

    def _fire(self, idle: float, limit: float) -> None:
        where = f"in phase {self._phase!r}" if self._phase else "in the training loop"
        last = f"after step {self.step}" if self.step is not None else "before the first step"
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        header = (
            f"[mmdist] watchdog: rank {self.rank} ({socket.gethostname()}, pid {os.getpid()}) made no progress for "
            f"{idle:.0f} s (limit {limit:g} s) {where}, {last}; stacks of every thread follow"
        )
        err = _stderr()
        dump_file = None
        try:
            err.write(f"{stamp} {header}\n")
            err.flush()
            faulthandler.dump_traceback(file=err, all_threads=True)
        except (OSError, ValueError):
            pass
        if self.dump_dir is not None:
            try:
                self.dump_dir.mkdir(parents=True, exist_ok=True)
                dump_file = self.dump_dir / f"rank{self.rank:05d}.txt"
                with open(dump_file, "a") as fh:
                    fh.write(f"{stamp} {header}\n")
                    fh.flush()
                    faulthandler.dump_traceback(file=fh, all_threads=True)
                    fh.write("\n")
            except OSError as exc:
                err.write(f"[mmdist] watchdog: could not write the stack dump into {self.dump_dir}: {exc}\n")
                dump_file = None
        try:
            err.write(
                f"[mmdist] error: rank {self.rank} hung {where} {last} for {idle:.0f} s (limit {limit:g} s); "
                f"stacks above{f' and in {dump_file}' if dump_file else ''}; exiting with code {self.exit_code}\n"
            )
            err.flush()
        finally:
            os._exit(self.exit_code)


def _stderr() -> IO[str]:
    """The process's real stderr (pytest and loggers may replace
    sys.stderr with an object without a file descriptor)."""
    for stream in (sys.stderr, sys.__stderr__):
        try:
            if stream is not None:
                stream.fileno()
                return stream
        except (AttributeError, OSError, ValueError):
            continue
    return open(2, "w", closefd=False)  # noqa: SIM115 - fd 2 stays open for the life of the process
