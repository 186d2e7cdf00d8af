"""Benchmark 3: what a rank actually holds under DeepSpeed, for 1 and 2 ranks and ZeRO 0, 2, 3,
beside what ``mmdist plan`` predicts.

Each setting runs in fresh processes (``torchrun``, gloo, ``DS_ACCELERATOR=cpu``):
build the run's model through ``mmdist.training.engine.build_engine``, one
forward and backward (gradients measured here, before the step frees them), one
optimizer step (parameters and optimizer state measured after it), then peak RSS.
``run(..., fresh=False)`` runs every setting of one world size in one launch, one
after the other, each in a process group of its own: the byte counts are the same,
and a setting's peak RSS is the high-water mark since it began, on top of what the
earlier ones left (on CPU-B within 1 MiB of the fresh processes' for the six
default settings). tests/test_plan.py does so: most of a setting's time is its
processes' start-up (~15 s of imports and engine set-up against a step of 0.1 s).

What is counted, per rank, as bytes of distinct memory (overlapping views counted once):

* parameters: every module parameter's data plus, under ZeRO-3, its ``ds_tensor``
  partition; split into frozen (by dtype) and trainable;
* gradients: ``p.grad`` of the module's parameters and the ZeRO optimizer's
  gradient partitions (``averaged_gradients``, the fp32 partitions' ``.grad``,
  ZeRO-3's ``grad_partitions_flat_buffer``);
* optimizer: the base optimizer's state (Adam m, v) and the fp32 master
  copies (``single_partition_of_fp32_groups``, ``fp32_partitioned_groups_flat``, ZeRO-0 bf16's ``fp32_groups``)
  when they are not the module's own parameters;
* frozen parameters holding a gradient, and frozen parameters inside the
  optimizer: both must be 0.

Run: ``python benchmarks/memory_per_rank.py`` (the tiny fuse config), or
``--config configs/tiny_align.yaml``; ``--json FILE`` keeps the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from mmdist.launch_env import free_port
from mmdist.training.deepspeed_compat import zero_optimizer_tensors

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
DEFAULT_CONFIG = ROOT / "configs" / "tiny_fuse.yaml"
# Small buckets (the defaults are 5e8 elements) and no ZeRO-3 persistence threshold, so a tiny
# model is partitioned like a big one (parameters under the threshold would stay whole on every rank).
BENCH_OVERRIDES = [
    "engine.deepspeed={zero_optimization: {reduce_bucket_size: 500000, allgather_bucket_size: 500000, "
    "stage3_prefetch_bucket_size: 500000, stage3_param_persistence_threshold: 0}}",
    "model.llm.gradient_checkpointing=false", "train.lr_multipliers={}",
    "log.progress_bar=false", "log.tensorboard=false", "log.param_table=false",
]


# ---------------------------------------------------------------------------
# counting (inside a rank)


def _tensors(obj: Any, depth: int = 0) -> Iterable[Any]:
    import torch

    if depth > 4 or obj is None:
        return
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v, depth + 1)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors(v, depth + 1)


def union_bytes(tensors: Iterable[Any], exclude: Iterable[Any] = ()) -> int:
    """Bytes covered by ``tensors`` (overlapping views counted once), minus ranges covered by ``exclude``."""

    def intervals(ts: Iterable[Any]) -> list[tuple[int, int]]:
        out = []
        for t in ts:
            n = t.numel() * t.element_size()
            if n and t.device.type != "meta":
                out.append((t.data_ptr(), t.data_ptr() + n))
        out.sort()
        merged: list[list[int]] = []
        for a, b in out:
            if merged and a <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], b)
            else:
                merged.append([a, b])
        return [(a, b) for a, b in merged]

    keep = intervals(tensors)
    drop = intervals(exclude)
    total = 0
    for a, b in keep:
        size = b - a
        for c, d in drop:
            lo, hi = max(a, c), min(b, d)
            if lo < hi:
                size -= hi - lo
        total += max(0, size)
    return total


def _param_tensors(p: Any) -> list[Any]:
    out = [p.data]
    if hasattr(p, "ds_tensor") and p.ds_tensor is not None:
        out.append(p.ds_tensor)
    return out


def count_params(model: Any) -> dict:
    frozen: dict[str, int] = {}
    trainable: list[Any] = []
    for p in {id(p): p for p in model.parameters()}.values():
        if p.requires_grad:
            trainable += _param_tensors(p)
        else:
            name = (
                str(p.dtype)
                .replace("torch.", "")
                .replace("float32", "fp32")
                .replace("bfloat16", "bf16")
                .replace("float16", "fp16")
            )
            frozen[name] = frozen.get(name, 0) + union_bytes(_param_tensors(p))
    return {"frozen": frozen, "trainable": union_bytes(trainable)}


def count_grads(model: Any, optimizer: Any) -> int:
    tensors = [p.grad for p in model.parameters() if p.grad is not None]
    for value in zero_optimizer_tensors(optimizer, "gradients"):
        tensors += list(_tensors(value))
    for value in zero_optimizer_tensors(optimizer, "fp32_partitions"):
        tensors += [t.grad for t in _tensors(value) if t.grad is not None]
    return union_bytes(tensors)


def count_optimizer(model: Any, optimizer: Any) -> int:
    base = getattr(optimizer, "optimizer", optimizer)
    tensors = list(_tensors(list(base.state.values())))
    for value in zero_optimizer_tensors(optimizer, "fp32_partitions") + zero_optimizer_tensors(optimizer, "fp32_whole"):
        tensors += list(_tensors(value))
    own = [t for p in model.parameters() for t in _param_tensors(p)]
    return union_bytes(tensors, exclude=own)


def frozen_in_optimizer(model: Any, optimizer: Any) -> int:
    """Frozen parameters that the optimizer (or ZeRO's low-precision groups) holds."""
    frozen = {id(p) for p in model.parameters() if not p.requires_grad}
    held = set()
    for value in zero_optimizer_tensors(optimizer, "low_precision"):
        held |= {id(t) for t in _tensors(value)}
    base = getattr(optimizer, "optimizer", optimizer)
    held |= {id(p) for g in base.param_groups for p in g["params"]}
    held |= {id(p) for p in base.state}
    return len(frozen & held)


def _batch(model: Any, samples: int, seed: int = 0) -> dict:
    """A fuse-stage micro-batch of ``samples`` image-question-answer samples (mmdist's collate, padded)."""
    import random

    import torch

    from mmdist.data.collate import collate_fuse

    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    size = model.vision.image_size
    vocab = 200
    out = []
    for _ in range(samples):
        prompt = [rng.randrange(vocab) for _ in range(4)]
        answer = [rng.randrange(vocab) for _ in range(rng.randint(4, 16))]
        ids = prompt + [model.image_token_id] * model.num_image_tokens + answer
        labels = [-100] * (len(ids) - len(answer)) + answer
        out.append({"input_ids": ids, "labels": labels, "pixel_values": [torch.randn(3, size, size, generator=gen)]})
    return collate_fuse(out, pad_token_id=0)


def _reset_peak_rss() -> None:
    """Start the process's RSS high-water mark (VmHWM) afresh, where Linux allows it."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def _peak_rss() -> int:
    """Bytes: the high-water mark since :func:`_reset_peak_rss` (Linux), else the process's peak."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def measure_one(config: str, overrides: list[str], rank: int) -> dict:
    """One setting on this rank: build, one optimizer step (grads counted before it; params and optimizer after it)."""
    from mmdist.config.run import load_config
    from mmdist.training.engine import build_engine

    _reset_peak_rss()
    bundle = None
    try:
        cfg = load_config(config, overrides)
        bundle = build_engine(cfg)
        engine, model = bundle.engine, bundle.model
        if not cfg.stage.builds("llm"):
            raise SystemExit("memory_per_rank measures the fuse stage (stage 2); give a fuse config")
        engine.train()
        accumulation = bundle.ds_config["gradient_accumulation_steps"]
        for micro in range(accumulation):  # one whole optimizer step, so the optimizer state exists
            batch = _batch(model, cfg.train.micro_batch_size, seed=rank * 100 + micro)
            out = engine(batch)
            engine.backward(out["loss"])
            if micro == accumulation - 1:  # gradients are complete here and freed by the step
                grads = count_grads(model, engine.optimizer)
                frozen_with_grad = sum(1 for p in model.parameters() if not p.requires_grad and p.grad is not None)
            engine.step()
        params = count_params(model)
        return {
            "zero_stage": cfg.engine.zero_stage, "frozen": params["frozen"],
            # the engine's, as resolved (a recipe may say auto)
            "precision": next((k for k in ("bf16", "fp16") if bundle.ds_config.get(k, {}).get("enabled")), "fp32"),
            "trainable": params["trainable"], "gradients": grads, "optimizer": count_optimizer(model, engine.optimizer),
            "frozen_with_grad": frozen_with_grad, "frozen_in_optimizer": frozen_in_optimizer(model, engine.optimizer),
            "peak_rss": _peak_rss(), "loss": float(out["loss"]),
        }
    finally:
        if bundle is not None:
            bundle.close()


def worker(config: str, settings: list[list[str]], out_dir: str) -> None:
    """One rank: each setting (a list of overrides) in turn; ``rank{R}-{I}.json`` per setting."""
    import torch.distributed as tdist

    from mmdist import distributed as dist

    try:
        for i, overrides in enumerate(settings):
            if i:  # closing the last engine destroyed the process group; a new env:// group on torchrun's store
                # after an engine had trained hung here (CPU-B, gloo), so the next group meets in a file of its own
                tdist.init_process_group("gloo", init_method=f"file://{Path(out_dir, f'group{i}')}",
                                         rank=int(os.environ["RANK"]), world_size=int(os.environ["WORLD_SIZE"]))
            env = dist.init(backend="gloo")  # the first setting's group; later, the one above
            result = measure_one(config, overrides, env.rank)
            result.update(rank=env.rank, world_size=env.world_size)
            Path(out_dir, f"rank{env.rank}-{i}.json").write_text(json.dumps(result))
    finally:
        dist.shutdown()


# ---------------------------------------------------------------------------
# driver


def _overrides(zero_stage: int, extra: Iterable[str]) -> list[str]:
    return BENCH_OVERRIDES + [f"engine.zero_stage={zero_stage}"] + list(extra)


def measure(config: str, ranks: int, settings: list[tuple[int, list[str]]], timeout: int = 600) -> list[list[dict]]:
    """Launch ``ranks`` processes with torchrun for ``settings`` ((ZeRO stage, extra overrides) each, run in turn);
    per setting, the per-rank figures."""
    with tempfile.TemporaryDirectory() as tmp:
        listed = [_overrides(stage, extra) + [f"run_dir={tmp}/run{i}"] for i, (stage, extra) in enumerate(settings)]
        Path(tmp, "settings.json").write_text(json.dumps(listed))
        env = dict(
            os.environ,
            DS_ACCELERATOR="cpu",
            OMP_NUM_THREADS="1",
            PYTHONPATH=f"{ROOT}:{os.environ.get('PYTHONPATH', '')}",
        )
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={ranks}", "--master_addr=127.0.0.1",
               f"--master_port={free_port()}", str(Path(__file__).resolve()), "--worker", "--config", config,
               "--out", tmp]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
        results = [[json.loads(Path(tmp, f"rank{r}-{i}.json").read_text()) for r in range(ranks)
                    if Path(tmp, f"rank{r}-{i}.json").exists()] for i in range(len(settings))]
        if proc.returncode or any(len(per_rank) != ranks for per_rank in results):
            raise RuntimeError(
                f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
            )
    return results


def predicted(config: str, ranks: int, zero_stage: int, extra: list[str] = ()) -> dict:
    """What ``mmdist plan`` predicts for the same config and setting (per rank)."""
    from mmdist import plan
    from mmdist.config.run import load_config
    from mmdist.precision import concrete

    # the dtypes the measured engines resolved on this CPU (the recipe's auto included)
    cfg = concrete(load_config(config, _overrides(zero_stage, extra)), "cpu")
    shapes = plan.model_shapes(cfg)
    return plan.model_state_bytes(shapes, plan.Setting(zero_stage), ranks, cfg.engine.precision,
                                  plan.deepspeed_bucket_settings(cfg))


def run(
    config: str = str(DEFAULT_CONFIG),
    settings: Iterable[tuple] = ((1, 0), (2, 0), (1, 2), (2, 2), (1, 3), (2, 3)),
    extra: list[str] = (),
    fresh: bool = True,
) -> list[dict]:
    """One row per setting: ``(ranks, ZeRO stage)`` or ``(ranks, ZeRO stage, overrides)``, each with ``extra``.
    ``fresh``: every setting in its own processes; else one launch per world size runs its settings in turn."""
    wanted = [(s[0], s[1], [*extra, *(s[2] if len(s) > 2 else ())]) for s in settings]
    launches = [[i] for i in range(len(wanted))] if fresh else [
        [i for i, s in enumerate(wanted) if s[0] == ranks] for ranks in dict.fromkeys(s[0] for s in wanted)
    ]
    measured: dict[int, list[dict]] = {}
    for group in launches:
        ranks = wanted[group[0]][0]
        for i, per_rank in zip(group, measure(config, ranks, [wanted[i][1:] for i in group])):
            measured[i] = per_rank
    rows = []
    for i, (ranks, stage, overrides) in enumerate(wanted):
        pred = predicted(config, ranks, stage, overrides)
        m = max(measured[i], key=lambda r: sum(r["frozen"].values()))
        rows.append({
            "ranks": ranks, "zero": stage, "precision": m["precision"],
            "frozen B": sum(m["frozen"].values()), "pred frozen B": sum(pred["frozen"].values()),
            "trainable B": m["trainable"], "pred trainable B": pred["trainable"],
            "grads B": m["gradients"], "pred grads B": pred["gradients"],
            "optim B": m["optimizer"], "pred optim B": pred["optimizer"],
            "frozen w/ grad": max(r["frozen_with_grad"] for r in measured[i]),
            "frozen in optim": max(r["frozen_in_optimizer"] for r in measured[i]),
            "peak RSS MiB": max(r["peak_rss"] for r in measured[i]) / 2**20,
        })
    return rows


COLUMNS = ["ranks", "zero", "frozen B", "pred frozen B", "trainable B", "pred trainable B", "grads B", "pred grads B",
           "optim B", "pred optim B", "frozen w/ grad", "frozen in optim", "peak RSS MiB"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--config", default=str(DEFAULT_CONFIG))
    parser.add_argument("--json", help="also write the rows here")
    parser.add_argument("overrides", nargs="*")
    args, unknown = parser.parse_known_args()
    overrides = [a for a in args.overrides + unknown if not a.startswith("--local_rank")]
    if args.worker:
        worker(args.config, json.loads(Path(args.out, "settings.json").read_text()), args.out)
        return
    from common import format_table

    rows = run(args.config, extra=overrides)
    print(format_table(rows, COLUMNS))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
