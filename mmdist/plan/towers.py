"""The vision tower as the planner sees it: parameters, tokens and width per image, FLOPs and working set of a forward.

Every source is counted as mmdist.models.vision.VisionTower builds it, on the meta
device (no weights, no memory), with the tower's own output rules
(``mmdist.models.vision.tower_features``):

- HF ViT-like towers (CLIP, SigLIP, ViT): tokens and width from the config when
  VisionTower reads them there too, else one forward of a zero image on the meta
  device (``feature_grid`` pooling, other ViT-like types);
- HF convolutional towers (ResNet, ConvNeXt, RegNet): that meta forward at the input
  size; the ``feature_stage`` map flattened to tokens (pooled to ``feature_grid`` x
  ``feature_grid``) gives tokens and width, torch's FLOP counter the FLOPs per image;
- timm: the same meta forward of the architecture when timm imports; where it does
  not, a ValueError saying so (nothing else knows the architecture's parameters);
- custom: the module built on the meta device; ``model.vision.hidden_size`` gives the width.

``dims`` of the returned shape: ``hidden`` (feature width), ``tokens`` (per image),
``flops_per_image`` (one forward), ``working_set`` (elements one layer of a no-grad
forward holds per image), ``image_size``, ``kind``, ``has_cls``; ViT-like towers add ``seq`` (the
positions they compute), ``layers``, ``intermediate``, ``heads``.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from typing import Any, Optional

from mmdist.config.run import RunConfig
from mmdist.models.vision import VisionConfig, hf_tower_kind, shape_from_config, tower_features
from mmdist.models.vision_sources import image_settings_hf, image_settings_timm, import_object, import_timm
from mmdist.plan.backbones import ModuleShape, count_parameters, hf_config, meta_model

__all__ = ["Probe", "probe_tower", "vision_shape"]


@dataclasses.dataclass
class Probe:
    """What one forward of a zero image through a meta-device tower shows."""

    tokens: int
    width: int
    flops: int  # torch.utils.flop_counter: 2 per multiply-add
    working_set: int  # elements: the largest inputs + output of one leaf module


def probe_tower(model: Any, features: Callable[[Any], Any], size: int) -> Probe:
    """Run ``features`` on one ``size`` x ``size`` zero image on
    the meta device (model in eval mode, as VisionTower probes)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    largest = 0

    def held(value: Any) -> int:
        values = value if isinstance(value, (tuple, list)) else (value,)
        return sum(t.numel() for t in values if isinstance(t, torch.Tensor))

    def hook(module: Any, inputs: Any, output: Any) -> None:
        nonlocal largest
        largest = max(largest, held(inputs) + held(output))

    leaves = [m for m in model.modules() if next(m.children(), None) is None]
    handles = [m.register_forward_hook(hook) for m in leaves]
    was_training = model.training
    model.eval()
    try:
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            out = features(torch.zeros(1, 3, size, size, device="meta"))
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return Probe(int(out.shape[1]), int(out.shape[-1]), int(counter.get_total_flops()), largest)


def vision_shape(cfg: RunConfig) -> tuple[ModuleShape, Optional[Any]]:
    """(the vision tower's shape, its meta-device module for the FLOP count; None for a custom encoder)."""
    vis = cfg.model.vision
    if vis.source == "custom":
        return _custom_shape(cfg), None
    if vis.source == "timm":
        model = _timm_on_meta(vis)
        kind, has_cls = "timm", int(getattr(model, "num_prefix_tokens", 0) or 0) > 0
        size = vis.image_size or image_settings_timm(vis, model)["size"]
    else:
        vconf = hf_config("model.vision", vis.name_or_path, vis.init_config)
        vconf = getattr(vconf, "vision_config", None) or vconf
        model = meta_model(vconf, causal_lm=False)
        kind, has_cls = hf_tower_kind(vconf.model_type)
        size = _hf_input_size(vis, vconf, kind)
    if vis.select_tokens == "cls" and not has_cls:
        raise ValueError(
            f"model.vision.select_tokens=cls: this {vis.source} tower ({vis.name_or_path or 'init_config'}) "
            "has no class token; use 'patch'"
        )
    params, largest = count_parameters(model)
    if kind == "tokens":
        dims = _vit_dims(model, vis, size, has_cls, params)
    else:
        probe = probe_tower(model, lambda x: tower_features(model, kind, vis, x, has_cls), size)
        dims = dict(hidden=probe.width, layers=0, intermediate=0, heads=1, tokens=probe.tokens,
                    flops_per_image=probe.flops, working_set=probe.working_set)
    dims.update(image_size=int(size), kind=kind, has_cls=has_cls)
    if vis.hidden_size is not None and vis.hidden_size != dims["hidden"]:
        raise ValueError(f"model.vision.hidden_size={vis.hidden_size} but the encoder returns width {dims['hidden']}")
    return ModuleShape("vision_encoder", params, not vis.freeze, vis.dtype, largest, dims), model


def _vit_dims(model: Any, vis: VisionConfig, size: int, has_cls: bool, params: int) -> dict:
    """A ViT-like tower: every patch (and the class token) runs
    through every layer; tokens as VisionTower selects them."""
    config = model.config
    patch = getattr(config, "patch_size", None)
    seq = (size // patch) ** 2 + int(has_cls) if isinstance(patch, int) else None
    known = shape_from_config(config, vis, size, has_cls)
    if known is None:  # VisionTower probes these too: feature_grid pooling, ViT-like types not read from the config
        probe = probe_tower(model, lambda x: tower_features(model, "tokens", vis, x, has_cls), size)
        known = probe.tokens, probe.width
        seq = seq or probe.tokens
    tokens, hidden = known
    intermediate = getattr(config, "intermediate_size", 4 * hidden)
    return dict(hidden=hidden, layers=config.num_hidden_layers, intermediate=intermediate,
                heads=getattr(config, "num_attention_heads", 1), tokens=tokens, seq=seq,
                flops_per_image=2 * params * seq,  # frozen forward: 2 per weight at every position
                working_set=seq * (4 * hidden + intermediate))


def _hf_input_size(vis: VisionConfig, vconf: Any, kind: str) -> int:
    """The tower's input size: model.vision.image_size, else (a
    convolutional tower) its local processor's, else its config's.

    A hub id's processor is not fetched (the planner runs offline): such a conv tower is
    planned at its config's image_size, or 224 as VisionTower takes for a config without one.
    """
    if vis.image_size:
        return int(vis.image_size)
    if kind == "conv" and (not vis.name_or_path or os.path.isdir(vis.name_or_path)):
        return int(image_settings_hf(vis, vconf)["size"])
    return int(getattr(vconf, "image_size", None) or 224)


def _timm_on_meta(vis: VisionConfig) -> Any:
    """timm's ``name_or_path`` architecture on the meta device, as load_timm_model creates it (no classifier)."""
    import torch

    try:
        timm = import_timm()
    except ImportError as exc:
        raise ValueError(
            f"{exc}. The planner counts a timm tower's parameters and tokens by building the architecture "
            "on the meta device: run `mmdist plan` where timm imports (pip install 'mmdist[vision]' with a "
            "torchvision built for this torch)"
        ) from None
    try:
        with torch.device("meta"):
            return timm.create_model(vis.name_or_path, pretrained=False, **{"num_classes": 0, **vis.timm_kwargs})
    except RuntimeError as exc:
        if "Unknown model" in str(exc):
            raise ValueError(f"model.vision.name_or_path={vis.name_or_path!r} is no timm architecture "
                             "(timm.list_models() names them)") from None
        raise


def _custom_shape(cfg: RunConfig) -> ModuleShape:
    import torch

    vis = cfg.model.vision
    if vis.hidden_size is None:
        raise ValueError("model.vision.hidden_size: the planner needs the feature width of a custom encoder")
    cls = import_object(vis.custom_class, "model.vision.custom_class")
    with torch.device("meta"):
        params = count_parameters(cls(**vis.custom_kwargs))[0]
    tokens = cfg.model.connector.image_tokens or 256
    dims = dict(hidden=vis.hidden_size, layers=0, intermediate=0, heads=1, tokens=tokens,
                working_set=tokens * 4 * vis.hidden_size, kind="custom")
    return ModuleShape("vision_encoder", params, not vis.freeze, vis.dtype, 0, dims)
