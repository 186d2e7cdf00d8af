"""Shared pieces of the side-by-side benchmarks: the benchmark shapes, synthetic variable-length data,
the FLOP count, the dense-matmul peak and table printing.

Both contenders of a benchmark take their shapes, data and FLOP count from here, so
"the same step" means the same thing on both sides.

FLOPs: mmdist's own count of the benchmark's model (:func:`shape_flops`, what the
trainer's progress bar counts: ``FusedVLM.flop_count`` from module shapes) at each
step's counts (real tokens, answer tokens, images, image tokens). Both contenders are
charged the same FLOPs for the same samples: the work the step must do. Work a
contender does beyond it (a head run at every position) is not counted, nor are
attention's score products or the forward that gradient checkpointing recomputes.
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

RECIPES = Path(__file__).resolve().parents[1] / "configs"


def tiny_recipe(stage: str) -> dict:
    """configs/tiny_{stage}.yaml as a dict: a benchmark sets its own
    shapes and sizes on it, then calls load_config(base=...)."""
    from mmdist.config.run import read_yaml

    return read_yaml(RECIPES / f"tiny_{stage}.yaml")


# SmolLM2-135M's shape (random weights from config): the LLM of benchmarks 1 and 2.
SMOLLM2_135M = dict(
    model_type="llama",
    vocab_size=49152,
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    max_position_embeddings=8192,
    tie_word_embeddings=True,
    rms_norm_eps=1e-5,
    rope_theta=100000.0,
)
# A small CLIP vision tower giving 8 x 8 = 64 patch tokens (the CLS token dropped, layer -2, as LLaVA does).
SMALL_CLIP = dict(model_type="clip_vision_model", hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
                  num_attention_heads=4, image_size=128, patch_size=16, num_channels=3, projection_dim=256)
IMAGE_TOKENS = 64


@dataclass
class Sample:
    """One synthetic stage-2 sample: prompt, image, question, answer (token ids; image positions marked -1)."""

    ids: list[int]
    labels: list[int]
    pixel_values: torch.Tensor


@dataclass
class BenchShape:
    """Everything both contenders share."""

    llm: dict = field(default_factory=lambda: dict(SMOLLM2_135M))
    vision: dict = field(default_factory=lambda: dict(SMALL_CLIP))
    image_tokens: int = IMAGE_TOKENS
    answer_range: tuple[int, int] = (8, 160)
    prompt_range: tuple[int, int] = (4, 24)
    question_range: tuple[int, int] = (6, 20)
    dtype: torch.dtype = torch.float32


def make_samples(n: int, shape: BenchShape, seed: int = 0) -> list[Sample]:
    """``n`` samples with uniformly drawn answer lengths in ``shape.answer_range`` (reproducible)."""
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    vocab = shape.llm["vocab_size"] - 8
    size = shape.vision["image_size"]
    out = []
    for _ in range(n):
        prompt = [rng.randrange(vocab) for _ in range(rng.randint(*shape.prompt_range))]
        question = [rng.randrange(vocab) for _ in range(rng.randint(*shape.question_range))]
        answer = [rng.randrange(vocab) for _ in range(rng.randint(*shape.answer_range))]
        ids = prompt + [-1] * shape.image_tokens + question + answer
        labels = [-100] * (len(ids) - len(answer)) + answer
        out.append(Sample(ids, labels, torch.randn(3, size, size, generator=gen)))
    return out


# ---------------------------------------------------------------------------
# FLOPs


def mmdist_config(shape: BenchShape, global_batch: int, micro_batch: int, max_len: int,
                  checkpointing: bool = False) -> Any:
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


def shape_flops(shape: BenchShape) -> Any:
    """The FlopCount of the benchmark's model as mmdist counts it (its own code on the meta device, no weights)."""
    from mmdist import plan

    return plan.model_flops(plan.model_shapes(mmdist_config(shape, global_batch=1, micro_batch=1, max_len=512)))


def matmul_peak(dtype: torch.dtype = torch.float32, n: int = 2048, seconds: float = 3.0) -> float:
    """FLOP/s of a large dense square matmul with the current thread count and ``dtype`` (best of repeated runs)."""
    a = torch.randn(n, n, dtype=dtype)
    b = torch.randn(n, n, dtype=dtype)
    c = torch.empty(n, n, dtype=dtype)
    torch.mm(a, b, out=c)
    best = float("inf")
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        t = time.perf_counter()
        torch.mm(a, b, out=c)
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def set_threads(threads: int | None) -> int:
    """Use ``threads`` intra-op threads (default: every core this process may use); returns the count."""
    threads = threads or len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)
    return threads


# ---------------------------------------------------------------------------
# output


def format_table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    """A plain-text table with a header (also valid Markdown)."""

    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:,.3g}" if abs(v) < 1000 else f"{v:,.0f}"
        return str(v)

    body = [[cell(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(b[i]) for b in body)) if body else len(c) for i, c in enumerate(columns)]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(columns, widths)) + " |",
             "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    lines += ["| " + " | ".join(b[i].ljust(w) for i, w in enumerate(widths)) + " |" for b in body]
    return "\n".join(lines)
