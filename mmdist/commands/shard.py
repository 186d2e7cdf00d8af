"""`mmdist shard {demo,llava,folder} --out DIR ...`: write WebDataset shards and print a summary."""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from typing import Any

from mmdist.data.shards import (
    ShardsExist,
    folder_samples,
    llava_samples,
    shard_pattern,
    write_demo_shards,
    write_shards,
)


def main(argv: Sequence[str] | None = None) -> int:
    """``mmdist shard {demo,llava,folder} --out DIR ...``: write shards, print a summary; exit 2 if shards exist."""
    parser = argparse.ArgumentParser(prog="mmdist shard", description="Write WebDataset shards with sizes.json.")
    sub = parser.add_subparsers(dest="source", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--out", required=True, help="output folder")
    common.add_argument("--samples-per-shard", type=int, default=1000, help="samples per tar file")
    common.add_argument("--overwrite", action="store_true", help="replace existing shards in the output folder")
    common.add_argument("--prefix", default="shard", help="shard file prefix (demo: train/eval)")
    common.add_argument("--tokenizer", default="",
                        help="the LLM's tokenizer (hub id, local folder or mmdist:tiny-bytes): stats.json then records "
                             "text tokens, not only characters and words")
    demo = sub.add_parser("demo", parents=[common], help="scikit-learn digits: train/ and held-out eval/ shards")
    demo.add_argument("--image-size", type=int, default=28, help="side of the upscaled PNG digits")
    demo.set_defaults(samples_per_shard=200)
    demo.add_argument("--limit", type=int, default=None, help="only the first N training digits (quick runs)")
    llava = sub.add_parser("llava", parents=[common], help="a LLaVA JSON list + an image root")
    llava.add_argument("--json", required=True, help="LLaVA JSON file (list of {id, image, conversations})")
    llava.add_argument("--images", required=True, help="folder the 'image' paths are relative to")
    folder = sub.add_parser("folder", parents=[common], help="an image folder + CSV/JSONL captions")
    folder.add_argument("--images", required=True, help="image folder")
    folder.add_argument("--captions", required=True, help="CSV (image,caption columns) or JSONL ({image, caption})")
    args = parser.parse_args(list(argv) if argv is not None else None)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        if args.source == "demo":
            summaries = write_demo_shards(args.out, args.image_size, args.samples_per_shard, args.overwrite, args.limit,
                                          tokenizer=_tokenizer(args.tokenizer) if args.tokenizer else None,
                                          tokenizer_name=args.tokenizer)
            for split, summary in summaries.items():
                print(f"{split}: {summary}")
            return 0
        samples = (
            llava_samples(args.json, args.images)
            if args.source == "llava"
            else folder_samples(args.images, args.captions)
        )
        tokenizer = _tokenizer(args.tokenizer) if args.tokenizer else None
        summary = write_shards(samples, args.out, args.prefix, args.samples_per_shard, args.overwrite,
                               tokenizer=tokenizer, tokenizer_name=args.tokenizer)
    except ShardsExist as exc:
        print(f"error: {exc}")
        return 2
    except (ValueError, OSError) as exc:
        print(f"error: {exc}")
        return 1
    print(summary)
    print(f"shards: {shard_pattern(summary)}" if summary.shards else "no shards written")
    return 0


def _tokenizer(name: str) -> Any:
    """A tokenizer by name: mmdist's built-in ones, else transformers' (a hub id or a local folder)."""
    from mmdist.models.tokenizers import builtin_tokenizer

    builtin = builtin_tokenizer(name)
    if builtin is not None:
        return builtin
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(name)
