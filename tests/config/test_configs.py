"""Every shipped recipe in configs/ loads and validates; bad configs fail naming the key and the file."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from mmdist.commands.config import format_explain
from mmdist.config.run import ConfigError, RunConfig, dump_config, load_config
from mmdist.settings import explain

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"
SHIPPED = sorted(CONFIG_DIR.glob("*.yaml"))


def test_configs_folder_is_not_empty():
    assert SHIPPED, f"no YAML recipes found in {CONFIG_DIR}"


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_every_shipped_config_validates(path: Path):
    cfg = load_config(path)
    assert isinstance(cfg, RunConfig)
    assert cfg.stage.name in ("align", "fuse")


# A minimal valid stage-2 config; each bad case below breaks one thing.
GOOD = {
    "stage": "fuse",
    "model": {
        "llm": {"init_config": {"model_type": "llama"}},
        "vision": {"init_config": {"model_type": "vit"}},
    },
    "data": {"train": [{"shards": ["data/train-000000.tar"]}]},
    "train": {"max_steps": 3},
}


def _write(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_minimal_config_is_valid(tmp_path):
    cfg = load_config(_write(tmp_path, GOOD))
    assert cfg.train.max_steps == 3
    assert cfg.model.llm.dtype == "auto"  # default kept: resolved from the hardware at start-up


BAD_CASES = {
    "unknown top key": ({"trian": {"lr": 1.0}}, "trian", "did you mean train"),
    "unknown nested key": ({"model": {"llm": {"dtyp": "bf16"}}}, "model.llm.dtyp", "did you mean model.llm.dtype"),
    "bad choice": ({"model": {"llm": {"dtype": "bf8"}}}, "model.llm.dtype", "'bf8' is not one of"),
    "bad stage": ({"stage": "fusion"}, "stage", "did you mean 'fuse'"),
    "wrong type": ({"train": {"micro_batch_size": "eight"}}, "train.micro_batch_size", "expected an integer"),
    "no budget": ({"train": {"max_steps": None}}, "train.max_steps", "set max_steps or max_samples"),
    "batch smaller than micro": (
        {"train": {"global_batch_size": 2, "micro_batch_size": 4}},
        "train.global_batch_size",
        "smaller than",
    ),
    "offload params without zero3": (
        {"engine": {"offload_params": True, "zero_stage": 2}},
        "engine.offload_params",
        "zero_stage=3",
    ),
    "no shards": ({"data": {"train": []}}, "data.train", "at least one source"),
    "source weight in epoch mode": (
        {"data": {"train": [{"shards": ["a.tar"]}, {"shards": ["b.tar"], "weight": 0.3}]}},
        "data.train[1].weight",
        "resampled mode",
    ),
    "qformer without stage1 weights": (
        {"model": {"connector": {"type": "qformer"}}},
        "model.connector.stage1_weights",
        "stage 1 first",
    ),
    "qformer with frozen text": (
        {"stage": "align", "model": {"text": {"name_or_path": "minilm"}, "connector": {"type": "qformer"}}},
        "model.text.freeze",
        "Q-Former",
    ),
    "llm given twice": (
        {"model": {"llm": {"name_or_path": "x", "init_config": {"model_type": "llama"}}}},
        "model.llm.init_config",
        "not both",
    ),
    "custom vision without class": (
        {"model": {"vision": {"source": "custom", "init_config": None}}},
        "model.vision.custom_class",
        "package.module:Class",
    ),
}


def _merge(base: dict, patch: dict) -> dict:
    out = dict(base)
    for key, value in patch.items():
        out[key] = (
            _merge(out.get(key, {}), value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
        )
    return out


@pytest.mark.parametrize("name", sorted(BAD_CASES))
def test_bad_config_names_key_and_file(tmp_path, name):
    patch, key, fragment = BAD_CASES[name]
    path = _write(tmp_path, _merge(GOOD, patch))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    problems = [p for p in info.value.problems if p.key == key]
    assert problems, f"expected a problem for {key}, got: {info.value}"
    assert any(fragment in p.message for p in problems), str(info.value)
    assert str(path) in str(info.value)


def test_all_problems_reported_at_once(tmp_path):
    path = _write(tmp_path, _merge(GOOD, {"model": {"llm": {"dtype": "bf8", "dtyp": 1}}, "train": {"lr": -1.0}}))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    keys = {p.key for p in info.value.problems}
    assert {"model.llm.dtype", "model.llm.dtyp", "train.lr"} <= keys


def test_overrides_win_over_file_and_are_typed(tmp_path):
    cfg = load_config(_write(tmp_path, GOOD), ["model.llm.dtype=fp16", "train.lr=3e-4", "data.packing=true"])
    assert cfg.model.llm.dtype == "fp16"
    assert cfg.train.lr == pytest.approx(3e-4)
    assert cfg.data.packing is True


def test_bad_override_names_command_line(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_config(_write(tmp_path, GOOD), ["train.lrr=1"])
    assert "command line" in str(info.value) and "train.lrr" in str(info.value)


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("stage: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(broken)


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(_write(tmp_path, GOOD), ["train.lr=0.01"])
    out = dump_config(cfg, tmp_path / "run" / "config.yaml")
    again = load_config(out)
    assert again == cfg


def test_every_setting_has_a_doc():
    rows = explain(RunConfig)
    assert len(rows) > 60
    missing = [key for key, _, _, doc in rows if not doc.strip()]
    assert not missing, f"settings without a doc: {missing}"
    text = format_explain("model.llm")
    assert "model.llm.dtype" in text and "dtype of the frozen weights" in text
