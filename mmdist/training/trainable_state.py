"""The trainable side of a checkpoint in a form that does not depend on the world size (elastic resume).

DeepSpeed's files hold per-rank ZeRO partitions. Beside them rank 0 writes
``trainable_state.pt``: the fp32 master and Adam moments of every trainable
parameter, gathered whole (DeepSpeed's ``safe_get_full_*``; under ZeRO-3 each call
is a collective), with the optimizer's step count and the LR scheduler. Another
world size (or another optimizer-group layout) loads it into a fresh engine here.
The trainable side is small (connector, stage-1 module, LoRA), so this costs three
fp32 copies of it. The private DeepSpeed internals this needs (ZeRO-3 partitions, ZeRO-1/2
fragments) are mmdist.training.deepspeed_compat's.
"""

from __future__ import annotations

from typing import Any, Optional

from mmdist import distributed as dist
from mmdist.training.deepspeed_compat import (
    OPTIMIZER_STATE_KEYS,
    base_optimizer,
    fragment_mapped,
    link_optimizer_fragments,
    restore_scheduler,
    set_zero3_partition,
    zero3_flat_fp32_partitions,
)

__all__ = ["CheckpointError", "OPTIMIZER_KEYS", "TRAINABLE_STATE", "gather_trainable_state", "load_trainable_state"]

TRAINABLE_STATE = "trainable_state.pt"
OPTIMIZER_KEYS = OPTIMIZER_STATE_KEYS  # the Adam/AdamW moments saved


class CheckpointError(RuntimeError):
    """A checkpoint could not be written or read back (defined here, the lowest module that raises it)."""


def group_names(engine: Any) -> list[str]:
    return [str(g.get("name", i)) for i, g in enumerate(base_optimizer(engine).param_groups)]


def groups_changed(engine: Any, saved: Optional[list[str]]) -> bool:
    """Whether the checkpoint's optimizer groups differ from ``engine``'s. A checkpoint without the record (from a
    version that did not write it) has this run's groups, except under ZeRO-3, where such a version put every group in
    ``.no_decay``."""
    if not hasattr(engine, "optimizer"):
        return False
    mine = group_names(engine)
    if saved is None:
        zero3 = any(hasattr(p, "ds_id") for p in engine.module.parameters())
        return zero3 and any(not name.endswith(".no_decay") for name in mine)
    return list(saved) != mine


def _trainable(engine: Any) -> list[tuple[str, Any]]:
    """The trainable parameters by name, sorted: the same order on every rank (each ZeRO-3 call is a collective)."""
    return sorted(((n, p) for n, p in engine.module.named_parameters() if p.requires_grad), key=lambda item: item[0])


def _optimizer_step(engine: Any) -> Optional[int]:
    """Adam's step count (the bias correction), the same in every state entry of the base optimizer."""
    for state in base_optimizer(engine).state.values():
        if "step" in state:
            return int(state["step"])
    for group in base_optimizer(engine).param_groups:  # DeepSpeed's fused Adam counts in the group
        if "step" in group:
            return int(group["step"])
    return None


def gather_trainable_state(engine: Any) -> dict:
    """Every trainable parameter's fp32 master and Adam moments, whole, on every rank (collective), with the step
    count and the LR scheduler: a state that does not depend on the world size."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    params, moments = {}, {k: {} for k in OPTIMIZER_KEYS}
    plain = base_optimizer(engine).state
    link_optimizer_fragments(engine)  # torch's AdamW creates its state after DeepSpeed mapped the fragments
    for name, param in _trainable(engine):
        full = safe_get_full_fp32_param(param)
        params[name] = (full if full is not None else param.detach()).float().cpu().clone()
        for key in OPTIMIZER_KEYS:
            value = safe_get_full_optimizer_state(param, key)
            if value is None and param in plain and key in plain[param]:  # no ZeRO, fp32: torch's own state
                value = plain[param][key]
            if value is not None:
                moments[key][name] = value.float().cpu().clone().reshape(params[name].shape)
    scheduler = getattr(engine, "lr_scheduler", None)
    return {
        "version": 1,
        "world_size": dist.world_size(),
        "params": params,
        "optimizer": moments,
        "optimizer_step": _optimizer_step(engine),
        "global_steps": int(getattr(engine, "global_steps", 0)),
        "global_samples": int(getattr(engine, "global_samples", 0)),
        "lr_scheduler": scheduler.state_dict() if scheduler is not None else None,
    }


def _ensure_adam_state(engine: Any) -> None:
    """Create Adam's state where a fresh optimizer has none yet (torch and DeepSpeed create it at the first step,
    and only where it is empty), so the saved moments have somewhere to go.

    The tensors it is keyed by: the base optimizer's parameters (no ZeRO, ZeRO-1/2's flat fp32 partitions) and
    ZeRO-3's flat fp32 partitions, which DeepSpeed puts into the base optimizer's groups only during its step.
    """
    import torch

    optimizer = base_optimizer(engine)
    amsgrad = any(group.get("amsgrad") for group in optimizer.param_groups)
    tensors = [p for group in optimizer.param_groups for p in group["params"]]
    tensors += zero3_flat_fp32_partitions(engine)
    for p in tensors:
        if not optimizer.state.get(p):
            entry = {"step": torch.tensor(0.0), "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
                     "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format)}
            if amsgrad:
                entry["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            optimizer.state[p] = entry
    link_optimizer_fragments(engine)


def load_trainable_state(engine: Any, state: dict, *, source: Any = TRAINABLE_STATE) -> None:
    """Put a :func:`gather_trainable_state` result into a freshly built engine of any world size (collective).

    The fp32 masters and moments go into this rank's ZeRO partitions, the
    compute copy of each weight is overwritten too (under ZeRO-3 through a
    gather that rank 0 modifies), and the step count and scheduler follow.
    """
    import torch
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    trainable = _trainable(engine)
    names = [n for n, _ in trainable]
    missing, unknown = sorted(set(names) - set(state["params"])), sorted(set(state["params"]) - set(names))
    if missing or unknown:
        raise CheckpointError(
            f"{source}: trainable parameters differ from this model's (missing {missing[:5]}, unknown "
            f"{unknown[:5]}): the checkpoint belongs to another model or freezing setup"
        )
    _ensure_adam_state(engine)
    plain = base_optimizer(engine).state
    for name, param in trainable:
        value = state["params"][name]
        shape = tuple(getattr(param, "ds_shape", param.shape))
        if tuple(value.shape) != shape:
            raise CheckpointError(f"{source}: {name} has shape {tuple(value.shape)}, this model's is {shape}")
        device = engine.device
        if hasattr(param, "ds_id"):
            set_zero3_partition(param, value)
        else:
            safe_set_full_fp32_param(param, value.to(device))
        for key in OPTIMIZER_KEYS:
            moment = state["optimizer"][key].get(name)
            if moment is None:
                continue
            if hasattr(param, "ds_id"):
                set_zero3_partition(param, moment, key)
            elif fragment_mapped(param):
                safe_set_full_optimizer_state(param, moment.to(device), key)
            elif param in plain and key in plain[param]:
                plain[param][key].copy_(moment.to(plain[param][key].device))
        if hasattr(param, "ds_id"):  # ZeRO-3: the partitioned compute copy
            import deepspeed

            with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
                if dist.rank() == 0:
                    with torch.no_grad():
                        param.data.copy_(value.to(param.device, param.dtype))
        else:
            with torch.no_grad():
                param.data.copy_(value.to(param.device, param.dtype))
    step = state.get("optimizer_step")
    if step is not None:
        optimizer = base_optimizer(engine)
        for entry in optimizer.state.values():
            if "step" in entry:
                entry["step"] = torch.full_like(entry["step"], step) if torch.is_tensor(entry["step"]) else step
        for group in optimizer.param_groups:
            if "step" in group:
                group["step"] = step
    scheduler = getattr(engine, "lr_scheduler", None)
    if scheduler is not None and state.get("lr_scheduler") is not None:
        saved = dict(state["lr_scheduler"])
        restore_scheduler(scheduler, saved, getattr(scheduler, "optimizer", engine.optimizer).param_groups)
    engine.global_steps = int(state.get("global_steps", 0))
    engine.global_samples = int(state.get("global_samples", 0))
