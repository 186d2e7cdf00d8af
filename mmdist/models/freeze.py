"""Freeze and dtype policy, decided in one place, and the table that shows it.

Every model wrapper lists its parts with :class:`Part` (name, module, trainable,
dtype) and calls :func:`apply_policy`. Frozen parts get ``requires_grad=False``,
``eval()`` and their configured (usually half) dtype; trainable parts keep fp32
master weights. :class:`FrozenAwareModule` keeps frozen parts in eval mode when
the wrapper is put into train mode (dropout off, no BatchNorm statistics
updates), because an engine calls ``model.train()`` on the whole tree.
A quantized frozen part (mmdist/models/quantize.py) keeps its int8/nf4 weights through
the cast (only floating tensors are cast) and shows as int8/nf4 in the table (its embedding/head
matrix too, counted as the weights it represents).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from mmdist.models.quantized_embedding import QuantizedTable

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def torch_dtype(name: str) -> torch.dtype:
    """``'bf16'`` -> ``torch.bfloat16`` (names as in the settings)."""
    if name == "auto":
        raise ValueError("dtype 'auto' reached a model: resolve it for the device first "
                         "(mmdist.precision.resolve_precision(cfg, device) at start-up)")
    try:
        return DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; use one of {', '.join(DTYPES)}") from None


def quantized_kind(param: torch.Tensor) -> Optional[str]:
    """'int8' / 'nf4' for a weight quantized by mmdist/models/quantize.py
    (either backend, judged by its type), else None."""
    kinds = {"Int8Params": "int8", "Params4bit": "nf4", "Int8Tensor": "int8", "NF4Tensor": "nf4"}
    return kinds.get(type(param).__name__) or kinds.get(type(getattr(param, "data", param)).__name__)


@dataclass
class Part:
    """One top-level part of a model and how it is treated."""

    name: str
    trainable: bool
    dtype: str  # frozen parts: the configured dtype; trainable parts are always fp32


def freeze(module: nn.Module, dtype: Optional[str] = None) -> nn.Module:
    """Frozen: no gradients, eval mode, weights cast to ``dtype``."""
    if dtype is not None:
        module.to(torch_dtype(dtype))
    for p in module.parameters():
        p.requires_grad_(False)
    module.eval()
    return module


def make_trainable(module: nn.Module) -> nn.Module:
    """Trainable: fp32 master weights with gradients."""
    module.to(torch.float32)
    for p in module.parameters():
        p.requires_grad_(True)
    return module


class FrozenAwareModule(nn.Module):
    """Base for the model wrappers: frozen parts stay in eval() whatever mode the wrapper is in."""

    def parts(self) -> list[Part]:  # overridden by each wrapper
        return []

    def apply_policy(self) -> None:
        """Apply :meth:`parts` (call once after the children exist)."""
        for part in self.parts():
            module = getattr(self, part.name)
            if module is None:
                continue
            if part.trainable:
                make_trainable(module)
            else:
                freeze(module, part.dtype)

    def frozen_modules(self) -> Iterable[nn.Module]:
        for part in self.parts():
            module = getattr(self, part.name)
            if module is not None and not part.trainable:
                yield module

    def train(self, mode: bool = True):  # noqa: D102 - nn.Module API
        super().train(mode)
        for module in self.frozen_modules():
            module.eval()
        return self


def _dtype_name(dtypes: set) -> str:
    names = {v: k for k, v in DTYPES.items()}
    return (
        "/".join(sorted(d if isinstance(d, str) else names.get(d, str(d).replace("torch.", "")) for d in dtypes)) or "-"
    )


def _numel(p: torch.Tensor) -> int:
    state = getattr(p, "quant_state", None)  # bitsandbytes 4-bit: the packed tensor holds two weights per byte
    if state is not None and getattr(state, "shape", None) is not None:
        return int(torch.Size(state.shape).numel())
    return int(getattr(p, "ds_numel", p.numel()))  # ZeRO-3: the full count, not the local partition


def param_table(model: nn.Module) -> str:
    """A table of the model's top-level modules: parameters, trainable parameters, dtype(s), mode.

    Parameters shared between modules are counted once, under the first module.
    """
    rows = [("module", "params", "trainable", "dtype", "mode")]
    seen: set[int] = set()
    total = trainable_total = 0
    for name, child in model.named_children():
        n = t = 0
        dtypes = set()
        for p in child.parameters():
            if id(p) in seen:
                continue
            seen.add(id(p))
            n += _numel(p)
            t += _numel(p) if p.requires_grad else 0
            dtypes.add(quantized_kind(p) or p.dtype)
        for b in child.buffers():  # torchao's quantized weights are buffers (mmdist.models.quantize.TorchaoLinear)
            if quantized_kind(b) and id(b) not in seen:
                seen.add(id(b))
                n += b.numel()
                dtypes.add(quantized_kind(b))
        for table in child.modules():  # mmdist's quantized embedding/head matrix (buffers; once when tied)
            if isinstance(table, QuantizedTable) and id(table) not in seen:
                seen.add(id(table))
                n += table.numel
                dtypes.add(table.method)
        total += n
        trainable_total += t
        rows.append((name, f"{n:,}", f"{t:,}", _dtype_name(dtypes), "train" if child.training else "eval"))
    for name, p in model.named_parameters(recurse=False):
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += _numel(p)
        t = _numel(p) if p.requires_grad else 0
        trainable_total += t
        rows.append((name, f"{_numel(p):,}", f"{t:,}", _dtype_name({p.dtype}), "-"))
    rows.append(("total", f"{total:,}", f"{trainable_total:,}", "", ""))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    lines = []
    for i, row in enumerate(rows):
        cells = (
            [row[0].ljust(widths[0])]
            + [c.rjust(w) for c, w in zip(row[1:3], widths[1:3])]
            + [row[3].ljust(widths[3]), row[4]]
        )
        lines.append("  ".join(cells).rstrip())
        if i == 0 or i == len(rows) - 2:
            lines.append("-" * len(lines[0]))
    return "\n".join(lines)
