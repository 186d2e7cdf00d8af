"""What a run reports: the metrics file, TensorBoard/W&B, the progress bar, throughput and MFU, the parameter table.

Only rank 0 writes or prints; every other rank gets a logger whose methods do
nothing, so the trainer never branches on the rank to log.

MFU counts the FLOPs that run, as the model counts them
(:meth:`~mmdist.models.contract.TrainableModel.flop_count`, from module shapes by
mmdist.models.flops: 6 per trainable weight, 4 per frozen weight the gradient flows
through, 2 per weight only run forward, each part at the positions where it runs;
attention's score products and recomputation under gradient checkpointing are not
counted). Each part's FLOPs are divided by the peak of the dtype it computes in: a
step's MFU is the time its FLOPs would take at those peaks over the time it took, so a
stage-1 run with a trainable fp32 Q-Former under frozen bf16 towers is measured against
both peaks, each for its own share. With one peak (``log.peak_flops``) every dtype is
measured against it.
The peaks are ``log.peak_flops`` or, if unset, the datasheet's or a short matmul
measured on this device at start (mmdist.hardware.peak_flops), one per dtype. A
measured peak is a lower bound (a shared machine's other work only slows the probe:
on a 2-core VM two probes of one demo gave 0.091 and 0.178 TFLOP/s), so when a
window's MFU passes 100% the probe is repeated, longer, and the higher peak kept
(:class:`Throughput`, at most twice a run).
The reported throughput leaves out the first :data:`WARMUP_STEPS` step(s) of a run
(compilation, allocator growth, the first gathers): a record says
from which step its window counts (``mfu_steady_from_step``).
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Optional

from mmdist.atomic import write_text_atomic
from mmdist.models.flops import FlopCount
from mmdist.training.settings import LogConfig

__all__ = [
    "WARMUP_STEPS",
    "BalanceSummary",
    "FlopCount",
    "MetricsLogger",
    "Throughput",
    "count_parameters",
]


#: Steps at the start of a run (and of a resumed run) left out of tokens/s and MFU: not steady state.
WARMUP_STEPS = 1


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


class Throughput:
    """Samples/s, tokens/s and MFU over a sliding window of steady steps, and the ETA.

    ``peak_flops_total`` is one peak FLOP/s (every rank's together) for all FLOPs, or one per dtype
    (``{"bf16": ..., "fp32": ...}``) covering every dtype of ``flops.by_dtype()``: MFU is then the time each
    dtype's FLOPs would take at its own peak, summed, over the time the steps took (see the module doc).
    The first ``warmup_steps`` steps after ``start_step`` are not steady (compilation,
    allocator growth, the first ZeRO gathers): they only move the window's start, and
    their records carry the ETA alone. Later records say where the window may start
    (``mfu_steady_from_step``) and how many steps it spans (``throughput_window_steps``).
    """

    def __init__(self, flops_per_token: float | FlopCount, peak_flops_total: float | Mapping[str, float],
                 total_steps: int, start_step: int = 0, window: int = 20, warmup_steps: int = 0,
                 remeasure: Optional[Callable[[], float | Mapping[str, float]]] = None, remeasures: int = 2):
        self.flops = flops_per_token if isinstance(flops_per_token, FlopCount) else FlopCount(float(flops_per_token))
        self.peak = peak_flops_total
        self._shares = _peak_shares(self.flops, peak_flops_total)
        self.total_steps = total_steps
        self.window = window
        self.steady_from = start_step + warmup_steps + 1
        self.started = time.perf_counter()
        self.start_step = start_step
        self.samples = 0
        self.tokens = 0
        self.share_flops = [0.0] * len(self._shares)  # the FLOPs done so far, per peak they are measured against
        self.history: list[tuple[float, int, int, int, tuple[float, ...]]] = [
            (self.started, start_step, 0, 0, tuple(self.share_flops))
        ]
        # A measured peak (a matmul probe) is a lower bound of the device's: a shared machine's other work only slows
        # the probe. When a window outruns it, the probe ran slow, and ``remeasure`` (at most ``remeasures`` times)
        # gives new peaks, each kept where higher (:meth:`raise_peaks`). A datasheet or configured peak is not
        # remeasured: a window above it is shown as it is, since it can only mean the FLOPs are over-counted.
        self.remeasure = remeasure
        self.remeasures_left = remeasures if remeasure is not None else 0

    def raise_peaks(self, peaks: float | Mapping[str, float]) -> bool:
        """Keep each peak at the higher of its own and ``peaks``' (one for every dtype, or one per dtype); the
        steps already in the window are measured against the new peaks too. Whether any rose."""
        new = _peak_shares(self.flops, peaks) if self._shares else []
        if len(new) != len(self._shares):
            raise ValueError(f"Throughput.raise_peaks: {peaks!r} covers other dtypes than the peaks it replaces")
        raised = [max(old, fresh) for (_, old), (_, fresh) in zip(self._shares, new)]
        if raised == [peak for _, peak in self._shares]:
            return False
        self._shares = [(part, peak) for (part, _), peak in zip(self._shares, raised)]
        if isinstance(self.peak, Mapping):
            dtypes = list(self.flops.by_dtype())
            self.peak = {**self.peak, **dict(zip(dtypes, raised))}
        else:
            self.peak = raised[0]
        return True

    def update(self, step: int, samples: int, tokens: int, supervised_tokens: int = 0, image_tokens: int = 0,
               images: int = 0) -> dict[str, float]:
        """Add one step; the counts feed every rate of the FlopCount (``samples`` its per-sample rate too)."""
        self.samples += samples
        self.tokens += tokens
        for i, (part, _) in enumerate(self._shares):
            self.share_flops[i] += part.step(tokens, supervised_tokens, image_tokens, images, samples)
        now = time.perf_counter()
        if step < self.steady_from:  # warm-up: the steady window starts after this step
            self.history = [(now, step, self.samples, self.tokens, tuple(self.share_flops))]
            per_step = (now - self.started) / max(step - self.start_step, 1)
            return {"eta_s": max(self.total_steps - step, 0) * per_step}
        self.history.append((now, step, self.samples, self.tokens, tuple(self.share_flops)))
        self.history = self.history[-(self.window + 1):]
        rates = self._rates(step)
        while rates["mfu"] > 1.0 and self.remeasures_left > 0:
            self.remeasures_left -= 1
            paused = time.perf_counter()
            fresh = self.remeasure()
            # the probe's time is not the steps': the window (and the ETA's start) moves past it
            spent = time.perf_counter() - paused
            self.history = [(t + spent, *rest) for t, *rest in self.history]
            self.started += spent
            if self.raise_peaks(fresh):
                rates = self._rates(step)
        return rates

    def _rates(self, step: int) -> dict[str, float]:
        """The window's rates, after ``step``."""
        t0, s0, n0, k0, f0 = self.history[0]
        t1, s1, n1, k1, f1 = self.history[-1]
        dt = max(t1 - t0, 1e-9)
        steps_per_s = (s1 - s0) / dt
        remaining = max(self.total_steps - step, 0)
        peak_seconds = sum((b - a) / peak for a, b, (_, peak) in zip(f0, f1, self._shares))
        return {
            "samples_per_s": (n1 - n0) / dt,
            "tokens_per_s": (k1 - k0) / dt,
            "mfu": peak_seconds / dt,
            "eta_s": remaining / steps_per_s if steps_per_s > 0 else float("inf"),
            "mfu_steady_from_step": self.steady_from,
            "throughput_window_steps": s1 - s0,
        }


def _peak_shares(flops: FlopCount, peak: float | Mapping[str, float]) -> list[tuple[FlopCount, float]]:
    """(FLOPs, the peak they are measured against) per dtype; none when the peak is 0 (ranks that report no MFU)."""
    if not isinstance(peak, Mapping):
        return [(flops, float(peak))] if peak > 0 else []
    parts = flops.by_dtype()
    missing = sorted(d or "(no dtype)" for d in parts if not peak.get(d))
    if missing:
        raise ValueError(f"Throughput: no peak FLOP/s for {', '.join(missing)}; the model's FLOPs compute in "
                         f"{', '.join(d or '(no dtype)' for d in parts)} and the peaks given cover {', '.join(peak)}")
    return [(part, float(peak[d])) for d, part in parts.items()]


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

    def __init__(
        self,
        run_dir: str | os.PathLike,
        log_cfg: LogConfig,
        *,
        enabled: bool,
        total_steps: int,
        initial_step: int = 0,
        run_name: str = "run",
        config: Optional[dict] = None,
    ):
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

                self.wandb = wandb.init(
                    project="mmdist", name=run_name, dir=str(run_dir), config=config or {}, resume="allow"
                )
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
        numeric = {
            f"{prefix}/{k}": v
            for k, v in record.items()
            if k not in ("step", "split", "time") and isinstance(v, (int, float)) and math.isfinite(v)
        }
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
        for key, fmt in (
            ("loss", "{:.4f}"),
            ("lr", "{:.2e}"),
            ("samples_per_s", "{:.1f}"),
            ("tokens_per_s", "{:.0f}"),
            ("mfu", "{:.1%}"),
        ):
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


class BalanceSummary:
    """How even the ranks' work was over a run: per-rank cost max/mean of the steps (from the loader's split) and the
    seconds ranks waited for each other at the step's all-reduces (from train_step), for the end-of-run summary."""

    def __init__(self) -> None:
        self.steps = 0
        self.imbalance: list[float] = []
        self.wait = 0.0
        self.wait_max = 0.0

    def add(self, record: dict) -> None:
        self.steps += 1
        if "cost_imbalance" in record:
            self.imbalance.append(float(record["cost_imbalance"]))
        self.wait += float(record.get("allreduce_wait_s", 0.0))
        self.wait_max += float(record.get("allreduce_wait_max_s", 0.0))

    def summary(self) -> dict:
        out = {"steps": self.steps, "allreduce_wait_s_per_step": self.wait / max(self.steps, 1),
               "allreduce_wait_max_s_per_step": self.wait_max / max(self.steps, 1)}
        if self.imbalance:
            out.update(
                cost_imbalance_mean=sum(self.imbalance) / len(self.imbalance), cost_imbalance_max=max(self.imbalance)
            )
        return out

    def line(self) -> str:
        s = self.summary()
        cost = (
            f"per-rank cost max/mean {s['cost_imbalance_mean']:.3f} "
            f"on average, {s['cost_imbalance_max']:.3f} at worst; "
            if self.imbalance
            else ""
        )
        return (f"{cost}ranks waited {s['allreduce_wait_s_per_step'] * 1e3:.1f} ms a step at the all-reduces "
                f"(mean over ranks; the longest-waiting rank {s['allreduce_wait_max_s_per_step'] * 1e3:.1f} ms), "
                f"over {self.steps} step(s)")
