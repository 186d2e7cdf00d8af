"""Data-pipeline benchmark: loader throughput by worker count, and padding waste of pad-to-longest vs packing.

Writes synthetic shards into a temporary folder (JPEG photos-like noise images
of ``--image-size`` and captions of random length), then:

1. samples/s of read + decode + preprocess + collate through ``build_loader``
   with 0, 1 and 2 workers (one full epoch each, worker start-up included);
2. the non-padding token fraction over one epoch for pad-to-longest, pad-to-longest
   with length grouping, and packing (target: packing >= 95%);
3. stage-1 time per epoch reading pixels vs the image-feature cache vs the
   image + text feature cache, in one run (demo digits, a small frozen ViT and a
   tiny frozen BERT; target: >= 3x faster with the image cache);
4. the same three for the demo's own stage-1 recipe (configs/demo_align.yaml,
   frozen MiniLM), which shows what caching the text side saves. The three inputs
   take turns for --stage1-rounds epochs each (a shared machine's load drifts); medians.

Uses the real ``mmdist.models.processors.Processors`` (CLIP-style 224 px
transform) with the built-in byte-level tokenizer, so no download is needed.

    python benchmarks/bench_data.py [--samples 512] [--image-size 224] [--json out.json]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout's mmdist, without install

from common import tiny_recipe  # noqa: E402

from mmdist.config.run import load_config  # noqa: E402
from mmdist.data.loader import build_loader  # noqa: E402
from mmdist.data.shards import write_shards  # noqa: E402

WORDS = "a the small large red blue green digit cat dog photo of with and on in near picture shows image".split()


def synthetic_samples(n: int, image_size: int, seed: int = 0):
    rng = random.Random(seed)
    nprng = np.random.default_rng(seed)
    for i in range(n):
        pixels = nprng.integers(0, 255, (image_size, image_size, 3), dtype=np.uint8)
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
        length = rng.randint(3, 90)  # words; ~5 bytes each with the byte tokenizer
        yield {"__key__": f"s{i:07d}", "jpg": buf.getvalue(), "txt": " ".join(rng.choice(WORDS) for _ in range(length))}


def make_processors(image_size: int, num_image_tokens: int):
    from mmdist.models.processors import ImageTransform, Processors
    from mmdist.models.tokenizers import tiny_byte_tokenizer

    tok = tiny_byte_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    return Processors(
        image_transform=ImageTransform(image_size, [0.481, 0.458, 0.408], [0.269, 0.261, 0.276]),
        num_image_tokens=num_image_tokens, tokenizer=tok, image_token="<image>",
        image_token_id=tok.convert_tokens_to_ids("<image>"), template="chat",
    )


def config(pattern: str, **data):
    micro = data.pop("micro_batch_size", 16)
    return load_config(
        base={
            "stage": "fuse",
            "model": {
                "llm": {"init_config": {"model_type": "llama"}, "tokenizer": "mmdist:tiny-bytes"},
                "vision": {"init_config": {"model_type": "vit"}},
            },
            "data": {
                "train": [{"shards": [pattern]}],
                "shuffle_buffer": 256,
                "persistent_workers": False,
                "order": "per_rank",
                **data,
            },  # one rank's reader, as the published figures were measured
            "train": {"max_steps": 1, "micro_batch_size": micro, "global_batch_size": micro},
        }
    )


def throughput(pattern: str, processors, workers: int, batch: int, threads: int = 0) -> tuple[float, int]:
    import torch

    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    loader = build_loader(
        config(pattern, num_workers=workers, micro_batch_size=batch, max_len=1024), processors, "train", 0, 1
    )
    start = time.perf_counter()
    n = 0
    for b in loader:
        n += b["pixel_values"].shape[0]
    rate = n / (time.perf_counter() - start)
    torch.set_num_threads(before)
    return rate, n


def padding(pattern: str, processors, batch: int, max_len: int, **mode) -> float:
    loader = build_loader(
        config(pattern, num_workers=0, micro_batch_size=batch, max_len=max_len, **mode), processors, "train", 0, 1
    )
    real = total = 0
    for b in loader:
        mask = b["attention_mask"]
        real += int(mask.sum())
        total += mask.numel()
    return real / total


def _stage1_runs(cfg, base: dict, pattern: str, tmp: str, rounds: int = 3, warmup_batches: int = 2) -> dict:
    """One stage-1 epoch (forward, backward, AdamW step) reading
    pixels, an image-feature cache, and an image+text cache."""
    import torch

    from mmdist.data.cache import build_feature_cache
    from mmdist.materialize import build_run_model

    torch.manual_seed(0)
    model = build_run_model(cfg)
    params = [p for group in model.trainable_groups().values() for p in group]
    optimizer = torch.optim.AdamW(params, lr=1e-3)

    def epoch(run_cfg, max_batches: int = 0) -> float:
        # closed at once: a global-order loader's workers left to garbage collection stall a later epoch 5 s each
        with contextlib.closing(build_loader(run_cfg, model.processors, "train", 0, 1)) as loader:
            model.train()
            start = time.perf_counter()
            for i, b in enumerate(loader):
                if max_batches and i >= max_batches:
                    break
                loss = model(b)["loss"]
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            return time.perf_counter() - start

    def cached(folder: str):
        return load_config(base={**base, "data": {**base["data"], "feature_cache": str(Path(tmp) / folder)}})

    out: dict = {}
    runs = {"pixels": cfg}
    for name, text in (("image", False), ("image_text", True)):
        start = time.perf_counter()
        build_feature_cache(
            cfg, model, [pattern], Path(tmp) / f"cache_{name}" / "train", batch_size=64, cache_text=text
        )
        out[f"{name}_build_s"] = time.perf_counter() - start
        runs[name] = cached(f"cache_{name}")
        with contextlib.closing(build_loader(runs[name], model.processors, "train", 0, 1)) as loader:
            probe = next(iter(loader))
        assert ("text_features" in probe) == text, f"cache_{name}: text_features in batch = {'text_features' in probe}"
    for run_cfg in runs.values():
        epoch(run_cfg, warmup_batches)  # lazy inits, file cache
    # A shared machine's load drifts by the minute: the three inputs take turns, round after round
    # (order rotated), and each reports its median epoch.
    times: dict[str, list[float]] = {name: [] for name in runs}
    names = list(runs)
    for r in range(rounds):
        for name in names[r % len(names):] + names[: r % len(names)]:
            times[name].append(epoch(runs[name]))
    out["pixels_s"] = statistics.median(times["pixels"])
    out["image_cache_s"] = statistics.median(times["image"])
    out["image_text_cache_s"] = statistics.median(times["image_text"])
    out["rounds"] = {name: [round(t, 3) for t in ts] for name, ts in times.items()}
    out["speedup_image"] = out["pixels_s"] / out["image_cache_s"]
    out["speedup_image_text"] = out["pixels_s"] / out["image_text_cache_s"]
    out["speedup_text_over_image"] = out["image_cache_s"] / out["image_text_cache_s"]
    return out


def stage1_epoch_times(tmp: str, n_train: int, image_size: int, batch: int, rounds: int = 3) -> dict:
    """Stage-1 (align, frozen 6-layer ViT-192 + frozen tiny BERT, MLP heads) time per epoch: pixels vs the caches."""
    from mmdist.data.shards import shard_pattern, write_demo_shards
    demo = write_demo_shards(Path(tmp) / "demo", image_size=image_size, samples_per_shard=128, limit=n_train)
    pattern = shard_pattern(demo["train"])
    base = tiny_recipe("align")
    base["model"]["vision"]["init_config"] = {
        "model_type": "vit",
        "hidden_size": 192,
        "intermediate_size": 768,
        "num_hidden_layers": 6,
        "num_attention_heads": 6,
        "image_size": image_size,
        "patch_size": 4,
        "num_channels": 3,
    }
    base["data"].update(
        {"train": [{"shards": [pattern]}], "eval": [], "num_workers": 1, "format": "caption", "shuffle_buffer": 64}
    )
    base["train"].update({"micro_batch_size": batch, "global_batch_size": batch})
    cfg = load_config(base=base)
    out = _stage1_runs(cfg, base, pattern, str(Path(tmp) / "bench_recipe"), rounds)
    # the keys of benchmarks/run_all.py's "feature cache vs pixels" row: the image-only cache
    return {"samples": n_train, **out, "cache_s": out["image_cache_s"], "cache_build_s": out["image_build_s"],
            "speedup": out["speedup_image"]}


def demo_stage1_epoch_times(tmp: str, n_train: int, rounds: int = 3) -> dict:
    """The demo's own stage-1 recipe (configs/demo_align.yaml: 2-layer
    ViT on 28 px digits, frozen MiniLM, MLP heads, batch 64)."""
    import yaml

    from mmdist.data.shards import shard_pattern, write_demo_shards

    recipe = Path(__file__).resolve().parents[1] / "configs" / "demo_align.yaml"
    base = yaml.safe_load(recipe.read_text())
    demo = write_demo_shards(Path(tmp) / "demo_recipe" / "shards", samples_per_shard=128, limit=n_train)
    pattern = shard_pattern(demo["train"])
    base["run_dir"] = str(Path(tmp) / "run")
    base["data"] = {**base["data"], "train": [{"shards": [pattern]}], "eval": []}
    cfg = load_config(base=base)
    return {
        "samples": n_train,
        "batch": cfg.train.micro_batch_size,
        **_stage1_runs(cfg, base, pattern, str(Path(tmp) / "demo_recipe"), rounds),
    }


def _print_stage1(title: str, r: dict) -> None:
    print(f"\n{title}")
    print(f"{'input':>34} | {'s / epoch':>9} | {'speed-up':>8} | {'cache build s':>13}")
    print("-" * 75)
    print(f"{'pixels (encoders every step)':>34} | {r['pixels_s']:>9.2f} | {1.0:>7.1f}x | {'':>13}")
    print(
        f"{'image-feature cache':>34} | {r['image_cache_s']:>9.2f} "
        f"| {r['speedup_image']:>7.1f}x | {r['image_build_s']:>13.2f}"
    )
    print(
        f"{'image + text feature cache':>34} | {r['image_text_cache_s']:>9.2f} "
        f"| {r['speedup_image_text']:>7.1f}x | {r['image_text_build_s']:>13.2f}"
    )
    print(
        "text cache on top of the image cache: "
        f"{r['speedup_text_over_image']:.2f}x  (medians; every epoch: {r['rounds']})"
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=512)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--max-len", type=int, default=1024)
    parser.add_argument(
        "--stage1-samples", type=int, default=512, help="demo digits for the stage-1 cache timing (0 skips it)"
    )
    parser.add_argument(
        "--stage1-rounds", type=int, default=3, help="epochs per input in the stage-1 timings (taking turns; medians)"
    )
    parser.add_argument("--demo-stage1-samples", type=int, default=512,
                        help="digits for the timing of the demo's own stage-1 recipe (frozen MiniLM; 0 skips it)")
    parser.add_argument("--json", default=None, help="also write the figures here")
    args = parser.parse_args(argv)

    processors = make_processors(args.image_size, num_image_tokens=64)
    with tempfile.TemporaryDirectory() as tmp:
        summary = write_shards(
            synthetic_samples(args.samples, args.image_size),
            tmp,
            prefix="bench",
            samples_per_shard=64,
            verify_images=False,
        )
        pattern = str(Path(tmp) / f"bench-{{000000..{len(summary.shards) - 1:06d}}}.tar")
        throughput(pattern, processors, 0, args.batch)  # warm-up: file cache, imports, lazy inits
        rows = []
        # workers run torch single-threaded; in the main process torch's intra-op threads
        # fight over the cores on a busy machine, so 0 workers is shown both ways
        for label, workers, threads in (("0", 0, 0), ("0 (1 torch thread)", 0, 1), ("1", 1, 0), ("2", 2, 0)):
            rate, n = throughput(pattern, processors, workers, args.batch, threads)
            rows.append((label, rate, n))
        pad_plain = padding(pattern, processors, args.batch, args.max_len)
        pad_group = padding(pattern, processors, args.batch, args.max_len, group_by_length=True)
        pad_pack = padding(pattern, processors, args.batch, args.max_len, packing=True)
        stage1 = (
            stage1_epoch_times(tmp, args.stage1_samples, 32, 32, args.stage1_rounds) if args.stage1_samples else None
        )
        demo1 = (
            demo_stage1_epoch_times(tmp, args.demo_stage1_samples, args.stage1_rounds)
            if args.demo_stage1_samples
            else None
        )

    print(
        f"\nread + decode + preprocess + collate ({args.samples} samples, {args.image_size}px JPEG, batch {args.batch})"
    )
    print(f"{'workers':>20} | {'samples/s':>10} | {'samples':>8}")
    print("-" * 45)
    for label, rate, n in rows:
        print(f"{label:>20} | {rate:>10.1f} | {n:>8}")
    print(
        "\nnon-padding token fraction (variable-length captions, "
        f"64 image tokens, max_len {args.max_len}, batch {args.batch})"
    )
    print(f"{'collation':>26} | {'non-padding':>11}")
    print("-" * 40)
    for name, value in (("pad to longest", pad_plain), ("pad to longest + grouping", pad_group), ("packing", pad_pack)):
        print(f"{name:>26} | {value:>10.1%}")
    print(f"\npacking target >= 95%: {'met' if pad_pack >= 0.95 else 'NOT met'}")
    if stage1:
        _print_stage1(
            f"stage-1 epoch ({stage1['samples']} demo digits 32px, "
            "frozen 6-layer ViT-192 + tiny BERT, MLP heads, batch 32, 1 worker)",
            stage1,
        )
        print(
            f"speed-up of the image cache {stage1['speedup_image']:.1f}x (target >= 3x: "
            f"{'met' if stage1['speedup_image'] >= 3 else 'NOT met'})"
        )
    if demo1:
        _print_stage1(
            "the demo's stage 1 (configs/demo_align.yaml: "
            f"{demo1['samples']} digits 28px, 2-layer ViT-128, frozen MiniLM, "
            f"MLP heads, batch {demo1['batch']}, 0 workers)",
            demo1,
        )
    if args.json:
        Path(args.json).write_text(json.dumps({
            "throughput": [{"workers": w, "samples_per_s": r, "samples": n} for w, r, n in rows],
            "non_padding": {"pad_to_longest": pad_plain, "group_by_length": pad_group, "packing": pad_pack},
            "stage1_cache": stage1,
            "demo_stage1_cache": demo1,
            "settings": vars(args),
        }, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
