"""`mmdist plan --config C`: predict per-GPU memory for each ZeRO stage before submitting a job."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from mmdist.config.run import load_config
from mmdist.plan import (
    IMAGES_PER_CORE,
    deepspeed_estimates,
    estimate,
    format_plan,
    input_line,
    model_shapes,
    parse_bytes,
    resolve_auto_for_gpu,
)
from mmdist.settings import ConfigError


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="mmdist plan", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="YAML run config (nothing is loaded but the model configs)")
    parser.add_argument("--gpus", type=int, default=None, help="data-parallel ranks (default: 8)")
    parser.add_argument("--gpu-memory", default="80GB", help="memory per GPU, e.g. 80GB, 141GB (GB = GiB)")
    parser.add_argument("--reserve", default="1.5GB", help="per-GPU memory kept back for the CUDA context and allocator")
    parser.add_argument("--no-deepspeed", action="store_true", help="skip DeepSpeed's own estimators (avoids importing it)")
    parser.add_argument("--gpu", default="H100 SXM", help="GPU model for the input estimate (a datasheet name, e.g. H100, A100, L40S)")
    parser.add_argument("--gpus-per-node", type=int, default=8, help="GPUs per node (input estimate)")
    parser.add_argument("--cpus-per-node", type=int, default=0, help="CPU cores per node; warns when they cannot feed the GPUs")
    parser.add_argument("--images-per-core", type=float, default=IMAGES_PER_CORE, help="measured loader images/s per core")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.micro_batch_size=4")
    args = parser.parse_args(list(argv))
    try:
        cfg = load_config(args.config, args.overrides)
        cfg, auto_note = resolve_auto_for_gpu(cfg, args.gpu, args.config, args.overrides)
        budget = parse_bytes(args.gpu_memory)
        reserve = parse_bytes(args.reserve)
        shapes = model_shapes(cfg)
    except (ConfigError, ValueError) as exc:
        print(exc, file=sys.stderr)
        return 2
    world = args.gpus or 8
    estimates = estimate(cfg, shapes, world, reserve_bytes=reserve)
    ds = None if args.no_deepspeed else deepspeed_estimates(shapes, world)
    if auto_note:
        print(auto_note)
    print(format_plan(cfg, shapes, estimates, world, budget, ds))
    if not cfg.data.feature_cache:
        print("\n".join(input_line(shapes, args.gpu, args.gpus_per_node, args.cpus_per_node, args.images_per_core)))
    return 0
