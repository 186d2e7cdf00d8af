"""The real WebDataset loader's position moves with the trainable state: 2 ranks -> 1 rank, one epoch, every sample once."""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import pytest
import yaml
from helpers.trainer_toy import launch, recording_loader_builder

from mmdist.config import load_config
from mmdist.training.trainer import train

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.multiproc
@pytest.mark.slow
def test_real_loader_resumes_on_one_rank_with_exactly_the_rest_of_the_epoch(tmp_path):
    pytest.importorskip("sklearn")
    from mmdist.data.shards import shard_pattern, write_demo_shards

    shards = write_demo_shards(tmp_path / "demo", image_size=16, samples_per_shard=12, limit=48)  # 4 shards, 48 samples
    recipe = yaml.safe_load((REPO / "configs" / "tiny_fuse.yaml").read_text())
    recipe["data"].update({"train": [{"shards": [shard_pattern(shards["train"])]}], "eval": [], "num_workers": 1})
    # global batch 4 = micro 2 x accumulation 1 on 2 ranks, 2 on 1 rank: 12 steps are exactly one epoch
    recipe["train"].update({"max_steps": 12, "global_batch_size": 4, "micro_batch_size": 2, "eval_every": 0})
    recipe["checkpoint"].update({"save_every": 3})
    recipe["log"].update({"progress_bar": False, "tensorboard": False, "param_table": False, "peak_flops": 1e9})
    recipe["run_dir"] = str(tmp_path / "run")
    record = tmp_path / "record"
    record.mkdir()

    first = launch(tmp_path / "part0", {"mode": "real", "config": recipe, "stop_after": 3, "record_keys": str(record)}, nproc=2)
    assert first["step"] == 3
    second = train(load_config(base=recipe), loader_builder=recording_loader_builder(str(record)))
    assert second["resumed_from"].endswith("step_000003") and second["step"] == 12

    lines = [json.loads(line) for line in (record / "keys.jsonl").read_text().splitlines()]
    assert {(d["world"], d["epoch"]) for d in lines} == {(2, 0), (1, 0)}
    assert sum(len(d["keys"]) for d in lines if d["world"] == 2) == 12  # 3 steps x global batch 4
    seen = Counter(k for d in lines for k in d["keys"])
    assert len(seen) == 48 and set(seen.values()) == {1}  # the whole epoch, no sample twice, none skipped
    history = first["history"] + second["history"]
    assert [h["step"] for h in history] == list(range(1, 13))
    assert all(math.isfinite(h["loss"]) for h in history)
