"""Out of device memory, in any phase: one kind of message a person can act on, and one exit code.

Each phase that can fill a device (building the engine, a training step,
evaluation, export, generation) runs inside :func:`oom_guard`. It turns torch's
``OutOfMemoryError`` (``torch.cuda.OutOfMemoryError`` is the same class) into
:class:`OutOfMemoryStop`, whose message says the phase, the sizes it was working
at, the device's memory, and the settings (by key or flag) that lower memory
there. Every command that runs a model exits with :data:`OOM_EXIT` on it
(``mmdist.commands.exits_on_oom``). A leaf module: torch only.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Optional, Union

import torch

__all__ = ["OOM_EXIT", "OutOfMemoryStop", "current_device", "human_count", "memory_summary", "oom_guard", "oom_message",
           "parameter_count"]

#: Exit code of a command that ran out of device memory: distinct from a crash (1), a bad config (2),
#: a preempted run (75, requeued) and the watchdog (124), so scripts never requeue a run that
#: would run out again. 76 is free in sysexits.h's range (EX_PROTOCOL is unused by mmdist).
OOM_EXIT = 76

Settings = Union[Sequence[str], Callable[[], Sequence[str]]]


class OutOfMemoryStop(RuntimeError):
    """A phase ran out of device memory; the message says where, at what sizes, and what to change."""

    def __init__(self, message: str, phase: str = ""):
        super().__init__(message)
        self.phase = phase


def current_device() -> torch.device:
    """This process's GPU when there is one, else the CPU: where an unnamed phase allocates."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def memory_summary(device: Any) -> str:
    """The device, and its allocated / reserved / total memory (GiB) where torch counts them."""
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available():
        gib = 2**30
        total = torch.cuda.get_device_properties(device).total_memory
        return (f"{torch.cuda.get_device_name(device)} ({device}) allocated "
                f"{torch.cuda.memory_allocated(device) / gib:.2f} GiB, reserved "
                f"{torch.cuda.memory_reserved(device) / gib:.2f} GiB, total {total / gib:.2f} GiB")
    return f"{device} (torch keeps no allocated/reserved counters for this device)"


def human_count(count: int) -> str:
    """A count as a short figure: 1.54B, 12.30M, 800."""
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if count >= scale:
            return f"{count / scale:.2f}{unit}"
    return str(count)


def parameter_count(model: Any, trainable_only: bool = False) -> str:
    """``model``'s parameters (or its trainable ones) as a short figure ('1.54B parameters'); under ZeRO-3 the
    full, not the partitioned, count."""
    count = sum(int(getattr(p, "ds_numel", p.numel())) for p in model.parameters()
                if p.requires_grad or not trainable_only)
    return f"{human_count(count)} parameters"


def _size(value: Any) -> Any:
    """A size as written; a callable is asked now (what it cannot tell is left out)."""
    if not callable(value):
        return value
    try:
        return value()
    except Exception:  # a size is a hint: never let it hide the out-of-memory report
        return None


def oom_message(phase: str, *, sizes: Mapping[str, Any], settings: Sequence[str], device: Any = None,
                notes: Sequence[str] = (), memory: Optional[str] = None) -> str:
    """The message of every out-of-memory stop: the phase and device, the sizes, notes, the settings to change.

    ``sizes`` maps a name to what the phase worked at: a value, or a callable asked
    now (None, or a callable that fails, is left out). ``memory`` is the device's
    line when the caller took it at the failure (default: :func:`memory_summary` now).
    """
    device = current_device() if device is None else device
    values = {name: _size(value) for name, value in sizes.items()}
    known = ", ".join(f"{name} {value}" for name, value in values.items() if value is not None)
    lines = [
        f"[mmdist] out of memory in {phase}: {memory or memory_summary(device)}",
        f"[mmdist] sizes: {known or 'not known at this point'}",
        *(f"[mmdist] {note}" for note in notes),
        "[mmdist] settings that lower memory: " + "; ".join(settings),
        f"[mmdist] exit code {OOM_EXIT}: change a setting and start the same command again",
    ]
    return "\n".join(lines)


@contextlib.contextmanager
def oom_guard(phase: str, *, sizes: Optional[Mapping[str, Any]] = None, settings: Settings = (), device: Any = None,
              notes: Sequence[str] = ()) -> Iterator[Mapping[str, Any]]:
    """Run a phase; torch's OutOfMemoryError in it becomes :class:`OutOfMemoryStop` with :func:`oom_message`.

    ``sizes`` is read when the error happens, so a caller may add to it as it learns
    them (the model's size once it is loaded); the context yields it for that.
    ``settings`` may be a callable, asked only then. An OutOfMemoryStop from an
    inner phase passes through unchanged: the innermost phase names the place.
    """
    sizes = {} if sizes is None else sizes
    try:
        yield sizes
    except torch.OutOfMemoryError as exc:
        advice = list(settings() if callable(settings) else settings)
        raise OutOfMemoryStop(oom_message(phase, sizes=sizes, settings=advice, device=device, notes=notes),
                              phase) from exc
