"""Split one global batch over ranks and micro-batches by predicted cost (mmdist/data/cost.py).

Every rank runs :func:`split_global_batch` on the same list of costs (the step's
samples in their canonical order, mmdist/data/global_batch.py) and gets the same
answer, so no rank has to tell the others where a sample goes.

First the ranks get equal cost, then each rank's micro-batches, which are handed
out lightest first on every rank: the ranks meet after every micro-batch's forward
(the non-finite check, and under ZeRO-2/3 the gradient reduction), so a step takes
the sum over micro-batches of the slowest rank's, and micro-batch ``m`` should cost
about the same on every rank. Memory stays what ``mmdist plan`` sized the
micro-batch for: pad-to-longest micro-batches keep ``micro_batch_size`` samples
(which samples share one is what the cost decides), packed ones hold any samples
whose tokens fit ``micro_batch_size x max_len`` (rows filled to equal cost). At
both levels each sample is first kept, largest first, on the rank that read it
while that stays within the fair share (fewer samples cross the network); the
rest go largest first to the least loaded part with room (LPT); single moves or
swaps between the fullest and the emptiest part then level what is left.
With length grouping, the step's samples sorted by length are cut into
equal runs (pad-to-longest batches of similar length), and the runs of similar
length form one micro-batch index across the ranks, dealt in a snake so the
ranks' totals stay level. By count (``by_cost=False``): equal runs in order.
"""

from __future__ import annotations

import bisect
import heapq
from collections.abc import Sequence
from typing import Optional

__all__ = ["split_global_batch", "loads_of"]


def split_global_batch(
    costs: Sequence[float],
    world_size: int,
    accumulation: int,
    *,
    hosts: Optional[Sequence[int]] = None,
    by_cost: bool = True,
    lengths: Optional[Sequence[int]] = None,
    group_by_length: bool = False,
    budget: Optional[int] = None,
    packed: bool = False,
) -> list[tuple[int, int]]:
    """``(rank, micro-batch)`` of every sample of one global batch; deterministic (ties go to the lower index).

    ``len(costs)`` is ``world_size x accumulation x micro_batch``. ``hosts[i]``: the rank that read sample i
    (kept there where balance allows). Micro-batches keep ``micro_batch`` samples, unless ``packed`` with
    ``lengths`` (tokens) and ``budget`` (``micro_batch x max_len``): then any samples whose tokens fit.
    ``group_by_length``: runs of similar length (needs ``lengths``).
    """
    n, bins = len(costs), world_size * accumulation
    if n == 0 or n % bins:
        raise ValueError(f"a global batch of {n} samples does not split into {world_size} rank(s) x {accumulation} "
                         "micro-batch(es) of equal size; train.global_batch_size must be micro x accumulation x ranks")
    if not by_cost:
        return [divmod(i * bins // n, accumulation) for i in range(n)]
    if group_by_length:
        if lengths is None:
            raise ValueError("group_by_length needs the samples' lengths")
        return _length_runs(lengths, world_size, accumulation)
    flexible = packed and budget is not None and lengths is not None
    if flexible:  # packed rows: any samples whose tokens fit micro_batch x max_len
        rank_bins = _Bins(costs, list(range(n)), world_size, lengths, budget * accumulation, min_count=accumulation)
    else:  # pad-to-longest rows: micro_batch samples a micro-batch, as a split by count
        rank_bins = _Bins(costs, list(range(n)), world_size, None, None, min_count=n // world_size,
                          capacity=n // world_size)
    out: list[tuple[int, int]] = [(0, 0)] * n
    for rank, members in enumerate(rank_bins.split(hosts)):
        size = len(members) // accumulation
        micro = (_Bins(costs, members, accumulation, lengths, budget) if flexible else
                 _Bins(costs, members, accumulation, None, None, min_count=size, capacity=size)).split(None)
        # micro-batch m: the m-th lightest everywhere
        micro.sort(key=lambda items: (sum(costs[i] for i in items), items))
        for m, items in enumerate(micro):
            for i in items:
                out[i] = (rank, m)
    return out


def loads_of(assignment: Sequence[tuple[int, int]], costs: Sequence[float], world_size: int,
             accumulation: int) -> tuple[list[float], list[float]]:
    """Cost per rank, and per (rank, micro-batch) flattened, of an assignment."""
    ranks = [0.0] * world_size
    micro = [0.0] * (world_size * accumulation)
    for (rank, m), cost in zip(assignment, costs):
        ranks[rank] += cost
        micro[rank * accumulation + m] += cost
    return ranks, micro


class _Bins:
    """Micro-batches being filled: their items, predicted cost, and the positions (memory) they take."""

    def __init__(self, costs: Sequence[float], members: list[int], parts: int, lengths: Optional[Sequence[int]],
                 budget: Optional[int], min_count: int = 1, capacity: Optional[int] = None):
        self.costs, self.members, self.lengths, self.budget = costs, members, lengths, budget
        self.min_count = min_count  # items every bin must end with (a rank: one per micro-batch)
        self.capacity = capacity  # most items a bin may hold (None: as many as the token budget allows)
        self.items: list[list[int]] = [[] for _ in range(parts)]
        self.load = [0.0] * parts

    def fits(self, b: int, add: int, drop: Optional[int] = None) -> bool:
        """Whether bin ``b`` can take item ``add`` (in place of ``drop``): room by count and by tokens."""
        if self.capacity is not None and drop is None and len(self.items[b]) >= self.capacity:
            return False
        if self.budget is None or self.lengths is None:
            return True
        tokens = sum(self.lengths[i] for i in self.items[b] if i != drop) + self.lengths[add]
        return tokens <= self.budget

    def put(self, b: int, i: int) -> None:
        self.items[b].append(i)
        self.load[b] += self.costs[i]

    def take(self, b: int, i: int) -> None:
        self.items[b].remove(i)
        self.load[b] -= self.costs[i]

    def split(self, homes: Optional[Sequence[int]]) -> list[list[int]]:
        """The members into the bins; ``homes[i]``: the bin item i stays in while within its fair share."""
        costs, parts = self.costs, len(self.items)
        target = sum(costs[i] for i in self.members) / parts
        order = sorted(self.members, key=lambda i: (-costs[i], i))
        rest = order
        if homes is not None:  # keep a sample on the rank that read it, largest first, within the fair share
            rest = []
            for i in order:
                b = homes[i]
                if self.load[b] + costs[i] <= target and self.fits(b, i):
                    self.put(b, i)
                else:
                    rest.append(i)
        # LPT: the least loaded micro-batch with room (an empty one comes first: every micro-batch gets a sample)
        heap = [(bool(self.items[b]), self.load[b], b) for b in range(parts)]
        heapq.heapify(heap)
        full = self.capacity if self.capacity is not None else len(self.members) + 1
        heap = [entry for entry in heap if len(self.items[entry[2]]) < full]
        heapq.heapify(heap)
        for i in rest:
            skipped = []
            while True:  # the least loaded bin with room; the last one left if none has room for this item
                entry = heapq.heappop(heap)
                if self.fits(entry[2], i) or not heap:
                    break
                skipped.append(entry)
            b = entry[2]
            self.put(b, i)
            for other in skipped:
                heapq.heappush(heap, other)
            if len(self.items[b]) < full:
                heapq.heappush(heap, (True, self.load[b], b))
        self._fill_counts()
        self._level()
        return [sorted(b) for b in self.items]

    def _fill_counts(self) -> None:
        """Move the cheapest items of the bins with the most into bins with fewer than ``min_count``."""
        items = self.items
        while True:
            poor = min(range(len(items)), key=lambda b: (len(items[b]), b))
            rich = max(range(len(items)), key=lambda b: (len(items[b]), -b))
            if len(items[poor]) >= self.min_count or len(items[rich]) <= self.min_count:
                return
            i = min(items[rich], key=lambda i: (self.costs[i], -i))
            self.take(rich, i)
            self.put(poor, i)

    def _level(self, rounds: int = 256) -> None:
        """Lower the fullest micro-batch by one move or swap with the emptiest while that helps."""
        costs, load, items = self.costs, self.load, self.items
        for _ in range(rounds):
            hi = max(range(len(items)), key=lambda b: (load[b], -b))
            lo = min(range(len(items)), key=lambda b: (load[b], b))
            gap = load[hi] - load[lo]
            if gap <= 0:
                return
            best: Optional[tuple[float, int, Optional[int]]] = None  # (new max of the two, item of hi, item of lo)
            if len(items[hi]) > self.min_count and (self.capacity is None or len(items[lo]) < self.capacity):
                for a in items[hi]:
                    if 0 < costs[a] < gap and self.fits(lo, a):
                        cand = (max(load[hi] - costs[a], load[lo] + costs[a]), a, None)
                        best = cand if best is None or cand[0] < best[0] else best
            lo_sorted = sorted(items[lo], key=lambda i: (costs[i], i))
            lo_costs = [costs[i] for i in lo_sorted]
            for a in items[hi]:
                k = bisect.bisect_left(lo_costs, costs[a] - gap / 2)  # the swap that evens the two
                for j in (k - 1, k):
                    if 0 <= j < len(lo_sorted) and 0 < costs[a] - lo_costs[j] < gap:
                        b = lo_sorted[j]
                        cand = (max(load[hi] - costs[a] + costs[b], load[lo] + costs[a] - costs[b]), a, b)
                        if (
                            (best is None or cand[0] < best[0])
                            and self.fits(lo, a, drop=b)
                            and self.fits(hi, b, drop=a)
                        ):
                            best = cand
            if best is None or best[0] >= load[hi]:
                return
            _, a, b = best
            self.take(hi, a)
            self.put(lo, a)
            if b is not None:
                self.take(lo, b)
                self.put(hi, b)


def _length_runs(lengths: Sequence[int], world_size: int, accumulation: int) -> list[tuple[int, int]]:
    """Runs of similar length: micro-batch index ``m`` takes the ``m``-th ``world_size`` runs, dealt in a snake."""
    n, bins = len(lengths), world_size * accumulation
    size = n // bins
    order = sorted(range(n), key=lambda i: (lengths[i], i))
    out: list[tuple[int, int]] = [(0, 0)] * n
    for k in range(bins):
        m, j = divmod(k, world_size)
        rank = j if m % 2 == 0 else world_size - 1 - j
        for i in order[k * size:(k + 1) * size]:
            out[i] = (rank, m)
    return out
