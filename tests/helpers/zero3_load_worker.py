"""One rank of the 2-rank ZeRO-3 loading check (tests/models/test_zero3_loading.py).

Loads each LLM of argv through ``load_llm`` as the engine does under ZeRO-3
(``HfDeepSpeedConfig`` alive, ``zero.Init``, the engine's gather hook), then writes
what this rank holds and the loss of a fixed batch (parameters gathered read-only)
to ``OUT.RANK``. argv: OUT, then ``label=path[::gguf_file]`` per LLM.
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

from mmdist.models.llm import LLMConfig, load_llm  # noqa: E402
from mmdist.training.deepspeed_compat import zero3_init  # noqa: E402
from mmdist.training.engine import gather_for, read_gather_for  # noqa: E402

IDS = torch.tensor([[1, 9707, 1879, 0, 220, 3837, 17, 42, 5, 33]])


def main(out: str, specs: list[str]) -> None:
    dist.init_process_group("gloo")
    deepspeed.init_distributed(dist_backend="gloo", dist_init_required=False)
    rank = dist.get_rank()
    ds_config = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3}}
    keep_alive = HfDeepSpeedConfig(ds_config)  # noqa: F841  (transformers reads it through a weakref)
    found = {}
    for spec in specs:
        label, source = spec.split("=", 1)
        path, _, gguf = source.partition("::")
        cfg = LLMConfig(name_or_path=path, gguf_file=gguf or None, dtype="fp32", attn_implementation="eager")
        with zero3_init(ds_config):  # the engine's zero.Init
            model = load_llm(cfg, gather_for(3))
        params = list(model.parameters())
        local = sum(p.ds_tensor.numel() for p in params)
        full = sum(p.ds_numel for p in params)
        visible = max(p.numel() for p in params)  # partitioned parameters show as empty tensors
        with read_gather_for(3)(params), torch.no_grad():
            out_ = model(input_ids=IDS, labels=IDS)
        found[label] = {"local": local, "full": full, "visible": visible, "loss": out_.loss.item(),
                        "logits": out_.logits[0, :4, :8].tolist()}
    with open(f"{out}.{rank}", "w") as fh:
        json.dump(found, fh)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
