"""What the data pipeline needs from the model: image transform, tokenizers, image-token facts.

`Processors` is built by the model (it knows the vision encoder's resolution and
normalisation and the LLM's tokenizer) and handed to `mmdist.data.loader.build_loader`.
Everything here is picklable so DataLoader workers can hold it, and
`fingerprint()` names the preprocessing exactly so a feature cache built with
other settings is never reused by mistake.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

RESAMPLE = {"bicubic": 3, "bilinear": 2, "nearest": 0}  # PIL's Image.Resampling values
TORCH_MODE = {"bicubic": "bicubic", "bilinear": "bilinear", "nearest": "nearest-exact"}  # the same filters in torch
# Set by mmdist.data.reader.decode_image on a JPEG decoded at reduced scale: its size in the file.
ORIGINAL_SIZE_KEY = "mmdist_original_size"


@dataclass
class ImageTransform:
    """A decoded image -> the tower's input: RGB, geometry on uint8, then normalisation (mean/std).

    The geometry follows the vision tower's own processor so the tower sees the pixels
    it was trained on: ``resize="squash"`` scales to ``size`` x ``size`` (SigLIP, ViT),
    ``resize="shortest_edge"`` scales the shortest edge to ``size`` and centre-crops
    (CLIP), exactly as transformers' image processors compute the sizes and offsets.
    ``pad_to_square`` (LLaVA-1.5) first pads with the mean colour. ``crop_pct`` < 1
    (timm's eval transform, ConvNeXt/ResNet processors) scales the shortest edge to
    ``int(size / crop_pct)`` before the centre crop to ``size``.

    The work is split so the data loader's workers ship uint8 (4x less to pin and copy
    than fp32): :meth:`to_uint8` runs in the workers, :meth:`normalize` on the device
    after the transfer (the vision tower calls it on uint8 input). ``__call__`` does
    both, for callers that want the float tensor at once. :meth:`draft_size` tells the
    JPEG decoder it may decode at a reduced DCT scale (see ``mmdist.data.reader``).
    """

    size: int
    mean: list[float]
    std: list[float]
    pad_to_square: bool = False
    resample: str = "bicubic"
    resize: str = "squash"
    crop_pct: float = 1.0

    def __post_init__(self) -> None:
        if self.resize not in ("squash", "shortest_edge"):
            raise ValueError(f"ImageTransform.resize={self.resize!r}: expected 'squash' or 'shortest_edge'")
        if self.resample not in RESAMPLE:
            raise ValueError(f"ImageTransform.resample={self.resample!r}: expected one of {sorted(RESAMPLE)}")
        if not 0.0 < self.crop_pct <= 1.0:
            raise ValueError(f"ImageTransform.crop_pct={self.crop_pct}: expected a fraction in (0, 1]")
        if self.crop_pct != 1.0 and self.resize != "shortest_edge":
            raise ValueError(
                "ImageTransform.crop_pct < 1 needs resize='shortest_edge' (the crop is taken from the resized image)"
            )

    def resized_size(self, width: int, height: int) -> tuple[int, int]:
        """(width, height) after the resize step, before any crop (transformers' formula for shortest_edge)."""
        if self.pad_to_square:
            width = height = max(width, height)
        if self.resize == "squash":
            return self.size, self.size
        edge = int(self.size / self.crop_pct) if self.crop_pct != 1.0 else self.size
        short, long = (width, height) if width <= height else (height, width)
        new_long = int(edge * long / short)
        return (edge, new_long) if width <= height else (new_long, edge)

    def draft_size(self, width: int, height: int) -> Optional[tuple[int, int]]:
        """The smallest size a JPEG may be decoded at (>= the resize target), or None for a full decode.

        Only worth it when the source is at least twice the target on both sides: JPEG's
        DCT scaling halves, quarters or eighths the image while decoding, which is several
        times cheaper than decoding everything and throwing most of it away. Padding
        changes the geometry, so a padded transform always decodes in full.
        """
        if self.pad_to_square:
            return None
        tw, th = self.resized_size(width, height)
        if width < 2 * tw or height < 2 * th:
            return None
        return tw, th

    def to_uint8(self, image: Any) -> torch.Tensor:
        """PIL image -> uint8 tensor [3, size, size] (pad, resize, crop; no normalisation)."""
        from PIL import Image

        if image.mode != "RGB":
            image = image.convert("RGB")
        if self.pad_to_square and image.width != image.height:
            side = max(image.width, image.height)
            fill = tuple(int(m * 255) for m in self.mean)  # as LLaVA's expand2square and transformers' processors
            canvas = Image.new("RGB", (side, side), fill)
            canvas.paste(image, ((side - image.width) // 2, (side - image.height) // 2))
            image = canvas
        # The geometry comes from the size before any reduced-scale JPEG decode (decode_image keeps it).
        width, height = image.info.get(ORIGINAL_SIZE_KEY, image.size)
        target = self.resized_size(width, height)
        # HWC uint8 viewed as a channels-last [1, 3, H, W]: torch's antialiased uint8 resize has a vectorised
        # kernel for exactly this layout, computes PIL's filters (within 1 level of PIL, which the
        # processors use) and runs several times faster than PIL's resize.
        pixels = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).view(image.height, image.width, 3)
        pixels = pixels.permute(2, 0, 1).unsqueeze(0)
        if (image.width, image.height) != target:
            pixels = torch.nn.functional.interpolate(
                pixels,
                size=(target[1], target[0]),
                mode=TORCH_MODE[self.resample],
                antialias=self.resample != "nearest",
            )
        left, top = (target[0] - self.size) // 2, (target[1] - self.size) // 2  # transformers' centre-crop offsets
        return pixels[0, :, top : top + self.size, left : left + self.size].contiguous()

    def normalize(self, pixels: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """uint8 [..., 3, H, W] -> ``dtype`` in the tower's normalisation, on ``pixels``' device.

        Computed in fp32 (as the processors do), cast to ``dtype`` at the end.
        """
        mean = torch.tensor(self.mean, dtype=torch.float32, device=pixels.device).view(3, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32, device=pixels.device).view(3, 1, 1)
        return ((pixels.to(torch.float32) / 255.0 - mean) / std).to(dtype)

    def __call__(self, image: Any) -> torch.Tensor:
        """PIL image -> float32 tensor [3, size, size], normalised."""
        return self.normalize(self.to_uint8(image))

    def describe(self) -> dict:
        out = {"size": self.size, "mean": list(self.mean), "std": list(self.std),
               "pad_to_square": self.pad_to_square, "resample": self.resample, "resize": self.resize,
               "jpeg_draft": True}
        if self.crop_pct != 1.0:  # only when used: the fingerprints of existing caches stay as they were
            out["crop_pct"] = self.crop_pct
        return out


@dataclass
class Processors:
    """Preprocessing facts shared by the model and the data pipeline.

    ``tokenizer`` is the LLM's (stage fuse) with the image placeholder added;
    ``text_tokenizer`` the text encoder's (stage align). ``image_token_id`` is the
    placeholder's id in ``tokenizer`` (None in stage align); each image becomes
    ``num_image_tokens`` consecutive copies of it.
    """

    image_transform: ImageTransform
    num_image_tokens: int
    tokenizer: Any = None
    text_tokenizer: Any = None
    image_token: Optional[str] = None
    image_token_id: Optional[int] = None
    template: str = "auto"
    text_max_length: int = 64
    identity: dict = field(default_factory=dict)  # encoder ids/fingerprints that change the features

    def fingerprint(self) -> str:
        """sha256 of everything that changes what a sample turns into (for cache keys)."""
        blob = {
            "image": self.image_transform.describe(),
            "num_image_tokens": self.num_image_tokens,
            "tokenizer": _tokenizer_id(self.tokenizer),
            "text_tokenizer": _tokenizer_id(self.text_tokenizer),
            "image_token": self.image_token,
            "image_token_id": self.image_token_id,
            "template": self.template,
            "text_max_length": self.text_max_length,
            "identity": self.identity,
        }
        return hashlib.sha256(json.dumps(blob, sort_keys=True, default=str).encode()).hexdigest()[:32]


def _tokenizer_id(tok: Any) -> Optional[dict]:
    if tok is None:
        return None
    vocab = tok.get_vocab()
    digest = hashlib.sha256(json.dumps(sorted(vocab.items())).encode()).hexdigest()[:16]
    return {"name": getattr(tok, "name_or_path", ""), "class": type(tok).__name__, "size": len(tok), "vocab": digest}
