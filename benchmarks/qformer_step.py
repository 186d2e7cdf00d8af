"""Q-Former stage-1 train step: this checkout's Q-Former against another revision's, on identical batches.

Builds the demo's Q-Former stage 1 (configs/demo_align.yaml with model.connector.type=qformer and a
trainable text encoder; ``--set`` adds overrides), loads the Q-Former of git revision ``--baseline``
(its mmdist/models/qformer.py and losses.py, run beside this checkout's) with the same weights, and times
one train step (forward, backward, AdamW step) of each on the same batch of cached-feature shape, taking
turns for ``--rounds`` rounds so that a shared machine's drifting load hits both alike. Prints the median
seconds per step of each, their ratio, and the counted FLOPs (QFormer.work) per second of the new one.

    python benchmarks/qformer_step.py --baseline <rev> [--rounds 5] [--steps 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import subprocess
import sys
import time
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the checkout's mmdist, without install
os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch  # noqa: E402

from mmdist.config.recipes import packaged_recipes  # noqa: E402
from mmdist.config.run import load_config  # noqa: E402
from mmdist.materialize import build_run_model  # noqa: E402

DIGITS = "zero one two three four five six seven eight nine".split()


def baseline_qformer_class(rev: str) -> type:
    """The QFormer class of revision ``rev`` (its qformer.py importing its own losses.py)."""
    def source(path: str) -> str:
        return subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:{path}"], check=True, capture_output=True,
                              text=True).stdout

    losses = types.ModuleType("baseline_losses")
    exec(compile(source("mmdist/models/losses.py"), "baseline_losses", "exec"), losses.__dict__)
    sys.modules["baseline_losses"] = losses
    code = source("mmdist/models/qformer.py").replace("from mmdist.models.losses import", "from baseline_losses import")
    module = types.ModuleType("baseline_qformer")
    sys.modules["baseline_qformer"] = module
    exec(compile(code, "baseline_qformer", "exec"), module.__dict__)
    return module.QFormer


def demo_batch(model, size: int, seed: int = 0) -> dict:
    """A stage-1 batch as the demo's feature cache gives it: digit captions, cached ViT features."""
    g = torch.Generator().manual_seed(seed)
    digits = torch.randint(0, 10, (size,), generator=g)
    enc = model.processors.text_tokenizer([f"a handwritten digit {DIGITS[d]}" for d in digits], padding=True,
                                          return_tensors="pt")
    tokens, width = model.vision.num_tokens, model.vision.hidden_size
    features = torch.randn(size, tokens, width, generator=g).to(model.vision_dtype_for_cache)
    return {"image_features": features, "ids": enc.input_ids, "mask": enc.attention_mask, "group": digits}


def make_step(qformer, text, logit_scale, batch: dict, lr: float):
    params = list(qformer.parameters()) + [p for p in text.parameters() if p.requires_grad] + [logit_scale]
    optimizer = torch.optim.AdamW(params, lr=lr)

    def step() -> float:
        optimizer.zero_grad(set_to_none=True)
        out = qformer.align_losses(batch["image_features"], batch["ids"], batch["mask"], logit_scale, batch["group"],
                                   text)
        out["loss"].backward()
        optimizer.step()
        return float(out["loss"].detach())

    return step


def timed(step, n: int) -> float:
    start = time.perf_counter()
    for _ in range(n):
        step()
    return (time.perf_counter() - start) / n


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", required=True, help="git revision whose Q-Former is the baseline")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=3, help="steps per turn")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--batch", type=int, default=64, help="the demo's stage-1 batch")
    parser.add_argument("--bf16", action="store_true", help="also time this checkout's step cast to bf16")
    parser.add_argument("--set", action="append", default=[], help="recipe override (repeatable)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    overrides = ["model.connector.type=qformer", "model.text.freeze=false", *args.set]
    cfg = load_config(packaged_recipes() / "demo_align.yaml", overrides)
    torch.manual_seed(0)
    model = build_run_model(cfg)
    model.train()
    model.vision_dtype_for_cache = next(model.vision.parameters()).dtype
    batch = demo_batch(model, args.batch)
    new = model.stage1
    old_text = copy.deepcopy(model.text)
    old = baseline_qformer_class(args.baseline)(cfg.model.connector, model.vision.hidden_size, model.text.hidden_size,
                                                text_encoder=old_text)
    old.load_state_dict(new.state_dict())
    old.train()
    old_scale = torch.nn.Parameter(model.logit_scale.detach().clone())
    steps = {"baseline": make_step(old, old_text, old_scale, batch, 1e-5),
             "this checkout": make_step(new, model.text, model.logit_scale, batch, 1e-5)}
    if args.bf16:  # engine.precision=bf16: DeepSpeed casts the module to bf16 (its fp32 master copy is not timed)
        bf16 = copy.deepcopy(model).to(torch.bfloat16)
        steps["this, bf16"] = make_step(bf16.stage1, bf16.text, bf16.logit_scale, batch, 1e-5)
    for step in steps.values():  # warm-up
        step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for r in range(args.rounds):
        for name, step in steps.items():
            times[name].append(timed(step, args.steps))
        print(f"round {r + 1}: " + ", ".join(f"{n} {t[-1]:.3f} s" for n, t in times.items()), flush=True)
    medians = {name: statistics.median(t) for name, t in times.items()}
    ids = batch["ids"]
    counted = new.work(caption_len=ids.shape[1], batch_size=ids.shape[0]).step(ids.shape[0], ids.numel())
    print(f"\nQ-Former stage-1 train step, batch {args.batch} x {ids.shape[1]} caption tokens, "
          f"{args.threads} torch threads, load average {os.getloadavg()[0]:.1f} (a shared machine: see the rounds)")
    print(f"{'':16s}{'median s/step':>14s}{'min s/step':>12s}{'speed-up':>10s}")
    for name, t in times.items():
        print(f"{name:16s}{medians[name]:14.3f}{min(t):12.3f}{medians['baseline'] / medians[name]:9.2f}x")
    print(f"counted Q-Former FLOPs per step (text encoder not included): {counted / 1e9:.1f} G "
          f"= {counted / medians['this checkout'] / 1e9:.1f} GFLOP/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
