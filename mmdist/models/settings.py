"""Settings of the model as a whole (`ModelConfig`): the backbones and the connectors between them.

Each part's settings live beside its code (llm.py, vision.py, text.py,
connectors.py); this composes them. The models and `build_model` take a
`ModelConfig` plus explicit arguments (stage, template, whether batches carry
cached features), never the run config, which composes this in turn
(mmdist/config/run.py).
"""

from __future__ import annotations

from dataclasses import dataclass

from mmdist.models.connectors import ConnectorConfig
from mmdist.models.llm import LLMConfig
from mmdist.models.text import TextConfig
from mmdist.models.vision import VisionConfig
from mmdist.settings import SettingsBase, setting


@dataclass
class ModelConfig(SettingsBase):
    """The backbones and the trainable connectors between them."""

    llm: LLMConfig = setting(doc="the frozen causal LM (stage 2)", factory=LLMConfig)
    vision: VisionConfig = setting(doc="the frozen image encoder (both stages)", factory=VisionConfig)
    text: TextConfig = setting(doc="the BERT-style text encoder (stage 1)", factory=TextConfig)
    connector: ConnectorConfig = setting(doc="stage-1 module and stage-2 projector", factory=ConnectorConfig)
