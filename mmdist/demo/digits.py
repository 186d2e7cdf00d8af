"""The demo's data: scikit-learn's handwritten digits as train and held-out WebDataset shards.

What ``mmdist shard demo`` writes, into ``RUN_DIR/data/shards/{train,eval}``,
plus the data overrides that point a recipe at those shards.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from mmdist.data.shards import write_demo_shards

log = logging.getLogger(__name__)

IMAGE_SIZE = 28  # side of the PNG digits the shard tool writes
QUICK_SHARD_LIMIT = 160  # --quick: training digits; the held-out slice is a quarter of it


def shard_overrides(shards: dict) -> list[str]:
    """Recipe overrides that train on the demo's train shards and evaluate on its held-out ones."""
    return [
        f"data.train=[{{shards: [{json.dumps(shards['train'])}]}}]",
        f"data.eval=[{{shards: [{json.dumps(shards['eval'])}]}}]",
    ]


def make_shards(run_dir: Path, quick: bool) -> dict:
    """The digit shards (as ``mmdist shard demo``) in RUN_DIR/data/shards;
    returns the train/eval shard patterns and counts."""
    out = run_dir / "data" / "shards"
    # overwrite: a shard folder inside a demo run folder can only be this run's own, half-written before an interrupt.
    for split, summary in write_demo_shards(
        out, IMAGE_SIZE, overwrite=True, limit=QUICK_SHARD_LIMIT if quick else None
    ).items():
        log.info("%s: %s", split, summary)
    result = {}
    for split in ("train", "eval"):
        sizes = json.loads((out / split / "sizes.json").read_text())
        tars = sorted(p.name for p in (out / split).glob(f"{split}-*.tar"))
        result[split] = str(out / split / f"{split}-{{000000..{len(tars) - 1:06d}}}.tar")
        result[f"{split}_samples"] = (
            int(sum(v for k, v in sizes.items() if k.endswith(".tar"))) if isinstance(sizes, dict) else None
        )
    return result
