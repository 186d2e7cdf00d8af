"""`mmdist export --run RUN --out DIR [--format mmdist|hf]`:
hand a trained model on (mmdist export or llava-hf folder)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from mmdist.commands import exits_on_oom
from mmdist.hardware import default_device
from mmdist.hf_export import ExportRefused, export_hf, export_mmdist
from mmdist.oom import oom_guard


@exits_on_oom
def main(argv: Sequence[str] | None = None) -> int:
    """``mmdist export --run RUN --out DIR [--format mmdist|hf] [overrides]``."""
    parser = argparse.ArgumentParser(prog="mmdist export", description=__doc__.split("\n\n")[0].replace("\n", " "))
    parser.add_argument("--run", required=True, help="export folder, run folder or demo run folder")
    parser.add_argument("--out", required=True, help="folder to write (must be new or empty for --format hf)")
    parser.add_argument(
        "--format",
        choices=("mmdist", "hf"),
        default="mmdist",
        help="mmdist: mmdist's own export (resume, hand-off); hf: LlavaForConditionalGeneration + LlavaProcessor",
    )
    parser.add_argument(
        "--dequantize",
        action="store_true",
        help="--format hf of a run trained through a quantized LLM: write the LLM's full-precision weights",
    )
    parser.add_argument(
        "overrides", nargs="*", help="--format hf: dotted overrides of the stored config, e.g. model.llm.dtype=fp32"
    )
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    # --format hf loads the whole model on the default device; mmdist copies tensors through host memory
    settings = ["CUDA_VISIBLE_DEVICES= (empty: the model loads into host memory instead)",
                "model.llm.dtype=bf16 (an override; fp32 weights take twice the memory)"]
    sizes = {"run": args.run, "format": args.format, "dequantize": "yes" if args.dequantize else None}
    try:
        with oom_guard(f"the export (`mmdist export --format {args.format}`)", sizes=sizes, settings=settings,
                       device=default_device()):
            if args.format == "hf":
                written = export_hf(args.run, args.out, args.overrides, dequantize=args.dequantize)
            else:
                written = export_mmdist(args.run, args.out)
    except (ExportRefused, FileNotFoundError, FileExistsError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps({"format": args.format, "out": str(written)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
