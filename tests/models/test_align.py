"""Stage 1 (AlignModel): ITC against a hand computation, multi-positive targets, the learnable temperature."""

from __future__ import annotations

import math

import pytest
import torch
from helpers.tiny import align_batch, make_model

from mmdist.models.losses import itc_loss


def test_itc_equals_hand_computation():
    torch.manual_seed(0)
    img, txt = torch.randn(3, 4), torch.randn(3, 4)
    logit_scale = torch.tensor(math.log(1 / 0.07))
    loss, acc = itc_loss(img, txt, logit_scale)
    # By hand: cosine similarities / temperature, cross-entropy both ways with the diagonal as target.
    a = img / img.norm(dim=1, keepdim=True)
    b = txt / txt.norm(dim=1, keepdim=True)
    sims = (a @ b.T) / 0.07
    total = 0.0
    for i in range(3):
        row = sims[i]
        col = sims[:, i]
        total += -(row[i] - torch.logsumexp(row, 0)) / 2 + -(col[i] - torch.logsumexp(col, 0)) / 2
    torch.testing.assert_close(loss, total / 3)
    expected_acc = sum(int(sims[i].argmax() == i) for i in range(3)) / 3
    assert float(acc) == pytest.approx(expected_acc)


def test_itc_multi_positive_targets_are_soft():
    torch.manual_seed(1)
    img, txt = torch.randn(3, 4), torch.randn(3, 4)
    scale = torch.tensor(0.0)  # temperature 1: logits are the cosine similarities
    loss, _ = itc_loss(img, txt, scale, caption_group=torch.tensor([5, 5, 9]))
    sims = torch.nn.functional.normalize(img, dim=1) @ torch.nn.functional.normalize(txt, dim=1).T
    targets = torch.tensor([[0.5, 0.5, 0.0], [0.5, 0.5, 0.0], [0.0, 0.0, 1.0]])
    i2t = -(targets * sims.log_softmax(1)).sum(1).mean()
    t2i = -(targets.T * sims.T.log_softmax(1)).sum(1).mean()
    torch.testing.assert_close(loss, (i2t + t2i) / 2)
    # Identical captions must not be pushed apart: with groups the loss differs from the one-hot loss.
    one_hot, _ = itc_loss(img, txt, scale)
    assert not torch.isclose(loss, one_hot)


def test_align_model_loss_and_groups(align_model):
    torch.manual_seed(0)
    out = align_model(align_batch(align_model))
    assert out["loss"].dim() == 0 and torch.isfinite(out["loss"])
    assert set(out["metrics"]) >= {"itc", "acc", "temperature"}
    torch.testing.assert_close(out["metrics"]["temperature"], torch.tensor(0.07))
    groups = align_model.trainable_groups()
    assert set(groups) == {"stage1", "temperature"}
    assert align_model.processors.num_image_tokens == 16
    assert align_model.processors.image_token_id is None


def test_align_with_pooled_image_tokens():
    model = make_model("align", "linear", model={"connector": {"image_tokens": 4}})
    feats = model.encode_images(torch.randn(2, 3, 16, 16))
    assert feats.shape == (2, 16, 32)
    assert model.stage1.image_tokens_of(feats).shape == (2, 4, 32)
    assert model.processors.num_image_tokens == 4


def test_precomputed_text_features_give_the_same_loss(align_model):
    """``text_features`` (the pooled frozen text-encoder output, as
    the feature cache stores it) replace the token ids exactly."""
    batch = align_batch(align_model)
    align_model.eval()
    with torch.no_grad():
        from_tokens = align_model(batch)
        pooled = align_model.encode_text(batch["text_input_ids"], batch["text_attention_mask"])
        assert pooled.shape == (4, align_model.text.hidden_size)
        cached = {k: v for k, v in batch.items() if not k.startswith("text_")}
        cached["text_features"] = pooled.clone()
        from_features = align_model(cached)
    assert torch.equal(from_features["loss"], from_tokens["loss"])
    assert torch.equal(from_features["metrics"]["acc"], from_tokens["metrics"]["acc"])
    # the features are really used: other vectors give another loss
    cached["text_features"] = torch.randn_like(pooled)
    with torch.no_grad():
        assert not torch.isclose(align_model(cached)["loss"], from_tokens["loss"])


def test_precomputed_text_features_train_the_heads_like_tokens():
    """Gradients of the trainable heads are identical with token ids and with precomputed text features."""
    grads = []
    for use_features in (False, True):
        model = make_model("align", "mlp")
        batch = align_batch(model)
        if use_features:
            batch["text_features"] = model.encode_text(batch.pop("text_input_ids"), batch.pop("text_attention_mask"))
        torch.manual_seed(0)
        batch["pixel_values"] = torch.randn(4, 3, 16, 16)
        model(batch)["loss"].backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and any(k.startswith("stage1.") for k in grads[0])
    for name in grads[0]:
        assert torch.equal(grads[0][name], grads[1][name]), name


def test_text_features_refused_with_a_trainable_text_encoder():
    model = make_model("align", "qformer")
    batch = align_batch(model)
    batch["text_features"] = torch.randn(4, model.text.hidden_size)
    with pytest.raises(ValueError, match="text.freeze"):
        model.text_features(batch)
