"""``mmdist train`` (and ``launch/train.py``): parse the arguments, train one stage, print, return the exit code.

Commands are their own layer: the library below (mmdist.training) never parses
argv and never prints for a person except through its logger.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence

from mmdist.commands import exits_on_oom, reports_fatal_signals
from mmdist.config.run import ConfigError, load_config
from mmdist.launch_env import strip_local_rank
from mmdist.training import cpu_memory, loop, preemption
from mmdist.training.checkpoint import CheckpointError

__all__ = ["main", "process_main"]


@exits_on_oom
def main(argv: Sequence[str] | None = None, *, training_process: bool = False) -> int:
    """``mmdist train --config FILE [key.path=value ...]`` (a trailing ``--local_rank=N`` is accepted).

    ``training_process``: this process exists to run this training job (``process_main``), so it also keeps freed
    memory on a CPU device (``engine.cpu_keep_freed_memory``, mmdist/training/cpu_memory.py) before the model is
    built. Off, the caller's process (a test run, a notebook) keeps its allocator as it is.

    Exit codes: 0 done, 1 a checkpoint that cannot be written or read (the message says what to do), 2 a bad
    config or a run folder that cannot take checkpoints (read-only, full), ``preemption.PREEMPTED_EXIT`` (75)
    stopped on a signal with a checkpoint (the Slurm scripts requeue; a rerun resumes), ``mmdist.oom.OOM_EXIT``
    (76) out of device memory in any phase (the message says what to change; the last checkpoint is intact),
    124 ended by the watchdog.
    """
    argv = strip_local_rank(list(sys.argv[1:] if argv is None else argv))
    parser = argparse.ArgumentParser(prog="mmdist train", description="Train one stage (align or fuse) from a config.")
    parser.add_argument("--config", required=True, help="YAML recipe, e.g. configs/fuse.yaml")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.max_steps=100 engine.zero_stage=3")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    if training_process:
        cpu_memory.for_training_process(cfg.engine)  # the trainer prints the reason
    try:
        summary = loop.train(cfg)  # out of memory: exits_on_oom prints the message and returns 76
    except ConfigError as exc:  # settings the run cannot start with (a read-only or full run_dir)
        print(exc, file=sys.stderr)
        return 2
    except CheckpointError as exc:  # a checkpoint that cannot be written or read: the message says what to do
        print(f"[mmdist] {exc}", file=sys.stderr)
        return 1
    if summary.get("preempted"):
        return preemption.PREEMPTED_EXIT  # checkpointed: slurm/_launch.sh requeues, a rerun resumes
    if summary.get("rank", 0) == 0:  # not os.environ: dist.shutdown() has restored it by now
        loss = summary["history"][-1]["loss"] if summary["history"] else math.nan
        print(f"[mmdist] done: step {summary['step']}, last loss {loss:.4f}, run dir {summary['run_dir']}")
    return 0


def process_main(argv: Sequence[str] | None = None) -> int:
    """``mmdist train`` as the job of its process: the ``mmdist`` command and ``launch/train.py`` (so every rank that
    deepspeed, torchrun or srun starts) call this; ``main`` with ``training_process=True``."""
    reports_fatal_signals()
    return main(argv, training_process=True)
