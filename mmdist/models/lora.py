"""LoRA adapters on the frozen LLM (stage 2), through peft, and their merge into plain weights on export.

peft injects the adapter layers into the LLM's own modules; we keep that module
(not the PeftModel wrapper) as ``model.llm`` so parameter names, generation and
``get_input_embeddings()`` stay as without LoRA. On export the adapted weights
are merged (W + scale * B A) and written under the plain LLM's names, so the
export loads into an LLM without peft.
"""

from __future__ import annotations

from typing import Any

import torch

from mmdist.models.gather import Gather, null_gather
from mmdist.models.llm import LoRAConfig

ADAPTER = "default"


def add_lora(model: Any, cfg: LoRAConfig, gather: Gather = null_gather) -> None:
    """Inject LoRA adapters into ``model.llm`` (base weights stay frozen; adapters train in fp32).

    The adapters start as peft's do, A random and B zero (so the adapted LLM is the
    base one), also under ZeRO-3: there the layers are partitioned as peft creates
    them and its own initialisation writes into empty tensors (a no-op that left B
    with nn.Linear's random init), so they are initialised again through ``gather``.
    """
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=list(cfg.target_modules), bias="none"
    )
    try:
        peft_model = get_peft_model(model.llm, config)
    except ValueError as exc:
        raise ValueError(f"model.llm.lora.target_modules={cfg.target_modules}: {exc}") from None
    llm = peft_model.base_model.model
    if gather is not null_gather:
        for _, layer in lora_layers(llm):
            params = list(layer.lora_A[ADAPTER].parameters()) + list(layer.lora_B[ADAPTER].parameters())
            with gather(params), torch.no_grad():
                layer.reset_lora_parameters(ADAPTER, True)
    for name, param in llm.named_parameters():
        if "lora_" in name:
            param.data = param.data.float()
            param.requires_grad_(True)
        else:
            param.requires_grad_(False)
    model.llm = llm


def lora_layers(llm: torch.nn.Module) -> list[tuple[str, Any]]:
    from peft.tuners.lora import LoraLayer

    return [(name, module) for name, module in llm.named_modules() if isinstance(module, LoraLayer)]


@torch.no_grad()
def merged_lora_weights(llm: torch.nn.Module, prefix: str = "llm.") -> dict[str, torch.Tensor]:
    """{plain weight name: W + delta} for every adapted layer, in the base weight's dtype (a quantized base:
    dequantized, in the LoRA's dtype)."""
    from mmdist.models.quantize import dequantized_weight

    out = {}
    for name, module in lora_layers(llm):
        layer = module.get_base_layer()
        base = dequantized_weight(layer)
        dtype = base.dtype if base.is_floating_point() else torch.float32
        delta = module.get_delta_weight(ADAPTER)
        out[f"{prefix}{name}.weight"] = (base.float() + delta.float()).to(dtype).detach().cpu()
    return out
