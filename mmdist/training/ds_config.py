"""DeepSpeed's JSON from the typed settings: the one place where micro x accumulation x world = global batch.

Raw ``engine.deepspeed`` keys are merged in, and a raw key that contradicts a typed
setting is an error naming both keys: two sources of truth for the batch size or the
ZeRO stage is how runs silently diverge. No DeepSpeed import here: plain dicts.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Iterator
from typing import Any, Optional

from mmdist.config.run import RunConfig
from mmdist.settings import ConfigError, Problem

__all__ = ["batch_layout", "deepspeed_config", "fit_micro_batch", "total_steps"]


def batch_layout(cfg: RunConfig, world_size: int) -> tuple[int, int, int]:
    """(global batch, micro batch, gradient accumulation steps) for ``world_size`` ranks; errors name the keys."""
    global_batch, micro = cfg.train.global_batch_size, cfg.train.micro_batch_size
    per_step = micro * world_size
    if world_size < 1:
        raise ConfigError([Problem("engine", f"world size must be >= 1, got {world_size}")])
    if global_batch % per_step:
        lower = max(per_step, global_batch - global_batch % per_step)
        raise ConfigError([Problem(
            "train.global_batch_size",
            f"{global_batch} is not divisible by train.micro_batch_size={micro} x world size={world_size} "
            f"(= {per_step} samples per forward pass across ranks); use a multiple of {per_step} "
            f"(e.g. {lower} or {lower + per_step}) or change train.micro_batch_size",
        )])
    return global_batch, micro, global_batch // per_step


def fit_micro_batch(cfg: RunConfig, world_size: int) -> tuple[RunConfig, Optional[str]]:
    """``cfg`` with a micro-batch that divides the global batch on ``world_size`` ranks, and a line saying so.

    The global batch is what the optimizer sees, so it never changes; the micro-batch
    (what a rank holds at once) may only go down, to the largest size that makes
    ``micro x accumulation x world = global batch``. Unchanged: ``(cfg, None)``. A
    global batch that ``world_size`` does not divide, or ``train.fit_micro_batch``
    false, leaves the error to :func:`batch_layout`.
    """
    global_batch, micro = cfg.train.global_batch_size, cfg.train.micro_batch_size
    if world_size < 1 or global_batch % (micro * world_size) == 0 or not cfg.train.fit_micro_batch:
        return cfg, None
    if global_batch % world_size:
        fits = [w for w in range(1, global_batch + 1) if global_batch % w == 0 and w <= 64]
        raise ConfigError(
            [
                Problem(
                    "train.global_batch_size",
                    f"{global_batch} samples per step cannot be split evenly "
                    f"over {world_size} ranks whatever the micro-batch; "
                    f"run on a number of ranks that divides {global_batch} "
                    f"({', '.join(map(str, fits))}) or set a global batch "
                    f"that {world_size} divides (a resumed run keeps its learning-rate schedule, "
                    "but a new global batch changes the optimisation)",
                )
            ]
        )
    per_rank = global_batch // world_size
    fitted = max(m for m in range(1, micro + 1) if per_rank % m == 0)
    out = copy.deepcopy(cfg)
    out.train = dataclasses.replace(out.train, micro_batch_size=fitted)
    return out, (
        f"[mmdist] train.micro_batch_size: {micro} -> {fitted}, so that global batch {global_batch} = {fitted} x "
        f"{per_rank // fitted} accumulation x {world_size} ranks (train.fit_micro_batch=false refuses instead)"
    )


def _typed_config(cfg: RunConfig, world_size: int) -> tuple[dict, dict[tuple[str, ...], str]]:
    """The DeepSpeed JSON from the typed settings, and which typed key produced each leaf."""
    global_batch, micro, accumulation = batch_layout(cfg, world_size)
    eng, train = cfg.engine, cfg.train
    source: dict[tuple[str, ...], str] = {}
    ds: dict[str, Any] = {}

    def put(path: tuple[str, ...], value: Any, key: Optional[str]) -> None:
        """Set a leaf; ``key`` names the typed setting that decides it (None: a default raw keys may override)."""
        node = ds
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = value
        if key is not None:
            source[path] = key

    put(("train_batch_size",), global_batch, "train.global_batch_size")
    put(("train_micro_batch_size_per_gpu",), micro, "train.micro_batch_size")
    put(("gradient_accumulation_steps",), accumulation, "train.global_batch_size")
    put(("gradient_clipping",), float(train.grad_clip), "train.grad_clip")
    put(("zero_optimization", "stage"), int(eng.zero_stage), "engine.zero_stage")
    if eng.offload_optimizer:
        put(("zero_optimization", "offload_optimizer", "device"), "cpu", "engine.offload_optimizer")
        put(("zero_optimization", "offload_optimizer", "pin_memory"), True, "engine.offload_optimizer")
    if eng.offload_params:
        put(("zero_optimization", "offload_param", "device"), "cpu", "engine.offload_params")
        put(("zero_optimization", "offload_param", "pin_memory"), True, "engine.offload_params")
    if eng.zero_stage == 3:
        # Checkpoints hold the fp32 partitions; the export gathers the trainable weights itself.
        put(("zero_optimization", "stage3_gather_16bit_weights_on_model_save"), False, None)
    put(("bf16", "enabled"), eng.precision == "bf16", "engine.precision")
    put(("fp16", "enabled"), eng.precision == "fp16", "engine.precision")
    if eng.precision == "fp16":
        # Dynamic loss scaling (loss_scale 0) starting at 2**N; overflowing steps are skipped by DeepSpeed.
        put(("fp16", "loss_scale"), 0, None)
        put(("fp16", "initial_scale_power"), int(eng.fp16_initial_scale_power), "engine.fp16_initial_scale_power")
        put(("fp16", "loss_scale_window"), 1000, None)
        put(("fp16", "hysteresis"), 2, None)
        put(("fp16", "min_loss_scale"), 1, None)
    if eng.torch_adam:
        # A client torch optimizer under ZeRO: DeepSpeed calls it "untested" but it is plain AdamW.
        put(("zero_allow_untested_optimizer",), True, "engine.torch_adam")
        if eng.offload_optimizer:
            # torch AdamW stepping the offloaded fp32 states on the CPU (slower than DeepSpeedCPUAdam, no JIT build).
            put(("zero_force_ds_cpu_optimizer",), False, "engine.torch_adam")
    else:
        put(("optimizer", "type"), "AdamW", "engine.torch_adam")
        put(("optimizer", "params", "lr"), float(train.lr), "train.lr")
        put(("optimizer", "params", "betas"), [float(b) for b in train.betas], "train.betas")
        put(("optimizer", "params", "weight_decay"), float(train.weight_decay), "train.weight_decay")
        put(("optimizer", "params", "eps"), 1e-8, None)
    # Our own tqdm bar and metrics file report progress; DeepSpeed's prints would duplicate them.
    ds["steps_per_print"] = 2**31 - 1
    ds["wall_clock_breakdown"] = False
    return ds, source


def _leaves(tree: dict, prefix: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Any]]:
    for key, value in tree.items():
        path = prefix + (str(key),)
        if isinstance(value, dict) and value:
            yield from _leaves(value, path)
        else:
            yield path, value


def _merge_into(base: dict, extra: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge_into(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def deepspeed_config(cfg: RunConfig, world_size: int) -> dict:
    """DeepSpeed's JSON config for ``cfg`` on ``world_size`` ranks.

    Raw ``engine.deepspeed`` keys are merged over the generated ones. A raw key
    that sets a different value where a typed setting already decided (the batch
    size, the ZeRO stage, the precision, ...) is a :class:`ConfigError` naming
    both keys; the same value is accepted. ``"auto"`` values are not supported:
    every value here is concrete.
    """
    if cfg.engine.zero_stage == "auto":
        raise ConfigError([Problem("engine.zero_stage", "auto is resolved for the device at start-up "
                                   "(mmdist.plan.auto.resolve_zero_stage, which build_engine and the trainer call); "
                                   "pass the resolved config, or name a stage")])
    ds, source = _typed_config(cfg, world_size)
    raw = cfg.engine.deepspeed or {}
    problems = []
    typed_leaves = dict(_leaves(ds))
    for path, value in _leaves(raw):
        raw_key = "engine.deepspeed." + ".".join(path)
        # the raw path is a typed leaf, lies below one, or is a prefix of some typed leaves
        clashes = []
        for typed_path, typed_value in typed_leaves.items():
            if typed_path not in source:
                continue
            if typed_path == path:
                if value != typed_value:
                    clashes.append((typed_path, typed_value))
            elif path[: len(typed_path)] == typed_path or typed_path[: len(path)] == path:
                clashes.append((typed_path, typed_value))
        for typed_path, typed_value in clashes:
            problems.append(Problem(
                raw_key,
                f"{value!r} conflicts with the typed setting {source[typed_path]} "
                f"(which gives {'.'.join(typed_path)}={typed_value!r}); set {source[typed_path]} instead "
                f"and drop {raw_key}",
            ))
    if problems:
        raise ConfigError(problems)
    return _merge_into(ds, raw)


def total_steps(cfg: RunConfig) -> int:
    """Optimizer steps of the run: ``train.max_steps``, or ``train.max_samples`` rounded up to whole steps."""
    steps = []
    if cfg.train.max_steps:
        steps.append(int(cfg.train.max_steps))
    if cfg.train.max_samples:
        steps.append(math.ceil(cfg.train.max_samples / cfg.train.global_batch_size))
    if not steps:
        raise ConfigError([Problem("train.max_steps", "set train.max_steps or train.max_samples")])
    return min(steps)
