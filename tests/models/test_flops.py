"""The model counts its own work (mmdist/models/flops.py): matmul FLOPs from module shapes, whatever the storage.

A quantized model does the same matmuls as the unquantized one, so its count is the same: int8 and nf4 through
bitsandbytes and torchao, the vocabulary head quantized by mmdist included; a ZeRO-3 partitioned layer (empty
storage) counts at its full size; a submodule with its own ``flop_count`` is counted by it, not by its layers.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
from helpers.configs import tiny_run_config
from torch import nn

from mmdist.models.build import build_model
from mmdist.models.flops import FlopCount, compute_dtype, matmul_layers, part_flops, train_flops
from mmdist.models.quantized_embedding import QuantizedHead
from mmdist.stages import FUSE

HAS = {name: importlib.util.find_spec(name) is not None for name in ("bitsandbytes", "torchao")}
COMBOS = [pytest.param(m, b, marks=pytest.mark.skipif(not HAS[b], reason=f"{b} not installed (extra mmdist[quant])"))
          for m, b in (("int8", "bitsandbytes"), ("nf4", "bitsandbytes"), ("int8", "torchao"), ("nf4", "torchao"))]


def _fuse(*overrides: str):
    torch.manual_seed(0)
    return build_model(tiny_run_config("fuse", *overrides).model, stage=FUSE)


def _assert_same_count(quantized: FlopCount, plain: FlopCount) -> None:
    assert quantized == plain, f"quantized {quantized} != unquantized {plain}"
    assert quantized.by_dtype().keys() == plain.by_dtype().keys()
    for dtype, part in plain.by_dtype().items():
        assert quantized.by_dtype()[dtype] == part


@pytest.mark.parametrize("method,backend", COMBOS)
@pytest.mark.parametrize("untied", [False, True], ids=["tied-head", "own-head"])
def test_a_quantized_llm_counts_what_the_unquantized_one_does(method, backend, untied):
    tie = [f"model.llm.init_config.tie_word_embeddings={str(not untied).lower()}"]
    plain = _fuse(*tie)
    quantized = _fuse(*tie, f"model.llm.quantize={method}", f"model.llm.quantize_backend={backend}")
    head = quantized.llm.get_output_embeddings()
    assert isinstance(head, QuantizedHead)  # the head is quantized by mmdist whatever the backend
    assert (head.table is quantized.llm.get_input_embeddings().table) != untied
    count = quantized.flop_count()
    _assert_same_count(count, plain.flop_count())
    # the head runs at supervised positions: d_model x vocab, 4 per multiply-add (frozen, the gradient flows through)
    assert count.per_supervised_token == 4 * head.in_features * head.out_features > 0
    assert count.per_token > 0 and count.per_image_token > 0


@pytest.mark.parametrize("method,backend", COMBOS)
def test_a_quantized_vision_tower_counts_what_the_unquantized_one_does(method, backend):
    plain = _fuse()
    quantized = _fuse(f"model.vision.quantize={method}", f"model.vision.quantize_backend={backend}")
    _assert_same_count(quantized.vision.flop_count(), plain.vision.flop_count())
    _assert_same_count(quantized.flop_count(), plain.flop_count())


def test_a_torchao_nf4_layer_is_no_nn_linear_and_counts_its_shape():
    """A count of nn.Linear weights' numel would see nothing here (torchao's layer is no nn.Linear) or half (nf4
    packs two weights a byte); the shape count reads in/out features."""
    if not HAS["torchao"]:
        pytest.skip("torchao not installed (extra mmdist[quant]): the torchao layer cannot be built here")
    from mmdist.models.quantize import quantize_module

    holder = nn.Sequential(nn.Linear(64, 128), nn.Linear(128, 64)).requires_grad_(False)  # quantized parts are frozen
    before = train_flops(matmul_layers(holder)[0], 1)
    quantize_module(holder, "nf4", "torchao", torch.float32, key="test")
    assert not any(isinstance(m, nn.Linear) for m in holder)
    assert train_flops(matmul_layers(holder)[0], 1) == before == 2 * (64 * 128 + 128 * 64)


def test_a_partitioned_layer_counts_its_full_shape():
    """Under ZeRO-3 a weight's storage is empty outside a gather: the count reads the module's attributes."""
    full = nn.Sequential(nn.Conv2d(3, 8, 4, stride=4), nn.Flatten(), nn.Linear(8, 16))
    expected = part_flops(full, "per_image", 10, conv_positions=4)
    for p in full.parameters():
        p.ds_numel = p.numel()
        p.data = torch.empty(0)
    assert part_flops(full, "per_image", 10, conv_positions=4) == expected
    # both train: the convolution (lowest, its input is data) at 4, the Linear above it at 6
    assert expected.per_image == 4 * (3 * 8 * 16) * 4 + 6 * (8 * 16) * 10


def test_factors_follow_where_the_gradient_goes():
    """2 forward, +2 weight gradient where a layer trains, +2 input gradient where one must pass below it."""
    frozen, trains, above = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4)
    frozen.requires_grad_(False)
    above.requires_grad_(False)
    chain = nn.Sequential(frozen, trains, above)
    # frozen below: forward only; the lowest trainable layer: 4; the frozen one above passes the gradient: 4
    assert train_flops(matmul_layers(chain)[0], 1) == 16 * (2 + 4 + 4)
    assert train_flops(matmul_layers(chain)[0], 1, input_grad=True) == 16 * (4 + 6 + 4)


def test_embeddings_are_lookups_and_a_tied_head_is_counted_once_as_a_linear():
    emb = nn.Embedding(100, 8)
    head = nn.Linear(8, 100, bias=False)
    head.weight = emb.weight
    model = nn.ModuleDict({"emb": emb, "head": head})
    layers, _ = matmul_layers(model)
    assert [(layer.name, layer.macs) for layer in layers] == [("head", 800)]


def test_a_submodule_with_its_own_count_is_counted_by_it_not_by_its_layers():
    class Counted(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = nn.Linear(1000, 1000)

        def flop_count(self) -> FlopCount:
            return FlopCount.of("fp32", per_sample=7.0)

    model = nn.Sequential(nn.Linear(2, 3), Counted())
    layers, counters = matmul_layers(model)
    assert [layer.name for layer in layers] == ["0"] and len(counters) == 1
    count = part_flops(model, "per_token", 1)
    assert count == FlopCount(per_token=4 * 6, per_sample=7.0)  # the trainable Linear at 4, the module's own 7


def test_counts_add_by_dtype_and_say_where_each_part_computes():
    total = (FlopCount.of("bf16", per_token=10.0) + FlopCount.of("fp32", per_image=3.0)
             + FlopCount.of("bf16", per_image=1.0))
    assert total == FlopCount(per_token=10.0, per_image=4.0)
    assert total.by_dtype() == {"bf16": FlopCount(per_token=10.0, per_image=1.0), "fp32": FlopCount(per_image=3.0)}
    assert total.step(tokens=2, images=3) == 32.0
    assert compute_dtype(nn.Linear(2, 2).to(torch.bfloat16)) == "bf16"
    assert compute_dtype(nn.ReLU(), default="fp16") == "fp16"  # no floating-point parameters: the caller's default
