"""Data workers start safely in a process that held a process group (mmdist/data/workers.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from mmdist.launch_env import free_port

WORKER = Path(__file__).resolve().parents[1] / "helpers" / "leaked_group_worker.py"


@pytest.mark.parametrize("order", ["global", "per_rank"])
def test_workers_start_after_a_shut_down_process_group_is_left_to_the_collector(tmp_path, order):
    """A worker that collected the parent's leftover gloo group would wait forever on the group's threads (they do not
    exist in a forked child); the loader starts its workers with the parent's objects out of their collector's
    reach, so the batches come."""
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(WORKER), str(tmp_path / "shards"), order, str(free_port())],
                          capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().endswith("done")
