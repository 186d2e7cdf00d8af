"""The frozen vision encoder: Hugging Face towers (CLIP, SigLIP, ViT) or the user's own module.

Settings live here (`VisionConfig`) with the wrapper `VisionEncoder`: it loads the
tower, picks the hidden layer and the tokens (patch / class / all) and returns
features ``[N, tokens, D]``. A custom encoder is any ``nn.Module`` named by
``package.module:Class``; its checkpoint is loaded with ``weights_only=True`` and
every missing, unexpected or mis-shaped key is reported.
"""

from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass
from typing import Any, Literal, Optional

import torch

from mmdist import console
from mmdist.models.gather import Gather, null_gather
from mmdist.models.llm import Dtype, Quantize, QuantizeBackend
from mmdist.models.processors import ImageTransform
from mmdist.models.quantize import quantize_part
from mmdist.models.seeded import build_seeded
from mmdist.settings import SettingsBase, setting

logger = logging.getLogger(__name__)


@dataclass
class VisionConfig(SettingsBase):
    """Which image encoder to load, which of its outputs to use, and how images are prepared."""

    source: Literal["hf", "custom"] = setting("hf", "'hf' for a Hugging Face vision tower, 'custom' for your own nn.Module")
    name_or_path: str = setting("", "hub id or local folder (source=hf), e.g. openai/clip-vit-large-patch14-336")
    init_config: Optional[dict] = setting(None, "build a vision tower from this config dict (model_type: vit | clip_vision_model | siglip_vision_model)")
    init_seed: int = setting(0, "seed for the weights of a tower built from init_config (fixed, so runs are repeatable)")
    custom_class: Optional[str] = setting(None, "'package.module:Class' of your encoder (source=custom)")
    custom_kwargs: dict = setting(doc="keyword arguments for custom_class", factory=dict)
    checkpoint: Optional[str] = setting(None, "weights file for the encoder (loaded with weights_only=True)")
    checkpoint_key: Optional[str] = setting(None, "key of the state dict inside the checkpoint (e.g. 'state_dict', 'model'); default: auto")
    allow_partial_load: bool = setting(False, "accept missing/unexpected checkpoint keys (they are still listed)")
    hidden_size: Optional[int] = setting(None, "feature width of a custom encoder; default: read from the module or a probe forward")
    select_layer: int = setting(-2, "hidden layer whose output is used (-1 last, -2 penultimate as in LLaVA); HF towers only: a custom encoder's forward output is used")
    select_tokens: Literal["patch", "cls", "all"] = setting("patch", "use patch tokens, the class token only, or both (HF towers; a custom encoder returns [N,D], [N,T,D] or a [N,C,H,W] map)")
    image_size: Optional[int] = setting(None, "input resolution; default: the encoder's own processor setting")
    image_mean: Optional[list[float]] = setting(None, "normalisation mean; default: the encoder's processor")
    image_std: Optional[list[float]] = setting(None, "normalisation std; default: the encoder's processor")
    pad_to_square: bool = setting(False, "pad images to a square with the mean colour before resizing (LLaVA-1.5)")
    dtype: Dtype = setting("auto", "dtype of the frozen weights; auto: bf16 where the device computes it natively, fp16 on GPUs without bf16, else fp32")
    freeze: bool = setting(True, "freeze the encoder (forward only, no optimizer state)")
    quantize: Quantize = setting("none", "quantize the frozen encoder's linear layers after loading: none, int8 or nf4 (needs the extra mmdist[quant])")
    quantize_backend: QuantizeBackend = setting("auto", "library that quantizes: auto (bitsandbytes if installed, else torchao; logged), bitsandbytes or torchao")

    def check(self) -> list[tuple[str, str]]:
        out = []
        if self.source == "hf" and not self.name_or_path and not self.init_config:
            out.append(("name_or_path", "set a hub id / local path, or init_config, for source=hf"))
        if self.source == "hf" and self.name_or_path and self.init_config:
            out.append(("init_config", "give either name_or_path or init_config, not both"))
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
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
CLIP_MEAN, CLIP_STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]


def import_object(spec: str, key: str) -> Any:
    """``'package.module:Name'`` -> the object, with an error naming the settings key."""
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ImportError(f"{key}={spec!r}: cannot import module {module_name!r} ({exc}); is it on PYTHONPATH?") from None
    try:
        return getattr(module, attr)
    except AttributeError:
        raise ImportError(f"{key}={spec!r}: module {module_name!r} has no attribute {attr!r}") from None


def _pick_state_dict(obj: Any, key: Optional[str], path: str, setting_key: str) -> dict:
    import torch

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
        raise ValueError(f"{path}: expected a state dict (mapping of tensors), found {type(obj).__name__}; set {setting_key}")
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    for prefix in ("module.", "model.", "_orig_mod."):
        if tensors and all(k.startswith(prefix) for k in tensors):
            tensors = {k[len(prefix):]: v for k, v in tensors.items()}
    return tensors


def load_checkpoint_into(module: Any, path: str, *, key: Optional[str] = None, allow_partial: bool = False,
                         setting_prefix: str = "model.vision") -> dict[str, list[str]]:
    """Load ``path`` (torch.load, weights_only=True) into ``module``; report what did not match.

    Returns ``{"missing": [...], "unexpected": [...], "mismatched": [...]}``. Any
    non-empty list raises unless ``allow_partial`` (mismatched shapes are then skipped).
    """
    import torch

    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"{setting_prefix}.checkpoint: {path} does not exist") from None
    except Exception as exc:  # unpickling refused or a corrupt file
        raise ValueError(f"{setting_prefix}.checkpoint: cannot load {path} with weights_only=True: {exc}") from None
    state = _pick_state_dict(raw, key, path, f"{setting_prefix}.checkpoint_key")
    own = module.state_dict()
    mismatched = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
                  for k, v in state.items() if k in own and own[k].shape != v.shape]
    state = {k: v for k, v in state.items() if not (k in own and own[k].shape != v.shape)}
    result = module.load_state_dict(state, strict=False)
    report = {"missing": list(result.missing_keys), "unexpected": list(result.unexpected_keys), "mismatched": mismatched}
    if any(report.values()) and not allow_partial:
        lines = [f"{setting_prefix}.checkpoint: {path} does not match {type(module).__name__}:"]
        for what, keys in report.items():
            if keys:
                shown = ", ".join(keys[:15]) + (f", ... ({len(keys)} in all)" if len(keys) > 15 else "")
                lines.append(f"  {what} keys ({len(keys)}): {shown}")
        lines.append(f"Fix the checkpoint or {setting_prefix}.checkpoint_key, or set {setting_prefix}.allow_partial_load: true to accept it.")
        raise ValueError("\n".join(lines))
    return report


def _hf_config(cfg: VisionConfig) -> Any:
    from transformers import AutoConfig

    if cfg.init_config:
        params = dict(cfg.init_config)
        return AutoConfig.for_model(params.pop("model_type"), **params)
    return AutoConfig.from_pretrained(cfg.name_or_path)


def _load_hf_tower(cfg: VisionConfig, gather: Gather) -> Any:
    from transformers import AutoModel, CLIPVisionModel, SiglipVisionModel

    config = _hf_config(cfg)
    model_type = config.model_type
    if cfg.init_config:
        if model_type in ("clip", "siglip"):
            config = config.vision_config
        if config.model_type == "clip_vision_model":
            model = build_seeded(lambda: CLIPVisionModel(config), cfg.init_seed, gather)
        elif config.model_type == "siglip_vision_model":
            model = build_seeded(lambda: SiglipVisionModel(config), cfg.init_seed, gather)
        else:
            model = build_seeded(lambda: AutoModel.from_config(config), cfg.init_seed, gather)
        logger.info(console.model_summary("vision tower", model, f"init_config (seed {cfg.init_seed})")
                    + (f"; frozen in {cfg.dtype}" if cfg.freeze else "; trainable (fp32)"))
        return model
    cls = {"clip": CLIPVisionModel, "clip_vision_model": CLIPVisionModel,
           "siglip": SiglipVisionModel, "siglip_vision_model": SiglipVisionModel}.get(model_type, AutoModel)
    with console.quiet_loading():
        model, info = cls.from_pretrained(cfg.name_or_path, output_loading_info=True)
    unused = list(info.get("unexpected_keys", []))
    why = "the text tower of the dual encoder: only the vision tower is used" if model_type in ("clip", "siglip") else "not part of the tower"
    logger.info(console.model_summary("vision tower", model, cfg.name_or_path, unused, why)
                + (f"; frozen in {cfg.dtype}" if cfg.freeze else "; trainable (fp32)"))
    return model


def _image_settings_hf(cfg: VisionConfig, config: Any) -> dict:
    """Resolution, normalisation and resize geometry of an HF tower, from its processor when it has one.

    CLIP's processor resizes the shortest edge and centre-crops (bicubic); SigLIP's and
    ViT's scale to the square size. A tower built from ``init_config`` has no processor:
    it is scaled to its square input (bicubic), with CLIP's statistics for CLIP configs.
    """
    vision_config = getattr(config, "vision_config", config)
    out = {"size": getattr(vision_config, "image_size", 224), "mean": [0.5] * 3, "std": [0.5] * 3,
           "resize": "squash", "resample": "bicubic"}
    if vision_config.model_type.startswith("clip"):
        out["mean"], out["std"] = CLIP_MEAN, CLIP_STD
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
        if psize.get("shortest_edge"):
            out["resize"] = "shortest_edge"
            out["size"] = crop.get("height") or psize["shortest_edge"]
        else:
            out["size"] = crop.get("height") or psize.get("height") or out["size"]
        resample = getattr(proc, "resample", None)
        out["resample"] = {0: "nearest", 2: "bilinear", 3: "bicubic"}.get(int(resample) if resample is not None else 3, "bicubic")
        out["mean"] = list(getattr(proc, "image_mean", out["mean"]))
        out["std"] = list(getattr(proc, "image_std", out["std"]))
    return out


def _as_tokens(out: Any) -> Any:
    """A custom encoder's output -> [N, tokens, D]."""
    import torch

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
        return out.flatten(2).transpose(1, 2)
    if out.dim() != 3:
        raise ValueError(f"the custom vision encoder returned shape {tuple(out.shape)}; expected [N,D], [N,T,D] or [N,C,H,W]")
    return out


class VisionTower(torch.nn.Module):
    """The frozen image encoder with its output selection.

    Attributes: ``hidden_size`` (feature width), ``num_tokens`` (tokens per image),
    ``image_size``, ``image_mean``, ``image_std``, ``has_cls``.
    """

    def __init__(self, cfg: VisionConfig, gather: Optional[Gather] = None):
        super().__init__()
        gather = gather or null_gather
        self.cfg = cfg
        self.image_resize, self.image_resample = "squash", "bicubic"  # an HF tower's processor may say otherwise
        if cfg.source == "custom":
            cls = import_object(cfg.custom_class, "model.vision.custom_class")
            self.model = build_seeded(lambda: cls(**cfg.custom_kwargs), cfg.init_seed, gather)
            self.has_cls = False
            size = cfg.image_size or cfg.custom_kwargs.get("image_size") or cfg.custom_kwargs.get("img_size")
            if not size:
                raise ValueError("model.vision.image_size: a custom encoder needs the input resolution")
            self.image_size = int(size)
            self.image_mean = list(cfg.image_mean or IMAGENET_MEAN)
            self.image_std = list(cfg.image_std or IMAGENET_STD)
        else:
            self.model = _load_hf_tower(cfg, gather)
            model_type = self.model.config.model_type
            self.has_cls = HF_HAS_CLS.get(model_type, True)
            settings = _image_settings_hf(cfg, self.model.config)
            size, mean, std = settings["size"], settings["mean"], settings["std"]
            self.image_resize, self.image_resample = settings["resize"], settings["resample"]
            self.image_size = int(cfg.image_size or size)
            self.image_mean = list(cfg.image_mean or mean)
            self.image_std = list(cfg.image_std or std)
            if cfg.select_tokens == "cls" and not self.has_cls:
                raise ValueError(f"model.vision.select_tokens=cls: {model_type} has no class token; use 'patch'")
        if len(self.image_mean) == 1:
            self.image_mean = self.image_mean * 3
        if len(self.image_std) == 1:
            self.image_std = self.image_std * 3
        params = list(self.model.parameters())
        if cfg.checkpoint:
            with gather(params):
                self.load_report = load_checkpoint_into(self.model, cfg.checkpoint, key=cfg.checkpoint_key,
                                                        allow_partial=cfg.allow_partial_load)
        else:
            self.load_report = {}
        quantize_part(self.model, cfg, "model.vision")
        known = self._shape_from_config() if cfg.source == "hf" else None
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

    def _shape_from_config(self) -> Optional[tuple[int, int]]:
        """(tokens, width) of a ViT-like HF tower from its config; None when it cannot be read (then probe)."""
        config = self.model.config
        patch, size, width = getattr(config, "patch_size", None), getattr(config, "image_size", None), getattr(config, "hidden_size", None)
        if not (isinstance(patch, int) and isinstance(size, int) and width) or size != self.image_size or config.model_type not in CONFIG_SHAPED:
            return None
        patches = (size // patch) ** 2
        if self.cfg.select_tokens == "cls":
            return 1, int(width)
        if self.cfg.select_tokens == "all" and self.has_cls:
            return patches + 1, int(width)
        return patches, int(width)

    @property
    def dtype(self):
        return next(self.model.parameters()).dtype

    def image_transform(self) -> ImageTransform:
        """The preprocessing this tower expects (its processor's geometry and statistics)."""
        return ImageTransform(self.image_size, self.image_mean, self.image_std, self.cfg.pad_to_square,
                              resample=self.image_resample, resize=self.image_resize)

    def forward(self, pixel_values):
        """[N, C, H, W] -> [N, tokens, D] features of the selected layer and tokens.

        uint8 pixels (what the data loader ships) are normalised here, on the tower's
        device; float pixels are taken as already normalised.
        """
        if pixel_values.dtype == torch.uint8:
            pixel_values = self.image_transform().normalize(pixel_values, self.dtype)
        pixel_values = pixel_values.to(self.dtype)
        if self.cfg.source == "custom":
            return _as_tokens(self.model(pixel_values))
        out = self.model(pixel_values=pixel_values, output_hidden_states=True)
        hidden = out.hidden_states[self.cfg.select_layer]
        if self.cfg.select_tokens == "all" or not self.has_cls:
            return hidden
        if self.cfg.select_tokens == "cls":
            return hidden[:, :1]
        return hidden[:, 1:]


def vision_fingerprint(cfg: VisionConfig) -> str:
    """Identity of the vision encoder's weights (files, or init_config/custom class + seed, plus checkpoint)."""
    from mmdist.models.fingerprint import config_fingerprint, path_fingerprint

    if cfg.source == "custom":
        base = config_fingerprint({"class": cfg.custom_class, "kwargs": cfg.custom_kwargs}, cfg.init_seed)
    elif cfg.init_config:
        base = config_fingerprint(cfg.init_config, cfg.init_seed)
    else:
        base = path_fingerprint(cfg.name_or_path)
    if cfg.checkpoint:
        base += "+" + path_fingerprint(cfg.checkpoint)
    return base
