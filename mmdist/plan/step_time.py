"""Predicted step time of a stage on N ranks: measured rates of this machine times what the model and its ZeRO stage do.

`mmdist plan` answers "does it fit" with bytes; this module answers "which fitting
setting is fastest, and how does it scale" with seconds, so that `engine.zero_stage:
auto` can pick a setting and a job can be planned for 64 or 512 GPUs from one machine.
Every term is a count from the model's shapes times a rate of the machine. The rates
are a :class:`Calibration`: measured on the machine at hand by ``mmdist plan
--calibrate`` (mmdist.plan.calibration, mmdist/commands/calibrate.py), or the shipped
defaults, each marked as a default in the calibration's ``sources``. Per optimizer step
of one rank:

- compute = the model's FLOPs (its own count, mmdist.models.flops, plus one more forward
  of the frozen LLM under gradient checkpointing) / the rank's training FLOP/s at the model's
  width: the rate this machine runs a frozen decoder layer of that width at (a measured
  table: narrow layers use a CPU's or GPU's matmul units less well, and spend more of their
  time in norms and activations); plus a fixed cost per module call and pass
  (``module_call_s`` x modules x passes x micro-batches): what the trainer does beyond the
  layer's arithmetic whatever a module's size (dispatch and kernel launches, rotary
  embeddings, attention over each packed sample, the loss), which a small model or a short
  micro-batch does not amortise;
- collectives = for each call, its latency, plus the bytes it moves / the bus bandwidth
  of the slowest link it crosses (NVLink or the measured figure inside a node, the network
  across nodes). ZeRO-3 all-gathers each module's weights for every micro-batch's forward,
  again for its backward (the gradient flows back through the frozen LLM) and once more
  for recomputation: one call per module holding parameters and pass; ZeRO-1/2 reduce the
  trainable gradients per micro-batch and gather the updated trainable weights once per step;
  ZeRO-0 all-reduces the gradients once per step;
- ZeRO-3's fixed cost per module fetch: its fetch/release hooks and partitioned-parameter
  bookkeeping, on top of the gather itself (``zero3_module_s`` x modules x passes);
- a fraction ``overlap`` of the collectives hides behind compute (DeepSpeed prefetches the
  next module's gather while this one computes on a GPU);
- the optimizer: seconds per trainable parameter the rank updates (its 1/N partition at
  ZeRO >= 1, all of them at ZeRO-0);
- the trainer's fixed cost per step (data hand-off, host syncs, logging);
- offload moves bytes over PCIe (``Interconnect.pcie``, :data:`PCIE_DEFAULT` unless given):
  optimizer offload sends the rank's gradient partition to the CPU (fp32) and brings the
  updated weights back once per step, after backward and not overlapped; parameter
  offload fetches the rank's weight partition from the CPU at every gather, in line
  with the all-gathers (overlapped as they are). The CPU's own Adam step is not modelled.

benchmarks/step_time_model.py checks the structure: calibrated on one model shape, it
predicts the trainer's ZeRO-1/2/3 step times of another (docs/benchmarks.md).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Optional

__all__ = ["Calibration", "Interconnect", "PROBE_TOKENS", "StepInputs", "StepTime", "calibration_line",
           "collective_calls", "comm_bytes", "interconnect_for", "layer_rate", "module_passes", "predict",
           "scaling_table"]

GB = 1e9


@dataclasses.dataclass(frozen=True)
class Interconnect:
    """Per-GPU bus bandwidth of NCCL collectives (bytes/s), inside a node and across nodes."""

    label: str
    intra_node: float
    inter_node: float
    gpus_per_node: int = 8
    pcie: float = 0.0  # host <-> GPU bytes/s per GPU for offload; 0: PCIE_DEFAULT

    def bandwidth(self, world: int) -> float:
        """A ring over ``world`` ranks runs at the speed of its slowest hop."""
        return self.intra_node if world <= self.gpus_per_node else self.inter_node


# Bus bandwidths NCCL's all-gather reaches in practice (about 80% of the datasheet link rate), for the common
# 8-GPU node designs: NVLink 4 (H100/H200 SXM, 450 GB/s per direction) with one 400 Gb/s NDR NIC per GPU, and
# NVLink 3 (A100 SXM, 300 GB/s) with one 200 Gb/s HDR NIC per GPU. `mmdist plan --intra-gbps/--inter-gbps` overrides.
INTERCONNECTS: tuple[tuple[str, Interconnect], ...] = (
    (r"\bH[12]00\b|\bGH200\b", Interconnect("NVLink4 + 400G NDR per GPU", 360 * GB, 40 * GB)),
    (r"\bA100\b|\bA800\b", Interconnect("NVLink3 + 200G HDR per GPU", 230 * GB, 20 * GB)),
)
PCIE_NODE = Interconnect("PCIe + 100G Ethernet per node", 20 * GB, 1.5 * GB)
# A default, not a measurement: what a PCIe Gen4 x16 link (32 GB/s per direction on paper) carries in practice for
# pinned host copies. H100/H200 SXM hosts are Gen5 (about twice that); `mmdist plan --pcie-gbps` sets the figure.
PCIE_DEFAULT = 25 * GB


def interconnect_for(gpu: str, intra_gbps: Optional[float] = None, inter_gbps: Optional[float] = None,
                     gpus_per_node: int = 8, pcie_gbps: Optional[float] = None) -> Interconnect:
    """The interconnect of a GPU name from the table (PCIe-only nodes otherwise), with GB/s overrides."""
    found = PCIE_NODE
    if "pcie" not in gpu.lower():  # a PCIe card has no NVLink switch, whatever its chip
        found = next((ic for pattern, ic in INTERCONNECTS if re.search(pattern, gpu, re.IGNORECASE)), PCIE_NODE)
    return dataclasses.replace(
        found,
        intra_node=intra_gbps * GB if intra_gbps else found.intra_node,
        inter_node=inter_gbps * GB if inter_gbps else found.inter_node,
        gpus_per_node=gpus_per_node,
        pcie=pcie_gbps * GB if pcie_gbps else found.pcie or PCIE_DEFAULT,
    )


#: Where no calibration file is given: defaults, not measurements of the machine the plan is for (the
#: calibration's ``sources`` say so). ``mmdist plan --calibrate`` measures every one of them.
DEFAULT_SOURCES = {
    "flops_per_s": "default: half the datasheet dense peak of the precision",
    "latency_s": "default: 50 us per collective call (not measured)",
    "bus_bytes_per_s": "default: the interconnect table's bus bandwidth",
    "zero3_module_s": "default: 0.3 ms per module fetch (not measured)",
    "layer_flops": "default: none (one rate for every width)",
    "step_fixed_s": "default: 10 ms per step (not measured)",
    "optimizer_param_s": "default: 0 (not measured)",
    "overlap": "default: 80% of the collectives behind compute (not measured)",
    "module_call_s": "default: 0 (not measured)",
}
DEFAULT_UTILISATION = 0.5
PROBE_TOKENS = 1024  # tokens of the calibration's layer probe (a micro-batch's, roughly)


@dataclasses.dataclass(frozen=True)
class Calibration:
    """The machine's rates the step-time model multiplies its counts by; ``sources`` says where each came from."""

    # training FLOP/s of one rank on the model's own count (all ranks busy at once), at the calibration model's width:
    # the layer probe's rate there, where the trainer was slower than it (the rest is module_call_s), else the trainer's
    flops_per_s: float
    latency_s: float = 50e-6  # per collective call
    bus_bytes_per_s: float = 0.0  # measured bus bandwidth inside a node; 0: the interconnect table's
    zero3_module_s: float = 3e-4  # ZeRO-3 per module and pass, beyond its gather's latency and bytes
    step_fixed_s: float = 0.01  # per optimizer step, whatever the stage
    optimizer_param_s: float = 0.0  # optimizer seconds per trainable parameter the rank updates
    overlap: float = 0.8  # fraction of the collectives hidden behind compute
    module_call_s: float = 0.0  # every stage: per module holding parameters, per pass, beyond its FLOPs at the rate
    # measured training FLOP/s of a frozen decoder layer per width w (mmdist.plan.calibration.layer_probe); with it, a
    # model of another width computes at flops_per_s x layer(its width) / layer(layer_width)
    layer_flops: dict = dataclasses.field(default_factory=dict)
    layer_width: int = 0  # the width flops_per_s was measured at (the calibration model's)
    machine: str = ""  # what it was measured on ("" for the defaults)
    world: int = 0  # ranks it was measured with (0 for the defaults)
    sources: dict = dataclasses.field(default_factory=lambda: dict(DEFAULT_SOURCES))

    @classmethod
    def defaults(cls, peak_flops: float) -> Calibration:
        """The shipped defaults for a device of dense peak ``peak_flops``."""
        return cls(flops_per_s=peak_flops * DEFAULT_UTILISATION)

    def rate(self, width: int = 0) -> float:
        """Training FLOP/s of a model ``width`` wide (its hidden size; 0: the calibration model's rate)."""
        if not (width and self.layer_width and self.layer_flops):
            return self.flops_per_s
        return self.flops_per_s * layer_rate(self.layer_flops, width) / layer_rate(self.layer_flops, self.layer_width)

    @property
    def measured(self) -> bool:
        return any(v.startswith("measured") for v in self.sources.values())


def layer_rate(table: dict, width: int) -> float:
    """FLOP/s at ``width`` from a {width: FLOP/s} table: linear in log(width) between measured widths, the nearest
    measured one outside them."""
    import math

    points = sorted((int(w), float(f)) for w, f in table.items())
    if width <= points[0][0]:
        return points[0][1]
    if width >= points[-1][0]:
        return points[-1][1]
    for (w0, f0), (w1, f1) in zip(points, points[1:]):
        if w0 <= width <= w1:
            t = (math.log(width) - math.log(w0)) / (math.log(w1) - math.log(w0))
            return f0 + t * (f1 - f0)
    raise AssertionError("unreachable")


@dataclasses.dataclass(frozen=True)
class StepInputs:
    """What one optimizer step of one rank does, independent of the ZeRO stage; the machine's rates ride along."""

    model_flops: float  # per rank per optimizer step, 4N/6N style (what MFU counts)
    recompute_flops: float  # extra forward FLOPs under gradient checkpointing (0 without)
    weight_bytes: int  # every weight of the model as held on the GPU (frozen + trainable), unpartitioned
    trainable_bytes: int  # trainable weights in the compute dtype
    gradient_bytes: int  # trainable gradients as reduced (compute dtype)
    micro_batches: int  # per rank per optimizer step (gradient accumulation)
    calibration: Calibration
    trainable_params: int = 0  # for optimizer offload's fp32 gradients and the optimizer's time
    modules: int = 0  # modules holding parameters of their own: ZeRO-3 fetches each one per pass
    width: int = 0  # hidden size of the model's largest part: what its layers' speed depends on


@dataclasses.dataclass(frozen=True)
class StepTime:
    """A predicted optimizer step: seconds by part and the resulting efficiency."""

    zero_stage: int
    world: int
    compute_s: float  # the model's FLOPs at the calibrated rate, plus ZeRO-3's per-module cost
    comm_s: float  # collectives: latency per call plus bytes over the link
    comm_bytes: float
    step_s: float
    bare_compute_s: float = 0.0  # the bare model's time: its FLOPs and its module calls, no ZeRO
    pcie_s: float = 0.0  # offload's host <-> GPU copies (included in step_s)
    zero3_s: float = 0.0  # ZeRO-3's per-module fetch cost (included in compute_s)
    optimizer_s: float = 0.0
    fixed_s: float = 0.0

    @property
    def efficiency(self) -> float:
        """The bare model's compute time / step time: 1.0 when all communication hides behind compute and the stage
        adds nothing of its own."""
        return (self.bare_compute_s or self.compute_s) / self.step_s if self.step_s else 0.0


def module_passes(checkpointing: bool) -> int:
    """Passes over every module per micro-batch: forward, backward, and the recomputing forward under gradient
    checkpointing (each a ZeRO-3 fetch, a parameter offload's copy, a module call)."""
    return 2 + (1 if checkpointing else 0)


def _gathers(zero_stage: int, checkpointing: bool) -> int:
    """Module fetches per micro-batch under ZeRO-3: forward, backward, and recomputation (0 at other stages)."""
    return module_passes(checkpointing) if zero_stage == 3 else 0


def comm_bytes(inputs: StepInputs, zero_stage: int, world: int, checkpointing: bool) -> float:
    """Bytes one rank sends (= receives) per optimizer step in the collectives of ``zero_stage``."""
    if world <= 1:
        return 0.0
    ring = (world - 1) / world  # a ring all-gather or reduce-scatter moves (N-1)/N of the buffer per rank
    if zero_stage == 3:
        return (ring * inputs.weight_bytes * _gathers(3, checkpointing) * inputs.micro_batches
                + ring * inputs.gradient_bytes * inputs.micro_batches)
    if zero_stage in (1, 2):
        return ring * inputs.gradient_bytes * inputs.micro_batches + ring * inputs.trainable_bytes
    return 2 * ring * inputs.gradient_bytes  # ZeRO-0: one all-reduce of the gradients per step


def collective_calls(inputs: StepInputs, zero_stage: int, world: int, checkpointing: bool) -> int:
    """Collective calls one rank makes per optimizer step (each pays the link's latency once)."""
    if world <= 1:
        return 0
    if zero_stage == 3:  # one gather per module and pass, one gradient reduce-scatter per micro-batch
        return (max(1, inputs.modules) * _gathers(3, checkpointing) + 1) * inputs.micro_batches
    if zero_stage in (1, 2):
        return inputs.micro_batches + 1
    return 1


def offload_bytes(inputs: StepInputs, world: int, checkpointing: bool, offload_optimizer: bool,
                  offload_params: bool) -> tuple[float, float]:
    """(bytes over PCIe per step for optimizer offload, for parameter offload) of one rank."""
    n = max(1, world)
    # gradients go down as fp32 (4 bytes per parameter), the updated weights come back in the compute dtype
    down = 4 * inputs.trainable_params if inputs.trainable_params else inputs.gradient_bytes
    optimizer = (down + inputs.trainable_bytes) / n if offload_optimizer else 0.0
    # every pass (forward, backward, recompute) fetches the rank's partition
    params = inputs.weight_bytes / n * module_passes(checkpointing) * inputs.micro_batches if offload_params else 0.0
    return optimizer, params


def predict(inputs: StepInputs, zero_stage: int, world: int, interconnect: Interconnect, checkpointing: bool,
            offload_optimizer: bool = False, offload_params: bool = False) -> StepTime:
    """The step time of one setting on ``world`` ranks (see the module's docstring for each term)."""
    cal = inputs.calibration
    flops = inputs.model_flops + (inputs.recompute_flops if checkpointing else 0.0)
    calls = cal.module_call_s * inputs.modules * module_passes(checkpointing) * inputs.micro_batches
    bare = flops / cal.rate(inputs.width) + calls
    zero3 = cal.zero3_module_s * inputs.modules * _gathers(zero_stage, checkpointing) * inputs.micro_batches
    compute = bare + zero3
    moved = comm_bytes(inputs, zero_stage, world, checkpointing)
    measured_link = cal.bus_bytes_per_s and world <= interconnect.gpus_per_node
    bandwidth = cal.bus_bytes_per_s if measured_link else interconnect.bandwidth(world)
    comm = collective_calls(inputs, zero_stage, world, checkpointing) * cal.latency_s
    comm += moved / bandwidth if moved else 0.0
    pcie = interconnect.pcie or PCIE_DEFAULT
    opt_bytes, param_bytes = offload_bytes(inputs, world, checkpointing, offload_optimizer, offload_params)
    comm += param_bytes / pcie
    serial = opt_bytes / pcie
    updated = inputs.trainable_params / (max(1, world) if zero_stage >= 1 else 1)
    optimizer = cal.optimizer_param_s * updated
    step = (max(compute, comm) + (1.0 - cal.overlap) * min(compute, comm) + serial + optimizer + cal.step_fixed_s)
    return StepTime(zero_stage, world, compute, comm, moved, step, bare, serial + param_bytes / pcie, zero3,
                    optimizer, cal.step_fixed_s)


def scaling_table(inputs: StepInputs, zero_stages: list[int], interconnect: Interconnect, checkpointing: bool,
                  worlds: tuple[int, ...] = (1, 8, 64, 512)) -> list[str]:
    """Printable lines: predicted step time and scaling efficiency of each stage at each world size."""
    lines = [
        f"predicted step time per rank (same micro-batches per rank; {interconnect.label}: "
        f"{interconnect.intra_node / GB:.0f} GB/s in a node, {interconnect.inter_node / GB:.0f} GB/s across; "
        + calibration_line(inputs.calibration, inputs.width) + ")",
        f"{'setting':<10}" + "".join(f"{f'{w} GPU':>20}" for w in worlds),
    ]
    for stage in zero_stages:
        cells = []
        for w in worlds:
            t = predict(inputs, stage, w, interconnect, checkpointing)
            cells.append(f"{t.step_s:7.2f} s {t.efficiency:5.0%}   ")
        lines.append(f"{f'ZeRO-{stage}':<10}" + "".join(f"{c:>20}" for c in cells))
    lines.append(
        "  (seconds per optimizer step, and the bare model's compute time / step time; ZeRO-3 re-gathers every weight "
        "per micro-batch)"
    )
    return lines


def calibration_line(cal: Calibration, width: int = 0) -> str:
    """The rates a prediction used (the compute rate at ``width``), and whether they were measured (where) or are
    the shipped defaults."""
    where = f"measured on {cal.machine} with {cal.world} rank(s)" if cal.measured else "shipped defaults"
    return (f"rates {where}: {cal.rate(width) / 1e12:.3g} TFLOP/s per rank, {cal.latency_s * 1e6:.0f} us per "
            f"collective, {cal.module_call_s * 1e6:.3g} us per module call, ZeRO-3 {cal.zero3_module_s * 1e3:.2g} ms "
            f"per module fetch, {cal.overlap:.0%} of collectives "
            f"overlapped, {cal.step_fixed_s * 1e3:.3g} ms fixed per step")
