"""Step 5 of the plan: the predicted step time of each setting (mmdist.plan.step_time) and the fastest one that fits.

The step's FLOPs are the model's own count (mmdist.plan.shapes.model_flops: the model
code's ``flop_count`` on the meta-device modules, what the progress bar, metrics.jsonl and
the benchmarks count) at the micro-batch's counts, plus one forward of the LLM's layers (2
per weight per token; not the LM head, which runs after them) when gradient checkpointing
recomputes them. One peak for all of them:
the engine precision's.

A micro-batch is what the trainer means by it: ``train.micro_batch_size`` samples.
Its tokens come from mmdist.plan.lengths (:class:`~mmdist.plan.lengths.BatchTokens`:
the shards' statistics, a configured mean, or every sample a full ``data.max_len``
row, the worst case, which is also what is assumed when no ``tokens`` are given).
The LLM's FLOPs count the positions it runs on (padding included), the vision side
the image tokens, the LM head the text tokens.

The machine's rates are a :class:`~mmdist.plan.step_time.Calibration`: the file
``mmdist plan --calibrate`` wrote (``--calibration FILE``, or :data:`CALIBRATION_ENV` for
``auto`` at start-up), else the shipped defaults (half the datasheet peak, and the defaults
named in mmdist.plan.step_time), which the plan prints as such.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import TYPE_CHECKING, Optional

from mmdist.config.run import RunConfig
from mmdist.hardware import datasheet_peak
from mmdist.plan.memory import Estimate, Setting
from mmdist.plan.shapes import DTYPE_BYTES, ModuleShape, model_flops
from mmdist.plan.step_time import Calibration, Interconnect, StepInputs, StepTime, predict

if TYPE_CHECKING:
    from mmdist.plan.lengths import BatchTokens

__all__ = ["Choice", "choose", "micro_batch_tokens", "peak_for", "preference", "record_flops", "step_inputs", "TIE"]

TIE = 0.01  # predicted step times within 1% are a tie: the lower stage (less to go wrong, smaller checkpoints) wins
CPU_PEAK = 1e12  # a placeholder peak where no datasheet row applies: only ratios between settings matter then


def micro_batch_tokens(cfg: RunConfig, tokens: Optional[BatchTokens] = None) -> int:
    """Positions the LLM runs on per micro-batch: the mean ``tokens`` plans (mmdist.plan.lengths), else the most the
    trainer can build, ``micro_batch_size`` samples of ``max_len`` tokens.

    Unpacked, that bound is ``micro_batch_size`` rows padded to at most ``max_len``; packed
    (``data.packing``), ``pack_rows`` puts the same samples in at most as many rows of
    at most ``max_len`` tokens, so the bound is the same (tests/test_plan.py checks it
    against the real collator).
    """
    if tokens is not None:
        return int(round(tokens.positions))
    return cfg.train.micro_batch_size * cfg.data.max_len


def peak_for(gpu: str, precision: str) -> float:
    """Dense peak FLOP/s of ``gpu`` (a datasheet name) in ``precision``; :data:`CPU_PEAK` when unknown."""
    row = datasheet_peak(gpu)
    if row is None:
        return CPU_PEAK
    value = {"bf16": row.bf16, "fp16": row.fp16}.get(precision) or row.tf32 or row.fp32
    return float(value or CPU_PEAK)


def _counted_flops(shapes: Sequence[ModuleShape], positions: float, supervised: float, image_tokens: float,
                   images: float, samples: float) -> tuple[float, float]:
    """(training FLOPs, recompute FLOPs under checkpointing) of work with these counts: ``positions`` the LLM (or
    stage 1's text encoder) runs on, padding included; ``supervised`` tokens among them (the loss's, where the LM
    head runs); the images and their positions."""
    flops = model_flops(shapes)
    if any(s.name == "projector" for s in shapes):  # stage 2: the LLM runs on every position, images among them
        recompute = flops.per_token / 2 * positions  # the decoder layers' forward again (2 per weight); not the head
        return flops.step(positions, supervised, image_tokens, images, samples), recompute
    return flops.step(positions, images=images, samples=samples), 0.0  # stage 1: captions and their images


def _micro_batch_flops(cfg: RunConfig, shapes: Sequence[ModuleShape],
                       batch: Optional[BatchTokens] = None) -> tuple[float, float]:
    """(training FLOPs, recompute FLOPs under checkpointing) of one micro-batch on one rank (``batch``: its tokens)."""
    samples = cfg.train.micro_batch_size
    projector = next((s for s in shapes if s.name == "projector"), None)
    if projector is None:  # stage 1: one image and a caption of up to text.max_length tokens per sample
        return _counted_flops(shapes, samples * cfg.model.text.max_length, 0, 0, samples, samples)
    positions = micro_batch_tokens(cfg, batch)
    if batch is None:  # the worst case: every sample a full row, every text token an answer
        image_tokens = samples * projector.dims.get("tokens", 0)
        images = samples * projector.dims.get("images", 1)
        supervised = max(0.0, positions - image_tokens)
    else:  # the planned micro-batch (shard statistics or a configured mean)
        image_tokens, images, supervised = batch.image_tokens, batch.tower_images, batch.supervised_tokens
    return _counted_flops(shapes, positions, supervised, image_tokens, images, samples)


def record_flops(shapes: Sequence[ModuleShape], record: dict, world: int) -> tuple[float, float]:
    """(training FLOPs, recompute FLOPs) per rank of one step the trainer ran, counted as :func:`step_inputs` counts
    a planned one, at the counts of its metrics.jsonl ``record`` (every rank's together: ``step_positions``,
    ``step_tokens``, ``step_image_tokens``, ``step_images``, ``step_samples``, ``step_supervised_tokens``; a record
    without the last counts every text token). How a calibration knows the work of the very steps it timed, whose
    batches differ from the planned mean."""
    positions = record.get("step_positions") or record["step_tokens"]
    image_tokens = record.get("step_image_tokens", 0)
    supervised = record.get("step_supervised_tokens", max(0, record["step_tokens"] - image_tokens))
    train, recompute = _counted_flops(shapes, positions, supervised, image_tokens, record.get("step_images", 0),
                                      record.get("step_samples", 0))
    return train / max(1, world), recompute / max(1, world)


def step_inputs(cfg: RunConfig, shapes: Sequence[ModuleShape], world: int, gpu: str,
                micro_batches: Optional[int] = None, tokens: Optional[BatchTokens] = None,
                calibration: Optional[Calibration] = None) -> StepInputs:
    """What one optimizer step costs one rank, from the config, the planner's shapes and the micro-batch's ``tokens``
    (mmdist.plan.lengths; default every sample a full ``data.max_len`` row), at the machine's rates
    (``calibration``; default the shipped defaults for ``gpu``'s peak).

    ``micro_batches`` defaults to the gradient accumulation on ``world`` ranks
    (global batch / (micro-batch x world), at least 1).
    """
    precision = cfg.engine.precision
    e = DTYPE_BYTES.get(precision, 4)
    if micro_batches is None:
        micro_batches = max(1, cfg.train.global_batch_size // max(1, cfg.train.micro_batch_size * world))
    flops, recompute = _micro_batch_flops(cfg, shapes, tokens)
    weights = 0
    p_train = 0
    for s in shapes:
        if s.trainable:
            p_train += s.params
            weights += s.params * e
        else:
            dt = precision if precision in ("bf16", "fp16") else s.dtype
            weights += s.params * DTYPE_BYTES.get(dt, 4)
    return StepInputs(
        model_flops=flops * micro_batches,
        recompute_flops=recompute * micro_batches,
        weight_bytes=weights,
        trainable_bytes=p_train * e,
        gradient_bytes=p_train * e,
        micro_batches=micro_batches,
        calibration=calibration or Calibration.defaults(peak_for(gpu, precision)),
        trainable_params=p_train,
        modules=sum(s.modules for s in shapes),
        width=int(max(shapes, key=lambda s: s.params).dims.get("hidden", 0)) if shapes else 0,
    )


@dataclasses.dataclass
class Choice:
    """One candidate: a setting with or without checkpointing, whether it fits, its predicted step."""

    estimate: Estimate
    checkpointing: bool
    fits: bool
    time: StepTime

    @property
    def setting(self) -> Setting:
        return self.estimate.setting


def choose(estimates: Sequence[Estimate], inputs: StepInputs, world: int, interconnect: Interconnect, budget: int,
           checkpointing: Sequence[bool]) -> tuple[Choice, list[Choice]]:
    """(the fastest candidate that fits, every candidate), over ``estimates`` x ``checkpointing``.

    Among what fits, the lowest predicted step time wins; times within :data:`TIE`
    are a tie, won by no offload (the CPU's Adam step is not in the model), then the lower
    ZeRO stage, then no checkpointing. When nothing fits, the candidate needing
    the least memory is returned with ``fits`` false.
    """
    candidates = [Choice(est, ckpt, est.total(ckpt) <= budget,
                         predict(inputs, est.setting.zero_stage, world, interconnect, ckpt,
                                 est.setting.offload_optimizer, est.setting.offload_params))
                  for ckpt in checkpointing for est in estimates]
    fitting = [c for c in candidates if c.fits]
    if not fitting:
        return min(candidates, key=lambda c: c.estimate.total(c.checkpointing)), candidates
    fastest = min(c.time.step_s for c in fitting)
    near = [c for c in fitting if c.time.step_s <= fastest * (1 + TIE)]
    best = min(near, key=lambda c: (*preference(c), c.time.step_s))
    return best, candidates


def preference(choice: Choice) -> tuple[bool, int, bool]:
    """How a tie between predicted step times is broken (lower first): no offload (the CPU's Adam step is not in the
    model), then the lower ZeRO stage, then no checkpointing."""
    setting = choice.setting
    return setting.offload_optimizer or setting.offload_params, setting.zero_stage, choice.checkpointing
