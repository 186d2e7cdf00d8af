"""benchmarks/bench_quantized.py --tiny: one row per method, bytes shrink, greedy answers compared with the unquantized run."""

from __future__ import annotations

import importlib.util
import json

import bench_quantized
import pytest


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="bitsandbytes not installed (extra mmdist[quant])")
@pytest.mark.slow  # ~55 s on 2 loaded cores: three quantizations of a model, each trained a step and generating
def test_tiny_run_prints_one_row_per_method(tmp_path, capsys):
    out = tmp_path / "quant.json"
    assert bench_quantized.main(["--tiny", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    rows = {r["method"]: r for r in report["rows"]}
    assert set(rows) == {"none", "int8", "nf4"}
    assert "flags" in report["machine"]
    assert rows["none"]["bytes_x"] == 1 and rows["nf4"]["frozen_bytes"] < rows["int8"]["frozen_bytes"] < rows["none"]["frozen_bytes"]
    assert all(r["step_s"] > 0 and r["gen_tok_s"] > 0 and 0 <= r["agree_%"] <= 100 for r in rows.values())
    assert rows["none"]["agree_%"] == 100
    assert "| tiny  | int8" in capsys.readouterr().out
