"""`mmdist cache --config C --out DIR`: precompute frozen-encoder features into new shards."""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from pathlib import Path

from mmdist.commands import exits_on_oom
from mmdist.config.run import load_config
from mmdist.data.cache import build_feature_cache
from mmdist.hardware import default_device
from mmdist.materialize import build_run_encoder
from mmdist.precision import precision_lines, resolve_precision


@exits_on_oom
def main(argv: Sequence[str] | None = None) -> int:
    """``mmdist cache --config C [key=value ...] --out DIR``:
    precompute frozen encoder features for data.train / data.eval.

    Stage align with a frozen text encoder caches the pooled caption features too.
    """
    parser = argparse.ArgumentParser(prog="mmdist cache", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="run config (its model.vision and data sources are used)")
    parser.add_argument("--out", required=True, help="cache folder (train/ and eval/ are written inside)")
    parser.add_argument("--batch-size", type=int, default=32, help="images per encoder forward")
    parser.add_argument("--samples-per-shard", type=int, default=1000, help="samples per feature shard")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing cache")
    parser.add_argument(
        "--no-text",
        action="store_true",
        help="stage align: cache image features only (the frozen text encoder then runs every step)",
    )
    parser.add_argument(
        "--device", default=None, help="where the frozen encoders run (default: the GPU when there is one, else cpu)"
    )
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. model.vision.select_layer=-1")
    args = parser.parse_args(list(argv) if argv is not None else None)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")

    device = args.device or default_device()
    cfg = load_config(args.config, args.overrides)
    cfg.data.feature_cache = None
    cfg, resolved = resolve_precision(cfg, device)
    for line in precision_lines(resolved):
        print(f"[mmdist cache] precision {line}")
    model = build_run_encoder(cfg)  # stage 2: the vision tower only, never the LLM
    model.to(device).eval()
    print(f"[mmdist cache] encoding on {device}")
    for split, sources in (("train", cfg.data.train), ("eval", cfg.data.eval)):
        if not sources:
            continue
        patterns = [p for src in sources for p in src.shards]
        summary = build_feature_cache(cfg, model, patterns, Path(args.out) / split, batch_size=args.batch_size,
                                      samples_per_shard=args.samples_per_shard, overwrite=args.overwrite,
                                      cache_text=False if args.no_text else None)
        print(f"{split}: {summary}")
    print(f"use it with: data.feature_cache={args.out}")
    return 0
