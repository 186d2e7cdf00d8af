"""Where a vision tower comes from: Hugging Face (ViT-like and convolutional), timm, or the user's own module.

Each source builds the module (random ones through ``build_seeded``, so the same
seed gives the same weights on every ZeRO stage), loads a local weights file
when one is named (inside ``gather``: under ZeRO-3 the parameters are
partitioned), and says how images must be prepared for it (size, resize and
crop, resampling filter, mean/std) from the model's own configuration: the HF
image processor where the folder has one, timm's ``resolve_data_config``.
Nothing is downloaded: timm models are built from the architecture name with
``pretrained=False`` and get their weights from ``checkpoint``.
"""

from __future__ import annotations

import importlib
import logging
import math
import sys
from typing import Any, Optional

import torch

from mmdist import console
from mmdist.models.gather import Gather
from mmdist.models.seeded import build_seeded

logger = logging.getLogger(__name__)

IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
CLIP_MEAN, CLIP_STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]
# HF towers that return a feature map [N, C, H, W] per stage instead of tokens.
HF_CONV_TYPES = {"resnet", "convnext", "convnextv2", "regnet"}
RESAMPLE_NAMES = {0: "nearest", 2: "bilinear", 3: "bicubic"}  # PIL's values


def import_object(spec: str, key: str) -> Any:
    """``'package.module:Name'`` -> the object, with an error naming the settings key."""
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ImportError(
            f"{key}={spec!r}: cannot import module {module_name!r} ({exc}); is it on PYTHONPATH?"
        ) from None
    try:
        return getattr(module, attr)
    except AttributeError:
        raise ImportError(f"{key}={spec!r}: module {module_name!r} has no attribute {attr!r}") from None


# ---------------------------------------------------------------------------
# weights files


def read_state_dict(path: str, key: Optional[str], setting_prefix: str) -> dict:
    """A checkpoint file (.safetensors, or torch.load with weights_only=True) -> its state dict of tensors."""
    if str(path).endswith(".safetensors"):
        from safetensors.torch import load_file

        try:
            return load_file(path, device="cpu")
        except FileNotFoundError:
            raise FileNotFoundError(f"{setting_prefix}.checkpoint: {path} does not exist") from None
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"{setting_prefix}.checkpoint: {path} does not exist") from None
    except Exception as exc:  # unpickling refused or a corrupt file
        raise ValueError(f"{setting_prefix}.checkpoint: cannot load {path} with weights_only=True: {exc}") from None
    return _pick_state_dict(raw, key, path, f"{setting_prefix}.checkpoint_key")


def _pick_state_dict(obj: Any, key: Optional[str], path: str, setting_key: str) -> dict:
    if key:
        if not isinstance(obj, dict) or key not in obj:
            keys = list(obj)[:20] if isinstance(obj, dict) else type(obj).__name__
            raise KeyError(f"{path}: no entry {key!r} ({setting_key}); the checkpoint holds {keys}")
        obj = obj[key]
    elif isinstance(obj, dict) and not all(isinstance(v, torch.Tensor) for v in obj.values()):
        for candidate in ("state_dict", "model_state_dict", "model", "module", "net", "ema"):
            if isinstance(obj.get(candidate), dict):
                obj = obj[candidate]
                break
    if not isinstance(obj, dict):
        raise ValueError(
            f"{path}: expected a state dict (mapping of tensors), found {type(obj).__name__}; set {setting_key}"
        )
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    for prefix in ("module.", "model.", "_orig_mod."):
        if tensors and all(k.startswith(prefix) for k in tensors):
            tensors = {k[len(prefix):]: v for k, v in tensors.items()}
    return tensors


def load_state_into(module: Any, state: dict, path: str, *, allow_partial: bool = False,
                    setting_prefix: str = "model.vision") -> dict[str, list[str]]:
    """Copy ``state`` into ``module``; report what did not match.

    Returns ``{"missing": [...], "unexpected": [...], "mismatched": [...]}``. Any
    non-empty list raises unless ``allow_partial`` (mismatched shapes are then skipped).
    """
    own = module.state_dict()
    mismatched = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
                  for k, v in state.items() if k in own and own[k].shape != v.shape]
    state = {k: v for k, v in state.items() if not (k in own and own[k].shape != v.shape)}
    result = module.load_state_dict(state, strict=False)
    report = {
        "missing": list(result.missing_keys),
        "unexpected": list(result.unexpected_keys),
        "mismatched": mismatched,
    }
    if any(report.values()) and not allow_partial:
        lines = [f"{setting_prefix}.checkpoint: {path} does not match {type(module).__name__}:"]
        for what, keys in report.items():
            if keys:
                shown = ", ".join(keys[:15]) + (f", ... ({len(keys)} in all)" if len(keys) > 15 else "")
                lines.append(f"  {what} keys ({len(keys)}): {shown}")
        lines.append(
            f"Fix the checkpoint or {setting_prefix}.checkpoint_key, "
            f"or set {setting_prefix}.allow_partial_load: true to accept it."
        )
        raise ValueError("\n".join(lines))
    return report


def load_checkpoint_into(module: Any, path: str, *, key: Optional[str] = None, allow_partial: bool = False,
                         setting_prefix: str = "model.vision") -> dict[str, list[str]]:
    """Load the weights file ``path`` into ``module`` (see :func:`load_state_into` for the report)."""
    state = read_state_dict(path, key, setting_prefix)
    return load_state_into(module, state, path, allow_partial=allow_partial, setting_prefix=setting_prefix)


# ---------------------------------------------------------------------------
# Hugging Face


def hf_config(cfg: Any) -> Any:
    from transformers import AutoConfig

    if cfg.init_config:
        params = dict(cfg.init_config)
        return AutoConfig.for_model(params.pop("model_type"), **params)
    return AutoConfig.from_pretrained(cfg.name_or_path)


def load_hf_tower(cfg: Any, gather: Gather) -> Any:
    """An HF vision model from ``name_or_path`` (local folder or
    cache) or built from ``init_config`` with seeded weights."""
    from transformers import AutoModel, CLIPVisionModel, SiglipVisionModel

    config = hf_config(cfg)
    model_type = config.model_type
    frozen = f"; frozen in {cfg.dtype}" if cfg.freeze else "; trainable (fp32)"
    if cfg.init_config:
        if model_type in ("clip", "siglip"):
            config = config.vision_config
        if config.model_type == "clip_vision_model":
            model = build_seeded(lambda: CLIPVisionModel(config), cfg.init_seed, gather)
        elif config.model_type == "siglip_vision_model":
            model = build_seeded(lambda: SiglipVisionModel(config), cfg.init_seed, gather)
        else:
            model = build_seeded(lambda: AutoModel.from_config(config), cfg.init_seed, gather)
        logger.info(console.model_summary("vision tower", model, f"init_config (seed {cfg.init_seed})") + frozen)
        return model
    cls = {"clip": CLIPVisionModel, "clip_vision_model": CLIPVisionModel,
           "siglip": SiglipVisionModel, "siglip_vision_model": SiglipVisionModel}.get(model_type, AutoModel)
    with console.quiet_loading():
        model, info = cls.from_pretrained(cfg.name_or_path, output_loading_info=True)
    unused = list(info.get("unexpected_keys", []))
    why = (
        "the text tower of the dual encoder: only the vision tower is used"
        if model_type in ("clip", "siglip")
        else "not part of the tower"
    )
    logger.info(console.model_summary("vision tower", model, cfg.name_or_path, unused, why) + frozen)
    return model


def image_settings_hf(cfg: Any, config: Any) -> dict:
    """Resolution, normalisation and resize geometry of an HF tower, from its processor when it has one.

    CLIP's processor resizes the shortest edge and centre-crops (bicubic); SigLIP's and
    ViT's scale to the square size; ConvNeXt's (also used by ResNet checkpoints) scales
    the shortest edge to ``size / crop_pct`` and centre-crops below 384 pixels. A tower
    built from ``init_config`` has no processor: it is scaled to its square input
    (bicubic), with CLIP's statistics for CLIP configs, ImageNet's for convolutional
    ones (which have no input size in their config: 224 unless ``image_size`` says).
    """
    vision_config = getattr(config, "vision_config", config)
    out = {"size": getattr(vision_config, "image_size", 224), "mean": [0.5] * 3, "std": [0.5] * 3,
           "resize": "squash", "resample": "bicubic", "crop_pct": 1.0}
    if vision_config.model_type.startswith("clip"):
        out["mean"], out["std"] = CLIP_MEAN, CLIP_STD
    if vision_config.model_type in HF_CONV_TYPES:
        out["mean"], out["std"] = IMAGENET_MEAN, IMAGENET_STD
    if cfg.name_or_path:
        try:
            from transformers import AutoImageProcessor

            proc = AutoImageProcessor.from_pretrained(cfg.name_or_path)
        except (OSError, ValueError):
            return out  # no preprocessor_config.json: fall back to the model config
        crop = (getattr(proc, "crop_size", None) or {}) if getattr(proc, "do_center_crop", False) else {}
        psize = getattr(proc, "size", None) or {}
        psize = dict(psize) if not isinstance(psize, int) else {"shortest_edge": psize}
        crop = dict(crop) if not isinstance(crop, int) else {"height": crop, "width": crop}
        crop_pct = getattr(proc, "crop_pct", None)
        if crop_pct and psize.get("shortest_edge") and not crop:
            # ConvNeXt/ResNet: shortest edge to size / crop_pct then
            # the centre square, below 384 px; a plain squash above
            if psize["shortest_edge"] < 384:
                out["resize"], out["crop_pct"] = "shortest_edge", float(crop_pct)
            out["size"] = psize["shortest_edge"]
        elif psize.get("shortest_edge"):
            out["resize"] = "shortest_edge"
            out["size"] = crop.get("height") or psize["shortest_edge"]
        else:
            out["size"] = crop.get("height") or psize.get("height") or out["size"]
        resample = getattr(proc, "resample", None)
        out["resample"] = RESAMPLE_NAMES.get(int(resample) if resample is not None else 3, "bicubic")
        out["mean"] = list(getattr(proc, "image_mean", out["mean"]))
        out["std"] = list(getattr(proc, "image_std", out["std"]))
    return out


# ---------------------------------------------------------------------------
# timm


def import_timm() -> Any:
    """The timm package, or an error saying how to install it (the optional `vision` extra)."""
    try:
        import timm
    except Exception as exc:  # ImportError, or torchvision's RuntimeError when its build does not match torch
        raise ImportError(f"model.vision.source=timm needs timm and a torchvision built for this torch "
                          f"(pip install 'mmdist[vision]'); importing it failed: {type(exc).__name__}: {exc}") from None
    return timm


def load_timm_model(cfg: Any, gather: Gather) -> tuple[Any, dict]:
    """timm's ``name_or_path`` architecture (``pretrained=False``,
    no classifier) and the report of loading ``checkpoint``.

    The weights file is read here rather than through ``pretrained_cfg_overlay=dict(file=...)``
    so it is written inside ``gather`` (ZeRO-3 partitions the parameters at construction).
    The classifier's keys (``pretrained_cfg['classifier']``) are dropped as timm does for
    ``num_classes=0``, and the architecture module's ``checkpoint_filter_fn`` (when it has
    one: original-format ViT weights, position embeddings of another grid) is applied.
    """
    timm = import_timm()
    kwargs = {"num_classes": 0, **cfg.timm_kwargs}
    try:
        model = build_seeded(
            lambda: timm.create_model(cfg.name_or_path, pretrained=False, **kwargs), cfg.init_seed, gather
        )
    except RuntimeError as exc:
        if "Unknown model" in str(exc):
            raise ValueError(
                f"model.vision.name_or_path={cfg.name_or_path!r} is no timm architecture "
                "(timm.list_models() names them)"
            ) from None
        raise
    if not cfg.checkpoint:
        return model, {}
    state = read_state_dict(cfg.checkpoint, cfg.checkpoint_key, "model.vision")
    classifier = (getattr(model, "pretrained_cfg", None) or {}).get("classifier")
    if classifier and kwargs["num_classes"] == 0:
        heads = [classifier] if isinstance(classifier, str) else list(classifier)
        state = {k: v for k, v in state.items() if not any(k.startswith(h + ".") for h in heads)}
    with gather(list(model.parameters())):
        filter_fn = getattr(sys.modules.get(type(model).__module__), "checkpoint_filter_fn", None)
        if filter_fn is not None:
            try:
                state = filter_fn(state, model)
            except Exception:  # a filter written for another layout: load the keys as they are
                pass
        report = load_state_into(model, state, cfg.checkpoint, allow_partial=cfg.allow_partial_load)
    return model, report


def image_settings_timm(cfg: Any, model: Any) -> dict:
    """Preprocessing from timm's ``resolve_data_config`` (the model's pretrained_cfg): size, filter, crop_pct, mean/std.

    A model built with another input size (``timm_kwargs.img_size``) takes that size.
    """
    from timm.data import resolve_data_config

    data = resolve_data_config({}, model=model)
    size = int(data["input_size"][-1])
    img_size = cfg.timm_kwargs.get("img_size")
    if img_size:
        size = int(img_size if isinstance(img_size, int) else img_size[-1])
    squash = data.get("crop_mode") == "squash"
    crop_pct = 1.0 if squash else min(1.0, float(data.get("crop_pct") or 1.0))
    return {
        "size": size,
        "mean": list(data["mean"]),
        "std": list(data["std"]),
        "resize": "squash" if squash else "shortest_edge",
        "resample": data.get("interpolation", "bicubic")
        if data.get("interpolation") in ("bicubic", "bilinear", "nearest")
        else "bicubic",
        "crop_pct": crop_pct,
    }


# ---------------------------------------------------------------------------
# outputs


def map_to_tokens(feature_map: torch.Tensor, grid: Optional[int]) -> torch.Tensor:
    """[N, C, H, W] -> [N, H*W, C] (row-major), adaptively average-pooled to ``grid`` x ``grid`` first when set."""
    if grid:
        feature_map = torch.nn.functional.adaptive_avg_pool2d(feature_map, grid)
    return feature_map.flatten(2).transpose(1, 2)


def as_tokens(out: Any, grid: Optional[int] = None) -> torch.Tensor:
    """A custom encoder's output -> [N, tokens, D]."""
    if isinstance(out, dict):
        out = out.get("last_hidden_state", next(iter(out.values())))
    elif isinstance(out, (tuple, list)):
        out = out[0]
    elif hasattr(out, "last_hidden_state"):
        out = out.last_hidden_state
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"the custom vision encoder returned {type(out).__name__}; expected a tensor")
    if out.dim() == 2:
        return out.unsqueeze(1)
    if out.dim() == 4:  # CNN feature map [N, C, H, W] -> [N, H*W, C]
        return map_to_tokens(out, grid)
    if out.dim() != 3:
        raise ValueError(
            f"the custom vision encoder returned shape {tuple(out.shape)}; expected [N,D], [N,T,D] or [N,C,H,W]"
        )
    if grid and grid * grid != out.shape[1] and math.isqrt(out.shape[1]) ** 2 == out.shape[1]:
        side = math.isqrt(out.shape[1])
        return map_to_tokens(out.transpose(1, 2).reshape(out.shape[0], out.shape[2], side, side), grid)
    return out
