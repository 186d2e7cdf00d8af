"""What this machine computes fast: native bf16 on the CPU, the dtype ``auto`` resolves to, the peak for MFU.

A shipped recipe must not depend on the machine it was written on. A frozen LLM
kept in bf16 runs ~2.5x faster than fp32 on a CPU with ``avx512_bf16`` or AMX,
and ~150x *slower* on one without (bf16 matmuls are then emulated: 0.9 vs 138
GFLOP/s on an AVX2-only EPYC). Among GPUs, compute capability < 8.0 (V100, T4)
has no bf16 at all but fast fp16. So precision settings accept ``auto``, and
this module turns ``auto`` into a concrete dtype with a reason a person can read
("fp32: this CPU has no native bf16 (bf16 matmul 0.9 vs fp32 138 GFLOP/s)").

How native bf16 is decided on the CPU, in order:
  1. ``MMDIST_CPU_BF16=0`` / ``=1`` (the switch tests use to run the fp32
     fallback on any machine, including one with AMX);
  2. the x86 flags ``amx_bf16`` or ``avx512_bf16`` in /proc/cpuinfo (or
     ``lscpu``): what oneDNN, and so torch's CPU matmul, uses for bf16;
  3. where no x86 flags can be read (macOS, ARM), a short matmul probe: bf16 is
     native when it runs at least a quarter as fast as fp32 (emulated: ~1/100).
The answer is cached per process (the probe takes well under a second).

The peak FLOP/s for MFU comes from a table of datasheet dense peaks for common
accelerators, matched on ``torch.cuda.get_device_name``; a measured matmul is
only the fallback (an unknown GPU, or the CPU), because a small probe
understates a GPU's peak and so inflates MFU. The returned source says which.

torch is imported lazily: reading flags and resolving settings must not pay for it.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import re
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any, Optional

# The one import of the settings errors: a precision that cannot run here is reported as a config problem.
from mmdist.settings import ConfigError, Problem

__all__ = [
    "BF16_CPU_FLAGS",
    "CPU_BF16_ENV",
    "DATASHEET_PEAKS",
    "DatasheetPeak",
    "Resolved",
    "cpu_bf16_native",
    "cpu_flags",
    "cpus_for_this_rank",
    "default_device",
    "matmul_probe",
    "parse_cpu_flags",
    "peak_flops",
    "resolve_dtype",
    "resolve_engine_precision",
]

CPU_BF16_ENV = "MMDIST_CPU_BF16"
"""``0``: treat the CPU as having no native bf16; ``1``: as having it (skips detection)."""

BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")
"""x86 flags with which oneDNN runs bf16 matmuls natively (AMX tiles, AVX512-BF16 dot products)."""

FP16_CPU_FLAGS = ("amx_fp16", "avx512_fp16")

# A half-precision dtype whose matmul runs at less than this fraction of fp32 is "not native".
NATIVE_FRACTION = 0.25  # emulated bf16 runs ~100x slower than fp32, native at least as fast: a wide margin for noise

DTYPES = ("fp32", "bf16", "fp16")


# ---------------------------------------------------------------------------
# CPU flags


def parse_cpu_flags(text: str) -> Optional[set[str]]:
    """The x86 feature flags in /proc/cpuinfo or ``lscpu`` output; None when the text has no x86 flags line.

    ARM's /proc/cpuinfo has a ``Features`` line instead; its names say nothing
    about oneDNN's bf16 kernels, so it counts as "cannot tell" (the probe decides).
    """
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip().lower() == "flags":
            flags = set(value.split())
            if flags:
                return flags
    return None


@functools.lru_cache(maxsize=1)
def cpu_flags() -> tuple[Optional[frozenset[str]], str]:
    """(this CPU's x86 flags or None, where they were read)."""
    cpuinfo = Path("/proc/cpuinfo")
    try:
        flags = parse_cpu_flags(cpuinfo.read_text(errors="replace"))
        if flags:
            return frozenset(flags), "/proc/cpuinfo flags"
    except OSError:
        pass
    if shutil.which("lscpu"):
        try:
            out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10, check=False).stdout
            flags = parse_cpu_flags(out)
            if flags:
                return frozenset(flags), "lscpu flags"
        except (OSError, subprocess.SubprocessError):
            pass
    return None, "no CPU flags readable"


def _env_switch() -> Optional[bool]:
    value = os.environ.get(CPU_BF16_ENV, "").strip().lower()
    if value in ("0", "false", "no", "off"):
        return False
    if value in ("1", "true", "yes", "on"):
        return True
    return None


def cpu_bf16_native() -> tuple[bool, str]:
    """(whether this CPU computes bf16 matmuls natively, why); see the module doc for the order of evidence."""
    forced = _env_switch()
    if forced is not None:
        value = os.environ[CPU_BF16_ENV]
        return forced, f"{CPU_BF16_ENV}={value} says this CPU has {'native' if forced else 'no native'} bf16"
    return _detect_cpu_bf16()


@functools.lru_cache(maxsize=1)
def _detect_cpu_bf16() -> tuple[bool, str]:
    flags, where = cpu_flags()
    if flags is not None:
        found = [f for f in BF16_CPU_FLAGS if f in flags]
        if found:
            return True, f"this CPU has native bf16 ({', '.join(found)} in {where})"
        return False, f"this CPU has no native bf16 (no {' or '.join(BF16_CPU_FLAGS)} in {where})"
    ratio = _cpu_ratio("bf16")
    native = ratio.fraction >= NATIVE_FRACTION
    return native, f"this CPU has {'native' if native else 'no native'} bf16 ({where}; {ratio})"


# ---------------------------------------------------------------------------
# matmul probe


def _torch_dtype(name: str) -> Any:
    import torch

    try:
        return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}: expected one of {', '.join(DTYPES)}") from None


def matmul_probe(dtype: str = "fp32", device: Any = "cpu", *, max_size: Optional[int] = None,
                 budget_s: float = 0.25) -> float:
    """Measured FLOP/s of a square matmul in ``dtype`` on ``device`` (best of a few repeats).

    The size starts at 256 and doubles while one product takes under ~20 ms, up
    to ``max_size`` (1024 on the CPU, 8192 on a GPU), so an emulated dtype that
    runs at 1 GFLOP/s costs a few tenths of a second rather than minutes. A
    private generator keeps the run's RNG (restored on resume) where it was.
    """
    import torch

    device = torch.device(device)
    cuda = device.type == "cuda"
    max_size = max_size or (8192 if cuda else 1024)
    torch_dtype = _torch_dtype(dtype)

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(device)

    def timed(a: Any, b: Any, out: Any) -> float:
        sync()
        start = time.perf_counter()
        torch.mm(a, b, out=out)
        sync()
        return time.perf_counter() - start

    generator = torch.Generator(device=device).manual_seed(0)
    size = 256
    while True:
        a = torch.randn(size, size, device=device, generator=generator).to(torch_dtype)
        b = torch.randn(size, size, device=device, generator=generator).to(torch_dtype)
        out = torch.empty(size, size, device=device, dtype=torch_dtype)
        timed(a, b, out)  # warm-up: thread pools, kernel selection, cuBLAS handles
        best = timed(a, b, out)
        # Grow while cheap; small products are dominated by thread start-up on a busy machine.
        if size * 2 <= max_size and (best < 0.02 or (size < 512 and best < 0.05)):
            size *= 2
            continue
        break
    # Best of several: a shared machine's other work only ever slows a product down.
    deadline, repeats = time.perf_counter() + budget_s, 1
    while repeats < 3 or (repeats < 50 and time.perf_counter() < deadline):
        best = min(best, timed(a, b, out))
        repeats += 1
    return 2.0 * size**3 / max(best, 1e-9)


@dataclasses.dataclass(frozen=True)
class _Ratio:
    dtype: str
    half: float  # FLOP/s
    fp32: float

    @property
    def fraction(self) -> float:
        return self.half / self.fp32 if self.fp32 > 0 else 0.0

    def __str__(self) -> str:
        return f"{self.dtype} matmul {_gflops(self.half)} vs fp32 {_gflops(self.fp32)} GFLOP/s"


def _gflops(flops: float) -> str:
    g = flops / 1e9
    return f"{g:.2g}" if g < 10 else f"{g:.0f}"


@functools.lru_cache(maxsize=4)
def _cpu_ratio(dtype: str) -> _Ratio:
    return _Ratio(dtype, matmul_probe(dtype, "cpu"), matmul_probe("fp32", "cpu"))


# ---------------------------------------------------------------------------
# resolving "auto"


@dataclasses.dataclass(frozen=True)
class Resolved:
    """A concrete precision, why it was chosen, and a one-line warning when it will run slowly."""

    dtype: str  # fp32 | bf16 | fp16
    reason: str
    warning: Optional[str] = None
    dynamic_loss_scaling: bool = False  # engine precision fp16: DeepSpeed must scale the loss dynamically

    def __str__(self) -> str:
        return f"{self.dtype}: {self.reason}"


def default_device() -> str:
    """``cuda`` when a GPU is usable (and DS_ACCELERATOR does not say cpu), else ``cpu``: the --device default."""
    if os.environ.get("DS_ACCELERATOR", "") == "cpu":
        return "cpu"
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _device_type(device: Any) -> str:
    return str(device).split(":")[0] if device is not None else "cpu"


def _cuda_info(device: Any) -> tuple[str, tuple[int, int]]:
    import torch

    index = device if not isinstance(device, str) or ":" in device else None
    name = torch.cuda.get_device_name(index)
    major, minor = torch.cuda.get_device_capability(index)
    return name, (int(major), int(minor))


def _check_requested(requested: str, key: str) -> str:
    value = str(requested).strip().lower()
    if value not in ("auto",) + DTYPES:
        raise ConfigError([Problem(key, f"{requested!r} is not a precision: use auto, fp32, bf16 or fp16")])
    return value


def resolve_dtype(requested: str, device: Any = "cpu", key: str = "model.llm.dtype") -> Resolved:
    """The dtype ``requested`` (auto | fp32 | bf16 | fp16) runs in on ``device``, with the reason.

    auto: bf16 on a GPU of compute capability >= 8.0, fp16 below it; on the CPU,
    bf16 only where it is native, else fp32. An explicit value is kept; if the
    hardware cannot run it fast the result carries a warning with the measured
    ratio; bf16 on a GPU without bf16 is a ConfigError naming ``key`` and the fix.
    """
    value = _check_requested(requested, key)
    kind = _device_type(device)
    if kind == "cuda":
        name, cap = _cuda_info(device)
        has_bf16 = cap >= (8, 0)
        where = f"{name} (compute capability {cap[0]}.{cap[1]})"
        if value == "auto":
            if has_bf16:
                return Resolved("bf16", f"{where} computes bf16 natively")
            return Resolved("fp16", f"{where} has no bf16; fp16 runs on its tensor cores")
        if value == "bf16" and not has_bf16:
            raise ConfigError(
                [
                    Problem(
                        key,
                        f"bf16 needs a GPU of compute capability 8.0 (Ampere) or newer, and {where} "
                        f"has none: set {key}=auto (fp16 here) or {key}=fp16",
                    )
                ]
            )
        return Resolved(value, f"{key}={value} as configured on {where}")
    if kind != "cpu":
        if value == "auto":
            return Resolved("fp32", f"{kind} device: fp32, the precision every backend runs")
        return Resolved(value, f"{key}={value} as configured")
    # CPU
    if value == "auto":
        native, why = cpu_bf16_native()
        if native:
            return Resolved("bf16", why)
        if _env_switch() is None and "GFLOP/s" not in why:  # detected from flags: show what bf16 would cost
            why = f"{why[:-1]}; {_cpu_ratio('bf16')})"
        return Resolved("fp32", why)
    if value == "fp32":
        return Resolved("fp32", f"{key}=fp32 as configured")
    if value == "bf16":
        native, why = cpu_bf16_native()
        if native:
            return Resolved("bf16", f"{key}=bf16 as configured; {why}")
        return Resolved("bf16", f"{key}=bf16 as configured; {why}", warning=_slow_warning(key, "bf16"))
    # fp16 on the CPU: only AMX-FP16 / AVX512-FP16 run it natively; measure instead of guessing.
    ratio = _cpu_ratio("fp16")
    if ratio.fraction >= NATIVE_FRACTION:
        return Resolved("fp16", f"{key}=fp16 as configured ({ratio})")
    return Resolved("fp16", f"{key}=fp16 as configured", warning=_slow_warning(key, "fp16", ratio))


def _slow_warning(key: str, dtype: str, ratio: Optional[_Ratio] = None) -> str:
    ratio = ratio or _cpu_ratio(dtype)
    slower = 1.0 / ratio.fraction if ratio.fraction > 0 else math.inf
    return (f"{key}={dtype} runs slowly on this CPU ({ratio}, {slower:.1f}x slower): "
            f"set {key}=auto or {key}=fp32 unless this is on purpose")


def resolve_engine_precision(requested: str, device: Any = "cpu", key: str = "engine.precision") -> Resolved:
    """The DeepSpeed engine precision ``requested`` (auto | fp32 | bf16 | fp16) runs in on ``device``.

    auto: bf16 on a GPU of compute capability >= 8.0; fp16 below it, with
    ``dynamic_loss_scaling`` set (the engine JSON's ``fp16`` block with
    ``loss_scale: 0``); fp32 on the CPU, where the trainable side (connectors) is
    small and a half-precision engine would cast the frozen parts with it.
    Explicit values are checked as in :func:`resolve_dtype`.
    """
    value = _check_requested(requested, key)
    kind = _device_type(device)
    if value == "auto":
        if kind == "cuda":
            resolved = resolve_dtype("auto", device, key)
        else:
            resolved = Resolved("fp32", "on the CPU the engine keeps the small trainable side in fp32 "
                                        "(frozen parts run in their own dtype)")
    else:
        resolved = resolve_dtype(value, device, key)
    if resolved.dtype == "fp16":
        resolved = dataclasses.replace(resolved, dynamic_loss_scaling=True,
                                       reason=resolved.reason + "; DeepSpeed scales the loss dynamically")
    return resolved


# ---------------------------------------------------------------------------
# CPUs


def _cgroup_cpus(root: str = "/sys/fs/cgroup") -> Optional[float]:
    """The cgroup's CPU quota in CPUs (cgroup v2 ``cpu.max`` or v1 ``cpu.cfs_quota_us``), None when unlimited."""
    try:
        quota, period = open(os.path.join(root, "cpu.max")).read().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota = int(open(os.path.join(root, "cpu", "cpu.cfs_quota_us")).read())
        period = int(open(os.path.join(root, "cpu", "cpu.cfs_period_us")).read())
        return None if quota <= 0 else quota / period
    except (OSError, ValueError):
        return None


def cpus_for_this_rank(env: Optional[dict] = None, cgroup_root: str = "/sys/fs/cgroup") -> tuple[int, str]:
    """(CPUs this rank may use, how that was decided): affinity, cgroup quota, Slurm's --cpus-per-task, local ranks.

    Under srun each task gets ``SLURM_CPUS_PER_TASK`` CPUs; under torchrun, the
    deepspeed launcher or mpiexec the ranks of a node share its CPUs, so the node's
    share is divided by the local rank count.
    """
    env = os.environ if env is None else env
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    why = [f"{cpus} in this process's affinity"]
    quota = _cgroup_cpus(cgroup_root)
    if quota is not None and quota < cpus:
        cpus = max(1, int(quota))
        why.append(f"cgroup quota {quota:g}")
    if env.get("SLURM_CPUS_PER_TASK") and env.get("SLURM_STEP_ID") is not None:
        per_task = int(env["SLURM_CPUS_PER_TASK"])
        if per_task < cpus:
            cpus = per_task
            why.append(f"Slurm --cpus-per-task={per_task}")
    else:
        for key in ("LOCAL_WORLD_SIZE", "LOCAL_SIZE", "OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS"):
            if env.get(key, "").isdigit() and int(env[key]) > 1:
                local = int(env[key])
                cpus = max(1, cpus // local)
                why.append(f"shared by {local} local ranks ({key})")
                break
    return cpus, ", ".join(why)


# ---------------------------------------------------------------------------
# peak FLOP/s


@dataclasses.dataclass(frozen=True)
class DatasheetPeak:
    """Dense (no sparsity) peak FLOP/s of one accelerator from its datasheet; None where it has no such unit."""

    pattern: str  # regular expression searched in torch.cuda.get_device_name
    label: str
    bf16: Optional[float]
    fp16: Optional[float]
    fp32: Optional[float]  # plain fp32 (torch's default "highest" matmul precision)
    tf32: Optional[float] = None  # fp32 matmuls with torch.backends.cuda.matmul.allow_tf32 / precision "high"


T = 1e12
# Order matters: the first match wins, so specific names (H100 PCIe, L40S, A10G, V100S) precede general ones.
# fp16/bf16 are tensor-core figures with fp32 accumulation (what torch uses), dense.
DATASHEET_PEAKS: tuple[DatasheetPeak, ...] = (
    DatasheetPeak(r"\bB200\b", "B200", 2250 * T, 2250 * T, 80 * T, 1100 * T),
    DatasheetPeak(r"\bGH200\b", "GH200", 989 * T, 989 * T, 67 * T, 494 * T),
    DatasheetPeak(r"\bH200 NVL\b", "H200 NVL", 835 * T, 835 * T, 60 * T, 418 * T),
    DatasheetPeak(r"\bH200\b", "H200 SXM", 989 * T, 989 * T, 67 * T, 494 * T),
    DatasheetPeak(r"\bH100 NVL\b", "H100 NVL", 835 * T, 835 * T, 60 * T, 418 * T),
    DatasheetPeak(r"\bH100\b.*\bPCIe\b", "H100 PCIe", 756 * T, 756 * T, 51 * T, 378 * T),
    DatasheetPeak(r"\bH[18]00\b", "H100 SXM", 989 * T, 989 * T, 67 * T, 494 * T),
    DatasheetPeak(r"\bA[18]00\b", "A100", 312 * T, 312 * T, 19.5 * T, 156 * T),  # SXM4 and PCIe, 40 and 80 GB
    DatasheetPeak(r"\bA30\b", "A30", 165 * T, 165 * T, 10.3 * T, 82 * T),
    DatasheetPeak(r"\bL40S\b", "L40S", 362 * T, 362 * T, 91.6 * T, 183 * T),
    DatasheetPeak(r"\bL40\b", "L40", 181 * T, 181 * T, 90.5 * T, 90.5 * T),
    DatasheetPeak(r"\bL4\b", "L4", 121 * T, 121 * T, 30.3 * T, 60 * T),
    # NVIDIA publishes no A10G datasheet (an AWS part); its tensor peak is quoted variously: measure it.
    DatasheetPeak(r"\bA10G\b", "A10G", None, None, None, None),
    DatasheetPeak(r"\bA10\b", "A10", 125 * T, 125 * T, 31.2 * T, 62.5 * T),
    DatasheetPeak(r"\bA40\b", "A40", 149.7 * T, 149.7 * T, 37.4 * T, 74.8 * T),
    DatasheetPeak(r"RTX 6000 Ada", "RTX 6000 Ada", 364 * T, 364 * T, 91.1 * T, 182 * T),
    DatasheetPeak(r"\bA6000\b", "RTX A6000", 154.8 * T, 154.8 * T, 38.7 * T, 77.4 * T),
    DatasheetPeak(r"RTX 4090", "RTX 4090", 165.2 * T, 165.2 * T, 82.6 * T, 82.6 * T),
    DatasheetPeak(r"RTX 3090", "RTX 3090", 71 * T, 71 * T, 35.6 * T, 35.6 * T),
    DatasheetPeak(r"\bV100S\b", "V100S PCIe", None, 130 * T, 16.4 * T),
    DatasheetPeak(r"\bV100\b.*\bPCIE\b", "V100 PCIe", None, 112 * T, 14 * T),
    DatasheetPeak(r"\bV100\b", "V100 SXM2", None, 125 * T, 15.7 * T),
    DatasheetPeak(r"\bT4\b", "T4", None, 65 * T, 8.1 * T),
    DatasheetPeak(r"\bMI300X\b", "MI300X", 1307 * T, 1307 * T, 163.4 * T, 653.7 * T),
    DatasheetPeak(r"\bMI250X?\b", "MI250X", 383 * T, 383 * T, 47.9 * T),
)


def datasheet_peak(device_name: str) -> Optional[DatasheetPeak]:
    """The table row for a device name such as ``NVIDIA H100 80GB HBM3`` or ``Tesla V100-SXM2-32GB``."""
    for row in DATASHEET_PEAKS:
        if re.search(row.pattern, device_name, flags=re.IGNORECASE):
            return row
    return None


def _fp32_column() -> str:
    import torch

    return "fp32" if torch.get_float32_matmul_precision() == "highest" else "tf32"


def peak_flops(device: Any = "cpu", dtype: str = "fp32") -> tuple[float, str]:
    """(peak FLOP/s of one ``device`` in ``dtype``, where the figure came from) for MFU.

    A GPU in :data:`DATASHEET_PEAKS` gets its datasheet dense peak (source
    "datasheet H100 SXM bf16 dense"); any other device a measured matmul
    (source "measured matmul probe ..."), the fallback a small probe makes
    optimistic for MFU on a GPU. Drop-in for ``metrics.measure_peak_flops(dtype)``
    with the source to print.
    """
    dtype = _check_requested(dtype, "dtype")
    if dtype == "auto":
        raise ValueError("peak_flops needs a resolved dtype (fp32, bf16 or fp16), not auto")
    kind = _device_type(device)
    if kind == "cuda":
        name, _ = _cuda_info(device)
        row = datasheet_peak(name)
        column = _fp32_column() if dtype == "fp32" else dtype
        value = getattr(row, column, None) if row is not None else None
        if value is None and column == "tf32" and row is not None:
            column, value = "fp32", row.fp32
        if value:
            return float(value), f"datasheet {row.label} {column} dense"
        why = "not in the datasheet table" if row is None else f"no datasheet {dtype} figure for {row.label}"
        return matmul_probe(dtype, device), f"measured matmul probe ({dtype} on {name}: {why})"
    return matmul_probe(dtype, device), f"measured matmul probe ({dtype} on the {kind.upper()})"
