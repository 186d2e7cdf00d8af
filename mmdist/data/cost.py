"""The predicted cost of a preprocessed sample: what the balancer splits global batches by.

A step's time on a rank follows the tokens its LLM runs (text, image placeholders
and tile separators: the sequence length) and the image rows its vision tower
runs (a base image and each tile is one row). :class:`CostModel` counts both in
LLM tokens: ``tokens + image_row_cost x image rows``. It is deliberately a
plain, picklable value (it runs in the data workers): a model that counts its
own work can give its per-row tower cost in LLM-token units as
``data.image_row_cost``, or replace the model by any callable from a sample to
a cost.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Optional


@dataclass(frozen=True)
class CostModel:
    """``cost(sample) = token_cost x tokens + image_row_cost x image rows`` (in LLM tokens)."""

    token_cost: float = 1.0
    image_row_cost: float = 0.0

    def __call__(self, sample: dict) -> float:
        return self.token_cost * sample_tokens(sample) + self.image_row_cost * sample_image_rows(sample)


def sample_tokens(sample: dict) -> int:
    """The sequence length of a preprocessed sample (stage fuse: ``input_ids``; stage align: the caption's)."""
    return len(sample.get("input_ids", sample.get("text_input_ids", ())))


def sample_image_rows(sample: dict) -> int:
    """Rows the vision tower runs for the sample: base images and tiles (stage align: its one image)."""
    if "num_images" in sample:
        return int(sample["num_images"])
    return 1 if ("pixel_values" in sample or "image_features" in sample) else 0


def cost_model(image_row_cost: Optional[float], num_image_tokens: Any) -> CostModel:
    """The run's cost model: ``data.image_row_cost``, or for null
    one LLM token per tower token (the placeholder count)."""
    if image_row_cost is None:
        image_row_cost = float(num_image_tokens or 0)
    return CostModel(token_cost=1.0, image_row_cost=float(image_row_cost))


def imbalance(loads: Sequence[float]) -> float:
    """max / mean of ``loads`` (1.0 is perfect balance; 1.0 for no or zero loads)."""
    if not loads:
        return 1.0
    mean = sum(loads) / len(loads)
    return max(loads) / mean if mean > 0 else 1.0
