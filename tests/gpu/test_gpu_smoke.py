"""The single-GPU smoke tier: the tiny recipes end to end on CUDA, in a few minutes.

What a user runs first on a new GPU node: both stages at ZeRO 0, 2 and 3 with
``auto`` precision (bf16 on a GPU that has it), the feature cache, ``generate``
and ``eval`` on the result, packed attention equal to unpacked on the device,
fp16 with loss scaling, and a resume. Selected with ``-m gpu``; skipped, saying
why, on a machine without CUDA. ``MMDIST_GPU_SMOKE_ON_CPU=1`` runs the same tier
on the CPU (gloo, DeepSpeed's CPU accelerator) to develop it without a GPU; fp16
is then skipped (the CPU accelerator has none).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

REPO = Path(__file__).resolve().parents[2]
ON_CPU = os.environ.get("MMDIST_GPU_SMOKE_ON_CPU") == "1"
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available() and not ON_CPU,
                       reason="the GPU smoke tier needs a CUDA GPU (MMDIST_GPU_SMOKE_ON_CPU=1 runs it on the CPU)"),
]


@pytest.fixture(scope="module", autouse=True)
def _accelerator():
    """This device's DeepSpeed accelerator for the whole module, set before the module's own fixtures train (an
    autouse fixture of module scope runs first): a session that collected other test files may hold
    DS_ACCELERATOR=cpu, and DeepSpeed keeps the accelerator it first picks for the rest of the process."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DS_ACCELERATOR", "cuda" if DEVICE == "cuda" else "cpu")
        if DEVICE == "cuda":
            patch.delenv("MMDIST_CPU_BF16", raising=False)
        yield


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> dict[str, str]:
    from mmdist.data.shards import shard_pattern, write_demo_shards

    written = write_demo_shards(tmp_path_factory.mktemp("gpu_smoke") / "demo", image_size=16, samples_per_shard=32,
                                limit=128, overwrite=True)
    return {split: shard_pattern(summary) for split, summary in written.items()}


def recipe(stage: str, run_dir: Path, shards: dict[str, str], *overrides: str):
    """configs/tiny_<stage>.yaml on the demo shards, on this device, a few steps, every checkpoint and export."""
    from mmdist.config.run import load_config

    backend = "nccl" if DEVICE == "cuda" else "gloo"
    base = yaml.safe_load((REPO / "configs" / f"tiny_{stage}.yaml").read_text())
    base["data"]["train"] = [{"shards": [shards["train"]]}]
    base["data"]["eval"] = [{"shards": [shards["eval"]]}]
    return load_config(
        base=base,
        overrides=[
            f"run_dir={run_dir}",
            f"engine.backend={backend}",
            "train.max_steps=4",
            "train.eval_every=0",
            "checkpoint.save_every=2",
            "train.lr=0.005",
            "train.warmup_ratio=0.0",
            "log.progress_bar=false",
            "log.tensorboard=false",
            *overrides,
        ],
    )


def train(cfg) -> dict:
    from mmdist.training.loop import train as run

    return run(cfg)


def losses(summary: dict) -> list[float]:
    return [h["loss"] for h in summary["history"]]


def mmdist(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH", "")])))
    proc = subprocess.run([sys.executable, "-m", "mmdist", *args], capture_output=True, text=True, timeout=timeout,
                          cwd=REPO, env=env)
    assert proc.returncode == 0, f"mmdist {' '.join(args)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def align_export(shards, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("align")
    summary = train(recipe("align", run_dir, shards, "engine.zero_stage=2"))
    assert all(math.isfinite(v) for v in losses(summary))
    return run_dir / "export"


@pytest.mark.parametrize("zero_stage", [0, 2, 3])
def test_both_stages_train_at_each_zero_stage_with_auto_precision(shards, align_export, tmp_path, zero_stage):
    align = train(recipe("align", tmp_path / "align", shards, f"engine.zero_stage={zero_stage}"))
    assert (tmp_path / "align" / "export" / "model.safetensors").is_file()
    fuse = train(recipe("fuse", tmp_path / "fuse", shards, f"engine.zero_stage={zero_stage}",
                        f"model.connector.stage1_weights={align_export}"))
    for summary in (align, fuse):
        assert all(math.isfinite(v) for v in losses(summary)) and len(losses(summary)) == 4
    assert losses(fuse)[-1] < losses(fuse)[0]
    resolved = yaml.safe_load((tmp_path / "fuse" / "config.yaml").read_text())
    expected = (
        "bf16" if DEVICE == "cuda" and torch.cuda.is_bf16_supported() else ("fp16" if DEVICE == "cuda" else "fp32")
    )
    assert resolved["engine"]["precision"] == expected  # auto, resolved for this device and recorded
    assert (tmp_path / "fuse" / "export" / "manifest.json").is_file()


def test_cache_generate_and_eval_on_the_device(shards, align_export, tmp_path):
    cfg_path = tmp_path / "fuse.yaml"
    cfg = recipe(
        "fuse", tmp_path / "fuse", shards, "engine.zero_stage=2", f"model.connector.stage1_weights={align_export}"
    )
    from mmdist.config.run import dump_config

    dump_config(cfg, cfg_path)
    mmdist("cache", "--config", str(cfg_path), "--out", str(tmp_path / "cache"), "--device", DEVICE)
    assert list((tmp_path / "cache" / "train").glob("*.tar"))
    cached = train(
        recipe(
            "fuse",
            tmp_path / "fuse",
            shards,
            "engine.zero_stage=2",
            f"model.connector.stage1_weights={align_export}",
            f"data.feature_cache={tmp_path / 'cache'}",
        )
    )
    assert all(math.isfinite(v) for v in losses(cached))
    from PIL import Image

    images = [tmp_path / "light.png", tmp_path / "dark.png"]
    for path, grey in zip(images, (200, 30)):
        Image.new("RGB", (16, 16), (grey, grey, grey)).save(path)
    out = mmdist(
        "generate", "--run", str(tmp_path / "fuse"), "--image", *map(str, images), "--prompt", "What digit is this?"
    )
    answered = [line for line in out.stdout.splitlines() if line.startswith(tuple(f"{p}:" for p in images))]
    assert len(answered) == 2, f"one answer line per image expected:\n{out.stdout}"  # a 4-step model may answer ""
    mmdist("eval", "--run", str(tmp_path / "fuse"), "--data", shards["eval"])
    metrics = json.loads((tmp_path / "fuse" / "eval" / "metrics.json").read_text())
    assert metrics["stage"] == "fuse" and metrics["samples"] > 0
    assert 0.0 <= metrics["exact"] <= 1.0


@pytest.mark.parametrize("kernel", ["auto", "flex"])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_packed_attention_equals_unpacked_on_the_device(checkpointing, kernel):
    """Per-sample SDPA (auto) and FlexAttention (flex, compiled on CUDA) against the unpacked samples."""
    from helpers.tiny import make_model, pad_batch, sample

    if kernel == "flex" and DEVICE == "cpu":
        pytest.skip(
            "torch has no FlexAttention backward on CPU (tests/models/test_packed_attention_flex.py covers it there)"
        )
    # fp32 throughout: the check is of the masks, and `auto` would be bf16 on a GPU, whose rounding differs
    # between a packed and a padded row by more than these tolerances
    model = make_model("fuse", model={"llm": {"attn_implementation": "sdpa", "gradient_checkpointing": checkpointing,
                                              "packed_attention": kernel, "dtype": "fp32"},
                                      "vision": {"dtype": "fp32"}})
    model = model.to(DEVICE).train()
    assert model.packed_kernel == ("flex" if kernel == "flex" else "sdpa_per_sample")
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    samples = [
        sample(model, 1, [10, 11], [12, 13, 14]),
        sample(model, 0, [20, 21], [22, 23]),
        sample(model, 1, [30], [31, 32]),
    ]
    pixels = torch.randn(2, 3, 16, 16)
    unpacked = pad_batch(samples, pad_id=256)
    unpacked["pixel_values"] = pixels
    ids, labels, seq, pos = [], [], [], []
    for k, (s_ids, s_labels) in enumerate(samples):
        ids, labels = ids + s_ids, labels + s_labels
        seq, pos = seq + [k] * len(s_ids), pos + list(range(len(s_ids)))
    packed = {"input_ids": torch.tensor([ids]), "labels": torch.tensor([labels]), "sequence_ids": torch.tensor([seq]),
              "position_ids": torch.tensor([pos]), "attention_mask": torch.ones(1, len(ids), dtype=torch.long),
              "pixel_values": pixels}
    results = []
    for batch in (unpacked, packed):
        model.zero_grad()
        loss = model({k: v.to(DEVICE) for k, v in batch.items()})["loss"]
        loss.backward()
        results.append((loss.detach().float().cpu(), [p.grad.float().cpu() for p in model.projector.parameters()]))
    (loss_a, grads_a), (loss_b, grads_b) = results
    torch.testing.assert_close(loss_a, loss_b, rtol=1e-4, atol=1e-5)
    for a, b in zip(grads_a, grads_b):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)


@pytest.mark.skipif(
    DEVICE != "cuda", reason="fp16 with loss scaling needs CUDA (DeepSpeed's CPU accelerator has no fp16)"
)
def test_fp16_with_loss_scaling(shards, tmp_path):
    summary = train(recipe("fuse", tmp_path / "fp16", shards, "engine.zero_stage=2", "engine.precision=fp16",
                           "model.llm.dtype=fp16", "model.vision.dtype=fp16", "train.max_steps=6"))
    assert all(math.isfinite(v) for v in losses(summary)) and losses(summary)[-1] < losses(summary)[0]


def test_resume_continues_from_the_last_checkpoint(shards, tmp_path):
    run_dir = tmp_path / "resume"
    first = train(recipe("fuse", run_dir, shards, "engine.zero_stage=3"))
    assert [h["step"] for h in first["history"]] == [1, 2, 3, 4]
    second = train(recipe("fuse", run_dir, shards, "engine.zero_stage=3", "train.max_steps=6"))
    assert [h["step"] for h in second["history"]] == [5, 6]  # steps 1-4 were not trained again
    assert all(math.isfinite(v) for v in losses(second))
