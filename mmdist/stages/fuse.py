"""Stage 2, ``fuse``: the trainable projector feeds the frozen LLM image tokens it learns to answer from.

Batches are conversations in the LLM's tokens with image placeholders (packed
into rows with data.packing, tiled with data.image_tiling); the model is the
FusedVLM with the next-token loss on answers; evaluation scores greedy answers.
It loads the stage-1 export named by model.connector.stage1_weights, and its
own export is a model that answers (mmdist generate, eval, the llava-hf form).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from mmdist.stages.align import ALIGN
from mmdist.stages.base import Batch, Measure, Stage

if TYPE_CHECKING:
    from mmdist.data.settings import DataConfig
    from mmdist.models.settings import ModelConfig

__all__ = ["FUSE", "FuseStage"]


class FuseStage(Stage):
    name = "fuse"
    number = 2
    summary = "stage 2: into the LLM"
    parts = ("vision", "llm")
    heavy_part = "llm"
    batch = Batch.CONVERSATIONS
    measures = Measure.ANSWERS
    packs = True
    tiles = True
    loads = ALIGN

    def check(self, model: ModelConfig, data: DataConfig) -> list[tuple[str, str]]:
        out = super().check(model, data)
        if model.connector.stage1_weights is None and model.connector.type == "qformer":
            out.append(("model.connector.stage1_weights", "a Q-Former must be trained in stage 1 first; give the "
                                                          "stage-1 export folder"))
        return out


FUSE = FuseStage()
