"""What a run writes before its first step: config.yaml holds concrete values, never `auto`."""

from __future__ import annotations

import yaml
from helpers.trainer_toy import toy_config

from mmdist.config.run import load_config
from mmdist.data.loader import MAX_AUTO_WORKERS
from mmdist.training.run_setup import write_run_dir


def test_config_yaml_holds_the_resolved_worker_count(tmp_path, monkeypatch):
    """data.num_workers: null (auto) is written as the count this machine gives, with why; the run itself keeps auto
    (its loader follows a checkpoint's count on resume), and the written file loads back as a config."""
    monkeypatch.setattr("mmdist.hardware.cpus_for_this_rank", lambda: (4, "test: 4 CPUs"))
    cfg = load_config(base=toy_config(str(tmp_path / "run"), data={"num_workers": None}))
    assert cfg.data.num_workers is None
    write_run_dir(cfg, rank=0)
    text = (tmp_path / "run" / "config.yaml").read_text()
    written = yaml.safe_load(text)["data"]["num_workers"]
    assert isinstance(written, int) and written == 3 <= MAX_AUTO_WORKERS  # one CPU stays with training
    assert "# data.num_workers = 3 (auto)" in text
    assert cfg.data.num_workers is None  # the run's own config is not changed
    assert load_config(tmp_path / "run" / "config.yaml").data.num_workers == 3


def test_config_yaml_keeps_a_set_worker_count_and_other_ranks_write_nothing(tmp_path):
    cfg = load_config(base=toy_config(str(tmp_path / "run"), data={"num_workers": 2}))
    write_run_dir(cfg, rank=1)
    assert not (tmp_path / "run" / "config.yaml").exists()
    write_run_dir(cfg, rank=0)
    text = (tmp_path / "run" / "config.yaml").read_text()
    # no note: nothing was resolved
    assert yaml.safe_load(text)["data"]["num_workers"] == 2 and "num_workers = " not in text
