"""The demo's held-out figures: stage-1 retrieval top-1, stage-2 answer accuracy, and a small gallery.

Each reads the exported model (not the training engine), so the figures are
those of what ``mmdist generate`` loads; every held-out digit is evaluated
(the eval batch divides the held-out count).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PIL import Image

from mmdist import evaluation
from mmdist.data.loader import build_loader
from mmdist.data.reader import list_shards, read_tar
from mmdist.data.shards import DIGIT_NAMES
from mmdist.demo.state import DemoError
from mmdist.generate import answer_images, parse_digit
from mmdist.materialize import load_align_model

if TYPE_CHECKING:
    from mmdist.config.run import RunConfig

QUESTION = "What digit is this?"
REPORT_IMAGES = 10


def _eval_batch_size(n: int, limit: int = 64) -> int:
    """The largest batch <= limit that divides n, so every held-out
    sample is evaluated (epoch mode keeps full batches)."""
    return max(d for d in range(1, min(n, limit) + 1) if n % d == 0)


def _align_model_from_export(cfg: RunConfig, export_dir: Path) -> Any:
    """The stage-1 model of ``cfg`` with the exported trained weights (every exported key must fit)."""
    try:
        return load_align_model(cfg, export_dir)
    except ValueError as exc:
        raise DemoError(f"the stage-1 export {export_dir} does not fit configs' stage-1 model: {exc}") from None


def heldout_retrieval(cfg: RunConfig, export_dir: Path, eval_samples: int) -> dict:
    """Held-out image->text retrieval top-1 (R@1) with the exported
    stage-1 weights (mmdist.evaluation, as `mmdist eval`).

    The candidates are the distinct captions of the held-out digits (the ten digit
    captions when every digit is present); an image is right when its own caption ranks first.
    """
    model = _align_model_from_export(cfg, export_dir)
    eval_cfg = evaluation.eval_config(cfg, _eval_batch_size(eval_samples))
    try:
        metrics = evaluation.evaluate_retrieval(model, build_loader(eval_cfg, model.processors, "eval"))
    except ValueError as exc:
        raise DemoError(f"held-out retrieval: {exc}") from None
    return {
        "heldout_retrieval_top1": metrics["i2t_r1"],
        "heldout_samples": metrics["samples"],
        "chance": metrics["i2t_chance_r1"],
        "retrieval": {k: v for k, v in metrics.items() if k.startswith(("i2t_r", "t2i_r"))},
    }


def heldout_answers(model: Any, eval_samples: int) -> dict:
    """Held-out answer accuracy by greedy generation with the exported
    stage-2 model (mmdist.evaluation, as `mmdist eval --match digit`).

    An answer is right when the digit it names (parse_digit: its first word) is the reference's.
    """
    eval_cfg = evaluation.eval_config(model.run_config, _eval_batch_size(eval_samples))
    try:
        metrics = evaluation.evaluate_answers(model, build_loader(eval_cfg, model.processors, "eval"), max_new_tokens=8,
                                              normalise=parse_digit)
    except ValueError as exc:
        raise DemoError(f"held-out answers: {exc}") from None
    examples = [{"answer": r["answer"], "truth": r["reference"]} for r in metrics["records"][:12]]
    return {
        "heldout_answer_accuracy": metrics["exact"],
        "heldout_samples": metrics["samples"],
        "unparsed_answers": metrics["unparsed"],
        "chance": 0.1,
        "examples": examples,
    }


def heldout_gallery(run_dir: Path, eval_pattern: str, model: Any, n: int = REPORT_IMAGES) -> list[dict]:
    """Save ``n`` held-out digits (one per digit) as PNGs and ask the
    exported model about each file (the `mmdist generate` path)."""
    folder = run_dir / "images"
    folder.mkdir(exist_ok=True)
    items: list[dict] = []
    seen: set[int] = set()
    for shard in list_shards([eval_pattern], need_sizes=False):
        for raw in read_tar(shard.url):
            label = int(json.loads(raw["json"].decode())["label"])
            if label in seen or len(items) >= n:
                continue  # one image per digit, so the gallery shows different digits
            seen.add(label)
            path = folder / f"heldout_{len(items):02d}_{raw['__key__']}.png"
            path.write_bytes(raw["png"])
            items.append({"image": path.name, "key": raw["__key__"], "truth": DIGIT_NAMES[label]})
    answers = answer_images(model, [Image.open(folder / item["image"]) for item in items], QUESTION)
    for item, text in zip(items, answers):
        item["answer"] = text
        guess = parse_digit(text)
        item["correct"] = guess is not None and DIGIT_NAMES[guess] == item["truth"]
    return items
