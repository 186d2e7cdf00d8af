"""Frozen-feature cache: ``mmdist cache`` and ``build_feature_cache``.

When the vision encoder is frozen and preprocessing is deterministic, its
outputs for a sample never change, so an offline pass can compute them once.
The cache is a set of new shards: each sample keeps its text members (``txt``,
``json``) and replaces its images with ``features.npy`` (fp16, [n_images, n, D]),
plus ``sizes.json`` and ``cache_key.json``.

The key is a hash of (encoder identity / weights fingerprint, layer choice,
preprocessing fingerprint). Training with ``data.feature_cache`` recomputes the
key from its own model and refuses a cache whose key differs, naming the parts
that differ: stale features from another encoder, layer or resolution would
train silently wrong otherwise.

Layout: ``DIR/train/`` and ``DIR/eval/`` (from ``mmdist cache``), each with its
own ``cache_key.json``; ``build_feature_cache`` writes one such folder.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Optional

import numpy as np

from mmdist.data.reader import BadSample, decode_images, decode_sample, list_shards, read_tar
from mmdist.data.shards import ShardWriter, WriteSummary

log = logging.getLogger(__name__)
KEY_FILE = "cache_key.json"


class CacheKeyMismatch(ValueError):
    """The feature cache was built with another encoder, layer or preprocessing than this run uses."""


def cache_key_parts(cfg: Any, processors: Any, encoder_key: Optional[dict] = None) -> dict:
    """What the cached features depend on: encoder identity, layer choice, preprocessing fingerprint."""
    vision = cfg.model.vision
    return {
        "encoder": encoder_key if encoder_key is not None else dict(getattr(processors, "identity", {}) or {}),
        "select_layer": vision.select_layer,
        "select_tokens": vision.select_tokens,
        "preprocess": processors.fingerprint(),
    }


def cache_key(parts: dict) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32]


def _npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def build_feature_cache(cfg: Any, model_or_encoder_fn: Any, src_shards: Sequence[str], out_dir: str | os.PathLike, *,
                        processors: Any = None, encoder_key: Optional[dict] = None, batch_size: int = 32,
                        samples_per_shard: int = 1000, overwrite: bool = False) -> WriteSummary:
    """Encode every image of ``src_shards`` once and write feature shards + sizes.json + cache_key.json into ``out_dir``.

    ``model_or_encoder_fn`` is a model with ``encode_images(pixel_values)`` and a
    ``processors`` attribute, or a plain callable ``encode(pixel_values) -> [N, n, D]``
    (then pass ``processors``; ``encoder_key`` defaults to ``processors.identity``
    and must be passed to ``build_loader(feature_key=...)`` if you override it).
    """
    import torch

    if hasattr(model_or_encoder_fn, "encode_images"):
        encode: Callable = model_or_encoder_fn.encode_images
        processors = processors or model_or_encoder_fn.processors
    else:
        encode = model_or_encoder_fn
    if processors is None:
        raise ValueError("build_feature_cache needs processors (the image transform and fingerprint) with a plain encoder callable")
    parts = cache_key_parts(cfg, processors, encoder_key)
    shards = list_shards(list(src_shards), need_sizes=False)
    out = Path(out_dir)
    data = cfg.data
    pending: list[tuple[dict, list]] = []

    with ShardWriter(out, prefix="features", samples_per_shard=samples_per_shard, overwrite=overwrite, verify_images=False) as writer:

        def flush() -> None:
            tensors = [t for _, images in pending for t in images]
            feats = None
            if tensors:
                with torch.no_grad():
                    feats = encode(torch.stack(tensors)).detach().to(torch.float16).cpu().numpy()
            offset = 0
            for sample, images in pending:
                record = {"__key__": sample["key"]}
                if sample["text"] is not None:
                    record["txt"] = sample["text"]
                if sample["json"] is not None:
                    record["json"] = sample["json"]
                if images:
                    record["features.npy"] = _npy_bytes(feats[offset : offset + len(images)])
                    offset += len(images)
                writer.write(record)
            pending.clear()

        for shard in shards:
            for raw in read_tar(shard.url):
                try:
                    sample = decode_sample(raw, data.max_image_pixels, data.max_caption_chars)
                    images = [processors.image_transform(img) for img in decode_images(sample, data.max_image_pixels)]
                except BadSample as exc:
                    writer.skip(exc.reason, f"{shard.url}:{raw.get('__key__', '?')}", exc.detail)
                    continue
                pending.append((sample, images))
                if sum(len(i) for _, i in pending) >= batch_size:
                    flush()
        flush()
    (out / KEY_FILE).write_text(json.dumps({"key": cache_key(parts), "parts": parts, "dtype": "float16", "member": "features.npy"},
                                           indent=1, sort_keys=True, default=str))
    return writer.summary


def check_cache(folder: str | os.PathLike, expected_parts: dict) -> None:
    """Refuse a cache folder whose key differs from ``expected_parts`` (naming the parts that differ)."""
    path = Path(folder) / KEY_FILE
    if not path.is_file():
        raise CacheKeyMismatch(f"{folder} is not a feature cache (no {KEY_FILE}); build one with `mmdist cache` or unset data.feature_cache")
    stored = json.loads(path.read_text())
    if stored.get("key") == cache_key(expected_parts):
        return
    theirs = stored.get("parts", {})
    differ = [k for k in sorted(set(theirs) | set(expected_parts)) if json.dumps(theirs.get(k), sort_keys=True, default=str) != json.dumps(expected_parts.get(k), sort_keys=True, default=str)]
    raise CacheKeyMismatch(
        f"feature cache {folder} was built for another setup: {', '.join(differ) or 'key'} differ(s) "
        f"(cache: { {k: theirs.get(k) for k in differ} }, this run: { {k: expected_parts.get(k) for k in differ} }). "
        "Rebuild it with `mmdist cache` for this config, or unset data.feature_cache to read pixels."
    )


def cache_sources(cfg: Any, processors: Any, split: str, feature_key: Optional[dict] = None) -> list:
    """The shards of ``split`` in the configured feature cache, after checking its key."""
    root = Path(cfg.data.feature_cache)
    folder = root / split if (root / split).is_dir() else root
    if folder == root and split == "eval" and not (root / KEY_FILE).is_file():
        raise FileNotFoundError(f"feature cache {root} has no eval/ folder")
    check_cache(folder, cache_key_parts(cfg, processors, feature_key))
    shards = list_shards([str(p) for p in sorted(folder.glob("*.tar"))] or [str(folder / "features-000000.tar")], source=f"cache:{split}")
    return [(shards, 1.0)]


def cli_main(argv: Sequence[str] | None = None) -> int:
    """``mmdist cache --config C [key=value ...] --out DIR``: precompute frozen vision features for data.train / data.eval."""
    parser = argparse.ArgumentParser(prog="mmdist cache", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="run config (its model.vision and data sources are used)")
    parser.add_argument("--out", required=True, help="cache folder (train/ and eval/ are written inside)")
    parser.add_argument("--batch-size", type=int, default=32, help="images per encoder forward")
    parser.add_argument("--samples-per-shard", type=int, default=1000, help="samples per feature shard")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing cache")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. model.vision.select_layer=-1")
    args = parser.parse_args(list(argv) if argv is not None else None)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")

    from mmdist.config.run import load_config
    from mmdist.models import build_model

    cfg = load_config(args.config, args.overrides)
    cfg.data.feature_cache = None
    model = build_model(cfg)
    model.eval()
    for split, sources in (("train", cfg.data.train), ("eval", cfg.data.eval)):
        if not sources:
            continue
        patterns = [p for src in sources for p in src.shards]
        summary = build_feature_cache(cfg, model, patterns, Path(args.out) / split, batch_size=args.batch_size,
                                      samples_per_shard=args.samples_per_shard, overwrite=args.overwrite)
        print(f"{split}: {summary}")
    print(f"use it with: data.feature_cache={args.out}")
    return 0
