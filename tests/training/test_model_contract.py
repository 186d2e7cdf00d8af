"""Both stages' models (and the trainer tests' toy) satisfy the written model contract, with the right batch counts."""

from __future__ import annotations

import pytest
import torch
from helpers.tiny import PAD_ID, align_batch, make_model, sample
from helpers.trainer_toy import ToyModel

from mmdist.data.collate import collate_fuse
from mmdist.models.contract import BatchCounts, TrainableModel, contract_members, require_trainable


def _fuse_samples(model) -> list[dict]:
    """Three samples: 1, 2 and 0 images; answers of 2, 3 and 1 tokens, each after its prompt."""
    out = []
    for n_images, prompt, answer in ((1, [10, 11], [12, 13]), (2, [20], [21, 22, 23]), (0, [30], [31])):
        ids, labels = sample(model, n_images, prompt, answer)
        out.append(
            {"input_ids": ids, "labels": labels, "pixel_values": [torch.randn(3, 16, 16) for _ in range(n_images)]}
        )
    return out


def test_fused_model_satisfies_the_contract_and_counts_its_batches():
    model = make_model("fuse")
    assert isinstance(model, TrainableModel)
    samples = _fuse_samples(model)
    lengths = [len(s["input_ids"]) for s in samples]
    n = model.num_image_tokens
    for pack in (False, True):
        batch = collate_fuse(samples, PAD_ID, pack=pack, max_len=max(lengths))
        if pack:
            assert batch["input_ids"].shape[0] == 2  # samples 0 and 2 share a row: the row counts both
        counts = model.batch_counts(batch)
        # positions: what the LLM runs on, padding included (unpacked: 3 rows of the longest; packed: 2 rows)
        rows = 2 if pack else 3
        assert counts == BatchCounts(samples=3, tokens=sum(lengths), supervised_tokens=6, images=3, image_tokens=3 * n,
                                     loss_terms=6, positions=rows * batch["input_ids"].shape[1])
        assert counts.positions >= counts.tokens
        with torch.no_grad():
            out = model(batch)
        assert int(out["num_tokens"]) == counts.loss_terms  # the forward's loss is the mean over exactly those terms
        assert out["loss"].dim() == 0 and torch.isfinite(out["loss"]) and set(out["metrics"]) >= {"lm"}
    text_only = collate_fuse([s for s in samples if not s["pixel_values"]], PAD_ID)
    assert model.batch_counts(text_only).images == model.batch_counts(text_only).image_tokens == 0
    assert set(model.trainable_groups()) >= {"projector"}
    assert {p.name for p in model.parts()} >= {"vision", "projector", "llm"}
    assert all(k.startswith("projector.") for k in model.export_state_dict())


def test_align_model_satisfies_the_contract_and_counts_its_batches():
    model = make_model("align")
    assert isinstance(model, TrainableModel)
    batch = align_batch(model)
    counts = model.batch_counts(batch)
    # one image per caption; the contrastive loss is a mean over the batch, so micro-batches are not weighted
    assert counts == BatchCounts(
        samples=4,
        tokens=int(batch["text_attention_mask"].sum()),
        supervised_tokens=0,
        images=4,
        image_tokens=0,
        loss_terms=None,
        positions=batch["text_input_ids"].numel(),  # every caption padded to the batch's longest
    )
    cached = dict(batch, image_features=model.encode_images(batch.pop("pixel_values")))
    assert model.batch_counts(cached) == counts  # cached features count as the images they came from
    with torch.no_grad():
        out = model(cached)
    assert out["loss"].dim() == 0 and "itc" in out["metrics"]
    assert set(model.trainable_groups()) >= {"stage1", "temperature"}
    assert "logit_scale" in model.export_state_dict()


def test_the_toy_model_satisfies_it_and_a_model_without_batch_counts_does_not():
    assert isinstance(ToyModel(), TrainableModel)

    class NoCounts(torch.nn.Module):
        processors = None

        def parts(self):
            return []

        def trainable_groups(self):
            return {}

        def export_state_dict(self):
            return {}

    assert not isinstance(NoCounts(), TrainableModel)


def test_the_contract_members_are_read_from_the_protocol():
    assert contract_members() == ("batch_counts", "export_state_dict", "flop_count", "forward", "parts", "processors",
                                  "trainable_groups")


def test_the_engine_refuses_a_model_without_a_contract_member_and_names_it(tmp_path):
    from helpers.trainer_toy import toy_config

    from mmdist import distributed as dist
    from mmdist.config.run import load_config
    from mmdist.training.engine import build_engine

    class ForwardOnly(torch.nn.Module):
        def forward(self, batch):
            return {}

    class NoCounts(ForwardOnly):
        processors = None

        def parts(self):
            return []

        def trainable_groups(self):
            return {}

        def export_state_dict(self):
            return {}

        def flop_count(self, *, vision_runs=True, text_runs=True):
            return None

    require_trainable(ToyModel(), "the engine")  # the toy passes
    with pytest.raises(TypeError, match=r"NoCounts cannot enter the trainer: it lacks batch_counts of the model"):
        require_trainable(NoCounts(), "the trainer")
    cfg = load_config(base=toy_config(str(tmp_path / "run"), engine={"zero_stage": 2}))
    dist.init(backend="gloo")
    try:
        with pytest.raises(TypeError, match=r"ForwardOnly cannot enter the engine: it lacks batch_counts, "
                                            r"export_state_dict, flop_count, parts, processors, trainable_groups of "
                                            r"the model"):
            build_engine(cfg, world_size=1, model_builder=lambda cfg, gather: ForwardOnly())
    finally:
        dist.shutdown()
