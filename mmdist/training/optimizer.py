"""AdamW parameter groups from the model's ``trainable_groups()``: one learning rate per group, no decay on norms.

Frozen weights get no optimizer state at all; a parameter in no group, or in two, is
an error (each would silently change what trains).
"""

from __future__ import annotations

from torch import nn

from mmdist.models.contract import TrainableModel
from mmdist.settings import ConfigError, Problem
from mmdist.training.settings import TrainConfig

__all__ = ["KNOWN_GROUPS", "build_optimizer_groups"]

# Group names the models use in trainable_groups() (see docs/design.md).
KNOWN_GROUPS = ("stage1", "projector", "text", "lora", "temperature", "llm", "vision")

_NO_DECAY_MARKERS = ("bias", "norm", "ln_", "layernorm", "embeddings.position", "temperature", "logit_scale")


def _no_decay(name: str, param: nn.Parameter) -> bool:
    """Biases, norms and other 1-D tensors; by their full shape (a ZeRO-3 partition is a flat 1-D slice)."""
    lowered = name.lower()
    return len(getattr(param, "ds_shape", param.shape)) < 2 or any(marker in lowered for marker in _NO_DECAY_MARKERS)


def build_optimizer_groups(model: TrainableModel, train_cfg: TrainConfig) -> list[dict]:
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
        # A group this model happens not to have (stage1 without
        # stage-1 weights) is fine; a name no model uses is a typo.
        if key not in groups and key not in KNOWN_GROUPS:
            problems.append(
                Problem(
                    f"train.lr_multipliers.{key}",
                    "no such parameter group; this model has: "
                    f"{', '.join(sorted(groups)) or 'none'} (known group names: {', '.join(KNOWN_GROUPS)})",
                )
            )
    seen: set[int] = set()
    out = []
    for group_name, params in groups.items():
        factor = float(train_cfg.lr_multipliers.get(group_name, 1.0))
        decay, no_decay = [], []
        for p in params:
            name = named.get(id(p), f"{group_name}.<unnamed>")
            if not p.requires_grad:
                problems.append(
                    Problem("model", f"trainable_groups()['{group_name}'] holds the frozen parameter {name}")
                )
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
        problems.append(
            Problem(
                "model",
                f"{len(missing)} trainable parameter(s) are in no trainable "
                f"group (e.g. {missing[:3]}); they would never be updated",
            )
        )
    if not out and not problems:
        problems.append(Problem("model", "the model has no trainable parameters: nothing to train"))
    if problems:
        raise ConfigError(problems)
    return out
