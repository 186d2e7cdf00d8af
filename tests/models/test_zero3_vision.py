"""ResNet (HF, from a config and from a weights file), timm and custom towers built partitioned under ZeRO-3
(2 ranks, gloo, CPU) give the same token shapes and features as a one-process build."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers.custom_vision import TinyCNN, pixels, tiny_custom_vision_config
from helpers.qwen1 import REPO_ROOT

from mmdist.models.vision import VisionConfig, VisionTower
from mmdist.settings import from_dict

RESNET = {"model_type": "resnet", "layer_type": "basic", "depths": [1, 1], "hidden_sizes": [8, 16], "embedding_size": 8,
          "num_channels": 3}


def one_process(settings: dict) -> tuple[int, int, list[float]]:
    tower = VisionTower(from_dict(VisionConfig, settings)).eval()
    with torch.no_grad():
        return tower.num_tokens, tower.hidden_size, tower(pixels(tower.image_size)).flatten()[:64].tolist()


def _why(output: str) -> str:
    """A failed launch's output for the assertion message: the lines that say what went wrong (a Python error, a
    C++ abort, a signal), wherever they are, then the tail. A rank that aborts prints its extension modules after
    the cause, which pushed the cause out of a plain tail."""
    keys = ("Error", "error:", "Fatal Python error", "terminate called", "what():", "Aborted", "Traceback", "File \"")
    causes = [line for line in output.splitlines() if any(k in line for k in keys) and "Extension modules" not in line]
    return "\n".join(causes[:60]) + "\n--- tail ---\n" + output[-2000:]


@pytest.mark.multiproc
@pytest.mark.slow
def test_vision_towers_build_partitioned_under_zero3(tmp_path):
    torch.manual_seed(4)
    reference = VisionTower(
        from_dict(VisionConfig, {"source": "hf", "init_config": RESNET, "image_size": 32, "init_seed": 7})
    )
    torch.save(reference.model.state_dict(), tmp_path / "resnet.pth")
    torch.save(TinyCNN().state_dict(), tmp_path / "tiny.pth")
    towers = [
        (
            "resnet_seeded",
            {"source": "hf", "init_config": RESNET, "image_size": 32, "feature_grid": 2, "dtype": "fp32"},
        ),
        (
            "resnet_file",
            {
                "source": "hf",
                "init_config": RESNET,
                "image_size": 32,
                "checkpoint": str(tmp_path / "resnet.pth"),
                "feature_stage": 1,
                "dtype": "fp32",
            },
        ),
        ("custom", tiny_custom_vision_config(str(tmp_path / "tiny.pth"))),
    ]
    try:
        import timm

        torch.manual_seed(5)
        torch.save(timm.create_model("resnet10t", pretrained=False, num_classes=10).state_dict(), tmp_path / "r10t.pth")
        towers.append(("timm", {"source": "timm", "name_or_path": "resnet10t", "checkpoint": str(tmp_path / "r10t.pth"),
                                "image_size": 64, "dtype": "fp32"}))
    except Exception:  # timm (or a torchvision for this torch) not installed: the other towers still run
        pass
    tests_dir = Path(__file__).resolve().parents[1]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), str(tests_dir), os.environ.get("PYTHONPATH", "")])}
    out = tmp_path / "rank.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(tests_dir / "helpers" / "zero3_vision_worker.py"), str(out), json.dumps(towers)]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, _why(run.stdout + run.stderr)
    ranks = [json.loads(Path(f"{out}.{rank}").read_text()) for rank in (0, 1)]
    for label, settings in towers:
        tokens, width, features = one_process(settings)
        for got in (r[label] for r in ranks):
            assert got["local"] * 2 <= got["full"] + 4096, (label, got["local"], got["full"])  # its share only
            assert (got["tokens"], got["width"]) == (tokens, width), label
            assert got["features"] == pytest.approx(features, abs=1e-5), label
