"""What the data pipeline needs from the model: image transform, tokenizers, image-token facts.

`Processors` is built by the model (it knows the vision encoder's resolution and
normalisation and the LLM's tokenizer) and handed to `mmdist.data.build_loader`.
Everything here is picklable so DataLoader workers can hold it, and
`fingerprint()` names the preprocessing exactly so a feature cache built with
other settings is never reused by mistake.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
import torch


@dataclass
class ImageTransform:
    """PIL image -> float tensor [3, size, size]: RGB, optional pad to square with the mean colour, resize, normalise."""

    size: int
    mean: list[float]
    std: list[float]
    pad_to_square: bool = False
    resample: str = "bicubic"

    def __call__(self, image: Any) -> torch.Tensor:
        from PIL import Image

        image = image.convert("RGB")
        if self.pad_to_square and image.width != image.height:
            side = max(image.width, image.height)
            fill = tuple(int(round(m * 255)) for m in self.mean)
            canvas = Image.new("RGB", (side, side), fill)
            canvas.paste(image, ((side - image.width) // 2, (side - image.height) // 2))
            image = canvas
        method = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR, "nearest": Image.NEAREST}[self.resample]
        image = image.resize((self.size, self.size), method)
        array = np.asarray(image, dtype=np.float32) / 255.0
        tensor = torch.from_numpy(array).permute(2, 0, 1).contiguous()
        mean = torch.tensor(self.mean, dtype=torch.float32).view(3, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32).view(3, 1, 1)
        return (tensor - mean) / std

    def describe(self) -> dict:
        return {"size": self.size, "mean": list(self.mean), "std": list(self.std),
                "pad_to_square": self.pad_to_square, "resample": self.resample}


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
