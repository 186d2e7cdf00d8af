"""The `mmdist` command: one entry point, one subcommand per job.

Each subcommand is a module of mmdist.commands with ``main(argv) -> int``,
imported only when that subcommand runs (so `mmdist config --explain` does not
pay for importing DeepSpeed).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence

from mmdist import console

# subcommand -> ("module:function", one-line help). Each function takes argv (list[str]) and returns an exit code.
# train and demo run as the process's job (process_main): the process keeps freed memory on a CPU device.
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "config": ("mmdist.commands.config:main", "validate a config, print the resolved config, or explain every setting"),
    "train": ("mmdist.commands.train:process_main", "train one stage (align or fuse) from a config"),
    "shard": (
        "mmdist.commands.shard:main",
        "write WebDataset shards (LLaVA JSON, image folder + captions, or the demo digits)",
    ),
    "cache": ("mmdist.commands.cache:main", "precompute frozen-encoder features into new shards"),
    "demo": (
        "mmdist.commands.demo:process_main",
        "build the digits shards, train both stages on CPU, evaluate, write a report",
    ),
    "generate": ("mmdist.commands.generate:main", "answer a prompt about an image with an exported stage-2 model"),
    "export": (
        "mmdist.commands.export:main",
        "write a trained model as an mmdist export or a Hugging Face LLaVA folder (--format hf)",
    ),
    "eval": (
        "mmdist.commands.eval:main",
        "measure an export on held-out shards: retrieval R@1/5/10 (stage 1) or answer accuracy (stage 2)",
    ),
    "plan": ("mmdist.commands.plan:main", "predict per-GPU memory for each ZeRO stage before submitting a job"),
}


def _resolve(target: str) -> Callable[[list[str]], int]:
    module_name, func_name = target.split(":")
    return getattr(importlib.import_module(module_name), func_name)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="mmdist", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--verbose",
        action="store_true",
        help="show third-party output too (transformers' load reports, conversion bars); also MMDIST_VERBOSE=1",
    )
    verbose = bool(argv) and argv[0] == "--verbose"
    argv = argv[verbose:]
    console.configure(verbose=True if verbose else None)
    parser.add_argument(
        "command", choices=sorted(SUBCOMMANDS), help="; ".join(f"{k}: {v[1]}" for k, v in SUBCOMMANDS.items())
    )
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        return 0 if argv else 2
    args = parser.parse_args(argv[:1])
    try:
        return int(_resolve(SUBCOMMANDS[args.command][0])(argv[1:]) or 0)
    except BrokenPipeError:  # output piped into `head` and closed early: not an error
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    sys.exit(main())
