"""Stage-2 training throughput on one GPU at the reference shapes: tokens/s, MFU, peak memory.

A Qwen-14B-shaped frozen LLM (qwen2 layout, random weights, built directly on the
GPU in bf16: no download, no CPU copy), a ViT-L/14-336-shaped CLIP vision tower
(frozen, bf16), the trainable 2-layer MLP projector (fp32), put together by
mmdist's own ``FusedVLM``; SDPA attention (``flash_attention_2`` when flash-attn
is installed), gradient checkpointing of the LLM, torch AdamW on the projector.
Every sample is one image (576 tokens) plus text filling ``--seq-len``, so there
is no padding (what packing achieves).

FLOPs per step are the model's own count (``FusedVLM.flop_count``, the count behind
the progress bar and metrics.jsonl): 4 x the frozen LLM's matmul weights per token,
its head per answer token, the vision tower per image at its patches, the projector
per image token. MFU is reported both ways: ``mfu_4n`` without the recompute of
gradient checkpointing (the 4N target: 45% on H100/H200) and ``hfu`` with it (the
LLM's forward again: +2 per weight per token). Peak FLOP/s comes from a table of
datasheet bf16 dense figures by device name, else a measured bf16 matmul. The
34%/45% figures of docs/benchmarks.md were measured with an older count that charged
the head at every token.

``--tiny`` runs the same code at toy shapes on the CPU (tests/benchmarks).
Run: ``python benchmarks/gpu_throughput.py`` (a few minutes on an H100/H200).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import resource
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout's mmdist, without install


QWEN_14B = dict(model_type="qwen2", vocab_size=152064, hidden_size=5120, intermediate_size=13696, num_hidden_layers=40,
                num_attention_heads=40, num_key_value_heads=40, max_position_embeddings=8192, tie_word_embeddings=False)
CLIP_L_336 = dict(model_type="clip_vision_model", hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                  num_attention_heads=16, image_size=336, patch_size=14, num_channels=3, projection_dim=768)
TINY_LLM = dict(model_type="qwen2", vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512, tie_word_embeddings=False)
TINY_VISION = dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                   num_attention_heads=4, image_size=32, patch_size=8, num_channels=3, projection_dim=32)


def device_peak(device: torch.device, dtype: torch.dtype) -> tuple[float, str]:
    """(peak FLOP/s, where it came from) for ``device``: the datasheet table the trainer's MFU uses, else a probe."""
    from mmdist.hardware import peak_flops

    name = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "fp32")
    return peak_flops(device, name)


def attention_kernel(device: torch.device) -> str:
    if device.type == "cuda" and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def build(tiny: bool, device: torch.device, dtype: str, checkpointing: bool):
    """mmdist's FusedVLM around a random Qwen-14B-shaped LLM and a ViT-L/14-336-shaped tower, built on ``device``."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from mmdist.config.run import load_config
    from mmdist.models.freeze import torch_dtype
    from mmdist.models.fused import FusedVLM
    from mmdist.models.vision import VisionTower

    llm_shape, vision_shape = (TINY_LLM, TINY_VISION) if tiny else (QWEN_14B, CLIP_L_336)
    attn = attention_kernel(device)
    cfg = load_config(base={
        "stage": "fuse",
        "model": {
            "llm": {"init_config": dict(llm_shape), "tokenizer": "mmdist:tiny-bytes", "dtype": dtype,
                    "gradient_checkpointing": checkpointing,
                    "attn_implementation": attn},
            "vision": {"init_config": dict(vision_shape), "dtype": dtype, "select_layer": -2, "select_tokens": "patch"},
            "connector": {"type": "mlp", "projector_layers": 2},
        },
        "data": {"train": [{"shards": ["unused.tar"]}]},
        "train": {"max_steps": 1},
    })
    shape = dict(llm_shape)
    config = AutoConfig.for_model(shape.pop("model_type"), **shape)
    config._attn_implementation = attn
    torch.manual_seed(0)
    with torch.device(device):
        llm = AutoModelForCausalLM.from_config(config, dtype=torch_dtype(dtype))
        vision = VisionTower(cfg.model.vision)
    processors = SimpleNamespace(image_token_id=llm_shape["vocab_size"] - 1, tokenizer=SimpleNamespace(pad_token_id=0))
    model = FusedVLM(cfg.model, processors, vision, llm).to(device)
    model.train()
    return model, cfg


def make_batch(model, micro_batch: int, seq_len: int, device: torch.device, generator: torch.Generator) -> dict:
    """``micro_batch`` rows of one image plus text, exactly ``seq_len`` tokens each (no padding)."""
    n_img = model.num_image_tokens
    vocab = model.llm.get_input_embeddings().weight.shape[0] - 1
    if seq_len <= n_img + 2:
        raise ValueError(f"--seq-len {seq_len} must exceed the {n_img} image tokens")
    prompt = 8
    ids = torch.randint(0, vocab, (micro_batch, seq_len), generator=generator)
    ids[:, prompt:prompt + n_img] = model.image_token_id
    labels = ids.clone()
    labels[:, :prompt + n_img + (seq_len - prompt - n_img) // 4] = -100  # answers: the last three quarters of the text
    size = model.vision.image_size
    return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device), "labels": labels.to(device),
            "pixel_values": torch.randn(micro_batch, 3, size, size, generator=generator).to(device)}


def run(tiny: bool = False, steps: int = 5, warmup: int = 2, micro_batch: int = 4, seq_len: int = 2048,
        checkpointing: bool = True, device: str | None = None) -> dict:
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() and not tiny else "cpu"))
    dtype = "bf16" if dev.type == "cuda" else "fp32"
    t0 = time.perf_counter()
    model, cfg = build(tiny, dev, dtype, checkpointing)
    build_s = time.perf_counter() - t0
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4, fused=dev.type == "cuda")
    gen = torch.Generator().manual_seed(0)
    batches = [make_batch(model, micro_batch, seq_len, dev, gen) for _ in range(2)]
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    losses = []
    elapsed = 0.0
    for step in range(warmup + steps):
        batch = batches[step % len(batches)]
        sync()
        t = time.perf_counter()
        out = model(batch)
        out["loss"].backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync()
        if step >= warmup:
            elapsed += time.perf_counter() - t
        losses.append(float(out["loss"].detach()))
    from mmdist.models.flops import matmul_layers

    tokens = steps * micro_batch * seq_len
    vision_params = sum(p.numel() for p in model.vision.parameters())
    connector = sum(p.numel() for p in trainable)
    llm_params = sum(layer.macs for layer in matmul_layers(model.llm)[0])  # its matmul weights, the head included
    counts = [model.batch_counts(batches[step % len(batches)]) for step in range(warmup, warmup + steps)]
    flops = model.flop_count()
    flops_4n = sum(flops.step(c.tokens, c.supervised_tokens, c.image_tokens, c.images, c.samples) for c in counts)
    flops_hw = flops_4n + (0.5 * flops.per_token * tokens if checkpointing else 0.0)  # the frozen LLM's forward again
    peak, peak_source = device_peak(dev, torch.bfloat16 if dtype == "bf16" else torch.float32)
    if dev.type == "cuda":
        peak_mem = torch.cuda.max_memory_allocated(dev)
        name = torch.cuda.get_device_name(dev)
    else:
        peak_mem = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        name = "cpu"
    frozen_with_grad = sum(1 for p in model.parameters() if not p.requires_grad and p.grad is not None)
    return {
        "device": name, "dtype": dtype, "attention": cfg.model.llm.attn_implementation, "checkpointing": checkpointing,
        "llm_params": llm_params, "vision_params": vision_params, "projector_params": connector,
        "micro_batch": micro_batch, "seq_len": seq_len, "steps": steps, "build_s": round(build_s, 2),
        "step_s": elapsed / steps, "tokens_per_s": tokens / elapsed, "flops_per_step": flops_4n / steps,
        "mfu_4n": flops_4n / elapsed / peak, "hfu": flops_hw / elapsed / peak,
        "peak_flops": peak, "peak_source": peak_source, "peak_memory_gib": peak_mem / 2**30,
        "loss_first": losses[0], "loss_last": losses[-1], "frozen_params_with_grad": frozen_with_grad,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="toy shapes on the CPU (the test mode)")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--micro-batch", type=int, default=None, help="default 4 (tiny: 2)")
    parser.add_argument("--seq-len", type=int, default=None, help="tokens per row, default 2048 (tiny: 64)")
    parser.add_argument("--no-checkpointing", action="store_true")
    parser.add_argument("--device", default=None)
    parser.add_argument("--json", help="also write the result here")
    args = parser.parse_args(argv)
    res = run(
        tiny=args.tiny,
        steps=args.steps,
        warmup=args.warmup,
        micro_batch=args.micro_batch or (2 if args.tiny else 4),
        seq_len=args.seq_len or (64 if args.tiny else 2048),
        checkpointing=not args.no_checkpointing,
        device=args.device,
    )
    width = max(len(k) for k in res)
    for key, value in res.items():
        shown = f"{value:.4g}" if isinstance(value, float) else str(value)
        print(f"{key:<{width}}  {shown}")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
