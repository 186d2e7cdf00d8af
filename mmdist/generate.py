"""`mmdist generate`: answer a prompt about an image with an exported stage-2 model.

    mmdist generate --run runs/demo --image digit.png --prompt "What digit is this?"

``--run`` takes a stage-2 export folder, a stage-2 run folder (its ``export/``)
or a demo run folder (its ``fuse/export/``). The export's manifest carries the
resolved config and the stage-1 manifest, so the model is rebuilt exactly
(mmdist.materialize.load_fused_model) and nothing else is needed.

The prompt is rendered by the data pipeline's own preprocessor (the same
template, image placeholder expansion and separators as in training), so what
the model sees at inference is what it was trained on; generation is greedy
from ``inputs_embeds``. The helpers here (`load_model`, `prompt_ids`,
`answer_batch`, `answer_images`, `parse_digit`) are also what the demo uses to
measure held-out accuracy.
"""

from __future__ import annotations

import argparse
import copy
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

DIGIT_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def load_model(path: str | Path, overrides: Optional[list[str]] = None, device: Optional[str] = None) -> Any:
    """The trained FusedVLM of a stage-2 export / run / demo folder, in eval mode, on ``device`` (default: the GPU
    when there is one, else cpu). An ``auto`` dtype in ``overrides`` is resolved for that device; a stored dtype the
    device cannot run fast gets a one-line warning (e.g. bf16 from a GPU run on a CPU without native bf16)."""
    from mmdist.hardware import default_device
    from mmdist.materialize import load_inference_model
    from mmdist.precision import precision_lines

    model = load_inference_model(path, overrides, device or default_device())
    for line in precision_lines(getattr(model, "precision", [])):
        if line.startswith("warning:"):
            print(f"[mmdist] {line}", file=sys.stderr)
    return model


def prompt_ids(model: Any, prompt: str, num_images: int = 1) -> list[int]:
    """Token ids of ``prompt`` as the training template renders a user turn, up to where the answer starts.

    ``<image>`` marks (the tokenizer's image token) place the images; without one
    they go first, on their own line, as in the demo's training conversations.
    """
    import numpy as np

    from mmdist.data.preprocess import DATA_IMAGE_MARK, make_preprocessor
    from mmdist.export import run_config_of

    processors = model.processors
    cfg = copy.deepcopy(run_config_of(model))
    mark = processors.image_token or cfg.model.llm.image_token
    if mark not in prompt and DATA_IMAGE_MARK not in prompt:
        prompt = (mark + "\n") * num_images + prompt
    cfg.data.format = "conversation"
    pre = make_preprocessor(cfg, processors, use_features=True)
    # Render a conversation whose answer is empty: the prompt is everything before the first supervised token.
    sample = {"key": "prompt", "text": None, "json": {"conversations": [{"from": "human", "value": prompt}, {"from": "gpt", "value": ""}]},
              "features": np.zeros((num_images, 1, 1), dtype=np.float16)}
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
    """One answer per PIL image to the same ``prompt``."""
    import torch

    pixel_values = torch.stack([model.processors.image_transform(image) for image in images])
    ids = prompt_ids(model, prompt, 1)
    return answer_batch(model, [ids] * len(images), pixel_values=pixel_values, max_new_tokens=max_new_tokens)


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


def cli_main(argv: Sequence[str] | None = None) -> int:
    """``mmdist generate --run RUN_DIR --image IMG --prompt TEXT``: print the model's answer."""
    parser = argparse.ArgumentParser(prog="mmdist generate", description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True, help="stage-2 export folder, stage-2 run folder, or demo run folder")
    parser.add_argument("--image", required=True, nargs="+", help="image file(s); each gets its own answer")
    parser.add_argument("--prompt", default="What digit is this?", help="the question (an <image> mark places the image)")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="longest answer in tokens")
    parser.add_argument("--device", default=None, help="where the model runs (default: the GPU when there is one, else cpu)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides of the stored config, e.g. model.llm.dtype=auto")
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    from PIL import Image

    try:
        model = load_model(args.run, args.overrides, args.device)
        images = []
        for path in args.image:
            try:
                images.append(Image.open(path).convert("RGB"))
            except (OSError, ValueError) as exc:
                raise FileNotFoundError(f"--image {path}: cannot read it as an image ({exc})") from None
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    answers = answer_images(model, images, args.prompt, args.max_new_tokens)
    for path, text in zip(args.image, answers):
        print(f"{path}: {text}" if len(args.image) > 1 else text)
    return 0


if __name__ == "__main__":
    sys.exit(cli_main())
