"""Stage 1, ``align``: the trainable connector learns to match the frozen vision tower's images to their captions.

Batches are an image and its caption in the text encoder's tokens; the model is
the contrastive AlignModel (ITC, with ITM/ITG for a Q-Former); evaluation is
image <-> text retrieval. Its export (the stage-1 module) is what stage 2 loads.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from mmdist.stages.base import Batch, Measure, Stage

if TYPE_CHECKING:
    from mmdist.data.settings import DataConfig
    from mmdist.models.settings import ModelConfig

__all__ = ["ALIGN", "AlignStage"]


class AlignStage(Stage):
    name = "align"
    number = 1
    summary = "stage 1: image encoder vs text encoder"
    parts = ("vision", "text")
    heavy_part = "vision"
    batch = Batch.CAPTIONS
    measures = Measure.RETRIEVAL
    packs = False
    tiles = False

    def check(self, model: ModelConfig, data: DataConfig) -> list[tuple[str, str]]:
        out = super().check(model, data)
        conn, text = model.connector, model.text
        if conn.type == "qformer" and text.freeze:
            out.append(("model.text.freeze", "a Q-Former trains with its text side: set model.text.freeze=false "
                                             "(or use connector.type=linear/mlp)"))
        if conn.type != "qformer" and not text.freeze:
            out.append(("model.connector.type", "a trainable text encoder is aligned through a Q-Former: set "
                                                "model.connector.type=qformer (or model.text.freeze=true)"))
        return out


ALIGN = AlignStage()
