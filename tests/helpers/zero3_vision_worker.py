"""One rank of the 2-rank ZeRO-3 vision-tower check (tests/models/test_zero3_vision.py).

Builds each tower of argv (a JSON list of ``[label, model.vision settings]``) as the engine does under
ZeRO-3 (``HfDeepSpeedConfig`` alive, ``zero.Init``, the engine's gather hook), then writes what this rank
holds, the token shape and the features of fixed pixels (parameters gathered read-only) to ``OUT.RANK``.
"""

from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import deepspeed  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from transformers.integrations import HfDeepSpeedConfig  # noqa: E402

from helpers.custom_vision import pixels  # noqa: E402
from mmdist.models.vision import VisionConfig, VisionTower  # noqa: E402
from mmdist.settings import from_dict  # noqa: E402
from mmdist.training.deepspeed_compat import zero3_init  # noqa: E402
from mmdist.training.engine import gather_for, read_gather_for  # noqa: E402
from mmdist.training.teardown import release_deepspeed  # noqa: E402


def main(out: str, specs: str) -> None:
    dist.init_process_group("gloo")
    deepspeed.init_distributed(dist_backend="gloo", dist_init_required=False)
    rank = dist.get_rank()
    ds_config = {"train_micro_batch_size_per_gpu": 1,
                 "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}
    keep_alive = HfDeepSpeedConfig(ds_config)  # noqa: F841  (transformers reads it through a weakref)
    found = {}
    for label, settings in json.loads(specs):
        with zero3_init(ds_config):  # the engine's zero.Init
            tower = VisionTower(from_dict(VisionConfig, settings), gather_for(3))
        tower.eval()
        params = list(tower.parameters())
        with read_gather_for(3)(params), torch.no_grad():
            features = tower(pixels(tower.image_size))
        found[label] = {
            "local": sum(p.ds_tensor.numel() for p in params),
            "full": sum(p.ds_numel for p in params),
            "tokens": tower.num_tokens,
            "width": tower.hidden_size,
            "features": features.flatten()[:64].tolist(),
        }
    with open(f"{out}.{rank}", "w") as fh:
        json.dump(found, fh)
    dist.barrier()
    # The engine's teardown (EngineBundle.close): DeepSpeed's groups through deepspeed.comm and its shm all-reduce
    # buffer. A bare destroy_process_group left DeepSpeed's state to the interpreter's exit, where a rank
    # sometimes aborted ("terminate called without an active exception").
    release_deepspeed()
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
