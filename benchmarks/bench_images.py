"""Image-pipeline benchmark: images/s per CPU core from photo-like JPEGs in tar shards to 336 px tower input.

A frozen ViT-L/14-336 on a modern GPU encodes on the order of 1,000 images/s, so a
node of 8 GPUs wants thousands of decoded images per second from its CPUs. This
benchmark writes shards of photo-like JPEGs at typical web sizes (500x375 to 1024x768,
both orientations, quality 90) and measures, side by side in one run:

- ``usual``: webdataset's PIL decoding (``.decode("pil")``) and transformers'
  ``CLIPImageProcessor`` per sample (shortest edge 336, centre crop, normalise), as
  LLaVA-style trainers do;
- ``mmdist``: mmdist's own loader (``build_loader``: tar reader, safe decode with
  reduced-scale JPEG decoding, the tower's geometry on uint8; normalisation happens on
  the device after the copy, see ``ImageTransform``), shipping uint8.

Each runs with 1, 2 and all cores (DataLoader workers; the main process only
collects batches); the contenders take turns for ``--rounds`` rounds and the median is
reported. It also checks that mmdist's pixels match the processor's (in levels of
0-255) and turns the per-core rate into the CPU cores each GPU needs to keep the
reference recipes' vision tower busy.

    python benchmarks/bench_images.py [--images 512] [--rounds 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import random
import statistics
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from mmdist.config.run import load_config  # noqa: E402
from mmdist.data.loader import build_loader  # noqa: E402
from mmdist.models.processors import ImageTransform, Processors  # noqa: E402

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
SIZE = 336
WEB_SIZES = [(500, 375), (640, 480), (800, 600), (1024, 768), (375, 500), (480, 640), (600, 800), (768, 1024)]
# What a GPU does with the images: ViT-L/14-336 forward, 2 FLOPs per parameter per token.
VIT_L_336 = {"params": 303_507_456, "tokens": 577}
# Dense bf16 peaks (datasheets) and the fraction of peak a frozen ViT forward reaches in practice.
GPU_PEAKS = {"H100 SXM": 989e12, "A100": 312e12}
TOWER_MFU = 0.4


def photo_jpeg(width: int, height: int, seed: int = 0) -> bytes:
    """A photo-like JPEG: smooth colour field, shapes, slight blur and sensor noise; quality 90."""
    rng = np.random.default_rng(seed)
    image = Image.fromarray(rng.integers(0, 255, (6, 8, 3), dtype=np.uint8)).resize((width, height), Image.BICUBIC)
    draw = ImageDraw.Draw(image)
    for _ in range(12):
        x0, y0 = int(rng.integers(0, width)), int(rng.integers(0, height))
        x1, y1 = x0 + int(rng.integers(10, width // 3)), y0 + int(rng.integers(10, height // 3))
        draw.ellipse([x0, y0, x1, y1], fill=tuple(int(v) for v in rng.integers(0, 255, 3)))
    arr = np.asarray(image.filter(ImageFilter.GaussianBlur(1.5)), dtype=np.int16)
    arr = np.clip(arr + rng.normal(0, 6, arr.shape), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def write_shards(folder: Path, images: int, shards: int) -> str:
    """``images`` photo-like samples (jpg + txt) in ``shards`` tar files; returns the brace pattern."""
    rng = random.Random(0)
    per = -(-images // shards)
    for s in range(shards):
        with tarfile.open(folder / f"photos-{s:06d}.tar", "w") as tar:
            for i in range(s * per, min(images, (s + 1) * per)):
                for ext, data in (("jpg", photo_jpeg(*rng.choice(WEB_SIZES), seed=i)), ("txt", b"a photo of things")):
                    info = tarfile.TarInfo(f"{i:08d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    (folder / "sizes.json").write_text(
        json.dumps({f"photos-{s:06d}.tar": min(images, (s + 1) * per) - s * per for s in range(shards)})
    )
    return str(folder / f"photos-{{000000..{shards - 1:06d}}}.tar")


def clip_processor():
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    return CLIPImageProcessorPil(size={"shortest_edge": SIZE}, crop_size={"height": SIZE, "width": SIZE})


class ProcessSample:
    """The usual per-sample step (picklable for DataLoader workers): the processor's normalised float tensor."""

    def __init__(self) -> None:
        self.processor = clip_processor()

    def __call__(self, sample: tuple) -> torch.Tensor:
        return self.processor(sample[0], return_tensors="pt")["pixel_values"][0]


def usual_loader(pattern: str, workers: int, batch: int):
    import webdataset as wds

    dataset = (wds.WebDataset(pattern, shardshuffle=False, empty_check=False)
               .decode("pil").to_tuple("jpg", "txt").map(ProcessSample()))
    return torch.utils.data.DataLoader(dataset, batch_size=batch, num_workers=workers)


def mmdist_processors() -> Processors:
    from mmdist.models.tokenizers import builtin_tokenizer

    tok = builtin_tokenizer("mmdist:tiny-bytes")
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    transform = ImageTransform(SIZE, CLIP_MEAN, CLIP_STD, resize="shortest_edge", resample="bicubic")
    return Processors(image_transform=transform, num_image_tokens=4, tokenizer=tok, image_token="<image>",
                      image_token_id=tok.convert_tokens_to_ids("<image>"), template="plain")


def mmdist_loader(pattern: str, processors: Processors, workers: int, batch: int):
    cfg = load_config(
        base={
            "stage": "fuse",
            "model": {
                "llm": {"init_config": {"model_type": "llama"}, "tokenizer": "mmdist:tiny-bytes"},
                "vision": {"init_config": {"model_type": "vit"}},
            },
            "data": {
                "train": [{"shards": [pattern]}],
                "shuffle_buffer": 0,
                "persistent_workers": False,
                "order": "per_rank",
                "num_workers": workers,
                "max_len": 64,
                "self_check_samples": 0,
            },
            "train": {"max_steps": 1, "micro_batch_size": batch, "global_batch_size": batch},
        }
    )
    return build_loader(cfg, processors, "train", 0, 1)


def images_per_second(loader) -> tuple[float, int]:
    start = time.perf_counter()
    n = 0
    for batch in loader:
        pixels = batch["pixel_values"] if isinstance(batch, dict) else batch
        n += pixels.shape[0]
    return n / (time.perf_counter() - start), n


def pixel_check(pattern: str, processors: Processors, samples: int = 24) -> dict:
    """mmdist's loader pixels (uint8, then the tower's normalisation)
    vs the processor on a full decode, in 0-255 levels."""
    from mmdist.data.reader import decode_image, list_shards, read_tar

    processor = clip_processor()
    transform = processors.image_transform
    loader = mmdist_loader(pattern, processors, workers=0, batch=1)
    ours = {}
    for batch in loader:
        ours[loader.last_keys[0]] = transform.normalize(batch["pixel_values"][0])
        if len(ours) >= samples:
            break
    diffs = []
    for shard in list_shards([pattern]):
        for raw in read_tar(shard.url):
            if raw["__key__"] in ours:
                theirs = processor(decode_image(raw["jpg"], 10**9), return_tensors="pt")["pixel_values"][0]
                diffs.append(((ours[raw["__key__"]] - theirs) * torch.tensor(CLIP_STD).view(3, 1, 1) * 255).abs())
    levels = torch.stack(diffs)
    return {
        "samples": len(diffs),
        "mean_levels": round(float(levels.mean()), 3),
        "p99_levels": round(float(torch.quantile(levels.flatten()[:1_000_000], 0.99)), 2),
        "max_levels": round(float(levels.max()), 1),
    }


def cores_per_gpu(per_core: float) -> dict:
    """CPU cores per GPU needed to feed a frozen ViT-L/14-336 at TOWER_MFU of each GPU's peak."""
    flops = 2 * VIT_L_336["params"] * VIT_L_336["tokens"]
    out = {}
    for gpu, peak in GPU_PEAKS.items():
        need = TOWER_MFU * peak / flops
        out[gpu] = {"images_per_s_per_gpu": round(need), "cores_per_gpu": round(need / per_core, 1)}
    return out


def cpu_description() -> str:
    flags = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = " ".join(f for f in line.split(":", 1)[1].split() if f.startswith(("avx", "amx")))
                break
    except OSError:
        pass
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores; flags: {flags or 'unknown'}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--cores", type=str, default="", help="comma-separated worker counts (default 1,2,all)")
    parser.add_argument("--json", type=str, default="")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # workers and main process: one thread each, so a worker is a core
    all_cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    cores = sorted({int(c) for c in args.cores.split(",") if c} or {1, min(2, all_cores), all_cores})
    print(f"machine: {cpu_description()}")
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        pattern = write_shards(Path(tmp), args.images, args.shards)
        print(
            f"wrote {args.images} photo-like JPEGs (500x375 to 1024x768, "
            f"q90) in {args.shards} shards in {time.perf_counter() - t0:.1f} s"
        )
        processors = mmdist_processors()
        check = pixel_check(pattern, processors)
        print(f"pixels vs CLIPImageProcessor (levels of 255, {check['samples']} images): mean {check['mean_levels']}, "
              f"99th percentile {check['p99_levels']}, max {check['max_levels']}")
        rates: dict[tuple[str, int], list[float]] = {}
        for _ in range(args.rounds):
            for k in cores:
                for name in ("usual", "mmdist"):
                    loader = (
                        usual_loader(pattern, k, args.batch)
                        if name == "usual"
                        else mmdist_loader(pattern, processors, k, args.batch)
                    )
                    rate, n = images_per_second(loader)
                    if n != args.images:
                        raise RuntimeError(f"{name} with {k} workers read {n} images, expected {args.images}")
                    rates.setdefault((name, k), []).append(rate)
        rows = []
        for k in cores:
            usual, ours = statistics.median(rates[("usual", k)]), statistics.median(rates[("mmdist", k)])
            rows.append(
                {
                    "cores": k,
                    "usual_img_s": round(usual, 1),
                    "mmdist_img_s": round(ours, 1),
                    "usual_per_core": round(usual / k, 1),
                    "mmdist_per_core": round(ours / k, 1),
                    "ratio": round(ours / usual, 2),
                }
            )
        print(
            f"\n{'cores':>5} {'usual img/s':>12} {'mmdist img/s':>13} "
            f"{'usual /core':>12} {'mmdist /core':>13} {'ratio':>6}"
        )
        for r in rows:
            print(
                f"{r['cores']:>5} {r['usual_img_s']:>12} {r['mmdist_img_s']:>13} "
                f"{r['usual_per_core']:>12} {r['mmdist_per_core']:>13} {r['ratio']:>5}x"
            )
        per_core = rows[0]["mmdist_per_core"]
        need = cores_per_gpu(per_core)
        print(
            f"\nmmdist at {per_core} images/s per core (1 worker): "
            "a frozen ViT-L/14-336 (configs/align.yaml, configs/fuse.yaml) "
            f"at {TOWER_MFU:.0%} of peak needs"
        )
        for gpu, n in need.items():
            print(f"  {gpu}: {n['images_per_s_per_gpu']} images/s per GPU -> {n['cores_per_gpu']} cores per GPU "
                  f"(usual: {round(n['images_per_s_per_gpu'] / rows[0]['usual_per_core'], 1)})")
        if args.json:
            Path(args.json).write_text(
                json.dumps(
                    {
                        "machine": cpu_description(),
                        "pixel_check": check,
                        "rows": rows,
                        "cores_per_gpu": need,
                        "images": args.images,
                        "rounds": args.rounds,
                    },
                    indent=2,
                )
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
