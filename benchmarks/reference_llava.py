"""The usual choice, as a baseline: transformers' own LlavaForConditionalGeneration, trained the way
LLaVA-style trainers train the projector.

Frozen vision tower and frozen language model (requires_grad=False), a trainable
2-layer GELU projector (LLaVA-1.5's), plain ``torch.optim.AdamW``, pad-to-longest
micro-batches with gradient accumulation to the global batch. Same shapes, data
and FLOP count as the mmdist side (benchmarks/common.py: mmdist's count of the same
model at the same samples; the head this model runs at every position is not counted).

Run alone: ``python benchmarks/reference_llava.py --steps 3``.
"""

from __future__ import annotations

import argparse
import time
from typing import Any, Optional

import torch
from common import BenchShape, Sample, make_samples, matmul_peak, set_threads, shape_flops


def build_reference(shape: BenchShape) -> torch.nn.Module:
    """LlavaForConditionalGeneration with the benchmark shapes; backbones frozen, projector trainable."""
    from transformers import AutoConfig, LlavaConfig, LlavaForConditionalGeneration

    llm = dict(shape.llm)
    vision = dict(shape.vision)
    config = LlavaConfig(
        vision_config=AutoConfig.for_model(vision.pop("model_type"), **vision),
        text_config=AutoConfig.for_model(llm.pop("model_type"), **llm),
        image_token_index=shape.llm["vocab_size"] - 1,
        image_seq_length=shape.image_tokens,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
    )
    config.text_config._attn_implementation = "sdpa"
    config.vision_config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(config).to(shape.dtype)
    for name, p in model.named_parameters():
        p.requires_grad_("multi_modal_projector" in name)
    # The projector stays in the model's dtype: LlavaForConditionalGeneration does not cast between them
    # (LLaVA's bf16 runs put the whole model in bf16 and let DeepSpeed keep fp32 master weights).
    model.train()
    model.model.vision_tower.eval()
    model.model.language_model.eval()
    return model


def pad_to_longest(samples: list[Sample], image_token_id: int, pad_id: int = 0) -> dict:
    """One LLaVA-style micro-batch: right-padded to the longest sample."""
    longest = max(len(s.ids) for s in samples)
    ids = torch.full((len(samples), longest), pad_id, dtype=torch.long)
    labels = torch.full((len(samples), longest), -100, dtype=torch.long)
    mask = torch.zeros((len(samples), longest), dtype=torch.long)
    for row, s in enumerate(samples):
        n = len(s.ids)
        ids[row, :n] = torch.tensor([image_token_id if t < 0 else t for t in s.ids])
        labels[row, :n] = torch.tensor(s.labels)
        mask[row, :n] = 1
    return dict(input_ids=ids, attention_mask=mask, labels=labels,
                pixel_values=torch.stack([s.pixel_values for s in samples]))


class ReferenceLoop:
    """The reference trainer, one optimizer step at a time (so benchmarks can interleave contenders)."""

    name = "reference (LlavaForConditionalGeneration, pad-to-longest, AdamW)"

    def __init__(self, shape: BenchShape, global_batch: int, micro_batch: int, flops: Optional[Any] = None):
        """``flops``: the FlopCount charged per step's counts (default: mmdist's count of ``shape``)."""
        self.shape, self.global_batch, self.micro_batch = shape, global_batch, micro_batch
        self.count = flops if flops is not None else shape_flops(shape)
        self.model = build_reference(shape)
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.trainable, lr=1e-4)

    def step(self, group: list[Sample]) -> dict:
        """One optimizer step over ``group`` (the global batch); seconds, real and padded tokens, FLOPs."""
        image_token_id = self.model.config.image_token_index
        micro = [pad_to_longest(group[i:i + self.micro_batch], image_token_id)
                 for i in range(0, self.global_batch, self.micro_batch)]
        t = time.perf_counter()
        for batch in micro:
            out = self.model(**{k: v.to(self.shape.dtype) if v.is_floating_point() else v for k, v in batch.items()})
            (out.loss / len(micro)).backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        seconds = time.perf_counter() - t
        real = sum(int(b["attention_mask"].sum()) for b in micro)
        padded = sum(b["attention_mask"].numel() for b in micro)
        supervised = sum(int((b["labels"][:, 1:] != -100).sum()) for b in micro)
        images = len(group)
        flops = self.count.step(real, supervised, images * self.shape.image_tokens, images, len(group))
        return dict(seconds=seconds, real=real, padded=padded, flops=flops)


def run_reference(shape: BenchShape, samples: list[Sample], global_batch: int, micro_batch: int, steps: int,
                  warmup: int = 1) -> dict:
    """Train ``warmup + steps`` optimizer steps; report real tokens/s and FLOP/s of the timed steps."""
    loop = ReferenceLoop(shape, global_batch, micro_batch)
    if len(samples) < (warmup + steps) * global_batch:
        raise ValueError(f"need {(warmup + steps) * global_batch} samples, got {len(samples)}")
    records = [loop.step(samples[i * global_batch:(i + 1) * global_batch]) for i in range(warmup + steps)][warmup:]
    seconds = sum(r["seconds"] for r in records)
    real = sum(r["real"] for r in records)
    padded = sum(r["padded"] for r in records)
    flops = sum(r["flops"] for r in records)
    return dict(name=loop.name, seconds=seconds, real_tokens=real, padded_tokens=padded, tokens_per_s=real / seconds,
                flops=flops, flops_per_s=flops / seconds, real_fraction=real / padded)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--global-batch", type=int, default=16)
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    set_threads(args.threads)
    shape = BenchShape()
    samples = make_samples((args.steps + 1) * args.global_batch, shape)
    peak = matmul_peak(shape.dtype)
    res = run_reference(shape, samples, args.global_batch, args.micro_batch, args.steps)
    print(f"{res['name']}: {res['tokens_per_s']:.1f} real tokens/s, {res['flops_per_s'] / 1e9:.1f} GFLOP/s "
          f"= {res['flops_per_s'] / peak:.2f} of the matmul peak ({peak / 1e9:.1f} GFLOP/s); "
          f"real-token fraction {res['real_fraction']:.2f}")


if __name__ == "__main__":
    main()
