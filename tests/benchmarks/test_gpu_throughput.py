"""benchmarks/gpu_throughput.py at its tiny CPU shape, and the shared benchmark accounting."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]

FIELDS = [
    "device",
    "tokens_per_s",
    "mfu_4n",
    "hfu",
    "peak_memory_gib",
    "step_s",
    "llm_params",
    "frozen_params_with_grad",
]


def test_tiny_cpu_mode_runs_and_prints_its_fields(tmp_path):
    out_json = tmp_path / "gpu.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_throughput.py"), "--tiny", "--steps", "2", "--warmup", "1",
         "--json", str(out_json)],
        capture_output=True, text=True, timeout=600, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    printed = {line.split()[0] for line in proc.stdout.splitlines() if line.strip()}
    for field in FIELDS:
        assert field in printed, f"{field} missing from:\n{proc.stdout}"
    res = json.loads(out_json.read_text())
    assert res["device"] == "cpu" and res["steps"] == 2
    assert res["tokens_per_s"] > 0 and res["peak_memory_gib"] > 0
    assert 0 < res["mfu_4n"] < res["hfu"] < 1.5  # recompute adds FLOPs; a CPU cannot beat its own matmul by much
    assert res["frozen_params_with_grad"] == 0
    assert res["tokens_per_s"] == pytest.approx(res["micro_batch"] * res["seq_len"] / res["step_s"], rel=1e-6)


def test_peak_comes_from_the_trainers_datasheet_table():
    """The benchmark and the trainer's MFU read one table
    (mmdist.hardware); longer names match first (L40S before L40)."""
    import gpu_throughput

    from mmdist.hardware import datasheet_peak

    assert datasheet_peak("NVIDIA H100 80GB HBM3").bf16 == datasheet_peak("NVIDIA H200").bf16 == 989e12
    assert datasheet_peak("NVIDIA L40S").label == "L40S" and datasheet_peak("NVIDIA L40").label == "L40"
    flops, source = gpu_throughput.device_peak(torch.device("cpu"), torch.float32)
    assert flops > 0 and "probe" in source


def test_union_bytes_counts_overlapping_views_once():
    import torch
    from memory_per_rank import union_bytes

    flat = torch.zeros(100)
    a, b = flat[:60], flat[40:]
    other = torch.zeros(10)
    assert union_bytes([a, b, other]) == (100 + 10) * 4
    assert union_bytes([flat], exclude=[b]) == 40 * 4



def test_bare_benchmark_counts_flops_like_the_trainer():
    """gpu_throughput's MFU is the model's own count (the bar's), per step, over its batches."""
    import gpu_throughput

    res = gpu_throughput.run(tiny=True, steps=1, warmup=0, micro_batch=2, seq_len=64)
    model, _ = gpu_throughput.build(True, torch.device("cpu"), "fp32", True)
    batch = gpu_throughput.make_batch(model, 2, 64, torch.device("cpu"), torch.Generator().manual_seed(0))
    c = model.batch_counts(batch)
    count = model.flop_count()
    assert res["flops_per_step"] == pytest.approx(count.step(c.tokens, c.supervised_tokens, c.image_tokens, c.images,
                                                             c.samples))
    assert res["mfu_4n"] == pytest.approx(res["flops_per_step"] / res["step_s"] / res["peak_flops"])
