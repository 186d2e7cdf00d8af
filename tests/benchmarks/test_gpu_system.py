"""benchmarks/gpu_system.py at its tiny CPU shape: the real trainer and the bare model side by side.

Asserts the printed fields, the ratio's arithmetic, that both sides ran the same rows
(the trainer's packed batches replayed on the bare model: tokens per step, rows x
width and the attention path equal step for step), and that the trainer's own
metrics.jsonl figure (the bar's) is the benchmark's.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

PRINTED = ["device", "rows", "steady_steps", "real_tokens", "images", "samples", "tokens_per_s", "ratio", "mfu", "hfu",
           "trainer_reported", "peak_memory_gib", "step_s"]
PHASES = ["data_wait", "to_device", "vision", "llm_forward", "backward", "optimizer", "host_sync", "logging", "other"]


# The tests that read the one --tiny run share a worker under pytest-xdist (--dist loadgroup), so it runs once.
shares_the_tiny_run = pytest.mark.xdist_group("gpu_system_tiny")


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


@shares_the_tiny_run
def test_prints_every_field_and_the_breakdown(tiny_result):
    stdout, res, _ = tiny_result
    printed = {line.split()[0] for line in stdout.splitlines() if line.strip() and not line.startswith("|")}
    for field in PRINTED:
        assert field in printed, f"{field} missing from:\n{stdout}"
    table = {line.split("|")[1].strip() for line in stdout.splitlines() if line.startswith("| ")}
    assert set(PHASES) <= table, stdout
    assert res["device"] == "cpu" and res["warmup_steps"] == 1
    assert res["packed_attention"] == "auto" and res["attn_implementation"] == "sdpa"  # no flag: the trainer's default
    assert set(res["fixed_cost_ms"]) == set(PHASES)


@shares_the_tiny_run
def test_both_sides_ran_the_same_rows(tiny_result):
    """The bare model replays the trainer's packed batches: per steady step the same tokens, the same rows x width,
    the same attention path, and tensor-equal batches."""
    _, res, folder = tiny_result
    t, b = res["trainer"], res["bare"]
    assert res["same_batches"] is True
    assert t["step_tokens"] == b["step_tokens"] and len(t["step_tokens"]) == 2 and min(t["step_tokens"]) > 0
    assert [(s["rows"], s["width"]) for s in t["layouts"]] == [(s["rows"], s["width"]) for s in b["layouts"]]
    assert t["layouts"] == b["layouts"]  # samples, images and answer tokens too
    assert res["attention_paths"] == ["mmdist_packed_sdpa/sdpa_per_sample"]  # packed rows, the same kernel
    for shape in t["layouts"]:
        assert shape["tokens"] <= shape["rows"] * shape["width"] <= shape["rows"] * 128  # packed rows of max_len
    records = [json.loads(line) for line in (folder / "run" / "metrics.jsonl").read_text().splitlines()]
    steady = [r for r in records if r["split"] == "train" and r["step"] > 1]
    assert [r["step_tokens"] for r in steady] == b["step_tokens"]  # what the trainer counted, what the bare model got
    # what the trainer's record says the LLM ran on: the collator's rows x width, padding included
    assert [r["step_positions"] for r in steady] == [s["rows"] * s["width"] for s in t["layouts"]]


@shares_the_tiny_run
def test_both_sides_processed_the_same_real_tokens(tiny_result):
    _, res, folder = tiny_result
    t, b = res["trainer"], res["bare"]
    assert t["steps"] == b["steps"] == 2  # 3 steps, the first left out
    assert t["real_tokens"] == b["real_tokens"] > 0 and t["images"] == b["images"] > 0
    records = [json.loads(line) for line in (folder / "run" / "metrics.jsonl").read_text().splitlines()]
    steady = [r for r in records if r["split"] == "train" and r["step"] > 1]
    assert t["real_tokens"] == sum(r["step_tokens"] for r in steady)  # the packed batches' own count
    assert max(r["step_tokens"] for r in steady) <= 2 * 128  # packed rows of max_len


@shares_the_tiny_run
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


@shares_the_tiny_run
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


def test_same_batches_tells_a_changed_row_apart(monkeypatch):
    """The fairness flag compares tensor for tensor: one token, one extra key or one step fewer makes it False."""
    import torch

    monkeypatch.setenv("MMDIST_STEP_PHASES", "1")  # gpu_system sets it on import; restored after the test
    import gpu_system

    steps = [{"input_ids": torch.arange(6).view(1, 6), "sequence_ids": torch.tensor([[0, 0, 0, 1, 1, -1]])}
             for _ in range(2)]
    copy = [{k: v.clone() for k, v in batch.items()} for batch in steps]
    assert gpu_system.same_batches(steps, copy)
    copy[1]["input_ids"][0, 3] = 9
    assert not gpu_system.same_batches(steps, copy)
    assert not gpu_system.same_batches(steps, steps[:1])
    assert not gpu_system.same_batches(steps, [dict(batch, position_ids=batch["input_ids"]) for batch in steps])
    wider = [{"input_ids": torch.arange(7).view(1, 7), "sequence_ids": batch["sequence_ids"]} for batch in steps]
    assert not gpu_system.same_batches(steps, wider)


def test_cpu_shape_is_a_valid_run_config(monkeypatch, tmp_path):
    """--cpu's mid-size shape builds a valid trainer config (the run itself takes minutes: not a unit test)."""
    import torch

    monkeypatch.setenv("MMDIST_STEP_PHASES", "1")
    import gpu_system

    shape = gpu_system.SHAPES["cpu"]
    cfg = gpu_system.run_config(shape, torch.device("cpu"), tmp_path, "x-{000000..000001}.tar",
                                micro_batch=shape.micro_batch, max_len=shape.max_len, steps=8, zero_stage="auto",
                                checkpointing=True, peak=1e11, workers=shape.workers)
    assert cfg.model.llm.init_config["hidden_size"] == 512 and cfg.data.packing and cfg.data.max_len == 512
    assert cfg.data.num_workers is None  # the trainer's own auto
    assert cfg.train.micro_batch_size == cfg.train.global_batch_size == 8


def test_packed_attention_runs_on_both_sides_and_is_recorded(tmp_path):
    """--packed-attention goes into the trainer's config and the bare model's (the same cfg.model), on sdpa; both
    sides take it over the same rows, and the result names it. (flex itself trains on a GPU only.)"""
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_system.py"), "--tiny", "--steps", "2", "--packed-attention",
         "sdpa_per_sample", "--workdir", str(tmp_path), "--json", str(tmp_path / "result.json")],
        capture_output=True, text=True, timeout=900, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((tmp_path / "result.json").read_text())
    assert (res["packed_attention"], res["attn_implementation"]) == ("sdpa_per_sample", "sdpa")
    assert "packed_attention: sdpa_per_sample" in (tmp_path / "run" / "config.yaml").read_text()
    rows = next(line for line in proc.stdout.splitlines() if line.startswith("rows "))
    assert "same batches on both sides: True" in rows and "attention mmdist_packed_sdpa/sdpa_per_sample" in rows
    assert res["trainer"]["samples"] == res["bare"]["samples"] > 0
    assert res["trainer"]["real_tokens"] == res["bare"]["real_tokens"]
    assert res["same_batches"] is True and res["attention_paths"] == ["mmdist_packed_sdpa/sdpa_per_sample"]


def test_flex_on_the_cpu_is_refused_before_any_work(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_system.py"), "--tiny", "--packed-attention", "flex",
         "--workdir", str(tmp_path)],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )
    assert proc.returncode != 0 and "--packed-attention flex trains on a GPU only" in proc.stderr
    assert not (tmp_path / "demo").exists()


def test_plan_runs_what_mmdist_plan_recommends(tmp_path):
    """--plan: the micro-batch, checkpointing and ZeRO stage come from mmdist.plan.micro_batch for this device, the
    trainer runs them (its written config says so), and the result and the print name the plan."""
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_system.py"), "--tiny", "--steps", "2", "--micro-batch", "4",
         "--plan", "--workdir", str(tmp_path), "--json", str(tmp_path / "result.json")],
        capture_output=True, text=True, timeout=900, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((tmp_path / "result.json").read_text())
    plan = res["plan"]
    assert plan["micro_batch"] * plan["accumulation"] == 4 and plan["predicted_step_s"] > 0
    assert (res["micro_batch"], res["checkpointing"], res["zero_stage"]) == (
        plan["micro_batch"], plan["checkpointing"], plan["zero_stage"])
    written = (tmp_path / "run" / "config.yaml").read_text()
    assert f"micro_batch_size: {plan['micro_batch']}" in written and f"zero_stage: {plan['zero_stage']}" in written
    assert f"gradient_checkpointing: {str(plan['checkpointing']).lower()}" in written
    assert any(line.startswith("plan  mmdist plan on cpu") for line in proc.stdout.splitlines()), proc.stdout
