"""Two ZeRO-3 ranks, one with a text-only micro-batch and one with images, step together (no hang).

Under ZeRO-3 the frozen vision tower is partitioned: a rank that skipped it on a text-only batch would
issue fewer parameter gathers than its peer and the collectives would fall out of step.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from mmdist.launch_env import free_port

REPO = Path(__file__).resolve().parents[2]

PROBE = textwrap.dedent("""
    import json, sys, torch
    from helpers.configs import tiny_run_config
    from helpers.tiny import pad_batch, sample
    from mmdist import distributed as dist
    from mmdist.training.engine import build_engine

    env = dist.init(backend="gloo")
    # the recipe's engine: ZeRO-3, fp32, torch AdamW, gloo, no persistence threshold
    cfg = tiny_run_config("fuse", "engine.zero_stage=3", "train.global_batch_size=2", "train.micro_batch_size=1")
    bundle = build_engine(cfg)
    engine, model = bundle.engine, bundle.engine.module
    losses = []
    for step in range(2):
        with_image = (env.rank + step) % 2 == 1  # the ranks disagree at every step
        batch = pad_batch([sample(model, 1 if with_image else 0, [10, 11], [12, 13])], pad_id=256)
        if with_image:
            batch["pixel_values"] = torch.randn(1, 3, 16, 16)
        loss = engine(batch)["loss"]
        engine.backward(loss)
        engine.step()
        losses.append(float(loss))
    bundle.close()
    dist.shutdown()
    with open(sys.argv[1] + f".rank{env.rank}", "w") as fh:
        json.dump(losses, fh)
""")


@pytest.mark.multiproc
def test_text_only_and_image_micro_batches_step_together_under_zero3(tmp_path):
    script = tmp_path / "probe.py"
    script.write_text(PROBE)
    out = tmp_path / "losses"
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    }
    env.update(
        DS_ACCELERATOR="cpu",
        OMP_NUM_THREADS="1",
        MMDIST_DIST_TIMEOUT="60",
        PYTHONPATH=os.pathsep.join([str(REPO), str(REPO / "tests")]),
    )
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           str(script), str(out)]
    try:
        proc = subprocess.run(cmd, cwd=str(REPO), env=env, capture_output=True, text=True, timeout=240)
    except subprocess.TimeoutExpired:
        pytest.fail("the two ranks hung: a text-only micro-batch did not issue the same ZeRO-3 gathers")
    assert proc.returncode == 0, proc.stderr[-4000:]
    for rank in (0, 1):
        losses = json.loads(Path(f"{out}.rank{rank}").read_text())
        assert len(losses) == 2 and all(loss == loss and loss > 0 for loss in losses)
