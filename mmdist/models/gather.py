"""The gather hook: how model code touches parameter data outside a forward.

Under ZeRO-3 a parameter holds only this rank's partition (an empty tensor)
except inside a forward, so model code that copies weights in (a checkpoint,
the stage-1 export, Q-Former initialisation from the text encoder) or reads
them out (an export) does so inside ``gather(params)``. The engine passes a
``GatheredParameters`` context; everywhere else it is :func:`null_gather`.
A leaf module: models, the engine and the export all use it.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext

Gather = Callable[[list], AbstractContextManager]


def null_gather(params: list) -> AbstractContextManager:
    """Default ``gather``: parameters are whole on every rank, nothing to do."""
    return nullcontext()
