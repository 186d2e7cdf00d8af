"""Processors: the image transform (resize, pad to square, normalise), picklability, fingerprint sensitivity."""

from __future__ import annotations

import pickle

import numpy as np
import torch
from PIL import Image

from mmdist.models.processors import ImageTransform, Processors
from mmdist.models.tokenizers import tiny_byte_tokenizer


def test_transform_normalises_and_resizes():
    t = ImageTransform(size=8, mean=[0.5, 0.5, 0.5], std=[0.25, 0.25, 0.25])
    image = Image.new("RGB", (20, 12), (255, 0, 128))
    x = t(image)
    assert x.shape == (3, 8, 8) and x.dtype == torch.float32
    torch.testing.assert_close(x[:, 0, 0], torch.tensor([(1 - 0.5) / 0.25, (0 - 0.5) / 0.25, (128 / 255 - 0.5) / 0.25]))


def test_pad_to_square_uses_the_mean_colour():
    t = ImageTransform(size=10, mean=[0.2, 0.4, 0.6], std=[1.0, 1.0, 1.0], pad_to_square=True, resample="nearest")
    image = Image.new("RGB", (10, 4), (255, 255, 255))  # wide: bands above and below
    x = t(image)
    # Top row is padding: mean colour, normalised to ~0.
    assert x[:, 0, :].abs().max() < 0.01
    # The middle row is the white image: 1 - mean.
    torch.testing.assert_close(x[:, 5, 5], torch.tensor([0.8, 0.6, 0.4]))
    grey = Image.fromarray(np.full((6, 6), 255, dtype=np.uint8))  # greyscale input becomes RGB
    assert t(grey).shape == (3, 10, 10)


def test_processors_pickle_and_fingerprint():
    tok = tiny_byte_tokenizer()
    p = Processors(
        ImageTransform(16, [0.5] * 3, [0.5] * 3),
        num_image_tokens=16,
        tokenizer=tok,
        image_token="<image>",
        image_token_id=259,
    )
    clone = pickle.loads(pickle.dumps(p))
    assert clone.fingerprint() == p.fingerprint()
    assert clone.tokenizer("ab").input_ids == tok("ab").input_ids
    other = Processors(ImageTransform(16, [0.5] * 3, [0.5] * 3, pad_to_square=True), num_image_tokens=16, tokenizer=tok,
                       image_token="<image>", image_token_id=259)
    assert other.fingerprint() != p.fingerprint()
    fewer = Processors(
        ImageTransform(16, [0.5] * 3, [0.5] * 3),
        num_image_tokens=4,
        tokenizer=tok,
        image_token="<image>",
        image_token_id=259,
    )
    assert fewer.fingerprint() != p.fingerprint()
