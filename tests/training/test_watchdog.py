"""Watchdog: a process stuck past the limit ends with its stacks dumped; one that beats, or waits in a
paused phase, lives on. Each case runs in its own process, since the watchdog ends the process it guards."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from mmdist.settings import ConfigError, from_dict
from mmdist.training.watchdog import WATCHDOG_EXIT, WatchdogConfig

REPO = Path(__file__).resolve().parents[2]

PRELUDE = r"""
import os, sys, time
from mmdist.training.watchdog import Watchdog

def fake_all_reduce(seconds):  # a collective whose peer never arrives
    time.sleep(seconds)

dog = Watchdog(float(os.environ.get("TIMEOUT", "2")), rank=3, dump_dir=os.environ["DUMP_DIR"], poll_s=0.2,
               phase_timeout_s=float(os.environ.get("PHASE_TIMEOUT", "0"))).start()
"""


def _run(tmp_path, body: str, timeout: float = 60, **env: str) -> tuple[subprocess.CompletedProcess, float]:
    full_env = dict(os.environ, PYTHONPATH=str(REPO), DUMP_DIR=str(tmp_path / "stacks"), **env)
    started = time.monotonic()
    out = subprocess.run(
        [sys.executable, "-c", PRELUDE + body], env=full_env, capture_output=True, text=True, timeout=timeout
    )
    return out, time.monotonic() - started


def test_a_stalled_step_ends_the_process_with_every_stack_dumped(tmp_path):
    body = "for step in (1, 2):\n    time.sleep(0.1)\n    dog.beat(step)\nfake_all_reduce(60)\nprint('not reached')\n"
    out, seconds = _run(tmp_path, body)
    assert out.returncode == WATCHDOG_EXIT, out.stderr
    assert seconds < 30 and "not reached" not in out.stdout
    assert "rank 3" in out.stderr and "after step 2" in out.stderr and "made no progress for" in out.stderr
    assert "fake_all_reduce" in out.stderr  # the stuck frame is in the dump
    assert "mmdist-watchdog-rank3" in out.stderr or "Thread 0x" in out.stderr  # every thread, not only the main one
    error = [line for line in out.stderr.splitlines() if line.startswith("[mmdist] error:")]
    assert len(error) == 1 and f"exiting with code {WATCHDOG_EXIT}" in error[0] and "rank 3" in error[0]
    dump = (tmp_path / "stacks" / "rank00003.txt").read_text()
    assert "fake_all_reduce" in dump and "after step 2" in dump


def test_a_process_that_beats_stays_alive(tmp_path):
    body = (
        "for step in range(1, 31):\n    fake_all_reduce(0.1)\n    dog.beat(step)\ndog.stop()\nprint('done', dog.step)\n"
    )
    out, seconds = _run(tmp_path, body, TIMEOUT="1")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "done 30" and seconds >= 3  # ran three times the limit
    assert not (tmp_path / "stacks").exists()


def test_a_paused_phase_is_not_a_hang_but_a_phase_limit_is_enforced(tmp_path):
    paused = "with dog.phase('load weights', timeout_s=0):\n    fake_all_reduce(2.5)\ndog.stop()\nprint('loaded')\n"
    out, _ = _run(tmp_path, paused, TIMEOUT="1")
    assert out.returncode == 0 and out.stdout.strip() == "loaded", out.stderr

    limited = "with dog.phase('save checkpoint'):\n    fake_all_reduce(60)\n"
    out, seconds = _run(tmp_path, limited, TIMEOUT="1", PHASE_TIMEOUT="2")
    assert out.returncode == WATCHDOG_EXIT and seconds < 30
    assert "in phase 'save checkpoint'" in out.stderr and "before the first step" in out.stderr


def test_sigusr2_dumps_stacks_without_stopping(tmp_path):
    body = ("open(os.environ['READY'], 'w').close()\n"
            "for step in range(1, 41):\n    fake_all_reduce(0.05)\n    dog.beat(step)\nprint('finished')\n")
    ready = tmp_path / "ready"
    env = dict(os.environ, PYTHONPATH=str(REPO), DUMP_DIR=str(tmp_path / "stacks"), TIMEOUT="5", READY=str(ready))
    proc = subprocess.Popen(
        [sys.executable, "-c", PRELUDE + body], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.time() + 30
        while not ready.exists() and time.time() < deadline:
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGUSR2)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0 and stdout.strip() == "finished", stderr
    assert "fake_all_reduce" in stderr or "most recent call first" in stderr


def test_settings_are_checked():
    assert from_dict(WatchdogConfig, {"timeout_s": 0}).timeout_s == 0
    try:
        from_dict(WatchdogConfig, {"timeout_s": -1, "poll_s": 0})
    except ConfigError as exc:
        assert "timeout_s" in str(exc) and "poll_s" in str(exc)
    else:
        raise AssertionError("negative timeout accepted")
