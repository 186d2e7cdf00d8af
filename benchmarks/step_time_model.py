"""The step-time model against the trainer: calibrate on one model shape, predict another's ZeRO-1/2/3 step times.

    python benchmarks/step_time_model.py [--worlds 2 4] [--steps 12] [--out runs/bench-step-time]

For each world size (gloo ranks on this machine, DS_ACCELERATOR=cpu, fp32 throughout:
MMDIST_CPU_BF16=0 so that every stage computes alike), on configs/tiny_fuse.yaml with a
random-weight llama LLM and the skewed mixture of mmdist.data.shards.mixture_samples
(text only, one image, tiled, three images; packed rows, the global order):

1. ``mmdist plan --calibrate`` (mmdist/commands/calibrate.py) on the calibration shape
   (:data:`CALIBRATE`): the all-gather probe and a few trainer steps at ZeRO-1 and ZeRO-3;
2. the trainer on the other shape (:data:`PREDICT`: other hidden size, depth and micro-batch)
   at ZeRO-1, 2 and 3, ``--steps`` steps each: the mean step time after the first two (the
   mixture's steps differ in work; the plan predicts the mean step);
3. the planner's prediction for that shape from the calibration (mmdist.plan.speed.step_inputs
   with the shards' statistics, mmdist.plan.step_time.predict), printed beside the measurement
   with the error, and whether the stages rank alike. Beside it, the same model's prediction
   for the work of the very steps measured (their FLOPs from metrics.jsonl's counts,
   mmdist.plan.speed.record_flops): the difference between the two is how far the steps drawn
   lie from the shards' mean, not an error of the time model.

Each stage runs ``--repeats`` times (default 2 on the CPU), in rounds (ZeRO-1, 2, 3, then 3, 2,
1), so that a drift of the machine's speed, or whatever a run leaves behind for the next, hits
every stage alike; a stage's measurement is the median of its runs. The calibration's runs
repeat as often (``mmdist plan --calibrate-repeats``). How far the runs of one setting lie apart
shows how far this machine's measurement moves by itself: two settings whose measured times lie
closer than that spread allows (:func:`tie_band`: Student's t at 95% on the runs' pooled spread,
at least :data:`TIE_BAND`) are a tie, which either order of the predictions matches.

The machine's load changes the figures (4 ranks on 2 cores share them): run it on a quiet machine.

``--gpu``: the same on this node's GPUs (default one rank), bf16 and NCCL, at larger shapes
(:data:`CALIBRATE_GPU`, :data:`PREDICT_GPU`); the calibration file it writes
(``calibration-N.json``) is the one to give ``mmdist plan --calibration`` for that node.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

#: (hidden, intermediate, layers, heads, kv heads, micro-batch): the calibration shape and the predicted one
CALIBRATE = dict(hidden=192, intermediate=512, layers=4, heads=4, kv=2, micro=4)
PREDICT = dict(hidden=320, intermediate=864, layers=6, heads=4, kv=2, micro=6)
#: On a GPU: shapes whose steps are real work for one device (the model's count: about 4 and 33 TFLOP a step)
CALIBRATE_GPU = dict(hidden=1024, intermediate=2816, layers=8, heads=16, kv=8, micro=32)
PREDICT_GPU = dict(hidden=2048, intermediate=5632, layers=12, heads=16, kv=8, micro=48)
TIE_BAND = 0.05
#: Student's t, two-sided 95% (the 97.5% point), for 1 to 10 degrees of freedom; beyond, 10's
T_975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228)
TARGET = 0.25


def recipe(shape: dict, world: int, shards: str, run_dir: Path, gpu: bool = False) -> dict:
    import yaml

    r = yaml.safe_load((REPO / "configs" / "tiny_fuse.yaml").read_text())
    r["model"]["llm"]["init_config"].update(hidden_size=shape["hidden"], intermediate_size=shape["intermediate"],
                                            num_hidden_layers=shape["layers"], num_attention_heads=shape["heads"],
                                            num_key_value_heads=shape["kv"])
    r["model"]["llm"]["gradient_checkpointing"] = False
    r["data"].update(train=[{"shards": [shards]}], eval=[], num_workers=0, max_len=256, order="global",
                     packing=True, image_tiling={"enabled": True}, shuffle_buffer=64)
    r["train"].update(global_batch_size=2 * shape["micro"] * world, micro_batch_size=shape["micro"])
    r["engine"].update(precision="bf16" if gpu else "fp32", zero_stage=1, backend="nccl" if gpu else "gloo")
    if gpu:
        for part in ("llm", "vision", "text"):
            r["model"][part]["dtype"] = "bf16"
    r["log"].update(progress_bar=False, tensorboard=False, param_table=False)
    r["run_dir"] = str(run_dir)
    return r


def tie_band(runs_by_setting: list[list[float]]) -> tuple[float, int]:
    """(how far apart, as a fraction, two settings' mean step times may lie from this machine's run-to-run spread
    alone; the degrees of freedom it rests on). The runs' spread is pooled over the settings (each run's log time
    less its setting's mean log time: the machine moves every setting's runs alike, as a factor), and the band is
    the 95% two-sided interval of a difference between two means of that many runs. No repeats: :data:`TIE_BAND`."""
    squares, df = 0.0, 0
    for runs in runs_by_setting:
        logs = [math.log(x) for x in runs]
        mean = statistics.fmean(logs)
        squares += sum((x - mean) ** 2 for x in logs)
        df += len(logs) - 1
    if df == 0:
        return TIE_BAND, 0
    n = min(len(runs) for runs in runs_by_setting)
    t = T_975[min(df, len(T_975)) - 1]
    return max(TIE_BAND, math.expm1(t * math.sqrt(squares / df) * math.sqrt(2 / n))), df


def _train_flops(shapes, world: int, record: dict) -> float:
    from mmdist.plan.speed import record_flops

    return record_flops(shapes, record, world)[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--worlds", type=int, nargs="+", default=None, help="rank counts (default 2 4; --gpu: 1)")
    parser.add_argument("--gpu", action="store_true", help="on this node's GPUs: bf16, NCCL, the larger shapes")
    parser.add_argument("--calibration", default=None, help="a calibration file of one world size written earlier "
                                                           "by this benchmark: predict only")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=None,
                        help="runs of each stage, in rounds (default 2; --gpu: 1, device time is short)")
    parser.add_argument("--out", default="runs/bench-step-time")
    args = parser.parse_args()
    worlds = args.worlds or ([1] if args.gpu else [2, 4])
    repeats_per_stage = args.repeats or (1 if args.gpu else 2)
    calibrate_shape, predict_shape = (CALIBRATE_GPU, PREDICT_GPU) if args.gpu else (CALIBRATE, PREDICT)
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    if not args.gpu:
        os.environ.update(MMDIST_CPU_BF16="0", DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    import yaml

    from mmdist.commands.calibrate import _launch, calibrate, leg_overrides
    from mmdist.config.run import load_config
    from mmdist.data.shards import mixture_samples, shard_pattern, write_shards
    from mmdist.plan.calibration import load_calibration, machine_label, steady_phases
    from mmdist.plan.lengths import batch_tokens
    from mmdist.plan.shapes import model_shapes
    from mmdist.plan.speed import step_inputs
    from mmdist.plan.step_time import interconnect_for, predict

    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    summary = write_shards(mixture_samples(1024), out / "mixture", prefix="train", samples_per_shard=64,
                           overwrite=True)
    shards = shard_pattern(summary)
    started = time.time()
    rows = []
    runs: dict[tuple[int, int], list[float]] = {}  # (world, stage) -> each run's step time
    for world in worlds:
        cal_file = out / f"calibration-{world}.yaml"
        cal_file.write_text(yaml.safe_dump(recipe(calibrate_shape, world, shards, out / "cal-run", args.gpu)))
        if args.calibration:
            cal = load_calibration(args.calibration)
            print(f"[{world} ranks] calibration from {args.calibration}: {cal}")
        else:
            cal, raw = calibrate(str(cal_file), [], world, out / f"calibration-{world}.json", steps=args.steps,
                                 repeats=repeats_per_stage)
            print(f"[{world} ranks] calibrated: {json.dumps({k: v for k, v in raw.items() if k != 'overrides'})}")
        pred_file = out / f"predict-{world}.yaml"
        pred_file.write_text(yaml.safe_dump(recipe(predict_shape, world, shards, out / "pred-run", args.gpu)))
        cfg = load_config(str(pred_file))
        shapes = model_shapes(cfg)
        machine = machine_label("cuda") if args.gpu else "cpu"
        inputs = step_inputs(cfg, shapes, world, machine, tokens=batch_tokens(cfg, shapes), calibration=cal)
        link = interconnect_for(machine)
        flops_of = functools.partial(_train_flops, shapes, world)
        fwd_bwd: dict[int, list[float]] = {}
        drawn: dict[int, list[float]] = {}  # per stage: the FLOPs per rank of a mean step of each run
        for round_ in range(repeats_per_stage):
            for stage in (1, 2, 3) if round_ % 2 == 0 else (3, 2, 1):  # every other round reversed: no stage always
                # runs right after another, or first
                run_dir = out / f"predict-{world}-zero{stage}-run{round_ + 1}"
                _launch(world, ["-m", "mmdist", "train", "--config", str(pred_file),
                                *leg_overrides(stage, args.steps, run_dir)],
                        dict(os.environ, MMDIST_STEP_PHASES="1"), f"ZeRO-{stage} on {world} ranks")
                records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
                measured = steady_phases(records, flops_of=flops_of)
                runs.setdefault((world, stage), []).append(measured.step_s)
                fwd_bwd.setdefault(stage, []).append(measured.compute_s)
                drawn.setdefault(stage, []).append(measured.flops)
                print(f"[{world} ranks] ZeRO-{stage} run {round_ + 1}: measured {measured.step_s:.3f} s", flush=True)
        for stage in (1, 2, 3):
            t = predict(inputs, stage, world, link, checkpointing=False)
            own = predict(dataclasses.replace(inputs, model_flops=statistics.fmean(drawn[stage])), stage, world, link,
                          checkpointing=False)
            rows.append(dict(world=world, stage=stage, predicted=t.step_s, predicted_own=own.step_s,
                             planned_flops=inputs.model_flops, drawn_flops=drawn[stage],
                             measured=statistics.median(runs[world, stage]), runs=runs[world, stage],
                             compute=t.compute_s, comm=t.comm_s, zero3=t.zero3_s, fixed=t.fixed_s,
                             measured_fwd_bwd=statistics.median(fwd_bwd[stage])))
    label = machine_label("cuda") if args.gpu else f"{machine_label()}; torch threads 1 per rank"
    print(f"\n{label}; {time.time() - started:.0f} s")
    print(f"calibrated on llama {calibrate_shape}; predicted llama {predict_shape}; "
          f"{'bf16, nccl' if args.gpu else 'fp32, gloo'}, {args.steps} steps a run, {repeats_per_stage} run(s) a stage")
    print("predicted: from the shards' statistics (what `auto` plans with); own: for the FLOPs of the steps measured")
    print(f"{'ranks':>5} {'stage':>6} {'predicted s':>12} {'measured s':>11} {'error':>7} {'own s':>7} {'error':>7}  "
          f"{'compute':>8} {'comm':>7} {'zero3':>7}")
    worst = worst_own = 0.0
    ranked = True
    bands = []
    for world in worlds:
        mine = [r for r in rows if r["world"] == world]
        spread = max(max(r["runs"]) / min(r["runs"]) - 1 for r in mine)
        band, df = tie_band([r["runs"] for r in mine])
        bands.append(band)
        how = (f"by their pooled spread ({df} degrees of freedom, Student's t at 95%)" if df else
               "one run a setting, no spread to go by: the floor")
        print(f"{world:>5} runs of one setting lie up to {spread:.1%} apart; {how}: measured times within {band:.1%} "
              "are a tie")
        for r in mine:
            err = r["predicted"] / r["measured"] - 1
            own_err = r["predicted_own"] / r["measured"] - 1
            worst = max(worst, abs(err))
            worst_own = max(worst_own, abs(own_err))
            each = " (runs: " + ", ".join(f"{x:.3f}" for x in r["runs"]) + ")" if len(r["runs"]) > 1 else ""
            print(f"{world:>5} {'ZeRO-' + str(r['stage']):>6} {r['predicted']:>12.3f} {r['measured']:>11.3f} "
                  f"{err:>+7.1%} {r['predicted_own']:>7.3f} {own_err:>+7.1%}  {r['compute']:>8.3f} {r['comm']:>7.3f} "
                  f"{r['zero3']:>7.3f}{each}")
        planned, drawn_mean = mine[0]["planned_flops"], statistics.fmean(mine[0]["drawn_flops"])
        print(f"      the steps measured did {drawn_mean / planned:.1%} of the planned mean step's FLOPs")
        for a in mine:
            for b in mine:
                apart = b["measured"] > a["measured"] * (1 + band)
                if apart and not b["predicted"] > a["predicted"]:
                    ranked = False
                    print(f"  misranked: ZeRO-{a['stage']} measured faster than ZeRO-{b['stage']}, predicted not")
    print(f"for the steps' own FLOPs: worst error {worst_own:.1%}")
    print(f"worst error {worst:.1%} (target {TARGET:.0%}): {'PASS' if worst <= TARGET else 'FAIL'}; "
          f"stages ranked {'right' if ranked else 'WRONG'} (ties: within {', '.join(f'{b:.1%}' for b in bands)})")
    (out / "results.json").write_text(json.dumps({"rows": rows, "repeats": repeats_per_stage}, indent=2))


if __name__ == "__main__":
    main()
