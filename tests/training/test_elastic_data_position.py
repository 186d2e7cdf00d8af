"""The real WebDataset loader's position moves with the trainable state: 2 -> 1 -> 3 ranks in one epoch, every sample once."""

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
def test_real_loader_moves_2_to_1_to_3_ranks_within_one_epoch_reading_every_sample_once(tmp_path):
    """Steps 1-2 on 2 ranks, 3-4 on 1 rank, 5-6 on 3 ranks: the real tiny fuse model (ZeRO-3) on WebDataset
    shards trains on the epoch's 72 samples exactly once, with equal batch counts per rank (no hang)."""
    pytest.importorskip("sklearn")
    from mmdist.data.shards import shard_pattern, write_demo_shards

    shards = write_demo_shards(tmp_path / "demo", image_size=16, samples_per_shard=12, limit=72)  # 6 shards, 72 samples
    recipe = yaml.safe_load((REPO / "configs" / "tiny_fuse.yaml").read_text())
    recipe["data"].update({"train": [{"shards": [shard_pattern(shards["train"])]}], "eval": [], "num_workers": 1})
    # global batch 12 = micro 2 x accumulation 3 / 6 / 2 on 2 / 1 / 3 ranks: 6 steps are exactly one epoch
    recipe["train"].update({"max_steps": 6, "global_batch_size": 12, "micro_batch_size": 2, "eval_every": 0})
    recipe["checkpoint"].update({"save_every": 2})
    recipe["log"].update({"progress_bar": False, "tensorboard": False, "param_table": False, "peak_flops": 1e9})
    recipe["run_dir"] = str(tmp_path / "run")
    record = tmp_path / "record"
    record.mkdir()

    def spec(stop):
        return {"mode": "real", "config": recipe, "stop_after": stop, "record_keys": str(record)}

    first = launch(tmp_path / "part0", spec(2), nproc=2)
    second = train(load_config(base=recipe), loader_builder=recording_loader_builder(str(record)), stop_after=4)
    third = launch(tmp_path / "part2", spec(None), nproc=3)
    assert second["resumed_from"].endswith("step_000002") and third["resumed_from"].endswith("step_000004")
    assert third["step"] == 6

    lines = [json.loads(line) for line in (record / "keys.jsonl").read_text().splitlines()]
    assert {(d["world"], d["epoch"]) for d in lines} == {(2, 0), (1, 0), (3, 0)}
    for world in (2, 1, 3):  # 2 steps x global batch 12 each, and the same number of batches on every rank
        assert sum(len(d["keys"]) for d in lines if d["world"] == world) == 24
        per_rank = Counter(d["rank"] for d in lines if d["world"] == world)
        assert len(per_rank) == world and len(set(per_rank.values())) == 1
    seen = Counter(k for d in lines for k in d["keys"])
    assert len(seen) == 72 and set(seen.values()) == {1}  # the whole epoch, no sample twice, none skipped
    history = first["history"] + second["history"] + third["history"]
    assert [h["step"] for h in history] == list(range(1, 7))
    assert all(math.isfinite(h["loss"]) for h in history)
