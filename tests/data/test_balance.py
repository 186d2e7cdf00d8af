"""The splitter of a global batch: equal predicted cost per rank and micro-batch, deterministic, every bin filled."""

from __future__ import annotations

import random

import pytest

from mmdist.data.balance import loads_of, split_global_batch
from mmdist.data.cost import CostModel, cost_model, imbalance

IMAGE_TOKENS = 16  # placeholders per image row
MODEL = CostModel(token_cost=1.0, image_row_cost=IMAGE_TOKENS)


def skewed_mixture(n: int, seed: int = 0) -> list[float]:
    """Costs of a mixture of text-only turns, one image, one image in 5 tiles (base + 4) and three images."""
    rng = random.Random(seed)
    costs = []
    for i in range(n):
        text = rng.randrange(20, 120)
        rows = [0, 1, 5, 3][i % 4]
        sample = {"input_ids": [0] * (text + rows * IMAGE_TOKENS), "num_images": rows}
        costs.append(MODEL(sample))
    rng.shuffle(costs)
    return costs


@pytest.mark.parametrize("global_batch,accumulation", [(64, 1), (64, 4), (128, 2)])
def test_balanced_split_is_within_5_percent_at_4_ranks_where_count_split_is_not(global_batch, accumulation):
    worst_balanced, worst_count = 1.0, 1.0
    for seed in range(20):
        costs = skewed_mixture(global_batch, seed)
        hosts = [i % 4 for i in range(global_batch)]
        balanced = split_global_batch(costs, 4, accumulation, hosts=hosts)
        by_count = split_global_batch(costs, 4, accumulation, by_cost=False)
        worst_balanced = max(worst_balanced, imbalance(loads_of(balanced, costs, 4, accumulation)[0]))
        worst_count = max(worst_count, imbalance(loads_of(by_count, costs, 4, accumulation)[0]))
        per_bin = [sum(1 for a in balanced if a == (r, m)) for r in range(4) for m in range(accumulation)]
        assert min(per_bin) >= 1 and sum(per_bin) == global_batch
    assert worst_balanced <= 1.05
    assert worst_count > 1.15  # the mixture is skewed enough for the comparison to mean something


def test_split_is_deterministic_and_keeps_hosted_samples_where_it_can():
    costs = skewed_mixture(96, seed=3)
    hosts = [i % 4 for i in range(96)]
    first = split_global_batch(costs, 4, 2, hosts=hosts)
    assert first == split_global_batch(list(costs), 4, 2, hosts=list(hosts))
    kept = sum(1 for (rank, _), host in zip(first, hosts) if rank == host)
    assert kept >= 0.7 * 96  # most samples stay on the rank that read them
    assert imbalance(loads_of(first, costs, 4, 2)[0]) <= 1.05


def test_every_micro_batch_gets_a_sample_even_when_one_sample_outweighs_a_rank():
    costs = [1000.0] + [1.0] * 15
    for packed, fewest in ((True, 1), (False, 2)):  # packed: any count that fits; else the micro-batch's 2
        assignment = split_global_batch(costs, 2, 4, hosts=[0] * 16, lengths=[int(c) for c in costs], budget=2 * 1024,
                                        packed=packed)
        bins = {(r, m): 0 for r in range(2) for m in range(4)}
        for a in assignment:
            bins[a] += 1
        assert min(bins.values()) == fewest and sum(bins.values()) == 16
    with pytest.raises(ValueError, match="equal size"):
        split_global_batch([1.0] * 7, 2, 4)


def test_micro_batches_cost_the_same_at_every_index_and_hold_what_a_count_split_holds():
    """Ranks meet after every micro-batch: micro-batch m should cost about the same on every rank. Pad-to-longest
    micro-batches keep micro_batch samples; packed ones any samples whose tokens fit micro_batch x max_len."""
    rng = random.Random(2)
    lengths = [rng.choice([30, 40, 60, 200, 250]) for _ in range(64)]
    costs = [float(n) for n in lengths]
    micro, max_len = 4, 256
    for packed in (False, True):
        assignment = split_global_batch(costs, 4, 4, hosts=[i % 4 for i in range(64)], lengths=lengths,
                                        budget=micro * max_len, packed=packed)
        ranks, micro_loads = loads_of(assignment, costs, 4, 4)
        step = sum(max(micro_loads[r * 4 + m] for r in range(4)) for m in range(4))  # the ranks wait at each index
        assert imbalance(ranks) <= 1.02 and step / (sum(costs) / 4) <= 1.10
        sizes = set()
        for r in range(4):
            for m in range(4):
                rows = [lengths[i] for i, a in enumerate(assignment) if a == (r, m)]
                sizes.add(len(rows))
                assert rows and sum(rows) <= micro * max_len
        assert sizes == {micro} if not packed else len(sizes) > 1


def test_length_runs_are_sorted_and_even_across_ranks():
    rng = random.Random(5)
    lengths = [rng.randrange(10, 500) for _ in range(64)]
    costs = [float(n) for n in lengths]
    assignment = split_global_batch(costs, 2, 4, lengths=lengths, group_by_length=True)
    runs = {a: sorted(lengths[i] for i, b in enumerate(assignment) if b == a) for a in set(assignment)}
    assert len(runs) == 8 and {len(r) for r in runs.values()} == {8}  # equal pad-to-longest batches
    for m in range(3):  # micro-batch m on every rank holds shorter samples than micro-batch m + 1 anywhere
        assert max(max(runs[(r, m)]) for r in range(2)) <= min(min(runs[(r, m + 1)]) for r in range(2))
    assert imbalance(loads_of(assignment, costs, 2, 4)[0]) <= 1.05


def test_cost_model_counts_tokens_and_image_rows():
    model = cost_model(None, num_image_tokens=16)
    assert model({"input_ids": [0] * 40, "num_images": 2}) == 40 + 2 * 16
    assert cost_model(3.5, 16)({"input_ids": [0] * 10, "num_images": 1}) == 13.5
    assert model({"text_input_ids": [0] * 7, "pixel_values": object()}) == 7 + 16  # stage align: one image
