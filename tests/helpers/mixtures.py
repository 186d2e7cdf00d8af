"""A skewed mixture of samples for the planner's tests: text-only, one image, wide or tall (tiled), three images."""

from __future__ import annotations

import io
import random

import numpy as np
from PIL import Image

from helpers.data_fixtures import png

WORDS = "the a cat dog sits on red blue mat near window and looks at small bird while rain falls outside".split()


def _text(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words))


def skewed_samples(n: int, seed: int = 0) -> list[dict]:
    """A mixture far from uniform: 40% long text-only conversations, 30% one small image, 20% one wide or tall image
    (tiled on a grid of 2 or 3 tiles), 10% three images."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        kind = rng.choices(["text", "one", "tiled", "three"], [4, 3, 2, 1])[0]
        images = {"text": [], "one": [png(i, 16)], "tiled": [_wide(i, rng)], "three": [png(i, 16)] * 3}[kind]
        turns = [{"from": "human", "value": "<image>\n" * len(images) + _text(rng, rng.randint(2, 8)) + "?"},
                 {"from": "gpt", "value": _text(rng, rng.randint(1, 6))}]
        if kind == "text":  # several turns of longer text
            for _ in range(rng.randint(1, 3)):
                turns += [{"from": "human", "value": _text(rng, rng.randint(5, 15))},
                          {"from": "gpt", "value": _text(rng, rng.randint(5, 20))}]
        sample = {"__key__": f"s{i:05d}", "json": {"conversations": turns}}
        if len(images) == 1:
            sample["png"] = images[0]
        for j, image in enumerate(images if len(images) > 1 else []):
            sample[f"{j}.png"] = image
        out.append(sample)
    return out


def _wide(i: int, rng: random.Random) -> bytes:
    w, h = rng.choice([(48, 16), (32, 16), (16, 48), (32, 32)])
    buf = io.BytesIO()
    Image.fromarray(np.full((h, w, 3), i % 256, dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()
