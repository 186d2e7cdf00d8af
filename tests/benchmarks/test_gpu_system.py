"""benchmarks/gpu_system.py at its tiny CPU shape: the real trainer and the bare model side by side.

Asserts the printed fields, the ratio's arithmetic, that both sides processed the
same real tokens and images over the same steady steps, and that the trainer's own
metrics.jsonl figure (the bar's) is the benchmark's.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

PRINTED = [
    "device",
    "steady_steps",
    "real_tokens",
    "images",
    "samples",
    "tokens_per_s",
    "ratio",
    "mfu",
    "hfu",
    "trainer_reported",
    "peak_memory_gib",
    "step_s",
]
PHASES = ["data_wait", "to_device", "vision", "llm_forward", "backward", "optimizer", "host_sync", "logging", "other"]


@pytest.fixture(scope="module")
def tiny_result(tmp_path_factory):
    pytest.importorskip("sklearn")  # the demo digits
    folder = tmp_path_factory.mktemp("gpu_system")
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "gpu_system.py"),
            "--tiny",
            "--steps",
            "3",
            "--zero-stage",
            "3",
            "--workdir",
            str(folder),
            "--json",
            str(folder / "result.json"),
        ],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout, json.loads((folder / "result.json").read_text()), folder


def test_prints_every_field_and_the_breakdown(tiny_result):
    stdout, res, _ = tiny_result
    printed = {line.split()[0] for line in stdout.splitlines() if line.strip() and not line.startswith("|")}
    for field in PRINTED:
        assert field in printed, f"{field} missing from:\n{stdout}"
    table = {line.split("|")[1].strip() for line in stdout.splitlines() if line.startswith("| ")}
    assert set(PHASES) <= table, stdout
    assert res["device"] == "cpu" and res["warmup_steps"] == 1
    assert res["packed_attention"] == "auto" and res["bare_rows_packed"] is False  # no flag: default, unpacked


def test_both_sides_processed_the_same_real_tokens(tiny_result):
    _, res, folder = tiny_result
    t, b = res["trainer"], res["bare"]
    assert t["steps"] == b["steps"] == 2  # 3 steps, the first left out
    assert t["real_tokens"] == b["real_tokens"] > 0 and t["images"] == b["images"] > 0
    records = [json.loads(line) for line in (folder / "run" / "metrics.jsonl").read_text().splitlines()]
    steady = [r for r in records if r["split"] == "train" and r["step"] > 1]
    assert t["real_tokens"] == sum(r["step_tokens"] for r in steady)  # the packed batches' own count
    assert max(r["step_tokens"] for r in steady) <= 2 * 128  # packed rows of max_len


def test_ratio_and_rates_add_up(tiny_result):
    _, res, _ = tiny_result
    t, b = res["trainer"], res["bare"]
    assert res["ratio"] == pytest.approx(t["tokens_per_s"] / b["tokens_per_s"], rel=1e-9)
    for side in (t, b):
        assert side["tokens_per_s"] == pytest.approx(side["real_tokens"] / (side["step_s"] * side["steps"]), rel=1e-9)
        assert 0 < side["mfu"] < side["hfu"] <= 1.0  # checkpointing recomputes: HFU above MFU
        assert sum(side["breakdown_s"][k] for k in PHASES) == pytest.approx(side["step_s"], rel=1e-6)
        assert side["breakdown_s"]["vision"] > 0 and side["breakdown_s"]["backward"] > 0
    # the bar's figure is the benchmark's: the same steady window and the same FLOP count
    assert t["reported_tokens_per_s"] == pytest.approx(t["tokens_per_s"], rel=0.02)
    assert t["reported_mfu"] == pytest.approx(t["mfu"], rel=0.02)
    assert t["reported_mfu_steady_from_step"] == 2
    # ZeRO-3's fetch/release hooks run inside the trainer's forward and backward only
    assert (
        0
        < t["breakdown_s"]["zero3_fetch_release"]
        < t["breakdown_s"]["llm_forward"] + t["breakdown_s"]["backward"] + t["breakdown_s"]["vision"]
    )
    assert b["breakdown_s"]["zero3_fetch_release"] == 0


def test_zero_stage_auto_records_what_the_trainer_resolved(tiny_result, tmp_path):
    """The default (auto) runs the stage the trainer's `engine.zero_stage: auto` picks, and the result names it."""
    _, explicit, _ = tiny_result
    assert (explicit["zero_stage"], explicit["zero_stage_setting"]) == (3, 3)
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "gpu_system.py"),
            "--tiny",
            "--steps",
            "2",
            "--workdir",
            str(tmp_path),
            "--json",
            str(tmp_path / "result.json"),
        ],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((tmp_path / "result.json").read_text())
    written = (tmp_path / "run" / "config.yaml").read_text()
    assert res["zero_stage_setting"] == "auto" and res["zero_stage"] in (0, 1, 2, 3)
    assert f"zero_stage: {res['zero_stage']}" in written
    assert f"ZeRO-{res['zero_stage']} (auto)" in proc.stdout


def test_bare_rows_pack_the_trainers_samples(monkeypatch):
    """With --packed-attention the bare rows hold the trainer's samples: same tokens, images, answers and samples."""
    from types import SimpleNamespace

    import torch

    monkeypatch.setenv("MMDIST_STEP_PHASES", "1")  # gpu_system sets it on import; restored after the test
    import gpu_system

    from mmdist.models.contract import count_samples
    from mmdist.models.fused import supervised_mask

    embedding = SimpleNamespace(weight=torch.zeros(100, 1))
    model = SimpleNamespace(num_image_tokens=4, image_token_id=99, vision=SimpleNamespace(image_size=8),
                            llm=SimpleNamespace(get_input_embeddings=lambda: embedding))
    batch = gpu_system.bare_batch(model, 2, 60, 3, 7, torch.device("cpu"), torch.Generator().manual_seed(0), samples=5)
    assert int(batch["attention_mask"].sum()) == 60 and batch["pixel_values"].shape[0] == 3
    assert int((batch["input_ids"] == 99).sum()) == 3 * 4
    assert count_samples(batch, "input_ids") == 5
    assert [int(row.max()) + 1 for row in batch["sequence_ids"]] == [3, 2]  # dealt round-robin
    assert int(supervised_mask(batch).sum()) == 7  # no cut falls inside the answers
    real = batch["sequence_ids"] >= 0
    assert torch.equal(real, batch["attention_mask"].bool())
    starts = real & torch.nn.functional.pad(
        batch["sequence_ids"][:, 1:] != batch["sequence_ids"][:, :-1], (1, 0), value=True
    )
    # restart per sample
    assert torch.equal(batch["position_ids"][starts], torch.zeros(int(starts.sum()), dtype=torch.long))
    unpacked = gpu_system.bare_batch(model, 2, 60, 3, 7, torch.device("cpu"), torch.Generator().manual_seed(0))
    assert "sequence_ids" not in unpacked and torch.equal(unpacked["input_ids"], batch["input_ids"])


def test_packed_attention_runs_on_both_sides_and_is_recorded(tmp_path):
    """--packed-attention goes into the trainer's config and the bare model's (the same cfg.model), on sdpa, with the
    bare rows packed like the trainer's; the result and the header name it. (flex itself trains on a GPU only.)"""
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_system.py"), "--tiny", "--steps", "2", "--packed-attention",
         "sdpa_per_sample", "--workdir", str(tmp_path), "--json", str(tmp_path / "result.json")],
        capture_output=True, text=True, timeout=900, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((tmp_path / "result.json").read_text())
    assert (res["packed_attention"], res["attn_implementation"], res["bare_rows_packed"]) == (
        "sdpa_per_sample",
        "sdpa",
        True,
    )
    assert "packed_attention: sdpa_per_sample" in (tmp_path / "run" / "config.yaml").read_text()
    header = next(line for line in proc.stdout.splitlines() if line.startswith("device "))
    assert "attention sdpa, packed attention sdpa_per_sample (both sides, bare rows packed)" in header
    assert res["trainer"]["samples"] == res["bare"]["samples"] > 0
    assert res["trainer"]["real_tokens"] == res["bare"]["real_tokens"]


def test_flex_on_the_cpu_is_refused_before_any_work(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_system.py"), "--tiny", "--packed-attention", "flex",
         "--workdir", str(tmp_path)],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )
    assert proc.returncode != 0 and "--packed-attention flex trains on a GPU only" in proc.stderr
    assert not (tmp_path / "demo").exists()
