"""Q-Former stage 1: its own FLOP count against torch's FLOP counter, and the fast passes against the plain ones.

The fast passes (image keys and values once per image, ITC's queries reused by ITG, ITM's last layer on the query
rows only) must give what the plain masked forward of every pair gives.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers.tiny import align_batch, make_model
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

SHAPES = {  # model settings: the Q-Former's (connector.qformer), and the text encoder's where given
    "bert-width, tied head": {},
    "bert-width, tied head, frozen table": {"text": {"freeze_word_embeddings": True}},
    "bert-width, own head": {"tie_lm_head": False},
    "own-width, cross every 2": {"hidden_size": 16, "num_heads": 2, "init_from_text": False, "num_queries": 3,
                                 "num_layers": 4, "cross_attention_every": 2, "tie_lm_head": False},
}


def _settings(shape: str) -> dict:
    q = dict(SHAPES[shape])
    return {"text": q.pop("text", {}), "connector": {"qformer": q}}


def _features_batch(model) -> dict:
    batch = align_batch(model)
    batch["image_features"] = model.encode_images(batch.pop("pixel_values"))
    return batch


def _measured(fn) -> int:
    """FLOPs torch counts for ``fn`` (math attention: the CPU flash kernel is not in the counter's table)."""
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_flop_count_matches_torch_flop_counter(shape):
    model = make_model("align", "qformer", model=_settings(shape))
    model.train()
    batch = _features_batch(model)
    ids, mask = batch["text_input_ids"], batch["text_attention_mask"]
    assert not bool(mask.bool().all()), "the batch should pad a caption (the masked paths)"
    torch.manual_seed(0)
    total = _measured(lambda: model(batch)["loss"].backward())
    model.zero_grad()
    text_encoder = _measured(lambda: model.text(ids, mask)[1].sum().backward())  # counted by its own rule
    measured = total - text_encoder
    b, length = ids.shape
    counted = model.stage1.work(caption_len=length, batch_size=b).step(b, b * length, int(mask[:, 1:].sum()))
    assert measured > 0
    assert abs(counted - measured) <= 0.1 * measured, (counted, measured)


def test_flop_count_of_a_stage2_qformer_is_the_queries_pass():
    model = make_model("align", "qformer")
    qf = model.stage1
    feats = _features_batch(model)["image_features"]
    measured = _measured(lambda: qf.image_tokens_of(feats).sum().backward())
    counted = qf.work(batch_size=feats.shape[0]).per_image * feats.shape[0]
    assert abs(counted - measured) <= 0.1 * measured, (counted, measured)


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_itm_logits_equal_the_plain_masked_forward(shape):
    model = make_model("align", "qformer", model=_settings(shape)).eval()
    qf = model.stage1
    batch = _features_batch(model)
    ids, mask = batch["text_input_ids"], batch["text_attention_mask"]
    with torch.no_grad():
        states = model.text.embeddings()(input_ids=ids)
        fast = qf.itm_logits(batch["image_features"], states, mask)
        plain = qf.itm_head(qf(batch["image_features"], states, qf._masks(mask, "itm"))[:, : qf.num_tokens]).mean(1)
    torch.testing.assert_close(fast, plain)


def test_stage1_losses_equal_the_plain_passes_with_the_same_negatives():
    """The whole stage-1 loss and its gradients against one written with the plain masked forward per pair."""
    model = make_model("align", "qformer")
    model.eval()  # no dropout in the text encoder: both sides draw only the negatives
    qf = model.stage1
    batch = _features_batch(model)
    feats, ids, mask, group = (batch["image_features"], batch["text_input_ids"], batch["text_attention_mask"],
                               batch["caption_group"])
    params = [p for ps in model.trainable_groups().values() for p in ps]
    torch.manual_seed(3)
    out = model(batch)
    fast_grads = torch.autograd.grad(out["loss"], params, allow_unused=True)

    torch.manual_seed(3)
    queries = qf(feats)
    _, pooled = model.text(ids, mask)
    image_emb, text_emb = qf.vision_proj(queries), qf.text_proj(pooled)
    from mmdist.models.losses import itc_loss

    itc, _ = itc_loss(image_emb, text_emb, model.logit_scale, group)
    neg_text, neg_image = qf.hard_negatives(feats, ids, mask, image_emb, text_emb, group)[:2]
    states = model.text.embeddings()(input_ids=ids)
    pair_feats = torch.cat([feats, feats, feats[neg_image]])
    pair_states, pair_mask = torch.cat([states, states[neg_text], states]), torch.cat([mask, mask[neg_text], mask])
    logits = qf.itm_head(qf(pair_feats, pair_states, qf._masks(pair_mask, "itm"))[:, : qf.num_tokens]).mean(1)
    itm = F.cross_entropy(logits, torch.tensor([1] * 4 + [0] * 8))
    itg_logits = qf.lm_logits(qf(feats, states, qf._masks(mask, "itg"))[:, qf.num_tokens : -1], model.text)
    keep = mask[:, 1:].bool()
    itg = F.cross_entropy(itg_logits[keep], ids[:, 1:][keep])
    plain = itc + itm + itg
    plain_grads = torch.autograd.grad(plain, params, allow_unused=True)
    torch.testing.assert_close(out["loss"], plain)
    torch.testing.assert_close(out["metrics"]["itm"], itm.detach())
    for fast, slow in zip(fast_grads, plain_grads):
        if fast is None or slow is None:
            assert fast is None and slow is None
        else:
            torch.testing.assert_close(fast, slow, rtol=1e-4, atol=1e-5)


def test_hard_negatives_never_draw_the_same_caption():
    model = make_model("align", "qformer")
    qf = model.stage1
    batch = _features_batch(model)
    ids, mask = batch["text_input_ids"], batch["text_attention_mask"]  # captions 0 and 2 are the same
    emb = torch.randn(4, qf.num_tokens, 8)
    for seed in range(10):
        torch.manual_seed(seed)
        neg_text, neg_image = qf.hard_negatives(batch["image_features"], ids, mask, emb, torch.randn(4, 8))[:2]
        for i in range(4):
            same = {0, 2} if i in (0, 2) else {i}
            assert int(neg_text[i]) not in same and int(neg_image[i]) not in same


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_the_align_models_count_of_a_qformer_step_matches_torch_flop_counter(shape):
    """What the progress bar charges a stage-1 Q-Former step (the model's ``flop_count`` at the batch's counts:
    text encoder, queries, cross-attention, ITC, ITM pairs, ITG) against every FLOP torch counts in it."""
    model = make_model("align", "qformer", model=_settings(shape))
    model.train()
    batch = _features_batch(model)
    torch.manual_seed(0)
    measured = _measured(lambda: model(batch)["loss"].backward())
    c = model.batch_counts(batch)
    counted = model.flop_count(vision_runs=False).step(c.tokens, c.supervised_tokens, c.image_tokens, c.images,
                                                       c.samples)
    assert measured > 0
    assert abs(counted - measured) <= 0.1 * measured, (counted, measured, counted / measured)


def test_a_frozen_token_table_takes_the_tied_heads_weight_gradient_out_of_the_count():
    """The tied LM head is the text encoder's token table: frozen (model.text.freeze_word_embeddings), its weight
    gradient (2 x width x vocabulary per predicted token) is not computed, and the model's count drops exactly it."""
    step, count = {}, {}
    for frozen in (False, True):
        model = make_model("align", "qformer", model={"text": {"freeze_word_embeddings": frozen}})
        model.train()
        assert model.stage1.tied_lm_head and model.text.word_embeddings().weight.requires_grad is not frozen
        batch = _features_batch(model)
        torch.manual_seed(0)
        step[frozen] = _measured(lambda m=model, b=batch: m(b)["loss"].backward())
        c = model.batch_counts(batch)
        count[frozen] = model.flop_count(vision_runs=False).step(c.tokens, c.supervised_tokens, c.image_tokens,
                                                                 c.images, c.samples)
    mask = batch["text_attention_mask"]
    table = model.text.word_embeddings().weight
    weight_grad = 2 * table.shape[0] * table.shape[1] * int(mask[:, 1:].sum())
    assert step[False] - step[True] == weight_grad
    assert count[False] - count[True] == pytest.approx(weight_grad)
