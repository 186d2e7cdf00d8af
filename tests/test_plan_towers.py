"""`mmdist plan` over the model menu: conv and timm towers, the resamplers and image tiling are planned as
mmdist builds and lays them out (mmdist/plan/towers.py, images.py)."""

from __future__ import annotations

import pytest
import yaml
from helpers.configs import tiny_run_config

from mmdist import plan
from mmdist.commands import plan as plan_command
from mmdist.settings import ConfigError

TINY_RESNET = {"model_type": "resnet", "layer_type": "basic", "depths": [1, 1], "hidden_sizes": [8, 16],
               "embedding_size": 8, "num_channels": 3}
TINY_CONVNEXT = {
    "model_type": "convnext",
    "num_stages": 2,
    "depths": [1, 1],
    "hidden_sizes": [8, 16],
    "num_channels": 3,
}


def _with_tower(stage: str, init_config: dict, *overrides: str, connector: str = "mlp"):
    """The tiny recipe of ``stage`` with its ViT replaced by ``init_config`` (the whole dict, not merged)."""
    import json

    return tiny_run_config(
        stage, f"model.vision.init_config={json.dumps(init_config)}", *overrides, connector=connector
    )


def _split(model) -> tuple[int, int]:
    return (sum(p.numel() for p in model.parameters() if p.requires_grad),
            sum(p.numel() for p in model.parameters() if not p.requires_grad))


@pytest.mark.parametrize("init_config", [TINY_RESNET, TINY_CONVNEXT], ids=["resnet", "convnext"])
@pytest.mark.parametrize("select", [[], ["model.vision.feature_stage=1"], ["model.vision.feature_grid=2"],
                                    ["model.vision.feature_stage=0", "model.vision.feature_grid=1"]],
                         ids=["last", "stage1", "grid2", "stem-grid1"])
def test_a_conv_tower_is_planned_as_the_built_tower(init_config, select):
    """Parameters, tokens, width and forward FLOPs of an HF conv tower: the planner's meta-device probe against the
    real tower built from the same settings (its own probe and a FLOP count of a real forward)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from mmdist.models.vision import VisionTower

    cfg = _with_tower("fuse", init_config, "model.vision.image_size=32", *select)
    vision = plan.model_shapes(cfg)[0]
    tower = VisionTower(cfg.model.vision).eval()
    assert vision.params == sum(p.numel() for p in tower.parameters())
    assert (vision.dims["tokens"], vision.dims["hidden"]) == (tower.num_tokens, tower.hidden_size)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        features = tower(torch.zeros(2, 3, 32, 32))
    assert tuple(features.shape) == (2, vision.dims["tokens"], vision.dims["hidden"])
    assert vision.dims["flops_per_image"] == counter.get_total_flops() / 2 > 0
    assert vision.dims["kind"] == "conv" and "seq" not in vision.dims


def test_a_conv_tower_in_a_fused_model_and_its_plan_line(capsys):
    from mmdist.materialize import build_run_model

    cfg = _with_tower("fuse", TINY_RESNET, "model.vision.image_size=32", "model.vision.feature_grid=3")
    shapes = plan.model_shapes(cfg)
    model = build_run_model(cfg)
    by = {s.name: s for s in shapes}
    assert (sum(s.params for s in shapes if s.trainable), sum(s.params for s in shapes if not s.trainable)) == _split(
        model
    )
    assert by["projector"].dims["tokens"] == model.num_image_tokens == 9
    assert by["projector"].dims["in"] == model.vision.hidden_size == 16
    # the resolution comes from the tower's settings: a larger input gives a larger map and more FLOPs
    big = plan.model_shapes(_with_tower("fuse", TINY_RESNET, "model.vision.image_size=64"))[0]
    assert (
        big.dims["tokens"]
        == 4 * plan.model_shapes(_with_tower("fuse", TINY_RESNET, "model.vision.image_size=32"))[0].dims["tokens"]
    )
    assert big.dims["flops_per_image"] > by["vision_encoder"].dims["flops_per_image"]
    text = plan.format_plan(cfg, shapes, plan.estimate(cfg, shapes, 1), 1, plan.parse_bytes("80GB"))
    assert "the convolutional tower gives 9 tokens of width 16 per image at 32 px" in text
    line = plan.input_line(shapes, "H100 SXM", 8, 0)[0]
    assert "at 32 px" in line and f"{by['vision_encoder'].dims['flops_per_image'] / 1e12:.2f} TFLOP/image" in line


def test_a_vit_pooled_to_a_grid_is_planned_with_the_pooled_tokens():
    from mmdist.models.vision import VisionTower

    cfg = tiny_run_config("fuse", "model.vision.feature_grid=2")
    vision = plan.model_shapes(cfg)[0]
    tower = VisionTower(cfg.model.vision)
    assert vision.dims["tokens"] == tower.num_tokens == 4, "16 patches pooled to 2 x 2"
    assert vision.dims["seq"] == 17, "the tower still computes every patch and the class token"


def test_timm_without_timm_is_a_clear_error(tmp_path, capsys):
    try:
        import timm  # noqa: F401
    except Exception as exc:  # ImportError, or a torchvision built for another torch
        print(f"timm does not import here ({type(exc).__name__}): testing the planner's message")
    else:
        pytest.skip(
            "timm imports here: the planner counts timm towers (test_a_timm_tower_is_planned_as_the_built_tower)"
        )
    from mmdist.config.run import config_to_dict

    cfg = tiny_run_config(
        "fuse", "model.vision.source=timm", "model.vision.name_or_path=resnet18", "model.vision.init_config=null"
    )
    with pytest.raises(ValueError, match=r"model\.vision\.source=timm.*mmdist\[vision\].*meta device"):
        plan.model_shapes(cfg)
    path = tmp_path / "timm.yaml"
    path.write_text(yaml.safe_dump(config_to_dict(cfg)))
    assert plan_command.main(["--config", str(path), "--no-deepspeed"]) == 2
    assert "model.vision.source=timm" in capsys.readouterr().err


def _fake_timm(monkeypatch):
    """A stand-in ``timm`` (create_model, timm.data.resolve_data_config) whose one architecture is a 2-stage CNN,
    so the planner's timm path and VisionTower's run the same code on machines without timm."""
    import importlib.machinery
    import sys
    import types

    import torch

    class TwoStageCNN(torch.nn.Module):
        def __init__(self, num_classes: int = 0, width: int = 12):
            super().__init__()
            self.stem = torch.nn.Conv2d(3, 8, 3, stride=2, padding=1)
            self.stage = torch.nn.Conv2d(8, width, 3, stride=2, padding=1)
            self.pretrained_cfg = {"classifier": "head"}

        def forward_intermediates(self, x, indices, intermediates_only=True):
            maps = [self.stem(x)]
            maps.append(self.stage(maps[0]))
            return [maps[i] for i in indices]

        def forward_features(self, x):
            return self.stage(self.stem(x))

    def create_model(name, pretrained=False, **kwargs):
        if name != "two_stage_cnn":
            raise RuntimeError(f"Unknown model ({name})")
        assert not pretrained
        return TwoStageCNN(**kwargs)

    # Specs as an imported package has: transformers asks importlib.util.find_spec("timm") where timm is installed.
    timm = types.ModuleType("timm")
    timm.__spec__ = importlib.machinery.ModuleSpec("timm", None, is_package=True)
    timm.create_model = create_model
    data = types.ModuleType("timm.data")
    data.__spec__ = importlib.machinery.ModuleSpec("timm.data", None)
    data.resolve_data_config = lambda args, model=None: {
        "input_size": (3, 32, 32),
        "mean": (0.5,) * 3,
        "std": (0.5,) * 3,
        "crop_pct": 1.0,
        "interpolation": "bicubic",
        "crop_mode": "center",
    }
    timm.data = data
    monkeypatch.setitem(sys.modules, "timm", timm)
    monkeypatch.setitem(sys.modules, "timm.data", data)


@pytest.mark.parametrize("select", [[], ["model.vision.feature_stage=0"], ["model.vision.feature_grid=2"]])
def test_a_timm_tower_is_planned_as_the_built_tower(monkeypatch, select):
    from mmdist.models.vision import VisionTower

    _fake_timm(monkeypatch)
    cfg = tiny_run_config("fuse", "model.vision.source=timm", "model.vision.name_or_path=two_stage_cnn",
                          "model.vision.init_config=null", 'model.vision.timm_kwargs={"width": 20}', *select)
    vision = plan.model_shapes(cfg)[0]
    tower = VisionTower(cfg.model.vision)
    assert vision.params == sum(p.numel() for p in tower.parameters()) == 8 * 3 * 9 + 8 + 20 * 8 * 9 + 20
    assert (vision.dims["tokens"], vision.dims["hidden"], vision.dims["image_size"]) == (
        tower.num_tokens,
        tower.hidden_size,
        32,
    )
    assert vision.dims["kind"] == "timm" and vision.dims["flops_per_image"] > 0
    bad = tiny_run_config(
        "fuse", "model.vision.source=timm", "model.vision.name_or_path=no_such_net", "model.vision.init_config=null"
    )
    with pytest.raises(ValueError, match="no timm architecture"):
        plan.model_shapes(bad)


def test_a_real_timm_resnet_is_planned_as_the_built_tower():
    """With the real timm (where it imports: it needs a torchvision built for this torch), a ResNet's stage map."""
    try:
        import timm  # noqa: F401
    except Exception as exc:
        pytest.skip(
            f"timm cannot be imported here ({type(exc).__name__}: {exc}); the stand-in test covers the code path"
        )
    from mmdist.models.vision import VisionTower

    cfg = tiny_run_config(
        "fuse",
        "model.vision.source=timm",
        "model.vision.name_or_path=resnet10t",
        "model.vision.init_config=null",
        "model.vision.feature_stage=2",
        "model.vision.feature_grid=2",
    )
    vision = plan.model_shapes(cfg)[0]
    tower = VisionTower(cfg.model.vision)
    assert vision.params == sum(p.numel() for p in tower.parameters())
    assert (vision.dims["tokens"], vision.dims["hidden"]) == (tower.num_tokens, tower.hidden_size) == (4, 128)


@pytest.mark.parametrize("overrides", [["model.connector.resampler.before_projector=true"], []],
                         ids=["mlp+resampler-before-projector", "type=resampler"])
def test_a_resampler_is_counted_where_the_fused_model_holds_it(overrides):
    """Stage 2 puts a new trainable resampler in the projector (ResampledProjector): its parameters are counted
    there, fp32 and trainable, and the LLM gets num_queries tokens per image."""
    from mmdist.materialize import build_run_model

    connector = "mlp" if overrides else "resampler"
    cfg = tiny_run_config("fuse", "model.connector.resampler.num_queries=5", "model.connector.resampler.hidden_size=16",
                          *overrides, connector=connector)
    shapes = plan.model_shapes(cfg)
    by = {s.name: s for s in shapes}
    model = build_run_model(cfg)
    assert (by["projector"].params, by["projector"].trainable, by["projector"].dtype) == (
        sum(p.numel() for p in model.projector.parameters()), True, "fp32")
    assert "stage1" not in by
    assert (sum(s.params for s in shapes if s.trainable), sum(s.params for s in shapes if not s.trainable)) == _split(
        model
    )
    assert by["projector"].dims["tokens"] == model.num_image_tokens == 5
    assert by["projector"].dims["resampler"]["in_tokens"] == model.vision.num_tokens == 16
    plain = {s.name: s for s in plan.model_shapes(tiny_run_config("fuse"))}
    assert plan.activation_bytes_per_sample(shapes, cfg, False) != plan.activation_bytes_per_sample(
        list(plain.values()), cfg, False
    )


def test_a_stage1_resampler_is_counted_as_the_align_model_builds_it():
    from mmdist.materialize import build_run_model

    cfg = tiny_run_config(
        "align",
        "model.connector.resampler.num_queries=6",
        "model.connector.resampler.hidden_size=16",
        connector="resampler",
    )
    shapes = plan.model_shapes(cfg)
    stage1 = next(s for s in shapes if s.name == "stage1")
    model = build_run_model(cfg)
    assert (sum(s.params for s in shapes if s.trainable), sum(s.params for s in shapes if not s.trainable)) == _split(
        model
    )
    assert stage1.dims["tokens"] == model.stage1.num_tokens == 6
    assert stage1.params == sum(p.numel() for p in model.stage1.parameters()) + 1, "+ the learnable temperature"


def test_tiling_is_planned_as_the_preprocessor_lays_out_a_sample():
    """With data.image_tiling the planner's positions, image tokens and tower images per sample are those of a
    real sample on the costliest grid (2 x 2 here), rendered by the preprocessor with the model's own processors."""
    import io

    import numpy as np
    from PIL import Image

    from mmdist.data.preprocess import make_preprocessor
    from mmdist.data.reader import decode_sample
    from mmdist.materialize import build_run_model

    cfg = tiny_run_config("fuse", "data.image_tiling.enabled=true", "data.template=plain")
    plain_cfg = tiny_run_config("fuse", "data.template=plain")
    shapes, plain = plan.model_shapes(cfg), plan.model_shapes(plain_cfg)
    proj = next(s for s in shapes if s.name == "projector").dims
    model = build_run_model(cfg)
    n = model.num_image_tokens
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(buf, format="PNG")
    raw = {"__key__": "k", "__url__": "mem.tar", "png": buf.getvalue(), "txt": b"a picture"}
    out = make_preprocessor(cfg, model.processors)(decode_sample(raw, 10**8, 10_000))
    assert out["image_grids"] == [(2, 2)]
    separators = model.processors.tokenizer.encode(cfg.data.image_tiling.separator, add_special_tokens=False)
    image_ids = sum(t == model.processors.image_token_id for t in out["input_ids"])
    assert proj["images"] == out["num_images"] == 5 and proj["tokens"] == image_ids == 5 * n
    assert proj["separator_tokens"] == len(separators) == 1 and "tiny-bytes" in proj["separator_note"]
    assert proj["positions"] == image_ids + 2 * len(separators) == 5 * n + 2
    # every tiled image is one more tower forward and n more image tokens: activations and FLOPs grow with them
    vision = next(s for s in shapes if s.name == "vision_encoder").dims
    assert vision["images"] == 5
    act = plan.activation_bytes_per_sample(shapes, cfg, False) - plan.activation_bytes_per_sample(
        plain, plain_cfg, False
    )
    e = plan.DTYPE_BYTES[cfg.engine.precision]
    hidden_in, llm_hidden = proj["in"], next(s for s in shapes if s.name == "llm").dims["hidden"]
    assert act == 4 * vision["working_set"] * e + 4 * n * (hidden_in + 2 * llm_hidden) * 4
    from mmdist.plan.speed import _micro_batch_flops

    flops = plan.model_flops(shapes)  # each tile: one more tower forward, n more image tokens, n fewer answer tokens
    per_tile = flops.per_image + n * (flops.per_image_token - flops.per_supervised_token)
    assert _micro_batch_flops(cfg, shapes)[0] - _micro_batch_flops(plain_cfg, plain)[0] == pytest.approx(
        cfg.train.micro_batch_size * 4 * per_tile)


def test_tiling_past_max_len_is_refused_before_the_plan():
    """Tiles whose image tokens leave no room for text are refused when the config is checked, naming the numbers;
    a max_len with room plans the tiles' tokens without a warning."""
    with pytest.raises(ConfigError) as err:
        tiny_run_config("fuse", "data.image_tiling.enabled=true", "data.max_len=64")
    assert "80 image tokens" in str(err.value) and "data.max_len=64" in str(err.value)
    cfg = tiny_run_config("fuse", "data.image_tiling.enabled=true", "data.max_len=128")
    shapes = plan.model_shapes(cfg)
    text = plan.format_plan(cfg, shapes, plan.estimate(cfg, shapes, 1), 1, plan.parse_bytes("80GB"))
    assert "up to 5 images per sample (base + 4 tiles) = 80 image tokens" in text
    assert "more than data.max_len" not in text
