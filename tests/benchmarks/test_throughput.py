"""benchmarks/throughput.py: its command line, and mmdist's side
stepping through the trainer's train_step at a tiny shape."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]

TINY_LLM = dict(model_type="llama", vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True)
TINY_CLIP = dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                 num_attention_heads=4, image_size=32, patch_size=16, num_channels=3, projection_dim=32)


def test_help_runs():
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "throughput.py"), "--help"],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "--global-batch" in proc.stdout and "--max-len" in proc.stdout


def test_mmdist_side_takes_optimizer_steps_through_train_step(monkeypatch, tmp_path):
    """Two micro-batches per step (accumulation 2): the trainable connector changes, the frozen LLM does not,
    the step counts its real tokens and FLOPs, and close() leaves no process group behind."""
    import torch.distributed as tdist
    from common import BenchShape, make_samples
    from throughput import MmdistLoop

    for key in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "DS_ACCELERATOR"):
        # MmdistLoop writes these into os.environ; setenv first so that monkeypatch restores (or removes) them
        monkeypatch.setenv(key, "")
        monkeypatch.delenv(key)
    monkeypatch.setenv("TMPDIR", str(tmp_path))  # the benchmark's run_dir
    shape = BenchShape(llm=dict(TINY_LLM), vision=dict(TINY_CLIP), image_tokens=4, answer_range=(2, 8),
                       prompt_range=(2, 4), question_range=(2, 4))
    loop = MmdistLoop(shape, global_batch=4, micro_batch=2, max_len=64)
    try:
        assert loop.accumulation == 2
        trainable = {n: p.detach().clone() for n, p in loop.model.named_parameters() if p.requires_grad}
        frozen = {n: p.detach().clone() for n, p in loop.model.llm.named_parameters()}
        samples = make_samples(8, shape, seed=0)
        records = [loop.step(samples[:4]), loop.step(samples[4:])]
        assert loop.state.step == 2 and loop.state.samples == 8
        for rec in records:
            assert rec["seconds"] > 0 and 0 < rec["real"] <= rec["padded"] and rec["flops"] > 0
        after = dict(loop.model.named_parameters())
        assert any(not torch.equal(after[n], v) for n, v in trainable.items())
        llm = dict(loop.model.llm.named_parameters())
        assert all(torch.equal(llm[n], v) for n, v in frozen.items())
        assert loop.frozen_params_with_grad() == 0
        from common import shape_flops

        # the reference is charged mmdist's count of the same model, counted on the meta device: the bar's count
        assert shape_flops(shape).rates() == pytest.approx(loop.count.rates()) and loop.count.any()
    finally:
        loop.close()
    assert not tdist.is_initialized()
