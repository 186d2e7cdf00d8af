"""The compiled FlexAttention kernel for packed rows builds a bounded number of graphs while the packs change shape.

Twenty steps of packs from the real packer (mmdist.data.collate.pack_rows) over random sample lengths: the row
count and the fullest row's width change from step to step. The kernel the GPU path uses
(packed_attention.compiled_flex) runs here on CPU, forward only (torch has no FlexAttention backward on CPU). The
flex row is the batch's rows end to end padded to 128 x a power of two tokens, so the graphs compiled are one per
such length (here 128 to 512), never one per packed shape, while the logits equal per-sample SDPA's at every real
token. Compiling on a loaded 2-core CPU takes minutes: marked slow.
"""

from __future__ import annotations

import random

import pytest
import torch

from mmdist.data.collate import pack_rows
from mmdist.models import packed_attention
from mmdist.models.llm import LLMConfig, load_llm
from mmdist.models.packed_attention import (
    document_block_mask,
    flex_length,
    spans_from_sequence_ids,
    use_packed_attention,
)

pytest.importorskip("torch.nn.attention.flex_attention")

QWEN2_GQA = {"model_type": "qwen2", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 64,
             "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 128}
MAX_LEN, SAMPLES_PER_STEP, STEPS = 64, 6, 20


def compiled_graph_count() -> int:
    """Graphs torch.compile has built in this process so far.

    torch-private: ``torch._dynamo.utils.counters["stats"]["unique_graphs"]`` (checked on torch 2.13 CPU). torch
    has no public count of compilations; this is the one use, kept here for the compat module to gather.
    """
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def packed_sequence_ids(rng: random.Random) -> torch.Tensor:
    """One step's packed rows as the collator lays them out: [rows, fullest row], sample index per token, -1 padding."""
    lengths = [rng.randint(3, 40) for _ in range(SAMPLES_PER_STEP)]
    rows = pack_rows(lengths, MAX_LEN)
    width = max(sum(lengths[i] for i in row) for row in rows)
    seq = torch.full((len(rows), width), -1, dtype=torch.long)
    for r, row in enumerate(rows):
        at = 0
        for k, i in enumerate(row):
            seq[r, at:at + lengths[i]] = k
            at += lengths[i]
    return seq


def position_ids(sequence_ids: torch.Tensor) -> torch.Tensor:
    pos = torch.zeros_like(sequence_ids)
    for b, row in enumerate(spans_from_sequence_ids(sequence_ids)):
        for start, end in row:
            pos[b, start:end] = torch.arange(end - start)
    return pos


@pytest.mark.slow
def test_twenty_steps_of_changing_packs_compile_one_graph_per_padded_length(monkeypatch):
    import torch._dynamo

    torch._dynamo.reset()
    monkeypatch.setattr(packed_attention, "_compiled_flex", None)
    # the kernel a GPU runs, here on the CPU
    monkeypatch.setattr(packed_attention, "_flex_kernel", lambda device: packed_attention.compiled_flex())
    llm = load_llm(LLMConfig(init_config=dict(QWEN2_GQA), dtype="fp32", attn_implementation="sdpa"))
    assert use_packed_attention(llm)
    llm.eval()
    rng = random.Random(0)
    before = compiled_graph_count()
    shapes, lengths = set(), set()
    for _ in range(STEPS):
        seq = packed_sequence_ids(rng)
        shapes.add(tuple(seq.shape))
        lengths.add(flex_length(seq.numel()))
        embeds = torch.randn(*seq.shape, llm.config.hidden_size)
        common = {"inputs_embeds": embeds, "position_ids": position_ids(seq), "use_cache": False,
                  "attention_mask": None}
        with torch.no_grad():
            flex = llm(**common, mmdist_block_mask=document_block_mask(seq)).logits
            per_sample = llm(**common, mmdist_spans=spans_from_sequence_ids(seq)).logits
        real = seq >= 0
        torch.testing.assert_close(flex[real], per_sample[real], rtol=1e-4, atol=1e-4)
    graphs = compiled_graph_count() - before
    assert len(shapes) >= 10, shapes  # the packs really changed shape: a static compile would build one per shape
    assert len(lengths) <= 3 and lengths <= {128, 256, 512}, lengths
    assert graphs == len(lengths), f"{graphs} graphs for {len(shapes)} packed shapes, {len(lengths)} lengths"
