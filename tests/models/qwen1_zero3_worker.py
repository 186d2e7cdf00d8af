"""One rank of test_qwen1's ZeRO-3 check: load a Qwen1-layout folder partitioned, then compare with Qwen1's equations.

Run by torchrun (2 ranks, gloo on CPU) with the repository and tests/models on
PYTHONPATH; argv: the checkpoint folder, a JSON file each rank writes its findings to.
"""

from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import deepspeed  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from test_qwen1 import HIDDEN, qwen1_reference_logits, qwen1_state_dict  # noqa: E402
from transformers import Qwen2ForCausalLM  # noqa: E402,F401  (torch._dynamo must be imported before zero.Init patches Tensor.__new__)
from transformers.integrations import HfDeepSpeedConfig  # noqa: E402

from mmdist.models import qwen1  # noqa: E402


def main(folder: str, out: str) -> None:
    dist.init_process_group("gloo")
    deepspeed.init_distributed(dist_backend="gloo", dist_init_required=False)
    rank = dist.get_rank()
    ds_config = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3}}
    keep_alive = HfDeepSpeedConfig(ds_config)  # noqa: F841  (transformers reads it through a weakref)
    with deepspeed.zero.Init(config_dict_or_path=ds_config):
        model = qwen1.load_qwen1_llm(folder, dtype=torch.float32, attn_implementation="eager")
    local = sum(p.ds_tensor.numel() for p in model.parameters())
    full = sum(p.ds_numel for p in model.parameters())
    visible = max(p.numel() for p in model.parameters())  # partitioned params show as empty tensors
    sd = qwen1_state_dict()
    ids = torch.tensor([[151643, 9707, 1879, 0, 220, 108386, 3837, 151850, 17, 42]])
    with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None):
        layer = model.model.layers[1]
        split_ok = torch.equal(layer.self_attn.k_proj.weight, sd["transformer.h.1.attn.c_attn.weight"][HIDDEN:2 * HIDDEN])
        with torch.no_grad():
            logits = model(input_ids=ids).logits
    err = (logits - qwen1_reference_logits(sd, ids)).abs().max().item()
    with open(f"{out}.{rank}", "w") as fh:
        json.dump({"local": local, "full": full, "visible": visible, "split_ok": split_ok, "max_err": err}, fh)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
