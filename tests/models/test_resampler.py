"""The resampler connector: token grids and positions, shapes
for any token count, gradients, stage 1 and stage 2 wiring,
the stage hand-off, and its refusal by the llava-hf export."""

from __future__ import annotations

import pytest
import torch
from helpers.tiny import align_batch, fuse_batch, make_model

from mmdist.models.connectors import ResampledProjector
from mmdist.models.resampler import Resampler, ResamplerConfig, sincos_positions_2d, token_grid

TINY = {"num_queries": 4, "hidden_size": 32, "num_heads": 4}


def resampler_model(stage: str, **resampler):
    return make_model(stage, "resampler", model={"connector": {"resampler": {**TINY, **resampler}}})


def test_token_grid_and_positions():
    assert token_grid(16) == (0, 4, 4)
    assert token_grid(17) == (1, 4, 4)  # a class token before a 4x4 grid
    assert token_grid(12) == (0, 3, 4) and token_grid(7) == (0, 1, 7)
    pos = sincos_positions_2d(17, 32)
    assert pos.shape == (17, 32) and torch.count_nonzero(pos[0]) == 0
    assert len({tuple(row.tolist()) for row in pos[1:]}) == 16  # every cell its own position
    # The same fixed range at any resolution: the centre rows of a 2x2 and a 4x4 grid span the same coordinates.
    torch.testing.assert_close(sincos_positions_2d(4, 32)[0, :8], sincos_positions_2d(64, 32)[18, :8], atol=0.3, rtol=0)


@pytest.mark.parametrize("tokens", [1, 12, 16, 17, 49])
def test_any_token_count_gives_num_queries_tokens(tokens):
    torch.manual_seed(0)
    module = Resampler(ResamplerConfig(**TINY), in_dim=24, out_dim=40)
    out = module(torch.randn(3, tokens, 24))
    assert out.shape == (3, 4, 40) and torch.isfinite(out).all()


def test_keys_carry_positions_and_gradient_reaches_queries():
    torch.manual_seed(0)
    module = Resampler(ResamplerConfig(**TINY), in_dim=8, out_dim=8)
    features = torch.randn(2, 16, 8)
    out = module(features)
    out.square().mean().backward()
    assert module.queries.grad is not None and float(module.queries.grad.abs().sum()) > 0
    assert all(p.grad is not None for p in module.parameters())
    # Permuting the tokens changes the output: the keys know where each token sits.
    with torch.no_grad():
        assert not torch.allclose(module(features), module(features.flip(1)))


def test_stage1_resampler_is_the_image_head_and_trains():
    model = resampler_model("align")
    assert isinstance(model.stage1, Resampler) and model.processors.num_image_tokens == 4
    assert model.stage1.text_head is not None and set(model.trainable_groups()) == {"stage1", "temperature"}
    torch.manual_seed(0)
    batch = align_batch(model)
    optimizer = torch.optim.AdamW([p for ps in model.trainable_groups().values() for p in ps], lr=5e-3)
    model.train()
    losses = []
    for _ in range(8):
        optimizer.zero_grad()
        out = model(batch)
        out["loss"].backward()
        optimizer.step()
        losses.append(float(out["loss"].detach()))
    assert losses[-1] < losses[0] * 0.8, losses


def _train_fuse(model, steps: int = 12) -> list[float]:
    torch.manual_seed(0)
    batch = fuse_batch(model)
    optimizer = torch.optim.AdamW([p for ps in model.trainable_groups().values() for p in ps], lr=1e-2)
    model.train()
    losses = []
    for _ in range(steps):
        optimizer.zero_grad()
        out = model(batch)
        out["loss"].backward()
        optimizer.step()
        losses.append(float(out["loss"].detach()))
    return losses


def test_stage2_resampler_on_the_tower_trains():
    model = resampler_model("fuse")
    assert model.stage1 is None and isinstance(model.projector, ResampledProjector)
    assert model.num_image_tokens == model.processors.num_image_tokens == 4  # not the tower's 16 patches
    assert model.projector.resampler.queries.requires_grad and model.projector.resampler.queries.dtype == torch.float32
    losses = _train_fuse(model)
    # the tiny random LLM leaves little to learn: the mlp projector falls by 0.49 in these 12 steps
    assert losses[-1] < losses[0] - 0.3, losses


def test_stage1_resampler_hands_over_to_stage2(tmp_path):
    from mmdist.export import build_manifest, save_export

    stage1 = resampler_model("align")
    save_export(stage1, str(tmp_path / "s1"))
    assert build_manifest(stage1)["connector"]["num_tokens"] == 4
    fused = make_model(
        "fuse", "resampler", model={"connector": {"resampler": TINY, "stage1_weights": str(tmp_path / "s1")}}
    )
    assert isinstance(fused.stage1, Resampler) and fused.stage1.text_head is None
    assert not isinstance(fused.projector, ResampledProjector) and fused.projector.in_dim == 32  # align_dim
    assert torch.equal(fused.stage1.queries, stage1.stage1.queries)
    assert fused.num_image_tokens == fused.processors.num_image_tokens == 4
    assert torch.isfinite(fused(fuse_batch(fused))["loss"])


def test_resampler_before_the_projector_on_a_stage1_mlp(tmp_path):
    from mmdist.export import save_export

    save_export(make_model("align"), str(tmp_path / "s1"))  # mlp heads: 16 tokens of align_dim 32
    fused = make_model("fuse", model={"connector": {"resampler": {**TINY, "before_projector": True},
                                                    "stage1_weights": str(tmp_path / "s1")}})
    assert fused.stage1.num_tokens == 16 and isinstance(fused.projector, ResampledProjector)
    assert fused.projector.in_dim == 32 and fused.num_image_tokens == fused.processors.num_image_tokens == 4
    losses = _train_fuse(fused, steps=6)
    assert losses[-1] < losses[0], losses


def test_the_llava_export_refuses_resamplers(tmp_path):
    from mmdist.export import save_export
    from mmdist.hf_export import ExportRefused, check_hf_exportable

    for name, model in {
        "type": resampler_model("fuse"),
        "before_projector": make_model("fuse", model={"connector": {"resampler": {**TINY, "before_projector": True}}}),
    }.items():
        save_export(model, str(tmp_path / name))
        with pytest.raises(ExportRefused, match="resampler connector .* has no Llava form"):
            check_hf_exportable(str(tmp_path / name))


def test_settings_are_checked():
    from mmdist.settings import ConfigError

    with pytest.raises(ConfigError, match="before_projector"):
        make_model("fuse", "resampler", model={"connector": {"resampler": {**TINY, "before_projector": True}}})
    with pytest.raises(ConfigError, match="hidden_size"):
        make_model("fuse", "resampler", model={"connector": {"resampler": {**TINY, "hidden_size": 30}}})
