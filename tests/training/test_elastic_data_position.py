"""Elastic resume with the real model and the per-rank WebDataset order (data.order=per_rank): 2 -> 1 -> 3 ranks
under ZeRO-3 within one epoch read every sample once, and the final weights are an uninterrupted run's on the same
batches. (ZeRO-2 across world sizes, 4 -> 2 -> 3 ranks with the global order, is
tests/training/test_global_batch_training.py; the reading order alone, on 2 -> 1, 2 -> 3 and 3 -> 2 ranks,
tests/data/test_elastic_data.py.)"""

from __future__ import annotations

import copy
import json
import math
from collections import Counter
from pathlib import Path

import pytest
import torch
import yaml
from helpers.toy_launch import launch
from helpers.trainer_toy import recorded_steps, recording_loader_builder, replay_loader_builder
from safetensors.torch import load_file

from mmdist.config.run import load_config
from mmdist.training.loop import train

REPO = Path(__file__).resolve().parents[2]


def _flat(run_dir: Path) -> torch.Tensor:
    weights = load_file(str(run_dir / "export" / "model.safetensors"))
    return torch.cat([weights[k].float().flatten() for k in sorted(weights)])


@pytest.mark.multiproc
@pytest.mark.slow
def test_real_loader_moves_between_world_sizes_reading_every_sample_once(tmp_path):
    """Steps 1-2 on 2 ranks, 3-4 on 1, 5-6 on 3 (ZeRO-3): the tiny fuse model on WebDataset shards
    trains on the epoch's 72 samples exactly once, with equal batch counts per rank (no hang). Global batch 12 with
    micro-batch 4: on 2 ranks the micro-batch fits down to 3 (train.fit_micro_batch), on 1 and 3 it stays 4.

    The final weights equal those of one uninterrupted single-process run on the same global batches (each step's
    12 samples as 12 micro-batches of 1) within 1e-5 relative (L2 over every trainable weight; measured 3e-7, float
    summation order): the weights, Adam moments, step count and learning-rate schedule carry over exactly, and the
    loss is the mean over the step's answer tokens however the batch is cut. The order of the batches is the elastic
    run's own: a streaming loader reads other shards first on another number of ranks (docs/operations.md)."""
    pytest.importorskip("sklearn")
    from mmdist.data.shards import shard_pattern, write_demo_shards

    shards = write_demo_shards(tmp_path / "demo", image_size=16, samples_per_shard=12, limit=72)  # 6 shards, 72 samples
    recipe = yaml.safe_load((REPO / "configs" / "tiny_fuse.yaml").read_text())
    recipe["data"].update({"train": [{"shards": [shard_pattern(shards["train"])]}], "eval": [], "num_workers": 1,
                           # the global order's resize: tests/training/test_global_batch_training.py
                           "order": "per_rank"})
    recipe["train"].update({"max_steps": 6, "global_batch_size": 12, "micro_batch_size": 4, "eval_every": 0})
    recipe["engine"]["zero_stage"] = 3
    recipe["checkpoint"].update({"save_every": 2})
    recipe["log"].update({"progress_bar": False, "tensorboard": False, "param_table": False, "peak_flops": 1e9})
    recipe["run_dir"] = str(tmp_path / "run")
    record = tmp_path / "record"
    record.mkdir()

    history = []
    worlds = (2, 1, 3)
    for i, (world, stop) in enumerate(zip(worlds, (2, 4, None))):
        if world == 1:
            part = train(
                load_config(base=recipe), loader_builder=recording_loader_builder(str(record)), stop_after=stop
            )
        else:
            part = launch(
                tmp_path / f"part{i}",
                {"mode": "real", "config": recipe, "stop_after": stop, "record_keys": str(record)},
                nproc=world,
            )
        if i:
            assert part["resumed_from"].endswith(f"step_{2 * i:06d}")
        history += part["history"]
    assert [h["step"] for h in history] == list(range(1, 7))
    assert all(math.isfinite(h["loss"]) for h in history)

    steps = recorded_steps(str(record), legs=(2, 2, 2))
    assert [len(s) for s in steps] == [12] * 6  # the global batch stayed 12 on every world size
    seen = Counter(k for step in steps for k in step)
    assert len(seen) == 72 and set(seen.values()) == {1}  # the whole epoch, no sample twice, none skipped
    lines = [json.loads(line) for line in (record / "keys.jsonl").read_text().splitlines()]
    for world in worlds:  # the same number of micro-batches on every rank of a part
        per_rank = Counter(d["rank"] for d in lines if d["world"] == world)
        assert len(per_rank) == world and len(set(per_rank.values())) == 1

    reference = copy.deepcopy(recipe)
    reference["run_dir"] = str(tmp_path / "reference")
    reference["data"]["num_workers"] = 0
    reference["train"]["micro_batch_size"] = 1  # and the same ZeRO stage as the elastic run
    straight = train(load_config(base=reference), loader_builder=replay_loader_builder(steps))
    assert straight["step"] == 6
    # losses continue smoothly: step for step the uninterrupted run's (the mean over each step's answer tokens)
    assert [h["loss"] for h in history] == pytest.approx([h["loss"] for h in straight["history"]], rel=1e-5)
    assert [h["lr"] for h in history] == pytest.approx([h["lr"] for h in straight["history"]], rel=1e-9)
    init = copy.deepcopy(reference)
    init["run_dir"] = str(tmp_path / "init")
    init["train"].update({"lr": 1e-30, "max_steps": 1})  # one step that moves nothing: the initial weights
    train(load_config(base=init), loader_builder=replay_loader_builder(steps[:1]))
    w0, elastic, uninterrupted = _flat(tmp_path / "init"), _flat(tmp_path / "run"), _flat(tmp_path / "reference")
    moved = (uninterrupted - w0).norm()
    assert moved > 0.1  # the run trained
    assert (elastic - uninterrupted).norm() / moved < 1e-5
