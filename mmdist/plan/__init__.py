"""Predict per-GPU memory for every ZeRO stage and offload choice, before a job is submitted.

Why a planner of our own: DeepSpeed's estimators
(``estimate_zero2_model_states_mem_needs_all_cold``,
``estimate_zero3_model_states_mem_needs_all_cold``) count every parameter as
trainable: 16-18 bytes per parameter for a model of which, in stage 2, 99.8%
is frozen and needs 2 bytes and no gradient or optimizer state at all. They
also ignore activations, which for a frozen LLM that still passes gradients to
its inputs are the larger part. This package counts frozen parameters as frozen.

How it works, without loading a single weight:

1. Shapes. Each backbone's parameters are counted by building the model on
   ``torch.device("meta")`` from its config (exact, whatever the architecture).
   The config comes from ``init_config``, a local folder or GGUF file
   (``AutoConfig``), or a small built-in table for the reference models (the
   hub is not reachable everywhere the planner must run). The vision tower's
   tokens come from its config or one forward on the meta device (conv and timm
   towers); the trainable connector (resampler included) is built there too.
2. Model states per rank, following what DeepSpeed 0.19 actually allocates
   (checked against measured engines in benchmarks/memory_per_rank.py and
   tests/test_plan.py): module weights in the compute dtype (ZeRO-3: one
   1/N partition), gradients, fp32 master copy plus Adam m and v for trainable
   parameters only (ZeRO >= 1: 1/N each).
3. Activations for the configured micro-batch, with and without gradient
   checkpointing of the LLM, including the fp32 logits the loss reads;
   communication buffers from the ZeRO bucket sizes. The micro-batch's tokens
   come from the shards' length statistics, ``data.mean_tokens_per_sample``, or
   full ``data.max_len`` rows, in that order (``lengths``).
4. What fits in ``--gpu-memory``, the largest micro-batch that fits per
   setting, and one recommended setting.

The activation figures are estimates from layer shapes (per token and layer:
what autograd keeps for an input-gradient backward through frozen weights);
the model-state figures are exact up to DeepSpeed's padding.

The steps are modules: ``shapes`` (1, with ``backbones`` for the configs and
meta builds, ``towers`` for the vision tower, ``images`` for a sample's images and
tiles), ``lengths`` (a micro-batch's tokens) and ``memory`` (2-3), ``report`` (4);
the names below are the package's API.
"""

from mmdist.plan.lengths import BatchTokens, batch_tokens
from mmdist.plan.memory import (
    ALL_SETTINGS,
    Estimate,
    Setting,
    activation_bytes,
    activation_bytes_per_sample,
    deepspeed_bucket_settings,
    deepspeed_estimates,
    estimate,
    held_dtype,
    llm_activation_bytes,
    model_state_bytes,
    parse_bytes,
)
from mmdist.plan.report import IMAGES_PER_CORE, TOWER_MFU, format_plan, input_line, recommend, resolve_auto_for_gpu
from mmdist.plan.shapes import (
    DTYPE_BYTES,
    GiB,
    ModuleShape,
    builtin_config,
    count_parameters,
    model_flops,
    model_shapes,
)

__all__ = [
    "ALL_SETTINGS", "BatchTokens", "DTYPE_BYTES", "Estimate", "GiB", "IMAGES_PER_CORE", "ModuleShape", "Setting",
    "TOWER_MFU", "activation_bytes", "activation_bytes_per_sample", "batch_tokens", "builtin_config",
    "deepspeed_bucket_settings", "count_parameters", "deepspeed_estimates", "estimate", "format_plan",
    "held_dtype", "input_line", "llm_activation_bytes", "model_flops", "model_shapes", "model_state_bytes",
    "parse_bytes", "recommend",
    "resolve_auto_for_gpu",
]
