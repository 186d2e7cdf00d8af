"""Frozen-feature cache: features written once, read back instead of pixels, and a cache with another key is refused."""

from __future__ import annotations

import json

import pytest
import torch
from data_fixtures import make_config, make_processors, png, write_caption_shards, write_tar

from mmdist.data.cache import CacheKeyMismatch, build_feature_cache
from mmdist.data.loader import build_loader
from mmdist.data.reader import read_tar


def encode(pixel_values: torch.Tensor) -> torch.Tensor:
    """A stand-in frozen encoder: [N, 3, 8, 8] -> [N, 4 tokens, 48]."""
    return pixel_values.reshape(pixel_values.shape[0], 3, 4, 16).permute(0, 2, 1, 3).reshape(-1, 4, 48) * 2 + 1


def _setup(tmp_path, stage="fuse"):
    processors = make_processors()
    processors.identity = {"vision": "fake-encoder", "weights": "abc123"}
    pattern = write_caption_shards(tmp_path / "src", [5, 3])
    cfg = make_config(pattern, stage=stage, micro_batch_size=2)
    summary = build_feature_cache(cfg, encode, [pattern], tmp_path / "cache" / "train", processors=processors,
                                  batch_size=3, samples_per_shard=4)
    return processors, pattern, cfg, summary


def test_cache_round_trip_fuse(tmp_path):
    processors, pattern, cfg, summary = _setup(tmp_path)
    assert summary.written == 8 and len(summary.shards) == 2
    members = read_tar(summary.shards[0])
    first = next(members)
    assert "features.npy" in first and "png" not in first and first["txt"]
    assert json.loads((tmp_path / "cache" / "train" / "sizes.json").read_text()) == {"features-000000.tar": 4, "features-000001.tar": 4}

    cfg.data.feature_cache = str(tmp_path / "cache")
    cfg.train.micro_batch_size = 1
    cached = build_loader(cfg, processors, "train", 0, 1)
    plain = build_loader(make_config(pattern, micro_batch_size=1), processors, "train", 0, 1)

    def by_key(loader):
        out = {}
        for batch in loader:
            out[loader.last_keys[0]] = batch
        return out

    a_all, b_all = by_key(cached), by_key(plain)
    assert sorted(a_all) == sorted(b_all) and len(a_all) == 8
    for key, a in a_all.items():
        b = b_all[key]
        assert "pixel_values" not in a and a["image_features"].dtype == torch.float32
        assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["labels"], b["labels"])
        assert torch.allclose(a["image_features"], encode(b["pixel_values"]), atol=1e-2)


def test_cache_align_stage(tmp_path):
    processors, pattern, cfg, _ = _setup(tmp_path, stage="align")
    cfg.data.feature_cache = str(tmp_path / "cache")
    batch = next(iter(build_loader(cfg, processors, "train", 0, 1)))
    assert batch["image_features"].shape == (2, 4, 48) and "pixel_values" not in batch


def test_cache_key_mismatch_is_refused(tmp_path):
    processors, pattern, cfg, _ = _setup(tmp_path)
    cfg.data.feature_cache = str(tmp_path / "cache")
    other_weights = make_processors()
    other_weights.identity = {"vision": "fake-encoder", "weights": "DIFFERENT"}
    with pytest.raises(CacheKeyMismatch, match="encoder"):
        build_loader(cfg, other_weights, "train", 0, 1)
    other_layer = make_config(pattern, micro_batch_size=2, feature_cache=str(tmp_path / "cache"))
    other_layer.model.vision.select_layer = -1
    with pytest.raises(CacheKeyMismatch, match="select_layer"):
        build_loader(other_layer, processors, "train", 0, 1)
    other_prep = make_processors(num_image_tokens=8)
    other_prep.identity = processors.identity
    with pytest.raises(CacheKeyMismatch, match="preprocess"):
        build_loader(cfg, other_prep, "train", 0, 1)
    build_loader(cfg, processors, "train", 0, 1)  # the matching setup is accepted


def test_cache_keeps_text_only_and_skips_bad_images(tmp_path):
    processors = make_processors()
    write_tar(tmp_path / "src" / "m-000000.tar", [
        {"__key__": "a", "png": png(1), "txt": "a cat"},
        {"__key__": "broken", "png": b"\x89PNG nope", "txt": "a dog"},
        {"__key__": "t", "json": {"conversations": [{"from": "human", "value": "what is this ?"}, {"from": "gpt", "value": "text"}]}},
    ])
    cfg = make_config(str(tmp_path / "src" / "m-000000.tar"))
    summary = build_feature_cache(cfg, encode, [str(tmp_path / "src" / "m-000000.tar")], tmp_path / "c", processors=processors)
    assert summary.written == 2 and dict(summary.skipped) == {"corrupt_image": 1}
    samples = list(read_tar(summary.shards[0]))
    assert [s["__key__"] for s in samples] == ["a", "t"] and "features.npy" not in samples[1]
