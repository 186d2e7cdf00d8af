"""`mmdist eval --run RUN --data SHARDS`: the stage's metrics of
an export on held-out shards, single process or under torchrun.

Stage 1 exports get retrieval R@1/5/10, stage 2 exports answer accuracy;
``RUN/eval/metrics.json`` (and ``answers.jsonl``) are written on rank 0.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from mmdist import distributed as dist
from mmdist.commands import exits_on_oom
from mmdist.data.loader import build_loader
from mmdist.evaluation import MATCHERS, eval_config, evaluate_model, summary_line
from mmdist.export import resolve_export_dir
from mmdist.hardware import default_device
from mmdist.launch_env import strip_local_rank
from mmdist.materialize import EVAL_SUBFOLDERS, load_export_model
from mmdist.oom import oom_guard, parameter_count
from mmdist.stages import Measure


def _output_dir(path: str, model: Any) -> Path:
    """``RUN/eval`` where RUN is the folder holding the export (the export folder's parent when it is ``export``)."""
    folder = Path(getattr(model, "export_dir", None) or resolve_export_dir(path, subfolders=EVAL_SUBFOLDERS))
    run = folder.parent if folder.name == "export" else folder
    return run / "eval"


def _memory_settings(args: argparse.Namespace) -> list[str]:
    """What lowers an evaluation's memory, as this command's flags and overrides."""
    return [f"--batch-size {args.batch_size} -> smaller", f"--max-new-tokens {args.max_new_tokens} -> fewer (stage 2: "
            "the answers' KV cache)", "model.llm.dtype=bf16 (an override; fp32 frozen weights take twice the memory)",
            "--device cpu (host memory; slower)"]


@exits_on_oom
def main(argv: Sequence[str] | None = None) -> int:
    """``mmdist eval --run RUN --data SHARDS``: the stage's metrics
    on held-out shards; single process or under torchrun."""
    argv = strip_local_rank(list(sys.argv[1:] if argv is None else argv))
    parser = argparse.ArgumentParser(prog="mmdist eval", description=__doc__.split("\n\n")[0].replace("\n", " "))
    parser.add_argument(
        "--run",
        required=True,
        help="export folder, run folder, or demo run folder (its stage 2; give RUN/align for stage 1)",
    )
    parser.add_argument(
        "--data", required=True, nargs="+", help="held-out shards: brace patterns, tar paths or a .txt list"
    )
    parser.add_argument(
        "--max-samples", type=int, default=None, help="evaluate at most this many samples (default: all)"
    )
    parser.add_argument("--batch-size", type=int, default=16, help="samples per batch on each rank")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="stage 2: longest answer in tokens")
    parser.add_argument(
        "--match",
        choices=sorted(MATCHERS),
        default="normalised",
        help="stage 2: how answers are compared: 'normalised' (SQuAD "
        "normalisation) or 'digit' (the demo's digit parser)",
    )
    parser.add_argument(
        "--device", default=None, help="cpu, cuda or cuda:N (default: cuda when usable; under torchrun cuda:LOCAL_RANK)"
    )
    parser.add_argument("--out", default=None, help="folder for metrics.json (and answers.jsonl); default RUN/eval")
    parser.add_argument(
        "overrides",
        nargs="*",
        help="dotted overrides of the stored config, e.g. model.llm.dtype=fp32 data.num_workers=0",
    )
    args = parser.parse_args(argv)

    env = dist.discover()
    owns_group = env.world_size > 1 and not dist.is_initialized()  # a caller that made the group keeps it
    if owns_group:
        dist.init(backend="auto")
    distributed = env.world_size > 1
    try:
        device = args.device or default_device()
        if device == "cuda" and distributed:
            device = f"cuda:{env.local_rank % max(torch.cuda.device_count(), 1)}"
        with oom_guard("the evaluation (`mmdist eval`)", sizes={"batch": args.batch_size},
                       settings=_memory_settings(args), device=device) as sizes:
            try:
                model = load_export_model(args.run, args.overrides, device)
            except (FileNotFoundError, ValueError) as exc:
                print(f"error: {exc}", file=sys.stderr)
                return 2
            sizes["model"] = parameter_count(model)
            model.to(device)
            cfg = eval_config(model.run_config, args.batch_size, args.data)
            sizes.update({"sequence": cfg.data.max_len, "answers up to": f"{args.max_new_tokens} tokens"})
            loader = build_loader(cfg, model.processors, "eval", env.rank, env.world_size)
            out = Path(args.out) if args.out else _output_dir(args.run, model)
            answers = cfg.stage.measures is Measure.ANSWERS  # rank 0 also writes every answer
            metrics = evaluate_model(model, cfg, loader, max_samples=args.max_samples,
                                     max_new_tokens=args.max_new_tokens, normalise=MATCHERS[args.match](),
                                     jsonl_path=out / "answers.jsonl" if answers else None)
        metrics.pop("records", None)
        metrics = {"stage": cfg.stage.name, "data": list(args.data), **metrics}
        if env.rank == 0:
            out.mkdir(parents=True, exist_ok=True)
            (out / "metrics.json").write_text(json.dumps(metrics, indent=1, sort_keys=True))
            print(f"[mmdist] eval {summary_line(cfg.stage, metrics)}")
            print(json.dumps(metrics, sort_keys=True))
            print(f"[mmdist] wrote {out / 'metrics.json'}" + (f" and {out / 'answers.jsonl'}" if answers else ""))
        if distributed:
            # Leave together: a rank that tears its group down while rank 0 still writes was seen to abort
            # ("terminate called without an active exception") on a loaded machine.
            torch.distributed.barrier()
    finally:
        if owns_group:
            dist.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
