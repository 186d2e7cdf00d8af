"""Freeze policy: only trainable modules get gradients; frozen weights stay bit-identical through AdamW steps."""

from __future__ import annotations

import pytest
import torch
from helpers.tiny import align_batch, fuse_batch, make_model

from mmdist.models.freeze import param_table


@pytest.mark.parametrize("stage", ["align", "fuse"])
def test_only_trainable_modules_get_grads_and_frozen_weights_stay_identical(stage):
    model = make_model(stage)
    model.train()
    batch = align_batch(model) if stage == "align" else fuse_batch(model)
    trainable = {id(p) for ps in model.trainable_groups().values() for p in ps}
    assert trainable, "no trainable parameters"
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW([p for ps in model.trainable_groups().values() for p in ps], lr=1e-2)
    for _ in range(3):
        optimizer.zero_grad()
        out = model(batch)
        out["loss"].backward()
        for name, p in model.named_parameters():
            if id(p) in trainable:
                assert p.requires_grad
            else:
                assert not p.requires_grad and p.grad is None, f"frozen {name} got a gradient"
        optimizer.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(before[n], p.detach())}
    for name, p in model.named_parameters():
        if id(p) in trainable:
            assert name in changed or name.endswith("logit_scale"), f"trainable {name} did not change"
        else:
            assert name not in changed, f"frozen {name} changed"
    # Frozen parts stay in eval mode although the wrapper is in train mode.
    assert model.training and not model.vision.training
    if stage == "fuse":
        assert not model.llm.training and model.projector.training
    else:
        assert not model.text.training and model.stage1.training


def test_frozen_parts_take_the_configured_dtype_trainable_stay_fp32():
    model = make_model("fuse", model={"llm": {"dtype": "bf16"}, "vision": {"dtype": "bf16"}})
    assert all(p.dtype == torch.bfloat16 for p in model.llm.parameters())
    assert all(p.dtype == torch.bfloat16 for p in model.vision.parameters())
    assert all(p.dtype == torch.float32 for p in model.projector.parameters())
    out = model(fuse_batch(model))
    out["loss"].backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in model.projector.parameters())
    table = param_table(model)
    lines = {line.split()[0]: line.split() for line in table.splitlines() if line and not line.startswith("-")}
    assert lines["llm"][2] == "0" and lines["llm"][3] == "bf16" and lines["llm"][4] == "eval"
    n_proj = sum(p.numel() for p in model.projector.parameters())
    assert lines["projector"][1] == lines["projector"][2] == f"{n_proj:,}" and lines["projector"][3] == "fp32"
    total = sum(p.numel() for p in model.parameters())
    assert lines["total"][1] == f"{total:,}"


@pytest.mark.parametrize("stage,connector,overrides,expected", [
    ("align", "linear", {}, {"stage1", "temperature"}),
    ("align", "qformer", {}, {"stage1", "text", "temperature"}),
    ("align", "mlp", {"model": {"vision": {"freeze": False}}}, {"stage1", "temperature", "vision"}),
    ("fuse", "mlp", {}, {"projector"}),
    ("fuse", "mlp", {"model": {"llm": {"lora": {"enabled": True, "r": 2}}}}, {"projector", "lora"}),
    ("fuse", "mlp", {"model": {"llm": {"freeze": False}}}, {"projector", "llm"}),
])
def test_groups_cover_every_trainable_parameter_exactly_once(stage, connector, overrides, expected):
    model = make_model(stage, connector, **overrides)
    groups = model.trainable_groups()
    assert set(groups) == expected
    ids = [id(p) for ps in groups.values() for p in ps]
    assert len(ids) == len(set(ids)), "a parameter is in two groups"
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert set(ids) == trainable
    assert all(p.dtype == torch.float32 for ps in groups.values() for p in ps)


def test_a_trained_text_encoder_can_keep_its_word_embeddings_frozen():
    """model.text.freeze_word_embeddings: the token table takes no gradient and no optimizer state, stays
    bit-identical through steps, while the rest of the encoder trains; the planner counts the table as frozen."""
    from helpers.tiny import make_cfg

    from mmdist.config.run import ConfigError
    from mmdist.plan import model_shapes

    model = make_model("align", "qformer", model={"text": {"freeze_word_embeddings": True}})
    table = model.text.word_embeddings().weight
    trainable = {id(p) for ps in model.trainable_groups().values() for p in ps}
    assert not table.requires_grad and id(table) not in trainable
    others = [p for n, p in model.text.named_parameters() if p is not table]
    assert others and all(p.requires_grad and id(p) in trainable for p in others)
    before_table, before_other = table.detach().clone(), others[-1].detach().clone()
    optimizer = torch.optim.AdamW([p for ps in model.trainable_groups().values() for p in ps], lr=1e-2)
    model.train()
    for _ in range(2):
        optimizer.zero_grad()
        model(align_batch(model))["loss"].backward()
        assert table.grad is None
        optimizer.step()
    assert torch.equal(table.detach(), before_table) and not torch.equal(others[-1].detach(), before_other)

    cfg = make_cfg("align", "qformer", model={"text": {"freeze_word_embeddings": True}})
    shapes = {s.name: s for s in model_shapes(cfg)}
    assert shapes["text_word_embeddings"].params == table.numel() and not shapes["text_word_embeddings"].trainable
    assert shapes["text_encoder"].trainable and shapes["text_encoder"].params == sum(p.numel() for p in others)

    with pytest.raises(ConfigError, match="model.text.freeze_word_embeddings"):  # a frozen encoder: nothing to do
        make_cfg("align", "mlp", model={"text": {"freeze_word_embeddings": True}})
