"""Random-init backbones (``init_config``, a custom encoder without a checkpoint): the same weights on every ZeRO stage.

Under ZeRO-3 the engine builds the model partitioned (parameters are split across
ranks as they are created, and transformers initialises afterwards through
per-module gathers). The same seed gives other random values there than in a plain
build (up to 0.14 apart in the tiny recipes), while the run's fingerprint of such a
backbone is its config and seed. So a tiny stage-1 export trained on ZeRO-2 would
be accepted by a ZeRO-3 stage 2 whose frozen tower is another one.

:func:`build_seeded` builds such a model plain first and gives the partitioned model
its values, for models up to :data:`MAX_REPRODUCIBLE_PARAMS` parameters; a larger
random model is a shape study (throughput, memory) whose values do not matter, and
is built partitioned only. This module knows nothing of DeepSpeed: the engine
declares a partitioned build with :func:`partitioned_build`, handing over how to
step outside partitioning for a moment (mmdist.training.deepspeed_compat.zero3_init).

Outside a partitioned build the model is built where torch's default device points (the
engine sets a ``torch.device("cuda:N")`` context for ZeRO 0-2, so a 14B shape study is
built on the GPU in seconds, not on the CPU): a model up to that size is still built
on the CPU, so its values do not depend on the device's RNG, and a larger one directly
on the device, through ``build_large`` when given (the loader's way to create it in
its final dtype: an fp32 14B model would not fit next to its bf16 copy).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from contextvars import ContextVar
from typing import Optional

import torch

from mmdist.models.gather import Gather, null_gather

MAX_REPRODUCIBLE_PARAMS = 200_000_000  # a plain copy is built whole on every rank for a moment (0.8 GB in fp32)


#: Set by :func:`partitioned_build`: a factory of the context in which a module is built whole, or None.
_UNPARTITIONED: ContextVar[Optional[Callable[[], AbstractContextManager]]] = ContextVar("unpartitioned", default=None)


@contextmanager
def partitioned_build(unpartitioned: Callable[[], AbstractContextManager]) -> Iterator[None]:
    """Declare that modules built inside this block are partitioned; ``unpartitioned()`` builds them whole meanwhile.

    The engine enters it around a ZeRO-3 build (its ``unpartitioned`` suspends DeepSpeed's partitioning), so
    :func:`build_seeded` can build the plain copy it copies values from.
    """
    token = _UNPARTITIONED.set(unpartitioned)
    try:
        yield
    finally:
        _UNPARTITIONED.reset(token)


def _no_init_weights() -> contextlib.AbstractContextManager:
    from transformers.initialization import no_init_weights

    return no_init_weights()


def default_build_device() -> torch.device:
    """Where a module built now lands: a ``torch.device`` context's device, else torch's default device."""
    return torch.empty(0).device


def _params_on_meta(build: Callable[[], torch.nn.Module]) -> int:
    try:
        with torch.device("meta"):
            return sum(p.numel() for p in build().parameters())
    except Exception:  # a custom class that cannot be built on the meta device: treat it as large
        return MAX_REPRODUCIBLE_PARAMS + 1


def build_seeded(build: Callable[[], torch.nn.Module], seed: int, gather: Gather = null_gather,
                 build_large: Optional[Callable[[], torch.nn.Module]] = None) -> torch.nn.Module:
    """``build()`` with torch's RNG seeded by ``seed`` (and left as it was), the same values on every ZeRO stage.

    ``gather`` is the engine's (a gather of the partitioned parameters under ZeRO-3): the plain values
    are written into the partitioned parameters through it. ``build_large`` replaces
    ``build`` for a model over :data:`MAX_REPRODUCIBLE_PARAMS` built on a device other
    than the CPU (see the module doc).
    """
    unpartitioned = _UNPARTITIONED.get()
    with torch.random.fork_rng(devices=[]):
        plain = None
        if unpartitioned is None and default_build_device().type != "cpu":
            torch.manual_seed(seed)
            if _params_on_meta(build) <= MAX_REPRODUCIBLE_PARAMS:
                with torch.device("cpu"):  # the values of a plain CPU build, whatever the device
                    return build()
            return (build_large or build)()
        if unpartitioned is not None:
            with unpartitioned():
                size = _params_on_meta(build)  # a class that cannot be built on meta: partitioned only
                if size <= MAX_REPRODUCIBLE_PARAMS:
                    torch.manual_seed(seed)
                    plain = dict(build().named_parameters())
        torch.manual_seed(seed)
        # With the plain values at hand the partitioned build skips weight init: they overwrite it, and some
        # towers' init (SigLIP's lecun_normal_) cannot compute fan-in on a 1-D ZeRO-3 partition.
        with _no_init_weights() if plain else contextlib.nullcontext():
            model = build()
        if plain and hasattr(model, "tie_weights"):
            model.tie_weights()  # what the skipped init_weights would have done besides initialising
    if plain:
        with torch.no_grad():
            for name, param in model.named_parameters():
                with gather([param]):
                    param.data.copy_(plain[name].to(param.dtype))
    return model
