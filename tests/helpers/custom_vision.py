"""A custom vision encoder for the ``model.vision.source: custom`` path, small enough for tests.

Configs name it as ``helpers.custom_vision:TinyCNN`` (tests/ is on the tests' import path).
"""

from __future__ import annotations

from typing import Any, Optional

import torch

CUSTOM_CLASS = "helpers.custom_vision:TinyCNN"


class TinyCNN(torch.nn.Module):
    """A user-style encoder: patchify conv + GELU + 1x1 conv; returns a feature map [N, width, H/p, W/p]."""

    def __init__(self, width: int = 24, patch: int = 4, image_size: int = 16):
        super().__init__()
        self.image_size = image_size
        self.stem = torch.nn.Conv2d(3, width, kernel_size=patch, stride=patch)
        self.act = torch.nn.GELU()
        self.mix = torch.nn.Conv2d(width, width, kernel_size=1)
        self.norm = torch.nn.BatchNorm2d(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.mix(self.act(self.stem(x))))


def tiny_custom_vision_config(checkpoint: Optional[str] = None, **settings: Any) -> dict:
    """model.vision settings for :class:`TinyCNN` (16 tokens of width 24 from 16x16 images)."""
    return {
        "source": "custom",
        "custom_class": CUSTOM_CLASS,
        "custom_kwargs": {"width": 24, "patch": 4, "image_size": 16},
        "checkpoint": checkpoint,
        "dtype": "fp32",
        **settings,
    }


def pixels(size: int) -> torch.Tensor:
    """Fixed pixels (2 images of ``size`` x ``size``) to compare a tower's features across processes."""
    return torch.linspace(-1, 1, 2 * 3 * size * size).reshape(2, 3, size, size)
