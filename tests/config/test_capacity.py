"""Stage-2 capacity and stage-1/stage-2 agreement, refused when the config is checked (mmdist/config/capacity.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from mmdist.config.capacity import image_token_problems, image_tokens_per_image, stage_pair_problems
from mmdist.config.run import load_config
from mmdist.settings import ConfigError

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
QFORMER = ["model.connector.type=qformer", "model.text.freeze=false"]


def _fuse(*overrides: str):
    return load_config(CONFIGS / "demo_fuse.yaml", list(overrides))


@pytest.mark.parametrize("overrides, tokens, setting", [
    (QFORMER + ["model.connector.qformer.num_queries=32"], 32, "qformer.num_queries"),
    (["model.connector.type=resampler", "model.connector.resampler.num_queries=31"], 31, "resampler.num_queries"),
    (["model.connector.resampler.before_projector=true", "model.connector.resampler.num_queries=40"], 40,
     "resampler.num_queries"),
    (["model.connector.image_tokens=36"], 36, "connector.image_tokens"),
    (["model.vision.init_config.image_size=84"], 36, "its patches"),  # 84 / 14 = 6 x 6 patches
])
def test_image_tokens_that_leave_no_text_are_refused_with_the_numbers(overrides, tokens, setting):
    with pytest.raises(ConfigError) as err:
        _fuse(*overrides)
    message = str(err.value)
    assert "data.max_len=32" in message and f"{tokens} image tokens" in message and setting in message
    assert f"at least {tokens + 2}" in message
    assert image_tokens_per_image(_fuse(*overrides, "data.max_len=128"))[0] == tokens


def test_tiles_times_tokens_are_counted():
    # 4 patch tokens per tile, max_tiles + the base image
    cfg = _fuse("data.image_tiling.enabled=true", "data.image_tiling.max_tiles=4", "data.max_len=64")
    assert image_token_problems(cfg) == []
    cfg.data.max_len = 21  # 20 image tokens + 1: no room for a prompt and an answer
    (key, message), = image_token_problems(cfg)
    assert key == "data.max_len" and "20 image tokens" in message and "max_tiles=4" in message


def test_room_for_text_passes_and_stage1_is_not_checked():
    assert image_token_problems(_fuse(*QFORMER, "data.max_len=64")) == []
    align = load_config(CONFIGS / "demo_align.yaml", [*QFORMER, "data.max_len=16"])  # stage 1 feeds no LLM
    assert image_token_problems(align) == []


def test_unknown_tower_size_is_not_guessed():
    cfg = _fuse("model.vision.init_config=null", "model.vision.name_or_path=some/tower")
    assert image_tokens_per_image(cfg) is None and image_token_problems(cfg) == []


def test_stage_pair_problems_name_what_stage_two_would_load_differently():
    align = load_config(CONFIGS / "demo_align.yaml", QFORMER)
    assert stage_pair_problems(align, _fuse(*QFORMER, "data.max_len=64")) == []
    keys = dict(stage_pair_problems(align, _fuse("data.max_len=64")))  # stage 2 left at the linear head
    assert "model.connector.type" in keys and "'qformer'" in keys["model.connector.type"]
    keys = dict(stage_pair_problems(align, _fuse(*QFORMER, "data.max_len=64", "model.connector.qformer.num_queries=8",
                                                  "model.text.name_or_path=bert-base-uncased")))
    assert set(keys) == {"model.connector.qformer.num_queries", "model.text.name_or_path"}
    keys = dict(stage_pair_problems(align, _fuse(*QFORMER, "model.vision.select_layer=-1", "data.max_len=64")))
    assert set(keys) == {"model.vision.select_layer"}


def test_stage_pair_checks_stage_two_capacity_with_stage_one_queries():
    align = load_config(CONFIGS / "demo_align.yaml", [*QFORMER, "model.connector.qformer.num_queries=40"])
    fuse = _fuse(*QFORMER, "model.connector.qformer.num_queries=40", "data.max_len=64")
    assert stage_pair_problems(align, fuse) == []
    fuse.data.max_len = 41
    (key, message), = stage_pair_problems(align, fuse)
    assert key == "data.max_len" and "40 image tokens" in message
