"""mmdist.hardware: CPU bf16 detection (flags, probe, env switch), resolving ``auto``, the datasheet peak table.

No GPU is needed: the CUDA branches run with torch.cuda's queries monkeypatched,
and both CPU branches run on any machine through MMDIST_CPU_BF16 or fake flags.
"""

from __future__ import annotations

import pytest
import torch

from mmdist import hardware
from mmdist.settings import ConfigError

X86_WITH_BF16 = """\
processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 9R14
flags\t\t: fpu vme de pse sse sse2 avx avx2 fma avx512f avx512bw avx512_bf16 avx512vl
bogomips\t: 5199.99
"""
X86_WITH_AMX = X86_WITH_BF16.replace("avx512_bf16", "amx_tile amx_bf16 amx_int8")
X86_WITHOUT = X86_WITH_BF16.replace(" avx512f avx512bw avx512_bf16 avx512vl", "")
ARM = """\
processor\t: 0
BogoMIPS\t: 243.75
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid bf16 sve
CPU implementer\t: 0x41
"""
LSCPU = """\
Architecture:                            x86_64
Model name:                              AMD EPYC
Flags:                                   fpu vme sse2 avx2 fma
"""


CACHED = (hardware.cpu_flags, hardware._detect_cpu_bf16, hardware._cpu_ratio)  # before any monkeypatching


@pytest.fixture(autouse=True)
def fresh_detection(monkeypatch):
    """Every test starts with no env switch and no cached answer, and leaves none behind."""
    monkeypatch.delenv(hardware.CPU_BF16_ENV, raising=False)
    monkeypatch.delenv("DS_ACCELERATOR", raising=False)
    for cached in CACHED:
        cached.cache_clear()
    yield
    for cached in CACHED:
        cached.cache_clear()


def fake_flags(monkeypatch, text):
    flags = hardware.parse_cpu_flags(text)
    monkeypatch.setattr(hardware, "cpu_flags", lambda: (frozenset(flags) if flags else None, "/proc/cpuinfo flags"))


def fake_probe(monkeypatch, **gflops):
    """matmul_probe returns the given GFLOP/s per dtype (a 2-core AVX2-only EPYC's figures by default)."""
    rates = {"fp32": 138.0, "bf16": 0.9, "fp16": 0.9} | gflops
    calls = []

    def probe(dtype="fp32", device="cpu", **kwargs):
        calls.append((dtype, str(device)))
        return rates[dtype] * 1e9

    monkeypatch.setattr(hardware, "matmul_probe", probe)
    return calls


def fake_gpu(monkeypatch, name, capability):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)


# ---------------------------------------------------------------------------
# CPU flags and native bf16


def test_parse_cpu_flags_reads_x86_cpuinfo_and_lscpu():
    assert {"avx512_bf16", "avx2", "fma"} <= hardware.parse_cpu_flags(X86_WITH_BF16)
    assert "avx512_bf16" not in hardware.parse_cpu_flags(X86_WITHOUT)
    assert "amx_bf16" in hardware.parse_cpu_flags(X86_WITH_AMX)
    assert hardware.parse_cpu_flags(LSCPU) == {"fpu", "vme", "sse2", "avx2", "fma"}
    # ARM lists "Features", whose names say nothing about oneDNN's bf16 kernels: cannot tell.
    assert hardware.parse_cpu_flags(ARM) is None
    assert hardware.parse_cpu_flags("") is None


@pytest.mark.parametrize("text, native, flag", [(X86_WITH_BF16, True, "avx512_bf16"), (X86_WITH_AMX, True, "amx_bf16"),
                                                (X86_WITHOUT, False, "no amx_bf16 or avx512_bf16")],
                         ids=["avx512_bf16", "amx", "avx2-only"])
def test_native_bf16_from_flags(monkeypatch, text, native, flag):
    fake_flags(monkeypatch, text)
    calls = fake_probe(monkeypatch)
    found, reason = hardware.cpu_bf16_native()
    assert found is native
    assert flag in reason and "/proc/cpuinfo" in reason
    assert calls == [], "flags decide without a probe"


@pytest.mark.parametrize("bf16_gflops, shown, native", [(0.9, "0.9", False), (250.0, "250", True)])
def test_probe_decides_when_no_flags_can_be_read(monkeypatch, bf16_gflops, shown, native):
    monkeypatch.setattr(hardware, "cpu_flags", lambda: (None, "no CPU flags readable"))
    fake_probe(monkeypatch, bf16=bf16_gflops)
    found, reason = hardware.cpu_bf16_native()
    assert found is native
    assert f"bf16 matmul {shown} vs fp32 138 GFLOP/s" in reason


def test_detection_is_cached_per_process(monkeypatch):
    monkeypatch.setattr(hardware, "cpu_flags", lambda: (None, "no CPU flags readable"))
    calls = fake_probe(monkeypatch)
    hardware.cpu_bf16_native()
    hardware.cpu_bf16_native()
    assert calls.count(("bf16", "cpu")) == 1


@pytest.mark.parametrize("value, text, expected", [("0", X86_WITH_AMX, False), ("1", X86_WITHOUT, True)])
def test_env_switch_overrides_the_flags_both_ways(monkeypatch, value, text, expected):
    fake_flags(monkeypatch, text)
    calls = fake_probe(monkeypatch)
    monkeypatch.setenv(hardware.CPU_BF16_ENV, value)
    found, reason = hardware.cpu_bf16_native()
    assert found is expected
    assert f"MMDIST_CPU_BF16={value}" in reason
    assert calls == []


def test_real_probe_measures_a_positive_rate_quickly():
    import time

    start = time.perf_counter()
    rate = hardware.matmul_probe("fp32", "cpu", max_size=256, budget_s=0.05)
    assert rate > 1e6 and time.perf_counter() - start < 5


# ---------------------------------------------------------------------------
# resolve_dtype / resolve_engine_precision on the CPU (both branches, whatever this CPU has)


def test_auto_on_cpu_without_native_bf16_is_fp32_with_the_measured_reason(monkeypatch):
    fake_flags(monkeypatch, X86_WITHOUT)
    fake_probe(monkeypatch)
    r = hardware.resolve_dtype("auto", "cpu", "model.llm.dtype")
    assert r.dtype == "fp32" and r.warning is None
    assert str(r) == ("fp32: this CPU has no native bf16 (no amx_bf16 or avx512_bf16 in /proc/cpuinfo flags; "
                      "bf16 matmul 0.9 vs fp32 138 GFLOP/s)")


@pytest.mark.parametrize("switch, dtype", [("0", "fp32"), ("1", "bf16")])
def test_auto_on_cpu_follows_the_env_switch(monkeypatch, switch, dtype):
    monkeypatch.setenv(hardware.CPU_BF16_ENV, switch)
    calls = fake_probe(monkeypatch)
    for key in ("model.llm.dtype", "model.vision.dtype", "model.text.dtype"):
        r = hardware.resolve_dtype("auto", "cpu", key)
        assert r.dtype == dtype and r.warning is None
        assert f"MMDIST_CPU_BF16={switch}" in r.reason
    assert calls == [], "a forced answer needs no probe"


def test_explicit_bf16_on_a_cpu_without_it_is_kept_with_a_one_line_warning(monkeypatch):
    monkeypatch.setenv(hardware.CPU_BF16_ENV, "0")
    fake_probe(monkeypatch)
    r = hardware.resolve_dtype("bf16", "cpu", "model.llm.dtype")
    assert r.dtype == "bf16"
    assert r.warning is not None and "\n" not in r.warning
    assert "model.llm.dtype=bf16" in r.warning and "bf16 matmul 0.9 vs fp32 138 GFLOP/s" in r.warning
    assert "153.3x slower" in r.warning and "model.llm.dtype=auto" in r.warning


def test_explicit_values_on_a_fast_cpu_carry_no_warning(monkeypatch):
    monkeypatch.setenv(hardware.CPU_BF16_ENV, "1")
    fake_probe(monkeypatch, bf16=300.0, fp16=200.0)
    assert hardware.resolve_dtype("bf16", "cpu").warning is None
    assert hardware.resolve_dtype("fp32", "cpu").warning is None
    assert hardware.resolve_dtype("fp16", "cpu").warning is None


def test_explicit_fp16_on_a_cpu_that_emulates_it_warns(monkeypatch):
    fake_probe(monkeypatch, fp16=1.5)
    r = hardware.resolve_dtype("fp16", "cpu", "model.vision.dtype")
    assert r.dtype == "fp16" and "model.vision.dtype=fp16" in r.warning and "fp16 matmul 1.5" in r.warning


def test_engine_auto_on_cpu_is_fp32_without_loss_scaling(monkeypatch):
    monkeypatch.setenv(hardware.CPU_BF16_ENV, "1")
    r = hardware.resolve_engine_precision("auto", "cpu")
    assert r.dtype == "fp32" and not r.dynamic_loss_scaling


def test_unknown_precision_is_a_config_error_naming_the_key():
    with pytest.raises(ConfigError, match=r"engine\.precision: 'bf32' is not a precision"):
        hardware.resolve_engine_precision("bf32", "cpu")


# ---------------------------------------------------------------------------
# CUDA branches (torch.cuda's queries monkeypatched)


def test_auto_on_an_ampere_or_newer_gpu_is_bf16(monkeypatch):
    fake_gpu(monkeypatch, "NVIDIA H100 80GB HBM3", (9, 0))
    r = hardware.resolve_dtype("auto", "cuda", "model.llm.dtype")
    assert r.dtype == "bf16" and "compute capability 9.0" in r.reason
    e = hardware.resolve_engine_precision("auto", "cuda:0")
    assert e.dtype == "bf16" and not e.dynamic_loss_scaling


def test_auto_on_a_gpu_without_bf16_is_fp16_and_the_engine_scales_the_loss(monkeypatch):
    fake_gpu(monkeypatch, "Tesla T4", (7, 5))
    r = hardware.resolve_dtype("auto", "cuda", "model.vision.dtype")
    assert r.dtype == "fp16" and "Tesla T4" in r.reason and "no bf16" in r.reason
    e = hardware.resolve_engine_precision("auto", "cuda")
    assert e.dtype == "fp16" and e.dynamic_loss_scaling and "loss" in e.reason
    assert hardware.resolve_engine_precision("fp16", "cuda").dynamic_loss_scaling


def test_explicit_bf16_on_a_gpu_without_bf16_is_an_error_naming_the_key_and_fix(monkeypatch):
    fake_gpu(monkeypatch, "Tesla V100-SXM2-32GB", (7, 0))
    with pytest.raises(ConfigError) as info:
        hardware.resolve_dtype("bf16", "cuda", "model.llm.dtype")
    message = str(info.value)
    assert "model.llm.dtype" in message and "Tesla V100-SXM2-32GB" in message and "7.0" in message
    assert "model.llm.dtype=fp16" in message or "model.llm.dtype=auto" in message
    with pytest.raises(ConfigError, match=r"engine\.precision: bf16 needs"):
        hardware.resolve_engine_precision("bf16", "cuda")


def test_explicit_fp32_and_fp16_on_a_gpu_are_kept(monkeypatch):
    fake_gpu(monkeypatch, "Tesla V100-SXM2-32GB", (7, 0))
    assert hardware.resolve_dtype("fp16", "cuda").dtype == "fp16"
    assert hardware.resolve_dtype("fp32", "cuda").dtype == "fp32"


@pytest.mark.parametrize(
    "available, accelerator, expected", [(True, None, "cuda"), (False, None, "cpu"), (True, "cpu", "cpu")]
)
def test_default_device(monkeypatch, available, accelerator, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: available)
    if accelerator:
        monkeypatch.setenv("DS_ACCELERATOR", accelerator)
    assert hardware.default_device() == expected


# ---------------------------------------------------------------------------
# the datasheet peak table


@pytest.mark.parametrize("name, label", [
    ("NVIDIA H100 80GB HBM3", "H100 SXM"), ("NVIDIA H100 PCIe", "H100 PCIe"), ("NVIDIA H100 NVL", "H100 NVL"),
    ("NVIDIA H200", "H200 SXM"), ("NVIDIA GH200 480GB", "GH200"),
    ("NVIDIA A100-SXM4-80GB", "A100"), ("NVIDIA A100-SXM4-40GB", "A100"), ("NVIDIA A100-PCIE-40GB", "A100"),
    ("NVIDIA A100 80GB PCIe", "A100"), ("NVIDIA L40S", "L40S"), ("NVIDIA L40", "L40"), ("NVIDIA L4", "L4"),
    ("NVIDIA A10", "A10"), ("NVIDIA A10G", "A10G"), ("Tesla V100-SXM2-32GB", "V100 SXM2"),
    ("Tesla V100-PCIE-16GB", "V100 PCIe"), ("Tesla V100S-PCIE-32GB", "V100S PCIe"), ("Tesla T4", "T4"),
    ("NVIDIA GeForce RTX 4090", "RTX 4090"), ("NVIDIA RTX A6000", "RTX A6000"),
    ("NVIDIA RTX 6000 Ada Generation", "RTX 6000 Ada"),
])
def test_datasheet_rows_match_device_names(name, label):
    row = hardware.datasheet_peak(name)
    assert row is not None and row.label == label


def test_datasheet_peak_is_used_for_a_known_gpu(monkeypatch):
    fake_gpu(monkeypatch, "NVIDIA H100 80GB HBM3", (9, 0))
    calls = fake_probe(monkeypatch)
    assert hardware.peak_flops("cuda", "bf16") == (989e12, "datasheet H100 SXM bf16 dense")
    flops, source = hardware.peak_flops("cuda", "fp32")
    assert source in ("datasheet H100 SXM fp32 dense", "datasheet H100 SXM tf32 dense")
    assert calls == []


def test_fp32_peak_follows_the_tf32_setting(monkeypatch):
    fake_gpu(monkeypatch, "NVIDIA A100-SXM4-80GB", (8, 0))
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        assert hardware.peak_flops("cuda", "fp32") == (19.5e12, "datasheet A100 fp32 dense")
        torch.set_float32_matmul_precision("high")
        assert hardware.peak_flops("cuda", "fp32") == (156e12, "datasheet A100 tf32 dense")
    finally:
        torch.set_float32_matmul_precision(before)


@pytest.mark.parametrize(
    "name, dtype, why",
    [
        ("NVIDIA Mystery GPU 9000", "bf16", "not in the datasheet table"),
        ("Tesla V100-SXM2-32GB", "bf16", "no datasheet bf16 figure for V100 SXM2"),
        ("NVIDIA A10G", "fp16", "no datasheet fp16 figure for A10G"),
    ],
)
def test_probe_is_the_fallback_where_the_table_has_no_figure(monkeypatch, name, dtype, why):
    fake_gpu(monkeypatch, name, (8, 6))
    calls = fake_probe(monkeypatch, bf16=50_000.0, fp16=60_000.0)
    flops, source = hardware.peak_flops("cuda", dtype)
    assert calls == [(dtype, "cuda")]
    assert flops == {"bf16": 50e12, "fp16": 60e12}[dtype]
    assert source.startswith("measured matmul probe") and why in source


def test_cpu_peak_is_measured(monkeypatch):
    calls = fake_probe(monkeypatch)
    flops, source = hardware.peak_flops("cpu", "fp32")
    assert flops == 138e9 and source == "measured matmul probe (fp32 on the CPU)" and calls == [("fp32", "cpu")]
    with pytest.raises(ValueError, match="resolved dtype"):
        hardware.peak_flops("cpu", "auto")


def test_cpus_for_this_rank_reads_cgroup_slurm_and_local_ranks(tmp_path, monkeypatch):
    from mmdist.hardware import cpus_for_this_rank

    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(16)))
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert cpus_for_this_rank({}, str(tmp_path))[0] == 16
    assert cpus_for_this_rank({"LOCAL_WORLD_SIZE": "8"}, str(tmp_path)) == (
        2,
        "16 in this process's affinity, shared by 8 local ranks (LOCAL_WORLD_SIZE)",
    )
    assert (
        cpus_for_this_rank({"SLURM_CPUS_PER_TASK": "6", "SLURM_STEP_ID": "0", "LOCAL_WORLD_SIZE": "8"}, str(tmp_path))[
            0
        ]
        == 6
    )
    (tmp_path / "cpu.max").write_text("400000 100000\n")
    cpus, why = cpus_for_this_rank({}, str(tmp_path))
    assert cpus == 4 and "cgroup quota 4" in why
