"""Attention over packed rows without computing the masked blocks.

A packed row holds several samples; attention must stay inside each one. The
portable way, a dense block-diagonal 4-D mask, makes SDPA compute every score of
the row x row matrix and throw most of them away: with rows of 512 tokens holding
2-3 samples that is ~15% of a small LLM's step spent on masked work, and the mask
also keeps SDPA off its fast causal kernel. FlashAttention's varlen path solves
this on GPUs; on CPU (and for SDPA generally) nothing does, so we do it by hand:
an attention function registered with transformers' ``AttentionInterface`` that
runs causal SDPA on each sample's span and concatenates the outputs.

The spans travel as a keyword argument of the LLM call (``mmdist_spans``), which
transformers passes down to every attention call. Arguments are what gradient
checkpointing replays, so the recomputed forward sees the same spans. Without
``mmdist_spans`` the function is plain SDPA (generation, unpacked batches).

The other kernel (``model.llm.packed_attention: flex``) is one FlexAttention call
per layer over the whole batch, with a document mask (causal and same sample)
given as a ``BlockMask`` built once per forward (``mmdist_block_mask``): a few
large kernels instead of rows x samples x layers small ones on a GPU, compiled
once for every packed shape (:func:`compiled_flex`). torch has no FlexAttention
backward on CPU, so there it serves inference and tests only.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, Optional

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

IMPLEMENTATION = "mmdist_packed_sdpa"
_registered = False
_compiled_flex: Optional[Callable[..., torch.Tensor]] = None
FLEX_BLOCK = 128  # FlexAttention's block size: the flex row is 128 x a power of two tokens long


def spans_from_sequence_ids(sequence_ids: torch.Tensor) -> list[list[tuple[int, int]]]:
    """[B, T] packed-sample index per token (-1 = padding) -> per row, the (start, end) of each sample."""
    rows = []
    for row in sequence_ids.tolist():
        spans: list[tuple[int, int]] = []
        start = 0
        for i in range(1, len(row) + 1):
            if i == len(row) or row[i] != row[start]:
                if row[start] >= 0:
                    spans.append((start, i))
                start = i
        rows.append(spans)
    return rows


def packed_sdpa_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                          attention_mask: Optional[torch.Tensor], dropout: float = 0.0, scaling: Optional[float] = None,
                          **kwargs: Any) -> tuple[torch.Tensor, None]:
    """Causal SDPA per packed sample; query [B, H, T, D], key/value [B, H_kv, T, D] -> ([B, T, H, D], None).

    With ``mmdist_block_mask`` (``packed_attention: flex``) it is :func:`packed_flex_attention` instead."""
    spans = kwargs.pop("mmdist_spans", None)
    block_mask = kwargs.pop("mmdist_block_mask", None)
    if block_mask is not None and query.shape[2] == key.shape[2]:
        return packed_flex_attention(module, query, key, value, block_mask, dropout=dropout, scaling=scaling)
    if spans is None or query.shape[2] != key.shape[2]:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    groups = getattr(module, "num_key_value_groups", 1)
    if groups > 1:
        key = key.repeat_interleave(groups, dim=1)
        value = value.repeat_interleave(groups, dim=1)
    dropout = dropout if module.training else 0.0
    rows = []
    for b, row_spans in enumerate(spans):
        pieces = []
        covered = 0
        for start, end in row_spans:
            if start > covered:  # padding between or before samples: zeros (never supervised)
                pieces.append(query.new_zeros(query.shape[1], start - covered, query.shape[3]))
            q, k, v = query[b, :, start:end], key[b, :, start:end], value[b, :, start:end]
            pieces.append(F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True, scale=scaling))
            covered = end
        if covered < query.shape[2]:
            pieces.append(query.new_zeros(query.shape[1], query.shape[2] - covered, query.shape[3]))
        rows.append(torch.cat(pieces, dim=1))
    out = torch.stack(rows)  # [B, H, T, D]
    return out.transpose(1, 2).contiguous(), None


def resolve_packed_kernel(setting: str) -> str:
    """``model.llm.packed_attention`` -> the kernel packed rows use: ``sdpa_per_sample`` or ``flex``.

    ``auto`` is ``sdpa_per_sample`` on every device. On one H100 ``flex`` ran 1.70x faster over the same packed rows
    (docs/benchmarks.md), but its equality with unpacked samples is checked on the CPU only: the GPU tier's check
    (tests/gpu/test_gpu_smoke.py) has not yet run to completion on a GPU, and ZeRO-3 with ``flex`` not at all. Until
    both have, ``flex`` is the user's choice on a GPU.
    """
    if setting != "auto":
        return setting
    logger.debug("packed attention: auto -> sdpa_per_sample (flex: 1.70x on one H100, its GPU equality check pending)")
    return "sdpa_per_sample"


def flex_length(tokens: int) -> int:
    """The padded length of a batch's flex row: the next power of two times :data:`FLEX_BLOCK` that holds ``tokens``."""
    length = FLEX_BLOCK
    while length < tokens:
        length *= 2
    return length


def document_block_mask(sequence_ids: torch.Tensor) -> Any:
    """[B, T] packed-sample index per token (-1 = padding) -> FlexAttention ``BlockMask`` of the document mask.

    The batch's rows are laid end to end as one row, padded to :func:`flex_length`
    (``B * T`` rounded up to 128 x a power of two), so the compiled kernel sees a few
    lengths, whatever the packs (:func:`compiled_flex`); a sample is told apart by its
    row and index. A token sees earlier tokens of its own sample; a padding token sees
    only itself (no empty row, so no NaN; its output is never supervised), as
    ``block_causal_mask``. Padding costs one diagonal block per 128 tokens: flex skips
    the others. Built once per forward: every layer and the checkpointed recompute reuse it.
    """
    from torch.nn.attention.flex_attention import create_block_mask

    b, t = sequence_ids.shape
    ids = sequence_ids.to(torch.int64)
    per_row = int(ids.max()) + 1 if ids.numel() else 1
    rows = torch.arange(b, device=ids.device).unsqueeze(1) * per_row
    flat = torch.where(ids >= 0, ids + rows, -1).reshape(-1)
    doc = F.pad(flat, (0, flex_length(b * t) - b * t), value=-1).to(torch.int32).contiguous()

    def same_sample_causal(b, h, q_idx, kv_idx):
        kv_doc = doc[kv_idx]
        return ((doc[q_idx] == kv_doc) & (q_idx >= kv_idx) & (kv_doc >= 0)) | (q_idx == kv_idx)

    length = doc.shape[0]
    return create_block_mask(same_sample_causal, 1, None, length, length, device=doc.device)


def compiled_flex() -> Callable[..., torch.Tensor]:
    """flex_attention compiled once per process, for every packed layout: a bounded number of graphs.

    Packed batches change shape every step (the number of rows, the fullest row's
    width). Specialised to each shape, every new one would be a recompile until
    torch.compile's recompile limit, after which it falls back, silently, to eager
    flex, which materialises every score. So the flex path lays the rows end to end
    and pads them to :func:`flex_length`: one graph per power of two of 128 tokens
    (7 from 128 to 8 x 2048 tokens a micro-batch, within torch's default limit of 8).
    Compiled static (``dynamic=False``): torch 2.13's CPU flex template fails to compile
    symbolic sizes, and a static kernel is the fast one.
    """
    global _compiled_flex
    from torch.nn.attention.flex_attention import flex_attention

    if _compiled_flex is None:
        _compiled_flex = torch.compile(flex_attention, dynamic=False)
    return _compiled_flex


def _flex_kernel(device: torch.device) -> Callable[..., torch.Tensor]:
    """The compiled kernel on GPUs (eager flex materialises every score); eager on CPU, where torch has no
    FlexAttention backward and a compile costs more than it saves."""
    from torch.nn.attention.flex_attention import flex_attention

    return flex_attention if device.type == "cpu" else compiled_flex()


def packed_flex_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    block_mask: Any,
    dropout: float = 0.0,
    scaling: Optional[float] = None,
) -> tuple[torch.Tensor, None]:
    """One FlexAttention call over the batch under ``block_mask``; query [B, H, T, D], key/value [B, H_kv, T, D]
    -> ([B, T, H, D], None). Grouped-query heads are shared by flex_attention itself (``enable_gqa``)."""
    if dropout and module.training:
        raise ValueError(
            f"model.llm.packed_attention=flex: FlexAttention has no attention dropout, the LLM has {dropout}; "
            f"use sdpa_per_sample (or auto) for an LLM trained with attention dropout"
        )
    b, heads, t, d = query.shape
    length = block_mask.seq_lengths[0]  # the rows end to end, padded (document_block_mask)

    def one_row(x: torch.Tensor) -> torch.Tensor:  # [B, H, T, D] -> [1, H, length, D]
        flat = x.transpose(0, 1).reshape(1, x.shape[1], b * t, d)
        return F.pad(flat, (0, 0, 0, length - b * t))

    query, key, value = one_row(query), one_row(key), one_row(value)
    try:
        out = _flex_kernel(query.device)(query, key, value, block_mask=block_mask, scale=scaling,
                                         enable_gqa=query.shape[1] != key.shape[1])
    except NotImplementedError as exc:  # e.g. torch has no FlexAttention backward on CPU
        raise NotImplementedError(f"model.llm.packed_attention=flex: {exc} Use auto or sdpa_per_sample here.") from exc
    return out[0, :, : b * t].reshape(heads, b, t, d).permute(1, 2, 0, 3).contiguous(), None


def register() -> str:
    """Register the implementation with transformers (once); returns its name."""
    global _registered
    if not _registered:
        from transformers import AttentionInterface
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

        AttentionInterface.register(IMPLEMENTATION, packed_sdpa_attention)
        ALL_MASK_ATTENTION_FUNCTIONS.register(IMPLEMENTATION, sdpa_mask)
        _registered = True
    return IMPLEMENTATION


def use_packed_attention(llm: Any) -> bool:
    """Switch an SDPA LLM to the packed-aware implementation; False if the model cannot switch."""
    if getattr(llm.config, "_attn_implementation", None) not in ("sdpa", IMPLEMENTATION):
        return False
    name = register()
    try:
        llm.set_attn_implementation(name)
    except Exception:  # a model without AttentionInterface dispatch keeps the dense-mask path
        return False
    return getattr(llm.config, "_attn_implementation", None) == name
