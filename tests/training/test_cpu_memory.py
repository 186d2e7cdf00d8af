"""A CPU training process keeps freed memory (mmdist/training/cpu_memory.py): a large block freed and allocated
again is not page-faulted in again. Only a training process's entry point sets it (`mmdist train`, `mmdist demo`,
launch/train.py), on a CPU device unless engine.cpu_keep_freed_memory is off, and the trainer says so; building an
engine or training in a caller's own process (this test run) leaves the process's allocator alone."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml
from helpers.trainer_toy import toy_config, toy_model_builder, train_toy

from mmdist.commands import cli, demo
from mmdist.commands import train as train_command
from mmdist.training import cpu_memory
from mmdist.training.settings import EngineConfig

GLIBC = platform.libc_ver()[0] == "glibc"
ROOT = Path(__file__).resolve().parents[2]

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

# A training process's entry point, called as the commands call it, in a fresh process.
ENTRY = textwrap.dedent("""
    import sys
    from mmdist.training import cpu_memory
    from mmdist.training.settings import EngineConfig

    before = cpu_memory.keeps_freed_memory()
    why = cpu_memory.for_training_process(EngineConfig(cpu_keep_freed_memory=sys.argv[1] == "on"))
    print(before, cpu_memory.keeps_freed_memory(), why == cpu_memory.process_setting(), why, sep="|")
""")


@pytest.fixture
def spy(monkeypatch):
    """Records every call that would set glibc's malloc, without setting it in this test process."""
    calls = []
    monkeypatch.setattr(cpu_memory, "keep_freed_memory", lambda: calls.append(1) or (True, "kept"))
    monkeypatch.setattr(cpu_memory, "_asked", [])
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    return calls


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


def test_building_an_engine_in_this_process_leaves_the_allocator_alone(tmp_path, capsys, spy):
    """build_engine and the trainer on a CPU device with the setting on (its default) never set it: this process
    (a test run, a notebook) would keep every freed page from then on."""
    from mmdist import distributed as dist
    from mmdist.config.run import load_config
    from mmdist.training.engine import build_engine

    cfg = toy_config(str(tmp_path / "run"), train={"max_steps": 1})
    assert load_config(base=cfg).engine.cpu_keep_freed_memory
    dist.init(dist.discover(argv=[], environ={}), backend="gloo", timeout_s=60)
    try:
        build_engine(load_config(base=cfg), world_size=1, model_builder=toy_model_builder).close()
    finally:
        dist.shutdown()
    assert train_toy(cfg)["finished"]
    assert spy == [] and cpu_memory.process_setting() is None
    assert not cpu_memory.keeps_freed_memory() and cpu_memory._applied == []
    assert "CPU memory" not in capsys.readouterr().out


@pytest.mark.skipif(not GLIBC, reason="sets glibc's malloc")
@pytest.mark.parametrize("setting", ["on", "off"])
def test_the_entry_point_helper_keeps_freed_memory_unless_switched_off(setting):
    env = dict(os.environ, DS_ACCELERATOR="cpu", PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-c", ENTRY, setting], capture_output=True, text=True, check=True,
                         env=env).stdout
    before, after, recorded, why = out.strip().split("|")
    assert (before, recorded) == ("False", "True")
    if setting == "on":
        assert after == "True" and "keeps freed memory" in why and "M_MMAP_MAX=0" in why
    else:
        assert (after, why) == ("False", "None")


def test_the_entry_point_helper_leaves_a_gpu_process_alone(monkeypatch, spy):
    monkeypatch.setattr(cpu_memory, "default_device", lambda: "cuda")
    assert cpu_memory.for_training_process(EngineConfig()) is None and spy == []
    monkeypatch.setattr(cpu_memory, "default_device", lambda: "cpu")
    assert cpu_memory.for_training_process(EngineConfig(), EngineConfig(cpu_keep_freed_memory=False)) is None
    assert spy == [] and cpu_memory.process_setting() is None
    assert cpu_memory.for_training_process(EngineConfig()) == "kept" and spy == [1]


def test_mmdist_train_sets_it_before_the_trainer_only_as_its_process(tmp_path, monkeypatch, spy):
    """`mmdist train` and launch/train.py go through process_main, which sets it before the model is built;
    ``main`` called in a caller's process does not."""
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(toy_config(str(tmp_path / "run"))))
    seen = []
    monkeypatch.setattr("mmdist.training.loop.train", lambda cfg: seen.append(cpu_memory.process_setting()) or
                        {"history": [], "step": 0, "run_dir": cfg.run_dir})
    assert train_command.main(["--config", str(path)]) == 0
    assert (spy, seen) == ([], [None])
    assert train_command.process_main(["--config", str(path)]) == 0
    assert (spy, seen) == ([1], [None, "kept"])
    assert cli.SUBCOMMANDS["train"][0] == "mmdist.commands.train:process_main"
    assert "sys.exit(process_main(sys.argv[1:]))" in (ROOT / "launch" / "train.py").read_text()


def test_mmdist_demo_sets_it_only_as_its_process(tmp_path, monkeypatch, spy):
    monkeypatch.setattr(demo, "missing_packages", lambda needed: [])

    def stop(run_dir, fingerprint, overwrite):  # before any shard or model
        raise demo.DemoError("stopped after the checks")

    monkeypatch.setattr(demo.DemoState, "open", staticmethod(stop))
    argv = ["--run-dir", str(tmp_path / "run"), "--device", "cpu"]
    assert demo.main(argv) == 2 and spy == []
    assert demo.process_main(argv) == 2 and spy == [1]
    assert demo.process_main([*argv, "--fuse-set", "engine.cpu_keep_freed_memory=false"]) == 2 and spy == [1]
    assert cli.SUBCOMMANDS["demo"][0] == "mmdist.commands.demo:process_main"


@pytest.mark.parametrize("asked", ["kept", None])
def test_the_trainer_prints_what_the_entry_point_set(tmp_path, monkeypatch, capsys, asked):
    monkeypatch.setattr(cpu_memory, "_asked", [asked] if asked else [])
    assert train_toy(toy_config(str(tmp_path / "run"), train={"max_steps": 1}))["finished"]
    assert ("[mmdist] CPU memory: kept (engine.cpu_keep_freed_memory)" in capsys.readouterr().out) == bool(asked)
