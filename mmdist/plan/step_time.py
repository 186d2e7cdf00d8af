"""Predicted step time of a stage on N GPUs: compute at a measured utilisation, plus what each ZeRO stage moves.

`mmdist plan` answers "does it fit" with bytes; this module answers "which fitting
setting is fastest, and how does it scale" with seconds, so that `engine.zero_stage:
auto` can pick a setting and a job can be planned for 64 or 512 GPUs from one machine.
The model is deliberately small (every term is printed by the planner):

- compute = hardware FLOPs of the rank's micro-batches / (peak x utilisation);
  recomputation under gradient checkpointing adds one forward of the frozen LLM;
- communication = bytes each collective moves per rank / the bus bandwidth of the
  slowest link it crosses (NVLink inside a node, the network across nodes);
  ZeRO-3 all-gathers every weight of the model for each micro-batch's forward, again
  for its backward (the gradient flows back through the frozen LLM) and once more
  for recomputation; ZeRO-1/2 gather only the updated trainable weights once per
  step; every stage reduces the trainable gradients;
- a fraction ``overlap`` of the communication hides behind compute (DeepSpeed
  prefetches the next layer's gather while this one computes);
- offload moves bytes over PCIe (``Interconnect.pcie``, :data:`PCIE_DEFAULT` unless given):
  optimizer offload sends the rank's gradient partition to the CPU (fp32) and brings the
  updated weights back once per step, after backward and not overlapped; parameter
  offload fetches the rank's weight partition from the CPU at every gather, in line
  with the all-gathers (overlapped as they are). The CPU's own Adam step is not modelled;
- ZeRO-3's compute runs ``zero3_overhead`` times slower than the bare model's even
  on one rank, where nothing moves: its per-module fetch/release hooks and
  partitioned-parameter bookkeeping (16% vs 34% MFU measured on one H200, docs/benchmarks.md).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Optional

__all__ = ["Interconnect", "StepInputs", "StepTime", "interconnect_for", "predict", "scaling_table"]

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


@dataclasses.dataclass(frozen=True)
class StepInputs:
    """What one optimizer step of one rank costs, independent of the ZeRO stage."""

    model_flops: float  # per rank per optimizer step, 4N/6N style (what MFU counts)
    recompute_flops: float  # extra forward FLOPs under gradient checkpointing (0 without)
    weight_bytes: int  # every weight of the model as held on the GPU (frozen + trainable), unpartitioned
    trainable_bytes: int  # trainable weights in the compute dtype
    gradient_bytes: int  # trainable gradients as reduced (compute dtype)
    micro_batches: int  # per rank per optimizer step (gradient accumulation)
    peak_flops: float
    utilisation: float = 0.5  # hardware-FLOPs utilisation of the compute itself; measured 0.51 (HFU) on one H200
    overlap: float = 0.8  # fraction of communication hidden behind compute
    zero3_overhead: float = 1.0  # ZeRO-3 compute time / the bare model's, from its hooks alone (1.0: none)
    trainable_params: int = 0  # for optimizer offload's fp32 gradients (0: counted in the compute dtype)


@dataclasses.dataclass(frozen=True)
class StepTime:
    """A predicted optimizer step: seconds by part and the resulting efficiency."""

    zero_stage: int
    world: int
    compute_s: float
    comm_s: float
    comm_bytes: float
    step_s: float
    bare_compute_s: float = 0.0  # the same FLOPs without ZeRO-3's hook overhead: the bare model's time
    pcie_s: float = 0.0  # offload's host <-> GPU copies (included in step_s)

    @property
    def efficiency(self) -> float:
        """The bare model's compute time / step time: 1.0 when all communication hides behind compute and the stage
        adds no overhead of its own (ZeRO-3 on one rank: 1 / zero3_overhead)."""
        return (self.bare_compute_s or self.compute_s) / self.step_s if self.step_s else 0.0


def comm_bytes(inputs: StepInputs, zero_stage: int, world: int, checkpointing: bool) -> float:
    """Bytes one rank sends (= receives) per optimizer step in the collectives of ``zero_stage``."""
    if world <= 1:
        return 0.0
    ring = (world - 1) / world  # a ring all-gather or reduce-scatter moves (N-1)/N of the buffer per rank
    grads = 2 * ring * inputs.gradient_bytes  # ZeRO-0: all-reduce; 1/2/3: reduce-scatter (+ the gather below)
    if zero_stage == 3:
        gathers = 2 + (1 if checkpointing else 0)  # forward, backward, recompute
        return (
            ring * inputs.weight_bytes * gathers * inputs.micro_batches
            + ring * inputs.gradient_bytes * inputs.micro_batches
        )
    if zero_stage in (1, 2):
        return ring * inputs.gradient_bytes * inputs.micro_batches + ring * inputs.trainable_bytes
    return grads


def offload_bytes(inputs: StepInputs, world: int, checkpointing: bool, offload_optimizer: bool,
                  offload_params: bool) -> tuple[float, float]:
    """(bytes over PCIe per step for optimizer offload, for parameter offload) of one rank."""
    n = max(1, world)
    # gradients go down as fp32 (4 bytes per parameter), the updated weights come back in the compute dtype
    down = 4 * inputs.trainable_params if inputs.trainable_params else inputs.gradient_bytes
    optimizer = (down + inputs.trainable_bytes) / n if offload_optimizer else 0.0
    gathers = 2 + (1 if checkpointing else 0)  # forward, backward, recompute: each fetches the rank's partition
    params = inputs.weight_bytes / n * gathers * inputs.micro_batches if offload_params else 0.0
    return optimizer, params


def predict(inputs: StepInputs, zero_stage: int, world: int, interconnect: Interconnect, checkpointing: bool,
            offload_optimizer: bool = False, offload_params: bool = False) -> StepTime:
    """The step time of one setting on ``world`` GPUs (with offload: its PCIe copies, see the module's docstring)."""
    flops = inputs.model_flops + (inputs.recompute_flops if checkpointing else 0.0)
    bare = flops / (inputs.peak_flops * inputs.utilisation)
    compute = bare * (inputs.zero3_overhead if zero_stage == 3 else 1.0)
    moved = comm_bytes(inputs, zero_stage, world, checkpointing)
    comm = moved / interconnect.bandwidth(world) if moved else 0.0
    pcie = interconnect.pcie or PCIE_DEFAULT
    opt_bytes, param_bytes = offload_bytes(inputs, world, checkpointing, offload_optimizer, offload_params)
    comm += param_bytes / pcie
    serial = opt_bytes / pcie
    step = max(compute, comm) + (1.0 - inputs.overlap) * min(compute, comm) + serial
    return StepTime(zero_stage, world, compute, comm, moved, step, bare, serial + param_bytes / pcie)


def scaling_table(inputs: StepInputs, zero_stages: list[int], interconnect: Interconnect, checkpointing: bool,
                  worlds: tuple[int, ...] = (1, 8, 64, 512)) -> list[str]:
    """Printable lines: predicted step time and scaling efficiency of each stage at each world size."""
    lines = [
        f"predicted step time per rank (same micro-batches per rank; {interconnect.label}: "
        f"{interconnect.intra_node / GB:.0f} GB/s in a node, {interconnect.inter_node / GB:.0f} GB/s across; "
        f"compute at {inputs.utilisation:.0%} of peak"
        + (f", ZeRO-3's at {inputs.utilisation / inputs.zero3_overhead:.0%}" if inputs.zero3_overhead != 1.0 else "")
        + f", {inputs.overlap:.0%} of communication overlapped)",
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
