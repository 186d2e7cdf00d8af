"""What the trainer, the engine and checkpointing may use of a model: written down, so none of them probes.

:class:`TrainableModel` is the contract; :class:`AlignModel <mmdist.models.align.AlignModel>`
(stage 1), :class:`FusedVLM <mmdist.models.fused.FusedVLM>` (stage 2) and the tests' toy
models satisfy it. A batch's counts (samples, tokens, images, loss terms) come from the
model that knows its batch layout, not from guesses over key names in the trainer, and so
does the work a step costs (:meth:`TrainableModel.flop_count`, counted by mmdist.models.flops).
docs/design.md ("Model side") says the same in prose.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Protocol, runtime_checkable

import torch
from torch import nn

from mmdist.models.flops import FlopCount
from mmdist.models.freeze import Part

__all__ = ["BatchCounts", "CountsOwnFlops", "FlopCount", "ReadsOthersParameters", "TrainableModel",
           "contract_members", "count_samples", "leading_size", "require_trainable"]


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
    # Positions the model runs on, padding included (stage 2: rows x row length; stage 1: captions x padded caption
    # length); 0: the same as ``tokens``. What a step's time follows (the planner counts it; mmdist.plan.calibration
    # reads it from metrics.jsonl), where ``tokens`` is what MFU counts.
    positions: int = 0


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

    def flop_count(self, *, vision_runs: bool = True, text_runs: bool = True) -> FlopCount:
        """The training FLOPs (forward and backward) of the work that runs, as rates over :class:`BatchCounts`:
        per token, per supervised token, per image token, per image and per sample, so that
        ``count.step(c.tokens, c.supervised_tokens, c.image_tokens, c.images, c.samples)`` is a step's FLOPs.

        Counted from module shapes by mmdist.models.flops (quantized and ZeRO-3 partitioned layers at their full
        size), each part where it runs and tagged with the dtype it computes in. ``vision_runs=False``: batches
        carry cached image features, the vision tower does not run; ``text_runs=False``: batches carry cached
        caption features, a frozen text encoder does not run.
        """
        ...


@runtime_checkable
class CountsOwnFlops(Protocol):
    """A submodule that counts its own work: the model's count calls ``flop_count()`` instead of reading its layers.

    ``flop_count()`` is called without arguments and returns a :class:`FlopCount` of the training FLOPs (forward
    and backward) the module spends in one step as its parent runs it, as rates over the parent's
    :class:`BatchCounts`: ``per_image`` for each image it encodes (stage 1 has one image per sample),
    ``per_sample`` for each sample or caption (stage 1: an image-text pair, e.g. each ITM pair it scores),
    ``per_token`` for each token of ``BatchCounts.tokens`` (stage 1: caption tokens; stage 2: LLM tokens),
    ``per_image_token`` for each LLM position an image fills, ``per_supervised_token`` for each labelled token.
    Every pass the module makes counts (a Q-Former's ITC, ITM and ITG passes each). The 2/4/6 factors of
    mmdist.models.flops apply from the module's own parameters (``requires_grad``) with its input taken as
    carrying no gradient. FLOPs are tagged with the dtype they compute in (``FlopCount.of(dtype, ...)``, one
    per dtype, added with ``+``); attention's score products may be included where the module says so in its
    doc (the shape count leaves them out). Whatever the module's forward reads from outside it (a text encoder
    passed in as an argument) is counted by its owner, not here.
    """

    def flop_count(self) -> FlopCount:
        ...


@runtime_checkable
class ReadsOthersParameters(Protocol):
    """A model some of whose modules read, in their forward, a parameter another module owns (the Q-Former's tied
    LM head reads the text encoder's token table). Optional: a model without the method shares nothing.

    Under ZeRO-3 a parameter holds only this rank's partition outside its owner's forward; the engine registers
    each pair with DeepSpeed (``register_external_parameter``) so that ``module``'s forward and backward gather it.
    """

    def external_parameters(self) -> list[tuple[nn.Module, nn.Parameter]]:
        """(module, parameter) pairs: ``module``'s forward reads ``parameter``, which it does not own."""
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
    """Samples in a batch: packed rows count theirs (``sequence_ids``),
    else the leading size of the first of ``keys`` present."""
    seq = batch.get("sequence_ids")
    if seq is not None and seq.numel():
        return int((seq.amax(dim=1) + 1).clamp(min=0).sum())
    return leading_size(batch, *keys)


def leading_size(batch: dict, *keys: str) -> int:
    """The leading size of the first of ``keys`` present in ``batch``
    (images: ``pixel_values``/``image_features``); 0 if none."""
    for key in keys:
        value = batch.get(key)
        if value is not None:
            return int(value.shape[0])
    return 0
