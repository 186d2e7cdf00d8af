"""Storage faults while saving a checkpoint: disk full, a read-only folder, a failed rename.

Each one must give an error that names the folder and the errno, remove the
partial folder, and leave the previous checkpoint untouched and still named by
``latest``. Most cases drive CheckpointManager with a small stand-in engine
(DeepSpeed's part is one ``save_checkpoint`` call writing torch files); one
fills a real, tiny tmpfs (root only), and one runs the real trainer.
"""

from __future__ import annotations

import errno
import gc
import os
import subprocess

import pytest
import torch

from mmdist.training import checkpoint as checkpoint_module
from mmdist.training.checkpoint import CheckpointError, CheckpointManager


class FileEngine:
    """What CheckpointManager needs of a DeepSpeed engine: module_state_dict and save_checkpoint writing files."""

    def __init__(self, numel: int = 16):
        self.weight = torch.arange(numel, dtype=torch.float32)
        self.fail: OSError | None = None

    def module_state_dict(self, exclude_frozen_parameters: bool = False) -> dict:
        return {"weight": self.weight}

    def save_checkpoint(
        self, save_dir: str, tag: str, save_latest: bool = False, exclude_frozen_parameters: bool = False
    ) -> None:
        folder = os.path.join(save_dir, tag)
        os.makedirs(folder, exist_ok=True)
        torch.save({"module": self.module_state_dict()}, os.path.join(folder, "mp_rank_00_model_states.pt"))
        if self.fail is not None:
            raise self.fail


def _saved_weight(path) -> torch.Tensor:
    return torch.load(path / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)["module"]["weight"]


def _first_checkpoint(tmp_path) -> tuple[CheckpointManager, FileEngine, torch.Tensor]:
    manager = CheckpointManager(tmp_path / "checkpoints", keep_last=2)
    engine = FileEngine()
    manager.save(engine, 1, {"samples": 8})
    return manager, engine, engine.weight.clone()


def _assert_previous_intact(manager: CheckpointManager, weight: torch.Tensor, failed_step: int) -> None:
    assert (manager.root / "latest").read_text().strip() == "step_000001"
    assert manager.latest() == manager.root / "step_000001"
    assert torch.equal(_saved_weight(manager.root / "step_000001"), weight)
    assert torch.load(manager.root / "step_000001" / "client_state_rank00000.pt", weights_only=False)["samples"] == 8
    assert not (manager.root / f"step_{failed_step:06d}").exists()
    assert not list(manager.root.glob(".tmp-*")), "the partial folder was left behind"


def test_disk_full_while_writing_names_the_folder_and_errno(tmp_path):
    manager, engine, weight = _first_checkpoint(tmp_path)
    engine.weight = engine.weight + 1
    engine.fail = OSError(
        errno.ENOSPC, os.strerror(errno.ENOSPC), str(manager.root / ".tmp-step_000002" / "optim_states.pt")
    )
    with pytest.raises(CheckpointError) as info:
        manager.save(engine, 2, {"samples": 16})
    message = str(info.value)
    assert f"into {manager.root} failed" in message and "[Errno 28 ENOSPC] No space left on device" in message
    assert "MiB free" in message and "still names step_000001" in message and "make" in message
    assert isinstance(info.value.__cause__, OSError)
    _assert_previous_intact(manager, weight, 2)


def test_read_only_folder_when_publishing_keeps_latest(tmp_path, monkeypatch):
    manager, engine, weight = _first_checkpoint(tmp_path)
    real_rename = os.rename

    def rename(src, dst):
        if str(dst).endswith("step_000002"):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(src))
        return real_rename(src, dst)

    monkeypatch.setattr(checkpoint_module.os, "rename", rename)
    with pytest.raises(CheckpointError, match=r"\[Errno 30 EROFS\] Read-only file system") as info:
        manager.save(engine, 2, {"samples": 16})
    assert str(manager.root) in str(info.value)
    _assert_previous_intact(manager, weight, 2)


def test_failed_resave_of_the_same_step_puts_the_old_copy_back(tmp_path, monkeypatch):
    """Re-saving the step `latest` names (after a resume): the old copy stays until the new one is in place."""
    manager, engine, weight = _first_checkpoint(tmp_path)
    real_rename = os.rename

    def rename(src, dst):
        if os.path.basename(str(src)) == ".tmp-step_000001":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_rename(src, dst)

    monkeypatch.setattr(checkpoint_module.os, "rename", rename)
    engine.weight = engine.weight * 10
    with pytest.raises(CheckpointError, match="ENOSPC"):
        manager.save(engine, 1, {"samples": 8})
    assert torch.equal(_saved_weight(manager.root / "step_000001"), weight)
    assert manager.latest() == manager.root / "step_000001" and not list(manager.root.glob(".tmp-*"))


def test_a_crash_that_is_not_a_storage_fault_is_passed_through(tmp_path, monkeypatch):
    manager, engine, _ = _first_checkpoint(tmp_path)
    monkeypatch.setattr(
        CheckpointManager, "fail_after_engine_save", lambda step: (_ for _ in ()).throw(ValueError("bug"))
    )
    with pytest.raises(ValueError, match="bug"):
        manager.save(engine, 2, {})
    assert (manager.root / ".tmp-step_000002").is_dir()  # left for clean_stale, as a killed process would leave it


@pytest.fixture
def tiny_tmpfs(tmp_path):
    """A 1 MiB tmpfs: a real ENOSPC (mounting needs root and CAP_SYS_ADMIN; skipped without)."""
    mount = tmp_path / "small_disk"
    mount.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    out = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True, text=True)
    if out.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {out.stderr.strip()}")
    try:
        yield mount
    finally:
        if subprocess.run(["umount", str(mount)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(mount)], check=False)  # a failed test may still hold a file open


def test_a_really_full_disk(tiny_tmpfs):
    manager = CheckpointManager(tiny_tmpfs / "checkpoints")
    small = FileEngine(numel=1024)  # 4 KiB
    manager.save(small, 1, {"samples": 8})
    weight = small.weight.clone()
    with pytest.raises(CheckpointError) as info:
        manager.save(FileEngine(numel=512 * 1024), 2, {"samples": 16})  # 2 MiB on a 1 MiB file system
    message = str(info.value)
    assert f"into {manager.root} failed" in message and "free of 1.0 MiB" in message
    assert "still names step_000001" in message
    _assert_previous_intact(manager, weight, 2)
    # torch's writer keeps its file open until the exception (and its traceback) is dropped: in a job the
    # process exits; here we drop it, and the space of the removed partial folder is there again.
    del info
    gc.collect()
    manager.save(small, 2, {"samples": 16})
    assert manager.latest() == manager.root / "step_000002"


@pytest.mark.slow
def test_trainer_reports_a_full_disk_and_resumes_from_the_previous_checkpoint(tmp_path, monkeypatch):
    from helpers.trainer_toy import toy_config, toy_loader_builder, toy_model_builder

    from mmdist.config.run import load_config
    from mmdist.training.loop import train

    run = tmp_path / "run"
    cfg = toy_config(str(run), train={"max_steps": 4}, checkpoint={"save_every": 2})

    def disk_full(step):
        if step == 4:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(run / "checkpoints" / ".tmp-step_000004"))

    def run_train() -> dict:
        return train(load_config(base=cfg), model_builder=toy_model_builder, loader_builder=toy_loader_builder())

    monkeypatch.setattr(CheckpointManager, "fail_after_engine_save", disk_full)
    with pytest.raises(CheckpointError, match=r"checkpoint step_000004 into .*checkpoints failed: \[Errno 28 ENOSPC\]"):
        run_train()
    ckpts = run / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == "step_000002" and (ckpts / "step_000002").is_dir()
    assert not (ckpts / ".tmp-step_000004").exists() and not (ckpts / "step_000004").exists()
    monkeypatch.setattr(CheckpointManager, "fail_after_engine_save", None)
    resumed = run_train()
    assert resumed["resumed_from"].endswith("step_000002") and [h["step"] for h in resumed["history"]] == [3, 4]
