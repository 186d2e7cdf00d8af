"""Storage faults the trainer survives, on real small file systems: a disk that fills up during a run, a
truncated or corrupted latest checkpoint at resume, a read-only or full run folder at start.

The file systems are tmpfs mounts of a few MiB (root and CAP_SYS_ADMIN; each test is skipped, saying why,
where mounting is refused); a full disk is a ballast file written until the kernel answers ENOSPC, a
read-only folder is the mount remounted ``ro`` (root ignores permission bits, not a read-only mount). In every
case no earlier checkpoint is lost: it stays whole, checked against the file list written with it.
"""

from __future__ import annotations

import errno
import subprocess
from pathlib import Path

import pytest
import yaml
from helpers.trainer_toy import toy_config, toy_loader_builder, toy_model_builder

from mmdist.commands import train as train_command
from mmdist.config.run import load_config
from mmdist.settings import ConfigError
from mmdist.training import checkpoint as checkpoint_module
from mmdist.training.checkpoint import CheckpointManager, CheckpointStorageError, damage
from mmdist.training.loop import train
from mmdist.training.run_setup import _checkpoint_bytes, check_run_dir


def _mount(folder: Path, size: str) -> None:
    folder.mkdir()
    out = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True,
                         text=True)
    if out.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root and CAP_SYS_ADMIN): {out.stderr.strip()}")


@pytest.fixture
def small_disk(tmp_path):
    """A 32 MiB tmpfs (the toy config's planned checkpoint is ~14 MiB, so a run may start on it)."""
    disk = tmp_path / "disk"
    _mount(disk, "32m")
    try:
        yield disk
    finally:
        if subprocess.run(["umount", str(disk)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(disk)], check=False)  # a failed test may still hold a file open


def _fill(disk: Path) -> Path:
    """Write a ballast file until the file system is full (a real ENOSPC); returns it."""
    ballast = disk / "ballast"
    with open(ballast, "wb") as fh:
        try:
            while True:
                fh.write(bytes(1 << 16))
                fh.flush()
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
    return ballast


def _train(cfg: dict) -> dict:
    return train(load_config(base=cfg), model_builder=toy_model_builder, loader_builder=toy_loader_builder())


def _whole(path: Path) -> bool:
    return path.is_dir() and (path / checkpoint_module.FILE_LIST).is_file() and damage(path) is None


def test_a_disk_that_fills_up_mid_run_is_a_warning_and_the_run_goes_on(small_disk, monkeypatch, capsys):
    run = small_disk / "run"
    real_save = CheckpointManager.save
    seen = {}

    def save(self, engine, step, client_state):
        if step != 4:
            return real_save(self, engine, step, client_state)
        ballast = _fill(small_disk)  # the disk is full for the save of step 4 only
        try:
            return real_save(self, engine, step, client_state)
        finally:
            seen["step 2 whole during the fault"] = _whole(run / "checkpoints" / "step_000002")
            ballast.unlink()

    monkeypatch.setattr(CheckpointManager, "save", save)
    summary = _train(toy_config(str(run), train={"max_steps": 6}, checkpoint={"save_every": 2, "keep_last": 3}))
    out = capsys.readouterr().out
    assert summary["finished"] and summary["step"] == 6
    # torch's zip writer reports a full disk as "unexpected pos", DeepSpeed's or ours as ENOSPC: either way, 0 free
    assert "[mmdist] warning: step 4: saving checkpoint step_000004" in out and "0.0 MiB free of 32.0 MiB" in out
    assert "Training goes on without this checkpoint" in out and "the next save, 2 steps on, tries again" in out
    assert seen == {"step 2 whole during the fault": True}
    ckpts = run / "checkpoints"
    assert sorted(p.name for p in ckpts.glob("step_*")) == ["step_000002", "step_000006"]
    assert _whole(ckpts / "step_000002") and _whole(ckpts / "step_000006")
    assert (ckpts / "latest").read_text().strip() == "step_000006" and not list(ckpts.glob(".tmp-*"))
    assert '"checkpoint_failed": 1' in (run / "metrics.jsonl").read_text()


def test_a_full_disk_at_the_last_save_stops_with_the_message(small_disk, monkeypatch):
    run = small_disk / "run"
    real_save = CheckpointManager.save

    def save(self, engine, step, client_state):
        if step == 4:
            _fill(small_disk)  # and it stays full
        return real_save(self, engine, step, client_state)

    monkeypatch.setattr(CheckpointManager, "save", save)
    with pytest.raises(CheckpointStorageError) as info:
        _train(toy_config(str(run), train={"max_steps": 4}, checkpoint={"save_every": 2}))
    message = str(info.value)
    assert "saving checkpoint step_000004 into" in message and "0.0 MiB free of 32.0 MiB" in message
    assert "still names step_000002" in message and "then restart: the run resumes" in message
    ckpts = run / "checkpoints"
    assert _whole(ckpts / "step_000002") and not (ckpts / "step_000004").exists() and not list(ckpts.glob(".tmp-*"))


def _two_checkpoints(run: Path) -> Path:
    _train(toy_config(str(run), train={"max_steps": 4}, checkpoint={"save_every": 2}))
    ckpts = run / "checkpoints"
    assert _whole(ckpts / "step_000002") and _whole(ckpts / "step_000004")
    return ckpts


def test_a_truncated_latest_checkpoint_is_passed_over_at_resume(tmp_path, capsys):
    run = tmp_path / "run"
    ckpts = _two_checkpoints(run)
    client = ckpts / "step_000004" / "client_state_rank00000.pt"
    size = client.stat().st_size
    with open(client, "r+b") as fh:
        fh.truncate(size // 2)  # a save cut short by a crash of the node or the file server
    capsys.readouterr()
    resumed = _train(toy_config(str(run), train={"max_steps": 6}, checkpoint={"save_every": 2}))
    out = capsys.readouterr().out
    assert resumed["resumed_from"].endswith("step_000002") and [h["step"] for h in resumed["history"]] == [3, 4, 5, 6]
    assert (f"passed over damaged checkpoint(s) step_000004 (client_state_rank00000.pt has {size // 2:,} bytes, "
            f"{size:,} were written (truncated)): resuming from step_000002, the newest complete one") in out
    assert _whole(ckpts / "step_000004") and _whole(ckpts / "step_000006")  # step 4 written again, whole


def test_a_corrupted_latest_checkpoint_is_passed_over_and_an_explicit_one_refused(tmp_path):
    ckpts = _two_checkpoints(tmp_path / "run")
    weights = next(p for p in (ckpts / "step_000004").rglob("*model_states.pt"))
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte, the same size
    weights.write_bytes(bytes(data))
    manager = CheckpointManager(ckpts)
    assert manager.resolve_resume("auto") == ckpts / "step_000002"
    assert "SHA-256 changed: corrupted" in manager.resume_notes[0] and _whole(ckpts / "step_000002")
    with pytest.raises(checkpoint_module.CheckpointError, match="the checkpoint is damaged: .*corrupted"):
        manager.resolve_resume(str(ckpts / "step_000004"))
    (ckpts / "step_000002" / "client_state_rank00000.pt").unlink()
    with pytest.raises(checkpoint_module.CheckpointError, match="no complete checkpoint to resume"):
        manager.resolve_resume("auto")


def _command(run: Path, tmp_path: Path) -> list[str]:
    path = tmp_path / "toy.yaml"
    path.write_text(yaml.safe_dump(toy_config(str(run))))
    return ["--config", str(path)]


def test_a_read_only_run_folder_is_refused_before_any_work(small_disk, tmp_path, capsys):
    ckpts = _two_checkpoints(small_disk / "run")
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    assert train_command.main(_command(small_disk / "run", tmp_path)) == 2
    err = capsys.readouterr().err
    assert f"run_dir: {ckpts} cannot be written ([Errno 30 EROFS] Read-only file system)" in err
    assert "nothing was started" in err
    assert _whole(ckpts / "step_000002") and _whole(ckpts / "step_000004")
    assert not (small_disk / "run" / "config.yaml.tmp").exists()


def test_a_full_run_folder_is_refused_before_any_work(small_disk, tmp_path, capsys):
    run = small_disk / "run"
    _fill(small_disk)
    assert train_command.main(_command(run, tmp_path)) == 2
    err = capsys.readouterr().err
    assert f"run_dir: {run / 'checkpoints'} cannot be written ([Errno 28 ENOSPC] No space left on device)" in err
    assert not (run / "config.yaml").exists()  # refused before the resolved config was written


def test_too_little_room_for_one_checkpoint_is_refused(small_disk):
    cfg = load_config(base=toy_config(str(small_disk / "run")))
    need = _checkpoint_bytes(cfg)  # the planner's count of the config's trainable parameters x 28 bytes
    assert need is not None and 2**20 < need < 30 * 2**20
    with open(small_disk / "ballast", "wb") as fh:  # leave about half a checkpoint free, room for the 1 MiB probe
        fh.write(bytes(32 * 2**20 - need // 2))
    with pytest.raises(ConfigError, match=r"run_dir: .* MiB free on the file system of .*, and one checkpoint of "
                                          r"this model needs about .* MiB"):
        check_run_dir(cfg, rank=0)
    assert not list((small_disk / "run" / "checkpoints").iterdir())  # the probe file is gone
