"""GPU tier: benchmarks/gpu_system.py's CUDA paths at toy shapes, and the out-of-memory report's GPU figures.

Selected with ``-m gpu``; skipped without a CUDA GPU. The full-shape run is
``python benchmarks/gpu_system.py`` (docs/benchmarks.md), too long for a test.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_gpu_system_toy_shapes_on_the_gpu(tmp_path):
    pytest.importorskip("sklearn")
    env = dict(os.environ, DS_ACCELERATOR="cuda")
    env.pop("MMDIST_CPU_BF16", None)
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_system.py"), "--tiny", "--device", "cuda", "--steps", "3",
         "--workdir", str(tmp_path), "--json", str(tmp_path / "result.json")],
        capture_output=True, text=True, timeout=600, cwd=ROOT, env=env,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    res = json.loads((tmp_path / "result.json").read_text())
    t, b = res["trainer"], res["bare"]
    assert res["device"] != "cpu" and t["real_tokens"] == b["real_tokens"] > 0
    assert res["ratio"] == pytest.approx(t["tokens_per_s"] / b["tokens_per_s"])
    assert 0 < t["mfu"] <= 1 and 0 < b["mfu"] <= 1 and t["peak_memory_gib"] > 0 and b["peak_memory_gib"] > 0
    # fair: the bare model got the trainer's batches (on the GPU, cast), step for step, through the same kernel
    assert res["same_batches"] is True and t["step_tokens"] == b["step_tokens"]
    assert t["layouts"] == b["layouts"] and len(res["attention_paths"]) == 1
    assert res["attention_paths"][0].endswith(("/sdpa_per_sample", "/flash_varlen")), res["attention_paths"]


@pytest.mark.parametrize("kernel", ["sdpa_per_sample", "flex"])
def test_gpu_system_packed_kernels_on_both_sides(tmp_path, kernel):
    """--packed-attention puts the kernel on both sides: the same packed rows through the same attention path."""
    pytest.importorskip("sklearn")
    env = dict(os.environ, DS_ACCELERATOR="cuda")
    env.pop("MMDIST_CPU_BF16", None)
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_system.py"), "--tiny", "--device", "cuda", "--steps", "3",
         "--packed-attention", kernel, "--workdir", str(tmp_path), "--json", str(tmp_path / "result.json")],
        capture_output=True, text=True, timeout=600, cwd=ROOT, env=env,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    res = json.loads((tmp_path / "result.json").read_text())
    t, b = res["trainer"], res["bare"]
    assert res["same_batches"] is True and t["step_tokens"] == b["step_tokens"] and t["layouts"] == b["layouts"]
    assert res["attention_paths"] == [f"mmdist_packed_sdpa/{kernel}"]
    assert 0 < t["mfu"] <= 1 and 0 < b["mfu"] <= 1


def test_out_of_memory_report_reads_the_gpu():
    from helpers.configs import tiny_run_config

    from mmdist.training import oom
    from mmdist.training.step import memory_summary

    with pytest.raises(torch.OutOfMemoryError):
        torch.empty(1 << 46, dtype=torch.uint8, device="cuda")  # 64 TiB
    summary = memory_summary("cuda:0")
    assert "allocated" in summary and "reserved" in summary and "total" in summary
    total = torch.cuda.get_device_properties(0).total_memory
    line = oom.planner_line(tiny_run_config("fuse"), world_size=1, budget=total)
    assert line.startswith("planner: largest micro-batch that fits"), line
