"""One resolve step: the user's config and the machine become the run's config once, and nothing after changes it."""

from __future__ import annotations

import yaml
from helpers.trainer_toy import toy_config, toy_loader_builder, toy_model_builder

from mmdist.config.run import load_config
from mmdist.settings import to_dict
from mmdist.training.loop import train
from mmdist.training.resolve import is_resolved, resolve_run


def test_resolve_decides_what_the_config_leaves_to_the_machine_and_leaves_the_input_alone(tmp_path):
    user = load_config(base=toy_config(str(tmp_path / "run"), engine={"zero_stage": 2, "precision": "auto"},
                                       train={"micro_batch_size": 3}))
    before = to_dict(user)
    assert not is_resolved(user)
    resolved = resolve_run(user, world_size=1)
    assert to_dict(user) == before  # the user's config is an input, not a scratch pad
    cfg = resolved.config
    assert is_resolved(cfg) and cfg.engine.precision == "fp32" and cfg.model.vision.dtype == "fp32"
    assert cfg.train.micro_batch_size == 2 and "train.micro_batch_size: 3 -> 2" in resolved.micro_batch_note
    assert [key for key, _ in resolved.precision] == ["engine.precision", "model.vision.dtype", "model.text.dtype"]
    assert resolved.zero_stage_note is None  # the stage was named: the planner did not run
    assert to_dict(resolve_run(cfg, world_size=1).config) == to_dict(cfg)  # nothing is left to decide


def test_the_engine_model_and_loaders_see_the_resolved_config_unchanged_and_config_yaml_records_it(tmp_path):
    seen = {}

    def model_builder(cfg, gather):
        seen["model"], seen["at_build"] = cfg, to_dict(cfg)
        return toy_model_builder(cfg, gather)

    def loader_builder(cfg, processors, split, rank, world_size):
        seen.setdefault(f"loader_{split}", cfg)
        return toy_loader_builder()(cfg, processors, split, rank, world_size)

    run = tmp_path / "run"
    user = load_config(base=toy_config(str(run), engine={"zero_stage": 2, "precision": "auto"},
                                       train={"micro_batch_size": 3, "max_steps": 2}))
    before = to_dict(user)
    summary = train(user, model_builder=model_builder, loader_builder=loader_builder)
    assert summary["finished"] and to_dict(user) == before
    resolved = seen["model"]
    assert seen["loader_train"] is resolved  # one object from the resolve step to the model and the data
    assert to_dict(resolved) == seen["at_build"]  # not changed by building the engine, the steps or the export
    assert is_resolved(resolved) and resolved.train.micro_batch_size == 2
    assert yaml.safe_load((run / "config.yaml").read_text()) == seen["at_build"]  # what config.yaml records
