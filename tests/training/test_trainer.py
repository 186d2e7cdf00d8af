"""The one training loop in one process: ZeRO-3 steps with falling loss and the run directory's files, NaN/inf
skipping, precision, evaluation, metrics, the real tiny recipe. Across ranks: test_trainer_ranks.py."""

from __future__ import annotations

import json
import math

import pytest
import torch
import yaml
from helpers.trainer_toy import (
    ToyLoader,
    read_export,
    read_metrics,
    toy_config,
    toy_loader_builder,
    toy_model_builder,
    train_toy,
)

from mmdist.commands.train import main as cli_main
from mmdist.config.run import load_config
from mmdist.training.loop import train
from mmdist.training.step import NonFiniteLossError, TrainState, train_step


def test_zero3_single_process_trains_and_writes_run_dir(tmp_path):
    import torch.distributed as tdist

    run = tmp_path / "run"
    summary = train_toy(toy_config(str(run), train={"max_steps": 8}, checkpoint={"save_every": 4}))
    losses = [h["loss"] for h in summary["history"]]
    assert summary["step"] == 8 and len(losses) == 8
    assert sum(losses[-3:]) / 3 < 0.8 * sum(losses[:3]) / 3  # the loss falls
    assert not tdist.is_initialized()  # the process group is gone after the run
    # run directory: resolved config, metrics, checkpoints, export
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["max_steps"] == 8
    records = [r for r in read_metrics(run) if r["split"] == "train"]
    assert [r["step"] for r in records] == list(range(1, 9))
    for key in ("loss", "lr", "samples_per_s", "tokens_per_s", "mfu", "eta_s", "grad_norm", "mse"):
        assert key in records[-1], key
    assert records[-1]["samples"] == 8 * 4 and records[-1]["mfu"] > 0
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_000008"
    assert sorted(p.name for p in (run / "checkpoints").glob("step_*")) == ["step_000004", "step_000008"]
    weights = read_export(run)
    assert set(weights) == {"norm.weight", "norm.bias", "projector.weight", "projector.bias", "log_scale"}
    manifest = json.loads((run / "export" / "manifest.json").read_text())
    assert manifest["connector"]["type"] == "toy"


def test_lr_schedule_warms_up_and_decays(tmp_path):
    summary = train_toy(
        toy_config(
            str(tmp_path / "run"), train={"max_steps": 8, "lr": 0.1, "lr_scheduler": "cosine", "warmup_ratio": 0.25}
        )
    )
    lrs = [h["lr"] for h in summary["history"]]
    # transformers' cosine schedule: 2 warmup steps (0.05, 0.1), then down towards 0
    assert lrs[0] == pytest.approx(0.05) and lrs[1] == pytest.approx(0.1)
    assert all(a > b for a, b in zip(lrs[1:], lrs[2:])) and lrs[-1] < 0.01


def test_nonfinite_batches_are_skipped_without_update(tmp_path):
    """Two NaN micro-batches are dropped: the result equals a clean run that starts after them."""
    poisoned = train_toy(
        toy_config(str(tmp_path / "nan"), train={"max_steps": 3}), loader=toy_loader_builder(poison_batches=(0, 1))
    )
    clean = train_toy(toy_config(str(tmp_path / "clean"), train={"max_steps": 3}), loader=toy_loader_builder(start=2))
    assert poisoned["nonfinite_total"] == 2 and clean["nonfinite_total"] == 0
    assert [h["loss"] for h in poisoned["history"]] == pytest.approx([h["loss"] for h in clean["history"]], abs=1e-6)
    a, b = read_export(tmp_path / "nan"), read_export(tmp_path / "clean")
    for name in a:
        assert torch.allclose(a[name], b[name], atol=1e-6), name
    skipped = [r for r in read_metrics(tmp_path / "nan") if r.get("nonfinite_loss")]
    assert [r["nonfinite_in_row"] for r in skipped] == [1, 2]


def test_too_many_nonfinite_losses_in_a_row_stop_the_run(tmp_path):
    import torch.distributed as tdist

    cfg = toy_config(str(tmp_path / "run"), train={"max_steps": 3, "max_nonfinite_steps": 3})
    closed = []
    with pytest.raises(NonFiniteLossError, match=r"3 non-finite losses in a row.*train\.max_nonfinite_steps=3"):
        train_toy(cfg, loader=_closing(toy_loader_builder(poison_batches=(2, 3, 4)), closed))
    assert not tdist.is_initialized()  # destroyed on the error path too
    assert closed == ["train"]  # and the data workers stopped


def _closing(builder, closed: list):
    """``builder``'s loaders, each recording its split in ``closed`` when the trainer closes it."""

    def build(cfg, processors, split, rank, world_size):
        loader = builder(cfg, processors, split, rank, world_size)
        loader.close = lambda: closed.append(split)
        return loader

    return build


@pytest.fixture
def toy_engine(tmp_path):
    """A single-process ZeRO-2 engine around the toy model (accumulation 2), released after the test."""
    from mmdist import distributed as dist
    from mmdist.training.engine import build_engine

    cfg = load_config(base=toy_config(str(tmp_path / "run"), engine={"zero_stage": 2}))
    dist.init(backend="gloo")
    bundle = None
    try:
        bundle = build_engine(cfg, world_size=1, model_builder=toy_model_builder)
        bundle.engine.train()
        yield cfg, bundle
    finally:
        if bundle is not None:
            bundle.close()
        dist.shutdown()


def test_train_step_updates_weights_and_refills_a_skipped_micro_batch(toy_engine):
    """One step over 2 micro-batches: a NaN one is dropped before backward and the next batch takes its place;
    the trainable weights change, the frozen ones do not, the state counts the step and the skip."""
    cfg, bundle = toy_engine
    model = bundle.model
    loader = iter(ToyLoader(cfg, rank=0, world_size=1, poison_batches=(1,)))  # micro-batches 0, NaN, 2, 3, ...
    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    skips = []
    state = TrainState()
    record = train_step(bundle.engine, loader, state, max_nonfinite_steps=3, fingerprint=True,
                        on_skip=lambda st, loss: skips.append((st.step, st.nonfinite_in_row, loss)))
    assert len(skips) == 1 and skips[0][:2] == (0, 1) and math.isnan(skips[0][2])
    assert (state.step, state.samples, state.tokens, state.nonfinite_total, state.nonfinite_in_row) == (1, 4, 4, 1, 0)
    assert (
        record["step_samples"] == 4 and math.isfinite(record["loss"]) and "mse" in record and len(record["data"]) == 16
    )
    assert int(next(loader)["index"][0]) == 6  # batches 0 and 2 trained (samples 0-1, 4-5), 1 was skipped: 3 consumed
    params = dict(model.named_parameters())
    assert all(not torch.equal(params[n], v) for n, v in trainable.items())
    assert all(torch.equal(params[n], v) for n, v in frozen.items())
    assert state.state_dict() == {"step": 1, "samples": 4, "tokens": 4, "nonfinite_total": 1}
    resumed = TrainState()
    # a checkpoint without "tokens"
    resumed.load_state_dict({"step": 5, "samples": 20, "nonfinite_total": 2, "rng": {}})
    assert (resumed.step, resumed.samples, resumed.tokens, resumed.nonfinite_total) == (5, 20, 0, 2)


def test_train_step_stops_after_too_many_nonfinite_micro_batches(toy_engine):
    cfg, bundle = toy_engine
    loader = iter(ToyLoader(cfg, rank=0, world_size=1, poison_batches=(0, 1)))
    trainable = {n: p.detach().clone() for n, p in bundle.model.named_parameters() if p.requires_grad}
    state = TrainState(step=3)
    with pytest.raises(NonFiniteLossError, match=r"2 non-finite losses in a row at step 4"):
        train_step(bundle.engine, loader, state, max_nonfinite_steps=2)
    assert (state.step, state.nonfinite_total) == (3, 2)
    params = dict(bundle.model.named_parameters())
    assert all(torch.equal(params[n], v) for n, v in trainable.items())  # no update
    with pytest.raises(RuntimeError, match="ran out after 1 of the 2"):
        train_step(bundle.engine, iter([next(loader)]), TrainState(), max_nonfinite_steps=2)


def test_cli_tolerates_local_rank_and_applies_overrides(tmp_path, monkeypatch):
    """`mmdist train --config FILE overrides --local_rank=0` parses; a bad override is reported, exit code 2."""
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(toy_config(str(tmp_path / "run"))))
    seen = {}
    monkeypatch.setattr(
        "mmdist.training.loop.train",
        lambda cfg: seen.setdefault("cfg", cfg) and {"history": [], "step": 0, "run_dir": cfg.run_dir},
    )
    assert cli_main(["--config", str(path), "train.max_steps=3", "--local_rank=0"]) == 0
    assert seen["cfg"].train.max_steps == 3
    assert cli_main(["--config", str(path), "train.max_stepz=3"]) == 2


@pytest.mark.parametrize("zero_stage", [2, 3])
def test_bf16_training_exports_fp32_master_weights(tmp_path, zero_stage):
    """bf16 compute (DeepSpeed's CPU accelerator supports it) follows the fp32 run; the export holds fp32 masters."""
    fp32 = train_toy(toy_config(str(tmp_path / "fp32"), train={"max_steps": 4}, engine={"zero_stage": zero_stage}))
    bf16 = train_toy(
        toy_config(
            str(tmp_path / "bf16"), train={"max_steps": 4}, engine={"zero_stage": zero_stage, "precision": "bf16"}
        )
    )
    assert [h["loss"] for h in bf16["history"]] == pytest.approx([h["loss"] for h in fp32["history"]], abs=0.05)
    w16, w32 = read_export(tmp_path / "bf16"), read_export(tmp_path / "fp32")
    for name in w32:
        assert w16[name].dtype == torch.float32, name
        # Adam's normalised steps can flip on a near-zero bf16 gradient, so compare on average
        assert float((w16[name] - w32[name]).abs().mean()) < 0.02, name
    # fp32 masters are not bf16-rounded: some value is not representable in bf16
    weight = w16["projector.weight"]
    assert not torch.equal(weight, weight.to(torch.bfloat16).float())


@pytest.mark.gpu
@pytest.mark.skipif(
    not torch.cuda.is_available(), reason="fp16 needs a CUDA GPU (DeepSpeed's CPU accelerator has no fp16)"
)
def test_fp16_with_loss_scaling_on_gpu(tmp_path, monkeypatch):
    monkeypatch.setenv("DS_ACCELERATOR", "cuda")
    summary = train_toy(
        toy_config(
            str(tmp_path / "run"),
            train={"max_steps": 6},
            engine={"zero_stage": 2, "precision": "fp16", "backend": "nccl"},
        )
    )
    losses = [h["loss"] for h in summary["history"]]
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0]


def test_periodic_evaluation_on_held_out_data(tmp_path):
    run = tmp_path / "run"
    cfg = toy_config(
        str(run),
        train={"max_steps": 4, "eval_every": 2, "eval_batches": 3},
        data={"train": [{"shards": ["unused.tar"]}], "eval": [{"shards": ["held_out.tar"]}], "num_workers": 0},
    )
    closed = []
    summary = train_toy(cfg, loader=_closing(toy_loader_builder(), closed))
    assert sorted(closed) == ["eval", "train"]  # the run's end stops every loader's data workers
    evals = [r for r in read_metrics(run) if r["split"] == "eval"]
    assert [r["step"] for r in evals] == [2, 4]  # every 2 steps, the last one at the end
    assert all(r["batches"] == 3 and math.isfinite(r["loss"]) for r in evals)
    assert summary["eval"]["loss"] == pytest.approx(evals[-1]["loss"])


# ---------------------------------------------------------------------------
# metrics helpers


def test_flop_estimate_parameter_table_and_throughput(monkeypatch):
    from helpers.trainer_toy import ToyModel

    from mmdist.models.freeze import param_table
    from mmdist.training import metrics

    model = ToyModel()
    counts = metrics.count_parameters(model)
    frozen = sum(p.numel() for p in model.backbone.parameters())
    assert counts["frozen"] == frozen and counts["trainable"] == counts["total"] - frozen
    # the model's own count, per row: the frozen backbone forward only (2 per weight), the projector over the
    # trainable norm with both gradients (6); biases, norms and the scale do no matmul
    backbone = sum(m.weight.numel() for m in model.backbone if isinstance(m, torch.nn.Linear))
    assert model.flop_count().per_token == 2 * backbone + 6 * model.projector.weight.numel()
    table = param_table(model)  # the table the trainer prints
    rows = {line.split()[0]: line.split()[1:] for line in table.splitlines()[2:]}
    assert rows["backbone"][:2] == [f"{frozen:,}", "0"] and rows["projector"][0] == rows["projector"][1] == "68"
    assert rows["total"][:2] == [f"{counts['total']:,}", f"{counts['trainable']:,}"]

    clock = iter([0.0, 2.0, 4.0])
    monkeypatch.setattr(metrics.time, "perf_counter", lambda: next(clock))
    tp = metrics.Throughput(flops_per_token=100.0, peak_flops_total=1000.0, total_steps=10)
    tp.update(step=1, samples=8, tokens=40)
    out = tp.update(step=2, samples=8, tokens=40)
    assert out["samples_per_s"] == pytest.approx(4.0) and out["tokens_per_s"] == pytest.approx(20.0)
    assert out["mfu"] == pytest.approx(20.0 * 100.0 / 1000.0)
    assert out["eta_s"] == pytest.approx(8 * 2.0)  # 8 steps left at 2 s per step


def test_a_start_probe_that_ran_slow_is_repeated_by_the_trainer(tmp_path, monkeypatch, capsys):
    """The CPU's peak comes from a matmul probe at start; one that ran during a slow spell made the demo's bar read
    an MFU over 100%. When steps outrun it, the trainer probes again (longer) and keeps the higher peak."""
    from mmdist.training import loop

    monkeypatch.setattr(loop, "peak_flops", lambda device, dtype: (1.0, f"measured matmul probe ({dtype} on the CPU)"))
    probes = []
    monkeypatch.setattr(loop, "matmul_probe", lambda dtype, device, budget_s: probes.append(budget_s) or 1e15)
    run = tmp_path / "run"
    train_toy(toy_config(str(run), train={"max_steps": 6}, log={"peak_flops": None}))  # None: probe the device
    assert probes == [1.0]  # once: the new peak holds
    out = capsys.readouterr().out
    assert "steps ran above the fp32 peak of 1e-12 TFLOP/s per device; measured again: 1e+03" in out
    records = [r for r in read_metrics(run) if r["split"] == "train" and "mfu" in r]
    assert records and all(0 < r["mfu"] < 1e-6 for r in records)

    def no_memory(dtype, device, budget_s):  # a probe that cannot run mid-run does not end the run
        probes.append(budget_s)
        raise RuntimeError("out of memory")

    probes.clear()
    monkeypatch.setattr(loop, "matmul_probe", no_memory)
    summary = train_toy(toy_config(str(tmp_path / "run2"), train={"max_steps": 6}, log={"peak_flops": None}))
    assert summary["step"] == 6 and probes == [1.0, 1.0]  # twice a run at most
    assert "measuring the fp32 peak again failed (out of memory); it stays 1e-12" in capsys.readouterr().out


# ---------------------------------------------------------------------------
# the real tiny recipe: models from configs/tiny_fuse.yaml, WebDataset demo shards, 2 loader workers


@pytest.mark.slow
def test_real_tiny_fuse_zero3_resume_equals_uninterrupted(tmp_path):
    pytest.importorskip("sklearn")
    from mmdist.data.shards import shard_pattern, write_demo_shards

    shards = write_demo_shards(tmp_path / "demo", image_size=16, samples_per_shard=50, limit=200)
    recipe = yaml.safe_load(
        open(__import__("pathlib").Path(__file__).resolve().parents[2] / "configs" / "tiny_fuse.yaml")
    )
    recipe["data"].update({"train": [{"shards": [shard_pattern(shards["train"])]}], "eval": [], "num_workers": 2})
    recipe["train"].update({"max_steps": 4, "eval_every": 0})
    recipe["engine"]["zero_stage"] = 3
    recipe["checkpoint"]["save_every"] = 2
    recipe["log"].update(
        {"progress_bar": False, "tensorboard": False, "param_table": False, "peak_flops": 1e9, "data_fingerprint": True}
    )

    def run(name, stop_after=None):
        recipe["run_dir"] = str(tmp_path / name)
        return train(load_config(base=recipe), stop_after=stop_after)

    straight = run("straight")
    first, second = run("split", stop_after=2), run("split")
    assert second["resumed_from"].endswith("step_000002")
    resumed = first["history"] + second["history"]
    assert [h["data"] for h in resumed] == [h["data"] for h in straight["history"]]  # same batches, workers included
    assert [h["loss"] for h in resumed] == pytest.approx([h["loss"] for h in straight["history"]], abs=1e-5)
    a, b = read_export(tmp_path / "split"), read_export(tmp_path / "straight")
    assert set(a) == set(b) and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    assert all(v.numel() > 0 for v in a.values())  # gathered under ZeRO-3


@pytest.mark.slow
def test_step_gradient_is_the_mean_over_every_answer_token_however_the_batch_is_cut(tmp_path):
    """One step on the same 6 samples as 6 x 1, 3 x 2 and 1 x 6 micro-batches: the same gradient (norm) and logged loss,
    because each micro-batch's loss is weighted by its share of the step's answer tokens. A plain mean of micro-batch
    means depends on the cut here (the answers have 3 to 5 tokens): unweighted, the norms differ by 2%."""
    pytest.importorskip("sklearn")
    from helpers.trainer_toy import recording_loader_builder

    from mmdist.data.shards import shard_pattern, write_demo_shards

    shards = write_demo_shards(tmp_path / "demo", image_size=16, samples_per_shard=12, limit=12)
    recipe = yaml.safe_load(
        open(__import__("pathlib").Path(__file__).resolve().parents[2] / "configs" / "tiny_fuse.yaml")
    )
    recipe["data"].update({"train": [{"shards": [shard_pattern(shards["train"])]}], "eval": [], "num_workers": 0})
    recipe["log"].update({"progress_bar": False, "tensorboard": False, "param_table": False, "peak_flops": 1e9})
    recipe["checkpoint"].update({"export": False, "save_every": 0})
    runs = {}
    for micro in (1, 2, 6):
        recipe["train"].update({"max_steps": 1, "global_batch_size": 6, "micro_batch_size": micro, "eval_every": 0})
        recipe["run_dir"] = str(tmp_path / f"micro{micro}")
        (tmp_path / f"keys{micro}").mkdir()
        summary = train(
            load_config(base=recipe), loader_builder=recording_loader_builder(str(tmp_path / f"keys{micro}"))
        )
        keys = [
            k
            for line in (tmp_path / f"keys{micro}" / "keys.jsonl").read_text().splitlines()
            for k in json.loads(line)["keys"]
        ]
        step = [r for r in read_metrics(tmp_path / f"micro{micro}") if r.get("step") == 1 and "grad_norm" in r]
        runs[micro] = (dict(summary["history"][0], grad_norm=step[0]["grad_norm"]), sorted(keys))
    assert runs[1][1] == runs[2][1] == runs[6][1]  # the same samples in the step
    norms = [runs[m][0]["grad_norm"] for m in (1, 2, 6)]
    assert norms == pytest.approx([norms[0]] * 3, rel=1e-4)
    losses = [runs[m][0]["loss"] for m in (1, 2, 6)]
    assert losses == pytest.approx([losses[0]] * 3, rel=1e-5)  # the mean over the step's answer tokens


def test_zero3_setting_does_not_outlive_the_run(tmp_path):
    from transformers.integrations import is_deepspeed_zero3_enabled

    train_toy(toy_config(str(tmp_path / "run"), train={"max_steps": 1}))
    assert not is_deepspeed_zero3_enabled()  # a later from_pretrained in this process is not partitioned


@pytest.mark.parametrize(
    "engine",
    [
        {"zero_stage": 2, "offload_optimizer": True},
        {"zero_stage": 3, "offload_optimizer": True, "offload_params": True},
    ],
    ids=["zero2-offload", "zero3-offload"],
)
def test_cpu_offload_matches_no_offload(tmp_path, engine):
    plain = train_toy(
        toy_config(str(tmp_path / "plain"), train={"max_steps": 4}, engine={"zero_stage": engine["zero_stage"]})
    )
    offloaded = train_toy(toy_config(str(tmp_path / "offload"), train={"max_steps": 4}, engine=engine))
    assert [h["loss"] for h in offloaded["history"]] == pytest.approx([h["loss"] for h in plain["history"]], abs=1e-5)
    a, b = read_export(tmp_path / "offload"), read_export(tmp_path / "plain")
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in b)


@pytest.mark.slow
def test_real_tiny_fuse_with_lora_under_zero3_exports_merged_weights(tmp_path):
    pytest.importorskip("sklearn")
    from mmdist.data.shards import shard_pattern, write_demo_shards

    shards = write_demo_shards(tmp_path / "demo", image_size=16, samples_per_shard=50, limit=100)
    recipe = yaml.safe_load(
        open(__import__("pathlib").Path(__file__).resolve().parents[2] / "configs" / "tiny_fuse.yaml")
    )
    recipe["run_dir"] = str(tmp_path / "run")
    recipe["data"].update({"train": [{"shards": [shard_pattern(shards["train"])]}], "eval": [], "num_workers": 0})
    recipe["train"].update({"max_steps": 2, "eval_every": 0})
    recipe["model"]["llm"]["lora"] = {"enabled": True, "r": 4, "alpha": 8}
    recipe["log"].update({"progress_bar": False, "tensorboard": False, "param_table": False, "peak_flops": 1e9})
    summary = train(load_config(base=recipe))
    assert summary["step"] == 2
    weights = read_export(tmp_path / "run")
    merged = [k for k in weights if k.startswith("llm.")]
    assert merged and not any("lora_" in k for k in weights)  # LoRA merged into plain LLM weights (W + BA)
    assert all(weights[k].ndim == 2 and weights[k].numel() > 0 for k in merged)  # gathered, not ZeRO-3 partitions
    assert any(k.startswith("projector.") for k in weights)


def test_tensorboard_events_and_sample_budget(tmp_path):
    """train.max_samples sets the budget (10 samples / 4 per step -> 3 steps); TensorBoard gets the same scalars."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    cfg = toy_config(str(run), train={"max_steps": None, "max_samples": 10}, log={"tensorboard": True})
    summary = train_toy(cfg)
    assert summary["step"] == 3 and summary["samples"] == 12
    events = EventAccumulator(str(run / "tb"))
    events.Reload()
    losses = [e.value for e in events.Scalars("train/loss")]
    assert losses == pytest.approx([h["loss"] for h in summary["history"]], rel=1e-5)
    assert "train/mfu" in events.Tags()["scalars"]


def test_packed_rows_count_their_samples_and_mfu_uses_the_compute_dtype():
    from helpers.configs import tiny_run_config

    from mmdist.models.contract import count_samples
    from mmdist.training.run_setup import compute_dtype

    packed = {"input_ids": torch.zeros(2, 6, dtype=torch.long),
              "sequence_ids": torch.tensor([[0, 0, 1, 1, 2, -1], [0, 0, 0, 1, -1, -1]])}
    assert count_samples(packed, "input_ids") == 5  # 3 samples in row 0, 2 in row 1
    assert count_samples({"input_ids": torch.zeros(4, 6, dtype=torch.long)}, "input_ids") == 4
    cfg = tiny_run_config("fuse", "engine.precision=fp32", "model.llm.dtype=bf16")
    assert compute_dtype(cfg) == "bf16"  # fp32 engine, bf16 frozen LLM: the LLM's FLOPs dominate
    # a frozen fp32 LLM is refused: DeepSpeed would cast it
    cfg = tiny_run_config("fuse", "engine.precision=bf16", "model.llm.dtype=auto")
    assert compute_dtype(cfg) == "bf16"


def test_resumed_run_does_not_log_steps_twice(tmp_path):
    import json

    from mmdist.training.metrics import drop_records_after

    path = tmp_path / "metrics.jsonl"
    records = [{"step": s, "split": "train", "loss": 1.0 / s} for s in range(1, 9)] + [
        {"step": 6, "split": "eval", "loss": 0.5}
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + "not json\n")
    assert drop_records_after(path, 6) == 2  # steps 7 and 8 were logged after the checkpoint of step 6
    kept = [json.loads(line) for line in path.read_text().splitlines() if line.startswith("{")]
    assert [r["step"] for r in kept] == [1, 2, 3, 4, 5, 6, 6]
    assert path.read_text().endswith("not json\n")  # unreadable lines are kept, not lost
    assert drop_records_after(tmp_path / "absent.jsonl", 3) == 0
