"""How much work a model does: training FLOPs counted from module shapes, whatever the weights' storage.

A matmul layer costs its multiply-adds per position it runs at, read from the module's attributes and never from
its weight's storage (a packed nf4 weight holds half the elements, a ZeRO-3 partitioned one none):

- Linear-like (integer ``in_features`` and ``out_features``: nn.Linear and its subclasses such as bitsandbytes'
  Linear8bitLt / Linear4bit, mmdist.models.quantize.TorchaoLinear, mmdist's QuantizedHead, peft's LoRA adapters;
  transformers' Conv1D by ``nx`` x ``nf``): ``in_features x out_features``;
- convolution: ``in_channels / groups x out_channels x kernel size`` per output position;
- embedding tables are lookups (no FLOPs); a head tied to one is a Linear-like module of its own and counts as one.

Biases, norms, activations and attention's score products (QK^T, AV) are left out, as in the usual 6N/4N count.
A wrapper whose children hold the matmuls (peft's LoRA layer around its base layer) is counted by its children.

Training FLOPs per position of a layer, at 2 per multiply-add (torch's FLOP counter counts the same):
2 forward; +2 for its weight gradient when it trains; +2 for its input's gradient when one must pass below it
(the part's input carries a gradient, or an earlier layer of the part trains). Layers are taken as a chain in
module order. So a frozen part that only runs forward costs 2 per weight, a frozen part the gradient flows
through (the LLM under a trainable projector) 4, a trainable one 6, and the lowest trainable layer over frozen
features 4.

A submodule that defines its own ``flop_count()`` is counted by that method, not by its layers
(mmdist.models.contract says what it returns). Each part's FLOPs carry the dtype it computes in
(:func:`compute_dtype`), so MFU can divide each by the peak of its own dtype. A leaf module: imports nothing
of mmdist.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Optional

import torch
from torch import nn

__all__ = ["RATES", "FlopCount", "MatmulLayer", "compute_dtype", "matmul_layers", "module_flops", "part_flops",
           "train_flops"]

#: The rates of a :class:`FlopCount`, in field order.
RATES = ("per_token", "per_supervised_token", "per_image_token", "per_image", "per_sample")
DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


@dataclasses.dataclass(frozen=True)
class FlopCount:
    """Training FLOPs per processed token, per supervised (labelled) token, per image token (an LLM position an image
    fills), per image and per sample; :meth:`step` turns a step's counts into FLOPs.

    ``parts`` splits the same rates by the dtype they compute in (``(("bf16", FlopCount), ...)``; see
    :meth:`by_dtype`); it takes no part in equality. Counts add up with ``+``.
    """

    per_token: float = 0.0
    per_supervised_token: float = 0.0
    per_image_token: float = 0.0
    per_image: float = 0.0
    per_sample: float = 0.0
    parts: tuple[tuple[str, FlopCount], ...] = dataclasses.field(default=(), compare=False, repr=False)

    @classmethod
    def of(cls, dtype: str, **rates: float) -> FlopCount:
        """A count whose FLOPs all compute in ``dtype`` ('fp32', 'bf16', 'fp16')."""
        plain = cls(**rates)
        return dataclasses.replace(plain, parts=((dtype, plain),) if plain.any() else ())

    def rates(self) -> tuple[float, ...]:
        return tuple(getattr(self, name) for name in RATES)

    def any(self) -> bool:
        return any(self.rates())

    def by_dtype(self) -> dict[str, FlopCount]:
        """The rates by the dtype they compute in; FLOPs of no stated dtype under ''."""
        if self.parts:
            return dict(self.parts)
        return {"": FlopCount(*self.rates())} if self.any() else {}

    def dtypes(self) -> list[str]:
        return list(self.by_dtype())

    def __add__(self, other: FlopCount) -> FlopCount:
        if not isinstance(other, FlopCount):
            return NotImplemented
        parts: dict[str, FlopCount] = {}
        for count in (self, other):
            for dtype, part in count.by_dtype().items():
                parts[dtype] = _plain_sum(parts[dtype], part) if dtype in parts else part
        total = _plain_sum(self, other)
        return dataclasses.replace(total, parts=tuple(parts.items()))

    def step(self, tokens: int, supervised_tokens: int = 0, image_tokens: int = 0, images: int = 0,
             samples: int = 0) -> float:
        """FLOPs of a step that processed these counts (mmdist.models.contract.BatchCounts summed)."""
        return (self.per_token * tokens + self.per_supervised_token * supervised_tokens
                + self.per_image_token * image_tokens + self.per_image * images + self.per_sample * samples)


def _plain_sum(a: FlopCount, b: FlopCount) -> FlopCount:
    return FlopCount(*(x + y for x, y in zip(a.rates(), b.rates())))


@dataclasses.dataclass(frozen=True)
class MatmulLayer:
    """One matmul layer of a part: its multiply-adds per position, whether it is a convolution, whether it trains."""

    name: str
    macs: int
    conv: bool
    trains: bool
    module: nn.Module = dataclasses.field(compare=False, repr=False)


def _macs(module: nn.Module) -> Optional[tuple[int, bool]]:
    """(multiply-adds per position, is a convolution) of a matmul layer, from its attributes; None for anything else."""
    if isinstance(module, nn.modules.conv._ConvNd):
        return module.in_channels // module.groups * module.out_channels * math.prod(module.kernel_size), True
    fan_in, fan_out = getattr(module, "in_features", None), getattr(module, "out_features", None)
    if type(module).__name__ == "Conv1D":  # transformers' GPT-2 style linear: weight [nx, nf]
        fan_in, fan_out = getattr(module, "nx", None), getattr(module, "nf", None)
    if isinstance(fan_in, int) and isinstance(fan_out, int) and not isinstance(fan_in, bool):
        return fan_in * fan_out, False
    return None


def matmul_layers(module: nn.Module) -> tuple[list[MatmulLayer], list[nn.Module]]:
    """(the matmul layers of ``module`` in module order, the submodules that count themselves), each once.

    A submodule with its own ``flop_count`` method (other than ``module`` itself) is returned in the second list and
    none of its layers in the first.
    """
    layers: list[MatmulLayer] = []
    counters: list[nn.Module] = []
    seen: set[int] = set()

    def walk(m: nn.Module, name: str) -> bool:
        if id(m) in seen:
            return True
        if m is not module and callable(getattr(m, "flop_count", None)):
            seen.add(id(m))
            counters.append(m)
            return True
        found = False
        for child_name, child in m.named_children():
            found |= walk(child, f"{name}.{child_name}" if name else child_name)
        if found:
            return True
        macs = _macs(m)
        if macs is None:
            return False
        seen.add(id(m))
        trains = any(p.requires_grad for p in m.parameters(recurse=False))
        layers.append(MatmulLayer(name, macs[0], macs[1], trains, m))
        return True

    walk(module, "")
    return layers, counters


def train_flops(layers: Sequence[MatmulLayer], positions: float, *, conv_positions: Optional[float] = None,
                input_grad: bool = False) -> float:
    """Training FLOPs of ``layers`` run as a chain at ``positions`` (convolutions at ``conv_positions``, default the
    same), by the 2/4/6 rule of the module doc; ``input_grad``: the chain's input carries a gradient."""
    total = 0.0
    grad_below = input_grad
    for layer in layers:
        factor = 2 + (2 if layer.trains else 0) + (2 if grad_below else 0)
        where = conv_positions if layer.conv and conv_positions is not None else positions
        total += factor * layer.macs * where
        grad_below = grad_below or layer.trains
    return total


def compute_dtype(module: nn.Module, default: str = "fp32") -> str:
    """The dtype a part computes in: that of most of its floating-point parameter elements (ZeRO-3 aware).

    Quantized storage is not floating point: a quantized part's norms and biases are in the dtype it computes in.
    ``default`` for a part without floating-point parameters.
    """
    elements: dict[torch.dtype, int] = {}
    for p in module.parameters():
        if p.is_floating_point():
            elements[p.dtype] = elements.get(p.dtype, 0) + int(getattr(p, "ds_numel", p.numel()))
    if not elements:
        return default
    dtype = max(elements, key=elements.__getitem__)
    return DTYPE_NAMES.get(dtype, str(dtype).removeprefix("torch."))


def part_flops(module: nn.Module, rate: str, positions: float, *, conv_positions: Optional[float] = None,
               input_grad: bool = False, skip: Sequence[nn.Module] = (), dtype: Optional[str] = None) -> FlopCount:
    """One part's training FLOPs: its matmul layers at ``positions`` per unit of ``rate`` (one of :data:`RATES`),
    in ``dtype`` (default: the part's :func:`compute_dtype`), plus what its self-counting submodules report.
    ``skip``: submodules counted elsewhere (an LLM's head, counted at other positions)."""
    if rate not in RATES:
        raise ValueError(f"part_flops: rate {rate!r} is not one of {', '.join(RATES)}")
    skipped = {id(m) for s in skip for m in s.modules()}
    layers, counters = matmul_layers(module)
    layers = [layer for layer in layers if id(layer.module) not in skipped]
    flops = train_flops(layers, positions, conv_positions=conv_positions, input_grad=input_grad)
    count = FlopCount.of(dtype or compute_dtype(module), **{rate: flops})
    for sub in counters:
        if id(sub) not in skipped:
            count = count + sub.flop_count()
    return count


def module_flops(module: nn.Module, rate: str, positions: float, **kwargs: object) -> FlopCount:
    """``module.flop_count()`` where the module counts itself, else :func:`part_flops` with the same arguments."""
    own = getattr(module, "flop_count", None)
    if callable(own):
        return own()
    return part_flops(module, rate, positions, **kwargs)
