"""The demo's held-out figures: stage-1 retrieval top-1, stage-2 answer accuracy, and a small gallery.

Each reads the exported model (not the training engine), so the figures are
those of what ``mmdist generate`` loads; every held-out digit is evaluated
(the eval batch divides the held-out count).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image

from mmdist.data import build_loader
from mmdist.data.reader import list_shards, read_tar
from mmdist.data.shards import DIGIT_NAMES
from mmdist.demo.state import DemoError
from mmdist.export import load_align_model
from mmdist.generate import answer_batch, answer_images, parse_digit

QUESTION = "What digit is this?"
REPORT_IMAGES = 10


def _eval_batch_size(n: int, limit: int = 64) -> int:
    """The largest batch <= limit that divides n, so every held-out sample is evaluated (epoch mode keeps full batches)."""
    return max(d for d in range(1, min(n, limit) + 1) if n % d == 0)


def _align_model_from_export(cfg: Any, export_dir: Path) -> Any:
    """The stage-1 model of ``cfg`` with the exported trained weights (every exported key must fit)."""
    try:
        return load_align_model(cfg, export_dir)
    except ValueError as exc:
        raise DemoError(f"the stage-1 export {export_dir} does not fit configs' stage-1 model: {exc}") from None


def heldout_retrieval(cfg: Any, export_dir: Path, eval_samples: int) -> dict:
    """Held-out image->text retrieval top-1 over the ten digit captions, with the exported stage-1 weights."""
    model = _align_model_from_export(cfg, export_dir)
    captions = [f"a handwritten digit {name}" for name in DIGIT_NAMES]
    tok = model.processors.text_tokenizer
    enc = tok(captions, padding=True, truncation=True, max_length=cfg.model.text.max_length, return_tensors="pt")
    cfg.train.micro_batch_size = _eval_batch_size(eval_samples)
    correct = total = 0
    with torch.no_grad():
        _, pooled = model.text(enc["input_ids"], enc["attention_mask"])
        text_emb = F.normalize(model.stage1.text_embedding(pooled).float(), dim=-1)
        for batch in build_loader(cfg, model.processors, "eval"):
            features = batch.get("image_features")
            if features is None:
                features = model.encode_images(batch["pixel_values"])
            image_emb = F.normalize(model.stage1.image_embedding(features).float(), dim=-1)
            predicted = (image_emb @ text_emb.T).argmax(-1).tolist()
            for row, guess in zip(batch["text_input_ids"], predicted):
                truth = tok.decode(row, skip_special_tokens=True).strip()
                total += 1
                correct += int(captions[guess] == truth)
    if total == 0:
        raise DemoError("the held-out split gave no batches to evaluate")
    return {"heldout_retrieval_top1": correct / total, "heldout_samples": total, "chance": 1 / len(captions)}


def heldout_answers(model: Any, eval_samples: int) -> dict:
    """Held-out answer accuracy by greedy generation with the exported stage-2 model (loaded as `mmdist generate` does)."""
    cfg = model.run_config
    cfg.train.micro_batch_size = _eval_batch_size(eval_samples)
    tok = model.processors.tokenizer
    correct = total = unparsed = 0
    examples = []
    with torch.no_grad():
        for batch in build_loader(cfg, model.processors, "eval"):
            prompts, truths = [], []
            for ids, labels in zip(batch["input_ids"], batch["labels"]):
                supervised = (labels != -100).nonzero()
                start = int(supervised[0]) if len(supervised) else len(ids)
                prompts.append(ids[:start])
                truths.append(tok.decode(labels[labels != -100], skip_special_tokens=True).strip())
            texts = answer_batch(model, prompts, pixel_values=batch.get("pixel_values"), image_features=batch.get("image_features"))
            for text, truth in zip(texts, truths):
                guess = parse_digit(text)
                want = parse_digit(truth)
                unparsed += int(guess is None)
                correct += int(guess is not None and guess == want)
                total += 1
                if len(examples) < 12:
                    examples.append({"answer": text, "truth": truth})
    if total == 0:
        raise DemoError("the held-out split gave no batches to evaluate")
    return {"heldout_answer_accuracy": correct / total, "heldout_samples": total, "unparsed_answers": unparsed,
            "chance": 0.1, "examples": examples}


def heldout_gallery(run_dir: Path, eval_pattern: str, model: Any, n: int = REPORT_IMAGES) -> list[dict]:
    """Save ``n`` held-out digits (one per digit) as PNGs and ask the exported model about each file (the `mmdist generate` path)."""
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
