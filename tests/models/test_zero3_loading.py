"""Pretrained LLMs load partitioned under ZeRO-3 (2 ranks, gloo, CPU): a saved HF folder, the packaged GGUF, Qwen1.

One torchrun launch loads all three through ``load_llm`` as the engine does
(tests/helpers/zero3_load_worker.py); each rank must hold only its share of the
weights, and the loss of a fixed batch must equal a one-process load's.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers.qwen1 import REPO_ROOT, qwen1_reference_logits, qwen1_state_dict, write_qwen1_checkpoint

from mmdist.models.llm import LLMConfig, load_llm, smollm2_gguf_path

IDS = torch.tensor([[1, 9707, 1879, 0, 220, 3837, 17, 42, 5, 33]])  # as in the worker


def saved_qwen2_folder(folder: Path) -> Path:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=10_000, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, pad_token_id=2)
    Qwen2ForCausalLM(config).save_pretrained(folder)
    return folder


def one_process_loss(path: str, gguf: str | None = None) -> float:
    model = load_llm(LLMConfig(name_or_path=path, gguf_file=gguf, dtype="fp32", attn_implementation="eager"))
    with torch.no_grad():
        return model(input_ids=IDS, labels=IDS).loss.item()


@pytest.mark.multiproc
@pytest.mark.slow
def test_pretrained_llms_load_partitioned_under_zero3(tmp_path):
    gguf_path = smollm2_gguf_path()
    sd = qwen1_state_dict()
    sources = {
        "hf": str(saved_qwen2_folder(tmp_path / "qwen2")),
        "gguf": f"{os.path.dirname(gguf_path)}::{os.path.basename(gguf_path)}",
        "qwen1": str(write_qwen1_checkpoint(tmp_path / "qwen1", sd, "safetensors", "later")),
    }
    tests_dir = Path(__file__).resolve().parents[1]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), str(tests_dir), os.environ.get("PYTHONPATH", "")])}
    out = tmp_path / "rank.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(tests_dir / "helpers" / "zero3_load_worker.py"), str(out)] + [f"{k}={v}" for k, v in sources.items()]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    ranks = [json.loads(Path(f"{out}.{rank}").read_text()) for rank in (0, 1)]

    want = {
        "hf": one_process_loss(sources["hf"]),
        "gguf": one_process_loss(os.path.dirname(gguf_path), os.path.basename(gguf_path)),
        "qwen1": one_process_loss(sources["qwen1"]),
    }
    for label, loss in want.items():
        for got in (r[label] for r in ranks):
            assert got["local"] * 2 <= got["full"] + 4096, (label, got)  # its share only, never the whole model
            assert got["visible"] == 0, (label, got)
            assert got["loss"] == pytest.approx(loss, abs=1e-5), label
    # the Qwen1 checkpoint still follows Qwen1's own equations when loaded partitioned
    reference = qwen1_reference_logits(sd, IDS)[0, :4, :8]
    torch.testing.assert_close(torch.tensor(ranks[0]["qwen1"]["logits"]), reference, atol=1e-5, rtol=1e-5)
