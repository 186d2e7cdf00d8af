"""A training process that dies on a fatal signal leaves its Python stack in the job log."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# A stand-in for a rank that aborts inside native code (as a library destructor or a collective can): the
# training command's own main is replaced by one that calls abort() from a named function.
CHILD = """
import os, sys
from mmdist.commands import {command} as command

def rank_dies_inside_native_code(argv, training_process):
    os.abort()

command.main = rank_dies_inside_native_code
sys.exit(command.process_main([]))
"""


@pytest.mark.parametrize("command", ["train", "demo"])
def test_a_rank_killed_by_sigabrt_prints_where_it_was(command):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONFAULTHANDLER"}  # the command must enable it itself
    env["PYTHONPATH"] = str(ROOT)
    proc = subprocess.run([sys.executable, "-c", CHILD.format(command=command)], env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == -6, (proc.returncode, proc.stderr[-2000:])
    assert "Fatal Python error: Aborted" in proc.stderr, proc.stderr[-2000:]
    assert "rank_dies_inside_native_code" in proc.stderr and "process_main" in proc.stderr, proc.stderr[-2000:]
