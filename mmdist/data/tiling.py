"""Any-resolution images (LLaVA-NeXT "anyres"): one image becomes a base image plus a grid of tiles.

A vision tower sees ``size`` x ``size`` pixels, so a large or elongated image loses
its detail when squashed into one input. With ``data.image_tiling.enabled`` each
image is fed as (1) the whole image through the tower's own transform (the *base
image*) and (2) the tiles of a copy resized and padded to the best grid of tower
inputs: the grid is chosen among ``grid_pinpoints`` as LLaVA-NeXT's
``select_best_resolution`` does (largest effective resolution, then least padding).

Every base image and tile is one more "image" for the model: a row of
``pixel_values`` and ``num_image_tokens`` placeholders, so ``FusedVLM`` needs no
change. In the LLM's input one ``<image>`` becomes the base image's tokens, then,
row by row, the tiles' tokens followed by the separator's tokens (``"\\n"``), so
the LLM can tell where a row of tiles ends.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Optional

import torch

from mmdist.data.settings import ImageTilingConfig
from mmdist.models.processors import ORIGINAL_SIZE_KEY, TORCH_MODE

Grid = tuple[int, int]  # (rows, cols) of tiles


def candidate_grids(settings: ImageTilingConfig) -> list[Grid]:
    """The grids to choose from: ``grid_pinpoints``, or every grid of 2..max_tiles tiles when it is empty."""
    if settings.grid_pinpoints:
        return [(int(r), int(c)) for r, c in settings.grid_pinpoints]
    n = settings.max_tiles
    return [(r, c) for r in range(1, n + 1) for c in range(1, n + 1) if 2 <= r * c <= n]


def select_best_resolution(
    image_size_hw: tuple[int, int], resolutions_hw: Sequence[tuple[int, int]]
) -> tuple[int, int]:
    """LLaVA-NeXT's choice of resolution for an image of ``image_size_hw`` (height, width).

    The resolution whose aspect-preserving fit keeps the most of the image's pixels
    (effective resolution = min(pixels after the fit, original pixels): upscaling
    gains nothing), ties broken by the least padded area, then by list order.
    """
    height, width = image_size_hw
    best: Optional[tuple[int, int]] = None
    best_effective, best_wasted = 0, math.inf
    for res_h, res_w in resolutions_hw:
        scale = min(res_w / width, res_h / height)
        fit_w, fit_h = int(width * scale), int(height * scale)
        effective = min(fit_w * fit_h, width * height)
        wasted = res_w * res_h - effective
        if effective > best_effective or (effective == best_effective and wasted < best_wasted):
            best, best_effective, best_wasted = (res_h, res_w), effective, wasted
    if best is None:
        raise ValueError(f"no resolution to choose from for an image of {width}x{height} (grid_pinpoints is empty?)")
    return best


def select_grid(image_size_hw: tuple[int, int], settings: ImageTilingConfig, tile_size: int) -> Grid:
    """(rows, cols) of tiles of ``tile_size`` pixels for an image of ``image_size_hw`` (height, width)."""
    grids = candidate_grids(settings)
    best = select_best_resolution(image_size_hw, [(r * tile_size, c * tile_size) for r, c in grids])
    return best[0] // tile_size, best[1] // tile_size


def fitted_size(image_size_hw: tuple[int, int], target_hw: tuple[int, int]) -> tuple[int, int]:
    """(height, width) of the image scaled to fit ``target_hw``
    keeping its aspect (LLaVA-NeXT's resize_and_pad_image)."""
    height, width = image_size_hw
    target_h, target_w = target_hw
    scale_w, scale_h = target_w / width, target_h / height
    if scale_w < scale_h:
        return min(math.ceil(height * scale_w), target_h), target_w
    return target_h, min(math.ceil(width * scale_h), target_w)


def resize_and_pad(image: Any, target_hw: tuple[int, int], resample: str = "bicubic") -> torch.Tensor:
    """PIL RGB image -> uint8 [3, H, W] of ``target_hw``: fitted
    keeping its aspect, centred on black (as LLaVA-NeXT)."""
    # A JPEG decoded at reduced scale keeps its file size in info:
    # the geometry follows the file, as the base image's does.
    width, height = image.info.get(ORIGINAL_SIZE_KEY, image.size)
    new_h, new_w = fitted_size((height, width), target_hw)
    # Channels-last uint8 as ImageTransform.to_uint8: torch's antialiased uint8 resize is vectorised for this layout.
    pixels = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).view(image.height, image.width, 3)
    pixels = pixels.permute(2, 0, 1).unsqueeze(0)
    if (image.height, image.width) != (new_h, new_w):
        pixels = torch.nn.functional.interpolate(
            pixels, size=(new_h, new_w), mode=TORCH_MODE[resample], antialias=resample != "nearest"
        )
    canvas = torch.zeros((3, *target_hw), dtype=torch.uint8)
    top, left = (target_hw[0] - new_h) // 2, (target_hw[1] - new_w) // 2
    canvas[:, top : top + new_h, left : left + new_w] = pixels[0]
    return canvas


def tile_image(image: Any, settings: ImageTilingConfig, transform: Any) -> tuple[list[torch.Tensor], Grid]:
    """The base image then the tiles in row-major order, each uint8 [3, size, size]; and the grid (rows, cols).

    The base image is ``transform.to_uint8(image)`` (the tower's own resize), exactly
    what the image would be without tiling.
    """
    if image.mode != "RGB":
        image = image.convert("RGB")
    size = transform.size
    width, height = image.info.get(ORIGINAL_SIZE_KEY, image.size)
    rows, cols = select_grid((height, width), settings, size)
    canvas = resize_and_pad(image, (rows * size, cols * size), getattr(transform, "resample", "bicubic"))
    tiles = [
        canvas[:, r * size : (r + 1) * size, c * size : (c + 1) * size].contiguous()
        for r in range(rows)
        for c in range(cols)
    ]
    return [transform.to_uint8(image), *tiles], (rows, cols)


def tiled_draft_size(transform: Any, settings: ImageTilingConfig, width: int, height: int) -> Optional[tuple[int, int]]:
    """The smallest (width, height) a JPEG may be decoded at for
    both the base image and the tiles, or None (full decode).

    Like ``ImageTransform.draft_size``: worth it only when the file is at least twice
    that size on both sides (JPEG's DCT scaling halves, quarters or eighths).
    """
    base = transform.draft_size(width, height)
    if base is None:
        return None
    rows, cols = select_grid((height, width), settings, transform.size)
    fit_h, fit_w = fitted_size((height, width), (rows * transform.size, cols * transform.size))
    need_w, need_h = max(base[0], fit_w), max(base[1], fit_h)
    if width < 2 * need_w or height < 2 * need_h:
        return None
    return need_w, need_h


def image_layout(grid: Grid, tokens_per_image: int, image_token_id: int, separator_ids: Sequence[int]) -> list[int]:
    """The token ids one tiled image stands for: base image, then each row of tiles followed by the separator."""
    rows, cols = grid
    ids = [image_token_id] * tokens_per_image
    for _ in range(rows):
        ids += [image_token_id] * (cols * tokens_per_image)
        ids += list(separator_ids)
    return ids


def expand_image_runs(ids: Sequence[int], grids: Sequence[Grid], tokens_per_image: int, image_token_id: int,
                      separator_ids: Sequence[int]) -> list[int]:
    """Token ids rendered without tiling (each image ``tokens_per_image`` placeholders) with the i-th image's
    run replaced by its tiled layout on ``grids[i]`` (for prompts rendered before the images' sizes are known)."""
    out: list[int] = []
    image, i = 0, 0
    while i < len(ids):
        if ids[i] != image_token_id:
            out.append(ids[i])
            i += 1
            continue
        run = ids[i : i + tokens_per_image]
        if len(run) != tokens_per_image or any(t != image_token_id for t in run):
            raise ValueError(
                f"image placeholders at position {i} are not a run of {tokens_per_image} (num_image_tokens)"
            )
        if image >= len(grids):
            raise ValueError(f"more images in the ids than the {len(grids)} grid(s) given")
        out += image_layout(grids[image], tokens_per_image, image_token_id, separator_ids)
        image, i = image + 1, i + tokens_per_image
    if image != len(grids):
        raise ValueError(f"{len(grids)} grid(s) for {image} image(s) in the ids")
    return out


def tiled_image_tokens(image_size_hw: tuple[int, int], settings: ImageTilingConfig, tokens_per_image: int,
                       separator_tokens: int, *, tile_size: int) -> int:
    """LLM positions one image of ``image_size_hw`` (height, width) takes with tiling on (for length planning).

    ``tokens_per_image`` is ``processors.num_image_tokens``, ``separator_tokens`` the
    length of the tokenised separator and ``tile_size`` the tower's input size
    (``processors.image_transform.size``): the grid depends on the image's size in pixels.
    """
    rows, cols = select_grid(image_size_hw, settings, tile_size)
    return (1 + rows * cols) * tokens_per_image + rows * separator_tokens


def max_tiled_image_tokens(settings: ImageTilingConfig, tokens_per_image: int, separator_tokens: int) -> int:
    """The most LLM positions one image can take with tiling on: the costliest candidate grid."""
    return max((1 + r * c) * tokens_per_image + r * separator_tokens for r, c in candidate_grids(settings))


__all__ = ["candidate_grids", "select_best_resolution", "select_grid", "fitted_size", "resize_and_pad", "tile_image",
           "tiled_draft_size", "image_layout", "expand_image_runs", "tiled_image_tokens", "max_tiled_image_tokens"]
