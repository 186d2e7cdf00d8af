"""`mmdist generate --run RUN --image IMG --prompt TEXT`: print a stage-2 export's answer about an image.

``--run`` takes a stage-2 export folder, a stage-2 run folder (its ``export/``)
or a demo run folder (its ``fuse/export/``); the export alone rebuilds the model
(mmdist.materialize.load_fused_model).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Optional

from mmdist.commands import exits_on_oom
from mmdist.generate import answer_images
from mmdist.hardware import default_device
from mmdist.materialize import load_inference_model
from mmdist.models.fused import FusedVLM
from mmdist.oom import oom_guard, parameter_count
from mmdist.precision import precision_lines


def load_model(path: str | Path, overrides: Optional[list[str]] = None, device: Optional[str] = None) -> FusedVLM:
    """The trained FusedVLM of a stage-2 export / run / demo folder, in eval mode, on ``device`` (default: the GPU
    when there is one, else cpu). An ``auto`` dtype in ``overrides`` is resolved for that device; a stored dtype the
    device cannot run fast gets a one-line warning (e.g. bf16 from a GPU run on a CPU without native bf16)."""
    model = load_inference_model(path, overrides, device or default_device())
    for line in precision_lines(getattr(model, "precision", [])):
        if line.startswith("warning:"):
            print(f"[mmdist] {line}", file=sys.stderr)
    return model


@exits_on_oom
def main(argv: Sequence[str] | None = None) -> int:
    """``mmdist generate --run RUN_DIR --image IMG --prompt TEXT``: print the model's answer."""
    parser = argparse.ArgumentParser(prog="mmdist generate", description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True, help="stage-2 export folder, stage-2 run folder, or demo run folder")
    parser.add_argument("--image", required=True, nargs="+", help="image file(s); each gets its own answer")
    parser.add_argument(
        "--prompt", default="What digit is this?", help="the question (an <image> mark places the image)"
    )
    parser.add_argument("--max-new-tokens", type=int, default=32, help="longest answer in tokens")
    parser.add_argument(
        "--device", default=None, help="where the model runs (default: the GPU when there is one, else cpu)"
    )
    parser.add_argument("overrides", nargs="*", help="dotted overrides of the stored config, e.g. model.llm.dtype=auto")
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    settings = [f"--max-new-tokens {args.max_new_tokens} -> fewer (the KV cache grows with it)",
                f"fewer --image per call ({len(args.image)} answered in one batch)" if len(args.image) > 1 else None,
                "model.llm.dtype=bf16 (an override; fp32 weights take twice the memory)",
                "model.llm.quantize=int8 or nf4 (an override: the frozen LLM in 1 or 1/2 byte a weight)",
                "--device cpu (host memory; slower)"]
    device = args.device or default_device()
    sizes = {"images": len(args.image), "answers up to": f"{args.max_new_tokens} tokens"}
    with oom_guard("generation (`mmdist generate`)", sizes=sizes, settings=[s for s in settings if s], device=device):
        return _answer(args, device, sizes)


def _answer(args: argparse.Namespace, device: str, sizes: dict) -> int:
    """Load the model, read the images, print one answer per image; ``sizes`` learns the model's size."""
    from PIL import Image

    try:
        model = load_model(args.run, args.overrides, device)
        sizes["model"] = parameter_count(model)
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
    sys.exit(main())
