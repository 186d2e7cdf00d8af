"""Every use of a private DeepSpeed, torch or transformers internal, behind one door.

Each function here names one workaround: what it touches that no public API
offers, why mmdist needs it, and the public API it stands in for. Other modules
call these functions and never read a private attribute themselves, so a new
DeepSpeed or torch is checked here and in tests/training/test_deepspeed_compat.py
(which fails when an internal used here changes shape), not across the package.

Checked on deepspeed 0.19.8 with torch 2.13.0 (CPU) and transformers 5.24; the GPU
machine runs torch 2.11, where that test is the check to run. Patches that stay
installed come with their undo: a context manager, or an ``enable_*``/``disable_*``
pair. DeepSpeed is imported inside functions only: importing it picks an accelerator.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, Optional

if TYPE_CHECKING:
    from torch import nn

__all__ = [
    "CHECKED_VERSIONS",
    "OPTIMIZER_STATE_KEYS",
    "base_optimizer",
    "clear_zero3_caches",
    "destroy_engine",
    "disable_frozen_gradient_checkpointing",
    "enable_frozen_gradient_checkpointing",
    "fragment_mapped",
    "frozen_aliases_excluded",
    "import_before_zero_init",
    "link_optimizer_fragments",
    "load_scheduler_state_for_new_groups",
    "restore_scheduler",
    "restore_torch_linear",
    "set_zero3_partition",
    "suspended_zero3_init",
    "timed_zero3_fetch_release",
    "zero3_flat_fp32_partitions",
    "zero3_init",
    "zero_dim_parameters_broadcast_by_us",
    "zero_optimizer_tensors",
    "ZERO_OPTIMIZER_TENSORS",
]

#: The versions every workaround below was checked on (the GPU machine's torch 2.11: run the test there).
CHECKED_VERSIONS = {"deepspeed": ("0.19.8",), "torch": ("2.13.0",), "transformers": ("5.24",)}

OPTIMIZER_STATE_KEYS = ("exp_avg", "exp_avg_sq")  # Adam/AdamW moments (DeepSpeed's fused Adam names them alike)

_ZERO_INIT_MODULE = "deepspeed.runtime.zero.partition_parameters"
_CHECKPOINTED = "_mmdist_checkpointed"  # marks a layer whose forward enable_frozen_gradient_checkpointing wrapped


# ---------------------------------------------------------------------------
# building a model under ZeRO-3


def import_before_zero_init() -> None:
    """Import what transformers' model loading imports lazily, before ``zero.Init`` patches tensor creation.

    Why: on torch 2.13 + DeepSpeed 0.19.8 the first import of the private ``torch._dynamo`` (pulled in by
    ``transformers.masking_utils`` and the model modules) fails inside ``zero.Init``. Public API it stands in for:
    none (importing ``torch.compile``'s machinery early has no public entry point).
    """
    import torch._dynamo  # noqa: F401
    import transformers.masking_utils  # noqa: F401
    import transformers.modeling_utils  # noqa: F401


@contextlib.contextmanager
def suspended_zero3_init() -> Iterator[None]:
    """Inside an active ``zero.Init``: build modules whole for a moment (mmdist.models.seeded's plain build).

    Why: a random-init backbone must get the same values on every ZeRO stage, so it is built plain first and
    its values copied into the partitioned model. Touches ``partition_parameters.shutdown_init_context`` /
    ``restore_init_context`` (module-level, undocumented; DeepSpeed uses them around ``initialize``) and
    transformers' private ``_hf_deepspeed_config_weak_ref`` (read to put the same HfDeepSpeedConfig back).
    Public API it stands in for: none; leaving and re-entering ``deepspeed.zero.Init`` would start a new
    context with its own parameter ids.
    """
    from transformers.integrations import deepspeed as hf_deepspeed

    partition_parameters = sys.modules.get(_ZERO_INIT_MODULE)
    active = partition_parameters is not None and partition_parameters.top_level_context is not None
    ref = hf_deepspeed._hf_deepspeed_config_weak_ref
    if active:
        partition_parameters.shutdown_init_context()
    hf_deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        if ref is not None and ref() is not None:
            hf_deepspeed.set_hf_deepspeed_config(ref())
        if active:
            partition_parameters.restore_init_context()


@contextlib.contextmanager
def zero3_init(ds_config: dict) -> Iterator[None]:
    """``deepspeed.zero.Init`` for building an mmdist model: modules made inside are partitioned as they are created.

    Adds to the public context what an mmdist build needs: the imports that fail inside it
    (:func:`import_before_zero_init`) and, for the models' seeded random init, the way out of partitioning
    (``mmdist.models.seeded.partitioned_build`` with :func:`suspended_zero3_init`): model code never imports
    DeepSpeed, the engine applies it from outside. The caller keeps an ``HfDeepSpeedConfig`` alive around it.
    """
    import deepspeed

    from mmdist.models.seeded import partitioned_build

    import_before_zero_init()
    with deepspeed.zero.Init(config_dict_or_path=ds_config), partitioned_build(suspended_zero3_init):
        yield


# ---------------------------------------------------------------------------
# deepspeed.initialize


@contextlib.contextmanager
def zero_dim_parameters_broadcast_by_us(model: nn.Module, world_size: int) -> Iterator[list]:
    """Around ``deepspeed.initialize``: broadcast 0-dim parameters ourselves and hide them from DeepSpeed's broadcast.

    Why: DeepSpeed 0.19's ``_broadcast_model`` broadcasts parameters as byte views, which fails for a 0-dim
    tensor (a learnable temperature) at ZeRO stages 0-2. Its broadcast skips a parameter carrying
    ``ds_optim_param`` (meant for OptimizedLinear's offload, which mmdist does not use), so the flag is set for
    the duration of the block and removed afterwards, also when initialize fails. Public API it stands in for:
    none (``initialize`` has no switch to skip a parameter). Yields the parameters it handled.
    """
    import torch.distributed as tdist

    scalars = [p for p in model.parameters() if p.dim() == 0 and not hasattr(p, "ds_id")]
    for p in scalars:
        if tdist.is_available() and tdist.is_initialized() and world_size > 1:
            tdist.broadcast(p.data, src=0)
        p.ds_optim_param = True
    try:
        yield scalars
    finally:
        for p in scalars:
            if hasattr(p, "ds_optim_param"):
                del p.ds_optim_param


# ---------------------------------------------------------------------------
# gradient checkpointing of a frozen LLM


def enable_frozen_gradient_checkpointing(model: nn.Module) -> int:
    """Recompute the activations of every transformers decoder layer in backward; returns the layer count.

    Why: transformers only checkpoints a layer whose ``training`` flag is set, and the frozen LLM stays in
    ``eval()`` (dropout off). So each layer's ``forward`` is wrapped, on the instance, in non-reentrant
    ``torch.utils.checkpoint``: gradients still reach ``inputs_embeds`` (the projector) whether or not the
    inputs require grad, and ZeRO-3's gather hooks run again during the recompute. A layer whose transformers
    checkpointing is active (enabled and in train mode) is left to it, so activations are never recomputed
    twice. Public API it stands in for: ``PreTrainedModel.gradient_checkpointing_enable``, which does nothing
    in eval mode. Undone by :func:`disable_frozen_gradient_checkpointing`.
    """
    import torch
    import torch.utils.checkpoint as tcp
    from transformers.modeling_layers import GradientCheckpointingLayer

    count = 0
    for module in model.modules():
        if not isinstance(module, GradientCheckpointingLayer) or getattr(module, _CHECKPOINTED, False):
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

        setattr(module, _CHECKPOINTED, ("forward" in vars(module), inner))
        module.forward = forward
        count += 1
    return count


def disable_frozen_gradient_checkpointing(model: nn.Module) -> int:
    """Undo :func:`enable_frozen_gradient_checkpointing`: each wrapped layer gets its forward back; returns how many."""
    count = 0
    for module in model.modules():
        marker = vars(module).get(_CHECKPOINTED)
        if not marker:
            continue
        had_own_forward, inner = marker
        if had_own_forward:
            module.forward = inner
        else:
            del module.forward  # back to the class's method
        delattr(module, _CHECKPOINTED)
        count += 1
    return count


# ---------------------------------------------------------------------------
# teardown


def restore_torch_linear() -> bool:
    """Put back ``torch.nn.functional.linear`` if ZeRO-3's ``zero.Init`` replaced it; True if it did.

    Why: ``zero.Init`` swaps ``F.linear`` for its memory-efficient wrapper and leaves it so ("persists unless
    manually reset"), which changed every later linear layer of the process (inference after training, the
    tests). The original is kept on the private class attribute
    ``InsertPostInitMethodToModuleSubClasses.linear_bk``. Public API it stands in for: none. Safe when
    DeepSpeed was never imported.
    """
    zero_init = sys.modules.get(_ZERO_INIT_MODULE)
    original = getattr(getattr(zero_init, "InsertPostInitMethodToModuleSubClasses", None), "linear_bk", None)
    if original is None:
        return False
    import torch.nn.functional as F

    replaced = F.linear is not original
    F.linear = original
    return replaced


def destroy_engine(engine: Any) -> None:
    """Let go of everything that keeps ``engine`` and its model alive once a run is over.

    Why: ``DeepSpeedEngine.destroy`` (public) removes the ZeRO optimizer's gradient hooks, which sit on the
    parameters where Python's garbage collector cannot see them; without it the engine, the model and their device
    memory outlive the run. ZeRO-3 also pushes the model (and, in forward, its submodules) on the module-level
    list ``deepspeed.runtime.zero.parameter_offload.FWD_MODULE_STACK`` and does not take them all off: this
    engine's modules are removed from it (another live engine's stay). Public API it stands in for: none beyond
    ``destroy``.
    """
    try:
        if hasattr(engine, "destroy"):
            engine.destroy()
    finally:  # a half-built engine's destroy may fail; the stack still lets go of the model
        offload = sys.modules.get("deepspeed.runtime.zero.parameter_offload")
        stack = getattr(offload, "FWD_MODULE_STACK", None)
        module = getattr(engine, "module", None)
        if isinstance(stack, list) and module is not None:
            ours = {id(m) for m in module.modules()}
            stack[:] = [m for m in stack if id(m) not in ours]


def clear_zero3_caches() -> int:
    """Clear the ``functools.lru_cache`` methods of ZeRO-3's ``PartitionedParameterCoordinator``, found through the
    decorators that wrap them; returns how many. Safe when ZeRO-3 was never imported.

    Why: ``__params_to_release`` is an ``lru_cache`` keyed by the coordinator and each module, so the last model
    and its memory stay alive after its engine is gone. Public API it stands in for: none.
    """
    coordinator = sys.modules.get("deepspeed.runtime.zero.partitioned_param_coordinator")
    cls = getattr(coordinator, "PartitionedParameterCoordinator", None)
    if cls is None:
        return 0
    cleared = 0
    for value in vars(cls).values():
        seen, todo = set(), [value]
        while todo:  # the function, what it wraps, and the functions its closure holds
            fn = todo.pop()
            if fn is None or id(fn) in seen:
                continue
            seen.add(id(fn))
            if hasattr(fn, "cache_clear"):
                fn.cache_clear()
                cleared += 1
            todo.append(getattr(fn, "__wrapped__", None))
            todo += [held for held in map(_cell_value, getattr(fn, "__closure__", None) or ()) if callable(held)]
    return cleared


def _cell_value(cell: Any) -> Any:
    try:
        return cell.cell_contents
    except ValueError:  # an empty cell
        return None


# ---------------------------------------------------------------------------
# checkpoints


@contextlib.contextmanager
def frozen_aliases_excluded(engine: Any) -> Iterator[None]:
    """Make DeepSpeed's ``exclude_frozen_parameters`` also drop tied aliases of frozen weights while saving.

    Why: DeepSpeed 0.19 filters the state dict with ``named_parameters()``, which lists a tied weight once
    (``embed_tokens.weight``) while ``state_dict()`` holds it under every name: a frozen LLM's tied
    ``lm_head.weight`` (the whole vocabulary embedding) was written into every checkpoint. The engine's
    ``module_state_dict`` is replaced on the instance for the block (filtering with ``remove_duplicate=False``)
    and the class's method is back afterwards. Public API it stands in for: ``save_checkpoint``'s
    ``exclude_frozen_parameters``, which misses the aliases.
    """
    original = engine.module_state_dict

    def module_state_dict(*args: Any, exclude_frozen_parameters: bool = False, **kwargs: Any) -> dict:
        state = original(*args, exclude_frozen_parameters=exclude_frozen_parameters, **kwargs)
        if exclude_frozen_parameters:
            for name, param in engine.module.named_parameters(remove_duplicate=False):
                if not param.requires_grad:
                    state.pop(name, None)
        return state

    engine.module_state_dict = module_state_dict
    try:
        yield
    finally:
        del engine.module_state_dict  # back to the class's method


# ---------------------------------------------------------------------------
# optimizer state of trainable parameters (mmdist.training.trainable_state)


def base_optimizer(engine: Any) -> Any:
    """The torch optimizer inside DeepSpeed's ZeRO/bf16 wrapper (its ``optimizer`` attribute), or the optimizer."""
    optimizer = engine.optimizer
    return getattr(optimizer, "optimizer", optimizer)


def zero3_flat_fp32_partitions(engine: Any) -> list:
    """ZeRO-3's flat fp32 partitions (``fp32_partitioned_groups_flat``), which DeepSpeed puts into the base
    optimizer's groups only during its step; empty below ZeRO-3. Public API it stands in for: none."""
    return list(getattr(engine.optimizer, "fp32_partitioned_groups_flat", []) or [])


def fragment_mapped(param: Any) -> bool:
    """Whether ZeRO-1/2 (or DeepSpeed's bf16 optimizer) keeps ``param``'s optimizer state as views of its flat state
    (the private ``_hp_mapping``, None on a rank that holds no piece of it), which
    ``deepspeed.utils.safe_set_full_optimizer_state`` writes through."""
    return hasattr(param, "_hp_mapping")


#: Where DeepSpeed 0.19's optimizer wrappers keep their own tensors, by kind (attribute names, undocumented):
#: ZeRO-1/2 (stage_1_and_2), ZeRO-3 (stage3), the bf16 optimizer and ZeRO-0's fp16 optimizers (fused, unfused).
ZERO_OPTIMIZER_TENSORS = {
    "fp32_partitions": ("single_partition_of_fp32_groups", "fp32_partitioned_groups_flat",
                        "fp32_groups_flat_partition"),
    "fp32_whole": ("fp32_groups_flat", "fp32_groups"),
    "low_precision": ("bit16_groups", "fp16_groups", "bf16_groups"),
    "gradients": ("averaged_gradients", "grad_partitions_flat_buffer"),
}


def zero_optimizer_tensors(optimizer: Any, kind: str) -> list:
    """The values (tensors, or lists of them) of the wrapper attributes of ``kind`` in :data:`ZERO_OPTIMIZER_TENSORS`
    that ``optimizer`` has: for memory accounting (benchmarks/memory_per_rank.py). Public API it stands in for:
    none (DeepSpeed's ``see_memory_usage`` reports the allocator's totals, not which buffer holds what)."""
    return [value for name in ZERO_OPTIMIZER_TENSORS[kind] if (value := getattr(optimizer, name, None)) is not None]


def link_optimizer_fragments(engine: Any) -> None:
    """Point ZeRO-1/2's per-parameter views at the optimizer's flat state; no-op elsewhere.

    Why: ZeRO-1/2 (and DeepSpeed's bf16 optimizer) map each parameter to views of the flat state when the
    engine is built; a state created later (torch's AdamW at its first step, or mmdist's resume) must be
    mapped too, or ``safe_get/set_full_optimizer_state`` find no fragment ("exp_avg not found in optimizer
    state fragment"). Touches the wrapper's ``single_partition_of_fp32_groups`` / ``fp32_groups_flat_partition``,
    ``bit16_groups`` / ``bf16_groups`` and each parameter's private ``_hp_mapping.set_optim_state_fragment``.
    Public API it stands in for: none (DeepSpeed links the fragments itself only in its own step and load).
    """
    optimizer = base_optimizer(engine)
    wrapper = engine.optimizer
    flats = (getattr(wrapper, "single_partition_of_fp32_groups", None)
             or getattr(wrapper, "fp32_groups_flat_partition", None) or [])
    lows = getattr(wrapper, "bit16_groups", None) or getattr(wrapper, "bf16_groups", None) or []
    for flat, params in zip(flats, lows):
        for lp in params:
            if getattr(lp, "_hp_mapping", None) is not None and flat in optimizer.state:
                lp._hp_mapping.set_optim_state_fragment(flat, optimizer.state[flat])


def set_zero3_partition(param: Any, value: Any, key: Optional[str] = None) -> None:
    """This rank's slice of a whole fp32 tensor into ZeRO-3's fp32 partition (the master weight, or an Adam moment).

    Why: DeepSpeed 0.19's ``safe_set_full_fp32_param``/``safe_set_full_optimizer_state`` slice the unpadded
    value with the padded partition size, which fails on the last ranks whenever a parameter's size is not a
    multiple of the world size (a [1] temperature on 3 ranks). The same private calls they make
    (``param._z3_optimizer``, its ``_get_fp32_opt_state_partition`` and ``_get_param_partition_rank``, the
    partition's ``ds_tensor.ds_numel``), with the slice clipped to what exists (no NVMe swap).
    Public API it stands in for: ``deepspeed.utils.safe_set_full_fp32_param`` / ``safe_set_full_optimizer_state``.
    """
    optimizer = param._z3_optimizer
    part, _ = optimizer._get_fp32_opt_state_partition(param, release_swap_buffers=False, optim_state_key=key)
    start = optimizer._get_param_partition_rank(param) * param.ds_tensor.ds_numel
    piece = value.flatten()[start : start + part.numel()]
    part.data[: piece.numel()].copy_(piece.to(part.device, part.dtype))


def load_scheduler_state_for_new_groups(scheduler: Any, saved: dict) -> None:
    """Load a ``LambdaLR`` state saved with other optimizer groups: the step is kept, this run's base lrs stay.

    Why: ``LambdaLR.load_state_dict`` restores ``base_lrs`` and the private ``_last_lr`` (one per saved group);
    with another group layout both must be this run's, and ``get_last_lr()`` reads ``_last_lr``, which only a
    ``step()`` recomputes (stepping would advance the schedule). Public API it stands in for:
    ``load_state_dict``, which assumes the same groups.
    """
    saved = {k: v for k, v in saved.items() if k not in ("base_lrs", "_last_lr")}
    scheduler.load_state_dict(saved)
    scheduler._last_lr = [base * fn(scheduler.last_epoch) for fn, base in zip(scheduler.lr_lambdas, scheduler.base_lrs)]


def restore_scheduler(scheduler: Any, saved: dict, param_groups: list) -> None:
    """Load a scheduler's saved state, with this run's optimizer groups where they differ from the saved ones
    (:func:`load_scheduler_state_for_new_groups`), and give the groups the learning rate of the step to come.

    Why here: the groups' rates come from the scheduler's last computed rates, which the private ``_last_lr``
    holds; DeepSpeed's own checkpoint load restores them from its files, mmdist's consolidated state does not.
    """
    if len(saved.get("base_lrs", param_groups)) != len(param_groups) and hasattr(scheduler, "lr_lambdas"):
        load_scheduler_state_for_new_groups(scheduler, saved)
    else:
        scheduler.load_state_dict(saved)
    for group, lr in zip(param_groups, scheduler.get_last_lr()):
        group["lr"] = lr


# ---------------------------------------------------------------------------
# measuring ZeRO-3 (benchmarks)


@contextlib.contextmanager
def timed_zero3_fetch_release(add: Callable[[float], None]) -> Iterator[None]:
    """Within the block, ``add(seconds)`` gets the host time of every ZeRO-3 parameter fetch and release.

    Why: the benchmarks split a step into phases, and ZeRO-3's per-module hooks (gathers and frees) have no
    timer of their own. ``PartitionedParameterCoordinator.fetch_sub_module``/``release_sub_module`` (internal
    class of ``deepspeed.runtime.zero.partitioned_param_coordinator``) are wrapped on the class for the block
    and put back afterwards. Public API it stands in for: DeepSpeed's ``wall_clock_breakdown``, which does not
    time these hooks.
    """
    import time

    from deepspeed.runtime.zero.partitioned_param_coordinator import PartitionedParameterCoordinator as Coordinator

    originals = {name: vars(Coordinator)[name] for name in ("fetch_sub_module", "release_sub_module")}

    def timed(original: Callable) -> Callable:
        def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return original(self, *args, **kwargs)
            finally:
                add(time.perf_counter() - start)

        return wrapper

    for name, original in originals.items():
        setattr(Coordinator, name, timed(original))
    try:
        yield
    finally:
        for name, original in originals.items():
            setattr(Coordinator, name, original)
