"""What a run reports: the metrics file, TensorBoard/W&B, the progress bar, throughput and MFU, the parameter table.

Only rank 0 writes or prints; every other rank gets a logger whose methods do
nothing, so the trainer never branches on the rank to log.

MFU is an estimate in the usual "6N / 4N" style: per processed token a
trainable parameter costs 6 FLOPs (forward, activation gradient, weight
gradient), a frozen parameter that the gradient flows through (the LLM in
stage 2) costs 4 (no weight gradient), and a frozen parameter only run forward
(the vision encoder, the frozen text encoder in stage 1) costs 2. Attention's
quadratic term and recomputation (gradient checkpointing) are not counted.
The peak is ``log.peak_flops`` or, if unset, a short matmul measured on this
device at start.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any, Optional

from mmdist.atomic import write_text_atomic

__all__ = [
    "MetricsLogger",
    "Throughput",
    "count_parameters",
    "flops_per_token",
    "measure_peak_flops",
]


def _numel(p: Any) -> int:
    # Under ZeRO-3 a partitioned parameter's .numel() is 0; DeepSpeed keeps the full size in ds_numel.
    return int(getattr(p, "ds_numel", p.numel()))


def count_parameters(model: Any) -> dict[str, int]:
    """Total, trainable and frozen parameter counts (ZeRO-3 aware)."""
    total = trainable = 0
    for p in model.parameters():
        n = _numel(p)
        total += n
        trainable += n if p.requires_grad else 0
    return {"total": total, "trainable": trainable, "frozen": total - trainable}


def flops_per_token(model: Any, stage: str) -> float:
    """Training FLOPs per token (see the module doc): 6 x trainable + (4 or 2) x frozen parameters."""
    counts = count_parameters(model)
    frozen_factor = 4.0 if stage == "fuse" else 2.0
    return 6.0 * counts["trainable"] + frozen_factor * counts["frozen"]


def measure_peak_flops(dtype: str = "fp32", size: int = 1024, repeats: int = 3) -> float:
    """FLOP/s of a square matmul on this device (a practical peak for MFU when none is configured)."""
    import torch

    device = "cuda" if torch.cuda.is_available() and os.environ.get("DS_ACCELERATOR", "") != "cpu" else "cpu"
    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    if device == "cpu":
        torch_dtype = torch.float32  # CPU half-precision matmuls are emulated and would understate the peak
    # A private generator: the run's RNG (restored on resume, driving dropout) must not move.
    generator = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(size, size, device=device, dtype=torch_dtype, generator=generator)
    b = torch.randn(size, size, device=device, dtype=torch_dtype, generator=generator)
    a @ b  # warm-up
    best = math.inf
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        a @ b
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return 2.0 * size**3 / max(best, 1e-9)


class Throughput:
    """Samples/s, tokens/s and MFU over a sliding window of steps, and the ETA."""

    def __init__(self, flops_per_token: float, peak_flops_total: float, total_steps: int, start_step: int = 0, window: int = 20):
        self.flops_per_token = flops_per_token
        self.peak = peak_flops_total
        self.total_steps = total_steps
        self.window = window
        self.history: list[tuple[float, int, int, int]] = [(time.perf_counter(), start_step, 0, 0)]
        self.samples = 0
        self.tokens = 0

    def update(self, step: int, samples: int, tokens: int) -> dict[str, float]:
        self.samples += samples
        self.tokens += tokens
        self.history.append((time.perf_counter(), step, self.samples, self.tokens))
        self.history = self.history[-(self.window + 1):]
        t0, s0, n0, k0 = self.history[0]
        t1, s1, n1, k1 = self.history[-1]
        dt = max(t1 - t0, 1e-9)
        tokens_per_s = (k1 - k0) / dt
        steps_per_s = (s1 - s0) / dt
        remaining = max(self.total_steps - step, 0)
        return {
            "samples_per_s": (n1 - n0) / dt,
            "tokens_per_s": tokens_per_s,
            "mfu": tokens_per_s * self.flops_per_token / self.peak if self.peak > 0 else 0.0,
            "eta_s": remaining / steps_per_s if steps_per_s > 0 else float("inf"),
        }


def drop_records_after(path: Path, step: int) -> int:
    """Remove records of steps after ``step`` from a metrics.jsonl (atomically); returns how many.

    A run that crashed after its last checkpoint logged steps that the resumed run
    trains again: without this they would appear twice in the file.
    """
    if not path.is_file():
        return 0
    kept, dropped = [], 0
    for line in path.read_text().splitlines():
        try:
            later = int(json.loads(line).get("step", 0)) > step
        except (ValueError, TypeError, AttributeError):
            later = False  # keep lines we cannot read rather than lose them
        if later:
            dropped += 1
        else:
            kept.append(line)
    if dropped:
        write_text_atomic(path, "".join(line + "\n" for line in kept))
    return dropped


class MetricsLogger:
    """metrics.jsonl (+ TensorBoard, + W&B) and the tqdm bar, on rank 0 only."""

    def __init__(self, run_dir: str | os.PathLike, log_cfg: Any, *, enabled: bool, total_steps: int, initial_step: int = 0, run_name: str = "run", config: Optional[dict] = None):
        self.enabled = enabled
        self.bar = None
        self.tb = None
        self.wandb = None
        self.file = None
        if not enabled:
            return
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        drop_records_after(run_dir / "metrics.jsonl", initial_step)
        self.file = open(run_dir / "metrics.jsonl", "a")
        if log_cfg.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(run_dir / "tb"))
            except ImportError as exc:
                print(f"[mmdist] TensorBoard logging off: {exc}")
        if log_cfg.wandb:
            try:
                import wandb

                self.wandb = wandb.init(project="mmdist", name=run_name, dir=str(run_dir), config=config or {}, resume="allow")
            except Exception as exc:  # not installed, not logged in, offline
                print(f"[mmdist] W&B logging off: {exc}")
        if log_cfg.progress_bar:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total_steps, initial=initial_step, desc=run_name, dynamic_ncols=True)

    def log(self, step: int, values: dict[str, Any], prefix: str = "train") -> None:
        if not self.enabled:
            return
        record = {"step": step, "split": prefix, "time": time.time()}
        record.update({k: _plain(v) for k, v in values.items()})
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        numeric = {f"{prefix}/{k}": v for k, v in record.items() if k not in ("step", "split", "time") and isinstance(v, (int, float)) and math.isfinite(v)}
        if self.tb is not None:
            for key, value in numeric.items():
                self.tb.add_scalar(key, value, step)
        if self.wandb is not None:
            self.wandb.log(numeric, step=step)

    def progress(self, step: int, values: dict[str, float]) -> None:
        if self.bar is None:
            return
        self.bar.n = step
        shown = {}
        for key, fmt in (("loss", "{:.4f}"), ("lr", "{:.2e}"), ("samples_per_s", "{:.1f}"), ("tokens_per_s", "{:.0f}"), ("mfu", "{:.1%}")):
            if key in values and isinstance(values[key], (int, float)) and math.isfinite(values[key]):
                shown[key.replace("_per_s", "/s")] = fmt.format(values[key])
        if "eta_s" in values and math.isfinite(values["eta_s"]):
            shown["eta"] = time.strftime("%H:%M:%S", time.gmtime(values["eta_s"]))
        self.bar.set_postfix(shown, refresh=False)
        self.bar.refresh()

    def print(self, text: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()
        if self.file is not None:
            self.file.close()
        self.bar = self.tb = self.wandb = self.file = None


def _plain(value: Any) -> Any:
    if hasattr(value, "item") and getattr(value, "numel", lambda: 1)() == 1:
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/inf
    return value
