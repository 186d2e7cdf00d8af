"""Stage 2 (FusedVLM): image tokens land at the placeholders,
labels, multi-image and text-only batches, packing, generation."""

from __future__ import annotations

import pytest
import torch
from helpers.tiny import make_model, pad_batch, sample

from mmdist.models.fused import block_causal_mask


def test_image_tokens_land_exactly_at_placeholders(fused_model):
    model = fused_model
    n = model.num_image_tokens
    assert n == 16  # 16x16 image, 4x4 patches, patch tokens
    samples = [
        sample(model, 2, [10, 11], [12, 13]),
        sample(model, 0, [20, 21, 22], [23]),
        sample(model, 1, [30], [31, 32]),
    ]
    batch = pad_batch(samples, pad_id=256)
    pixel_values = torch.randn(3, 3, 16, 16)
    image_embeds = model.image_embeddings(pixel_values)
    embeds = model.embed(batch["input_ids"], image_embeds)
    is_image = batch["input_ids"] == model.image_token_id
    assert int(is_image.sum()) == 3 * n
    # Row-major order: row 0 holds images 0 and 1, row 2 holds image 2; row 1 has none.
    torch.testing.assert_close(embeds[0, :n], image_embeds[0])
    torch.testing.assert_close(embeds[0, n : 2 * n], image_embeds[1])
    torch.testing.assert_close(embeds[2, :n], image_embeds[2])
    # Every other position is the plain token embedding.
    table = model.llm.get_input_embeddings().weight
    text_pos = ~is_image
    torch.testing.assert_close(embeds[text_pos], table[batch["input_ids"][text_pos]])


def test_placeholder_outside_vocab_is_not_resized(fused_model):
    rows = fused_model.llm.get_input_embeddings().weight.shape[0]
    assert fused_model.image_token_id == rows  # tiny tokenizer: 259 ids + <image>; vocab 259
    assert fused_model.lookup_id < rows
    assert len(fused_model.processors.tokenizer) == rows + 1


def test_placeholder_count_mismatch_is_a_clear_error(fused_model):
    model = fused_model
    batch = pad_batch([sample(model, 1, [10], [11])], pad_id=256)
    with pytest.raises(ValueError, match=r"16 image placeholder tokens .* 2 image\(s\) x 16 tokens = 32"):
        model.embed(batch["input_ids"], model.image_embeddings(torch.randn(2, 3, 16, 16)))


def test_loss_counts_only_labelled_tokens(fused_model):
    model = fused_model
    samples = [sample(model, 1, [10, 11], [12, 13, 14]), sample(model, 0, [20], [21, 22])]
    batch = pad_batch(samples, pad_id=256)
    batch["pixel_values"] = torch.randn(1, 3, 16, 16)
    out = model(batch)
    # Targets are the answer tokens except the first token of a row (never a target after the shift): 3 + 2.
    assert int(out["num_tokens"]) == 5
    # Hand computation from the LLM's logits with the shift.
    with torch.no_grad():
        inputs = model._llm_inputs(batch)
        logits = model.llm(**inputs).logits[:, :-1]
        labels = batch["labels"][:, 1:]
        keep = labels != -100
        expected = torch.nn.functional.cross_entropy(logits[keep], labels[keep])
    torch.testing.assert_close(out["loss"].detach(), expected)


def test_text_only_batch_without_pixel_values(fused_model):
    batch = pad_batch([sample(fused_model, 0, [10, 11], [12, 13])], pad_id=256)
    calls = []
    hook = fused_model.vision.register_forward_hook(lambda *args: calls.append(1))
    try:
        out = fused_model(batch)
    finally:
        hook.remove()
    # The vision tower runs on a dummy image too: under ZeRO-3 every rank must gather the same parameters,
    # so a rank with a text-only micro-batch may not skip the (partitioned) frozen tower.
    assert calls, "a text-only batch skipped the vision tower"
    assert torch.isfinite(out["loss"]) and int(out["num_tokens"]) == 2
    with torch.no_grad():
        losses, supervised = fused_model.token_losses(batch)
    torch.testing.assert_close(out["loss"].detach(), losses.sum() / supervised.sum())  # the dummy adds exactly 0
    assert torch.isfinite(out["loss"]) and int(out["num_tokens"]) == 2
    out["loss"].backward()  # no image: the trainable parameters get zero (not missing) gradients
    for p in fused_model.projector.parameters():
        assert p.grad is not None and torch.count_nonzero(p.grad) == 0


def test_image_features_instead_of_pixels_give_the_same_loss(fused_model):
    batch = pad_batch([sample(fused_model, 1, [10], [11, 12])], pad_id=256)
    pixels = torch.randn(1, 3, 16, 16)
    a = fused_model({**batch, "pixel_values": pixels})["loss"]
    b = fused_model({**batch, "image_features": fused_model.encode_images(pixels)})["loss"]
    torch.testing.assert_close(a, b)


def test_block_causal_mask_keeps_attention_inside_samples():
    seq = torch.tensor([[0, 0, 1, 1, 1, -1]])
    mask = block_causal_mask(seq, torch.float32)[0, 0]
    allowed = mask == 0
    expected = torch.tensor([
        [1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [0, 0, 1, 0, 0, 0],
        [0, 0, 1, 1, 0, 0],
        [0, 0, 1, 1, 1, 0],
        [0, 0, 0, 0, 0, 1],
    ], dtype=torch.bool)
    assert torch.equal(allowed, expected)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_rows_give_the_same_per_sample_loss(attn):
    model = make_model("fuse", model={"llm": {"attn_implementation": attn}})
    samples = [
        sample(model, 1, [10, 11], [12, 13, 14]),
        sample(model, 0, [20, 21], [22, 23]),
        sample(model, 1, [30], [31, 32, 33]),
    ]
    pixels = torch.randn(2, 3, 16, 16)
    unpacked = pad_batch(samples, pad_id=256)
    unpacked["pixel_values"] = pixels
    # Pack all three into one row with 3 padding tokens at the end.
    ids, labels, seq, pos = [], [], [], []
    for k, (s_ids, s_labels) in enumerate(samples):
        ids += s_ids
        labels += s_labels
        seq += [k] * len(s_ids)
        pos += list(range(len(s_ids)))
    ids += [256] * 3
    labels += [-100] * 3
    seq += [-1] * 3
    pos += [0] * 3
    packed = {
        "input_ids": torch.tensor([ids]),
        "labels": torch.tensor([labels]),
        "sequence_ids": torch.tensor([seq]),
        "position_ids": torch.tensor([pos]),
        "attention_mask": (torch.tensor([seq]) >= 0).long(),
        "pixel_values": pixels,
    }
    assert model.packed_attention == (attn == "sdpa")  # sdpa: per-sample spans; eager: the dense block mask
    a = model.sample_losses(unpacked)
    b = model.sample_losses(packed)
    assert len(a) == len(b) == 3
    torch.testing.assert_close(torch.tensor(a), torch.tensor(b), rtol=1e-4, atol=1e-5)
    # And the batch loss is the token-weighted mean either way.
    torch.testing.assert_close(model(unpacked)["loss"], model(packed)["loss"], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_packed_span_attention_equals_the_dense_block_mask_in_loss_and_gradients(checkpointing):
    from mmdist.models.packed_attention import spans_from_sequence_ids

    model = make_model("fuse", model={"llm": {"attn_implementation": "sdpa", "gradient_checkpointing": checkpointing}})
    model.train()
    assert model.packed_attention
    samples = [
        sample(model, 1, [10, 11], [12, 13, 14]),
        sample(model, 0, [20, 21], [22, 23]),
        sample(model, 1, [30], [31, 32]),
    ]
    ids, labels, seq, pos = [], [], [], []
    for k, (s_ids, s_labels) in enumerate(samples):
        ids, labels = ids + s_ids, labels + s_labels
        seq, pos = seq + [k] * len(s_ids), pos + list(range(len(s_ids)))
    ids, labels, seq, pos = [256, 256] + ids, [-100, -100] + labels, [-1, -1] + seq, [0, 0] + pos  # padding first too
    batch = {"input_ids": torch.tensor([ids, ids]), "labels": torch.tensor([labels, labels]),
             "sequence_ids": torch.tensor([seq, seq]), "position_ids": torch.tensor([pos, pos]),
             "pixel_values": torch.randn(4, 3, 16, 16)}
    assert spans_from_sequence_ids(batch["sequence_ids"])[0] == [
        (2, 2 + len(samples[0][0])),
        (2 + len(samples[0][0]), 2 + len(samples[0][0]) + len(samples[1][0])),
        (2 + len(samples[0][0]) + len(samples[1][0]), len(ids)),
    ]
    results = []
    for packed in (True, False):
        model.packed_attention = packed
        model.zero_grad()
        loss = model(batch)["loss"]
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in model.projector.parameters()]))
    (loss_a, grads_a), (loss_b, grads_b) = results
    torch.testing.assert_close(loss_a, loss_b, rtol=1e-5, atol=1e-6)
    for a, b in zip(grads_a, grads_b):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert any(float(g.abs().sum()) > 0 for g in grads_a)


def test_generate_from_inputs_embeds_is_greedy_and_matches_a_manual_loop(fused_model):
    model = fused_model
    ids, _ = sample(model, 1, [10, 11], [])
    input_ids = torch.tensor([ids])
    pixels = torch.randn(1, 3, 16, 16)
    out = model.generate(input_ids, pixel_values=pixels, max_new_tokens=4)
    assert out.shape == (1, 4)
    # Manual greedy decoding without a cache: re-embed the prompt plus the tokens so far.
    image_embeds = model.image_embeddings(pixels)
    running = input_ids
    for _ in range(4):
        with torch.no_grad():
            logits = model.llm(inputs_embeds=model.embed(running, image_embeds)).logits
        running = torch.cat([running, logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(out, running[:, input_ids.shape[1]:])


def test_left_padded_batch_generation_matches_single_prompts(fused_model):
    model = fused_model
    n, iid = model.num_image_tokens, model.image_token_id
    a, b = [iid] * n + [10, 11, 12, 13, 14], [20, 21]
    ids = torch.tensor([a, [256] * (len(a) - len(b)) + b])
    mask = (ids != 256).long()
    pixels = torch.randn(1, 3, 16, 16)
    kw = {"max_new_tokens": 3, "return_dict_in_generate": True, "output_scores": True}
    batch = model.generate(ids, mask, pixel_values=pixels, **kw)
    one = model.generate(torch.tensor([a]), pixel_values=pixels, **kw)
    two = model.generate(torch.tensor([b]), **kw)
    for step in range(3):
        torch.testing.assert_close(batch.scores[step][0], one.scores[step][0], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(batch.scores[step][1], two.scores[step][0], rtol=1e-4, atol=1e-5)
