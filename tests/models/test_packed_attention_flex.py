"""The FlexAttention kernel for packed rows (``model.llm.packed_attention: flex``) against the per-sample SDPA one and
against each sample run on its own: logits and gradients w.r.t. inputs_embeds, with and without checkpointing.

torch refuses FlexAttention's backward on CPU with a device check in front of its eager (math) implementation, which
is itself device-generic. The gradient tests lift that check (``flex_backward_on_cpu``) so the eager backward runs
here: they prove mmdist's part (the document mask, GQA, the output layout, the mask surviving the checkpointed
recompute); the fused CUDA kernel is torch's, checked on a GPU by tests/gpu/test_gpu_smoke.py. Without the patch,
flex on CPU runs forward only, and training there fails with an error naming the setting (tested too).
"""

from __future__ import annotations

import pytest
import torch
from helpers.tiny import make_cfg, make_model, sample

from mmdist.models.fused import FusedVLM, block_causal_mask
from mmdist.models.llm import LLMConfig, load_llm
from mmdist.models.packed_attention import (
    document_block_mask,
    flex_length,
    spans_from_sequence_ids,
    use_packed_attention,
)
from mmdist.settings import ConfigError

pytest.importorskip("torch.nn.attention.flex_attention")

LLAMA = {"model_type": "llama", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 4, "max_position_embeddings": 128}
QWEN2_GQA = {
    "model_type": "qwen2",
    "vocab_size": 64,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 128,
}

# Two packed rows of 18 tokens: three samples then padding; padding first then two samples.
SEQUENCE_IDS = torch.tensor([[0] * 6 + [1] * 5 + [2] * 4 + [-1] * 3,
                             [-1] * 2 + [0] * 9 + [1] * 7])


@pytest.fixture
def flex_backward_on_cpu(monkeypatch):
    import torch.nn.attention.flex_attention as flex

    if not hasattr(flex, "_validate_device"):  # a torch whose CPU check lives elsewhere: the gradient tests cannot run
        pytest.skip(f"torch {torch.__version__} has no flex_attention._validate_device to lift for the CPU backward")
    monkeypatch.setattr(flex, "_validate_device", lambda *tensors: None)


def tiny_llm(shape: dict, checkpointing: bool = False):
    llm = load_llm(LLMConfig(init_config=dict(shape), dtype="fp32", attn_implementation="sdpa"))
    assert use_packed_attention(llm)
    if checkpointing:
        if hasattr(llm, "activation_checkpointing_enable"):  # transformers >= 5.2x, as mmdist.models.fused
            llm.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        llm.train()  # HF recomputes only in train mode; the tiny configs have no dropout
    else:
        llm.eval()
    return llm


def position_ids(sequence_ids: torch.Tensor) -> torch.Tensor:
    pos = torch.zeros_like(sequence_ids)
    for b, row in enumerate(spans_from_sequence_ids(sequence_ids)):
        for start, end in row:
            pos[b, start:end] = torch.arange(end - start)
    return pos


def packed_logits(llm, embeds: torch.Tensor, kernel: str) -> torch.Tensor:
    inputs = {
        "inputs_embeds": embeds,
        "position_ids": position_ids(SEQUENCE_IDS),
        "use_cache": False,
        "attention_mask": None,
    }
    if kernel == "flex":
        inputs["mmdist_block_mask"] = document_block_mask(SEQUENCE_IDS)
    else:
        inputs["mmdist_spans"] = spans_from_sequence_ids(SEQUENCE_IDS)
    return llm(**inputs).logits


def unpacked_logits(llm, embeds: torch.Tensor) -> torch.Tensor:
    """Each sample through the LLM on its own, its logits written where it sits in the packed rows (0 at padding)."""
    pieces = torch.zeros(*SEQUENCE_IDS.shape, llm.config.vocab_size)
    out = pieces.clone()
    for b, row in enumerate(spans_from_sequence_ids(SEQUENCE_IDS)):
        for start, end in row:
            logits = llm(inputs_embeds=embeds[b:b + 1, start:end], use_cache=False).logits[0]
            out = out.index_put((torch.tensor([b]), torch.arange(start, end)), logits)
    return out


def logits_and_grad(llm, run) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits at real tokens, d(weighted sum of them)/d inputs_embeds) for ``run(llm, embeds)``."""
    torch.manual_seed(1)
    embeds = torch.randn(*SEQUENCE_IDS.shape, llm.config.hidden_size, requires_grad=True)
    weights = torch.randn(*SEQUENCE_IDS.shape, llm.config.vocab_size)
    logits = run(llm, embeds)
    real = SEQUENCE_IDS >= 0
    assert torch.isfinite(logits).all()  # padding outputs too: never supervised, but never NaN
    (logits[real] * weights[real]).sum().backward()
    return logits[real].detach(), embeds.grad


@pytest.mark.parametrize("shape", [LLAMA, QWEN2_GQA], ids=["llama", "qwen2-gqa"])
def test_flex_forward_equals_per_sample_sdpa_and_unpacked_without_lifting_anything(shape):
    llm = tiny_llm(shape)
    embeds = torch.randn(*SEQUENCE_IDS.shape, llm.config.hidden_size)
    real = SEQUENCE_IDS >= 0
    with torch.no_grad():
        flex = packed_logits(llm, embeds, "flex")
        per_sample = packed_logits(llm, embeds, "sdpa_per_sample")
        alone = unpacked_logits(llm, embeds)
    assert torch.isfinite(flex).all()
    torch.testing.assert_close(flex[real], per_sample[real], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(flex[real], alone[real], rtol=1e-5, atol=1e-5)
    # The mask matters: one block mask over all tokens (one sample per row) gives different logits.
    whole = document_block_mask(torch.where(real, 0, -1))  # one document per row, the padding apart
    with torch.no_grad():
        leaky = llm(inputs_embeds=embeds, position_ids=position_ids(SEQUENCE_IDS), attention_mask=None,
                    mmdist_block_mask=whole).logits
    assert not torch.allclose(leaky[real], flex[real], atol=1e-3)


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointing"])
@pytest.mark.parametrize("shape", [LLAMA, QWEN2_GQA], ids=["llama", "qwen2-gqa"])
def test_flex_logits_and_input_gradients_equal_per_sample_sdpa_and_unpacked(shape, checkpointing, flex_backward_on_cpu):
    llm = tiny_llm(shape, checkpointing)
    flex = logits_and_grad(llm, lambda m, e: packed_logits(m, e, "flex"))
    per_sample = logits_and_grad(llm, lambda m, e: packed_logits(m, e, "sdpa_per_sample"))
    alone = logits_and_grad(llm, unpacked_logits)
    for other in (per_sample, alone):
        torch.testing.assert_close(flex[0], other[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(flex[1], other[1], rtol=1e-4, atol=1e-5)
    assert float(flex[1][SEQUENCE_IDS >= 0].abs().sum()) > 0
    assert torch.count_nonzero(flex[1][SEQUENCE_IDS < 0]) == 0  # padding's outputs were not in the loss


def test_flex_backward_on_cpu_is_refused_naming_the_setting():
    llm = tiny_llm(QWEN2_GQA)
    embeds = torch.randn(*SEQUENCE_IDS.shape, llm.config.hidden_size, requires_grad=True)
    with pytest.raises(NotImplementedError, match=r"model\.llm\.packed_attention=flex: .*backward on CPU"):
        packed_logits(llm, embeds, "flex")


def test_document_block_mask_is_the_dense_block_causal_mask():
    from torch.nn.attention.flex_attention import create_mask

    block_mask = document_block_mask(SEQUENCE_IDS)
    b, t = SEQUENCE_IDS.shape
    length = flex_length(b * t)  # the rows end to end, padded to 128 x a power of two
    assert block_mask.seq_lengths == (length, length) == (128, 128)
    dense = create_mask(block_mask.mask_mod, 1, 1, length, length, device="cpu")[0, 0]
    expected = torch.eye(length, dtype=torch.bool)  # padding sees itself; no row sees another
    rows = block_causal_mask(SEQUENCE_IDS, torch.float32) == 0
    for r in range(b):
        expected[r * t:(r + 1) * t, r * t:(r + 1) * t] = rows[r, 0]
    assert torch.equal(dense, expected)


def packed_batch(model: FusedVLM) -> dict:
    samples = [
        sample(model, 1, [10, 11], [12, 13, 14]),
        sample(model, 0, [20, 21], [22, 23]),
        sample(model, 1, [30], [31, 32]),
    ]
    ids, labels, seq, pos = [], [], [], []
    for k, (s_ids, s_labels) in enumerate(samples):
        ids, labels = ids + s_ids, labels + s_labels
        seq, pos = seq + [k] * len(s_ids), pos + list(range(len(s_ids)))
    rows = [([256, 256] + ids, [-100, -100] + labels, [-1, -1] + seq, [0, 0] + pos),  # padding first
            (ids + [256] * 2, labels + [-100] * 2, seq + [-1] * 2, pos + [0] * 2)]  # padding last
    return {"input_ids": torch.tensor([r[0] for r in rows]), "labels": torch.tensor([r[1] for r in rows]),
            "sequence_ids": torch.tensor([r[2] for r in rows]), "position_ids": torch.tensor([r[3] for r in rows]),
            "pixel_values": torch.randn(4, 3, 16, 16)}


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointing"])
def test_fused_vlm_flex_equals_per_sample_sdpa_and_the_dense_mask_building_one_block_mask_per_step(
        checkpointing, flex_backward_on_cpu, monkeypatch):
    import torch.nn.attention.flex_attention as flex

    model = make_model("fuse", model={"llm": {"packed_attention": "flex", "gradient_checkpointing": checkpointing}})
    model.train()
    assert model.packed_attention and model.packed_kernel == "flex"
    assert model.llm.config.num_key_value_heads < model.llm.config.num_attention_heads  # tiny_fuse's llama is GQA
    batch = packed_batch(model)
    built = []
    create = flex.create_block_mask
    monkeypatch.setattr(flex, "create_block_mask", lambda *a, **k: built.append(1) or create(*a, **k))
    results = {}
    for kernel, packed in (("flex", True), ("sdpa_per_sample", True), ("dense", False)):
        model.packed_kernel, model.packed_attention = kernel, packed
        model.zero_grad()
        loss = model(batch)["loss"]
        loss.backward()
        results[kernel] = (loss.detach(), [p.grad.clone() for p in model.projector.parameters()])
        if kernel == "flex":
            assert len(built) == 1  # one block mask for the step: every layer, and the recompute, reuse it
    loss_flex, grads_flex = results["flex"]
    assert any(float(g.abs().sum()) > 0 for g in grads_flex)
    for kernel in ("sdpa_per_sample", "dense"):
        loss, grads = results[kernel]
        torch.testing.assert_close(loss_flex, loss, rtol=1e-5, atol=1e-6)
        for a, b in zip(grads_flex, grads):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_auto_keeps_per_sample_sdpa():
    assert make_model("fuse").packed_kernel == "sdpa_per_sample"
    assert make_model("fuse", model={"llm": {"packed_attention": "sdpa_per_sample"}}).packed_kernel == "sdpa_per_sample"


def test_flex_is_refused_at_config_check_naming_the_key(monkeypatch):
    with pytest.raises(ConfigError, match=r"model\.llm\.packed_attention: flex replaces sdpa's packed path"):
        make_cfg("fuse", model={"llm": {"packed_attention": "flex", "attn_implementation": "eager"}})
    monkeypatch.setattr("mmdist.models.llm.flex_attention_available", lambda: False)
    with pytest.raises(
        ConfigError, match=r"model\.llm\.packed_attention: flex needs torch\.nn\.attention\.flex_attention"
    ):
        make_cfg("fuse", model={"llm": {"packed_attention": "flex"}})
    make_cfg("fuse", model={"llm": {"packed_attention": "sdpa_per_sample"}})  # the others need nothing


def test_explain_shows_the_setting_and_why_auto_is_per_sample():
    from mmdist.commands.config import format_explain

    text = format_explain("model.llm.packed_attention")
    assert "model.llm.packed_attention" in text
    assert "sdpa_per_sample everywhere until flex's equality check has run on a GPU" in text
    assert "type: 'auto' | 'sdpa_per_sample' | 'flex'; default: 'auto'" in text
