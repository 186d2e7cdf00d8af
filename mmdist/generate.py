"""Answering a prompt about an image with a trained stage-2 model (what `mmdist generate` and the demo run).

The prompt is rendered by the data pipeline's own preprocessor (the same
template, image placeholder expansion and separators as in training), so what
the model sees at inference is what it was trained on; generation is greedy
from ``inputs_embeds``. The helpers here (`prompt_ids`, `answer_batch`,
`answer_images`, `parse_digit`) are also what the demo and evaluation use.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Sequence
from typing import Any, Optional

from mmdist.data.preprocess import DATA_IMAGE_MARK, make_preprocessor
from mmdist.data.tiling import expand_image_runs, tile_image
from mmdist.export import run_config_of

DIGIT_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def prompt_ids(model: Any, prompt: str, num_images: int = 1) -> list[int]:
    """Token ids of ``prompt`` as the training template renders a user turn, up to where the answer starts.

    ``<image>`` marks (the tokenizer's image token) place the images; without one
    they go first, on their own line, as in the demo's training conversations.
    """
    import numpy as np

    processors = model.processors
    cfg = copy.deepcopy(run_config_of(model))
    mark = processors.image_token or cfg.model.llm.image_token
    if mark not in prompt and DATA_IMAGE_MARK not in prompt:
        prompt = (mark + "\n") * num_images + prompt
    cfg.data.format = "conversation"
    cfg.data.image_tiling.enabled = False  # rendered with one run per image; answer_images expands tiled images
    pre = make_preprocessor(cfg, processors, use_features=True)
    # Render a conversation whose answer is empty: the prompt is everything before the first supervised token.
    sample = {
        "key": "prompt",
        "text": None,
        "json": {"conversations": [{"from": "human", "value": prompt}, {"from": "gpt", "value": ""}]},
        "features": np.zeros((num_images, 1, 1), dtype=np.float16),
    }
    out = pre(sample)
    labels = out["labels"]
    start = next((i for i, t in enumerate(labels) if t != -100), len(labels))
    return list(out["input_ids"][:start])


def answer_batch(model: Any, prompts: Sequence[Sequence[int]], *, pixel_values: Any = None, image_features: Any = None,
                 max_new_tokens: int = 8, **generate_kwargs: Any) -> list[str]:
    """Greedy answers for a batch of prompt id lists (left-padded here) and their images, decoded and stripped.

    ``generate_kwargs`` go to ``FusedVLM.generate`` (e.g. ``synced_gpus`` under ZeRO-3).
    """
    import torch

    tok = model.processors.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), int(pad), dtype=torch.long)
    attention = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, ids in enumerate(prompts):
        ids = torch.as_tensor(list(ids), dtype=torch.long)
        input_ids[row, width - len(ids):] = ids
        attention[row, width - len(ids):] = 1
    device = next(model.parameters()).device
    with torch.no_grad():
        pixel_values = pixel_values.to(device) if pixel_values is not None else None
        image_features = image_features.to(device) if image_features is not None else None
        new = model.generate(input_ids.to(device), attention_mask=attention.to(device), pixel_values=pixel_values,
                             image_features=image_features, max_new_tokens=max_new_tokens, **generate_kwargs)
    return [tok.decode(seq, skip_special_tokens=True).strip() for seq in new]


def answer_images(model: Any, images: Sequence[Any], prompt: str, max_new_tokens: int = 8) -> list[str]:
    """One answer per PIL image to the same ``prompt``.

    A model trained with ``data.image_tiling`` sees each image as in training: the
    base image and its tiles (mmdist/data/tiling.py), the prompt's image run
    expanded to the chosen grid with the separator after each row of tiles.
    """
    import torch

    processors = model.processors
    ids = prompt_ids(model, prompt, 1)
    tiling = run_config_of(model).data.image_tiling
    if not tiling.enabled:
        pixel_values = torch.stack([processors.image_transform(image) for image in images])
        return answer_batch(model, [ids] * len(images), pixel_values=pixel_values, max_new_tokens=max_new_tokens)
    transform = processors.image_transform
    separator = processors.tokenizer.encode(tiling.separator, add_special_tokens=False)
    answers = []
    for image in images:  # each image has its own grid, so its own prompt length: one at a time
        rows, grid = tile_image(image, tiling, transform)
        tiled = expand_image_runs(ids, [grid], processors.num_image_tokens, processors.image_token_id, separator)
        pixels = transform.normalize(torch.stack(rows))
        answers += answer_batch(model, [tiled], pixel_values=pixels, max_new_tokens=max_new_tokens)
    return answers


def parse_digit(text: str) -> Optional[int]:
    """The digit an answer names: its first word as a digit name ('Seven.' -> 7) or a numeral ('7' -> 7); else None."""
    words = re.findall(r"[a-z]+|\d+", text.lower())
    if not words:
        return None
    first = words[0]
    if first in DIGIT_WORDS:
        return DIGIT_WORDS.index(first)
    if first.isdigit() and len(first) == 1:
        return int(first)
    return None
