"""The step-time model's calibration: which measurement gives which rate, its file, and who reads it."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from mmdist.plan.calibration import (
    CALIBRATION_ENV,
    CALIBRATION_FORMAT,
    StepPhases,
    collective_probe,
    fit,
    layer_probe,
    load_calibration,
    pooled,
    save_calibration,
    steady_phases,
)
from mmdist.plan.step_time import GB, Calibration, Interconnect, StepInputs, collective_calls, comm_bytes, predict

ROOT = Path(__file__).resolve().parents[1]
NET = Interconnect("test", intra_node=100 * GB, inter_node=10 * GB, gpus_per_node=8)
TRUE = Calibration(flops_per_s=40e9, latency_s=4e-4, bus_bytes_per_s=0.5e9, zero3_module_s=6e-4, step_fixed_s=0.03,
                   optimizer_param_s=2e-8, overlap=0.0, layer_flops={128: 20e9, 512: 40e9}, layer_width=512,
                   module_call_s=1e-4)


def inputs(width: int = 512, modules: int = 60, micro_batches: int = 2, flops: float = 8e9) -> StepInputs:
    return StepInputs(model_flops=flops, recompute_flops=flops / 2, weight_bytes=int(40e6), trainable_bytes=int(2e5),
                      gradient_bytes=int(2e5), micro_batches=micro_batches, calibration=TRUE,
                      trainable_params=50_000, modules=modules, width=width)


def synthetic_runs(inp: StepInputs, world: int, ckpt: bool,
                   true: Calibration = TRUE) -> tuple[StepPhases, StepPhases, dict]:
    """The phases a machine with the rates of ``true`` would time, as the trainer's phase timer splits them (the
    share ``true.overlap`` of the collectives in forward and backward hidden behind compute)."""
    def link(stage):
        return (collective_calls(inp, stage, world, ckpt) * true.latency_s
                + comm_bytes(inp, stage, world, ckpt) / true.bus_bytes_per_s)

    shown = 1.0 - true.overlap
    passes = 3 if ckpt else 2
    compute = ((inp.model_flops + (inp.recompute_flops if ckpt else 0)) / true.rate(inp.width)
               + true.module_call_s * inp.modules * passes * inp.micro_batches)
    gather = true.latency_s + (world - 1) / world * inp.trainable_bytes / true.bus_bytes_per_s
    update = true.optimizer_param_s * inp.trainable_params / world
    z1_compute = compute + shown * (link(1) - gather)  # ZeRO-1/2 gather the updated weights in the optimizer phase
    zero1 = StepPhases(z1_compute + update + gather + true.step_fixed_s, z1_compute / 2, z1_compute / 2,
                       update + gather)
    z3_compute = (compute + true.zero3_module_s * inp.modules * (3 if ckpt else 2) * inp.micro_batches
                  + shown * link(3))
    zero3 = StepPhases(z3_compute + update + true.step_fixed_s, z3_compute / 2, z3_compute / 2, update)
    ring = (world - 1) / world
    probe = {size: true.latency_s + ring * size * world / true.bus_bytes_per_s for size in (65536, 16 * 2**20)}
    return zero1, zero3, probe


@pytest.mark.parametrize("world,ckpt", [(2, False), (4, True)])
def test_fit_recovers_the_rates_that_made_the_measurements(world, ckpt):
    inp = inputs()
    zero1, zero3, probe = synthetic_runs(inp, world, ckpt)
    cal = fit(inp, world, zero1, zero3, probe, ckpt, "cpu", "test CPU", layers=TRUE.layer_flops)
    for name in ("flops_per_s", "latency_s", "bus_bytes_per_s", "zero3_module_s", "step_fixed_s", "optimizer_param_s",
                 "module_call_s"):
        assert getattr(cal, name) == pytest.approx(getattr(TRUE, name), rel=1e-6), name
    assert cal.overlap == 0.0 and cal.world == world and cal.layer_width == 512 and cal.measured
    assert cal.sources["overlap"].startswith("fixed") and cal.sources["zero3_module_s"].startswith("measured")
    assert cal.sources["module_call_s"].startswith("measured") and "layer probe" in cal.sources["flops_per_s"]
    # and so the model reproduces both runs' step times, and predicts ZeRO-2 and other shapes from the same rates
    fitted = dataclasses.replace(inp, calibration=cal)
    assert predict(fitted, 1, world, NET, ckpt).step_s == pytest.approx(zero1.step_s, rel=1e-6)
    assert predict(fitted, 3, world, NET, ckpt).step_s == pytest.approx(zero3.step_s, rel=1e-6)
    other = inputs(width=128, modules=90, micro_batches=3, flops=3e9)
    z1, z3, _ = synthetic_runs(other, world, ckpt)  # narrower: it runs at TRUE's 128-wide rate
    assert predict(dataclasses.replace(other, calibration=cal), 3, world, NET, ckpt).step_s == pytest.approx(z3.step_s)
    assert predict(dataclasses.replace(other, calibration=cal), 1, world, NET, ckpt).step_s == pytest.approx(z1.step_s)


@pytest.mark.parametrize("world,ckpt", [(2, False), (4, True)])
def test_fit_measures_overlap_where_zero3_adds_less_than_its_collectives(world, ckpt):
    """A machine that hides 40% of its collectives and has no per-module cost (a CPU with more ranks than cores):
    the fit finds the share, says it measured it, and predicts another shape's ZeRO-1 and ZeRO-3 steps."""
    hiding = dataclasses.replace(TRUE, overlap=0.4, zero3_module_s=0.0)
    inp = inputs()
    zero1, zero3, probe = synthetic_runs(inp, world, ckpt, hiding)
    cal = fit(inp, world, zero1, zero3, probe, ckpt, "cpu", "test CPU", layers=TRUE.layer_flops)
    assert cal.overlap == pytest.approx(0.4, rel=1e-6) and cal.zero3_module_s == pytest.approx(0.0, abs=1e-12)
    assert cal.flops_per_s == pytest.approx(TRUE.flops_per_s, rel=1e-6)
    assert cal.sources["overlap"].startswith("measured: ZeRO-3 added")
    # the model overlaps the gather of the updated weights too, which the phases above leave in the optimizer
    # phase: a difference of 40% of one small gather, well under 1% of these steps
    other = inputs(width=128, modules=40, micro_batches=3, flops=12e9)
    z1, z3, _ = synthetic_runs(other, world, ckpt, hiding)
    for stage, measured in ((1, z1), (3, z3)):
        t = predict(dataclasses.replace(other, calibration=cal), stage, world, NET, ckpt)
        assert t.comm_s < t.compute_s  # the regime of the fit: collectives hidden behind longer compute
        assert t.step_s == pytest.approx(measured.step_s, rel=1e-2), stage
    # a machine whose ZeRO-3 added more than its collectives keeps overlap 0 on the CPU (the test above)


def test_a_trainer_faster_than_the_layer_probe_keeps_its_own_rate_and_no_call_cost():
    """A probe layer slower than the model's own (the probe's rates half the truth): the trainer's time has nothing
    left beyond its FLOPs at the probe's rate, so no per-call cost, and the rate is the trainer's own."""
    inp = inputs()
    zero1, zero3, probe = synthetic_runs(inp, 2, False)
    slow_probe = {w: f / 2 for w, f in TRUE.layer_flops.items()}
    cal = fit(inp, 2, zero1, zero3, probe, False, "cpu", "test CPU", layers=slow_probe)
    assert cal.module_call_s == 0.0 and cal.sources["module_call_s"].startswith("measured: 0")
    # the module calls' time (0.024 s beside the FLOPs' 0.2 s) counted as FLOPs'
    assert cal.flops_per_s == pytest.approx(TRUE.flops_per_s * 0.2 / 0.224, rel=1e-6)
    fitted = dataclasses.replace(inp, calibration=cal)
    assert predict(fitted, 1, 2, NET, False).step_s == pytest.approx(zero1.step_s, rel=1e-6)


def test_fit_refuses_runs_the_model_cannot_explain():
    inp = inputs()
    zero1, zero3, probe = synthetic_runs(inp, 2, False)
    with pytest.raises(ValueError, match="no longer than its predicted collectives"):
        fit(inp, 2, dataclasses.replace(zero1, forward_s=0.0, backward_s=0.0), zero3, probe, False, "cpu", "x")
    with pytest.raises(ValueError, match="took no longer"):
        fit(inp, 2, zero1, zero3, {65536: 0.01, 2**24: 0.01}, False, "cpu", "x")


def test_steady_phases_leave_out_start_up_and_take_means():
    records = [{"split": "train", "loss": 1.0, "time": t, "phase_forward_s": f, "phase_backward_s": 2 * f,
                "phase_optimizer_s": 0.01, "work": w}
               for t, f, w in [(0, 9.0, 1), (5, 9.0, 1), (6, 0.3, 2), (7, 0.3, 2), (8.5, 0.5, 4), (9.5, 0.3, 2)]]
    records.insert(2, {"split": "eval", "loss": 2.0, "time": 5.5})
    phases = steady_phases(records, flops_of=lambda r: 1e9 * r["work"])
    # 4 steady steps from t=5 to t=9.5; the mean step, not the median: a step's time follows its batch
    assert phases.step_s == pytest.approx(4.5 / 4) and phases.forward_s == pytest.approx(0.35) and phases.steps == 4
    assert phases.compute_s == pytest.approx(1.05) and phases.flops == pytest.approx(2.5e9)
    assert steady_phases(records).flops == 0.0  # not counted without a counter
    with pytest.raises(ValueError, match="MMDIST_STEP_PHASES=1"):
        steady_phases([{k: v for k, v in r.items() if k != "phase_backward_s"} for r in records])
    with pytest.raises(ValueError, match="need at least"):
        steady_phases(records[:3])


def test_pooled_runs_weigh_every_steady_step_alike():
    a = StepPhases(1.0, 0.4, 0.5, 0.01, steps=10, flops=2e9)
    b = StepPhases(2.0, 0.8, 1.1, 0.03, steps=30, flops=4e9)
    both = pooled([a, b])
    assert both.steps == 40 and both.step_s == pytest.approx(1.75) and both.forward_s == pytest.approx(0.7)
    assert both.compute_s == pytest.approx((10 * 0.9 + 30 * 1.9) / 40) and both.flops == pytest.approx(3.5e9)
    assert pooled([a]) == a
    with pytest.raises(ValueError, match="no steady steps"):
        pooled([])


@pytest.mark.parametrize("world,ckpt", [(2, False), (4, True)])
def test_fit_takes_the_work_of_the_steps_it_timed(world, ckpt):
    """The calibration's steps drew batches 30% heavier than the planned mean: with their own FLOPs the fit finds the
    machine's rate; with the plan's it would be 30% slow (and every prediction 30% high)."""
    planned = inputs()
    heavier = dataclasses.replace(planned, model_flops=1.3 * planned.model_flops,
                                  recompute_flops=1.3 * planned.recompute_flops)
    zero1, zero3, probe = synthetic_runs(heavier, world, ckpt)
    work = heavier.model_flops + (heavier.recompute_flops if ckpt else 0)
    zero1, zero3 = dataclasses.replace(zero1, flops=work), dataclasses.replace(zero3, flops=work)
    cal = fit(planned, world, zero1, zero3, probe, ckpt, "cpu", "test CPU", layers=TRUE.layer_flops)
    for name in ("flops_per_s", "zero3_module_s", "step_fixed_s", "module_call_s"):
        assert getattr(cal, name) == pytest.approx(getattr(TRUE, name), rel=1e-6), name
    assert "the FLOPs of the steps timed" in cal.sources["module_call_s"]
    # counted at the plan's mean step, the steps' extra work would be taken for per-call cost (with the layer probe)
    # or for a slower machine (without it)
    blind = [fit(planned, world, dataclasses.replace(zero1, flops=0.0), dataclasses.replace(zero3, flops=0.0), probe,
                 ckpt, "cpu", "test CPU", layers=layers) for layers in (TRUE.layer_flops, {})]
    assert blind[0].module_call_s > 2 * TRUE.module_call_s and "planned mean step" in blind[0].sources["module_call_s"]
    assert blind[1].flops_per_s < TRUE.flops_per_s / 1.25 and blind[1].sources["flops_per_s"].endswith("mean step")


@pytest.mark.parametrize("recipe", ["tiny_fuse", "tiny_align"])
def test_a_records_flops_are_counted_as_the_plan_counts_a_step(recipe):
    """record_flops (the work of a step the trainer ran, from its metrics.jsonl counts) and step_inputs (the work of
    a planned step) are one count: a record holding the planned micro-batch's counts gives the planned FLOPs."""
    from mmdist.config.run import load_config
    from mmdist.plan.lengths import batch_tokens
    from mmdist.plan.shapes import model_shapes
    from mmdist.plan.speed import record_flops, step_inputs

    world, micro_batches = 2, 3
    cfg = load_config(ROOT / "configs" / f"{recipe}.yaml",
                      ["data.mean_tokens_per_sample=100", "data.packing=true", "train.micro_batch_size=4",
                       f"train.global_batch_size={4 * world * micro_batches}"])
    shapes = model_shapes(cfg)
    planned = batch_tokens(cfg, shapes, shards=[])
    inp = step_inputs(cfg, shapes, world, "cpu", tokens=planned)
    per_step = world * micro_batches  # a record sums every rank's micro-batches of the step
    if recipe == "tiny_fuse":
        record = dict(step_positions=planned.positions, step_tokens=planned.tokens,
                      step_image_tokens=planned.image_tokens, step_images=planned.tower_images,
                      step_samples=planned.samples)
    else:  # stage 1: captions padded to text.max_length, one image each
        samples = cfg.train.micro_batch_size
        record = dict(step_positions=samples * cfg.model.text.max_length, step_tokens=samples * 7,
                      step_images=samples, step_samples=samples)
    record = {k: v * per_step for k, v in record.items()}
    train, recompute = record_flops(shapes, record, world)
    assert inp.micro_batches == micro_batches and train == pytest.approx(inp.model_flops, rel=1e-9)
    assert recompute == pytest.approx(inp.recompute_flops, rel=1e-9)
    # padding costs time: the same tokens in more positions count more
    padded = record_flops(shapes, dict(record, step_positions=2 * record["step_positions"]), world)[0]
    assert padded > train


def test_calibration_file_round_trip_and_bad_files(tmp_path):
    path = save_calibration(dataclasses.replace(TRUE, machine="m", world=2), tmp_path / "cal.json", {"raw": 1})
    back = load_calibration(path)
    assert back.rate(128) == pytest.approx(TRUE.rate(128)) and back.machine == "m" and back.world == 2
    assert json.loads(path.read_text())["measurements"] == {"raw": 1}
    bad = tmp_path / "bad.json"
    assert json.loads(path.read_text())["format"] == CALIBRATION_FORMAT
    for text in ("not json", json.dumps({"format": CALIBRATION_FORMAT, "calibration": {"flops_per_s": 1, "speed": 2}}),
                 json.dumps({"format": CALIBRATION_FORMAT, "calibration": {"flops_per_s": 0}}),
                 json.dumps({"format": CALIBRATION_FORMAT, "calibration": {"flops_per_s": None}}),
                 json.dumps({"format": CALIBRATION_FORMAT, "calibration": {"flops_per_s": "1e12"}}),
                 json.dumps({"other": {}}), json.dumps([1])):
        bad.write_text(text)
        with pytest.raises(ValueError, match=r"bad\.json: not a calibration"):
            load_calibration(bad)
    # a file from before the FLOP count changed (no format): its rates would be off, so it is refused by name
    old = json.loads(path.read_text())
    del old["format"]
    bad.write_text(json.dumps(old))
    with pytest.raises(ValueError, match=r"bad\.json: a calibration of format 1.*mmdist plan --calibrate"):
        load_calibration(bad)
    with pytest.raises(ValueError, match="missing.json"):
        load_calibration(tmp_path / "missing.json")


def test_probes_run_on_a_process_group(tmp_path):
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        times = collective_probe(1, torch.device("cpu"), repeats=2)
        layers = layer_probe(torch.device("cpu"), torch.float32, budget_s=0.01, min_s=0.01)
    finally:
        dist.destroy_process_group()
    assert set(times) == {65536, 16 * 2**20} and all(t > 0 for t in times.values())
    assert 64 in layers and all(f > 0 for f in layers.values())


def test_plan_and_auto_use_the_calibration_file(tmp_path, monkeypatch, capsys):
    from pathlib import Path

    from mmdist.commands.plan import main
    from mmdist.plan.auto import calibration_from_env
    from mmdist.settings import ConfigError

    path = save_calibration(dataclasses.replace(TRUE, machine="the test node", world=2, sources={
        "flops_per_s": "measured: here"}), tmp_path / "cal.json", {})
    fuse = str(Path(__file__).resolve().parents[1] / "configs" / "fuse.yaml")
    assert main(["--config", fuse, "--gpus", "8", "--no-deepspeed", "--calibration", str(path)]) == 0
    assert "rates measured on the test node with 2 rank(s)" in capsys.readouterr().out
    assert main(["--config", fuse, "--gpus", "8", "--no-deepspeed"]) == 0
    assert "rates shipped defaults" in capsys.readouterr().out
    monkeypatch.setenv(CALIBRATION_ENV, str(path))
    assert calibration_from_env().machine == "the test node"
    monkeypatch.setenv(CALIBRATION_ENV, str(tmp_path / "nope.json"))
    with pytest.raises(ConfigError, match="nope.json"):
        calibration_from_env()


@pytest.mark.multiproc
def test_calibrate_command_measures_a_config_on_two_ranks(tmp_path, monkeypatch):
    """`mmdist plan --calibrate` end to end on the tiny fuse recipe: three torchrun launches, a file of rates that
    the plan then reads, each rate marked measured."""
    from pathlib import Path

    import yaml

    from mmdist.commands.plan import main
    from mmdist.data.shards import mixture_samples, shard_pattern, write_shards

    repo = Path(__file__).resolve().parents[1]
    shards = shard_pattern(write_shards(mixture_samples(128), tmp_path / "mix", prefix="train", samples_per_shard=32))
    recipe = yaml.safe_load((repo / "configs" / "tiny_fuse.yaml").read_text())
    recipe["data"].update(train=[{"shards": [shards]}], eval=[], num_workers=0, packing=True)
    recipe["train"].update(global_batch_size=4, micro_batch_size=2)
    recipe["log"].update(progress_bar=False, tensorboard=False)
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(recipe))
    monkeypatch.setenv("PYTHONPATH", str(repo))
    monkeypatch.setenv("MMDIST_CPU_BF16", "0")
    out = tmp_path / "cal.json"
    assert main(["--config", str(config), "--gpus", "2", "--calibrate", str(out), "--calibrate-steps", "5"]) == 0
    cal = load_calibration(out)
    assert cal.world == 2 and cal.flops_per_s > 0 and cal.bus_bytes_per_s > 0 and cal.layer_flops
    assert cal.sources["flops_per_s"].startswith("measured") and cal.sources["zero3_module_s"].startswith("measured")
    raw = json.loads(out.read_text())["measurements"]
    assert raw["zero3"]["step_s"] > 0 and raw["zero1"]["steps"] == 3 and raw["modules"] > 0
    # the FLOPs of the very steps timed (their metrics.jsonl counts), beside the planned mean step's
    assert raw["step_flops"] == raw["zero1"]["flops"] > 0 and raw["planned_step_flops"] > 0
    assert cal.sources["module_call_s"].startswith("measured")


def test_a_failed_calibration_run_names_the_ranks_error(tmp_path):
    """A calibration run that dies says why in the message's first line: the rank's exception, which the launcher's
    own traceback would otherwise push out of the shortened output."""
    import os
    import sys

    from mmdist.commands.calibrate import _launch, rank_error

    script = tmp_path / "dies.py"
    script.write_text("raise FileNotFoundError('shard /data/x-000003.tar does not exist; check data.train')\n")
    with pytest.raises(RuntimeError) as info:
        _launch(1, [str(script)], dict(os.environ), "run at ZeRO-1")
    first = str(info.value).splitlines()[0]
    assert first == ("calibration run at ZeRO-1 failed (exit 1): FileNotFoundError: shard /data/x-000003.tar does not "
                     "exist; check data.train")
    assert sys.executable in str(info.value)  # the command follows, then the output
    assert rank_error("nothing of the kind\n") == ""
