"""The vocabulary matrix of a frozen LLM held int8 or nf4: read as the input embedding and as the output head.

:class:`QuantizedTable` stores a [vocab, hidden] matrix once: int8 with one fp32 absmax scale per row, or nf4
(QLoRA's NormalFloat code table, the one bitsandbytes uses) in blocks of 64 along each row with one fp32 absmax
per block, two 4-bit codes per byte. :class:`QuantizedEmbedding` gathers rows and dequantizes only those;
:class:`QuantizedHead` computes ``x @ W.T`` a chunk of rows at a time, and its backward gives the gradient to
``x`` (stage 2 needs it at the head's input) without keeping the dequantized matrix. A tied head shares the
embedding's table (one copy). Written by hand because neither bitsandbytes nor torchao offers a row lookup of
a quantized matrix.

The table's tensors are non-persistent buffers and only follow device moves: ``module.to(bf16)`` and a
DeepSpeed engine's cast (parameters only, buffers only when told) leave the codes and fp32 scales alone; the
embedding's output dtype follows the dtype casts of its module. A leaf module: imports nothing of mmdist.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

__all__ = ["NF4_CODE", "QuantizedEmbedding", "QuantizedHead", "QuantizedTable", "int8_rows"]

# QLoRA's NormalFloat4 code values (bitsandbytes.functional.get_4bit_type("nf4")), ascending.
NF4_CODE = (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
            -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
            0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0)
# Rows dequantized at a time by the head: about 4M values (a bounded working set whatever the vocabulary).
CHUNK_VALUES = 1 << 22


def int8_rows(data: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """int8 rows [..., cols] times their fp32 scales [...], in ``dtype``: the product is taken in fp32 and rounded
    once. The one int8 dequantization of the package (this table, and the int8 linear layers of
    mmdist.models.quantize, whose scale is bitsandbytes' row absmax / 127)."""
    return (data.float() * scale.float()[..., None]).to(dtype)


class QuantizedTable(nn.Module):
    """A [rows, cols] matrix as int8 + a per-row scale, or nf4 codes + a per-block absmax (block along the row)."""

    def __init__(self, weight: torch.Tensor, method: str, block: int = 64):
        super().__init__()
        if method not in ("int8", "nf4"):
            raise ValueError(f"QuantizedTable: method {method!r}, use int8 or nf4")
        w = weight.detach().float()
        self.method, self.block = method, int(block)
        self.num_rows, self.num_cols = int(w.shape[0]), int(w.shape[1])
        if method == "int8":
            scale = w.abs().amax(1).clamp(min=1e-12) / 127.0
            data = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
            self.register_buffer("data", data, persistent=False)
            self.register_buffer("scale", scale, persistent=False)
            self.register_buffer("code", None, persistent=False)
            return
        pad = (-self.num_cols) % block
        blocks = nn.functional.pad(w, (0, pad)).view(self.num_rows, -1, block)
        absmax = blocks.abs().amax(-1).clamp(min=1e-12)
        code = torch.tensor(NF4_CODE)
        index = torch.bucketize(blocks / absmax[..., None], (code[1:] + code[:-1]) / 2).to(torch.uint8)  # nearest code
        index = index.view(self.num_rows, -1)
        self.register_buffer("data", (index[:, 0::2] << 4) | index[:, 1::2], persistent=False)
        self.register_buffer("scale", absmax, persistent=False)
        # byte -> its two code values: one lookup per byte instead of unpacking nibbles (1 KiB)
        byte = torch.arange(256)
        self.register_buffer("code", torch.stack([code[byte >> 4], code[byte & 15]], -1), persistent=False)

    @property
    def numel(self) -> int:
        """Weights represented (rows x cols), not the packed storage's element count."""
        return self.num_rows * self.num_cols

    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers())

    def rows(self, index: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """The dequantized rows ``index`` (any shape) -> [*index.shape, cols] in ``dtype``."""
        data, scale = self.data[index], self.scale[index]
        if self.method == "int8":
            return int8_rows(data, scale, dtype)
        values = nn.functional.embedding(data.int(), self.code).view(*data.shape[:-1], -1, self.block)
        return (values * scale[..., None]).flatten(-2)[..., :self.num_cols].to(dtype)

    def dequantize(
        self, dtype: torch.dtype = torch.float32, start: int = 0, stop: Optional[int] = None
    ) -> torch.Tensor:
        """Rows ``start:stop`` of the full-precision matrix."""
        stop = self.num_rows if stop is None else stop
        return self.rows(torch.arange(start, stop, device=self.data.device), dtype)

    def _apply(self, fn: Any, recurse: bool = True) -> QuantizedTable:
        """Device moves apply; dtype casts do not (the fp32 scales and the code table stay fp32)."""
        for name, buf in self._buffers.items():
            if buf is None:
                continue
            moved = fn(buf)
            self._buffers[name] = moved if moved.dtype == buf.dtype else buf.to(moved.device)
        return self

    def extra_repr(self) -> str:
        return f"{self.num_rows}, {self.num_cols}, method={self.method}" + (
            f", block={self.block}" if self.method == "nf4" else ""
        )


class QuantizedEmbedding(nn.Module):
    """An input embedding reading a :class:`QuantizedTable`: gathers the rows of the ids, dequantized to
    ``compute_dtype`` (which follows the module's dtype casts). Frozen: the lookup takes no gradient."""

    def __init__(self, table: QuantizedTable, compute_dtype: torch.dtype, padding_idx: Optional[int] = None):
        super().__init__()
        self.table = table
        self.compute_dtype = compute_dtype
        self.padding_idx = padding_idx
        self.num_embeddings, self.embedding_dim = table.num_rows, table.num_cols

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.table.rows(input_ids, self.compute_dtype)

    def _apply(self, fn: Any, recurse: bool = True) -> QuantizedEmbedding:
        super()._apply(fn, recurse)
        probe = fn(torch.empty(0, dtype=self.compute_dtype))
        if probe.is_floating_point():
            self.compute_dtype = probe.dtype
        return self

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, compute_dtype={self.compute_dtype}"


class _HeadMatmul(torch.autograd.Function):
    """``x @ W.T`` with W dequantized a chunk of rows at a time, in forward and again in backward (nothing of W is
    saved); the gradient goes to ``x`` only (W is frozen). int8 multiplies its per-row scale into the output
    (``(x @ Q.T) * s``, Q's integers are exact in bf16/fp16) instead of into each weight."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, table: QuantizedTable) -> torch.Tensor:
        ctx.table = table
        chunk = max(1, CHUNK_VALUES // table.num_cols)
        out = x.new_empty(*x.shape[:-1], table.num_rows)
        for start in range(0, table.num_rows, chunk):
            stop = min(start + chunk, table.num_rows)
            if table.method == "int8":
                out[..., start:stop] = (x @ table.data[start:stop].to(x.dtype).T) * table.scale[start:stop].to(x.dtype)
            else:
                out[..., start:stop] = x @ table.dequantize(x.dtype, start, stop).T
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Optional[torch.Tensor], None]:
        if not ctx.needs_input_grad[0]:
            return None, None
        table = ctx.table
        chunk = max(1, CHUNK_VALUES // table.num_cols)
        grad_x = None
        for start in range(0, table.num_rows, chunk):
            stop = min(start + chunk, table.num_rows)
            if table.method == "int8":
                part = (grad[..., start:stop] * table.scale[start:stop].to(grad.dtype)) @ table.data[start:stop].to(
                    grad.dtype
                )
            else:
                part = grad[..., start:stop] @ table.dequantize(grad.dtype, start, stop)
            grad_x = part if grad_x is None else grad_x + part
        return grad_x, None


class QuantizedHead(nn.Module):
    """An output head ``x @ W.T (+ bias)`` over a :class:`QuantizedTable` (the embedding's own when tied);
    computes in the input's dtype and passes the gradient to its input."""

    def __init__(self, table: QuantizedTable, bias: Optional[torch.Tensor] = None):
        super().__init__()
        self.table = table
        self.register_buffer("bias", None if bias is None else bias.detach().clone(), persistent=False)
        self.in_features, self.out_features = table.num_cols, table.num_rows

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = _HeadMatmul.apply(x, self.table)
        return out if self.bias is None else out + self.bias.to(out.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"
