"""Run every side-by-side benchmark and print one table (plus each benchmark's own detail).

1. the same stage-2 step by mmdist and by transformers' LlavaForConditionalGeneration
   (benchmarks/throughput.py): real tokens/s and their ratio (target >= 1.5x);
2. the same runs' achieved FLOP/s over a dense matmul of the same dtype and threads
   (target >= 0.65 for mmdist);
3. bytes per rank held by DeepSpeed engines for 1 and 2 ranks and ZeRO 0, 2, 3 beside
   ``mmdist plan``'s prediction (benchmarks/memory_per_rank.py);
4. the data pipeline's figures (benchmarks/bench_data.py): loader samples/s, non-padding
   fraction of pad-to-longest vs packing, stage-1 epoch with and without the feature cache;
5. images/s per core from photo-like JPEG shards to 336 px tower input, mmdist's loader vs
   webdataset + CLIPImageProcessor per sample (benchmarks/bench_images.py; target >= 2.5x).

The first line names the machine: CPU model, cores and its AVX/AMX flags (bf16 runs fast
only with ``amx_bf16`` or ``avx512_bf16``), and ``MMDIST_CPU_BF16`` when it is set.

Each benchmark runs in its own process (clean DeepSpeed and thread state) and hands
its figures back as JSON. ``--markdown FILE`` also writes the tables as Markdown.

    python benchmarks/run_all.py            # about 15-25 minutes on a 2-core machine
    python benchmarks/run_all.py --quick    # fewer steps and samples
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import format_table

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def _run(args: list[str], json_path: Path, timeout: int) -> dict:
    env = dict(os.environ, PYTHONPATH=f"{ROOT}:{os.environ.get('PYTHONPATH', '')}", DS_ACCELERATOR="cpu")
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, *args, "--json", str(json_path)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)
    took = time.perf_counter() - start
    lines = [ln for ln in proc.stdout.splitlines() if "[WARNING]" not in ln and "[INFO]" not in ln]
    print("\n".join(lines[-40:]))
    if proc.returncode:
        print(proc.stderr[-4000:], file=sys.stderr)
        raise SystemExit(f"{args[0]} failed with exit code {proc.returncode}")
    print(f"({args[0]}: {took:.0f} s)\n")
    return json.loads(json_path.read_text())


def machine_line() -> str:
    """CPU model, cores, AVX/AMX flags and the bf16 switch: what every figure here depends on."""
    from bench_images import cpu_description

    model = ""
    try:
        model = next(ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                     if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    switch = os.environ.get("MMDIST_CPU_BF16")
    return f"machine: {model} ({cpu_description()})" + (f"; MMDIST_CPU_BF16={switch}" if switch is not None else "")


def summary_rows(tp: dict | None, mem: list | None, data: dict | None, images: dict | None = None) -> list[dict]:
    rows: list[dict] = []

    def add(bench: str, measure: str, mmdist, reference, target: str, met) -> None:
        rows.append({"benchmark": bench, "measure": measure, "mmdist": mmdist, "reference / other": reference,
                     "target": target, "met": "-" if met is None else ("yes" if met else "NO")})

    if tp:
        s = tp["summary"]
        mm, ref = s["mmdist"], s["reference"]
        add("1 same step", "real tokens/s", mm["tokens_per_s"], ref["tokens_per_s"], "ratio >= 1.5", s["ratio"] >= 1.5)
        add("1 same step", "ratio mmdist / reference", s["ratio"], "", ">= 1.5", s["ratio"] >= 1.5)
        add("1 same step", "real-token fraction", mm["real_fraction"], ref["real_fraction"], "", None)
        add("2 vs machine", "achieved / matmul peak", s["mmdist_fraction_of_peak"], s["reference_fraction_of_peak"],
            ">= 0.65", s["mmdist_fraction_of_peak"] >= 0.65)
        if "mmdist_fraction_of_peak_executed" in s:
            add("2 vs machine", "achieved / peak, executed FLOPs only", s["mmdist_fraction_of_peak_executed"], "", "",
                None)
        add(
            "2 vs machine",
            f"matmul peak GFLOP/s ({s['dtype']})",
            s["peak_gflops"],
            f"{s['threads']} thread(s)",
            "",
            None,
        )
    if mem:
        worst = 0.0
        for r in mem:
            for kind in ("frozen", "trainable", "grads", "optim"):
                m, p = r[f"{kind} B"], r[f"pred {kind} B"]
                worst = max(worst, abs(m - p) / max(p, 1))
        add("3 memory", "plan vs measured, worst error", f"{worst:.1%}", "", "<= 10%", worst <= 0.10)
        add("3 memory", "frozen params with grad / in optimizer",
            max(r["frozen w/ grad"] for r in mem), max(r["frozen in optim"] for r in mem), "0 / 0",
            all(r["frozen w/ grad"] == 0 and r["frozen in optim"] == 0 for r in mem))
        by = {(r["ranks"], r["zero"]): r for r in mem}
        if (1, 3) in by and (2, 3) in by:
            ratio = by[(2, 3)]["frozen B"] / by[(1, 3)]["frozen B"]
            add("3 memory", "ZeRO-3 frozen bytes/rank, 2 ranks / 1 rank", ratio, "", "<= 0.55", ratio <= 0.55)
        for r in mem:
            add("3 memory", f"{r['ranks']} rank(s) ZeRO-{r['zero']}: peak RSS MiB", r["peak RSS MiB"], "", "", None)
    if data:
        for t in data.get("throughput", []):
            add("4 data", f"loader samples/s, {t['workers']} worker(s)", t["samples_per_s"], "", "", None)
        if tp and "train_step_samples_per_s" in tp["summary"]:
            add("4 data", "samples/s a training step consumes (benchmark 1, mmdist)",
                round(tp["summary"]["train_step_samples_per_s"], 2), "", "", None)
        npad = data.get("non_padding", {})
        if npad:
            add("4 data", "non-padding fraction (packing vs pad-to-longest)", npad["packing"], npad["pad_to_longest"],
                "packing >= 0.95", npad["packing"] >= 0.95)
        st = data.get("stage1_cache")
        if st:
            add("4 data", "stage-1 epoch s (feature cache vs pixels)", st["cache_s"], st["pixels_s"], "speed-up >= 3x",
                st["speedup"] >= 3)
            if "image_text_cache_s" in st:
                add("4 data", "stage-1 epoch s (image+text cache vs pixels)", st["image_text_cache_s"], st["pixels_s"],
                    "speed-up >= 3x", st["speedup_image_text"] >= 3)
        demo = data.get("demo_stage1_cache")
        if demo:
            add("4 data", "demo stage-1 epoch s (image+text cache vs pixels)", demo["image_text_cache_s"],
                demo["pixels_s"], "", None)
    if images:
        for r in images["rows"]:
            add("5 images", f"images/s per core, {r['cores']} core(s)", r["mmdist_per_core"], r["usual_per_core"],
                "ratio >= 2.5", r["ratio"] >= 2.5)
        check = images["pixel_check"]
        add(
            "5 images",
            "pixels vs CLIPImageProcessor, mean / p99 levels",
            check["mean_levels"],
            check["p99_levels"],
            "",
            None,
        )
        for gpu, need in images["cores_per_gpu"].items():
            add("5 images", f"CPU cores per {gpu} for ViT-L/14-336", need["cores_per_gpu"], "", "", None)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps and samples (a smoke run)")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads for benchmarks 1-2 (default: all cores)"
    )
    parser.add_argument(
        "--dtype", choices=["fp32", "bf16"], default="fp32", help="dtype of benchmarks 1-2 (both sides)"
    )
    parser.add_argument("--skip", nargs="*", default=[], choices=["throughput", "memory", "data", "images"])
    parser.add_argument("--markdown", help="also write the summary table here")
    args = parser.parse_args()
    tp = mem = data = images = None
    print(machine_line() + "\n")
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        if "throughput" not in args.skip:
            cmd = ["benchmarks/throughput.py", "--steps", "1" if args.quick else "5"]
            if args.threads:
                cmd += ["--threads", str(args.threads)]
            cmd += ["--dtype", args.dtype]
            tp = _run(cmd, t / "throughput.json", timeout=3600)
        if "memory" not in args.skip:
            mem = _run(["benchmarks/memory_per_rank.py"], t / "memory.json", timeout=1800)
        if "data" not in args.skip:
            if (HERE / "bench_data.py").is_file():
                extra = ["--samples", "128", "--stage1-samples", "128"] if args.quick else []
                data = _run(["benchmarks/bench_data.py", *extra], t / "data.json", timeout=1800)
            else:
                print("benchmarks/bench_data.py is not there yet: data figures skipped\n")
        if "images" not in args.skip:
            extra = ["--images", "128", "--rounds", "1"] if args.quick else []
            images = _run(["benchmarks/bench_images.py", *extra], t / "images.json", timeout=1800)
    rows = summary_rows(tp, mem, data, images)
    table = format_table(rows, ["benchmark", "measure", "mmdist", "reference / other", "target", "met"])
    print(table)
    if args.markdown:
        Path(args.markdown).write_text(machine_line() + "\n\n" + table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
