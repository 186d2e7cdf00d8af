"""Split one global batch over ranks, and within a rank over micro-batches, by predicted cost.

Every rank runs :func:`split_global_batch` on the same list of costs (the step's
samples in their canonical order, mmdist/data/global_batch.py) and gets the same
answer, so no rank has to tell the others where a sample goes. By cost: each rank
first keeps the samples it read itself, largest first, up to its fair share
(fewer samples cross the network), the rest go largest first to the least loaded
rank (LPT), and single moves or swaps between the fullest and the emptiest rank
level what is left; a rank's samples are then cut into its micro-batches the same
way (or, with length grouping, into runs of similar length of equal cost). Every
rank gets at least one sample per micro-batch. By count (``by_cost=False``) the
samples are cut into equal runs in order, as a sample-count split would.
"""

from __future__ import annotations

import bisect
import heapq
from collections.abc import Sequence
from typing import Optional

__all__ = ["split_global_batch", "loads_of"]


def split_global_batch(costs: Sequence[float], world_size: int, accumulation: int, *, hosts: Optional[Sequence[int]] = None,
                       by_cost: bool = True, lengths: Optional[Sequence[int]] = None) -> list[tuple[int, int]]:
    """``(rank, micro-batch)`` of every sample of one global batch; deterministic (ties go to the lower index).

    ``hosts[i]``: the rank that read sample i (kept there where balance allows); ``lengths``:
    when given, a rank's micro-batches are runs of similar length (pad-to-longest batches).
    """
    n, bins = len(costs), world_size * accumulation
    if n < bins:
        raise ValueError(f"a global batch of {n} samples cannot give {world_size} rank(s) x {accumulation} micro-batch(es) "
                         "one sample each; raise train.global_batch_size")
    if not by_cost:
        flat = [i * bins // n for i in range(n)]
        return [(b // accumulation, b % accumulation) for b in flat]
    ranks = _split(list(range(n)), costs, world_size, accumulation, hosts)
    out: list[tuple[int, int]] = [(0, 0)] * n
    for rank, members in enumerate(ranks):
        if lengths is not None:
            micro = _runs_by_length(members, costs, lengths, accumulation)
        else:
            micro = _split(members, costs, accumulation, 1, None)
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


def _split(items: list[int], costs: Sequence[float], parts: int, min_count: int,
           hosts: Optional[Sequence[int]]) -> list[list[int]]:
    """``items`` into ``parts`` bins of near-equal cost, each with at least ``min_count`` items."""
    total = sum(costs[i] for i in items)
    target = total / parts
    bins: list[list[int]] = [[] for _ in range(parts)]
    load = [0.0] * parts
    placed: set[int] = set()
    if hosts is not None:  # keep a host's own samples, largest first, up to its share
        for i in sorted(items, key=lambda i: (-costs[i], i)):
            host = hosts[i]
            if load[host] + costs[i] <= target:
                bins[host].append(i)
                load[host] += costs[i]
                placed.add(i)
    heap = [(len(bins[b]) > 0, load[b], b) for b in range(parts)]  # LPT; an empty bin before any other
    heapq.heapify(heap)
    for i in sorted((i for i in items if i not in placed), key=lambda i: (-costs[i], i)):
        _, _, b = heapq.heappop(heap)
        bins[b].append(i)
        load[b] += costs[i]
        heapq.heappush(heap, (True, load[b], b))
    _fill_counts(bins, load, costs, min_count)
    _level(bins, load, costs, min_count)
    return [sorted(b) for b in bins]


def _fill_counts(bins: list[list[int]], load: list[float], costs: Sequence[float], min_count: int) -> None:
    """Move the cheapest items of the fullest bins into bins that hold fewer than ``min_count``."""
    while True:
        poor = min(range(len(bins)), key=lambda b: (len(bins[b]), b))
        if len(bins[poor]) >= min_count:
            return
        rich = max(range(len(bins)), key=lambda b: (len(bins[b]), -b))
        if len(bins[rich]) <= min_count:
            return  # not enough items (the caller checked there are)
        i = min(bins[rich], key=lambda i: (costs[i], -i))
        bins[rich].remove(i)
        bins[poor].append(i)
        load[rich] -= costs[i]
        load[poor] += costs[i]


def _level(bins: list[list[int]], load: list[float], costs: Sequence[float], min_count: int, rounds: int = 64) -> None:
    """Lower the fullest bin by one move or swap with the emptiest while that helps (O(n log n) a round)."""
    for _ in range(rounds):
        hi = max(range(len(bins)), key=lambda b: (load[b], -b))
        lo = min(range(len(bins)), key=lambda b: (load[b], b))
        gap = load[hi] - load[lo]
        if gap <= 0:
            return
        best: Optional[tuple[float, int, Optional[int]]] = None  # (new max of the two, item of hi, item of lo)
        if len(bins[hi]) > min_count:
            for a in bins[hi]:
                if 0 < costs[a] < gap:
                    cand = (max(load[hi] - costs[a], load[lo] + costs[a]), a, None)
                    best = cand if best is None or cand[:1] < best[:1] else best
        lo_sorted = sorted(bins[lo], key=lambda b: (costs[b], b))
        lo_costs = [costs[b] for b in lo_sorted]
        for a in bins[hi]:
            want = costs[a] - gap / 2  # the swap that evens the two bins
            k = bisect.bisect_left(lo_costs, want)
            for j in (k - 1, k):
                if 0 <= j < len(lo_sorted):
                    d = costs[a] - lo_costs[j]
                    if 0 < d < gap:
                        cand = (max(load[hi] - d, load[lo] + d), a, lo_sorted[j])
                        best = cand if best is None or cand[:1] < best[:1] else best
        if best is None or best[0] >= load[hi]:
            return
        _, a, b = best
        bins[hi].remove(a)
        bins[lo].append(a)
        load[hi] -= costs[a]
        load[lo] += costs[a]
        if b is not None:
            bins[lo].remove(b)
            bins[hi].append(b)
            load[lo] -= costs[b]
            load[hi] += costs[b]


def _runs_by_length(items: list[int], costs: Sequence[float], lengths: Sequence[int], parts: int) -> list[list[int]]:
    """``items`` sorted by length, cut into ``parts`` runs of near-equal cost, each with at least one item."""
    order = sorted(items, key=lambda i: (lengths[i], i))
    total = sum(costs[i] for i in order)
    runs: list[list[int]] = [[] for _ in range(parts)]
    run, acc = 0, 0.0
    for k, i in enumerate(order):
        left_items, left_runs = len(order) - k, parts - run
        # close the run at its share of the cost, but leave an item for every run still to come
        if runs[run] and run < parts - 1 and (acc + costs[i] / 2 > total * (run + 1) / parts or left_items < left_runs):
            run += 1
        runs[run].append(i)
        acc += costs[i]
    return runs
