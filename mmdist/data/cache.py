"""Frozen-feature cache: ``build_feature_cache`` (run by ``mmdist cache``) and the checks of a cache's key.

When the vision encoder is frozen and preprocessing is deterministic, its
outputs for a sample never change, so an offline pass can compute them once.
The cache is a set of new shards: each sample keeps its text members (``txt``,
``json``) and replaces its images with ``features.npy`` (fp16, [n_images, n, D]),
plus ``sizes.json`` and ``cache_key.json``.

Stage 1 with a frozen text encoder (linear/MLP heads) also caches each caption's
pooled text-encoder output, the vector the trainable head takes: the member is
then ``features.safetensors`` holding ``image_features`` (fp16, [1, n, D]) and
``text_features`` (fp32, [H]; fp32 so the loss equals the one computed from
token ids), and batches carry ``text_features`` [B, H] so no step runs the text
encoder. A trainable text encoder (Q-Former) needs token ids: nothing of the
text side is cached then.

The key is a hash of (encoder identity / weights fingerprint, layer choice,
preprocessing fingerprint) and, when text features are cached, a ``text`` part
(text encoder fingerprint, pooling, max_length, dtype, tokenizer identity).
Training with ``data.feature_cache`` recomputes the key from its own model and
refuses a cache whose key differs, naming the parts that differ: stale features
from another encoder, layer or resolution would train silently wrong otherwise.
A run whose text encoder trains reads only the image features of a cache with
text features; a frozen-text run on an image-only cache runs its text encoder
on every batch (and logs that a rebuilt cache would skip it).

Layout: ``DIR/train/`` and ``DIR/eval/`` (from ``mmdist cache``), each with its
own ``cache_key.json``; ``build_feature_cache`` writes one such folder.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import numpy as np

from mmdist.data.collate import collate_align, pad_id_of
from mmdist.data.preprocess import make_preprocessor
from mmdist.data.reader import BadSample, decode_images, decode_sample, list_shards, read_tar
from mmdist.data.shards import ShardWriter, WriteSummary
from mmdist.models.processors import _tokenizer_id
from mmdist.models.text import text_fingerprint

if TYPE_CHECKING:
    from mmdist.config.run import RunConfig

log = logging.getLogger(__name__)
KEY_FILE = "cache_key.json"


class CacheKeyMismatch(ValueError):
    """The feature cache was built with another encoder, layer or preprocessing than this run uses."""


def cache_key_parts(cfg: RunConfig, processors: Any, encoder_key: Optional[dict] = None) -> dict:
    """What the cached features depend on: encoder identity, layer choice, preprocessing fingerprint."""
    vision = cfg.model.vision
    return {
        "encoder": encoder_key if encoder_key is not None else dict(getattr(processors, "identity", {}) or {}),
        "select_layer": vision.select_layer,
        "select_tokens": vision.select_tokens,
        "preprocess": processors.fingerprint(),
    }


def text_cache_parts(cfg: RunConfig, processors: Any) -> Optional[dict]:
    """What cached text features depend on, or None when the text
    side is not cached (stage fuse, trainable text encoder)."""
    if not cfg.stage.builds("text") or not cfg.model.text.freeze or cfg.model.connector.type == "qformer":
        return None

    text = cfg.model.text
    return {
        "encoder": text_fingerprint(text),
        "pooling": text.pooling,
        "max_length": text.max_length,
        "dtype": text.dtype,
        "tokenizer": _tokenizer_id(getattr(processors, "text_tokenizer", None)),
    }


def cache_key(parts: dict) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32]


def _npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def build_feature_cache(
    cfg: RunConfig,
    model_or_encoder_fn: Any,
    src_shards: Sequence[str],
    out_dir: str | os.PathLike,
    *,
    processors: Any = None,
    encoder_key: Optional[dict] = None,
    batch_size: int = 32,
    samples_per_shard: int = 1000,
    overwrite: bool = False,
    cache_text: Optional[bool] = None,
) -> WriteSummary:
    """Encode every image of ``src_shards`` once and write feature
    shards + sizes.json + cache_key.json into ``out_dir``.

    ``model_or_encoder_fn`` is a model with ``encode_images(pixel_values)`` and a
    ``processors`` attribute, or a plain callable ``encode(pixel_values) -> [N, n, D]``.
    Either gets uint8 pixels [N, 3, H, W], as the loader ships them (the vision tower
    normalises them; a plain callable can use ``processors.image_transform.normalize``)
    (then pass ``processors``; ``encoder_key`` defaults to ``processors.identity``
    and must be passed to ``build_loader(feature_key=...)`` if you override it).

    ``cache_text``: also store each caption's pooled text-encoder output (needs a
    model with ``encode_text``, stage align and a frozen text encoder). ``None``
    (default) does so whenever that is possible; False keeps an image-only cache.
    """
    if hasattr(model_or_encoder_fn, "encode_images"):
        encode: Callable = model_or_encoder_fn.encode_images
        processors = processors or model_or_encoder_fn.processors
    else:
        encode = model_or_encoder_fn
    if processors is None:
        raise ValueError(
            "build_feature_cache needs processors (the image transform and fingerprint) with a plain encoder callable"
        )
    parts = cache_key_parts(cfg, processors, encoder_key)
    text_parts = text_cache_parts(cfg, processors)
    encode_text = getattr(model_or_encoder_fn, "encode_text", None)
    device = _model_device(model_or_encoder_fn)
    if device is not None and device.type != "cpu":  # batches are built on the CPU: move them to the encoders
        encode = _on_device(encode, device)
        encode_text = _on_device(encode_text, device) if encode_text is not None else None
    if cache_text is None:
        cache_text = text_parts is not None and encode_text is not None
    elif cache_text and (text_parts is None or encode_text is None):
        raise ValueError(
            "cache_text=True needs stage align, a frozen text encoder (model.text.freeze=true, connector linear/mlp) "
            "and a model with encode_text; the text side of this run cannot be cached"
        )
    shards = list_shards(list(src_shards), need_sizes=False)
    out = Path(out_dir)
    with ShardWriter(out, prefix="features", samples_per_shard=samples_per_shard, overwrite=overwrite,
                     verify_images=False, length_stats=False) as writer:
        if cache_text:
            parts["text"] = text_parts
            _write_image_text_features(cfg, processors, encode, encode_text, shards, writer, batch_size)
        else:
            _write_image_features(cfg, processors, encode, shards, writer, batch_size)
    member = "features.safetensors" if cache_text else "features.npy"
    (out / KEY_FILE).write_text(
        json.dumps(
            {
                "key": cache_key(parts),
                "parts": parts,
                "dtype": "float16",
                "member": member,
                "text_features": bool(cache_text),
            },
            indent=1,
            sort_keys=True,
            default=str,
        )
    )
    return writer.summary


def _model_device(model: Any) -> Any:
    """The device of a model's first parameter, or None (a plain callable, a model without parameters)."""
    try:
        return next(model.parameters()).device
    except (AttributeError, StopIteration, TypeError):
        return None


def _on_device(fn: Callable, device: Any) -> Callable:
    return lambda *tensors: fn(*(t.to(device, non_blocking=True) for t in tensors))


def _text_members(sample: dict) -> dict:
    record: dict = {"__key__": sample["key"]}
    if sample["text"] is not None:
        record["txt"] = sample["text"]
    if sample["json"] is not None:
        record["json"] = sample["json"]
    return record


def _prepared_samples(
    shards: list, data: Any, writer: ShardWriter, prepare: Callable[[dict], Any]
) -> Iterator[tuple[dict, Any]]:
    """(decoded sample, ``prepare(sample)``) for every sample of
    ``shards``; bad ones are recorded in ``writer`` and skipped."""
    for shard in shards:
        for raw in read_tar(shard.url):
            try:
                sample = decode_sample(raw, data.max_image_pixels, data.max_caption_chars)
                prepared = prepare(sample)
            except BadSample as exc:
                writer.skip(exc.reason, f"{shard.url}:{raw.get('__key__', '?')}", exc.detail)
                continue
            yield sample, prepared


def _write_image_features(
    cfg: RunConfig, processors: Any, encode: Callable, shards: list, writer: ShardWriter, batch_size: int
) -> None:
    """Every sample (text-only ones too) with its images replaced by ``features.npy``."""
    import torch

    data = cfg.data
    pending: list[tuple[dict, list]] = []

    def flush() -> None:
        tensors = [t for _, images in pending for t in images]
        feats = None
        if tensors:
            with torch.no_grad():
                feats = encode(torch.stack(tensors)).detach().to(torch.float16).cpu().numpy()
        offset = 0
        for sample, images in pending:
            record = _text_members(sample)
            if images:
                record["features.npy"] = _npy_bytes(feats[offset : offset + len(images)])
                offset += len(images)
            writer.write(record)
        pending.clear()

    def transform_images(sample: dict) -> list:
        transform = processors.image_transform
        return [transform.to_uint8(img) for img in decode_images(sample, data.max_image_pixels, transform.draft_size)]

    for sample, images in _prepared_samples(shards, data, writer, transform_images):
        pending.append((sample, images))
        if sum(len(i) for _, i in pending) >= batch_size:
            flush()
    flush()


def _write_image_text_features(cfg: RunConfig, processors: Any, encode: Callable, encode_text: Callable, shards: list,
                               writer: ShardWriter, batch_size: int) -> None:
    """Stage-1 samples with ``features.safetensors`` (image and pooled caption features).

    Each sample goes through the loader's own stage-1 preprocessing (caption choice,
    tokenisation, image transform), so the cached vectors are those training would
    compute; samples it rejects (no caption, not exactly one image) are skipped here
    as the loader would skip them.
    """
    import torch
    from safetensors.numpy import save as st_save

    data = cfg.data
    preprocess = make_preprocessor(cfg, processors, use_features=False)
    pad_id = pad_id_of(processors.text_tokenizer)
    pending: list[tuple[dict, dict]] = []

    def flush() -> None:
        if not pending:
            return
        batch = collate_align([item for _, item in pending], pad_id)
        with torch.no_grad():
            image = encode(batch["pixel_values"]).detach().to(torch.float16).cpu().numpy()
            text = (
                encode_text(batch["text_input_ids"], batch["text_attention_mask"])
                .detach()
                .to(torch.float32)
                .cpu()
                .numpy()
            )
        for i, (sample, _) in enumerate(pending):
            record = _text_members(sample)
            record["features.safetensors"] = st_save({"image_features": np.ascontiguousarray(image[i : i + 1]),
                                                      "text_features": np.ascontiguousarray(text[i])})
            writer.write(record)
        pending.clear()

    for sample, item in _prepared_samples(shards, data, writer, preprocess):
        pending.append((sample, item))
        if len(pending) >= batch_size:
            flush()
    flush()


def read_cache_key(folder: str | os.PathLike) -> dict:
    """The ``cache_key.json`` of a cache folder (key, parts, member, text_features)."""
    path = Path(folder) / KEY_FILE
    if not path.is_file():
        raise CacheKeyMismatch(
            f"{folder} is not a feature cache (no {KEY_FILE}); "
            "build one with `mmdist cache` or unset data.feature_cache"
        )
    return json.loads(path.read_text())


def check_cache(folder: str | os.PathLike, expected_parts: dict, ignore: Sequence[str] = ()) -> dict:
    """Refuse a cache folder whose key differs from ``expected_parts``
    (naming the parts that differ); returns its key file.

    ``ignore``: stored parts left out of the comparison (the ``text`` part when this
    run reads only the image features).
    """
    stored = read_cache_key(folder)
    theirs = {k: v for k, v in stored.get("parts", {}).items() if k not in ignore}
    if not ignore and stored.get("key") == cache_key(expected_parts):
        return stored
    if ignore and cache_key(theirs) == cache_key(expected_parts):
        return stored
    differ = _differing_parts(theirs, expected_parts)
    raise CacheKeyMismatch(
        f"feature cache {folder} was built for another setup: {', '.join(differ) or 'key'} differ(s) "
        f"(cache: { {k: _part(theirs, k) for k in differ} }, this run: "
        f"{ {k: _part(expected_parts, k) for k in differ} }). "
        "Rebuild it with `mmdist cache` for this config, or unset data.feature_cache to read pixels."
    )


def _same(a: Any, b: Any) -> bool:
    return json.dumps(a, sort_keys=True, default=str) == json.dumps(b, sort_keys=True, default=str)


def _differing_parts(theirs: dict, ours: dict) -> list[str]:
    """Names of the key parts that differ, one level deep for dict parts (``text.max_length``, ``encoder.vision``)."""
    out = []
    for k in sorted(set(theirs) | set(ours)):
        a, b = theirs.get(k), ours.get(k)
        if _same(a, b):
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            out += [f"{k}.{sub}" for sub in sorted(set(a) | set(b)) if not _same(a.get(sub), b.get(sub))]
        else:
            out.append(k)
    return out


def _part(parts: dict, name: str) -> Any:
    top, _, sub = name.partition(".")
    value = parts.get(top)
    return value.get(sub) if sub and isinstance(value, dict) else value


def open_feature_cache(
    cfg: RunConfig, processors: Any, split: str, feature_key: Optional[dict] = None
) -> tuple[list, bool]:
    """The shards of ``split`` in the configured feature cache after
    checking its key, and whether to read its text features."""
    root = Path(cfg.data.feature_cache)
    folder = root / split if (root / split).is_dir() else root
    if folder == root and split == "eval" and not (root / KEY_FILE).is_file():
        raise FileNotFoundError(f"feature cache {root} has no eval/ folder")
    expected = cache_key_parts(cfg, processors, feature_key)
    stored = read_cache_key(folder)
    has_text = "text" in stored.get("parts", {})
    run_text = text_cache_parts(cfg, processors)
    if has_text and run_text is not None:
        check_cache(folder, {**expected, "text": run_text})
    else:
        check_cache(folder, expected, ignore=("text",))
        if has_text:
            log.info(
                "feature cache %s holds text features; this run's text "
                "encoder trains, so only its image features are read",
                folder,
            )
        elif run_text is not None:
            log.info("feature cache %s holds image features only: the frozen text encoder runs every step "
                     "(rebuild it with `mmdist cache` to cache the text side too)", folder)
    shards = list_shards(
        [str(p) for p in sorted(folder.glob("*.tar"))] or [str(folder / "features-000000.tar")], source=f"cache:{split}"
    )
    return [(shards, 1.0)], has_text and run_text is not None


def cache_sources(cfg: RunConfig, processors: Any, split: str, feature_key: Optional[dict] = None) -> list:
    """The shards of ``split`` in the configured feature cache, after checking its key."""
    return open_feature_cache(cfg, processors, split, feature_key)[0]
