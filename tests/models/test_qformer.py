"""Q-Former: shapes, masks (ITM bidirectional, ITG multimodal
causal), ITC over queries, hard negatives, losses, BERT init."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from helpers.tiny import align_batch, make_model

from mmdist.models.losses import itc_loss, sample_hard_negatives


def qformer_model():
    return make_model("align", "qformer")


def test_shapes_and_bert_initialisation():
    model = qformer_model()
    qf = model.stage1
    feats = model.encode_images(torch.randn(3, 3, 16, 16))
    assert qf.image_tokens_of(feats).shape == (3, 4, 32)  # num_queries=4, width = text hidden 32
    assert model.processors.num_image_tokens == 4
    assert qf.layers_initialised_from_text == 2
    bert = model.text.model.encoder.layer[1]
    assert torch.equal(qf.layers[1].self_attn.query.weight, bert.attention.self.query.weight)
    assert torch.equal(qf.layers[1].ffn_query.inter.weight, bert.intermediate.dense.weight)
    assert torch.equal(qf.layers[1].ffn_text.out.weight, bert.output.dense.weight)
    assert all(layer.cross_attn is not None for layer in qf.layers)  # cross_attention_every=1
    assert set(model.trainable_groups()) == {"stage1", "text", "temperature"}


def test_cross_attention_every_n_layers():
    model = make_model(
        "align", "qformer", model={"connector": {"qformer": {"num_layers": 4, "cross_attention_every": 2}}}
    )
    assert [layer.cross_attn is not None for layer in model.stage1.layers] == [True, False, True, False]


def test_itg_mask_is_multimodal_causal():
    model = qformer_model().eval()
    qf = model.stage1
    feats = model.encode_images(torch.randn(1, 3, 16, 16))
    ids = torch.tensor([[2, 10, 11, 12, 3]])
    mask = torch.ones_like(ids)
    states = model.text.model.embeddings(input_ids=ids)
    changed = states.clone()
    changed[:, 3] += 1.0  # change the 4th caption token
    with torch.no_grad():
        a = qf(feats, states, qf._masks(mask, "itg"))
        b = qf(feats, changed, qf._masks(mask, "itg"))
        c = qf(feats, states, qf._masks(mask, "itm"))
        d = qf(feats, changed, qf._masks(mask, "itm"))
    q = qf.num_tokens
    torch.testing.assert_close(a[:, :q], b[:, :q])  # queries never see the text
    torch.testing.assert_close(a[:, q : q + 3], b[:, q : q + 3])  # earlier text does not see later text
    assert not torch.allclose(a[:, q + 3 :], b[:, q + 3 :])
    torch.testing.assert_close(a[:, :q], qf.image_tokens_of(feats))  # ITG queries = the stage-2 image tokens
    assert not torch.allclose(c[:, :q], d[:, :q])  # ITM: queries see the text


def test_itc_over_queries_equals_hand_computation():
    torch.manual_seed(0)
    img, txt = torch.randn(2, 3, 4), torch.randn(2, 4)
    loss, _ = itc_loss(img, txt, torch.tensor(math.log(1 / 0.5)))
    sims = torch.zeros(2, 2)
    for i in range(2):
        for j in range(2):
            sims[i, j] = max(float(F.cosine_similarity(img[i, k], txt[j], dim=0)) for k in range(3))
    logits = sims / 0.5
    expected = (F.cross_entropy(logits, torch.arange(2)) + F.cross_entropy(logits.T, torch.arange(2))) / 2
    torch.testing.assert_close(loss, expected)


def test_hard_negatives_avoid_positives_and_prefer_similar():
    torch.manual_seed(0)
    sims = torch.tensor(
        [[1.0, 0.9, -1.0, -1.0], [0.9, 1.0, -1.0, -1.0], [-1.0, -1.0, 1.0, 0.95], [-1.0, -1.0, 0.95, 1.0]]
    )
    for _ in range(20):
        neg_t, neg_i = sample_hard_negatives(sims, sharpness=50.0)
        assert neg_t.tolist() == [1, 0, 3, 2] and neg_i.tolist() == [1, 0, 3, 2]
    # Identical captions (same group) are never negatives.
    group = torch.tensor([0, 0, 1, 2])
    for _ in range(20):
        neg_t, neg_i = sample_hard_negatives(sims, group, sharpness=50.0)
        assert neg_t[0] not in (0, 1) and neg_t[1] not in (0, 1)
        assert neg_i[0] not in (0, 1) and (neg_t != torch.arange(4)).all()


def test_losses_itg_by_hand_and_training_reduces_them():
    model = qformer_model()
    model.train()
    torch.manual_seed(0)
    batch = align_batch(model)
    out = model(batch)
    for key in ("itc", "itm", "itg"):
        assert torch.isfinite(out["metrics"][key])
    qf = model.stage1
    ids, mask = batch["text_input_ids"], batch["text_attention_mask"]
    feats = model.encode_images(batch["pixel_values"])
    with torch.no_grad():
        states = model.text.model.embeddings(input_ids=ids)
        logits = qf.lm_logits(qf(feats, states, qf._masks(mask, "itg"))[:, qf.num_tokens :], model.text)
        keep = mask[:, 1:].bool()
        expected = F.cross_entropy(logits[:, :-1][keep], ids[:, 1:][keep])
        torch.testing.assert_close(qf.itg_loss(feats, states, ids, mask, model.text), expected)
    total = out["loss"]
    torch.testing.assert_close(total.detach(), out["metrics"]["itc"] + out["metrics"]["itm"] + out["metrics"]["itg"])
    optimizer = torch.optim.AdamW([p for ps in model.trainable_groups().values() for p in ps], lr=5e-3)
    first = float(out["metrics"]["itg"])
    for _ in range(8):
        optimizer.zero_grad()
        out = model(batch)
        out["loss"].backward()
        optimizer.step()
    assert float(out["metrics"]["itg"]) < first * 0.8
    assert float(out["metrics"]["itc"]) < 1.2 * math.log(4)


def test_qformer_of_its_own_width_without_bert_init(tmp_path):
    from mmdist.export import save_export

    q = {"hidden_size": 16, "num_heads": 2, "init_from_text": False, "num_queries": 3, "tie_lm_head": False}
    model = make_model("align", "qformer", model={"connector": {"qformer": q}})
    qf = model.stage1
    assert not hasattr(qf, "layers_initialised_from_text")
    assert isinstance(qf.text_in, torch.nn.Linear) and qf.text_in.in_features == 32 and qf.text_in.out_features == 16
    torch.manual_seed(0)
    out = model(align_batch(model))
    assert all(torch.isfinite(out["metrics"][k]) for k in ("itc", "itm", "itg"))
    save_export(model, str(tmp_path / "s1"))
    fused = make_model("fuse", "qformer", model={"connector": {"qformer": q, "stage1_weights": str(tmp_path / "s1")}})
    assert fused.num_image_tokens == 3 and fused.projector.in_dim == 16
    assert torch.equal(fused.stage1.queries, qf.queries)
