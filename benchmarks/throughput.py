"""Benchmarks 1 and 2: the same stage-2 step by mmdist and by the usual choice, side by side,
and each one's achieved FLOP/s against a dense matmul measured in the same run.

Both sides: a SmolLM2-135M-shaped frozen LLM (random weights), the same small
frozen CLIP vision tower (64 image tokens), a trainable 2-layer GELU projector,
the same variable-length samples (answers of 8 to 160 tokens), the same global
batch, fp32 on CPU, the same thread count.

* mmdist: ``mmdist.models.build_model`` (FusedVLM), ``mmdist.data.collate.collate_fuse``
  with packing, ``mmdist.training.engine.build_engine`` (DeepSpeed, ZeRO-0,
  torch AdamW) and the trainer's calls (``engine(batch)``, ``engine.backward``,
  ``engine.step``).
* reference: benchmarks/reference_llava.py.

The dense-matmul peak is measured before and after the two contenders and
averaged, so a machine shared with other jobs shifts all figures alike.

Run: ``python benchmarks/throughput.py`` (or through ``python benchmarks/run_all.py``).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import time
from pathlib import Path
from typing import Any

import torch
from common import BenchShape, Sample, format_table, llm_matmul_params, make_samples, matmul_peak, set_threads, step_flops
from reference_llava import run_reference


def mmdist_config(shape: BenchShape, global_batch: int, micro_batch: int, max_len: int, checkpointing: bool = False) -> Any:
    """The RunConfig of the mmdist side: same shapes and dtype as the reference, packing on, ZeRO-0, torch AdamW."""
    from mmdist.config.run import load_config
    from mmdist.models.testing import tiny_run_config

    vision = dict(shape.vision)
    base = tiny_run_config("fuse", "mlp")
    base["model"]["llm"]["init_config"] = dict(shape.llm)
    base["model"]["llm"]["gradient_checkpointing"] = checkpointing
    base["model"]["vision"]["init_config"] = vision
    base["model"]["vision"]["select_layer"] = -2
    base["model"]["vision"]["select_tokens"] = "patch"
    base["data"].update(max_len=max_len, packing=True)
    base["train"].update(global_batch_size=global_batch, micro_batch_size=micro_batch, max_steps=100, warmup_ratio=0.0,
                         lr_scheduler="constant")
    precision = "bf16" if shape.dtype == torch.bfloat16 else "fp32"
    base["model"]["llm"]["dtype"] = base["model"]["vision"]["dtype"] = precision
    base["engine"].update(zero_stage=0, precision=precision, torch_adam=True, backend="gloo")
    base["log"] = {"progress_bar": False, "tensorboard": False, "param_table": False}
    base["run_dir"] = os.path.join(os.environ.get("TMPDIR", "/tmp"), "mmdist-bench-throughput")
    return load_config(base=base)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def supervised_only_token_losses(self: Any, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """A proposed FusedVLM.token_losses: the LM head and the loss only at supervised positions.

    Same result as mmdist/models/fused.py's FusedVLM.token_losses (per-token losses,
    0 where not supervised), but the vocabulary projection (21% of a SmolLM2-135M's
    matmul parameters) and the fp32 log-softmax run on answer tokens only, not on
    prompt, image and padding positions. Used by ``--proposed`` to measure the gain.
    """
    import torch.nn.functional as F

    hidden = self.llm.get_decoder()(**self._llm_inputs(batch)).last_hidden_state
    labels = batch["labels"][:, 1:]
    supervised = labels != -100
    if batch.get("sequence_ids") is not None:
        seq = batch["sequence_ids"]
        supervised &= seq[:, 1:] == seq[:, :-1]
    logits = self.llm.get_output_embeddings()(hidden[:, :-1][supervised]).float()
    flat = F.cross_entropy(logits, labels[supervised], reduction="none")
    losses = torch.zeros(labels.shape, dtype=flat.dtype, device=flat.device).masked_scatter(supervised, flat)
    return losses, supervised


def run_mmdist(shape: BenchShape, samples: list[Sample], global_batch: int, micro_batch: int, steps: int,
               max_len: int = 512, warmup: int = 1, checkpointing: bool = False, proposed: bool = False) -> dict:
    """mmdist's FusedVLM + packing + DeepSpeed engine, the trainer's step calls; real tokens/s and FLOP/s.

    ``proposed``: with :func:`supervised_only_token_losses` patched in (a change proposed to the model code).
    """
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    from mmdist.data.collate import collate_fuse
    from mmdist.models.fused import FusedVLM
    from mmdist.training import dist
    from mmdist.training.engine import build_engine

    cfg = mmdist_config(shape, global_batch, micro_batch, max_len, checkpointing)
    original = FusedVLM.token_losses
    if proposed:
        FusedVLM.token_losses = supervised_only_token_losses
    dist.init(backend="gloo")
    try:
        bundle = build_engine(cfg, world_size=1)
        engine, model = bundle.engine, bundle.model
        image_id = model.image_token_id
        accumulation = bundle.ds_config["gradient_accumulation_steps"]

        def as_dict(s: Sample) -> dict:
            return {"input_ids": [image_id if t < 0 else t for t in s.ids], "labels": s.labels, "pixel_values": [s.pixel_values]}

        engine.train()
        real = padded = 0
        elapsed = 0.0
        for step in range(warmup + steps):
            group = samples[step * global_batch:(step + 1) * global_batch]
            micro = [collate_fuse([as_dict(s) for s in group[i:i + micro_batch]], pad_token_id=0, pack=True, max_len=max_len)
                     for i in range(0, global_batch, micro_batch)]
            assert len(micro) == accumulation, (len(micro), accumulation)
            t = time.perf_counter()
            for batch in micro:
                out = engine(batch)
                engine.backward(out["loss"])
                engine.step()
            if step >= warmup:
                elapsed += time.perf_counter() - t
                real += sum(int(b["attention_mask"].sum()) for b in micro)
                padded += sum(b["attention_mask"].numel() for b in micro)
        frozen_grads = sum(1 for p in model.parameters() if not p.requires_grad and p.grad is not None)
        vision_params = sum(p.numel() for p in model.vision.parameters())
        vision_seq = (shape.vision["image_size"] // shape.vision["patch_size"]) ** 2 + 1
        connector = sum(p.numel() for p in model.parameters() if p.requires_grad)
        flops = step_flops(real, steps * global_batch, llm_matmul_params(model.llm), vision_params, vision_seq, connector,
                           shape.image_tokens, checkpointing=checkpointing)
    finally:
        from mmdist.training.trainer import _release_deepspeed_groups

        _release_deepspeed_groups()
        dist.shutdown()
        FusedVLM.token_losses = original
    label = f"mmdist (FusedVLM, packing to {max_len}, DeepSpeed ZeRO-0{', ckpt' if checkpointing else ''})"
    if proposed:
        label = f"mmdist + supervised-only logits (proposed), packing to {max_len}"
    return dict(name=label,
                seconds=elapsed, real_tokens=real, padded_tokens=padded, tokens_per_s=real / elapsed, flops=flops,
                flops_per_s=flops / elapsed, real_fraction=real / padded, frozen_params_with_grad=frozen_grads)


def run(steps: int = 2, global_batch: int = 16, micro_batch: int = 8, max_len: int = 512, threads: int | None = None,
        peak_seconds: float = 3.0, proposed: bool = False, dtype: str = "fp32") -> tuple[list[dict], dict]:
    """Both contenders and the matmul peak; rows for the table and a summary."""
    threads = set_threads(threads)
    shape = BenchShape(dtype={"fp32": torch.float32, "bf16": torch.bfloat16}[dtype])
    samples = make_samples((steps + 1) * global_batch, shape, seed=0)
    peak_before = matmul_peak(shape.dtype, seconds=peak_seconds)
    mm = run_mmdist(shape, samples, global_batch, micro_batch, steps, max_len=max_len)
    extra = [run_mmdist(shape, samples, global_batch, micro_batch, steps, max_len=max_len, proposed=True)] if proposed else []
    ref = run_reference(shape, samples, global_batch, micro_batch, steps)
    peak_after = matmul_peak(shape.dtype, seconds=peak_seconds)
    peak = (peak_before + peak_after) / 2
    rows = []
    for res in (mm, *extra, ref):
        rows.append({"contender": res["name"], "real tokens/s": res["tokens_per_s"], "real-token fraction": res["real_fraction"],
                     "GFLOP/s": res["flops_per_s"] / 1e9, "of matmul peak": res["flops_per_s"] / peak,
                     "s/step": res["seconds"] / steps})
    summary = dict(ratio=mm["tokens_per_s"] / ref["tokens_per_s"], mmdist_fraction_of_peak=mm["flops_per_s"] / peak,
                   reference_fraction_of_peak=ref["flops_per_s"] / peak, peak_gflops=peak / 1e9,
                   peak_before_gflops=peak_before / 1e9, peak_after_gflops=peak_after / 1e9, threads=threads,
                   frozen_params_with_grad=mm["frozen_params_with_grad"], mmdist=mm, reference=ref, dtype=dtype,
                   proposed=extra[0] if extra else None)
    if extra:
        summary["proposed_ratio"] = extra[0]["tokens_per_s"] / ref["tokens_per_s"]
        summary["proposed_fraction_of_peak"] = extra[0]["flops_per_s"] / peak
    return rows, summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2, help="timed optimizer steps per contender (one more warms up)")
    parser.add_argument("--global-batch", type=int, default=16)
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--max-len", type=int, default=512,
                        help="mmdist's packed row length (2-3 samples: SDPA computes the whole row x row block-diagonal mask)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads for everything (default: all allowed cores)")
    parser.add_argument("--json", help="also write the rows and summary here")
    parser.add_argument("--proposed", action="store_true", help="also run mmdist with supervised-only logits (a proposed model change)")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="dtype of both contenders and of the matmul peak")
    args = parser.parse_args()
    rows, s = run(args.steps, args.global_batch, args.micro_batch, args.max_len, args.threads, proposed=args.proposed,
                  dtype=args.dtype)
    print(format_table(rows, ["contender", "real tokens/s", "real-token fraction", "GFLOP/s", "of matmul peak", "s/step"]))
    print(f"mmdist / reference tokens/s: {s['ratio']:.2f}x; matmul peak {s['peak_gflops']:.1f} GFLOP/s {s['dtype']} "
          f"(before {s['peak_before_gflops']:.1f}, after {s['peak_after_gflops']:.1f}), {s['threads']} thread(s); "
          f"frozen parameters holding a gradient: {s['frozen_params_with_grad']}")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "summary": s}, indent=1, default=str))


if __name__ == "__main__":
    main()
