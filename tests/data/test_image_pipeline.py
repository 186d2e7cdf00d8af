"""The image path a production loader uses gives the pixels the vision tower's own processor gives.

Tolerances (stated here, checked below):
- full decode: every pixel within 2 levels (of 255) of the processor's and the mean
  difference within 0.25 level (torch's uint8 antialiased resize computes PIL's filters
  in its own fixed point: +-1 typically, +-2 seen at near-identity scales); normalised
  values are compared in levels (difference x std x 255);
- JPEG decoded at reduced DCT scale (sources at least twice the target): against the
  full decode and the same resize, mean absolute difference <= 1.5 levels and 99% of
  the pixels within 4 levels.
"""

from __future__ import annotations

import io

import pytest
import torch
from bench_images import photo_jpeg  # the benchmark's photo-like JPEGs (benchmarks/ is on the test path)
from PIL import Image

from mmdist.data.reader import decode_image
from mmdist.models.processors import ImageTransform

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
SIZES = [(1024, 768), (768, 1024), (500, 375), (801, 601), (1000, 333), (337, 900)]


def assert_within_levels(ours: torch.Tensor, theirs: torch.Tensor, std: list[float]) -> None:
    levels = ((ours - theirs) * torch.tensor(std).view(3, 1, 1) * 255).abs()
    assert levels.max() <= 2 + 1e-3 and levels.mean() <= 0.25, (levels.max(), levels.mean())


@pytest.mark.parametrize("size", SIZES)
def test_clip_geometry_matches_the_clip_processor(size):
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    processor = CLIPImageProcessorPil(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})
    transform = ImageTransform(336, CLIP_MEAN, CLIP_STD, resize="shortest_edge", resample="bicubic")
    image = decode_image(photo_jpeg(*size), 10**9)
    theirs = processor(image, return_tensors="pt")["pixel_values"][0]
    pixels = transform.to_uint8(image)
    assert pixels.dtype == torch.uint8 and pixels.shape == (3, 336, 336)
    assert_within_levels(transform.normalize(pixels), theirs, CLIP_STD)


@pytest.mark.parametrize("resample", ["bilinear", "bicubic"])
def test_siglip_geometry_matches_the_siglip_processor(resample):
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    processor = SiglipImageProcessorPil(
        size={"height": 224, "width": 224}, resample={"bilinear": 2, "bicubic": 3}[resample]
    )
    transform = ImageTransform(224, [0.5] * 3, [0.5] * 3, resize="squash", resample=resample)
    image = decode_image(photo_jpeg(640, 480), 10**9)
    theirs = processor(image, return_tensors="pt")["pixel_values"][0]
    assert_within_levels(transform(image), theirs, [0.5] * 3)


@pytest.mark.parametrize("size", [(1024, 768), (768, 1024), (1400, 700)])
def test_reduced_scale_jpeg_decode_stays_close_to_a_full_decode(size):
    transform = ImageTransform(336, CLIP_MEAN, CLIP_STD, resize="shortest_edge")
    data = photo_jpeg(*size, seed=3)
    assert transform.draft_size(*size) is not None, "sources at least twice the target decode at reduced scale"
    drafted = decode_image(data, 10**9, transform.draft_size)
    assert drafted.width < size[0], "the JPEG was decoded at reduced scale"
    full = transform.to_uint8(decode_image(data, 10**9)).float()
    fast = transform.to_uint8(drafted).float()
    diff = (fast - full).abs()
    assert diff.mean() <= 1.5
    assert torch.quantile(diff.flatten(), 0.99) <= 4


def test_small_sources_and_padded_transforms_decode_in_full():
    transform = ImageTransform(336, CLIP_MEAN, CLIP_STD, resize="shortest_edge")
    assert transform.draft_size(500, 375) is None
    assert ImageTransform(336, CLIP_MEAN, CLIP_STD, pad_to_square=True).draft_size(2000, 1500) is None
    png = io.BytesIO()
    Image.new("RGB", (1600, 1200)).save(png, "PNG")
    assert decode_image(png.getvalue(), 10**9, transform.draft_size).size == (1600, 1200), "only JPEGs have DCT scaling"


def test_vision_tower_normalises_uint8_on_its_device():
    from mmdist.models.vision import VisionConfig, VisionTower

    cfg = VisionConfig(
        init_config={
            "model_type": "vit",
            "hidden_size": 32,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "intermediate_size": 64,
            "image_size": 32,
            "patch_size": 16,
        },
        dtype="fp32",
    )
    tower = VisionTower(cfg).eval()
    transform = tower.image_transform()
    image = decode_image(photo_jpeg(64, 48), 10**9)
    pixels = transform.to_uint8(image).unsqueeze(0)
    with torch.no_grad():
        torch.testing.assert_close(tower(pixels), tower(transform.normalize(pixels)))


def test_tower_reads_its_processors_geometry(tmp_path):
    from transformers import CLIPImageProcessor, CLIPVisionConfig

    from mmdist.models.vision import VisionConfig, _image_settings_hf

    CLIPImageProcessor(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}).save_pretrained(tmp_path)
    settings = _image_settings_hf(VisionConfig(name_or_path=str(tmp_path)), CLIPVisionConfig(image_size=336))
    assert settings["resize"] == "shortest_edge" and settings["size"] == 336 and settings["resample"] == "bicubic"
    assert settings["mean"] == pytest.approx(CLIP_MEAN)
