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
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F

IMPLEMENTATION = "mmdist_packed_sdpa"
_registered = False


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
    """Causal SDPA per packed sample; query [B, H, T, D], key/value [B, H_kv, T, D] -> ([B, T, H, D], None)."""
    spans = kwargs.pop("mmdist_spans", None)
    if spans is None or query.shape[2] != key.shape[2]:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
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
