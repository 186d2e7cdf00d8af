"""`mmdist plan`'s quantization lines: frozen bytes of int8/nf4 parts, and the quantization that makes a run fit.

Counted without building anything, from the planner's module shapes: every weight
(linears, the input embedding and the output head, a tied one once) at a quantized
weight's bytes with its scales. ZeRO-3 is refused with quantization, so only ZeRO 0-2
estimates count.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional

from mmdist.models.quantize import NF4_BLOCK

if TYPE_CHECKING:
    from mmdist.config.run import RunConfig

__all__ = ["plan_lines", "planned_bytes_per_param", "planned_frozen_bytes"]


def planned_bytes_per_param(method: str) -> float:
    """Bytes per weight of a quantized linear: int8 1 + a 4-byte scale per row (~ per 1-4k weights, counted as
    4/1024); nf4 0.5 + a 4-byte absmax per block of 64 (bitsandbytes' default without double quantization)."""
    if method == "int8":
        return 1.0 + 4 / 1024
    if method == "nf4":
        return 0.5 + 4 / NF4_BLOCK
    raise ValueError(f"no byte count for quantize={method!r}")


def planned_frozen_bytes(shape: Any, method: str, dtype_bytes: int) -> int:
    """Bytes of a frozen planner module (``mmdist.plan.ModuleShape``) quantized with ``method``: all its parameters
    (the planner counts a tied embedding/head once) at :func:`planned_bytes_per_param`. Norms and biases, which stay
    in ``dtype_bytes``, are under 0.1% of an LLM's parameters and counted at the quantized rate too."""
    if method == "none":
        return shape.params * dtype_bytes
    return int(shape.params * planned_bytes_per_param(method))


def plan_lines(cfg: RunConfig, shapes: list, estimates: list, budget: int) -> list[str]:
    """`mmdist plan`'s quantization lines: the frozen bytes of the configured quantization and whether it fits, or,
    when nothing fits unquantized, the first of int8 / nf4 (ZeRO 0-2, which is what quantization allows) that does.

    ``estimates`` are the planner's unquantized ones (``mmdist.plan.Estimate``); a quantized part changes only its
    frozen weight bytes, which are replicated at ZeRO 0-2.
    """
    sections = {"llm": ("llm", cfg.model.llm), "vision_encoder": ("vision", cfg.model.vision)}
    frozen = [(s, *sections[s.name]) for s in shapes if s.name in sections and not s.trainable]
    if not frozen:
        return []
    element = {"fp32": 4, "bf16": 2, "fp16": 2}

    def held(s: Any) -> int:
        dtype = cfg.engine.precision if cfg.engine.precision in ("bf16", "fp16") else s.dtype
        return element.get(dtype, 2)

    def saving(methods: dict) -> int:
        return sum(
            s.params * held(s) - planned_frozen_bytes(s, methods.get(name, "none"), held(s)) for s, name, _ in frozen
        )

    def best(methods: dict) -> Optional[tuple[Any, bool, int]]:
        cut = saving(methods)
        for ckpt in (False, True):
            for est in estimates:
                if est.setting.zero_stage < 3 and est.total(ckpt) - cut <= budget:
                    return est, ckpt, est.total(ckpt) - cut
        return None

    gib = 1024 ** 3
    configured = {name: str(part.quantize) for _, name, part in frozen if str(part.quantize) != "none"}
    lines = [""]
    if configured:
        what = " ".join(f"model.{n}.quantize={m}" for n, m in configured.items())
        for s, name, _ in frozen:
            if name in configured:
                q = planned_frozen_bytes(s, configured[name], held(s))
                lines.append(
                    f"quantized: {what}: frozen {s.name} {q / gib:.2f} "
                    f"GiB instead of {s.params * held(s) / gib:.2f} GiB "
                    f"({q / max(1, s.params * held(s)):.2f}x); ZeRO-3 is refused with quantization"
                )
        fit = best(configured)
        lines.append(
            f"  with it: {fit[0].setting.label}, gradient_checkpointing={str(fit[1]).lower()} fits at "
            f"{fit[2] / gib:.1f} GiB of {budget / gib:.1f} GiB"
            if fit
            else "  with it nothing at ZeRO 0-2 fits either"
        )
        return lines
    if best({}) is not None:
        return []  # fits unquantized at ZeRO 0-2: no reason to quantize
    for method in ("int8", "nf4"):
        fit = best({"llm": method})
        if fit:
            return lines + [
                f"quantization: the frozen LLM at {cfg.engine.precision} does not fit at ZeRO 0-2; with "
                f"model.llm.quantize={method} {fit[0].setting.label}, gradient_checkpointing={str(fit[1]).lower()} "
                f"fits at {fit[2] / gib:.1f} GiB of {budget / gib:.1f} GiB (ZeRO-3 partitioning is the other way)"
            ]
    return lines + ["quantization: neither int8 nor nf4 makes the frozen LLM fit at ZeRO 0-2"]
