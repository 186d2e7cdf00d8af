"""Which quantization settings cannot work together, checked with the rest of the config before anything loads.

A frozen part's weights can be held in int8 or nf4 (mmdist/models/quantize.py does
it); these rules say where that cannot work, naming the key, so ``RunConfig.check``
reports them with every other problem. Pure config logic: no torch, no backend import.
"""

from __future__ import annotations

from typing import Any, Optional

__all__ = ["hf_export_problem", "quantization_problems"]


def quantization_problems(cfg: Any) -> list[tuple[str, str]]:
    """Combinations of a run config that cannot work, as (key, reason) pairs for ``RunConfig.check``."""
    out: list[tuple[str, str]] = []
    parts = [("llm", cfg.model.llm)] if cfg.stage.builds("llm") else []
    parts.append(("vision", cfg.model.vision))
    zero = cfg.engine.zero_stage  # "auto" never resolves to 3 for a quantized run (mmdist.plan.auto)
    for name, part in parts:
        key = f"model.{name}.quantize"
        method = str(getattr(part, "quantize", "none"))
        if method == "none":
            continue
        if not part.freeze:
            out.append((key, f"{key}={method} quantizes a trainable part: quantized weights take no gradient step; "
                             f"set model.{name}.freeze=true or {key}=none"))
        if zero == 3:
            why = ("8-bit weights and their per-row scales cannot be partitioned by ZeRO-3" if method == "int8" else
                   "ZeRO-3 would flatten the packed 4-bit weights into its engine-dtype partitions (bitsandbytes needs "
                   "bnb_4bit_quant_storage equal to the engine dtype, which mmdist does not set up)")
            out.append((key, f"{key}={method} with engine.zero_stage=3: {why}; use engine.zero_stage<=2 (a quantized "
                             f"frozen part is small enough to replicate) or {key}=none"))
        if name == "llm" and part.lora.enabled and str(part.quantize_backend) == "torchao":
            out.append(
                (
                    "model.llm.quantize_backend",
                    "model.llm.lora.enabled=true with model.llm.quantize_backend=torchao: "
                    "peft has no LoRA layer for torchao's quantized linears; use "
                    "quantize_backend=bitsandbytes (QLoRA) or auto",
                )
            )
    return out


def hf_export_problem(cfg: Any, dequantize: bool) -> Optional[str]:
    """Why an HF (LLaVA-format) export of ``cfg``'s run is refused, or None.

    The projector of a quantized run learnt against the quantized LLM; an HF export
    holds full-precision LLM weights, so it must say so (``dequantize=True``).
    """
    method = str(getattr(cfg.model.llm, "quantize", "none"))
    if method == "none" or dequantize:
        return None
    return (f"model.llm.quantize={method}: this run trained its projector against the {method} LLM, and an HF export "
            f"holds the LLM's full-precision weights; export with dequantize=True (--dequantize) to accept that, "
            f"or load the run with mmdist generate, which quantizes the LLM again")
