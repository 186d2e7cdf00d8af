"""What a training stage is: the facts and small rules that differ between stages, in one object per stage.

A run trains one stage (``stage: align`` in YAML). The name is parsed once, where
the config is read (:class:`mmdist.settings.NamedSetting`); from there on the run
config holds the :class:`Stage` object and every part of mmdist asks it what it
needs to know: which model sections it builds and which of them carries the
FLOPs, the batch layout (and so the preprocessing, collation and model that take
it), whether packing and tiling apply, what evaluation measures, which earlier
stage's export it loads, and its own config rules. Nothing outside this package
compares a stage's name (tests/test_stages.py checks).

The stage objects sit with the settings, below the models and the data: they
hold facts and rules over settings and import nothing that builds or runs
anything. The code that acts on a fact lives in its own tier (the data pipeline
for a batch layout, the models for the model that takes it).
"""

from __future__ import annotations

import enum
from typing import TYPE_CHECKING, ClassVar, Optional

from mmdist.settings import NamedSetting

if TYPE_CHECKING:
    from mmdist.data.settings import DataConfig
    from mmdist.models.settings import ModelConfig

__all__ = ["Batch", "Measure", "Stage"]


class Batch(enum.Enum):
    """The layout of a stage's batches (docs/design.md, "Batches"), and with it the preprocessing, the collation
    and the model that takes them."""

    CAPTIONS = "captions"  # one image and its caption in the text encoder's tokens; a contrastive model (AlignModel)
    CONVERSATIONS = "conversations"  # the LLM's tokens with image placeholders, labels on answers (FusedVLM)


class Measure(enum.Enum):
    """What evaluation measures on held-out data (mmdist.evaluation)."""

    RETRIEVAL = "retrieval"  # image -> text and text -> image recall at k
    ANSWERS = "answers"  # greedy answers scored against the reference answer


_REGISTRY: dict[str, Stage] = {}


class Stage(NamedSetting):
    """One training stage: a subclass sets the facts below and may add rules in :meth:`check`.

    There is one object per stage (registered under its name when created), so
    stages compare by identity; comparing a stage with a string is a mistake
    that raises, rather than silently being false.
    """

    name: ClassVar[str]  # the YAML value of `stage`, and what an export's manifest records
    number: ClassVar[int]  # its place in the recipe: "stage 1"
    summary: ClassVar[str]  # one line for `mmdist config --explain` and the docs
    parts: ClassVar[tuple[str, ...]]  # the model sections it builds (keys under `model`), precision table order
    heavy_part: ClassVar[str]  # the frozen part that runs most of a step's FLOPs: MFU's dtype, ZeRO-3's engine dtype
    batch: ClassVar[Batch]
    measures: ClassVar[Measure]
    packs: ClassVar[bool]  # data.packing applies (several samples in one row)
    tiles: ClassVar[bool]  # data.image_tiling may be enabled
    loads: ClassVar[Optional[Stage]] = None  # the stage whose export model.connector.stage1_weights names

    def __init__(self) -> None:
        if self.name in _REGISTRY:
            raise ValueError(f"a stage named {self.name!r} exists already ({_REGISTRY[self.name]!r})")
        _REGISTRY[self.name] = self

    # ------------------------------------------------------------------ the name
    @classmethod
    def named(cls, name: str) -> Stage:
        return _REGISTRY[name]

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(sorted(_REGISTRY, key=lambda n: _REGISTRY[n].number))

    def __str__(self) -> str:
        return self.name

    def __repr__(self) -> str:
        return f"Stage({self.name!r})"

    def __eq__(self, other: object) -> bool:
        if isinstance(other, str):
            raise TypeError(f"comparing stage {self.name!r} with the string {other!r}: ask the stage for the fact "
                            "instead (mmdist/stages/base.py), or compare stage objects")
        return self is other

    __hash__ = object.__hash__

    def __reduce__(self) -> tuple:
        return Stage.named, (self.name,)  # pickles (data workers, broadcasts) as the one object of that name

    def __copy__(self) -> Stage:
        return self

    def __deepcopy__(self, memo: dict) -> Stage:
        return self

    # ------------------------------------------------------------------ facts derived from the settings
    def builds(self, part: str) -> bool:
        """Whether the stage builds model section ``part`` ('vision', 'llm', 'text')."""
        return part in self.parts

    def frozen_parts(self, model: ModelConfig) -> list[str]:
        """The sections it builds frozen: their dtype is what runs (and what DeepSpeed may override)."""
        return [name for name in self.parts if getattr(model, name).freeze]

    def llm_checkpointing(self, model: ModelConfig) -> Optional[bool]:
        """Whether the LLM's activations are recomputed in backward; None when the stage builds no LLM."""
        return bool(model.llm.gradient_checkpointing) if self.builds("llm") else None

    # ------------------------------------------------------------------ rules
    def check(self, model: ModelConfig, data: DataConfig) -> list[tuple[str, str]]:
        """Config problems of this stage as (dotted key, message); a subclass adds its own to these."""
        out = []
        if self.builds("llm") and not model.llm.name_or_path and not model.llm.init_config:
            out.append(("model.llm.name_or_path", f"stage {self} needs an LLM: a hub id / local path, or init_config"))
        if self.builds("text") and not model.text.name_or_path and not model.text.init_config:
            out.append(("model.text.name_or_path", f"stage {self} needs a text encoder: a hub id / local path "
                                                   "('minilm' for the packaged one), or init_config"))
        if not self.tiles and data.image_tiling.enabled:
            out.append(("data.image_tiling.enabled", f"tiling feeds the LLM (stage fuse); stage {self} takes one whole "
                                                     "image per caption"))
        return out
