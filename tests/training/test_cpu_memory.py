"""A CPU training process keeps freed memory (mmdist/training/cpu_memory.py): a large block freed and allocated
again is not page-faulted in again; the engine sets it on a CPU device unless engine.cpu_keep_freed_memory is off,
and the trainer says so."""

from __future__ import annotations

import platform
import subprocess
import sys
import textwrap

import pytest
from helpers.trainer_toy import toy_config, train_toy

from mmdist.training import cpu_memory

GLIBC = platform.libc_ver()[0] == "glibc"

FAULTS = textwrap.dedent("""
    import resource
    import torch
    from mmdist.training.cpu_memory import keep_freed_memory

    def faults():
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(4):
            torch.ones(16 << 20)  # 64 MiB, written and freed at once
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

    default = faults()
    assert keep_freed_memory() == keep_freed_memory() and keep_freed_memory()[0]
    for _ in range(4):  # the heap grows until a freed block has room for torch's aligned request
        faults()
    print(default, faults())
""")


@pytest.mark.skipif(not GLIBC, reason="sets glibc's malloc")
def test_a_freed_block_is_reused_without_page_faults():
    out = subprocess.run([sys.executable, "-c", FAULTS], capture_output=True, text=True, check=True).stdout
    default, kept = map(int, out.split())
    pages = 4 * (64 << 20) // 4096
    assert default > pages // 2  # glibc's default: each 64 MiB block is mapped, faulted in and unmapped again
    assert kept < pages // 20


def test_another_c_library_is_left_alone(monkeypatch):
    monkeypatch.setattr(cpu_memory, "_applied", [])
    monkeypatch.setattr(platform, "libc_ver", lambda: ("", ""))
    kept, why = cpu_memory.keep_freed_memory()
    assert not kept and "not glibc" in why and cpu_memory._applied == []


@pytest.mark.parametrize("keep", [True, False])
def test_the_engine_sets_it_on_a_cpu_device_unless_switched_off(tmp_path, monkeypatch, capsys, keep):
    calls = []
    monkeypatch.setattr("mmdist.training.engine.keep_freed_memory", lambda: calls.append(1) or (True, "kept"))
    assert train_toy(toy_config(str(tmp_path / "run"), train={"max_steps": 1},
                                engine={"cpu_keep_freed_memory": keep}))["finished"]
    assert len(calls) == int(keep)
    assert ("[mmdist] CPU memory: kept (engine.cpu_keep_freed_memory)" in capsys.readouterr().out) == keep
