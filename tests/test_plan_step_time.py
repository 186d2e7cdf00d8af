"""The step-time model: what each ZeRO stage moves, and where the network starts to dominate."""

from __future__ import annotations

import pytest

from mmdist.plan.step_time import GB, Interconnect, StepInputs, comm_bytes, interconnect_for, predict, scaling_table

NET = Interconnect("test", intra_node=100 * GB, inter_node=10 * GB, gpus_per_node=8)


def qwen14b_like(micro_batches: int = 1) -> StepInputs:
    # 14e9 frozen bf16 weights, a 40M-parameter trainable projector, 16 x 600 tokens per micro-batch at 4N FLOPs.
    tokens = 16 * 600 * micro_batches
    return StepInputs(model_flops=4 * 14e9 * tokens, recompute_flops=2 * 14e9 * tokens, weight_bytes=int(28e9),
                      trainable_bytes=int(80e6), gradient_bytes=int(80e6), micro_batches=micro_batches,
                      peak_flops=989e12, utilisation=0.5, overlap=0.8)


def test_one_rank_moves_nothing_and_runs_at_compute_speed():
    t = predict(qwen14b_like(), 3, 1, NET, checkpointing=True)
    assert t.comm_bytes == 0 and t.comm_s == 0
    assert t.step_s == pytest.approx(6 * 14e9 * 9600 / (989e12 * 0.5))
    assert t.efficiency == pytest.approx(1.0)


def test_zero3_gathers_every_weight_per_micro_batch_and_per_pass():
    inp = qwen14b_like(micro_batches=4)
    ring = 7 / 8
    no_ckpt = comm_bytes(inp, 3, 8, checkpointing=False)
    ckpt = comm_bytes(inp, 3, 8, checkpointing=True)
    assert no_ckpt == pytest.approx(ring * 28e9 * 2 * 4 + ring * 80e6 * 4)
    assert ckpt - no_ckpt == pytest.approx(ring * 28e9 * 4)  # one more gather per micro-batch for recomputation
    # ZeRO-2 keeps the frozen LLM whole: only the small trainable part moves.
    assert comm_bytes(inp, 2, 8, checkpointing=True) == pytest.approx(ring * 80e6 * 4 + ring * 80e6)
    assert comm_bytes(inp, 2, 8, checkpointing=True) < 2e-3 * ckpt
    assert comm_bytes(inp, 0, 8, checkpointing=True) == pytest.approx(2 * ring * 80e6)


def test_the_network_across_nodes_makes_zero3_slow_but_not_zero2():
    inp = qwen14b_like()
    in_node = predict(inp, 3, 8, NET, checkpointing=True)
    across = predict(inp, 3, 64, NET, checkpointing=True)
    assert across.comm_s > 5 * in_node.comm_s  # 10x slower links, slightly more data per rank
    assert across.efficiency < in_node.efficiency
    zero2 = predict(inp, 2, 64, NET, checkpointing=True)
    assert zero2.efficiency > 0.99 and zero2.step_s < across.step_s


def test_overlap_hides_communication_up_to_the_compute_time():
    inp = qwen14b_like()
    t = predict(inp, 3, 8, NET, checkpointing=False)
    assert t.comm_s < t.compute_s
    assert t.step_s == pytest.approx(t.compute_s + 0.2 * t.comm_s)


def test_interconnect_table_and_overrides():
    assert interconnect_for("NVIDIA H200").intra_node == 360 * GB
    assert interconnect_for("NVIDIA H100 PCIe").intra_node < 50 * GB  # no NVLink switch on a PCIe card
    assert interconnect_for("A100-SXM4-80GB", inter_gbps=50).inter_node == 50 * GB
    assert interconnect_for("Some GPU", gpus_per_node=4).gpus_per_node == 4


def test_scaling_table_prints_every_stage_and_world():
    lines = scaling_table(qwen14b_like(), [2, 3], NET, checkpointing=True)
    text = "\n".join(lines)
    assert "ZeRO-2" in text and "ZeRO-3" in text and "512 GPU" in text
    assert len(lines) == 5


def test_zero3_overhead_slows_compute_and_counts_against_efficiency():
    import dataclasses

    inp = dataclasses.replace(qwen14b_like(), zero3_overhead=2.0)
    z3, z2 = predict(inp, 3, 1, NET, checkpointing=True), predict(inp, 2, 1, NET, checkpointing=True)
    assert z3.step_s == pytest.approx(2 * z2.step_s)
    assert z3.efficiency == pytest.approx(0.5) and z2.efficiency == pytest.approx(1.0)
