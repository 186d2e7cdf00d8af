"""What the trainer, the engine and checkpointing may use of a model: written down, so none of them probes.

:class:`TrainableModel` is the contract; :class:`AlignModel <mmdist.models.align.AlignModel>`
(stage 1), :class:`FusedVLM <mmdist.models.fused.FusedVLM>` (stage 2) and the tests' toy
models satisfy it. A batch's counts (samples, tokens, images, loss terms) come from the
model that knows its batch layout, not from guesses over key names in the trainer.
docs/design.md ("Model side") says the same in prose.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Protocol, runtime_checkable

import torch
from torch import nn

from mmdist.models.freeze import Part

__all__ = ["BatchCounts", "TrainableModel", "contract_members", "count_samples", "leading_size", "require_trainable"]


@dataclass(frozen=True)
class BatchCounts:
    """What one batch holds, known before the forward (plain ints, read on the host)."""

    samples: int  # samples in the batch (a packed row counts the samples in it)
    tokens: int  # tokens the model processes: prompt, image and answer tokens (what the FLOPs are spent on)
    supervised_tokens: int  # positions the loss is computed at (stage 2: answer tokens after the shift), 0 if none
    images: int  # images (pixels or cached features)
    image_tokens: int  # LLM input positions the images fill (images x tokens per image); 0 without an LLM
    # The count the forward's ``loss`` is a mean over, when the trainer should weight micro-batches by it (stage 2's
    # answer tokens: a step's gradient is then the mean over all of them); None when the loss is a mean over the batch
    # as a whole (contrastive losses): every micro-batch weighs the same.
    loss_terms: Optional[int] = None


@runtime_checkable
class TrainableModel(Protocol):
    """The model side of the trainer's contract (``isinstance(model, TrainableModel)`` checks the members exist).

    ``forward(batch) -> dict`` returns ``loss`` (a scalar tensor: the mean over its
    terms), ``metrics`` (detached scalar tensors by name, averaged over micro-batches
    and ranks for the log) and, where :attr:`BatchCounts.loss_terms` is not None,
    ``num_tokens``: how many terms the loss averages over, so ``loss * num_tokens`` is
    the loss sum the trainer weights.
    """

    processors: Any  # mmdist.models.processors.Processors: what the data pipeline needs (None for a toy)

    def forward(self, batch: dict) -> dict:
        """``{"loss": Tensor, "metrics": {name: Tensor}, ["num_tokens": Tensor]}`` (see the class doc)."""
        ...

    def parts(self) -> list[Part]:
        """The top-level parts, whether each trains and its dtype (mmdist.models.freeze)."""
        ...

    def trainable_groups(self) -> dict[str, list[nn.Parameter]]:
        """Trainable parameters by group name (``train.lr_multipliers`` keys); frozen ones are in no group."""
        ...

    def export_state_dict(self) -> dict[str, torch.Tensor]:
        """The trainable weights by name: what a stage exports and the next one loads."""
        ...

    def batch_counts(self, batch: dict) -> BatchCounts:
        """What ``batch`` counts, before the forward (the trainer sums these over micro-batches and ranks)."""
        ...


def contract_members() -> tuple[str, ...]:
    """The members :class:`TrainableModel` names: its attributes and its methods, read from the Protocol itself."""
    names = set(TrainableModel.__annotations__)
    names |= {name for name, value in vars(TrainableModel).items() if not name.startswith("_") and callable(value)}
    return tuple(sorted(names))


def require_trainable(model: Any, where: str) -> None:
    """Refuse ``model`` at ``where`` (the engine, the trainer) unless it has every member of the contract.

    The error names what is missing, so a custom ``model_builder``'s model fails where it enters, not deep in a
    step with an AttributeError.
    """
    missing = [name for name in contract_members() if not hasattr(model, name)]
    if missing:
        raise TypeError(f"{type(model).__name__} cannot enter {where}: it lacks {', '.join(missing)} of the model "
                        "contract (mmdist.models.contract.TrainableModel; docs/design.md, 'Model side'). Add "
                        f"{'it' if len(missing) == 1 else 'them'} to the model, or build an mmdist model")


def count_samples(batch: dict, *keys: str) -> int:
    """Samples in a batch: packed rows count theirs (``sequence_ids``), else the leading size of the first of ``keys`` present."""
    seq = batch.get("sequence_ids")
    if seq is not None and seq.numel():
        return int((seq.amax(dim=1) + 1).clamp(min=0).sum())
    return leading_size(batch, *keys)


def leading_size(batch: dict, *keys: str) -> int:
    """The leading size of the first of ``keys`` present in ``batch`` (images: ``pixel_values``/``image_features``); 0 if none."""
    for key in keys:
        value = batch.get(key)
        if value is not None:
            return int(value.shape[0])
    return 0
