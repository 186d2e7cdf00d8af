"""Weight-only quantization of a frozen backbone (int8 or nf4), through bitsandbytes or torchao.

``model.llm.quantize`` / ``model.vision.quantize`` (``none | int8 | nf4``) replace
the ``nn.Linear`` layers of a *frozen* part, after it is loaded and cast to its
dtype, by quantized ones that compute in that dtype. Gradients still flow through
them to the inputs (``inputs_embeds``, so the connector trains); the quantized
weights have no gradient and never change. The input embedding and the output head
(an ``nn.Embedding`` and an ``nn.Linear``, tied or not) are quantized too, by mmdist's
own :mod:`mmdist.models.quantized_embedding` whatever the backend: int8 rows with a
per-row scale or nf4 blocks of 64, one copy when tied; the head still passes the
gradient to its input. An embedding of another type (e.g. one that scales its output)
stays as loaded, and so does a head tied to it.

Backends: ``bitsandbytes`` (int8 = LLM.int8 weights with per-row scales, nf4 =
4-bit NormalFloat in blocks of 64; peft puts LoRA on its layers, i.e. QLoRA) and
``torchao`` (int8 weight-only, nf4 via its ``NF4Tensor``; peft takes no LoRA on
these, so LoRA with torchao is refused). ``auto`` takes bitsandbytes where it
imports (0.45+ runs on CPU as on CUDA), else torchao, and logs why. Both are the
optional extra ``mmdist[quant]``, imported only when a part is quantized.

int8 computes weight-only with either backend: the int8 rows are dequantized to the
compute dtype a layer at a time and multiplied in that dtype. bitsandbytes' own int8
matmul (LLM.int8) also rounds the *activations* to int8 per row, and the connector
learns from the gradient that passes back through those layers: on the demo's stage 2
that gradient pointed elsewhere (cosine 0.30 against the bf16 model's at the start,
0.60 weight-only) and the loss fell several times slower (docs/benchmarks.md). A frozen
base that must carry a gradient is what mmdist quantizes, so it keeps the activations
in 16 bits, as bitsandbytes itself does for training on CPU (``MatMul8bitFp``).

Why quantized weights survive DeepSpeed: a bf16/fp16 engine casts only parameters
whose dtype is floating point (``engine._cast_module_mixed_precision``), and
``module.to(dtype)`` converts only floating tensors: bitsandbytes holds int8/uint8
parameters (scales are attributes of the parameter, untouched), torchao's tensor
subclasses keep their integer data and change only the nominal dtype. ZeRO-3 is
refused: it would partition (flatten and split) the packed weights and their scales.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
from collections.abc import Iterable
from typing import Any, Optional

import torch
from torch import nn

from mmdist.models.freeze import quantized_kind, torch_dtype
from mmdist.models.quantized_embedding import QuantizedEmbedding, QuantizedHead, QuantizedTable, int8_rows

log = logging.getLogger(__name__)

BACKENDS = ("bitsandbytes", "torchao")
EXTRA = "pip install 'mmdist[quant]' (bitsandbytes and torchao, see constraints.txt)"
NF4_BLOCK = 64
__all__ = [
    "quantize_part",
    "quantize_module",
    "resolve_backend",
    "quantized_bytes",
    "quantized_kind",
    "quantized_kinds",
    "is_quantized",
]


# ---------------------------------------------------------------------------
# backends


def _importable(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def resolve_backend(method: str, backend: str, key: str, device: Any = "cpu") -> str:
    """The concrete backend for ``method`` (logged with the reason for ``auto``); errors name ``key`` and the extra."""
    if backend != "auto":
        if backend not in BACKENDS:
            raise ValueError(f"{key}={backend!r}: use auto, bitsandbytes or torchao")
        if not _importable(backend):
            raise ValueError(f"{key}={backend} but {backend} is not installed; {EXTRA}")
        return backend
    device = torch.device(device)
    if _importable("bitsandbytes"):
        reason = (f"bitsandbytes is installed and runs {method} on {device.type} (LoRA on its layers works: QLoRA)")
        chosen = "bitsandbytes"
    elif _importable("torchao"):
        reason = f"bitsandbytes is not installed; torchao runs {method} weight-only on {device.type} (no LoRA on it)"
        chosen = "torchao"
    else:
        raise ValueError(
            f"{key.rsplit('.', 1)[0]}.quantize={method} needs bitsandbytes or torchao, neither is installed; {EXTRA}"
        )
    log.info("%s = %s (auto): %s", key, chosen, reason)
    return chosen


def _vocabulary(module: nn.Module) -> tuple[Optional[nn.Embedding], Optional[nn.Linear], bool, set[int]]:
    """(input embedding, output head, tied, kept) where the first two are what mmdist quantizes itself: a plain
    ``nn.Embedding`` and a plain ``nn.Linear`` head, else None (absent, another type such as a ViT's patch conv or
    an embedding that scales its output, or a head tied to such an embedding). ``kept``: the id of an input
    embedding weight left as loaded, so that no linear sharing it is quantized either."""
    get_in, get_out = getattr(module, "get_input_embeddings", None), getattr(module, "get_output_embeddings", None)
    loaded = get_in() if callable(get_in) else None
    head = get_out() if callable(get_out) else None
    embedding = loaded if type(loaded) is nn.Embedding else None
    kept_weight = getattr(loaded, "weight", None) if embedding is None else None
    if type(head) is not nn.Linear or (kept_weight is not None and head.weight is kept_weight):
        head = None
    tied = head is not None and embedding is not None and head.weight is embedding.weight
    return embedding, head, tied, set() if kept_weight is None else {id(kept_weight)}


def _targets(module: nn.Module, skip: Iterable[str], leave: set[int]) -> list[tuple[nn.Module, str, nn.Linear]]:
    """(parent, attribute, linear) for every nn.Linear not named in ``skip``, not in ``leave`` (ids of modules and
    weights handled elsewhere or kept)."""
    skip = tuple(skip)
    out = []
    for name, parent in module.named_modules():
        for attr, child in parent.named_children():
            full = f"{name}.{attr}" if name else attr
            if type(child) is not nn.Linear or any(s in full.split(".") for s in skip):
                continue
            if id(child) in leave or id(child.weight) in leave:
                continue
            out.append((parent, attr, child))
    return out


def _quantize_vocabulary(module: nn.Module, method: str, compute_dtype: torch.dtype, device: torch.device) -> int:
    """Replace the input embedding and the output head by ones over a :class:`QuantizedTable` (one table when
    tied). Returns how many matrices were quantized (0, 1 or 2)."""
    embedding, head, tied, _ = _vocabulary(module)
    count = 0
    table = None
    if embedding is not None:
        table = QuantizedTable(embedding.weight.data.to(device), method, NF4_BLOCK)
        module.set_input_embeddings(QuantizedEmbedding(table, compute_dtype, embedding.padding_idx))
        count += 1
    if head is not None:
        if not tied:
            table = QuantizedTable(head.weight.data.to(device), method, NF4_BLOCK)
            count += 1
        bias = None if head.bias is None else head.bias.data.to(device, compute_dtype)
        module.set_output_embeddings(QuantizedHead(table, bias))
    return count


def _bnb_linear(linear: nn.Linear, method: str, compute_dtype: torch.dtype, device: torch.device) -> nn.Module:
    import bitsandbytes as bnb

    bias = linear.bias is not None
    weight = linear.weight.data.to(torch.float16 if method == "int8" else compute_dtype)
    if method == "int8":
        layer = _weight_only_linear8bit()(linear.in_features, linear.out_features, bias=bias, has_fp16_weights=False)
        layer.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
    else:
        layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=bias, compute_dtype=compute_dtype,
                                  quant_type="nf4", quant_storage=torch.uint8)
        layer.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4", blocksize=NF4_BLOCK)
    if bias:
        layer.bias = nn.Parameter(linear.bias.data.to(compute_dtype), requires_grad=False)
    return layer.to(device)  # bitsandbytes quantizes on the move to the device


def _row_scale(weight: Any) -> torch.Tensor:
    """What one int8 step of each row of a bitsandbytes Int8Params stands for: SCB is the row's absmax (int8 127)."""
    return weight.SCB.float() / 127.0


class _Int8WeightOnly(torch.autograd.Function):
    """``x @ (Q * s).T + b`` for int8 rows ``Q`` [out, in] and per-row scales ``s``: dequantized to ``x``'s dtype in
    forward and again in backward, so only ``x`` and the int8 tensors are kept between them (no 16-bit copy of the
    weight lives through the step). The gradient goes to ``x`` only: the weight is frozen."""

    @staticmethod
    def forward(
        ctx: Any, x: torch.Tensor, data: torch.Tensor, scale: torch.Tensor, bias: Optional[torch.Tensor]
    ) -> torch.Tensor:
        ctx.save_for_backward(data, scale)
        return nn.functional.linear(x, int8_rows(data, scale, x.dtype), bias)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Optional[torch.Tensor], None, None, None]:
        if not ctx.needs_input_grad[0]:
            return None, None, None, None
        data, scale = ctx.saved_tensors
        return grad @ int8_rows(data, scale, grad.dtype), None, None, None


@functools.cache
def _weight_only_linear8bit() -> type:
    """bitsandbytes' ``Linear8bitLt`` (its Int8Params storage, per-row absmax scales, what peft puts LoRA on)
    computing weight-only (see the module docstring). A subclass made on first use: bitsandbytes is optional."""
    import bitsandbytes as bnb

    class WeightOnlyLinear8bitLt(bnb.nn.Linear8bitLt):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            bias = None if self.bias is None else self.bias.to(x.dtype)
            return _Int8WeightOnly.apply(x, self.weight.data, _row_scale(self.weight), bias)

    return WeightOnlyLinear8bitLt


class TorchaoLinear(nn.Module):
    """A linear layer whose weight is a torchao tensor subclass (Int8Tensor or NF4Tensor, which implement F.linear
    and its backward to the input), held as a non-persistent buffer.

    Not a parameter: ``nn.Module.to`` swaps a subclass *parameter* with ``torch.utils.swap_tensors``, which fails
    inside a DeepSpeed engine ("Cannot swap t1 because it has weakref associated with it"); a buffer is converted
    in place, DeepSpeed casts no buffers unless told to, and checkpoints (trainable weights only) never see it.
    """

    def __init__(self, weight: torch.Tensor, bias: Optional[torch.Tensor]):
        super().__init__()
        self.out_features, self.in_features = int(weight.shape[0]), int(weight.shape[1])
        self.register_buffer("weight", weight, persistent=False)
        self.register_buffer("bias", bias, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.weight, self.bias)

    def _apply(self, fn: Any, recurse: bool = True) -> TorchaoLinear:
        """Device moves apply; a dtype cast leaves the quantized weight as it is (NF4Tensor.to(dtype) dequantizes)."""
        weight = self.weight
        super()._apply(fn, recurse)
        moved = self.weight
        if type(moved) is not type(weight):
            self._buffers["weight"] = weight.to(moved.device)
        return self


def _torchao_linear(linear: nn.Linear, method: str, compute_dtype: torch.dtype) -> nn.Module:
    linear = linear.to(compute_dtype).requires_grad_(False)
    bias = None if linear.bias is None else linear.bias.data
    if method == "int8":
        from torchao.quantization import Int8WeightOnlyConfig, quantize_

        holder = nn.Sequential(linear)
        quantize_(holder, Int8WeightOnlyConfig())
        return TorchaoLinear(holder[0].weight.data, bias)
    from torchao.quantization import to_nf4

    weight = linear.weight.data
    if weight.numel() % NF4_BLOCK:
        raise ValueError(
            f"nf4 through torchao needs weights whose size divides by {NF4_BLOCK}; got {tuple(weight.shape)}"
        )
    blocks = weight.numel() // NF4_BLOCK
    return TorchaoLinear(to_nf4(weight, NF4_BLOCK, 256 if blocks % 256 == 0 else blocks), bias)


def quantize_part(module: nn.Module, cfg: Any, section: str) -> nn.Module:
    """Quantize a loaded frozen part as its settings (``cfg.quantize``, ``quantize_backend``, ``dtype``) say;
    ``section`` is the settings prefix for messages (``model.llm``). A no-op for ``quantize: none``."""
    if cfg.quantize == "none":
        return module
    backend = resolve_backend(cfg.quantize, cfg.quantize_backend, f"{section}.quantize_backend")
    return quantize_module(module, cfg.quantize, backend, torch_dtype(cfg.dtype), key=f"{section}.quantize")


def quantize_module(module: nn.Module, method: str, backend: str, compute_dtype: torch.dtype, *, key: str,
                    device: Any = "cpu", skip: Iterable[str] = ()) -> nn.Module:
    """Replace ``module``'s linear layers in place by ``method`` ('int8' | 'nf4') ones of ``backend`` (after
    :func:`resolve_backend`), and its input embedding and output head by mmdist's quantized ones (one table when
    tied). ``skip``: names of linears to leave as loaded. ``key`` names the setting in errors. Returns ``module``."""
    if method == "none":
        return module
    if method not in ("int8", "nf4"):
        raise ValueError(f"{key}={method!r}: use none, int8 or nf4")
    device = torch.device(device)
    embedding, head, tied, kept = _vocabulary(module)
    leave = {id(m) for m in (embedding, head) if m is not None} | kept
    targets = _targets(module, skip, leave)
    if not targets:
        raise ValueError(f"{key}={method}: the module has no nn.Linear layer to quantize")
    for parent, attr, linear in targets:
        if backend == "bitsandbytes":
            layer = _bnb_linear(linear, method, compute_dtype, device)
        else:
            layer = _torchao_linear(linear, method, compute_dtype)
        setattr(parent, attr, layer)
    tables = _quantize_vocabulary(module, method, compute_dtype, device)
    module.mmdist_quantized = (method, backend)
    vocabulary = (
        "the tied input embedding/output head (one matrix)" if tied else f"{tables} of input embedding/output head"
    )
    log.info(
        "%s = %s through %s: %d linear layers, and through mmdist %s", key, method, backend, len(targets), vocabulary
    )
    return module


# ---------------------------------------------------------------------------
# inspection: which parameters are quantized, and their real bytes


def dequantized_weight(layer: nn.Module) -> torch.Tensor:
    """The full-precision weight [out, in] of a linear layer (or [vocab, hidden] of mmdist's quantized embedding or
    head), quantized by either backend or not (a LoRA merge adds its delta to this)."""
    if isinstance(getattr(layer, "table", None), QuantizedTable):
        return layer.table.dequantize()
    weight = layer.weight
    kind = quantized_kind(weight)
    if kind is None:
        return weight.data
    data = weight.data
    if type(data).__name__ in ("Int8Tensor", "NF4Tensor"):
        return data.dequantize() if hasattr(data, "dequantize") else data.get_original_weight()
    if kind == "int8":  # LLM.int8: row-wise absmax scales
        return int8_rows(data, _row_scale(weight), torch.float32)
    import bitsandbytes.functional as bnbf

    return bnbf.dequantize_4bit(data, weight.quant_state)


def quantized_tensors(module: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """(name, weight) of every quantized weight: bitsandbytes parameters, torchao buffers, and the packed codes of
    mmdist's embedding/head tables (once when tied)."""
    tensors = list(module.named_parameters()) + list(module.named_buffers())
    out = [(n, t) for n, t in tensors if quantized_kind(t)]
    return out + [(f"{n}.data", m.data) for n, m in module.named_modules() if isinstance(m, QuantizedTable)]


def quantized_kinds(module: nn.Module) -> dict[str, str]:
    """{name: 'int8' | 'nf4'} for every quantized weight of :func:`quantized_tensors`."""
    tables = {f"{n}.data": m.method for n, m in module.named_modules() if isinstance(m, QuantizedTable)}
    return {n: tables.get(n) or quantized_kind(t) for n, t in quantized_tensors(module)}


def is_quantized(module: nn.Module) -> bool:
    return bool(quantized_tensors(module))


def _tensor_bytes(t: Any) -> int:
    if t is None or not isinstance(t, torch.Tensor):
        return 0
    flatten = getattr(type(t), "__tensor_flatten__", None)
    if flatten is not None and type(t) is not torch.Tensor and not isinstance(t, nn.Parameter):
        names, _ = t.__tensor_flatten__()
        return sum(_tensor_bytes(getattr(t, n)) for n in names)
    return t.numel() * t.element_size()


def _quant_state_bytes(state: Any) -> int:
    if state is None:
        return 0
    total = _tensor_bytes(getattr(state, "absmax", None)) + _tensor_bytes(getattr(state, "code", None))
    return total + _quant_state_bytes(getattr(state, "state2", None))


def param_bytes(param: torch.Tensor) -> int:
    """Bytes a parameter really holds: packed data plus its scales
    (bitsandbytes SCB / quant_state, torchao's inner tensors)."""
    data = getattr(param, "data", param)
    if type(data).__name__ in ("Int8Tensor", "NF4Tensor", "AffineQuantizedTensor"):
        return _tensor_bytes(data)
    total = int(getattr(param, "ds_numel", param.numel())) * param.element_size()
    total += _tensor_bytes(getattr(param, "SCB", None))
    return total + _quant_state_bytes(getattr(param, "quant_state", None))


def quantized_bytes(module: nn.Module) -> int:
    """All parameter and buffer bytes of ``module`` as held (shared tensors once)."""
    seen: set[int] = set()
    total = 0
    for p in module.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += param_bytes(p)
    for b in module.buffers():
        if id(b) not in seen:
            seen.add(id(b))
            total += param_bytes(b)
    return total

