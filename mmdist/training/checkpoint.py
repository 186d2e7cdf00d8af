"""Checkpoints that survive a crash mid-save, and the resume that continues the same run.

A checkpoint is a DeepSpeed checkpoint of the *trainable* side only (frozen
backbones come back from their own weights) plus, per rank, a
``client_state_rank{N}.pt`` with what DeepSpeed does not know: step, samples, RNG,
the loader's position; rank 0 adds the world-size-independent
``trainable_state.pt`` (mmdist.training.trainable_state) so another number of ranks
can resume. Saves go to ``.tmp-step_N/``, are renamed when complete and only then
named by ``latest``, so a crash or a full disk never leaves a half checkpoint
that a resume would pick; the folder must be shared by every rank. Rank 0 lists every
file with its size and SHA-256 (``checkpoint_files.json``) before the rename: a resume
checks the checkpoint against it, and a truncated or corrupted one is passed over for
the newest complete one, saying so. A storage fault while saving is agreed by every
rank (:class:`CheckpointStorageError` on all of them), so the trainer can go on. The
stage export is mmdist.export.export_trainable's.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import random
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

from mmdist import distributed as dist
from mmdist.atomic import write_text_atomic
from mmdist.training.deepspeed_compat import frozen_aliases_excluded
from mmdist.training.trainable_state import (
    TRAINABLE_STATE,
    CheckpointError,
    gather_trainable_state,
    group_names,
    groups_changed,
    load_trainable_state,
)

__all__ = [
    "CheckpointError",
    "CheckpointManager",
    "CheckpointStorageError",
    "capture_rng",
    "restore_rng",
    "TRAINABLE_STATE",
]

LATEST = "latest"
TMP_PREFIX = ".tmp-"
FILE_LIST = "checkpoint_files.json"  # every file of a complete checkpoint: relative path -> bytes, sha256
_STEP_DIR = re.compile(r"^step_(\d+)$")

log = logging.getLogger(__name__)


class CheckpointStorageError(CheckpointError):
    """Saving failed on storage (disk full, read-only, vanished folder) on some rank; raised on every rank.

    The partial folder is removed and ``latest`` still names the previous checkpoint.
    """


# Module-level seams: tests replace _world_size to load a checkpoint as if this run had another number of ranks.
_barrier, _rank, _world_size = dist.barrier, dist.rank, dist.world_size


SHARED_WAIT_ENV = "MMDIST_SHARED_WAIT_S"  # how long rank 0 waits for other ranks' files (a network filesystem's lag)


def _require_shared_folder(tmp: Path) -> None:
    """Every rank's files must be visible to rank 0, which publishes the checkpoint (collective; raises on all ranks).

    The run folder must be one folder every node shares. On node-local storage (the
    same path, another disk on each node) rank 0 would publish a checkpoint without
    the other nodes' shards, and a resume would fail or load another node's copy.
    """
    import socket
    import time

    if dist.world_size() == 1:
        return
    found = None
    if dist.rank() == 0:
        wait = float(os.environ.get(SHARED_WAIT_ENV, "30"))
        deadline = time.monotonic() + wait
        while True:
            missing = [r for r in range(dist.world_size()) if not (tmp / f"client_state_rank{r:05d}.pt").exists()]
            if not missing or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        found = (missing, socket.gethostname(), wait)
    missing, host, wait = dist.broadcast_object(found, src=0)
    if missing:
        raise CheckpointError(
            f"checkpoint {tmp.name}: rank 0 (on {host}) does not see the files rank(s) {', '.join(map(str, missing))} "
            f"wrote into {tmp} within {wait:g} s (${SHARED_WAIT_ENV}): "
            "the run folder is not shared by every node (node-local "
            "storage?). Put run_dir on a filesystem that every node mounts at the same path; nothing was published"
        )


# ---------------------------------------------------------------------------
# RNG


def capture_rng() -> dict:
    """Python, NumPy, torch CPU (and CUDA) generator states of this process."""
    import numpy as np
    import torch

    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict) -> None:
    import numpy as np
    import torch

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------------------
# checkpoints


class CheckpointManager:
    """Saves, prunes and finds checkpoints under ``RUN_DIR/checkpoints``.

    ``fail_after_engine_save`` is a test hook: a callable ``(step)`` run after
    DeepSpeed has written its files and before the rename, to simulate a crash
    mid-save (tests set it on the class).
    """

    fail_after_engine_save: Optional[Callable[[int], None]] = None

    def __init__(self, root: str | os.PathLike, keep_last: int = 2):
        self.root = Path(root)
        self.keep_last = keep_last
        self.resume_notes: list[str] = []  # what resolve_resume passed over, for the run's log

    @staticmethod
    def tag(step: int) -> str:
        return f"step_{step:06d}"

    # -- reading ----------------------------------------------------------

    def complete(self) -> list[Path]:
        """Complete checkpoints, oldest first."""
        if not self.root.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.root.iterdir() if p.is_dir() and (m := _STEP_DIR.match(p.name))]
        return [p for _, p in sorted(found)]

    def latest(self) -> Optional[Path]:
        """The checkpoint ``latest`` names (None if there is none); a dangling pointer is an error."""
        pointer = self.root / LATEST
        if not pointer.is_file():
            return None
        name = pointer.read_text().strip()
        path = self.root / name
        if not path.is_dir():
            raise CheckpointError(
                f"{pointer} names {name!r} but {path} does not exist; delete {pointer} to start over or "
                "write the name of a complete checkpoint "
                f"({', '.join(p.name for p in self.complete()) or 'none'}) into it"
            )
        return path

    def clean_stale(self) -> list[Path]:
        """Remove ``.tmp-*`` folders left by a save that crashed (rank 0 only; call before any save)."""
        removed = []
        if dist.rank() == 0 and self.root.is_dir():
            for p in self.root.iterdir():
                if p.name.startswith(TMP_PREFIX):
                    shutil.rmtree(p, ignore_errors=True)
                    removed.append(p)
        dist.barrier()
        return removed

    # -- writing ----------------------------------------------------------

    def save(self, engine: Any, step: int, client_state: dict) -> Path:
        """Write checkpoint ``step`` on every rank (collective); returns its final path.

        A storage fault (disk full, read-only or vanished folder) on any rank raises
        :class:`CheckpointStorageError` on every rank, naming the folder and the errno;
        the partial ``.tmp-`` folder is removed and ``latest`` still names the previous
        checkpoint, untouched.
        """
        name = self.tag(step)
        tmp = self.root / (TMP_PREFIX + name)
        rank = dist.rank()
        import torch

        def prepare() -> None:
            self.root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)

        self._agree(_storage_fault_of(prepare) if rank == 0 else None, name, tmp)
        # collective, so before any write: a rank whose write fails must not leave the others waiting inside it
        # (stand-in engines of tests have no optimizer: nothing to gather)
        full_engine = hasattr(engine, "optimizer") and hasattr(engine, "module")
        consolidated = gather_trainable_state(engine) if full_engine else None

        def write() -> None:
            with frozen_aliases_excluded(engine):
                engine.save_checkpoint(str(self.root), tag=tmp.name, save_latest=False, exclude_frozen_parameters=True)
            if rank == 0 and consolidated is not None:
                torch.save(consolidated, str(tmp / TRAINABLE_STATE) + ".part")
                os.replace(str(tmp / TRAINABLE_STATE) + ".part", tmp / TRAINABLE_STATE)
            state = dict(client_state, step=step)
            if hasattr(engine, "optimizer"):
                state["optimizer_groups"] = group_names(engine)
            target = tmp / f"client_state_rank{rank:05d}.pt"
            torch.save(state, str(target) + ".part")
            os.replace(str(target) + ".part", target)
            if self.fail_after_engine_save is not None:
                type(self).fail_after_engine_save(step)

        self._agree(_storage_fault_of(write), name, tmp)
        _require_shared_folder(tmp)  # collective
        final = self.root / name

        def publish() -> None:
            _write_file_list(tmp, step)
            self._publish(tmp, final)

        self._agree(_storage_fault_of(publish) if rank == 0 else None, name, tmp)
        return final

    def _agree(self, fault: Optional[BaseException], name: str, tmp: Path) -> None:
        """Every rank learns whether any rank's storage failed, and then all raise (collective: a barrier).

        The error carries the first failing rank's cause; rank 0 removes the partial folder.
        """
        message = self._fault_message(fault, name, tmp) if fault is not None else None
        if dist.world_size() > 1:
            reports = dist.all_gather_object(message)
            failed = [(r, m) for r, m in enumerate(reports) if m is not None]
            if not failed:
                return
            message = message or f"{failed[0][1]} (on rank {failed[0][0]})"
        elif message is None:
            return
        if dist.rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)  # a half-written save must not fill a full disk further
        raise CheckpointStorageError(message) from fault

    def _publish(self, tmp: Path, final: Path) -> None:
        """Rename the finished ``.tmp-`` folder into place, then point ``latest`` at it, then prune."""
        retired = None
        if final.exists():
            # re-saving the same step (after a resume): the old copy goes only once the new one is in place
            retired = self.root / f"{TMP_PREFIX}old-{final.name}"
            shutil.rmtree(retired, ignore_errors=True)
            os.rename(final, retired)
        try:
            os.rename(tmp, final)
        except OSError:
            if retired is not None:
                os.rename(retired, final)
            raise
        write_text_atomic(self.root / LATEST, final.name + "\n")
        if retired is not None:
            shutil.rmtree(retired, ignore_errors=True)
        self._prune(keep=final)

    def _fault_message(self, exc: BaseException, name: str, tmp: Path) -> str:
        """What failed where, why, that the previous checkpoint is safe, and what to do."""
        return (f"saving checkpoint {name} into {self.root} failed: {_describe_fault(exc)}; {_free_space(self.root)}. "
                f"The partial folder {tmp.name} was removed. {self._previous_state()} "
                f"Free space or make {self.root} writable (or set run_dir elsewhere), then restart: the run resumes "
                "from the latest complete checkpoint.")

    def _previous_state(self) -> str:
        pointer = self.root / LATEST
        try:
            previous = pointer.read_text().strip()
        except OSError:
            return "There is no earlier checkpoint."
        return f"The previous checkpoint is intact: {pointer} still names {previous}."

    def _prune(self, keep: Path) -> None:
        complete = self.complete()
        for old in complete[: max(0, len(complete) - self.keep_last)]:
            if old != keep:
                shutil.rmtree(old, ignore_errors=True)

    # -- resuming ---------------------------------------------------------

    def resolve_resume(self, resume: str) -> Optional[Path]:
        """The checkpoint to resume from for ``checkpoint.resume`` = 'auto' | 'never' | a path.

        'auto' takes the one ``latest`` names if it is whole (:func:`damage`), else the newest
        complete one before it; each one passed over is logged and kept in ``resume_notes``.
        A path given by hand must be whole.
        """
        self.resume_notes = []
        if resume == "never":
            return None
        if resume != "auto":
            path = Path(resume)
            if not path.is_dir():
                raise CheckpointError(f"checkpoint.resume={resume!r}: no such checkpoint folder")
            problem = damage(path)
            if problem:
                raise CheckpointError(f"checkpoint.resume={resume!r}: the checkpoint is damaged: {problem}. Name an "
                                      "earlier one, or checkpoint.resume=auto to take the newest complete one")
            return path
        latest = self.latest()
        if latest is None:
            return None
        newest = _step_of(latest)
        skipped = []
        for path in [latest, *(p for p in reversed(self.complete()) if _step_of(p) < newest)]:
            problem = damage(path)
            if problem is None:
                if skipped:
                    self.resume_notes.append(f"[mmdist] passed over damaged checkpoint(s) {'; '.join(skipped)}: "
                                             f"resuming from {path.name}, the newest complete one")
                    log.warning("%s", self.resume_notes[-1])
                return path
            skipped.append(f"{path.name} ({problem})")
        raise CheckpointError(f"no complete checkpoint to resume in {self.root}: {'; '.join(skipped)}. Set "
                              "checkpoint.resume=never to start over (or restore the files)")

    def load(self, engine: Any, path: Path) -> dict:
        """Load the DeepSpeed state and this rank's client state from ``path`` (collective).

        Written by another number of ranks: the consolidated trainable state
        (:data:`TRAINABLE_STATE`) is loaded instead of DeepSpeed's per-rank files,
        and the client state returned is rank ``min(rank, saved ranks - 1)``'s with
        ``saved_world_size`` and ``client_states`` (every saved rank's, for a data
        position that must be merged) added. Without that file: :class:`CheckpointError`.
        """
        import torch

        rank = dist.rank()
        world = _world_size()
        present = sorted(path.glob("client_state_rank*.pt"))
        if not present:
            raise CheckpointError(f"{path} holds no client_state_rank*.pt: not a complete mmdist checkpoint")
        first = torch.load(present[0], map_location="cpu", weights_only=False)
        saved_world = int(first.get("world_size") or len(present))
        if saved_world != world:
            return self._load_elastic(engine, path, present, saved_world)
        if groups_changed(engine, first.get("optimizer_groups")):
            # DeepSpeed's files hold the optimizer state per group: another layout loads by parameter name instead
            client = self._load_elastic(engine, path, present, saved_world)  # this rank's own client state
            del client["client_states"], client["saved_world_size"]  # the same ranks: the data position stays per rank
            return dict(client, optimizer_groups_changed=True)
        client_file = path / f"client_state_rank{rank:05d}.pt"
        if not client_file.is_file():
            raise CheckpointError(
                f"{client_file} is missing ({len(present)} rank file(s) present): the checkpoint is incomplete; "
                "resume from an earlier one (checkpoint.resume=PATH) or set checkpoint.resume=never"
            )
        loaded, _ = engine.load_checkpoint(
            str(path.parent),
            tag=path.name,
            load_module_strict=False,  # frozen weights are not in the checkpoint by design
            load_optimizer_states=True,
            load_lr_scheduler_states=True,
        )
        if loaded is None:
            raise CheckpointError(f"DeepSpeed could not load the checkpoint {path}")
        # weights_only=False: the file holds RNG states (numpy tuples) that we wrote ourselves.
        return torch.load(client_file, map_location="cpu", weights_only=False)

    def _load_elastic(self, engine: Any, path: Path, present: list[Path], saved_world: int) -> dict:
        import torch

        world = _world_size()
        consolidated = path / TRAINABLE_STATE
        if not consolidated.is_file() and saved_world == world:
            raise CheckpointError(
                f"{path} holds the optimizer state for other parameter groups than this run's {group_names(engine)} "
                f"(changed group settings, or an mmdist from before ZeRO-3 weights got weight decay, which put every "
                "ZeRO-3 parameter in a .no_decay group) "
                f"and has no {TRAINABLE_STATE} to load by parameter name: resume "
                "it with the settings and mmdist version that wrote it, or set checkpoint.resume=never"
            )
        if not consolidated.is_file():
            raise CheckpointError(
                f"{path} was written by {saved_world} rank(s) "
                f"and this run has {world}, and it has no {TRAINABLE_STATE} "
                "(it predates resuming on another world size): ZeRO partitions are per rank; resume it with "
                f"{saved_world} rank(s) once (its next checkpoint can move), or set checkpoint.resume=never"
            )
        if len(present) != saved_world:
            raise CheckpointError(
                f"{path}: {len(present)} client_state_rank*.pt for "
                f"{saved_world} saved ranks; the checkpoint is incomplete"
            )
        load_trainable_state(
            engine, torch.load(consolidated, map_location="cpu", weights_only=False), source=consolidated
        )
        states = [torch.load(p, map_location="cpu", weights_only=False) for p in present]
        client = dict(states[min(dist.rank(), saved_world - 1)])
        client.update(saved_world_size=saved_world, client_states=states)
        return client


def _step_of(path: Path) -> int:
    match = _STEP_DIR.match(path.name)
    return int(match.group(1)) if match else -1


def _storage_fault_of(action: Callable[[], None]) -> Optional[BaseException]:
    """Run ``action``; a storage fault is returned (for the ranks to agree on), any other error raised as it is."""
    try:
        action()
    except Exception as exc:
        if not _is_storage_fault(exc):
            raise
        return exc
    return None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _write_file_list(folder: Path, step: int) -> None:
    """Every file of the finished ``folder`` with its size and SHA-256, read back from storage (rank 0)."""
    files = {str(p.relative_to(folder)): {"bytes": p.stat().st_size, "sha256": _sha256(p)}
             for p in sorted(folder.rglob("*")) if p.is_file() and p.name != FILE_LIST}
    write_text_atomic(folder / FILE_LIST, json.dumps({"step": step, "files": files}, indent=1))


def damage(path: Path) -> Optional[str]:
    """What is wrong with checkpoint ``path`` (a missing, truncated or changed file), or None when it is whole.

    A checkpoint written before file lists were kept is checked for its client states only.
    """
    listing = path / FILE_LIST
    if not listing.is_file():
        if not any(path.glob("client_state_rank*.pt")):
            return "no client_state_rank*.pt (not a complete mmdist checkpoint)"
        return None
    try:
        files = json.loads(listing.read_text())["files"]
    except (OSError, ValueError, KeyError) as exc:
        return f"{FILE_LIST} is unreadable ({exc})"
    for name, want in files.items():
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        size = file.stat().st_size
        if size != want["bytes"]:
            return f"{name} has {size:,} bytes, {want['bytes']:,} were written (truncated)"
        if _sha256(file) != want["sha256"]:
            return f"{name} differs from what was written (its SHA-256 changed: corrupted)"
    return None


def _is_storage_fault(exc: BaseException) -> bool:
    """An OSError, or torch's C++ writer failing on one (it raises RuntimeError, e.g. "unexpected pos" on ENOSPC)."""
    if isinstance(exc, OSError):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and any(
        s in text for s in ("PytorchStreamWriter failed", "file write failed", "unexpected pos", "cannot be opened")
    )


def _describe_fault(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.errno is not None:
        where = f" ({exc.filename})" if exc.filename else ""
        return f"[Errno {exc.errno} {errno.errorcode.get(exc.errno, '?')}] {exc.strerror or exc}{where}"
    return f"torch could not write a file ({str(exc).splitlines()[0][:200]})"


def _free_space(folder: Path) -> str:
    probe = folder
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        usage = shutil.disk_usage(probe)
    except OSError:
        return "free space unknown"
    return f"{usage.free / 2**20:,.1f} MiB free of {usage.total / 2**20:,.1f} MiB on that file system"
