"""Moving samples between ranks: the two collectives the global batch needs, on a CPU (gloo) group.

Each rank reads the logical streams it hosts; the balancer then gives each
sample of a step to some rank, so every step the ranks all-gather what they read
(slot, cost, length: a few numbers a sample) and all-to-all the samples that
change rank (pickled: token ids and uint8 pixels). Both run in the training
process, between steps, in the same order on every rank. On a GPU job the
default group is NCCL, which moves only device tensors; a gloo group over the
same ranks carries these host-side bytes.
"""

from __future__ import annotations

import pickle
from typing import Any, Optional

import torch
import torch.distributed as tdist

from mmdist import distributed

__all__ = ["Exchange"]


class Exchange:
    """All-gather and all-to-all of picklable objects over ``group`` (default: the whole world)."""

    def __init__(self, group: Any = None):
        self.group = group
        self.world_size = tdist.get_world_size(group)
        self.rank = tdist.get_rank(group)

    @classmethod
    def for_world(cls, world_size: int) -> Optional[Exchange]:
        """The exchange of this job when its process group has ``world_size`` > 1 ranks, else None (one process
        reads every stream itself). Collective: every rank must call it (a gloo group may be created)."""
        if world_size <= 1 or not distributed.is_initialized() or distributed.world_size() != world_size:
            return None
        group = None if tdist.get_backend() == "gloo" else tdist.new_group(backend="gloo")
        return cls(group)

    def all_gather(self, obj: Any) -> list:
        """Every rank's ``obj``, in rank order."""
        out: list[Any] = [None] * self.world_size
        tdist.all_gather_object(out, obj, group=self.group)
        return out

    def all_to_all(self, outgoing: list[Any]) -> list[Any]:
        """``outgoing[r]`` goes to rank ``r``; returns what every rank sent here, in rank order."""
        if len(outgoing) != self.world_size:
            raise ValueError(f"all_to_all needs one object per rank ({self.world_size}), got {len(outgoing)}")
        payloads = [pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL) for obj in outgoing]
        send_sizes = torch.tensor([len(p) for p in payloads], dtype=torch.int64)
        recv_sizes = torch.empty_like(send_sizes)
        tdist.all_to_all_single(recv_sizes, send_sizes, group=self.group)
        send = torch.frombuffer(bytearray(b"".join(payloads)), dtype=torch.uint8) if sum(send_sizes.tolist()) else \
            torch.empty(0, dtype=torch.uint8)
        recv = torch.empty(int(recv_sizes.sum()), dtype=torch.uint8)
        tdist.all_to_all_single(recv, send, recv_sizes.tolist(), send_sizes.tolist(), group=self.group)
        out, start = [], 0
        raw = recv.numpy().tobytes()
        for size in recv_sizes.tolist():
            out.append(pickle.loads(raw[start:start + size]))
            start += size
        return out
