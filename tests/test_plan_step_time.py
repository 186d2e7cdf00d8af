"""The step-time model: what each ZeRO stage moves, and where the network starts to dominate."""

from __future__ import annotations

import pytest

from mmdist.plan.step_time import (
    GB,
    Calibration,
    Interconnect,
    StepInputs,
    collective_calls,
    comm_bytes,
    interconnect_for,
    layer_rate,
    predict,
    scaling_table,
)

NET = Interconnect("test", intra_node=100 * GB, inter_node=10 * GB, gpus_per_node=8)


# Rates with nothing but compute and overlapped links, so that the structure shows in round figures.
PLAIN = Calibration(flops_per_s=989e12 * 0.5, latency_s=0.0, zero3_module_s=0.0, step_fixed_s=0.0, overlap=0.8)


def qwen14b_like(micro_batches: int = 1, calibration: Calibration = PLAIN, modules: int = 400) -> StepInputs:
    # 14e9 frozen bf16 weights, a 40M-parameter trainable projector, 16 x 600 tokens per micro-batch at 4N FLOPs.
    tokens = 16 * 600 * micro_batches
    return StepInputs(model_flops=4 * 14e9 * tokens, recompute_flops=2 * 14e9 * tokens, weight_bytes=int(28e9),
                      trainable_bytes=int(80e6), gradient_bytes=int(80e6), micro_batches=micro_batches,
                      calibration=calibration, trainable_params=int(40e6), modules=modules, width=5120)


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


def test_zero3_pays_per_module_fetch_and_per_collective_call():
    import dataclasses

    cal = dataclasses.replace(PLAIN, zero3_module_s=1e-3, latency_s=1e-4)
    small, deep = qwen14b_like(micro_batches=2, calibration=cal), qwen14b_like(micro_batches=2, calibration=cal,
                                                                              modules=800)
    z3, z2 = predict(small, 3, 1, NET, checkpointing=True), predict(small, 2, 1, NET, checkpointing=True)
    assert z3.zero3_s == pytest.approx(1e-3 * 400 * 3 * 2)  # modules x (forward, backward, recompute) x micro-batches
    assert z3.step_s == pytest.approx(z2.step_s + z3.zero3_s) and z2.zero3_s == 0
    assert predict(deep, 3, 1, NET, True).zero3_s == pytest.approx(2 * z3.zero3_s)  # twice the modules, twice the cost
    assert z3.efficiency < 1.0 == pytest.approx(z2.efficiency)
    # on 8 ranks every gather is a call that pays the latency: one per module and pass, one reduce per micro-batch
    assert collective_calls(small, 3, 8, True) == (400 * 3 + 1) * 2
    assert collective_calls(small, 2, 8, True) == 2 + 1 and collective_calls(small, 0, 8, True) == 1
    assert collective_calls(small, 3, 1, True) == 0


def test_every_stage_pays_per_module_call_and_pass():
    """The trainer's cost per module call (dispatch, rotary, per-sample attention): at every stage, in the bare
    model's time too (no engine saves it), once per module, pass and micro-batch."""
    import dataclasses

    cal = dataclasses.replace(PLAIN, module_call_s=2e-4)
    inp = qwen14b_like(micro_batches=2, calibration=cal)
    plain = predict(qwen14b_like(micro_batches=2), 1, 1, NET, checkpointing=True)
    for stage in (0, 1, 2, 3):
        t = predict(inp, stage, 1, NET, checkpointing=True)
        assert t.step_s == pytest.approx(plain.step_s + 2e-4 * 400 * 3 * 2)  # modules x 3 passes x micro-batches
        assert t.bare_compute_s == pytest.approx(plain.bare_compute_s + 2e-4 * 400 * 3 * 2)
        assert t.efficiency == pytest.approx(1.0)
    without_ckpt = predict(inp, 1, 1, NET, checkpointing=False)
    assert without_ckpt.step_s == pytest.approx(predict(qwen14b_like(micro_batches=2), 1, 1, NET, False).step_s
                                                + 2e-4 * 400 * 2 * 2)


def test_optimizer_and_fixed_costs_and_the_partitioned_update():
    import dataclasses

    cal = dataclasses.replace(PLAIN, optimizer_param_s=1e-9, step_fixed_s=0.05)
    inp = qwen14b_like(calibration=cal)
    z0, z1 = predict(inp, 0, 8, NET, False), predict(inp, 1, 8, NET, False)
    assert z0.optimizer_s == pytest.approx(40e6 * 1e-9) and z1.optimizer_s == pytest.approx(40e6 * 1e-9 / 8)
    assert z0.fixed_s == z1.fixed_s == 0.05
    bare = predict(qwen14b_like(), 1, 8, NET, False)
    assert z1.step_s == pytest.approx(bare.step_s + 0.05 + z1.optimizer_s)


def test_a_measured_link_replaces_the_table_inside_a_node_only():
    import dataclasses

    measured = dataclasses.replace(PLAIN, bus_bytes_per_s=1 * GB, overlap=0.0)
    inp = qwen14b_like(calibration=measured)
    assert predict(inp, 3, 8, NET, False).comm_s == pytest.approx(comm_bytes(inp, 3, 8, False) / GB)
    assert predict(inp, 3, 64, NET, False).comm_s == pytest.approx(comm_bytes(inp, 3, 64, False) / (10 * GB))


def test_compute_rate_follows_the_measured_layer_table_across_widths():
    import dataclasses

    table = {256: 20e9, 1024: 40e9, 4096: 80e9}
    assert layer_rate(table, 512) == pytest.approx(30e9)  # halfway in log(width)
    assert layer_rate(table, 64) == 20e9 and layer_rate(table, 8192) == 80e9  # the nearest outside the table
    cal = dataclasses.replace(PLAIN, flops_per_s=10e9, layer_flops=table, layer_width=256)
    assert cal.rate(256) == pytest.approx(10e9) and cal.rate(1024) == pytest.approx(20e9)
    assert cal.rate(0) == 10e9 and PLAIN.rate(1024) == PLAIN.flops_per_s  # no table: one rate
    inp = dataclasses.replace(qwen14b_like(calibration=cal), width=1024)
    assert predict(inp, 1, 1, NET, False).bare_compute_s == pytest.approx(inp.model_flops / 20e9)


def test_defaults_say_they_are_defaults():
    cal = Calibration.defaults(989e12)
    assert cal.flops_per_s == pytest.approx(989e12 * 0.5) and not cal.measured
    assert all(source.startswith("default") for source in cal.sources.values())
    assert "shipped defaults" in scaling_table(qwen14b_like(calibration=cal), [3], NET, True)[0]
