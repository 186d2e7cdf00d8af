"""Benchmarks 1 and 2: the same stage-2 step by mmdist and by the usual choice, side by side,
and each one's achieved FLOP/s against a dense matmul measured in the same run.

Both sides: a SmolLM2-135M-shaped frozen LLM (random weights), the same small
frozen CLIP vision tower (64 image tokens), a trainable 2-layer GELU projector,
the same variable-length samples (answers of 8 to 160 tokens), the same global
batch, fp32 on CPU, the same thread count.

* mmdist: ``mmdist.models.build.build_model`` (FusedVLM), ``mmdist.data.collate.collate_fuse``
  with packing, ``mmdist.training.engine.build_engine`` (DeepSpeed, ZeRO-0,
  torch AdamW) and the trainer's own optimizer step,
  ``mmdist.training.step.train_step``.
* reference: benchmarks/reference_llava.py.

The dense-matmul peak is measured before and after the two contenders and
averaged, so a machine shared with other jobs shifts all figures alike.

Run: ``python benchmarks/throughput.py`` (or through ``python benchmarks/run_all.py``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch
from common import BenchShape, Sample, format_table, make_samples, matmul_peak, mmdist_config, set_threads
from reference_llava import ReferenceLoop

from mmdist.launch_env import free_port


class MmdistLoop:
    """mmdist's FusedVLM + packing + DeepSpeed engine, one
    optimizer step at a time through the trainer's ``train_step``.

    ``close()`` releases the engine (DeepSpeed's groups, its shm buffer) and the process group.
    """

    def __init__(self, shape: BenchShape, global_batch: int, micro_batch: int, max_len: int = 512,
                 checkpointing: bool = False):
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        os.environ.update(
            MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0"
        )
        from mmdist import distributed as dist
        from mmdist.training.engine import build_engine
        from mmdist.training.step import TrainState

        self.shape, self.global_batch, self.micro_batch, self.max_len = shape, global_batch, micro_batch, max_len
        self.checkpointing = checkpointing
        self.name = f"mmdist (FusedVLM, packing to {max_len}, DeepSpeed ZeRO-0{', ckpt' if checkpointing else ''})"
        cfg = mmdist_config(shape, global_batch, micro_batch, max_len, checkpointing)
        dist.init(backend="gloo")
        self.bundle = build_engine(cfg, world_size=1)
        self.engine, self.model = self.bundle.engine, self.bundle.model
        self.count = self.model.flop_count()  # the trainer's bar counts the same
        self.accumulation = self.bundle.ds_config["gradient_accumulation_steps"]
        self.state = TrainState()
        self.engine.train()

    def step(self, group: list[Sample]) -> dict:
        from mmdist.data.collate import collate_fuse
        from mmdist.training.step import train_step

        image_id = self.model.image_token_id
        rows = [
            {
                "input_ids": [image_id if t < 0 else t for t in s.ids],
                "labels": s.labels,
                "pixel_values": [s.pixel_values],
            }
            for s in group
        ]
        micro = [collate_fuse(rows[i:i + self.micro_batch], pad_token_id=0, pack=True, max_len=self.max_len)
                 for i in range(0, self.global_batch, self.micro_batch)]
        assert len(micro) == self.accumulation, (len(micro), self.accumulation)
        t = time.perf_counter()
        # max_nonfinite_steps=1: a NaN loss stops the benchmark (there is no next batch to take its place)
        train_step(self.engine, iter(micro), self.state, max_nonfinite_steps=1)
        seconds = time.perf_counter() - t
        real = sum(int(b["attention_mask"].sum()) for b in micro)
        padded = sum(b["attention_mask"].numel() for b in micro)
        counts = [self.model.batch_counts(b) for b in micro]
        flops = sum(self.count.step(c.tokens, c.supervised_tokens, c.image_tokens, c.images, c.samples) for c in counts)
        return dict(seconds=seconds, real=real, padded=padded, flops=flops)

    def frozen_params_with_grad(self) -> int:
        return sum(1 for p in self.model.parameters() if not p.requires_grad and p.grad is not None)

    def close(self) -> None:
        from mmdist import distributed as dist

        self.bundle.close()
        self.engine = self.model = None  # the engine is destroyed: let the model go with it
        dist.shutdown()


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def run(steps: int = 5, global_batch: int = 8, micro_batch: int = 8, max_len: int = 512, threads: int | None = None,
        peak_seconds: float = 1.0, dtype: str = "fp32") -> tuple[list[dict], dict]:
    """The contenders interleaved step by step, a matmul peak measured between every two steps.

    A shared machine's load changes by the minute, so each step is compared with the
    peak measured just before and after it, and the contenders take turns (the order
    rotates every round). Round 0 warms up and is not counted. Reported: total real
    tokens / total seconds, and the median over rounds of each step's fraction of its
    adjacent peak and of the per-round tokens/s ratio.
    """
    threads = set_threads(threads)
    shape = BenchShape(dtype={"fp32": torch.float32, "bf16": torch.bfloat16}[dtype])
    samples = make_samples((steps + 1) * global_batch, shape, seed=0)
    mm = MmdistLoop(shape, global_batch, micro_batch, max_len)
    try:
        ref = ReferenceLoop(shape, global_batch, micro_batch, flops=mm.count)  # the same count for the same samples
        contenders = [("mmdist", mm.name, mm.step), ("reference", ref.name, ref.step)]
        records: dict[str, list[dict]] = {key: [] for key, _, _ in contenders}
        peaks = []
        for rnd in range(steps + 1):
            group = samples[rnd * global_batch:(rnd + 1) * global_batch]
            order = contenders[rnd % len(contenders):] + contenders[:rnd % len(contenders)]
            before = matmul_peak(shape.dtype, seconds=peak_seconds)
            for key, _, step in order:
                rec = step(group)
                after = matmul_peak(shape.dtype, seconds=peak_seconds)
                rec["peak"] = (before + after) / 2
                peaks.append(after)
                before = after
                if rnd > 0:
                    records[key].append(rec)
        frozen_with_grad = mm.frozen_params_with_grad()
    finally:
        mm.close()
    results = {}
    for key, name, _ in contenders:
        recs = records[key]
        seconds = sum(r["seconds"] for r in recs)
        results[key] = dict(name=name, seconds=seconds, tokens_per_s=sum(r["real"] for r in recs) / seconds,
                            real_fraction=sum(r["real"] for r in recs) / sum(r["padded"] for r in recs),
                            flops_per_s=sum(r["flops"] for r in recs) / seconds,
                            fraction_of_peak=_median([r["flops"] / r["seconds"] / r["peak"] for r in recs]),
                            steps=[{k: v for k, v in r.items()} for r in recs])

    def round_ratio(key: str) -> float:
        return _median([(a["real"] / a["seconds"]) / (b["real"] / b["seconds"])
                        for a, b in zip(records[key], records["reference"])])

    rows = [{"contender": r["name"], "real tokens/s": r["tokens_per_s"], "real-token fraction": r["real_fraction"],
             "GFLOP/s": r["flops_per_s"] / 1e9, "of matmul peak (median)": r["fraction_of_peak"],
             "s/step": r["seconds"] / steps} for r in results.values()]
    summary = dict(ratio=round_ratio("mmdist"), mmdist_fraction_of_peak=results["mmdist"]["fraction_of_peak"],
                   reference_fraction_of_peak=results["reference"]["fraction_of_peak"],
                   peak_gflops=_median(peaks) / 1e9, peak_min_gflops=min(peaks) / 1e9, peak_max_gflops=max(peaks) / 1e9,
                   threads=threads, dtype=dtype, frozen_params_with_grad=frozen_with_grad,
                   # what the data pipeline must keep up with: samples a training step consumes per second
                   train_step_samples_per_s=global_batch * steps / results["mmdist"]["seconds"],
                   mmdist=results["mmdist"], reference=results["reference"])
    return rows, summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5, help="timed optimizer steps per contender (one more warms up)")
    parser.add_argument("--global-batch", type=int, default=8)
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument(
        "--max-len",
        type=int,
        default=512,
        help="mmdist's packed row length (2-3 samples: SDPA computes the whole row x row block-diagonal mask)",
    )
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads for everything (default: all allowed cores)"
    )
    parser.add_argument("--json", help="also write the rows and summary here")
    parser.add_argument(
        "--dtype", choices=["fp32", "bf16"], default="fp32", help="dtype of both contenders and of the matmul peak"
    )
    args = parser.parse_args()
    rows, s = run(args.steps, args.global_batch, args.micro_batch, args.max_len, args.threads, dtype=args.dtype)
    print(format_table(rows, ["contender", "real tokens/s", "real-token fraction", "GFLOP/s", "of matmul peak (median)",
                              "s/step"]))
    print(
        f"mmdist / reference tokens/s (median per round): {s['ratio']:.2f}x; matmul peak median {s['peak_gflops']:.1f} "
        f"GFLOP/s {s['dtype']} (min {s['peak_min_gflops']:.1f}, "
        f"max {s['peak_max_gflops']:.1f}), {s['threads']} thread(s); "
        f"frozen parameters holding a gradient: {s['frozen_params_with_grad']}"
    )
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "summary": s}, indent=1, default=str))


if __name__ == "__main__":
    main()
