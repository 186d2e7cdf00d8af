"""Frozen-feature cache: features written once, read back instead of pixels, and a cache with another key is refused."""

from __future__ import annotations

import json

import pytest
import torch
from helpers.data_fixtures import make_config, make_processors, png, write_caption_shards, write_tar

from mmdist.data.cache import CacheKeyMismatch, build_feature_cache
from mmdist.data.loader import build_loader
from mmdist.data.reader import read_tar


def encode(pixel_values: torch.Tensor) -> torch.Tensor:
    """A stand-in frozen encoder: uint8 [N, 3, 8, 8] -> [N, 4 tokens, 48]."""
    assert pixel_values.dtype == torch.uint8, "the loader and the cache ship uint8 pixels"
    pixel_values = pixel_values.float() / 255.0
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
    assert json.loads((tmp_path / "cache" / "train" / "sizes.json").read_text()) == {
        "features-000000.tar": 4,
        "features-000001.tar": 4,
    }

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
    write_tar(
        tmp_path / "src" / "m-000000.tar",
        [
            {"__key__": "a", "png": png(1), "txt": "a cat"},
            {"__key__": "broken", "png": b"\x89PNG nope", "txt": "a dog"},
            {
                "__key__": "t",
                "json": {
                    "conversations": [{"from": "human", "value": "what is this ?"}, {"from": "gpt", "value": "text"}]
                },
            },
        ],
    )
    cfg = make_config(str(tmp_path / "src" / "m-000000.tar"))
    summary = build_feature_cache(
        cfg, encode, [str(tmp_path / "src" / "m-000000.tar")], tmp_path / "c", processors=processors
    )
    assert summary.written == 2 and dict(summary.skipped) == {"corrupt_image": 1}
    samples = list(read_tar(summary.shards[0]))
    assert [s["__key__"] for s in samples] == ["a", "t"] and "features.npy" not in samples[1]


# -- stage 1 with a frozen text encoder: pooled caption features cached too ---------------------------------------


def _align_setup(tmp_path, connector="mlp", cache_text=None, **text):
    """A tiny align model and a cache of its features for 8 caption
    samples (eval split: unshuffled, same order as pixels)."""
    from helpers.configs import tiny_run_config

    from mmdist.materialize import build_run_model

    pattern = write_caption_shards(tmp_path / "src", [5, 3])
    cfg = tiny_run_config("align", connector=connector, model={"text": text},
                          data={"train": [{"shards": [pattern]}], "eval": [{"shards": [pattern]}],
                                "num_workers": 0, "shuffle_buffer": 0, "format": "caption"},
                          train={"micro_batch_size": 4, "global_batch_size": 4})
    torch.manual_seed(0)
    model = build_run_model(cfg).eval()
    summary = build_feature_cache(
        cfg, model, [pattern], tmp_path / "cache", batch_size=3, samples_per_shard=4, cache_text=cache_text
    )
    return cfg, model, summary


def _with_cache(cfg, tmp_path):
    from dataclasses import replace

    return replace(cfg, data=replace(cfg.data, feature_cache=str(tmp_path / "cache")))


def test_text_features_round_trip(tmp_path):
    cfg, model, summary = _align_setup(tmp_path)
    assert summary.written == 8
    key = json.loads((tmp_path / "cache" / "cache_key.json").read_text())
    assert key["text_features"] is True and key["member"] == "features.safetensors"
    assert key["parts"]["text"]["pooling"] == "mean" and key["parts"]["text"]["max_length"] == 32
    first = next(read_tar(summary.shards[0]))
    assert "features.safetensors" in first and "features.npy" not in first and "png" not in first

    cached = list(build_loader(_with_cache(cfg, tmp_path), model.processors, "eval", 0, 1))
    plain = list(build_loader(cfg, model.processors, "eval", 0, 1))
    assert len(cached) == len(plain) == 2
    hidden = model.text.hidden_size
    for a, b in zip(cached, plain):
        assert a["text_features"].shape == (4, hidden) and a["text_features"].dtype == torch.float32
        assert torch.equal(a["text_input_ids"], b["text_input_ids"])  # same samples in the same order
        # the stored vectors are the model's own pooled text encoding of these captions (cached in batches of 3,
        # so padded differently: equal up to float rounding)
        own = model.encode_text(b["text_input_ids"], b["text_attention_mask"])
        torch.testing.assert_close(a["text_features"], own, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(a["image_features"], model.encode_images(b["pixel_values"]), atol=1e-2, rtol=1e-2)


def test_text_features_give_the_same_loss(tmp_path):
    cfg, model, _ = _align_setup(tmp_path)
    cached = list(build_loader(_with_cache(cfg, tmp_path), model.processors, "eval", 0, 1))
    plain = list(build_loader(cfg, model.processors, "eval", 0, 1))
    with torch.no_grad():
        for a, b in zip(cached, plain):
            from_cache = model(a)["loss"]
            # text encoder on the tokens
            without_text = model({k: v for k, v in a.items() if k != "text_features"})["loss"]
            from_pixels = model(b)["loss"]
            torch.testing.assert_close(from_cache, without_text, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(from_cache, from_pixels, atol=1e-2, rtol=1e-2)  # image features are stored fp16
            assert not torch.equal(a["text_features"], torch.zeros_like(a["text_features"]))


def test_text_cache_key_mismatch_is_refused(tmp_path):
    from dataclasses import replace

    cfg, model, _ = _align_setup(tmp_path)
    cfg = _with_cache(cfg, tmp_path)

    def with_text(**changes):
        return replace(cfg, model=replace(cfg.model, text=replace(cfg.model.text, **changes)))

    with pytest.raises(CacheKeyMismatch, match=r"text\.encoder"):
        build_loader(with_text(init_seed=1), model.processors, "eval", 0, 1)
    with pytest.raises(CacheKeyMismatch, match=r"text\.pooling"):
        build_loader(with_text(pooling="cls"), model.processors, "eval", 0, 1)
    with pytest.raises(CacheKeyMismatch, match=r"text\.max_length"):
        build_loader(with_text(max_length=16), model.processors, "eval", 0, 1)
    with pytest.raises(CacheKeyMismatch, match=r"text\.dtype"):
        build_loader(with_text(dtype="bf16"), model.processors, "eval", 0, 1)
    batch = next(iter(build_loader(cfg, model.processors, "eval", 0, 1)))  # the matching setup is accepted
    assert "text_features" in batch


def test_trainable_text_encoder_caches_no_text_features(tmp_path):
    cfg, model, summary = _align_setup(tmp_path, connector="qformer")
    key = json.loads((tmp_path / "cache" / "cache_key.json").read_text())
    assert key["text_features"] is False and "text" not in key["parts"] and key["member"] == "features.npy"
    assert "features.npy" in next(read_tar(summary.shards[0]))
    batch = next(iter(build_loader(_with_cache(cfg, tmp_path), model.processors, "eval", 0, 1)))
    assert "text_features" not in batch and batch["text_input_ids"].shape[0] == 4
    assert torch.isfinite(model(batch)["loss"])
    with pytest.raises(ValueError, match="frozen text encoder"):
        build_feature_cache(cfg, model, [str(tmp_path / "src" / "train-000000.tar")], tmp_path / "c2", cache_text=True)


def test_image_only_cache_still_serves_a_frozen_text_run(tmp_path):
    cfg, model, _ = _align_setup(tmp_path, cache_text=False)
    key = json.loads((tmp_path / "cache" / "cache_key.json").read_text())
    assert key["text_features"] is False and "text" not in key["parts"]
    batch = next(iter(build_loader(_with_cache(cfg, tmp_path), model.processors, "eval", 0, 1)))
    assert "text_features" not in batch and batch["image_features"].shape[0] == 4  # the text encoder runs on the tokens
    assert torch.isfinite(model(batch)["loss"])


def test_mmdist_cache_cli_caches_text_unless_no_text(tmp_path):
    import yaml

    from mmdist.commands.cache import main as cli_main
    from mmdist.config.run import config_to_dict

    cfg, _, _ = _align_setup(tmp_path)
    path = tmp_path / "align.yaml"
    path.write_text(yaml.safe_dump(config_to_dict(cfg)))
    for flags, has_text in (([], True), (["--no-text"], False)):
        out = tmp_path / f"cli{len(flags)}"
        assert cli_main(["--config", str(path), "--out", str(out), *flags]) == 0
        for split in ("train", "eval"):
            key = json.loads((out / split / "cache_key.json").read_text())
            assert key["text_features"] is has_text and ("text" in key["parts"]) is has_text
            member = "features.safetensors" if has_text else "features.npy"
            assert member in next(read_tar(str(out / split / "features-000000.tar")))


def test_mmdist_cache_of_a_stage2_config_never_loads_the_llm(tmp_path, monkeypatch):
    """`mmdist cache` with a fuse config builds the vision tower and the processors only; its cache key is the one
    the stage-2 model (which does load the LLM) computes when training reads the cache."""
    import yaml
    from helpers.configs import tiny_run_config

    import mmdist.models.build as build
    from mmdist.commands.cache import main as cli_main
    from mmdist.config.run import config_to_dict
    from mmdist.data.cache import cache_key, cache_key_parts
    from mmdist.materialize import build_run_model

    pattern = write_caption_shards(tmp_path / "src", [3])
    cfg = tiny_run_config(
        "fuse", data={"train": [{"shards": [pattern]}], "eval": [], "num_workers": 0, "format": "caption"}
    )
    path = tmp_path / "fuse.yaml"
    path.write_text(yaml.safe_dump(config_to_dict(cfg)))
    real_load_llm = build.load_llm

    def refuse(*args, **kwargs):
        raise AssertionError("mmdist cache loaded the LLM to encode images")

    monkeypatch.setattr(build, "load_llm", refuse)
    assert cli_main(["--config", str(path), "--out", str(tmp_path / "cache"), "--device", "cpu"]) == 0
    monkeypatch.setattr(build, "load_llm", real_load_llm)
    written = json.loads((tmp_path / "cache" / "train" / "cache_key.json").read_text())
    model = build_run_model(cfg)
    assert written["key"] == cache_key(cache_key_parts(cfg, model.processors))
    assert "features.npy" in next(read_tar(str(tmp_path / "cache" / "train" / "features-000000.tar")))
