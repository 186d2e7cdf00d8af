"""What a run reports: the metrics file, TensorBoard/W&B, the progress bar, throughput and MFU, the parameter table.

Only rank 0 writes or prints; every other rank gets a logger whose methods do
nothing, so the trainer never branches on the rank to log.

MFU is an estimate in the usual "6N / 4N" style: per processed token a
trainable parameter costs 6 FLOPs (forward, activation gradient, weight
gradient), a frozen parameter that the gradient flows through (the LLM in
stage 2) costs 4 (no weight gradient), and a frozen parameter only run forward
(the vision encoder, the frozen text encoder in stage 1) costs 2. Attention's
quadratic term and recomputation (gradient checkpointing) are not counted.
Only FLOPs that run are counted (:func:`flop_count`): in stage 2 the LM head
runs at supervised positions only (FusedVLM.token_losses), the vision tower,
stage-1 module and projector run on image tokens only, and an input embedding
not tied to the head is a lookup (no FLOPs). In stage 1 the vision tower runs per
image (its tokens), the text encoder per caption token, the heads or Q-Former
per image, and a part whose features come from the feature cache costs nothing.
Charging all of them at every token put MFU above 100%.
The peak is ``log.peak_flops`` or, if unset, a short matmul measured on this
device at start. The reported throughput leaves out the first
:data:`WARMUP_STEPS` step(s) of a run (compilation, allocator growth, the first
gathers): a record says from which step its window counts (``mfu_steady_from_step``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from pathlib import Path
from typing import Any, Optional

from mmdist.atomic import write_text_atomic
from mmdist.training.settings import LogConfig

__all__ = [
    "WARMUP_STEPS",
    "BalanceSummary",
    "FlopCount",
    "MetricsLogger",
    "Throughput",
    "count_parameters",
    "flop_count",
    "flops_per_token",
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


@dataclasses.dataclass(frozen=True)
class FlopCount:
    """Training FLOPs per processed token, per supervised (labelled) token, per image token and per image."""

    per_token: float
    per_supervised_token: float = 0.0
    per_image_token: float = 0.0
    per_image: float = 0.0

    def step(self, tokens: int, supervised_tokens: int = 0, image_tokens: int = 0, images: int = 0) -> float:
        return (self.per_token * tokens + self.per_supervised_token * supervised_tokens
                + self.per_image_token * image_tokens + self.per_image * images)


def flop_count(model: Any, stage: str, *, vision_runs: bool = True, text_runs: bool = True) -> FlopCount:
    """The FLOPs that run (see the module doc); ZeRO-3 aware.

    Stage 2 (a model with an ``llm``), by where each part runs:
      - only the weights of Linear and convolution layers count: biases, norms
        and embedding tables (lookups) do no matmul FLOPs;
      - the LLM's frozen body: 4 per weight at every token (6 where it trains);
      - its output head: 4 (6 if it trains) per *supervised* token only, as
        FusedVLM.token_losses computes it;
      - every part outside the LLM (vision tower, stage-1 module, projector)
        runs on the image tokens only, not on text: per *image token*, 4 per
        trainable weight (forward and weight gradient; the activation gradient
        is left out because the lowest trainable layer computes none) and 2 per
        frozen one (the gradient stops at the lowest trainable part); the vision
        tower costs nothing when the run reads a feature cache
        (``vision_runs=False``). A tower that sees more patches than the image
        tokens it hands on (pooling, a CLS token) is counted low, never high.
    Stage 1 (an :class:`~mmdist.models.align.AlignModel`), also by where each part runs:
      - the vision tower per *image*, once per token it computes (``vision.num_tokens``:
        the selected tokens, so a dropped CLS token is counted low): 2 per frozen
        weight, 6 per trainable one; nothing when the features are cached;
      - the text encoder per caption *token*: 2 per weight when frozen, 6 when it
        trains; nothing when its pooled features are cached (``text_runs=False``);
      - the heads / Q-Former per *image*, once: 4 per trainable weight, 2 per frozen
        one (a head applied to every vision token, or Q-Former queries, run more:
        counted low, never high).
    Any other model counts every parameter per token: 6 x trainable + (4 in stage 2,
    else 2) x frozen.
    """
    if stage == "align" and _is_align_model(model):
        return _align_flop_count(model, vision_runs=vision_runs, text_runs=text_runs)
    llm = getattr(model, "llm", None) if stage == "fuse" else None
    if llm is None:
        counts = count_parameters(model)
        return FlopCount(6.0 * counts["trainable"] + (4.0 if stage == "fuse" else 2.0) * counts["frozen"])
    head = llm.get_output_embeddings() if hasattr(llm, "get_output_embeddings") else None
    head_ids = {id(p) for p in head.parameters()} if head is not None else set()
    if getattr(llm.config, "final_logit_softcapping", None) or not hasattr(llm, "get_decoder"):
        head_ids = set()  # FusedVLM takes the full-logits path for these: the head runs at every token
    in_llm = {id(p) for p in llm.parameters()}
    vision = getattr(model, "vision", None)
    idle = {id(p) for p in vision.parameters()} if vision is not None and not vision_runs else set()
    per_token = per_supervised = per_image = 0.0
    for p in _matmul_weights(model):
        if id(p) in idle:
            continue
        n = _numel(p)
        if id(p) in in_llm:
            cost = (6.0 if p.requires_grad else 4.0) * n
            if id(p) in head_ids:
                per_supervised += cost
            else:
                per_token += cost
        else:
            per_image += (4.0 if p.requires_grad else 2.0) * n
    return FlopCount(per_token, per_supervised, per_image)


def _is_align_model(model: Any) -> bool:
    from mmdist.models.align import AlignModel

    return isinstance(model, AlignModel)


def _align_flop_count(model: Any, *, vision_runs: bool, text_runs: bool) -> FlopCount:
    """Stage 1's FLOPs by where each part runs (see :func:`flop_count`)."""
    in_vision = {id(p) for p in model.vision.parameters()}
    in_text = {id(p) for p in model.text.parameters()}
    text_trains = any(p.requires_grad for p in model.text.parameters())
    vision_tokens = int(model.vision.num_tokens)
    per_token = per_image = 0.0
    for p in _matmul_weights(model):
        n = _numel(p)
        if id(p) in in_vision:  # the tower first: a Q-Former never owns its weights
            if vision_runs or p.requires_grad:
                per_image += (6.0 if p.requires_grad else 2.0) * n * vision_tokens
        elif id(p) in in_text:  # the Q-Former's shared text side is the text encoder's: counted once, per token
            if text_runs or text_trains:
                per_token += (6.0 if p.requires_grad else 2.0) * n
        else:
            per_image += (4.0 if p.requires_grad else 2.0) * n
    return FlopCount(per_token=per_token, per_image=per_image)


def _matmul_weights(model: Any) -> list[Any]:
    """The weights of the model's Linear and convolution layers, once each: the parameters that do FLOPs.

    Biases, norms and embedding tables (a lookup, unless tied to the LM head,
    which is a Linear) do none worth counting. Module types, not shapes, decide:
    under ZeRO-3 a partitioned weight is empty.
    """
    from torch import nn

    seen: dict[int, Any] = {}
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.modules.conv._ConvNd)) or type(module).__name__ == "Conv1D":
            weight = getattr(module, "weight", None)
            if weight is not None:
                seen.setdefault(id(weight), weight)
    return list(seen.values())


def flops_per_token(model: Any, stage: str) -> float:
    """Training FLOPs per processed token, without those that run only at supervised tokens (see flop_count)."""
    return flop_count(model, stage).per_token


class Throughput:
    """Samples/s, tokens/s and MFU over a sliding window of steady steps, and the ETA.

    The first ``warmup_steps`` steps after ``start_step`` are not steady (compilation,
    allocator growth, the first ZeRO gathers): they only move the window's start, and
    their records carry the ETA alone. Later records say where the window may start
    (``mfu_steady_from_step``) and how many steps it spans (``throughput_window_steps``).
    """

    def __init__(self, flops_per_token: float | FlopCount, peak_flops_total: float, total_steps: int, start_step: int = 0,
                 window: int = 20, warmup_steps: int = 0):
        self.flops = flops_per_token if isinstance(flops_per_token, FlopCount) else FlopCount(float(flops_per_token))
        self.peak = peak_flops_total
        self.total_steps = total_steps
        self.window = window
        self.steady_from = start_step + warmup_steps + 1
        self.started = time.perf_counter()
        self.start_step = start_step
        self.history: list[tuple[float, int, int, int, float]] = [(self.started, start_step, 0, 0, 0.0)]
        self.samples = 0
        self.tokens = 0
        self.flops_done = 0.0

    def update(self, step: int, samples: int, tokens: int, supervised_tokens: int = 0, image_tokens: int = 0,
               images: int = 0) -> dict[str, float]:
        """Add one step; ``supervised_tokens``, ``image_tokens`` and ``images`` feed the FlopCount's other rates."""
        self.samples += samples
        self.tokens += tokens
        self.flops_done += self.flops.step(tokens, supervised_tokens, image_tokens, images)
        now = time.perf_counter()
        if step < self.steady_from:  # warm-up: the steady window starts after this step
            self.history = [(now, step, self.samples, self.tokens, self.flops_done)]
            per_step = (now - self.started) / max(step - self.start_step, 1)
            return {"eta_s": max(self.total_steps - step, 0) * per_step}
        self.history.append((now, step, self.samples, self.tokens, self.flops_done))
        self.history = self.history[-(self.window + 1):]
        t0, s0, n0, k0, f0 = self.history[0]
        t1, s1, n1, k1, f1 = self.history[-1]
        dt = max(t1 - t0, 1e-9)
        tokens_per_s = (k1 - k0) / dt
        flops_per_s = (f1 - f0) / dt
        steps_per_s = (s1 - s0) / dt
        remaining = max(self.total_steps - step, 0)
        return {
            "samples_per_s": (n1 - n0) / dt,
            "tokens_per_s": tokens_per_s,
            "mfu": flops_per_s / self.peak if self.peak > 0 else 0.0,
            "eta_s": remaining / steps_per_s if steps_per_s > 0 else float("inf"),
            "mfu_steady_from_step": self.steady_from,
            "throughput_window_steps": s1 - s0,
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

    def __init__(self, run_dir: str | os.PathLike, log_cfg: LogConfig, *, enabled: bool, total_steps: int, initial_step: int = 0, run_name: str = "run", config: Optional[dict] = None):
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
            out.update(cost_imbalance_mean=sum(self.imbalance) / len(self.imbalance), cost_imbalance_max=max(self.imbalance))
        return out

    def line(self) -> str:
        s = self.summary()
        cost = (f"per-rank cost max/mean {s['cost_imbalance_mean']:.3f} on average, {s['cost_imbalance_max']:.3f} at worst; "
                if self.imbalance else "")
        return (f"{cost}ranks waited {s['allreduce_wait_s_per_step'] * 1e3:.1f} ms a step at the all-reduces "
                f"(mean over ranks; the longest-waiting rank {s['allreduce_wait_max_s_per_step'] * 1e3:.1f} ms), "
                f"over {self.steps} step(s)")
