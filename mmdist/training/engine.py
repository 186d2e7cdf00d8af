"""The DeepSpeed engine around an mmdist model: its JSON config, the optimizer, the schedule, ZeRO-3 loading.

Three things live here and nowhere else:

* :func:`deepspeed_config` turns the typed settings into DeepSpeed's JSON. It is
  the one place where ``micro x accumulation x world = global batch`` is
  computed; raw ``engine.deepspeed`` keys are merged in, and a raw key that
  contradicts a typed setting is an error naming both keys (two sources of
  truth for the batch size or the ZeRO stage is how runs silently diverge).
* :func:`build_engine` builds the model so that, under ZeRO-3, no rank ever holds
  the whole frozen LLM: an ``HfDeepSpeedConfig`` is kept alive while the model
  is built (transformers then wraps ``from_pretrained``/``from_config`` in
  ``deepspeed.zero.Init``), our own modules are built inside ``zero.Init`` too,
  and the model receives a ``gather`` callable so stage-1 weights are written
  into gathered (not empty ``torch.Size([0])``) parameters.
* The optimizer: AdamW over ``model.trainable_groups()`` only (frozen weights get
  no optimizer state), one learning rate per group (``train.lr_multipliers``),
  no weight decay on biases and norms, a ``transformers.get_scheduler`` warmup
  schedule.
* Teardown: :meth:`EngineBundle.close` undoes what DeepSpeed set up in the
  process (the ZeRO-3 setting transformers reads, DeepSpeed's process groups,
  the /dev/shm buffer of its CPU all-reduce), so a second run in the same
  process (stage 2 after stage 1) starts clean and no run leaks shared memory.
  ``mmdist.training.dist`` only creates and destroys the torch process group.

DeepSpeed is imported inside functions only, so importing this module is cheap.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import sys
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from mmdist.models.gather import null_gather
from mmdist.precision import concrete
from mmdist.settings import ConfigError, Problem

__all__ = [
    "EngineBundle",
    "batch_layout",
    "fit_micro_batch",
    "build_engine",
    "build_optimizer_groups",
    "deepspeed_config",
    "deepspeed_shm_buffer",
    "enable_frozen_gradient_checkpointing",
    "gather_for",
    "release_deepspeed",
    "total_steps",
]


# ---------------------------------------------------------------------------
# the DeepSpeed JSON


def batch_layout(cfg: Any, world_size: int) -> tuple[int, int, int]:
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


def fit_micro_batch(cfg: Any, world_size: int) -> tuple[Any, Optional[str]]:
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
        raise ConfigError([Problem(
            "train.global_batch_size",
            f"{global_batch} samples per step cannot be split evenly over {world_size} ranks whatever the micro-batch; "
            f"run on a number of ranks that divides {global_batch} ({', '.join(map(str, fits))}) or set a global batch "
            f"that {world_size} divides (a resumed run keeps its learning-rate schedule, but a new global batch changes the optimisation)",
        )])
    per_rank = global_batch // world_size
    fitted = max(m for m in range(1, micro + 1) if per_rank % m == 0)
    out = copy.deepcopy(cfg)
    out.train = dataclasses.replace(out.train, micro_batch_size=fitted)
    return out, (f"[mmdist] train.micro_batch_size: {micro} -> {fitted}, so that global batch {global_batch} = {fitted} x "
                 f"{per_rank // fitted} accumulation x {world_size} ranks (train.fit_micro_batch=false refuses instead)")


def _typed_config(cfg: Any, world_size: int) -> tuple[dict, dict[tuple[str, ...], str]]:
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


def deepspeed_config(cfg: Any, world_size: int) -> dict:
    """DeepSpeed's JSON config for ``cfg`` on ``world_size`` ranks.

    Raw ``engine.deepspeed`` keys are merged over the generated ones. A raw key
    that sets a different value where a typed setting already decided (the batch
    size, the ZeRO stage, the precision, ...) is a :class:`ConfigError` naming
    both keys; the same value is accepted. ``"auto"`` values are not supported:
    every value here is concrete.
    """
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


def total_steps(cfg: Any) -> int:
    """Optimizer steps of the run: ``train.max_steps``, or ``train.max_samples`` rounded up to whole steps."""
    steps = []
    if cfg.train.max_steps:
        steps.append(int(cfg.train.max_steps))
    if cfg.train.max_samples:
        steps.append(math.ceil(cfg.train.max_samples / cfg.train.global_batch_size))
    if not steps:
        raise ConfigError([Problem("train.max_steps", "set train.max_steps or train.max_samples")])
    return min(steps)


# ---------------------------------------------------------------------------
# optimizer groups


# Group names the models use in trainable_groups() (see docs/design.md).
KNOWN_GROUPS = ("stage1", "projector", "text", "lora", "temperature", "llm", "vision")

_NO_DECAY_MARKERS = ("bias", "norm", "ln_", "layernorm", "embeddings.position", "temperature", "logit_scale")


def _no_decay(name: str, param: Any) -> bool:
    """Biases, norms and other 1-D tensors; by their full shape (a ZeRO-3 partition is a flat 1-D slice)."""
    lowered = name.lower()
    return len(getattr(param, "ds_shape", param.shape)) < 2 or any(marker in lowered for marker in _NO_DECAY_MARKERS)


def build_optimizer_groups(model: Any, train_cfg: Any) -> list[dict]:
    """AdamW parameter groups from ``model.trainable_groups()``.

    One group per (module group, decay or not): the learning rate is
    ``train.lr * train.lr_multipliers[group]`` (default factor 1), biases, norms
    and 1-D tensors get no weight decay. Only trainable parameters appear;
    a trainable parameter in no group, a frozen one in a group, or a multiplier
    for a group name no model uses is an error (each would silently change what trains).
    """
    named = {id(p): n for n, p in model.named_parameters()}
    groups = model.trainable_groups()
    problems = []
    for key in train_cfg.lr_multipliers:
        # A group this model happens not to have (stage1 without stage-1 weights) is fine; a name no model uses is a typo.
        if key not in groups and key not in KNOWN_GROUPS:
            problems.append(Problem(
                f"train.lr_multipliers.{key}",
                f"no such parameter group; this model has: {', '.join(sorted(groups)) or 'none'} (known group names: {', '.join(KNOWN_GROUPS)})",
            ))
    seen: set[int] = set()
    out = []
    for group_name, params in groups.items():
        factor = float(train_cfg.lr_multipliers.get(group_name, 1.0))
        decay, no_decay = [], []
        for p in params:
            name = named.get(id(p), f"{group_name}.<unnamed>")
            if not p.requires_grad:
                problems.append(Problem("model", f"trainable_groups()['{group_name}'] holds the frozen parameter {name}"))
                continue
            if id(p) in seen:
                problems.append(Problem("model", f"parameter {name} is in two trainable groups"))
                continue
            seen.add(id(p))
            (no_decay if _no_decay(name, p) else decay).append(p)
        for params_, wd, suffix in ((decay, train_cfg.weight_decay, ""), (no_decay, 0.0, ".no_decay")):
            if params_:
                out.append({
                    "params": params_,
                    "lr": train_cfg.lr * factor,
                    "weight_decay": wd,
                    "name": group_name + suffix,
                })
    missing = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in seen]
    if missing:
        problems.append(Problem("model", f"{len(missing)} trainable parameter(s) are in no trainable group (e.g. {missing[:3]}); they would never be updated"))
    if not out and not problems:
        problems.append(Problem("model", "the model has no trainable parameters: nothing to train"))
    if problems:
        raise ConfigError(problems)
    return out


# ---------------------------------------------------------------------------
# gradient checkpointing of the frozen LLM


def enable_frozen_gradient_checkpointing(model: Any) -> int:
    """Recompute the activations of every transformers decoder layer in backward; returns the layer count.

    transformers only checkpoints a layer whose ``training`` flag is set, and the
    frozen LLM stays in ``eval()`` (dropout off). So each layer's ``forward`` is
    wrapped in non-reentrant ``torch.utils.checkpoint`` directly: gradients still
    reach ``inputs_embeds`` (the projector) whether or not the inputs require
    grad, and ZeRO-3's gather hooks run again during the recompute. A layer whose
    transformers checkpointing is already active (enabled and in train mode) is
    left to it, so activations are never recomputed twice.
    """
    import torch
    import torch.utils.checkpoint as tcp
    from transformers.modeling_layers import GradientCheckpointingLayer

    count = 0
    for module in model.modules():
        if not isinstance(module, GradientCheckpointingLayer) or getattr(module, "_mmdist_checkpointed", False):
            continue
        inner = module.forward

        def forward(*args: Any, __inner: Callable = inner, __layer: Any = module, **kwargs: Any) -> Any:
            # When transformers' own checkpointing is on and active (layer in train mode), let it do the work.
            hf_active = getattr(__layer, "gradient_checkpointing", False) and __layer.training
            if torch.is_grad_enabled() and not hf_active:
                if kwargs.get("use_cache"):
                    kwargs["use_cache"] = False
                return tcp.checkpoint(__inner, *args, use_reentrant=False, **kwargs)
            return __inner(*args, **kwargs)

        module.forward = forward
        module._mmdist_checkpointed = True
        count += 1
    return count


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
    """What :func:`build_engine` returns; ``hf_ds_config`` must stay referenced for ZeRO-3 (transformers keeps a weakref)."""

    engine: Any
    model: Any
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

        Call it before ``mmdist.training.dist.shutdown()``: the shm buffer's name holds
        the master address and port that shutdown() takes out of the environment.
        """
        self.hf_ds_config = None
        release_deepspeed()


# ---------------------------------------------------------------------------
# teardown


def release_deepspeed() -> None:
    """Undo DeepSpeed's process-wide state: the ZeRO-3 setting, its process groups, this rank's shm buffer.

    * transformers' ``HfDeepSpeedConfig`` is unset, so a later ``from_pretrained`` in
      this process is not partitioned as if ZeRO-3 were still on.
    * The process group is destroyed through DeepSpeed, so it also drops its cached
      sub-groups (a later run in the same process would otherwise use groups of a
      dead process group). DeepSpeed cannot drop them alone: the default torch group
      goes with them, and ``dist.shutdown()`` afterwards finds nothing left to destroy.
    * This rank's /dev/shm all-reduce buffer is unlinked (:func:`remove_deepspeed_shm_buffer`).
    * ``torch.nn.functional.linear`` is restored: ZeRO-3's ``zero.Init`` replaces it with its
      memory-efficient wrapper and leaves it so ("persists unless manually reset"), which
      changed every later linear layer of the process (inference after training, the tests).

    Safe to call any number of times, and when DeepSpeed was never imported.
    """
    hf_deepspeed = sys.modules.get("transformers.integrations.deepspeed")
    if hf_deepspeed is not None:
        hf_deepspeed.unset_hf_deepspeed_config()
    zero_init = sys.modules.get("deepspeed.runtime.zero.partition_parameters")
    original_linear = getattr(getattr(zero_init, "InsertPostInitMethodToModuleSubClasses", None), "linear_bk", None)
    if original_linear is not None:
        import torch.nn.functional as F

        F.linear = original_linear
    comm = sys.modules.get("deepspeed.comm")
    if comm is None:
        return
    import torch.distributed as tdist

    rank = os.environ.get("RANK", "")
    if tdist.is_available() and tdist.is_initialized():
        rank = str(tdist.get_rank())
        try:
            comm.destroy_process_group()
        except Exception as exc:  # teardown after a dead peer may fail; dist.shutdown() still runs
            print(f"[mmdist] releasing DeepSpeed's process groups failed: {exc}", file=sys.stderr)
    if rank.isdigit():
        remove_deepspeed_shm_buffer(int(rank))


def deepspeed_shm_buffer(rank: int, environ: Optional[Mapping[str, str]] = None) -> Path:
    """The shared-memory file DeepSpeed's CPU all-reduce creates for ``rank`` (see below)."""
    env = os.environ if environ is None else environ
    name = f"deepspeed_allreduce_buffer_{os.getuid()}_{env.get('MASTER_ADDR', '')}_{env.get('MASTER_PORT', '')}_{rank}"
    return Path("/dev/shm") / name


def remove_deepspeed_shm_buffer(rank: int) -> bool:
    """Unlink this rank's DeepSpeed CPU all-reduce buffer; True if there was one.

    With the CPU accelerator and every rank on one node, DeepSpeed 0.19 creates a
    66 MB POSIX shared-memory file per rank per process
    (``ops/csrc/cpu/comm/shm.cpp``) and never unlinks it: /dev/shm is RAM, so every
    run leaked 66 MB per rank until the machine ran out (seen here: 19 GiB after a
    day of test runs). Peers have mapped it at initialisation; unlinking at teardown
    only drops the name.
    """
    path = deepspeed_shm_buffer(rank)
    try:
        path.unlink()
        return True
    except (FileNotFoundError, PermissionError, OSError):
        return False


def _ensure_cpu_accelerator() -> None:
    """DeepSpeed picks its accelerator at import; without a usable GPU it must be told 'cpu'."""
    if "DS_ACCELERATOR" in os.environ:
        return
    import torch

    if not torch.cuda.is_available():
        os.environ["DS_ACCELERATOR"] = "cpu"


def default_model_builder(cfg: Any, gather: Callable[[list], Any]) -> Any:
    from mmdist.materialize import build_run_model

    return build_run_model(cfg, gather=gather)


def build_engine(
    cfg: Any,
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
    released here (:func:`release_deepspeed`) before the error propagates.
    """
    try:
        return _build_engine(concrete(cfg), world_size, model_builder)
    except BaseException:
        release_deepspeed()
        raise


def _import_before_zero_init() -> None:
    """Import what transformers' model loading imports lazily, before ``zero.Init`` patches tensor creation.

    On torch 2.13 + DeepSpeed 0.19.8 the first import of ``torch._dynamo`` (pulled in by
    ``transformers.masking_utils`` and the model modules) inside ``zero.Init`` fails.
    """
    import torch._dynamo  # noqa: F401
    import transformers.masking_utils  # noqa: F401
    import transformers.modeling_utils  # noqa: F401


def _build_engine(cfg: Any, world_size: Optional[int], model_builder: Optional[Callable[[Any, Callable], Any]]) -> EngineBundle:
    _ensure_cpu_accelerator()
    import deepspeed
    import torch
    import torch.distributed as tdist
    from transformers import get_scheduler
    from transformers.integrations import HfDeepSpeedConfig

    if world_size is None:
        world_size = tdist.get_world_size() if tdist.is_initialized() else 1
    if tdist.is_initialized():
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
        # transformers reads this through a weakref: it must outlive from_pretrained (kept in the bundle).
        hf_ds_config = HfDeepSpeedConfig(ds_config)
        _import_before_zero_init()
        try:
            with deepspeed.zero.Init(config_dict_or_path=ds_config):
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
        model = builder(cfg, gather)

    if cfg.stage == "fuse" and cfg.model.llm.gradient_checkpointing:
        enable_frozen_gradient_checkpointing(model)

    groups = build_optimizer_groups(model, cfg.train)
    warmup = math.ceil(cfg.train.warmup_ratio * steps)

    def make_scheduler(optimizer: Any) -> Any:
        return get_scheduler(cfg.train.lr_scheduler, optimizer, num_warmup_steps=warmup, num_training_steps=steps)

    # Described before initialize: DeepSpeed flattens the groups' params and the schedule rewrites their lr.
    info = {
        "world_size": world_size,
        "gradient_accumulation_steps": ds_config["gradient_accumulation_steps"],
        "warmup_steps": warmup,
        "optimizer_groups": [(g["name"], sum(int(getattr(p, "ds_numel", p.numel())) for p in g["params"]), g["lr"]) for g in groups],
    }
    scalars = [p for p in model.parameters() if p.dim() == 0 and not hasattr(p, "ds_id")]
    for p in scalars:
        # DeepSpeed 0.19 broadcasts parameters as byte views, which fails for 0-dim tensors (a learnable
        # temperature): we broadcast those ourselves and mark them so DeepSpeed's broadcast skips them
        # (`ds_optim_param` only matters to OptimizedLinear offload, which we do not use).
        if tdist.is_initialized() and world_size > 1:
            tdist.broadcast(p.data, src=0)
        p.ds_optim_param = True
    optimizer = None
    if cfg.engine.torch_adam:
        optimizer = torch.optim.AdamW(groups, lr=cfg.train.lr, betas=tuple(cfg.train.betas), weight_decay=cfg.train.weight_decay)
    engine, ds_optimizer, _, scheduler = deepspeed.initialize(
        model=model,
        model_parameters=groups,
        optimizer=optimizer,
        lr_scheduler=make_scheduler,
        config=ds_config,
        dist_init_required=False,
    )
    for p in scalars:
        del p.ds_optim_param
    return EngineBundle(engine, model, ds_optimizer, scheduler, ds_config, world_size, steps, gather, read_gather, hf_ds_config, info)
