"""The step-time model's rates, measured on the machine at hand (``mmdist plan --calibrate``), and their file.

The step-time model (mmdist.plan.step_time) counts what a step does from the model's
shapes; a :class:`~mmdist.plan.step_time.Calibration` says how fast this machine does
each kind of work. ``mmdist plan --calibrate`` (mmdist/commands/calibrate.py) measures
them on ``world`` ranks of this node, all busy at once as in training, and this module
turns the measurements into rates:

- ``latency_s``, ``bus_bytes_per_s``: all-gathers of two sizes on the run's backend
  (:func:`collective_probe`), the line through the two points (time = latency + bytes /
  bandwidth, bytes as a ring moves them per rank);
- ``layer_flops``: a frozen decoder layer of each width (64 to 8192, as far as a short time
  allows; forward and backward to its input, in the compute dtype), every rank at once
  (:func:`layer_probe`): how much faster this machine runs a wide model's layers than a narrow
  one's (matmul units better used, norms and activations a smaller share);
- ``flops_per_s`` and ``module_call_s``: the trainer at ZeRO-1 on the config for a few steps
  (phase timer on): the FLOPs of the steps it timed (the planner's count,
  mmdist.plan.speed.record_flops, at each step's own counts from metrics.jsonl: a mixture's
  batches differ from the planned mean) and their forward + backward seconds, less the
  collectives the model places there. The FLOPs run at the layer probe's rate for the
  model's width; the seconds beyond that, per module call and pass, are ``module_call_s``
  (so that a deeper model, or more micro-batches, pay it more often, and a wider one no
  more per call). Where the trainer ran faster than the probe, its own rate and no
  per-call cost;
- ``optimizer_param_s``: the ZeRO-1 optimizer phase, less its gather of the updated weights,
  per trainable parameter the rank updates;
- ``step_fixed_s``: the ZeRO-1 step less its forward, backward and optimizer phases;
- ``zero3_module_s`` and ``overlap`` (the share of collective time hidden behind compute): the
  trainer at ZeRO-3 on the same config. One run cannot tell the two apart, so the one that the
  run asks for is taken: where ZeRO-3 added less to forward + backward than its extra collectives
  take in the probe, they were partly hidden (on a GPU behind kernels on other streams; on a CPU
  with more ranks than cores, behind the ranks that compute while others wait in a collective):
  ``overlap`` is that share and the per-module cost 0; otherwise ``overlap`` keeps its default
  (0 on the CPU, where gloo runs each collective to completion before the module computes; 0.8
  on a GPU) and the rest of ZeRO-3's added time, per module fetch, is ``zero3_module_s``. The
  calibration file says which.

Each rate is measured on the configured model at its configured micro-batch; the
benchmark benchmarks/step_time_model.py calibrates on one shape and predicts the trainer's
ZeRO-1/2/3 step times on another (docs/benchmarks.md has the table).
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Optional

from mmdist.plan.step_time import (
    DEFAULT_SOURCES,
    PROBE_TOKENS,
    Calibration,
    StepInputs,
    collective_calls,
    comm_bytes,
    layer_rate,
    module_passes,
)

__all__ = ["CALIBRATION_ENV", "CALIBRATION_FORMAT", "PROBE_BYTES", "StepPhases", "collective_probe", "fit",
           "layer_probe", "load_calibration", "machine_label", "pooled", "save_calibration", "steady_phases"]

CALIBRATION_ENV = "MMDIST_CALIBRATION"
"""A calibration file (``mmdist plan --calibrate``) that ``engine.zero_stage: auto`` predicts with at start-up."""

CALIBRATION_FORMAT = 2
"""The calibration file's format: raised whenever the FLOPs the rates are fitted to are counted differently, since a
rate is only right beside the count it was fitted to. 2: the LM head and its loss at the supervised (answer) tokens
only, and the recomputed forward without the head; files without a format counted the head at every text token."""

PROBE_BYTES = (64 * 1024, 16 * 1024 * 1024)  # per rank: a latency-bound and a bandwidth-bound all-gather


@dataclasses.dataclass(frozen=True)
class StepPhases:
    """Mean seconds of a run's steady steps: the whole step and the phases the trainer's phase timer records; and
    the FLOPs per rank of a mean step, counted at the run's own batch counts (0 where not counted)."""

    step_s: float
    forward_s: float
    backward_s: float
    optimizer_s: float
    steps: int = 0
    flops: float = 0.0

    @property
    def compute_s(self) -> float:
        return self.forward_s + self.backward_s


def steady_phases(records: Sequence[Mapping], skip: int = 2,
                  flops_of: Optional[Callable[[Mapping], float]] = None) -> StepPhases:
    """:class:`StepPhases` from metrics.jsonl's train records (``MMDIST_STEP_PHASES=1``), leaving out the first
    ``skip`` steps (start-up, the first collectives); ``flops_of``: a step's FLOPs per rank from its record
    (mmdist.plan.speed.record_flops).

    Means, not medians: a step's time follows its batch (a mixture's steps differ by 2x in tokens), and the rate the
    calibration wants, and the time a plan predicts, are those of the mean step: all the steps' work over all their
    time. Step time: the span from the last start-up step to the last step, over the steps in it."""
    train = [r for r in records if r.get("split") == "train" and "loss" in r]
    if len(train) < skip + 3:
        raise ValueError(f"{len(train)} train steps in metrics.jsonl: need at least {skip + 3} to time steady steps")
    missing = [k for k in ("phase_forward_s", "phase_backward_s", "phase_optimizer_s") if k not in train[-1]]
    if missing:
        raise ValueError(f"metrics.jsonl has no {', '.join(missing)}: run the trainer with MMDIST_STEP_PHASES=1")
    steady = train[skip:]
    span = steady[-1]["time"] - train[skip - 1]["time"]
    mean = lambda key: statistics.fmean(r.get(key, 0.0) for r in steady)  # noqa: E731
    flops = statistics.fmean(flops_of(r) for r in steady) if flops_of else 0.0
    return StepPhases(span / len(steady), mean("phase_forward_s"), mean("phase_backward_s"),
                      mean("phase_optimizer_s"), len(steady), flops)


def pooled(runs: Sequence[StepPhases]) -> StepPhases:
    """Several runs of one setting as one: every figure the mean over all their steady steps (each run weighted by
    its steps), so that the rate is still all the steps' work over all their time."""
    steps = sum(r.steps for r in runs)
    if not runs or steps <= 0:
        raise ValueError("pooled: no steady steps to pool")
    mean = lambda name: sum(getattr(r, name) * r.steps for r in runs) / steps  # noqa: E731
    return StepPhases(mean("step_s"), mean("forward_s"), mean("backward_s"), mean("optimizer_s"), steps, mean("flops"))


def collective_probe(world: int, device: Any, repeats: int = 10) -> dict:
    """(run on every rank of an initialised process group) Seconds per all-gather of each :data:`PROBE_BYTES` size,
    the median over ``repeats`` after one warm-up; every rank returns the same figures (the slowest rank's)."""
    import torch
    import torch.distributed as dist

    # torch 2.13 renames the call (the old name warns); the GPU machines' torch 2.11 has only the old one
    all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    out = {}
    for size in PROBE_BYTES:
        part = torch.ones(size // 4, dtype=torch.float32, device=device)
        whole = torch.empty(part.numel() * world, dtype=torch.float32, device=device)
        times = []
        for i in range(repeats + 1):
            dist.barrier()
            start = time.perf_counter()
            all_gather(whole, part)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if i:
                times.append(time.perf_counter() - start)
        slowest = torch.tensor([statistics.median(times)], dtype=torch.float64, device=device)
        dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
        out[size] = float(slowest.item())
    return out


PROBE_WIDTHS = (64, 128, 256, 512, 1024, 2048, 4096, 8192)
PROBE_ROWS = 4  # PROBE_TOKENS in rows of PROBE_TOKENS / PROBE_ROWS, causal attention within each


def _probe_layer(width: int, device: Any, dtype: Any) -> tuple[Any, int]:
    """A pre-norm decoder layer of ``width`` (attention in heads of 64, a gated MLP 8/3 as wide, RMS norms), frozen;
    (the module, its parameters). What a frozen LLM's layer computes, without any one model's code."""
    import torch
    from torch import nn

    heads = max(1, width // 64)
    inner = 64 * round(8 * width / 3 / 64) or width

    class Layer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.norm1, self.norm2 = nn.RMSNorm(width), nn.RMSNorm(width)
            self.qkv, self.out = nn.Linear(width, 3 * width, bias=False), nn.Linear(width, width, bias=False)
            self.gate_up, self.down = nn.Linear(width, 2 * inner, bias=False), nn.Linear(inner, width, bias=False)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            b, t, _ = x.shape
            q, k, v = self.qkv(self.norm1(x)).view(b, t, 3, heads, width // heads).permute(2, 0, 3, 1, 4)
            a = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
            x = x + self.out(a.transpose(1, 2).reshape(b, t, width))
            g, u = self.gate_up(self.norm2(x)).chunk(2, dim=-1)
            return x + self.down(nn.functional.silu(g) * u)

    layer = Layer().to(device=device, dtype=dtype).requires_grad_(False)
    return layer, sum(p.numel() for p in layer.parameters())


def layer_probe(device: Any, dtype: Any, budget_s: float = 0.5, min_s: float = 0.2) -> dict:
    """(run on every rank at once) Training FLOP/s of a frozen decoder layer of each width of :data:`PROBE_WIDTHS`
    on :data:`PROBE_TOKENS` tokens: forward, and backward to its input only (what the frozen LLM does), counted as the
    model counts it (4 per weight per token, plus attention's scores); each figure averages repeats over at least
    ``min_s`` (so that ranks sharing cores see their share), up to the first width whose pass takes over
    ``budget_s``. Every rank returns the slowest rank's figure."""
    import torch
    import torch.distributed as dist

    out = {}
    rows, seq = PROBE_ROWS, PROBE_TOKENS // PROBE_ROWS
    for width in PROBE_WIDTHS:
        layer, params = _probe_layer(width, device, dtype)
        x = torch.randn(rows, seq, width, device=device, dtype=dtype, requires_grad=True)

        def once(layer: Any = layer, x: Any = x) -> None:
            layer(x).float().sum().backward()
            x.grad = None

        once()  # warm-up
        runs, start = 0, time.perf_counter()
        while True:
            once()
            runs += 1
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            elapsed = time.perf_counter() - start
            if elapsed >= min_s or elapsed / runs > budget_s:
                break
        seconds = torch.tensor([elapsed / runs], dtype=torch.float64, device=device)
        if dist.is_initialized():
            dist.all_reduce(seconds, op=dist.ReduceOp.MAX)
        attention = 2 * 2 * rows * seq * seq * width  # causal scores and weighted sum: half of 2 x 2 x S^2 x w, x2
        out[width] = (4 * params * PROBE_TOKENS + attention) / float(seconds.item())
        if seconds.item() > budget_s:
            break
    return out


def _line(probe: Mapping[int, float], world: int) -> tuple[float, float]:
    """(latency s, bus bytes/s) through the probe's two points; the bytes are what a ring moves per rank."""
    (small, t_small), (big, t_big) = sorted((int(k), float(v)) for k, v in probe.items())
    ring = (world - 1) / world
    moved_small, moved_big = ring * small * world, ring * big * world  # an all-gather's buffer is world x the part
    slope = (t_big - t_small) / (moved_big - moved_small)
    if slope <= 0:
        raise ValueError(f"all-gather probe: {big} bytes took no longer than {small} ({t_big:.3g} vs {t_small:.3g} s)")
    return max(0.0, t_small - moved_small * slope), 1.0 / slope


def fit(inputs: StepInputs, world: int, zero1: StepPhases, zero3: StepPhases, probe: Mapping[int, float],
        checkpointing: bool, device: str, machine: str, layers: Mapping[int, float] = ()) -> Calibration:
    """The rates that make the step-time model reproduce the ZeRO-1 and ZeRO-3 runs of ``inputs``' config on
    ``world`` ranks (see the module's docstring for which measurement gives which rate)."""
    latency, bandwidth = _line(probe, world) if world > 1 else (0.0, 0.0)
    link = lambda stage: (collective_calls(inputs, stage, world, checkpointing) * latency  # noqa: E731
                          + (comm_bytes(inputs, stage, world, checkpointing) / bandwidth if bandwidth else 0.0))
    # the work of the steps that were timed (their own batches), else of the planned mean step
    planned = inputs.model_flops + (inputs.recompute_flops if checkpointing else 0.0)
    flops = zero1.flops or planned
    zero3_work = (zero3.flops or flops) / flops  # both runs read the same batches in the same order: 1 unless cut short
    # ZeRO-1: the gradient reduction runs in backward, the gather of the updated weights in the optimizer phase
    ring = (world - 1) / world if world > 1 else 0.0
    gather_s = (latency + ring * inputs.trainable_bytes / bandwidth) if world > 1 else 0.0
    in_pass1, in_pass3 = max(0.0, link(1) - gather_s), link(3)  # collectives inside forward+backward
    # Two runs, three unknowns (compute, ZeRO-3's cost per module fetch, the share of collectives hidden behind
    # compute): where ZeRO-3 added less time than its collectives take in the probe, the collectives were partly
    # hidden (on a GPU behind kernels on other streams; on a CPU with more ranks than cores, behind the ranks that
    # compute while others wait) and the per-module cost is taken as 0; where it added more, the default overlap
    # holds and the rest is per-module cost.
    added = zero3.compute_s - zero1.compute_s * zero3_work
    default_overlap = 0.0 if device == "cpu" else Calibration.overlap
    if in_pass3 > in_pass1 and added < (1.0 - default_overlap) * (in_pass3 - in_pass1):
        overlap = min(1.0, max(0.0, 1.0 - added / (in_pass3 - in_pass1)))
        overlap_source = f"measured: ZeRO-3 added {added:.3g} s to forward+backward, its collectives {in_pass3:.3g} s"
    else:
        overlap, overlap_source = default_overlap, None
    compute = zero1.compute_s - (1.0 - overlap) * in_pass1
    if compute <= 0:
        raise ValueError(f"ZeRO-1 forward+backward {zero1.compute_s:.3g} s is no longer than its predicted collectives")
    # The FLOPs at the layer probe's rate for this width; what the trainer took beyond that is a cost per module
    # call and pass (the same for a small module as for a large one). A trainer faster than the probe (a probe
    # layer less efficient than the model's): its own rate, and no such cost.
    calls = inputs.modules * module_passes(checkpointing) * inputs.micro_batches
    arithmetic = flops / layer_rate(layers, inputs.width) if layers and inputs.width else compute
    if calls and arithmetic < compute:
        rate, module_call_s = flops / arithmetic, (compute - arithmetic) / calls
    else:
        rate, module_call_s = flops / compute, 0.0
    updated = inputs.trainable_params / max(1, world)
    optimizer = max(0.0, zero1.optimizer_s - gather_s) / updated if updated else 0.0
    fixed = max(0.0, zero1.step_s - zero1.compute_s - zero1.optimizer_s)
    extra = zero3.compute_s - compute * zero3_work - (1.0 - overlap) * in_pass3
    module_s = max(0.0, extra) / calls if calls else 0.0  # ZeRO-3 fetches each module once per pass
    where = f"{world} rank(s)"
    sources = dict(DEFAULT_SOURCES)
    sources.update(
        flops_per_s=(f"measured: the layer probe at the model's width, {where}" if module_call_s else
                     f"measured: ZeRO-1 forward+backward, {where}, "
                     + ("the FLOPs of the steps timed" if zero1.flops else "the FLOPs of the planned mean step")),
        module_call_s=("measured: ZeRO-1 forward+backward beyond the FLOPs at the layer probe's rate ("
                       + ("the FLOPs of the steps timed" if zero1.flops else "the planned mean step")
                       + f"), per module call and pass, {where}" if module_call_s else
                       "measured: 0 (the trainer ran at the layer probe's rate or faster)" if layers else
                       DEFAULT_SOURCES["module_call_s"]),
        latency_s=f"measured: all-gather of {PROBE_BYTES[0]} and {PROBE_BYTES[1]} bytes, {where}",
        bus_bytes_per_s=f"measured: the same all-gathers, {where}",
        optimizer_param_s=f"measured: ZeRO-1 optimizer phase, {where}",
        step_fixed_s=f"measured: ZeRO-1 step less its timed phases, {where}",
        zero3_module_s=f"measured: ZeRO-3 forward+backward less compute and gathers, {where}",
        overlap=overlap_source or ("fixed: 0 on the CPU (ZeRO-3 added no less than its collectives)"
                                   if device == "cpu" else sources["overlap"]),
    )
    if layers:
        sources["layer_flops"] = f"measured: a frozen decoder layer per width, {PROBE_TOKENS} tokens, {where} at once"
    return Calibration(flops_per_s=rate, module_call_s=module_call_s,
                       layer_flops={int(k): float(v) for k, v in dict(layers).items()},
                       layer_width=inputs.width if layers else 0, latency_s=latency, bus_bytes_per_s=bandwidth,
                       zero3_module_s=module_s, step_fixed_s=fixed, optimizer_param_s=optimizer, overlap=overlap,
                       machine=machine, world=world, sources=sources)


def machine_label(device: str = "cpu") -> str:
    """What the rates were measured on: the GPU's name, or the CPU's model, cores and bf16 flags."""
    if device.startswith("cuda"):
        import torch

        return torch.cuda.get_device_name(torch.cuda.current_device())
    from mmdist.hardware import BF16_CPU_FLAGS, cpu_flags

    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines():
            if line.lower().startswith("model name"):
                model = line.partition(":")[2].strip()
                break
    except OSError:
        pass
    flags = cpu_flags()[0] or frozenset()
    bf16 = ", ".join(f for f in BF16_CPU_FLAGS if f in flags) or "no native bf16"
    return f"{model}, {os.cpu_count()} CPUs ({bf16})"


def save_calibration(cal: Calibration, path: str | Path, measurements: Mapping[str, Any]) -> Path:
    """Write ``cal`` and the raw ``measurements`` it came from as JSON; returns the path."""
    from mmdist.atomic import write_text_atomic

    fields = {f.name: getattr(cal, f.name) for f in dataclasses.fields(cal)}
    path = Path(path)
    document = {"format": CALIBRATION_FORMAT, "calibration": fields, "measurements": measurements}
    write_text_atomic(path, json.dumps(document, indent=2) + "\n")
    return path


def load_calibration(path: str | Path) -> Calibration:
    """The :class:`Calibration` in ``path``; a ValueError naming the file and the key when it is not one, or when
    it was written in another :data:`CALIBRATION_FORMAT` (its rates fit another FLOP count)."""

    def not_one(why: object) -> ValueError:
        return ValueError(f"{path}: not a calibration written by `mmdist plan --calibrate` ({why})")

    try:
        document = json.loads(Path(path).read_text())
        data = dict(document["calibration"])
        written = document.get("format", 1)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise not_one(exc) from None
    if written != CALIBRATION_FORMAT:
        raise ValueError(
            f"{path}: a calibration of format {written}, whose rates were fitted to another FLOP count than this "
            f"mmdist's (format {CALIBRATION_FORMAT}); measure again with `mmdist plan --calibrate`"
        )
    unknown = sorted(set(data) - {f.name for f in dataclasses.fields(Calibration)})
    if unknown:
        raise not_one(f"unknown keys {unknown}")
    try:
        cal = Calibration(**data)
    except (ValueError, TypeError) as exc:
        raise not_one(exc) from None
    if not isinstance(cal.flops_per_s, (int, float)) or not cal.flops_per_s > 0:
        raise not_one("flops_per_s must be a number > 0")
    return cal
