"""Learning-rate schedules: warmup then constant, linear or cosine decay, built in torch.

The four common names are computed here with the same formulas as ``transformers.get_scheduler``
(a test compares every step); any other name goes to transformers. Building them here keeps
``transformers.optimization`` out of every rank's start: importing it pulls transformers'
trainer utilities, peft and bitsandbytes, about 2.7 s of CPU per process on a 2-core CPU.
"""

from __future__ import annotations

import functools
import math
from typing import Any

from torch.optim.lr_scheduler import LambdaLR

__all__ = ["BUILT_IN", "build_scheduler"]


def _warmup(step: int, warmup: int) -> float:
    return float(step) / float(max(1, warmup))


def _constant(step: int) -> float:
    return 1.0


def _constant_with_warmup(step: int, *, warmup: int) -> float:
    return _warmup(step, warmup) if step < warmup else 1.0


def _linear(step: int, *, warmup: int, total: int) -> float:
    if step < warmup:
        return _warmup(step, warmup)
    return max(0.0, float(total - step) / float(max(1, total - warmup)))


def _cosine(step: int, *, warmup: int, total: int) -> float:
    """Half a cosine from 1 to 0 over the steps after warmup (transformers' num_cycles=0.5)."""
    if step < warmup:
        return _warmup(step, warmup)
    progress = float(step - warmup) / float(max(1, total - warmup))
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))


BUILT_IN = ("constant", "constant_with_warmup", "linear", "cosine")


def build_scheduler(name: str, optimizer: Any, warmup: int, total: int) -> LambdaLR:
    """The schedule ``name`` over ``total`` optimizer steps, the first ``warmup`` of them ramping up from 0.

    Every parameter group follows the same factor of its own initial learning rate (the
    groups' multipliers stay). Names other than :data:`BUILT_IN` are passed to
    ``transformers.get_scheduler`` (which raises for unknown ones).
    """
    if name == "constant":
        factor = _constant
    elif name == "constant_with_warmup":
        factor = functools.partial(_constant_with_warmup, warmup=warmup)
    elif name == "linear":
        factor = functools.partial(_linear, warmup=warmup, total=total)
    elif name == "cosine":
        factor = functools.partial(_cosine, warmup=warmup, total=total)
    else:
        from transformers import get_scheduler

        return get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=total)
    return LambdaLR(optimizer, factor)
