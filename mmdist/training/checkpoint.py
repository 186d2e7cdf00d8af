"""Checkpoints that survive a crash mid-save, resume that continues the same run, and the stage export.

A checkpoint is a DeepSpeed checkpoint of the *trainable* side only
(``exclude_frozen_parameters=True``: the frozen LLM and vision encoder are
never rewritten; they come back from their own weights on restart) plus, per
rank, a ``client_state_rank{N}.pt`` with what DeepSpeed does not know: the step,
the samples seen, the RNG states, the data loader's position.

Atomicity: every rank writes into ``checkpoints/.tmp-step_000010/``; after a
barrier rank 0 renames it to ``step_000010/`` and only then replaces the
``latest`` file (write + ``os.replace``). A crash at any point leaves ``latest``
naming the previous complete checkpoint; stale ``.tmp-*`` folders are removed
at the next start. Older checkpoints are deleted only after a newer one is
complete (``checkpoint.keep_last``). A storage fault while saving (disk full,
read-only folder) is a :class:`CheckpointError` that names the folder, the
errno and the free space; the partial folder is removed at once (it would
only fill a full disk further) and ``latest`` keeps naming the previous one.
The checkpoint folder must be on a file system every rank sees (as on any
cluster's shared storage).

Elastic resume (another world size): DeepSpeed's files hold per-rank ZeRO
partitions, so beside them rank 0 writes ``trainable_state.pt``, a consolidated
copy that does not depend on the world size: the fp32 master weight and the
Adam moments (``exp_avg``, ``exp_avg_sq``) of every trainable parameter,
gathered with DeepSpeed's ``safe_get_full_*`` on every rank (under ZeRO-3 each
call is a collective), plus the optimizer's step count and the LR scheduler.
The trainable side is small (connector, stage-1 module, LoRA), so this costs
three fp32 copies of it. A run with the same world size loads DeepSpeed's files
as before; another world size builds the engine fresh and loads this file
(``safe_set_full_*`` and the compute copy of every trainable weight). A
checkpoint written before this file existed still resumes on its own world
size and is refused, with the reason, on any other.

The export (``RUN_DIR/export/model.safetensors`` + ``manifest.json``) holds the
trainable weights only, gathered under ZeRO-3 by mmdist.export.export_trainable; it is what stage 2 loads with
``model.connector.stage1_weights``.
"""

from __future__ import annotations

import contextlib
import errno
import os
import random
import re
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Optional

from mmdist.atomic import write_text_atomic

__all__ = [
    "CheckpointError",
    "CheckpointManager",
    "capture_rng",
    "restore_rng",
]

LATEST = "latest"
TRAINABLE_STATE = "trainable_state.pt"
OPTIMIZER_KEYS = ("exp_avg", "exp_avg_sq")  # Adam/AdamW moments (DeepSpeed's fused Adam and torch's AdamW name them alike)
TMP_PREFIX = ".tmp-"
_STEP_DIR = re.compile(r"^step_(\d+)$")


class CheckpointError(RuntimeError):
    """A checkpoint could not be written or read back."""


def _barrier() -> None:
    import torch.distributed as tdist

    if tdist.is_available() and tdist.is_initialized():
        tdist.barrier()


def _world_size() -> int:
    import torch.distributed as tdist

    return tdist.get_world_size() if tdist.is_available() and tdist.is_initialized() else 1


def _rank() -> int:
    import torch.distributed as tdist

    return tdist.get_rank() if tdist.is_available() and tdist.is_initialized() else 0


SHARED_WAIT_ENV = "MMDIST_SHARED_WAIT_S"  # how long rank 0 waits for other ranks' files (a network filesystem's lag)


def _require_shared_folder(tmp: Path) -> None:
    """Every rank's files must be visible to rank 0, which publishes the checkpoint (collective; raises on all ranks).

    The run folder must be one folder every node shares. On node-local storage (the
    same path, another disk on each node) rank 0 would publish a checkpoint without
    the other nodes' shards, and a resume would fail or load another node's copy.
    """
    import socket
    import time

    import torch.distributed as tdist

    if not (tdist.is_available() and tdist.is_initialized()) or tdist.get_world_size() == 1:
        return
    box: list = [None]
    if tdist.get_rank() == 0:
        wait = float(os.environ.get(SHARED_WAIT_ENV, "30"))
        deadline = time.monotonic() + wait
        while True:
            missing = [r for r in range(tdist.get_world_size()) if not (tmp / f"client_state_rank{r:05d}.pt").exists()]
            if not missing or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        box = [(missing, socket.gethostname(), wait)]
    tdist.broadcast_object_list(box, src=0)
    missing, host, wait = box[0]
    if missing:
        raise CheckpointError(
            f"checkpoint {tmp.name}: rank 0 (on {host}) does not see the files rank(s) {', '.join(map(str, missing))} "
            f"wrote into {tmp} within {wait:g} s (${SHARED_WAIT_ENV}): the run folder is not shared by every node (node-local "
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


@contextlib.contextmanager
def _frozen_aliases_excluded(engine: Any) -> Iterator[None]:
    """Make DeepSpeed's ``exclude_frozen_parameters`` also drop tied aliases of frozen weights.

    DeepSpeed 0.19 filters the state dict with ``named_parameters()``, which lists a
    tied weight once (``embed_tokens.weight``) while ``state_dict()`` holds it under
    every name: a frozen LLM's tied ``lm_head.weight`` (the whole vocabulary
    embedding) was written into every checkpoint. We filter with
    ``remove_duplicate=False`` for the duration of the save.
    """
    original = engine.module_state_dict

    def module_state_dict(*args: Any, exclude_frozen_parameters: bool = False, **kwargs: Any) -> dict:
        state = original(*args, exclude_frozen_parameters=exclude_frozen_parameters, **kwargs)
        if exclude_frozen_parameters:
            for name, param in engine.module.named_parameters(remove_duplicate=False):
                if not param.requires_grad:
                    state.pop(name, None)
        return state

    engine.module_state_dict = module_state_dict
    try:
        yield
    finally:
        del engine.module_state_dict  # back to the class's method


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
                f"write the name of a complete checkpoint ({', '.join(p.name for p in self.complete()) or 'none'}) into it"
            )
        return path

    def clean_stale(self) -> list[Path]:
        """Remove ``.tmp-*`` folders left by a save that crashed (rank 0 only; call before any save)."""
        removed = []
        if _rank() == 0 and self.root.is_dir():
            for p in self.root.iterdir():
                if p.name.startswith(TMP_PREFIX):
                    shutil.rmtree(p, ignore_errors=True)
                    removed.append(p)
        _barrier()
        return removed

    # -- writing ----------------------------------------------------------

    def save(self, engine: Any, step: int, client_state: dict) -> Path:
        """Write checkpoint ``step`` on every rank (collective); returns its final path.

        A storage fault (disk full, read-only or vanished folder) raises
        :class:`CheckpointError` naming the folder and the errno; the partial
        ``.tmp-`` folder is removed and ``latest`` still names the previous
        checkpoint, untouched.
        """
        name = self.tag(step)
        tmp = self.root / (TMP_PREFIX + name)
        rank = _rank()
        if rank == 0:
            with self._storage_faults(name, tmp):
                self.root.mkdir(parents=True, exist_ok=True)
                shutil.rmtree(tmp, ignore_errors=True)
        _barrier()
        import torch

        with self._storage_faults(name, tmp):
            with _frozen_aliases_excluded(engine):
                engine.save_checkpoint(str(self.root), tag=tmp.name, save_latest=False, exclude_frozen_parameters=True)
            # collective: every rank, before rank 0 writes (stand-in engines of tests have no optimizer: nothing to gather)
            consolidated = gather_trainable_state(engine) if hasattr(engine, "optimizer") and hasattr(engine, "module") else None
            if rank == 0 and consolidated is not None:
                torch.save(consolidated, str(tmp / TRAINABLE_STATE) + ".part")
                os.replace(str(tmp / TRAINABLE_STATE) + ".part", tmp / TRAINABLE_STATE)
            state = dict(client_state, step=step)
            if hasattr(engine, "optimizer"):
                state["optimizer_groups"] = _group_names(engine)
            target = tmp / f"client_state_rank{rank:05d}.pt"
            torch.save(state, str(target) + ".part")
            os.replace(str(target) + ".part", target)
            if self.fail_after_engine_save is not None:
                type(self).fail_after_engine_save(step)
        _barrier()
        _require_shared_folder(tmp)  # collective
        final = self.root / name
        if rank == 0:
            with self._storage_faults(name, tmp):
                self._publish(tmp, final)
        _barrier()
        return final

    def _publish(self, tmp: Path, final: Path) -> None:
        """Rename the finished ``.tmp-`` folder into place, then point ``latest`` at it, then prune."""
        retired = None
        if final.exists():  # re-saving the same step (after a resume): the old copy goes only once the new one is in place
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

    @contextlib.contextmanager
    def _storage_faults(self, name: str, tmp: Path) -> Iterator[None]:
        """Turn a failed write into an error that says where, why, and that the previous checkpoint is safe."""
        try:
            yield
        except Exception as exc:
            if not _is_storage_fault(exc):
                raise
            shutil.rmtree(tmp, ignore_errors=True)  # a half-written save must not fill a full disk further
            raise CheckpointError(
                f"saving checkpoint {name} into {self.root} failed: {_describe_fault(exc)}; {_free_space(self.root)}. "
                f"The partial folder {tmp.name} was removed. {self._previous_state()} "
                f"Free space or make {self.root} writable (or set run_dir elsewhere), then restart: the run resumes "
                "from the latest complete checkpoint."
            ) from exc

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
        """The checkpoint to resume from for ``checkpoint.resume`` = 'auto' | 'never' | a path."""
        if resume == "never":
            return None
        if resume == "auto":
            return self.latest()
        path = Path(resume)
        if not path.is_dir():
            raise CheckpointError(f"checkpoint.resume={resume!r}: no such checkpoint folder")
        return path

    def load(self, engine: Any, path: Path) -> dict:
        """Load the DeepSpeed state and this rank's client state from ``path`` (collective).

        Written by another number of ranks: the consolidated trainable state
        (:data:`TRAINABLE_STATE`) is loaded instead of DeepSpeed's per-rank files,
        and the client state returned is rank ``min(rank, saved ranks - 1)``'s with
        ``saved_world_size`` and ``client_states`` (every saved rank's, for a data
        position that must be merged) added. Without that file: :class:`CheckpointError`.
        """
        import torch

        rank = _rank()
        world = _world_size()
        present = sorted(path.glob("client_state_rank*.pt"))
        if not present:
            raise CheckpointError(f"{path} holds no client_state_rank*.pt: not a complete mmdist checkpoint")
        first = torch.load(present[0], map_location="cpu", weights_only=False)
        saved_world = int(first.get("world_size") or len(present))
        if saved_world != world:
            return self._load_elastic(engine, path, present, saved_world)
        if _groups_changed(engine, first.get("optimizer_groups")):
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
                f"{path} holds the optimizer state for other parameter groups than this run's {_group_names(engine)} "
                f"(changed group settings, or an mmdist from before ZeRO-3 weights got weight decay, which put every "
                f"ZeRO-3 parameter in a .no_decay group) and has no {TRAINABLE_STATE} to load by parameter name: resume "
                "it with the settings and mmdist version that wrote it, or set checkpoint.resume=never"
            )
        if not consolidated.is_file():
            raise CheckpointError(
                f"{path} was written by {saved_world} rank(s) and this run has {world}, and it has no {TRAINABLE_STATE} "
                "(it predates resuming on another world size): ZeRO partitions are per rank; resume it with "
                f"{saved_world} rank(s) once (its next checkpoint can move), or set checkpoint.resume=never"
            )
        if len(present) != saved_world:
            raise CheckpointError(f"{path}: {len(present)} client_state_rank*.pt for {saved_world} saved ranks; the checkpoint is incomplete")
        load_trainable_state(engine, torch.load(consolidated, map_location="cpu", weights_only=False), source=consolidated)
        states = [torch.load(p, map_location="cpu", weights_only=False) for p in present]
        client = dict(states[min(_rank(), saved_world - 1)])
        client.update(saved_world_size=saved_world, client_states=states)
        return client


def _group_names(engine: Any) -> list[str]:
    return [str(g.get("name", i)) for i, g in enumerate(_base_optimizer(engine).param_groups)]


def _groups_changed(engine: Any, saved: Optional[list[str]]) -> bool:
    """Whether the checkpoint's optimizer groups differ from ``engine``'s. A checkpoint without the record (written
    before it was kept) had this run's groups, except under ZeRO-3, where every group used to be ``.no_decay``."""
    if not hasattr(engine, "optimizer"):
        return False
    mine = _group_names(engine)
    if saved is None:
        zero3 = any(hasattr(p, "ds_id") for p in engine.module.parameters())
        return zero3 and any(not name.endswith(".no_decay") for name in mine)
    return list(saved) != mine


# ---------------------------------------------------------------------------
# the consolidated trainable state (elastic resume)


def _trainable(engine: Any) -> list[tuple[str, Any]]:
    """The trainable parameters by name, sorted: the same order on every rank (each ZeRO-3 call is a collective)."""
    return sorted(((n, p) for n, p in engine.module.named_parameters() if p.requires_grad), key=lambda item: item[0])


def _base_optimizer(engine: Any) -> Any:
    optimizer = engine.optimizer
    return getattr(optimizer, "optimizer", optimizer)  # DeepSpeed's ZeRO/bf16 wrappers hold torch's optimizer here


def _optimizer_step(engine: Any) -> Optional[int]:
    """Adam's step count (the bias correction), the same in every state entry of the base optimizer."""
    for state in _base_optimizer(engine).state.values():
        if "step" in state:
            return int(state["step"])
    for group in _base_optimizer(engine).param_groups:  # DeepSpeed's fused Adam counts in the group
        if "step" in group:
            return int(group["step"])
    return None


def gather_trainable_state(engine: Any) -> dict:
    """Every trainable parameter's fp32 master and Adam moments, whole, on every rank (collective), with the step
    count and the LR scheduler: a state that does not depend on the world size."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    params, moments = {}, {k: {} for k in OPTIMIZER_KEYS}
    plain = _base_optimizer(engine).state
    _link_optimizer_fragments(engine)  # torch's AdamW creates its state after DeepSpeed mapped the fragments
    for name, param in _trainable(engine):
        full = safe_get_full_fp32_param(param)
        params[name] = (full if full is not None else param.detach()).float().cpu().clone()
        for key in OPTIMIZER_KEYS:
            value = safe_get_full_optimizer_state(param, key)
            if value is None and param in plain and key in plain[param]:  # no ZeRO, fp32: torch's own state
                value = plain[param][key]
            if value is not None:
                moments[key][name] = value.float().cpu().clone().reshape(params[name].shape)
    scheduler = getattr(engine, "lr_scheduler", None)
    return {
        "version": 1,
        "world_size": _world_size(),
        "params": params,
        "optimizer": moments,
        "optimizer_step": _optimizer_step(engine),
        "global_steps": int(getattr(engine, "global_steps", 0)),
        "global_samples": int(getattr(engine, "global_samples", 0)),
        "lr_scheduler": scheduler.state_dict() if scheduler is not None else None,
    }


def _ensure_adam_state(engine: Any) -> None:
    """Create Adam's state where a fresh optimizer has none yet (torch and DeepSpeed create it at the first step,
    and only where it is empty), so the saved moments have somewhere to go.

    The tensors it is keyed by: the base optimizer's parameters (no ZeRO, ZeRO-1/2's flat fp32 partitions) and
    ZeRO-3's flat fp32 partitions, which DeepSpeed puts into the base optimizer's groups only during its step.
    """
    import torch

    optimizer = _base_optimizer(engine)
    amsgrad = any(group.get("amsgrad") for group in optimizer.param_groups)
    tensors = [p for group in optimizer.param_groups for p in group["params"]]
    tensors += list(getattr(engine.optimizer, "fp32_partitioned_groups_flat", []) or [])
    for p in tensors:
        if not optimizer.state.get(p):
            entry = {"step": torch.tensor(0.0), "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
                     "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format)}
            if amsgrad:
                entry["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            optimizer.state[p] = entry
    _link_optimizer_fragments(engine)


def _link_optimizer_fragments(engine: Any) -> None:
    """Point ZeRO-1/2's per-parameter views at the optimizer's flat state (see below); no-op elsewhere."""
    optimizer = _base_optimizer(engine)
    # ZeRO-1/2 (and DeepSpeed's bf16 optimizer) map each parameter to views of the flat state when the engine is
    # built; a state created later (torch's AdamW at its first step, or here) must be mapped too, or
    # safe_get/set_full_optimizer_state find no fragment.
    wrapper = engine.optimizer
    flats = getattr(wrapper, "single_partition_of_fp32_groups", None) or getattr(wrapper, "fp32_groups_flat_partition", None) or []
    lows = getattr(wrapper, "bit16_groups", None) or getattr(wrapper, "bf16_groups", None) or []
    for flat, params in zip(flats, lows):
        for lp in params:
            if getattr(lp, "_hp_mapping", None) is not None and flat in optimizer.state:
                lp._hp_mapping.set_optim_state_fragment(flat, optimizer.state[flat])


def _set_zero3_partition(param: Any, value: Any, key: Optional[str] = None) -> None:
    """This rank's slice of a whole fp32 tensor into ZeRO-3's fp32 partition (the master weight, or an Adam moment).

    DeepSpeed 0.19's ``safe_set_full_fp32_param``/``safe_set_full_optimizer_state`` slice the unpadded value with the
    padded partition size, which fails on the last ranks whenever a parameter's size is not a multiple of the world
    size (a [1] temperature on 3 ranks). Same private calls, with the slice clipped to what exists (no NVMe swap).
    """
    optimizer = param._z3_optimizer
    part, _ = optimizer._get_fp32_opt_state_partition(param, release_swap_buffers=False, optim_state_key=key)
    start = optimizer._get_param_partition_rank(param) * param.ds_tensor.ds_numel
    piece = value.flatten()[start : start + part.numel()]
    part.data[: piece.numel()].copy_(piece.to(part.device, part.dtype))


def load_trainable_state(engine: Any, state: dict, *, source: Any = TRAINABLE_STATE) -> None:
    """Put a :func:`gather_trainable_state` result into a freshly built engine of any world size (collective).

    The fp32 masters and moments go into this rank's ZeRO partitions, the
    compute copy of each weight is overwritten too (under ZeRO-3 through a
    gather that rank 0 modifies), and the step count and scheduler follow.
    """
    import torch
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    trainable = _trainable(engine)
    names = [n for n, _ in trainable]
    missing, unknown = sorted(set(names) - set(state["params"])), sorted(set(state["params"]) - set(names))
    if missing or unknown:
        raise CheckpointError(f"{source}: trainable parameters differ from this model's (missing {missing[:5]}, unknown "
                              f"{unknown[:5]}): the checkpoint belongs to another model or freezing setup")
    _ensure_adam_state(engine)
    plain = _base_optimizer(engine).state
    for name, param in trainable:
        value = state["params"][name]
        shape = tuple(getattr(param, "ds_shape", param.shape))
        if tuple(value.shape) != shape:
            raise CheckpointError(f"{source}: {name} has shape {tuple(value.shape)}, this model's is {shape}")
        device = engine.device
        if hasattr(param, "ds_id"):
            _set_zero3_partition(param, value)
        else:
            safe_set_full_fp32_param(param, value.to(device))
        for key in OPTIMIZER_KEYS:
            moment = state["optimizer"][key].get(name)
            if moment is None:
                continue
            if hasattr(param, "ds_id"):
                _set_zero3_partition(param, moment, key)
            elif hasattr(param, "_hp_mapping"):
                safe_set_full_optimizer_state(param, moment.to(device), key)
            elif param in plain and key in plain[param]:
                plain[param][key].copy_(moment.to(plain[param][key].device))
        if hasattr(param, "ds_id"):  # ZeRO-3: the partitioned compute copy
            import deepspeed

            with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
                if _rank() == 0:
                    with torch.no_grad():
                        param.data.copy_(value.to(param.device, param.dtype))
        else:
            with torch.no_grad():
                param.data.copy_(value.to(param.device, param.dtype))
    step = state.get("optimizer_step")
    if step is not None:
        optimizer = _base_optimizer(engine)
        for entry in optimizer.state.values():
            if "step" in entry:
                entry["step"] = torch.full_like(entry["step"], step) if torch.is_tensor(entry["step"]) else step
        for group in optimizer.param_groups:
            if "step" in group:
                group["step"] = step
    scheduler = getattr(engine, "lr_scheduler", None)
    if scheduler is not None and state.get("lr_scheduler") is not None:
        saved = dict(state["lr_scheduler"])
        groups = getattr(scheduler, "optimizer", engine.optimizer).param_groups
        if len(saved.get("base_lrs", groups)) != len(groups) and hasattr(scheduler, "lr_lambdas"):  # other groups: this run's base lrs
            saved.pop("base_lrs", None)
            saved.pop("_last_lr", None)
            scheduler.load_state_dict(saved)
            scheduler._last_lr = [base * fn(scheduler.last_epoch) for fn, base in zip(scheduler.lr_lambdas, scheduler.base_lrs)]
        else:
            scheduler.load_state_dict(saved)
        # the optimizer's groups carry the lr of the step to come (DeepSpeed's own load restores them from its files)
        for group, lr in zip(getattr(scheduler, "optimizer", engine.optimizer).param_groups, scheduler.get_last_lr()):
            group["lr"] = lr
    engine.global_steps = int(state.get("global_steps", 0))
    engine.global_samples = int(state.get("global_samples", 0))


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
