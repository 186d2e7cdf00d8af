"""Convolutional and timm vision towers, and the custom module through build_model: features, preprocessing,
weights files, the frozen-dtype rules, the feature cache, gathers (ZeRO-3) and the stage hand-off fingerprint."""

from __future__ import annotations

import contextlib

import pytest
import torch
from helpers.custom_vision import TinyCNN, tiny_custom_vision_config
from helpers.tiny import fuse_batch, make_model, pad_batch, sample

from mmdist.models.vision import VisionConfig, VisionTower, vision_fingerprint
from mmdist.settings import ConfigError, from_dict

RESNET = {"model_type": "resnet", "layer_type": "basic", "depths": [1, 1], "hidden_sizes": [8, 16], "embedding_size": 8,
          "num_channels": 3}


def tower(gather=None, **settings) -> VisionTower:
    return VisionTower(from_dict(VisionConfig, {"dtype": "fp32", **settings}), gather)


def resnet_tower(**settings) -> VisionTower:
    return tower(**{"source": "hf", "init_config": RESNET, "image_size": 32, **settings})


def timm_or_skip():
    try:
        import timm
    except Exception as exc:  # ImportError, or a torchvision built for another torch
        pytest.skip(f"timm is not importable here ({type(exc).__name__}: {exc})")
    return timm


class RecordingGather:
    """A gather hook that records which parameters each gather covered (the engine passes GatheredParameters)."""

    def __init__(self):
        self.calls: list[set[int]] = []

    def __call__(self, params):
        self.calls.append({id(p) for p in params})
        return contextlib.nullcontext()


# ---------------------------------------------------------------------------
# Hugging Face convolutional towers


def test_resnet_stage_and_grid_selection():
    pixels = torch.randn(2, 3, 32, 32)
    last, early = resnet_tower(), resnet_tower(feature_stage=1)
    pooled, stem = resnet_tower(feature_grid=2), resnet_tower(feature_stage=0, feature_grid=1)
    assert last.kind == "conv" and not last.has_cls
    assert (last.num_tokens, last.hidden_size) == (16, 16)  # 32 px / 8 = 4x4 map of the last stage (width 16)
    assert (early.num_tokens, early.hidden_size) == (64, 8)
    assert (pooled.num_tokens, stem.num_tokens) == (4, 1)
    for t in (last, early, pooled, stem):
        t.eval()  # a bare tower (no model wrapper) is in train mode: BatchNorm would use the batch's statistics
    with torch.no_grad():
        maps = last.model(pixel_values=pixels, output_hidden_states=True).hidden_states
        torch.testing.assert_close(last(pixels), maps[-1].flatten(2).transpose(1, 2))  # row-major positions
        torch.testing.assert_close(early(pixels), maps[1].flatten(2).transpose(1, 2))  # same seed, same weights
        torch.testing.assert_close(
            pooled(pixels), torch.nn.functional.adaptive_avg_pool2d(maps[-1], 2).flatten(2).transpose(1, 2)
        )
    for t in (last, early, pooled, stem):
        assert t(pixels).shape[1:] == (t.num_tokens, t.hidden_size)
    with pytest.raises(ValueError, match="no class token"):
        resnet_tower(select_tokens="cls")


def test_resnet_preprocessing_defaults_overrides_and_processor_folder(tmp_path):
    from transformers import ResNetConfig, ResNetModel
    from transformers.models.convnext.image_processing_pil_convnext import ConvNextImageProcessorPil

    t = resnet_tower()
    assert t.image_mean == [0.485, 0.456, 0.406] and t.image_std == [0.229, 0.224, 0.225] and t.image_size == 32
    t = resnet_tower(image_mean=[0.5], image_std=[0.25], image_size=48)
    assert t.image_mean == [0.5] * 3 and t.image_std == [0.25] * 3 and t.image_size == 48
    # A saved ResNet with the ConvNeXt processor it ships with: shortest edge to 224 / 0.875 = 256, centre crop 224.
    params = {k: v for k, v in RESNET.items() if k != "model_type"}
    ResNetModel(ResNetConfig(**params)).save_pretrained(tmp_path)
    ConvNextImageProcessorPil(size={"shortest_edge": 224}, crop_pct=0.875, image_mean=[0.1, 0.2, 0.3]).save_pretrained(
        tmp_path
    )
    t = tower(source="hf", name_or_path=str(tmp_path))
    transform = t.image_transform()
    assert (transform.size, transform.resize, transform.crop_pct, transform.mean) == (
        224,
        "shortest_edge",
        0.875,
        [0.1, 0.2, 0.3],
    )
    assert transform.resized_size(640, 480) == (341, 256)
    assert transform.describe()["crop_pct"] == 0.875
    from PIL import Image

    assert transform.to_uint8(Image.new("RGB", (640, 480))).shape == (3, 224, 224)


def test_conv_tower_in_a_fused_model_is_frozen_cached_and_fingerprinted():
    from mmdist.export import build_manifest, compare_stage1
    from mmdist.stages import FUSE

    vision = {"source": "hf", "init_config": RESNET, "image_size": 16, "dtype": "bf16", "feature_grid": 2}
    model = make_model("fuse", model={"vision": vision})
    assert model.num_image_tokens == 4 and model.vision.hidden_size == 16
    params = list(model.vision.parameters())
    assert all(p.dtype == torch.bfloat16 and not p.requires_grad for p in params)
    model.train()
    assert not model.vision.training  # BatchNorm statistics never move
    stats = model.vision.model.embedder.embedder.normalization.running_mean.clone()
    batch = fuse_batch(model)
    out = model(batch)
    assert torch.equal(model.vision.model.embedder.embedder.normalization.running_mean, stats)
    out["loss"].backward()
    assert all(p.grad is None for p in params) and model.projector.net[0].weight.grad is not None
    # The feature cache: encode_images' output in place of the pixels gives the same loss.
    one = pad_batch([sample(model, 1, [10], [11, 12])], pad_id=256)
    pixels = torch.randn(1, 3, 16, 16)
    torch.testing.assert_close(model({**one, "pixel_values": pixels})["loss"],
                               model({**one, "image_features": model.encode_images(pixels)})["loss"])
    # The hand-off: the manifest names the stage and grid, and another one is refused naming the field.
    section = build_manifest(model)["vision"]
    assert section["feature_grid"] == 2 and section["feature_stage"] is None and section["num_tokens"] == 4
    manifest = {"format": build_manifest(model)["format"], "stage": "align", "vision": section,
                "connector": build_manifest(model)["connector"]}
    compare_stage1(manifest, model.settings, model.vision, "here", expected=FUSE.loads)  # itself: accepted
    other = make_model("fuse", model={"vision": {**vision, "feature_stage": 1}})
    with pytest.raises(ValueError, match="vision.feature_stage: stage-1 export has None, this run has 1"):
        compare_stage1(manifest, other.settings, other.vision, "here", expected=FUSE.loads)
    # ... and the feature-cache key changes with them.
    assert other.processors.fingerprint() != model.processors.fingerprint()


def test_conv_tower_loads_and_probes_inside_gather(tmp_path):
    torch.manual_seed(0)
    reference = resnet_tower(init_seed=9)
    torch.save(reference.model.state_dict(), tmp_path / "resnet.pth")
    gather = RecordingGather()
    t = tower(gather, source="hf", init_config=RESNET, image_size=32, checkpoint=str(tmp_path / "resnet.pth"))
    everything = {id(p) for p in t.model.parameters()}
    assert sum(call == everything for call in gather.calls) >= 2  # the checkpoint load and the shape probe
    for name, value in reference.model.state_dict().items():
        assert torch.equal(t.model.state_dict()[name], value), name


# ---------------------------------------------------------------------------
# timm


def _timm_file(timm, tmp_path, name, fmt, **kwargs):
    """A weights file for ``name`` as timm publishes them (classifier included), from another seed."""
    torch.manual_seed(123)
    source = timm.create_model(name, pretrained=False, num_classes=10, **kwargs)
    state = source.state_dict()
    path = tmp_path / f"{name}.{fmt}"
    if fmt == "safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save({"state_dict": state, "epoch": 3}, path)
    return path, state


def test_timm_cnn_from_architecture_and_local_file(tmp_path):
    timm = timm_or_skip()
    path, state = _timm_file(timm, tmp_path, "resnet10t", "pth")
    gather = RecordingGather()
    t = tower(gather, source="timm", name_or_path="resnet10t", checkpoint=str(path), image_size=64)
    own = t.model.state_dict()
    assert not [k for k in own if not torch.equal(own[k], state[k])]  # every weight is the file's
    # classifier dropped, as timm does
    assert not any(k.startswith("fc.") for k in own) and t.load_report["unexpected"] == []
    assert {id(p) for p in t.model.parameters()} in gather.calls  # loaded inside the gather (ZeRO-3)
    assert (t.kind, t.has_cls, t.num_tokens, t.hidden_size) == ("timm", False, 4, 512)  # 64 px / 32 = 2x2 map
    transform = t.image_transform()  # resolve_data_config: ImageNet statistics, bicubic, crop_pct 0.875
    assert (
        transform.mean == [0.485, 0.456, 0.406] and transform.crop_pct == 0.875 and transform.resize == "shortest_edge"
    )
    pixels = torch.randn(2, 3, 64, 64)
    t.eval()
    with torch.no_grad():
        torch.testing.assert_close(t(pixels), t.model.forward_features(pixels).flatten(2).transpose(1, 2))
    staged = tower(
        source="timm", name_or_path="resnet10t", checkpoint=str(path), image_size=64, feature_stage=2, feature_grid=2
    )
    assert (staged.num_tokens, staged.hidden_size) == (4, 128)
    # The fingerprint follows the architecture, its kwargs and the file.
    cfg = from_dict(VisionConfig, {"source": "timm", "name_or_path": "resnet10t", "checkpoint": str(path)})
    assert vision_fingerprint(cfg) != vision_fingerprint(
        from_dict(VisionConfig, {"source": "timm", "name_or_path": "resnet10t"})
    )
    assert vision_fingerprint(cfg) != vision_fingerprint(
        from_dict(
            VisionConfig,
            {"source": "timm", "name_or_path": "resnet10t", "checkpoint": str(path), "timm_kwargs": {"drop_rate": 0.1}},
        )
    )


def test_timm_vit_tokens_from_a_safetensors_file(tmp_path):
    timm = timm_or_skip()
    kwargs = {"img_size": 32, "depth": 2}
    path, state = _timm_file(timm, tmp_path, "vit_tiny_patch16_224", "safetensors", **kwargs)
    patch = tower(source="timm", name_or_path="vit_tiny_patch16_224", timm_kwargs=kwargs, checkpoint=str(path))
    cls = tower(
        source="timm",
        name_or_path="vit_tiny_patch16_224",
        timm_kwargs=kwargs,
        checkpoint=str(path),
        select_tokens="cls",
    )
    own = patch.model.state_dict()
    assert all(torch.equal(own[k], state[k]) for k in own)
    assert patch.image_size == 32 and patch.has_cls  # the size it was built for, not pretrained_cfg's 224
    assert (patch.num_tokens, cls.num_tokens, patch.hidden_size) == (4, 1, 192)
    pixels = torch.randn(2, 3, 32, 32)
    patch.eval()
    with torch.no_grad():
        tokens = patch.model.forward_features(pixels)
        torch.testing.assert_close(patch(pixels), tokens[:, 1:])
        torch.testing.assert_close(cls(pixels), tokens[:, :1])


def test_timm_settings_and_errors(tmp_path):
    timm = timm_or_skip()
    from mmdist.models.settings import ModelConfig

    with pytest.raises(ConfigError, match="timm_kwargs.*nothing is downloaded"):
        from_dict(
            ModelConfig,
            {"vision": {"source": "timm", "name_or_path": "resnet10t", "timm_kwargs": {"pretrained": True}}},
        ).validate()
    with pytest.raises(ValueError, match="is no timm architecture"):
        tower(source="timm", name_or_path="no_such_net")
    path, _ = _timm_file(timm, tmp_path, "resnet10t", "pth")
    with pytest.raises(ValueError, match="does not match"):
        tower(source="timm", name_or_path="resnet18", checkpoint=str(path))


# ---------------------------------------------------------------------------
# the custom module, through build_model


def test_custom_module_with_checkpoint_through_build_model(tmp_path):
    torch.manual_seed(5)
    reference = TinyCNN(width=24, patch=4, image_size=16)
    torch.save({"model": reference.state_dict()}, tmp_path / "tiny.pth")
    model = make_model("fuse", model={"vision": tiny_custom_vision_config(str(tmp_path / "tiny.pth"))})
    own = model.vision.model.state_dict()
    assert all(torch.equal(own[k], v) for k, v in reference.state_dict().items())
    assert model.num_image_tokens == 16 and model.vision.hidden_size == 24 and not model.vision.training
    assert torch.isfinite(model(fuse_batch(model))["loss"])
    pooled = make_model("fuse", model={"vision": tiny_custom_vision_config(str(tmp_path / "tiny.pth"), feature_grid=2)})
    assert pooled.num_image_tokens == 4
