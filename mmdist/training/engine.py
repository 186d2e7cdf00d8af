"""The DeepSpeed engine around an mmdist model, built so that under ZeRO-3 no rank ever holds a whole frozen LLM.

An ``HfDeepSpeedConfig`` is kept alive while the model is built (transformers then
wraps ``from_pretrained``/``from_config`` in ``deepspeed.zero.Init``), our own
modules are built inside ``zero.Init`` too, and the model receives a ``gather``
callable so weights are written into gathered, not empty, parameters. The JSON
comes from ``ds_config``, the groups from ``optimizer``, the teardown from
``teardown``. DeepSpeed is imported inside functions only.
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Optional

from mmdist import distributed as dist
from mmdist.config.run import RunConfig
from mmdist.hardware import default_device
from mmdist.models.contract import ReadsOthersParameters, TrainableModel, require_trainable
from mmdist.models.gather import null_gather
from mmdist.training.deepspeed_compat import (
    destroy_engine,
    enable_frozen_gradient_checkpointing,
    zero3_init,
    zero_dim_parameters_broadcast_by_us,
)
from mmdist.training.ds_config import deepspeed_config, total_steps
from mmdist.training.oom import engine_build_guard
from mmdist.training.optimizer import build_optimizer_groups
from mmdist.training.resolve import is_resolved, resolve_run
from mmdist.training.teardown import release_deepspeed

__all__ = [
    "EngineBundle",
    "build_device",
    "build_engine",
    "gather_for",
    "read_gather_for",
]


# ---------------------------------------------------------------------------
# building the engine


def gather_for(zero_stage: int) -> Callable[[list], Any]:
    """The ``gather`` callable given to the model: a no-op below ZeRO-3, ``GatheredParameters`` at 3."""
    if zero_stage != 3:
        return null_gather
    import deepspeed

    return lambda params: deepspeed.zero.GatheredParameters(list(params), modifier_rank=0)


def read_gather_for(zero_stage: int) -> Callable[[list], Any]:
    """Like :func:`gather_for` but read-only (no rank writes back): for exports and hashing."""
    if zero_stage != 3:
        return null_gather
    import deepspeed

    return lambda params: deepspeed.zero.GatheredParameters(list(params), modifier_rank=None)


@dataclass
class EngineBundle:
    """What :func:`build_engine` returns; ``hf_ds_config`` must
    stay referenced for ZeRO-3 (transformers keeps a weakref)."""

    engine: Any  # deepspeed.DeepSpeedEngine
    model: TrainableModel
    optimizer: Any
    scheduler: Any
    ds_config: dict
    world_size: int
    total_steps: int
    gather: Callable[[list], Any]
    read_gather: Callable[[list], Any]
    hf_ds_config: Any = None
    info: dict = field(default_factory=dict)

    def close(self) -> None:
        """Release what DeepSpeed set up in this process (see :func:`release_deepspeed`); idempotent.

        Call it before ``mmdist.distributed.shutdown()``: the shm buffer's name holds
        the master address and port that shutdown() takes out of the environment.

        The engine is destroyed first (``DeepSpeedEngine.destroy``): its ZeRO optimizer's
        gradient hooks sit on the parameters, where Python's garbage collector cannot see
        them, and ZeRO-3 keeps the model on a module-level stack, so without it the engine,
        the model and their device memory outlive the run (a benchmark that builds a second
        model in the same process then holds both).
        """
        engine, self.engine, self.optimizer, self.scheduler = self.engine, None, None, None
        if engine is not None:
            try:
                destroy_engine(engine)
            except Exception as exc:  # a failed run's engine may be half-built; the process-wide release still runs
                print(f"[mmdist] destroying the DeepSpeed engine failed: {exc}", file=sys.stderr)
        self.hf_ds_config = None
        release_deepspeed()


def _ensure_cpu_accelerator() -> None:
    """DeepSpeed picks its accelerator at import; without a usable GPU it must be told 'cpu'."""
    if "DS_ACCELERATOR" in os.environ:
        return
    import torch

    if not torch.cuda.is_available():
        os.environ["DS_ACCELERATOR"] = "cpu"


def check_accelerator(backend: str) -> None:
    """Refuse a run whose process group and DeepSpeed's accelerator disagree. DeepSpeed keeps the accelerator it
    picks first in a process (``DS_ACCELERATOR``, else what it finds), so a process that once ran on the CPU
    accelerator fails deep inside DeepSpeed when it later builds an NCCL run; this says why, before the model is
    built."""
    from deepspeed.accelerator import get_accelerator

    name = get_accelerator().device_name().split(":")[0]
    if backend == "nccl" and name != "cuda":
        raise RuntimeError(
            f"engine.backend resolves to nccl (a GPU run) but DeepSpeed's accelerator in this process is {name!r} "
            f"(DS_ACCELERATOR={os.environ.get('DS_ACCELERATOR')!r}): unset DS_ACCELERATOR, or set it to cuda, "
            "before DeepSpeed is first imported, and start the run in a fresh process"
        )


def default_model_builder(cfg: RunConfig, gather: Callable[[list], Any]) -> TrainableModel:
    from mmdist.materialize import build_run_model

    return build_run_model(cfg, gather=gather)


def build_engine(
    cfg: RunConfig,
    *,
    world_size: Optional[int] = None,
    model_builder: Optional[Callable[[Any, Callable], Any]] = None,
) -> EngineBundle:
    """Build the model and wrap it in a DeepSpeed engine (the process group must exist).

    ``model_builder(cfg, gather)`` defaults to ``mmdist.materialize.build_run_model``;
    tests pass their own. Under ZeRO-3 the model is built with an
    ``HfDeepSpeedConfig`` alive and inside ``deepspeed.zero.Init``, so every
    parameter is partitioned as it is created or loaded. The caller ends with
    :meth:`EngineBundle.close`; when building fails, DeepSpeed's state is
    released here (:func:`release_deepspeed`) before the error propagates; running out
    of device memory raises :class:`~mmdist.oom.OutOfMemoryStop` with the model's size and
    the settings that shrink it. The trainer passes the config of its resolve step, used as
    it is; a config that still says ``auto`` is resolved first (mmdist.training.resolve).
    """
    try:
        if not is_resolved(cfg):  # a caller without the trainer's start-up (benchmarks, notebooks): its resolve step
            cfg = resolve_run(cfg, world_size or dist.world_size(), fit_micro_batch_to_world=False).config
        with engine_build_guard(cfg, world_size or dist.world_size()):  # out of memory: a message, not a traceback
            return _build_engine(cfg, world_size, model_builder)
    except BaseException:
        release_deepspeed()
        raise


def build_device() -> Any:
    """The ``torch.device`` context a ZeRO 0-2 model is built in: this rank's GPU (set by ``dist.init``), or a no-op
    on the CPU. transformers' ``from_pretrained`` loads into the context's device (its ``device_map`` default), a
    random ``init_config`` model is created there (mmdist.models.seeded), and plain torch layers too."""
    import contextlib

    import torch

    if default_device() != "cuda":
        return contextlib.nullcontext()
    return torch.device("cuda", torch.cuda.current_device())


def _build_engine(
    cfg: RunConfig, world_size: Optional[int], model_builder: Optional[Callable[[Any, Callable], Any]]
) -> EngineBundle:
    _ensure_cpu_accelerator()
    import deepspeed
    import torch
    import torch.distributed as tdist

    from mmdist.training.schedule import build_scheduler

    if world_size is None:
        world_size = dist.world_size()
    if dist.is_initialized():
        check_accelerator(tdist.get_backend())
        # DeepSpeed's own comm layer must wrap the existing group before zero.Init reads the world size.
        deepspeed.init_distributed(dist_backend=tdist.get_backend(), dist_init_required=False)
    ds_config = deepspeed_config(cfg, world_size)
    steps = total_steps(cfg)
    zero3 = cfg.engine.zero_stage == 3
    gather = gather_for(cfg.engine.zero_stage)
    read_gather = read_gather_for(cfg.engine.zero_stage)
    builder = model_builder or default_model_builder

    torch.manual_seed(cfg.train.seed)
    hf_ds_config = None
    if zero3:
        from transformers.integrations.deepspeed import HfDeepSpeedConfig  # only here: ~1 s of imports

        # transformers reads this through a weakref: it must outlive from_pretrained (kept in the bundle).
        hf_ds_config = HfDeepSpeedConfig(ds_config)
        try:
            with zero3_init(ds_config):  # partitioned as created; the models' seeded init steps out for a moment
                model = builder(cfg, gather)
        except RuntimeError as exc:
            if "cannot be 0 to view" not in str(exc):
                raise
            raise RuntimeError(
                "a 0-dim parameter (e.g. a learnable temperature) was created under ZeRO-3: DeepSpeed 0.19 broadcasts "
                "parameters as byte views, which fails for 0-dim tensors. Make it shape [1] in the model "
                "(see docs/design.md), or use engine.zero_stage <= 2"
            ) from exc
    else:
        with build_device():  # ZeRO 0-2: weights are created (or loaded) on the GPU, never whole on the CPU first
            model = builder(cfg, gather)

    require_trainable(model, "the engine")
    if zero3 and isinstance(model, ReadsOthersParameters):
        for module, param in model.external_parameters():  # gathered for that module's forward and backward
            deepspeed.zero.register_external_parameter(module, param)
    if cfg.stage.llm_checkpointing(cfg.model):
        enable_frozen_gradient_checkpointing(model)

    groups = build_optimizer_groups(model, cfg.train)
    warmup = math.ceil(cfg.train.warmup_ratio * steps)

    def make_scheduler(optimizer: Any) -> Any:
        return build_scheduler(cfg.train.lr_scheduler, optimizer, warmup, steps)

    # Described before initialize: DeepSpeed flattens the groups' params and the schedule rewrites their lr.
    info = {
        "world_size": world_size,
        "gradient_accumulation_steps": ds_config["gradient_accumulation_steps"],
        "warmup_steps": warmup,
        "optimizer_groups": [
            (g["name"], sum(int(getattr(p, "ds_numel", p.numel())) for p in g["params"]), g["lr"]) for g in groups
        ],
    }
    optimizer = None
    if cfg.engine.torch_adam:
        # On the CPU torch's fused AdamW: one pass over each flat partition instead of a kernel and a temporary per
        # term (the Q-Former demo's 41M trainable parameters: 27 instead of 90 ms a step on 2 cores).
        optimizer = torch.optim.AdamW(
            groups, lr=cfg.train.lr, betas=tuple(cfg.train.betas), weight_decay=cfg.train.weight_decay,
            fused=True if default_device() == "cpu" else None,
        )
    with zero_dim_parameters_broadcast_by_us(model, world_size):  # DeepSpeed 0.19 cannot broadcast 0-dim parameters
        engine, ds_optimizer, _, scheduler = deepspeed.initialize(
            model=model,
            model_parameters=groups,
            optimizer=optimizer,
            lr_scheduler=make_scheduler,
            config=ds_config,
            dist_init_required=False,
        )
    return EngineBundle(
        engine, model, ds_optimizer, scheduler, ds_config, world_size, steps, gather, read_gather, hf_ds_config, info
    )
