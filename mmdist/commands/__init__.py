"""Every ``mmdist ...`` command: parse its arguments, call the library, print for a person, return an exit code.

One module per command, each with ``main(argv) -> int``; ``cli.py`` dispatches.
The library below never parses argv and reports through logging; this layer
imports from every other one and nothing imports it.
"""

from __future__ import annotations

import faulthandler
import functools
import sys
from collections.abc import Callable, Sequence
from typing import Any, Optional

__all__ = ["exits_on_oom", "reports_fatal_signals"]

Main = Callable[..., int]  # main(argv, **keyword options) -> exit code


def exits_on_oom(main: Main) -> Main:
    """A command's ``main`` (argv, then keyword options) that prints an out-of-memory stop and returns
    ``mmdist.oom.OOM_EXIT`` (76).

    The library's phases raise :class:`mmdist.oom.OutOfMemoryStop` with their own sizes and
    settings; an out-of-memory error from a phase without a guard gets the command's name and
    the device's memory. mmdist.oom (and so torch) is imported when the command runs, so
    ``mmdist config`` does not pay for torch.
    """
    command = main.__module__.rpartition(".")[2]

    @functools.wraps(main)
    def run(argv: Optional[Sequence[str]] = None, **options: Any) -> int:
        from mmdist.oom import OOM_EXIT, OutOfMemoryStop, oom_guard

        settings = ["the model's dtype (model.<part>.dtype=bf16 where it is fp32)", "smaller batches or shorter rows",
                    "a device with more memory"]
        try:
            with oom_guard(f"`mmdist {command}`", settings=settings):
                return main(argv, **options)
        except OutOfMemoryStop as exc:
            print(exc, file=sys.stderr, flush=True)
            return OOM_EXIT

    return run


def reports_fatal_signals() -> None:
    """Make this process print every thread's Python stack to stderr (the job log) if it dies on a fatal signal
    (SIGSEGV, SIGABRT, SIGBUS, SIGFPE, SIGILL).

    A rank killed inside native code (a collective, an allocator, a library's destructor at exit) otherwise leaves
    only torchrun's "exitcode -6" and no line of where it was. Called by the training commands' ``process_main``:
    the process exists to run the job, so it may install the handler for all of it.
    """
    if not faulthandler.is_enabled():
        faulthandler.enable(file=sys.stderr, all_threads=True)
