"""benchmarks/bench_quantized.py --tiny: one row per method, bytes
shrink, greedy answers compared with the unquantized run."""

from __future__ import annotations

import importlib.util
import json

import bench_quantized
import pytest


@pytest.mark.skipif(
    importlib.util.find_spec("bitsandbytes") is None, reason="bitsandbytes not installed (extra mmdist[quant])"
)
@pytest.mark.slow  # ~55 s on 2 loaded cores: three quantizations of a model, each trained a step and generating
def test_tiny_run_prints_one_row_per_method(tmp_path, capsys):
    out = tmp_path / "quant.json"
    assert bench_quantized.main(["--tiny", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    rows = {r["method"]: r for r in report["rows"]}
    assert set(rows) == {"none", "int8", "nf4"}
    assert "flags" in report["machine"]
    assert (
        rows["none"]["bytes_x"] == 1
        and rows["nf4"]["frozen_bytes"] < rows["int8"]["frozen_bytes"] < rows["none"]["frozen_bytes"]
    )
    assert all(r["step_s"] > 0 and r["gen_tok_s"] > 0 and 0 <= r["agree_%"] <= 100 for r in rows.values())
    assert rows["none"]["agree_%"] == 100
    assert "| tiny  | int8" in capsys.readouterr().out


@pytest.mark.skipif(
    importlib.util.find_spec("bitsandbytes") is None, reason="bitsandbytes not installed (extra mmdist[quant])"
)
@pytest.mark.slow  # a 2-step tiny stage 2, then three `mmdist eval` processes on 6 held-out digits
def test_run_mode_answers_the_heldout_shards_with_each_method(tmp_path, capsys, monkeypatch):
    """--run/--data: a trained stage-2 run's held-out answers, unquantized and quantized, each method its own row."""
    from helpers.configs import tiny_run_config

    from mmdist.data.shards import shard_pattern, write_demo_shards
    from mmdist.training.loop import train

    pytest.importorskip("sklearn")
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    shards = {
        k: shard_pattern(v)
        for k, v in write_demo_shards(tmp_path / "digits", image_size=16, samples_per_shard=16, limit=32).items()
    }
    cfg = tiny_run_config(
        "fuse",
        f"run_dir={tmp_path / 'run'}",
        f'data.train=[{{"shards": ["{shards["train"]}"]}}]',
        f'data.eval=[{{"shards": ["{shards["eval"]}"]}}]',
        "data.template=plain",
        "train.max_steps=2",
        "train.global_batch_size=2",
        "train.micro_batch_size=2",
        "checkpoint.save_every=0",
        "log.progress_bar=false",
        "log.tensorboard=false",
    )
    assert train(cfg)["finished"]
    out = tmp_path / "agree.json"
    assert bench_quantized.main(["--run", str(tmp_path / "run"), "--data", shards["eval"], "--max-samples", "6",
                                 "--json", str(out)]) == 0
    rows = {r["method"]: r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == {"none", "int8", "nf4"}
    assert all(r["samples"] == 6 and 0 <= r["accuracy_%"] <= 100 and r["eval_s"] > 0 for r in rows.values())
    assert rows["none"]["agree_%"] == 100 and all(0 <= r["agree_%"] <= 100 for r in rows.values())
    assert "| int8" in capsys.readouterr().out
