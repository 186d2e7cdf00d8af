"""`mmdist config`: validate a config file, print it resolved, or explain every setting."""

from __future__ import annotations

import argparse
import sys

import yaml

from mmdist.config.run import RunConfig, config_to_dict, load_config
from mmdist.settings import ConfigError, explain


def format_explain(prefix: str = "") -> str:
    """Every setting as 'key  type  default  doc' lines (optionally only under ``prefix``)."""
    rows = [r for r in explain(RunConfig) if r[0].startswith(prefix)]
    width = max(len(r[0]) for r in rows)
    lines = []
    for key, tp, default, doc in rows:
        if tp == "section":
            lines.append(f"\n[{key}]  {doc}")
        else:
            lines.append(f"  {key:<{width}}  {doc}\n  {'':<{width}}  type: {tp}; default: {default}")
    return "\n".join(lines).lstrip("\n")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="mmdist config", description=__doc__)
    parser.add_argument("--config", help="YAML run config to validate and print resolved")
    parser.add_argument(
        "--explain",
        nargs="?",
        const="",
        metavar="PREFIX",
        help="print every setting with its doc (optionally only keys under PREFIX)",
    )
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. model.llm.dtype=bf16")
    args = parser.parse_args(argv)
    if args.explain is not None:
        print(format_explain(args.explain))
        return 0
    if not args.config and not args.overrides:
        parser.error("give --config FILE (and overrides), or --explain")
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    print(yaml.safe_dump(config_to_dict(cfg), sort_keys=False), end="")
    return 0
