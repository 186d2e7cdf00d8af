"""Preemption: the signal sets a flag (handlers chained and restored), and ranks agree on the stop step.

The two-rank test runs real processes over gloo; only rank 1 is signalled and
both ranks must stop after the same step, exiting with PREEMPTED_EXIT.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from mmdist.launch_env import free_port
from mmdist.training import preemption

REPO = Path(__file__).resolve().parents[2]


def test_signal_sets_the_flag_and_uninstall_restores_the_previous_handler():
    before = signal.getsignal(signal.SIGUSR1)
    with preemption.install() as flag:
        assert not flag.requested and not preemption.stop_agreed(flag)
        os.kill(os.getpid(), signal.SIGUSR1)
        deadline = time.time() + 5
        while not flag.requested and time.time() < deadline:  # Python runs the handler between bytecodes
            time.sleep(0.01)
        assert flag.requested and flag.signal_name == "SIGUSR1"
        assert preemption.stop_agreed(flag)  # no process group: the local flag
    assert signal.getsignal(signal.SIGUSR1) == before


def test_a_previous_python_handler_is_still_called():
    seen = []
    old = signal.signal(signal.SIGTERM, lambda signum, frame: seen.append(signum))
    try:
        with preemption.install() as flag:
            os.kill(os.getpid(), signal.SIGTERM)
            deadline = time.time() + 5
            while not seen and time.time() < deadline:
                time.sleep(0.01)
            assert flag.signal_name == "SIGTERM" and seen == [signal.SIGTERM]
    finally:
        signal.signal(signal.SIGTERM, old)


def test_outside_the_main_thread_nothing_is_installed():
    result = {}
    before = signal.getsignal(signal.SIGUSR1)
    thread = threading.Thread(target=lambda: result.setdefault("installed", preemption.PreemptionFlag().install()))
    thread.start()
    thread.join()
    assert result["installed"] is False and signal.getsignal(signal.SIGUSR1) == before


def test_marker_is_written_by_rank_zero_only(tmp_path):
    assert preemption.record_stop(tmp_path, step=7, checkpoint="c/step_000007", rank=1) is None
    assert preemption.read_marker(tmp_path) is None
    preemption.record_stop(tmp_path, step=7, checkpoint="c/step_000007", signal_name="SIGUSR1")
    marker = preemption.read_marker(tmp_path)
    assert (marker["step"], marker["checkpoint"], marker["signal"]) == (7, "c/step_000007", "SIGUSR1")


WORKER = r"""
import json, os, sys, time
import torch.distributed as tdist
from mmdist.training import preemption

rank = int(os.environ["RANK"])
flag = preemption.install()
tdist.init_process_group("gloo", init_method="env://")
progress = os.environ["PROGRESS"] + f".{rank}"
step = 0
while step < 500:
    time.sleep(0.02 if rank == 0 else 0.05)  # the ranks run at different speeds between collectives
    step += 1
    with open(progress, "w") as fh:
        fh.write(str(step))
    if preemption.stop_agreed(flag):
        break
print("RESULT " + json.dumps({"rank": rank, "step": step, "local_flag": flag.requested}), flush=True)
tdist.destroy_process_group()
sys.exit(preemption.PREEMPTED_EXIT if step < 500 else 0)
"""


@pytest.mark.multiproc
def test_two_ranks_stop_after_the_same_step_when_only_rank_one_is_signalled(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), WORLD_SIZE="2",
               PROGRESS=str(tmp_path / "progress"))
    procs = [subprocess.Popen([sys.executable, "-c", WORKER], env=dict(env, RANK=str(r)), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for r in range(2)]
    try:
        progress = tmp_path / "progress.1"
        deadline = time.time() + 60
        while time.time() < deadline and not (
            progress.is_file() and progress.read_text().strip() not in ("", "1", "2")
        ):
            assert all(p.poll() is None for p in procs), [p.communicate() for p in procs]
            time.sleep(0.05)
        os.kill(procs[1].pid, signal.SIGUSR1)
        outs = [p.communicate(timeout=60) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    results = {}
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == preemption.PREEMPTED_EXIT, err
        line = next(line for line in out.splitlines() if line.startswith("RESULT "))
        result = json.loads(line[len("RESULT "):])
        results[result["rank"]] = result
    assert results[0]["step"] == results[1]["step"] >= 3
    assert results[0]["local_flag"] is False and results[1]["local_flag"] is True  # rank 0 stopped on rank 1's word
    assert "SIGUSR1 received" in outs[1][1]
