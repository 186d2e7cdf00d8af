"""The frozen vision encoder: Hugging Face towers (CLIP, SigLIP,
ViT, ResNet, ConvNeXt), timm models, or the user's own module.

Settings live here (`VisionConfig`) with the wrapper `VisionTower`: it builds the
tower (mmdist/models/vision_sources.py says how for each source), picks the
hidden layer or stage and the tokens (patch / class / all) and returns features
``[N, tokens, D]``; a convolutional feature map ``[N, C, H, W]`` becomes ``H*W``
tokens (row-major), optionally pooled to a ``feature_grid`` x ``feature_grid``
grid first. A custom encoder is any ``nn.Module`` named by
``package.module:Class``; checkpoints are loaded with ``weights_only=True`` (or
from safetensors) and every missing, unexpected or mis-shaped key is reported.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

import torch

from mmdist.models.flops import FlopCount, part_flops
from mmdist.models.gather import Gather, null_gather
from mmdist.models.llm import Dtype, Quantize, QuantizeBackend
from mmdist.models.processors import ImageTransform
from mmdist.models.quantize import quantize_part
from mmdist.models.seeded import build_seeded
from mmdist.models.vision_sources import (
    HF_CONV_TYPES,
    IMAGENET_MEAN,
    IMAGENET_STD,
    as_tokens,
    image_settings_hf,
    image_settings_timm,
    import_object,
    load_checkpoint_into,
    load_hf_tower,
    load_timm_model,
    map_to_tokens,
)
from mmdist.settings import SettingsBase, setting


@dataclass
class VisionConfig(SettingsBase):
    """Which image encoder to load, which of its outputs to use, and how images are prepared."""

    source: Literal["hf", "timm", "custom"] = setting(
        "hf", "'hf' for a Hugging Face vision model, 'timm' for a timm architecture, 'custom' for your own nn.Module"
    )
    name_or_path: str = setting(
        "",
        "hub id or local folder (source=hf), e.g. openai/clip-vit-large-patch14-336; "
        "the architecture name (source=timm), e.g. resnet50",
    )
    init_config: Optional[dict] = setting(
        None,
        "build a vision tower from this config dict (model_type: "
        "vit | clip_vision_model | siglip_vision_model | resnet | convnext)",
    )
    init_seed: int = setting(
        0, "seed for the weights of a tower built from init_config (fixed, so runs are repeatable)"
    )
    custom_class: Optional[str] = setting(None, "'package.module:Class' of your encoder (source=custom)")
    custom_kwargs: dict = setting(doc="keyword arguments for custom_class", factory=dict)
    timm_kwargs: dict = setting(
        doc="source=timm: keyword arguments for timm.create_model (e.g. img_size: "
        "224); pretrained and num_classes are set by mmdist",
        factory=dict,
    )
    checkpoint: Optional[str] = setting(
        None,
        "weights file for the encoder (.safetensors, or torch.load with weights_only=True); "
        "source=timm: the model's weights, nothing is downloaded",
    )
    checkpoint_key: Optional[str] = setting(
        None, "key of the state dict inside the checkpoint (e.g. 'state_dict', 'model'); default: auto"
    )
    allow_partial_load: bool = setting(False, "accept missing/unexpected checkpoint keys (they are still listed)")
    hidden_size: Optional[int] = setting(
        None, "feature width of a custom encoder; default: read from the module or a probe forward"
    )
    select_layer: int = setting(
        -2,
        "hidden layer whose output is used (-1 last, -2 penultimate as in LLaVA); "
        "ViT-like HF towers only (timm: forward_features, CNNs: feature_stage)",
    )
    feature_stage: Optional[int] = setting(
        None,
        "convolutional towers (HF ResNet/ConvNeXt, timm CNNs): the stage whose feature "
        "map is used (HF: index into hidden_states, 0 = stem, 1.. = stages; timm: "
        "forward_intermediates index; negative counts from the end); default: the last",
    )
    feature_grid: Optional[int] = setting(
        None,
        "adaptive-average-pool a feature map (or a square grid of patch tokens) "
        "to feature_grid x feature_grid tokens (default: every position)",
    )
    select_tokens: Literal["patch", "cls", "all"] = setting(
        "patch",
        "use patch tokens, the class token only, or both (HF towers; "
        "a custom encoder returns [N,D], [N,T,D] or a [N,C,H,W] map)",
    )
    image_size: Optional[int] = setting(None, "input resolution; default: the encoder's own processor setting")
    image_mean: Optional[list[float]] = setting(None, "normalisation mean; default: the encoder's processor")
    image_std: Optional[list[float]] = setting(None, "normalisation std; default: the encoder's processor")
    pad_to_square: bool = setting(False, "pad images to a square with the mean colour before resizing (LLaVA-1.5)")
    dtype: Dtype = setting(
        "auto",
        "dtype of the frozen weights; auto: bf16 where the device "
        "computes it natively, fp16 on GPUs without bf16, else fp32",
    )
    freeze: bool = setting(True, "freeze the encoder (forward only, no optimizer state)")
    quantize: Quantize = setting(
        "none",
        "quantize the frozen encoder's linear layers after loading: none, int8 or nf4 (needs the extra mmdist[quant])",
    )
    quantize_backend: QuantizeBackend = setting(
        "auto",
        "library that quantizes: auto (bitsandbytes if installed, else torchao; logged), bitsandbytes or torchao",
    )

    def check(self) -> list[tuple[str, str]]:
        out = []
        if self.source == "hf" and not self.name_or_path and not self.init_config:
            out.append(("name_or_path", "set a hub id / local path, or init_config, for source=hf"))
        if self.source == "hf" and self.name_or_path and self.init_config:
            out.append(("init_config", "give either name_or_path or init_config, not both"))
        if self.source == "timm":
            if not self.name_or_path:
                out.append(
                    ("name_or_path", "source=timm needs the architecture name, e.g. resnet50 or vit_base_patch16_224")
                )
            if self.init_config:
                out.append(
                    (
                        "init_config",
                        "source=timm is built from name_or_path and timm_kwargs; init_config is for source=hf",
                    )
                )
            for key in ("pretrained", "pretrained_cfg_overlay", "checkpoint_path"):
                if key in self.timm_kwargs:
                    out.append(
                        (
                            "timm_kwargs",
                            f"{key} is not allowed: give the local weights file "
                            "as model.vision.checkpoint (nothing is downloaded)",
                        )
                    )
        if self.feature_grid is not None and self.feature_grid < 1:
            out.append(("feature_grid", "must be a positive grid side (or null for every position)"))
        if self.source == "custom":
            if not self.custom_class:
                out.append(("custom_class", "source=custom needs 'package.module:Class'"))
            elif ":" not in self.custom_class:
                out.append(("custom_class", f"{self.custom_class!r} is not of the form 'package.module:Class'"))
        for key in ("image_mean", "image_std"):
            value = getattr(self, key)
            if value is not None and len(value) not in (1, 3):
                out.append((key, "needs 1 or 3 values"))
        return out


# ---------------------------------------------------------------------------
# the encoder

HF_HAS_CLS = {"vit": True, "clip_vision_model": True, "clip": True, "siglip_vision_model": False, "siglip": False,
              "siglip2_vision_model": False, "siglip2": False, "dinov2": True}
# Towers whose token count is (image_size / patch_size)^2 (+ class token): no probe forward needed.
CONFIG_SHAPED = {"vit", "clip_vision_model", "siglip_vision_model"}
# The name callers and tests import from here.
_image_settings_hf = image_settings_hf


class VisionTower(torch.nn.Module):
    """The frozen image encoder with its output selection.

    Attributes: ``hidden_size`` (feature width), ``num_tokens`` (tokens per image),
    ``image_size``, ``image_mean``, ``image_std``, ``has_cls``, ``kind``
    (``'tokens'`` for ViT-like HF towers, ``'conv'`` for HF feature-map towers,
    ``'timm'``, ``'custom'``).
    """

    def __init__(self, cfg: VisionConfig, gather: Optional[Gather] = None):
        super().__init__()
        gather = gather or null_gather
        self.cfg = cfg
        settings = {
            "size": None,
            "mean": IMAGENET_MEAN,
            "std": IMAGENET_STD,
            "resize": "squash",
            "resample": "bicubic",
            "crop_pct": 1.0,
        }
        self.load_report: dict = {}
        if cfg.source == "custom":
            cls = import_object(cfg.custom_class, "model.vision.custom_class")
            self.model = build_seeded(lambda: cls(**cfg.custom_kwargs), cfg.init_seed, gather)
            self.kind, self.has_cls = "custom", False
            settings["size"] = cfg.custom_kwargs.get("image_size") or cfg.custom_kwargs.get("img_size")
        elif cfg.source == "timm":
            self.model, self.load_report = load_timm_model(cfg, gather)
            self.kind = "timm"
            self.has_cls = int(getattr(self.model, "num_prefix_tokens", 0) or 0) > 0
            settings = image_settings_timm(cfg, self.model)
        else:
            self.model = load_hf_tower(cfg, gather)
            self.kind, self.has_cls = hf_tower_kind(self.model.config.model_type)
            settings = image_settings_hf(cfg, self.model.config)
        if cfg.select_tokens == "cls" and not self.has_cls:
            raise ValueError(
                f"model.vision.select_tokens=cls: this {cfg.source} tower "
                f"({cfg.name_or_path or cfg.custom_class or 'init_config'}) "
                "has no class token; use 'patch'"
            )
        size = cfg.image_size or settings["size"]
        if not size:
            raise ValueError("model.vision.image_size: a custom encoder needs the input resolution")
        self.image_size = int(size)
        self.image_resize, self.image_resample, self.image_crop_pct = (
            settings["resize"],
            settings["resample"],
            settings["crop_pct"],
        )
        self.image_mean = list(cfg.image_mean or settings["mean"])
        self.image_std = list(cfg.image_std or settings["std"])
        if len(self.image_mean) == 1:
            self.image_mean = self.image_mean * 3
        if len(self.image_std) == 1:
            self.image_std = self.image_std * 3
        params = list(self.model.parameters())
        if cfg.checkpoint and cfg.source != "timm":  # timm's file is read by load_timm_model (classifier keys, filter)
            with gather(params):
                self.load_report = load_checkpoint_into(self.model, cfg.checkpoint, key=cfg.checkpoint_key,
                                                        allow_partial=cfg.allow_partial_load)
        quantize_part(self.model, cfg, "model.vision")
        known = (
            shape_from_config(self.model.config, cfg, self.image_size, self.has_cls) if self.kind == "tokens" else None
        )
        if known is not None:
            self.num_tokens, width = known
        else:
            # Probe in eval mode (a train-mode probe would update BatchNorm statistics),
            # with the parameters gathered (under ZeRO-3 they are partitioned here).
            was_training = self.model.training
            self.model.eval()
            with gather(params), torch.no_grad():
                probe = self.forward(torch.zeros(1, 3, self.image_size, self.image_size))
            self.model.train(was_training)
            self.num_tokens, width = int(probe.shape[1]), int(probe.shape[-1])
        self.hidden_size = int(cfg.hidden_size or width)
        if width != self.hidden_size:
            raise ValueError(f"model.vision.hidden_size={cfg.hidden_size} but the encoder returns width {width}")

    @property
    def dtype(self):
        return next(self.model.parameters()).dtype

    def flop_count(self) -> FlopCount:
        """Training FLOPs per image (mmdist.models.contract.CountsOwnFlops; :func:`tower_flop_count`)."""
        return tower_flop_count(self.model, self.kind, self.image_size, self.has_cls, self.num_tokens)

    def image_transform(self) -> ImageTransform:
        """The preprocessing this tower expects (its processor's geometry and statistics)."""
        return ImageTransform(self.image_size, self.image_mean, self.image_std, self.cfg.pad_to_square,
                              resample=self.image_resample, resize=self.image_resize, crop_pct=self.image_crop_pct)

    def forward(self, pixel_values):
        """[N, C, H, W] -> [N, tokens, D] features of the selected layer (or stage) and tokens.

        uint8 pixels (what the data loader ships) are normalised here, on the tower's
        device; float pixels are taken as already normalised.
        """
        if pixel_values.dtype == torch.uint8:
            pixel_values = self.image_transform().normalize(pixel_values, self.dtype)
        return tower_features(self.model, self.kind, self.cfg, pixel_values.to(self.dtype), self.has_cls)


# ---------------------------------------------------------------------------
# what a tower's output becomes (VisionTower and the planner, mmdist/plan/towers.py, on the meta device)


def hf_tower_kind(model_type: str) -> tuple[str, bool]:
    """(``'conv'`` for a feature-map tower or ``'tokens'``, whether it has a class token) of an HF ``model_type``."""
    kind = "conv" if model_type in HF_CONV_TYPES else "tokens"
    return kind, (HF_HAS_CLS.get(model_type, True) if kind == "tokens" else False)


def shape_from_config(config, cfg: VisionConfig, image_size: int, has_cls: bool) -> Optional[tuple[int, int]]:
    """(tokens, width) of a ViT-like HF tower from its config; None when it cannot be read (then probe)."""
    patch, size, width = (
        getattr(config, "patch_size", None),
        getattr(config, "image_size", None),
        getattr(config, "hidden_size", None),
    )
    if (
        not (isinstance(patch, int) and isinstance(size, int) and width)
        or size != image_size
        or config.model_type not in CONFIG_SHAPED
    ):
        return None
    if cfg.feature_grid:
        return None
    patches = (size // patch) ** 2
    if cfg.select_tokens == "cls":
        return 1, int(width)
    if cfg.select_tokens == "all" and has_cls:
        return patches + 1, int(width)
    return patches, int(width)


def tower_flop_count(model: torch.nn.Module, kind: str, image_size: int, has_cls: bool, tokens: int) -> FlopCount:
    """A tower's training FLOPs per image from its shapes (mmdist.models.flops), as VisionTower runs it: a ViT-like
    HF tower runs every patch and its class token through every layer, its patch convolution at each patch, and a
    pooling head (``pooler``, ``head``) at one position; any other tower is counted at the tokens it returns (a
    convolutional tower's early stages run at more positions: counted low, never high). Also the planner's count,
    on the meta device."""
    patch = getattr(getattr(model, "config", None), "patch_size", None)
    if kind != "tokens" or not isinstance(patch, int) or patch <= 0:
        return part_flops(model, "per_image", tokens)
    patches = (image_size // patch) ** 2
    heads = [m for name, m in model.named_modules() if name.rpartition(".")[2] in ("pooler", "head")]
    count = part_flops(model, "per_image", patches + int(has_cls), conv_positions=patches, skip=heads)
    for head in heads:
        count += part_flops(head, "per_image", 1)
    return count


def select_tokens(hidden: torch.Tensor, cfg: VisionConfig, prefix: int) -> torch.Tensor:
    """Tokens [N, T, D] with ``prefix`` leading non-patch tokens -> the selected ones (pooled to the grid when set)."""
    if cfg.select_tokens == "cls":
        return hidden[:, :1]
    if cfg.select_tokens == "all":
        return hidden
    hidden = hidden[:, prefix:]
    return as_tokens(hidden, cfg.feature_grid) if cfg.feature_grid else hidden


def timm_features(model: torch.nn.Module, cfg: VisionConfig, pixel_values: torch.Tensor) -> torch.Tensor:
    """A timm model's tokens: the ``feature_stage`` map
    (forward_intermediates), else forward_features' map or tokens."""
    if cfg.feature_stage is not None:
        maps = model.forward_intermediates(pixel_values, indices=[cfg.feature_stage], intermediates_only=True)
        return map_to_tokens(maps[-1], cfg.feature_grid)
    out = model.forward_features(pixel_values)
    if out.dim() == 4:
        return map_to_tokens(out, cfg.feature_grid)
    return select_tokens(out, cfg, int(getattr(model, "num_prefix_tokens", 0) or 0))


def tower_features(
    model: torch.nn.Module, kind: str, cfg: VisionConfig, pixel_values: torch.Tensor, has_cls: bool
) -> torch.Tensor:
    """Normalised pixels [N, C, H, W] in the tower's dtype -> [N,
    tokens, D] of the selected layer (or stage) and tokens."""
    if kind == "custom":
        return as_tokens(model(pixel_values), cfg.feature_grid)
    if kind == "timm":
        return timm_features(model, cfg, pixel_values)
    out = model(pixel_values=pixel_values, output_hidden_states=True)
    if kind == "conv":
        stage = -1 if cfg.feature_stage is None else cfg.feature_stage
        return map_to_tokens(out.hidden_states[stage], cfg.feature_grid)
    return select_tokens(out.hidden_states[cfg.select_layer], cfg, 1 if has_cls else 0)


def vision_fingerprint(cfg: VisionConfig) -> str:
    """Identity of the vision encoder's weights (files, or init_config
    / custom class / timm architecture + seed, plus checkpoint)."""
    from mmdist.models.fingerprint import config_fingerprint, path_fingerprint

    if cfg.source == "custom":
        base = config_fingerprint({"class": cfg.custom_class, "kwargs": cfg.custom_kwargs}, cfg.init_seed)
    elif cfg.source == "timm":
        base = config_fingerprint({"timm": cfg.name_or_path, "kwargs": cfg.timm_kwargs}, cfg.init_seed)
    elif cfg.init_config:
        base = config_fingerprint(cfg.init_config, cfg.init_seed)
    else:
        base = path_fingerprint(cfg.name_or_path)
    if cfg.checkpoint:
        base += "+" + path_fingerprint(cfg.checkpoint)
    return base
