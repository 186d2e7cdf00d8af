"""(run as a script) A loader's workers start after a gloo process group was shut down but not yet collected.

argv: the shard folder, the data order (``global`` or ``per_rank``), a free port, and ``plain`` to start the
workers without :func:`mmdist.data.workers.forking_workers` (how the hang it prevents looks). Prints ``done`` after
two batches from one worker whose collector runs as soon as it is forked.
"""

from __future__ import annotations

import contextlib
import gc
import os
import sys
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parents[2])]

import torch.distributed as dist  # noqa: E402

from helpers.data_fixtures import make_config, make_processors, write_caption_shards  # noqa: E402
from mmdist.data import global_batch, loader  # noqa: E402


def main(folder: str, order: str, port: str, mode: str = "fixed") -> None:
    if mode == "plain":
        global_batch.forking_workers = loader.forking_workers = contextlib.nullcontext
    pattern = write_caption_shards(Path(folder), [8, 8])
    cfg = make_config(pattern, order=order, micro_batch_size=2, num_workers=1, shuffle_buffer=4)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    dist.init_process_group("gloo", rank=0, world_size=1)
    cycle: dict = {"group": dist.group.WORLD}
    cycle["self"] = cycle
    dist.destroy_process_group()  # as the stage before does; the group object is left to the collector
    del cycle
    gc.disable()  # the parent keeps its garbage until the workers fork (a busy process collects only now and then)
    os.register_at_fork(after_in_child=gc.collect)  # and a worker's collector runs at once
    batches = build = loader.build_loader(cfg, make_processors(), "train", 0, 1)
    it = iter(batches)
    next(it), next(it)
    build.close()
    print("done", flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:])
