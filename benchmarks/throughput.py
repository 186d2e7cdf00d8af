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
from typing import Any

import torch
from common import BenchShape, Sample, format_table, llm_matmul_params, make_samples, matmul_peak, set_threads, step_flops, tiny_recipe
from reference_llava import ReferenceLoop

from mmdist.launch_env import free_port


def mmdist_config(shape: BenchShape, global_batch: int, micro_batch: int, max_len: int, checkpointing: bool = False) -> Any:
    """The RunConfig of the mmdist side: same shapes and dtype as the reference, packing on, ZeRO-0, torch AdamW."""
    from mmdist.config.run import load_config

    vision = dict(shape.vision)
    base = tiny_recipe("fuse")
    base["model"]["llm"]["init_config"] = dict(shape.llm)
    base["model"]["llm"]["gradient_checkpointing"] = checkpointing
    base["model"]["vision"]["init_config"] = vision
    base["model"]["vision"]["select_layer"] = -2
    base["model"]["vision"]["select_tokens"] = "patch"
    base["data"].update(max_len=max_len, packing=True, eval=[])
    base["train"].update(global_batch_size=global_batch, micro_batch_size=micro_batch, max_steps=100, warmup_ratio=0.0,
                         lr_scheduler="constant", lr=1e-3)
    precision = "bf16" if shape.dtype == torch.bfloat16 else "fp32"
    base["model"]["llm"]["dtype"] = base["model"]["vision"]["dtype"] = precision
    base["engine"] = {"zero_stage": 0, "precision": precision, "torch_adam": True, "backend": "gloo"}
    base["log"] = {"progress_bar": False, "tensorboard": False, "param_table": False}
    base["run_dir"] = os.path.join(os.environ.get("TMPDIR", "/tmp"), "mmdist-bench-throughput")
    return load_config(base=base)



class MmdistLoop:
    """mmdist's FusedVLM + packing + DeepSpeed engine, one optimizer step at a time through the trainer's ``train_step``.

    ``close()`` releases the engine (DeepSpeed's groups, its shm buffer) and the process group.
    """

    def __init__(self, shape: BenchShape, global_batch: int, micro_batch: int, max_len: int = 512,
                 checkpointing: bool = False):
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
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
        self.accumulation = self.bundle.ds_config["gradient_accumulation_steps"]
        self.state = TrainState()
        self.engine.train()

    def step(self, group: list[Sample]) -> dict:
        from mmdist.data.collate import collate_fuse
        from mmdist.training.step import train_step

        image_id = self.model.image_token_id
        rows = [{"input_ids": [image_id if t < 0 else t for t in s.ids], "labels": s.labels, "pixel_values": [s.pixel_values]}
                for s in group]
        micro = [collate_fuse(rows[i:i + self.micro_batch], pad_token_id=0, pack=True, max_len=self.max_len)
                 for i in range(0, self.global_batch, self.micro_batch)]
        assert len(micro) == self.accumulation, (len(micro), self.accumulation)
        t = time.perf_counter()
        # max_nonfinite_steps=1: a NaN loss stops the benchmark (there is no next batch to take its place)
        train_step(self.engine, iter(micro), self.state, max_nonfinite_steps=1)
        seconds = time.perf_counter() - t
        real = sum(int(b["attention_mask"].sum()) for b in micro)
        padded = sum(b["attention_mask"].numel() for b in micro)
        flops = self.flops(real, len(group))
        return dict(seconds=seconds, real=real, padded=padded, flops=flops,
                    executed_flops=flops - self.skipped_head_flops(micro, real))

    def skipped_head_flops(self, micro: list[dict], real: int) -> float:
        """LM-head FLOPs the 4N count includes but FusedVLM.token_losses does not run (real, unsupervised positions).

        FusedVLM computes the head (forward and input-gradient backward) only where a
        target token is supervised, by the same rule as ``token_losses``; models with
        logit soft-capping take its full-logits path, and then nothing is skipped.
        """
        if getattr(self.model.llm.config, "final_logit_softcapping", None):
            return 0.0
        supervised = 0
        for b in micro:
            sup = b["labels"][:, 1:] != -100
            if b.get("sequence_ids") is not None:
                sup &= b["sequence_ids"][:, 1:] == b["sequence_ids"][:, :-1]
            supervised += int(sup.sum())
        return 4.0 * self.model.llm.get_output_embeddings().weight.numel() * (real - supervised)

    def flops(self, real_tokens: int, images: int) -> float:
        vision_params = sum(p.numel() for p in self.model.vision.parameters())
        vision_seq = (self.shape.vision["image_size"] // self.shape.vision["patch_size"]) ** 2 + 1
        connector = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        return step_flops(real_tokens, images, llm_matmul_params(self.model.llm), vision_params, vision_seq, connector,
                          self.shape.image_tokens, checkpointing=self.checkpointing)

    def frozen_params_with_grad(self) -> int:
        return sum(1 for p in self.model.parameters() if not p.requires_grad and p.grad is not None)

    def close(self) -> None:
        from mmdist import distributed as dist

        self.bundle.close()
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
        ref = ReferenceLoop(shape, global_batch, micro_batch)
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
    executed = _median([r["executed_flops"] / r["seconds"] / r["peak"] for r in records["mmdist"]])
    summary = dict(ratio=round_ratio("mmdist"), mmdist_fraction_of_peak=results["mmdist"]["fraction_of_peak"],
                   mmdist_fraction_of_peak_executed=executed,
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
    parser.add_argument("--max-len", type=int, default=512,
                        help="mmdist's packed row length (2-3 samples: SDPA computes the whole row x row block-diagonal mask)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads for everything (default: all allowed cores)")
    parser.add_argument("--json", help="also write the rows and summary here")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="dtype of both contenders and of the matmul peak")
    args = parser.parse_args()
    rows, s = run(args.steps, args.global_batch, args.micro_batch, args.max_len, args.threads, dtype=args.dtype)
    print(format_table(rows, ["contender", "real tokens/s", "real-token fraction", "GFLOP/s", "of matmul peak (median)",
                              "s/step"]))
    print(f"mmdist / reference tokens/s (median per round): {s['ratio']:.2f}x; matmul peak median {s['peak_gflops']:.1f} "
          f"GFLOP/s {s['dtype']} (min {s['peak_min_gflops']:.1f}, max {s['peak_max_gflops']:.1f}), {s['threads']} thread(s); "
          f"frozen parameters holding a gradient: {s['frozen_params_with_grad']}")
    print(f"mmdist of matmul peak counting only executed FLOPs (its LM head runs at supervised positions only): "
          f"{s['mmdist_fraction_of_peak_executed']:.3f} (by the 4N count: {s['mmdist_fraction_of_peak']:.3f})")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "summary": s}, indent=1, default=str))


if __name__ == "__main__":
    main()
