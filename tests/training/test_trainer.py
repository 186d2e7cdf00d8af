"""The one training loop: ZeRO-3 steps with falling loss and the run directory's files, NaN/inf skipping,
2-rank vs single-process equivalence, and resume equal to an uninterrupted run (data included)."""

from __future__ import annotations

import json
import math

import pytest
import torch
import yaml
from helpers.trainer_toy import ToyLoader, launch, toy_config, toy_loader_builder, toy_model_builder
from safetensors.torch import load_file

from mmdist.commands.train import main as cli_main
from mmdist.config.run import load_config
from mmdist.training.loop import train
from mmdist.training.step import NonFiniteLossError, TrainState, train_step


def _train(cfg_dict: dict, **kwargs) -> dict:
    return train(load_config(base=cfg_dict), model_builder=toy_model_builder,
                 loader_builder=kwargs.pop("loader", toy_loader_builder()), **kwargs)


def _export(run_dir) -> dict:
    return load_file(str(run_dir / "export" / "model.safetensors"))


def _metrics(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_zero3_single_process_trains_and_writes_run_dir(tmp_path):
    import torch.distributed as tdist

    run = tmp_path / "run"
    summary = _train(toy_config(str(run), train={"max_steps": 8}, checkpoint={"save_every": 4}))
    losses = [h["loss"] for h in summary["history"]]
    assert summary["step"] == 8 and len(losses) == 8
    assert sum(losses[-3:]) / 3 < 0.8 * sum(losses[:3]) / 3  # the loss falls
    assert not tdist.is_initialized()  # the process group is gone after the run
    # run directory: resolved config, metrics, checkpoints, export
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["max_steps"] == 8
    records = [r for r in _metrics(run) if r["split"] == "train"]
    assert [r["step"] for r in records] == list(range(1, 9))
    for key in ("loss", "lr", "samples_per_s", "tokens_per_s", "mfu", "eta_s", "grad_norm", "mse"):
        assert key in records[-1], key
    assert records[-1]["samples"] == 8 * 4 and records[-1]["mfu"] > 0
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_000008"
    assert sorted(p.name for p in (run / "checkpoints").glob("step_*")) == ["step_000004", "step_000008"]
    weights = _export(run)
    assert set(weights) == {"norm.weight", "norm.bias", "projector.weight", "projector.bias", "log_scale"}
    manifest = json.loads((run / "export" / "manifest.json").read_text())
    assert manifest["connector"]["type"] == "toy"


def test_lr_schedule_warms_up_and_decays(tmp_path):
    summary = _train(
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
    poisoned = _train(
        toy_config(str(tmp_path / "nan"), train={"max_steps": 3}), loader=toy_loader_builder(poison_batches=(0, 1))
    )
    clean = _train(toy_config(str(tmp_path / "clean"), train={"max_steps": 3}), loader=toy_loader_builder(start=2))
    assert poisoned["nonfinite_total"] == 2 and clean["nonfinite_total"] == 0
    assert [h["loss"] for h in poisoned["history"]] == pytest.approx([h["loss"] for h in clean["history"]], abs=1e-6)
    a, b = _export(tmp_path / "nan"), _export(tmp_path / "clean")
    for name in a:
        assert torch.allclose(a[name], b[name], atol=1e-6), name
    skipped = [r for r in _metrics(tmp_path / "nan") if r.get("nonfinite_loss")]
    assert [r["nonfinite_in_row"] for r in skipped] == [1, 2]


def test_too_many_nonfinite_losses_in_a_row_stop_the_run(tmp_path):
    import torch.distributed as tdist

    cfg = toy_config(str(tmp_path / "run"), train={"max_steps": 3, "max_nonfinite_steps": 3})
    with pytest.raises(NonFiniteLossError, match=r"3 non-finite losses in a row.*train\.max_nonfinite_steps=3"):
        _train(cfg, loader=toy_loader_builder(poison_batches=(2, 3, 4)))
    assert not tdist.is_initialized()  # destroyed on the error path too


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


# ---------------------------------------------------------------------------
# 2 ranks (torchrun)


def _long_config(run_dir, **extra):
    return toy_config(str(run_dir), train={"max_steps": 12, "lr_scheduler": "cosine", "warmup_ratio": 0.25},
                      checkpoint={"save_every": 6}, **extra)


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory):
    """An uninterrupted 2-rank ZeRO-3 run of 12 steps (shared by the equivalence and resume tests)."""
    work = tmp_path_factory.mktemp("two_rank")
    summary = launch(work, {"config": _long_config(work / "run")}, nproc=2)
    return work / "run", summary


@pytest.mark.multiproc
def test_two_rank_zero3_equals_single_process(two_rank_run, tmp_path):
    run2, summary2 = two_rank_run
    summary1 = _train(_long_config(tmp_path / "run1"))  # 1 rank, micro 2 x accumulation 2 = the same global batch
    assert [h["loss"] for h in summary2["history"]] == pytest.approx([h["loss"] for h in summary1["history"]], abs=1e-5)
    w1, w2 = _export(tmp_path / "run1"), _export(run2)
    assert set(w1) == set(w2)
    for name in w1:
        assert torch.allclose(w1[name], w2[name], atol=1e-5), name
    assert summary2["history"][-1]["loss"] < summary2["history"][0]["loss"]


@pytest.mark.multiproc
def test_resume_at_step_6_equals_uninterrupted_run(two_rank_run, tmp_path):
    full_dir, full = two_rank_run
    run = tmp_path / "run"
    first = launch(tmp_path, {"config": _long_config(run), "stop_after": 6}, nproc=2)
    assert (
        first["step"] == 6
        and not first["finished"]
        and (run / "checkpoints" / "latest").read_text().strip() == "step_000006"
    )
    second = launch(tmp_path, {"config": _long_config(run)}, nproc=2)
    assert second["resumed_from"].endswith("step_000006") and second["step"] == 12
    history = first["history"] + second["history"]
    assert [h["step"] for h in history] == list(range(1, 13))
    # the same batches in the same order on every rank (data position restored), same lr schedule, same losses
    assert [h["data"] for h in history] == [h["data"] for h in full["history"]]
    assert [h["lr"] for h in history] == pytest.approx([h["lr"] for h in full["history"]], rel=1e-9)
    assert [h["loss"] for h in history] == pytest.approx([h["loss"] for h in full["history"]], abs=1e-6)
    a, b = _export(run), _export(full_dir)
    for name in a:
        assert torch.allclose(a[name], b[name], atol=1e-6), name
    assert not math.isnan(second["history"][-1]["loss"])


@pytest.mark.parametrize("zero_stage", [2, 3])
def test_bf16_training_exports_fp32_master_weights(tmp_path, zero_stage):
    """bf16 compute (DeepSpeed's CPU accelerator supports it) follows the fp32 run; the export holds fp32 masters."""
    fp32 = _train(toy_config(str(tmp_path / "fp32"), train={"max_steps": 4}, engine={"zero_stage": zero_stage}))
    bf16 = _train(
        toy_config(
            str(tmp_path / "bf16"), train={"max_steps": 4}, engine={"zero_stage": zero_stage, "precision": "bf16"}
        )
    )
    assert [h["loss"] for h in bf16["history"]] == pytest.approx([h["loss"] for h in fp32["history"]], abs=0.05)
    w16, w32 = _export(tmp_path / "bf16"), _export(tmp_path / "fp32")
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
    summary = _train(
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
    summary = _train(cfg)
    evals = [r for r in _metrics(run) if r["split"] == "eval"]
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
    a, b = _export(tmp_path / "split"), _export(tmp_path / "straight")
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
        step = [r for r in _metrics(tmp_path / f"micro{micro}") if r.get("step") == 1 and "grad_norm" in r]
        runs[micro] = (dict(summary["history"][0], grad_norm=step[0]["grad_norm"]), sorted(keys))
    assert runs[1][1] == runs[2][1] == runs[6][1]  # the same samples in the step
    norms = [runs[m][0]["grad_norm"] for m in (1, 2, 6)]
    assert norms == pytest.approx([norms[0]] * 3, rel=1e-4)
    losses = [runs[m][0]["loss"] for m in (1, 2, 6)]
    assert losses == pytest.approx([losses[0]] * 3, rel=1e-5)  # the mean over the step's answer tokens


def test_zero3_setting_does_not_outlive_the_run(tmp_path):
    from transformers.integrations import is_deepspeed_zero3_enabled

    _train(toy_config(str(tmp_path / "run"), train={"max_steps": 1}))
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
    plain = _train(
        toy_config(str(tmp_path / "plain"), train={"max_steps": 4}, engine={"zero_stage": engine["zero_stage"]})
    )
    offloaded = _train(toy_config(str(tmp_path / "offload"), train={"max_steps": 4}, engine=engine))
    assert [h["loss"] for h in offloaded["history"]] == pytest.approx([h["loss"] for h in plain["history"]], abs=1e-5)
    a, b = _export(tmp_path / "offload"), _export(tmp_path / "plain")
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
    weights = _export(tmp_path / "run")
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
    summary = _train(cfg)
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


# ---------------------------------------------------------------------------
# preemption and hangs (2 ranks)


@pytest.mark.multiproc
def test_signal_on_one_rank_stops_both_at_one_step_and_the_rerun_equals_uninterrupted(two_rank_run, tmp_path):
    """SIGUSR1 reaches rank 1 only, while it draws step 4's batch: both ranks finish step 4, checkpoint it,
    leave preempted.json and exit 75; the same command again resumes there and ends equal to the uninterrupted run."""
    from mmdist.training.preemption import PREEMPTED_EXIT, read_marker

    full_dir, full = two_rank_run
    run = tmp_path / "run"
    output: list = []
    first = launch(
        tmp_path,
        {"config": _long_config(run), "signal": {"rank": 1, "batch": 3}},
        nproc=2,
        expect_rc=None,
        output=output,
    )
    stdout, stderr = output[0]
    assert first["returncode"] != 0  # torchrun reports the ranks' 75 as a failure; the Slurm scripts read the marker
    assert f"exitcode  : {PREEMPTED_EXIT}" in stderr or f"exitcode: {PREEMPTED_EXIT}" in stderr.replace("  ", " "), (
        stderr[-3000:]
    )
    assert [r["step"] for r in first["ranks"]] == [4, 4] and all(
        r["preempted"] and not r["finished"] for r in first["ranks"]
    )
    assert "SIGUSR1 received" in stderr
    marker = read_marker(run)
    assert (
        marker["step"] == 4 and marker["checkpoint"].endswith("step_000004") and marker["signal"] == "on another rank"
    )
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_000004"
    assert not (run / "export").exists()  # a stopped run exports nothing

    second = launch(tmp_path, {"config": _long_config(run)}, nproc=2)
    assert second["resumed_from"].endswith("step_000004") and second["step"] == 12 and second["finished"]
    history = first["history"] + second["history"]
    assert [h["step"] for h in history] == list(range(1, 13))
    # the same batches: the same sample multiset
    assert [h["data"] for h in history] == [h["data"] for h in full["history"]]
    assert [h["loss"] for h in history] == pytest.approx([h["loss"] for h in full["history"]], abs=1e-6)
    a, b = _export(run), _export(full_dir)
    assert set(a) == set(b) and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


@pytest.mark.multiproc
def test_stalled_rank_ends_the_job_with_a_stack_dump(tmp_path):
    """Rank 1 sleeps while drawing step 4's batch: within watchdog.timeout_s (2 s) plus a poll the job ends,
    non-zero, with the stalled frame in the log and in RUN_DIR/stacks/rank00001.txt."""
    import time

    from mmdist.training.watchdog import WATCHDOG_EXIT

    run = tmp_path / "run"
    cfg = _long_config(run, watchdog={"timeout_s": 2, "poll_s": 0.25, "phase_timeout_s": 120})
    output: list = []
    started = time.monotonic()
    result = launch(
        tmp_path,
        {"config": cfg, "stall": {"rank": 1, "batch": 3, "seconds": 300}},
        nproc=2,
        expect_rc=None,
        output=output,
        timeout=200,
    )
    elapsed = time.monotonic() - started
    stdout, stderr = output[0]
    assert result["returncode"] != 0 and elapsed < 150, (result["returncode"], elapsed)
    assert "[mmdist] watchdog: rank 1" in stderr and "hung in the training loop after step 3" in stderr, stderr[-4000:]
    assert f"exitcode  : {WATCHDOG_EXIT}" in stderr or f"exiting with code {WATCHDOG_EXIT}" in stderr
    dump = (run / "stacks" / "rank00001.txt").read_text()
    assert "_run_hooks" in dump and "trainer_toy.py" in dump  # the stalled frame, where it sleeps


# ---------------------------------------------------------------------------
# elastic resume: another world size continues from the consolidated trainable state


def _elastic_config(run_dir, zero_stage):
    # global batch 12 = micro 2 x accumulation 6/3/2 on 1/2/3 ranks; cosine with warmup: the lr schedule must continue
    return toy_config(str(run_dir), train={"max_steps": 6, "global_batch_size": 12, "micro_batch_size": 2,
                                           "lr_scheduler": "cosine", "warmup_ratio": 0.2},
                      engine={"zero_stage": zero_stage})


@pytest.mark.multiproc
@pytest.mark.slow
@pytest.mark.parametrize(("zero_stage", "worlds"), [(3, (2, 1, 3)), (2, (3, 1, 2))], ids=["zero3-2-1-3", "zero2-3-1-2"])
def test_resume_on_other_world_sizes_equals_uninterrupted(tmp_path, zero_stage, worlds):
    """Steps 1-2 on worlds[0] ranks, 3-4 on worlds[1], 5-6 on worlds[2]: the same losses (same samples per step,
    same lr) and final weights as one uninterrupted single-process run; tolerance 1e-5 (summation order differs)."""
    full = _train(_elastic_config(tmp_path / "full", zero_stage))
    run = tmp_path / "run"
    history = []
    for i, (world, stop) in enumerate(zip(worlds, (2, 4, None))):
        spec = {"config": _elastic_config(run, zero_stage), "stop_after": stop}
        if world == 1:
            part = _train(spec["config"], stop_after=stop)
        else:
            part = launch(tmp_path / f"part{i}", spec, nproc=world)
        if i:
            assert part["resumed_from"].endswith(f"step_{2 * i:06d}")
        history += part["history"]
    assert [h["step"] for h in history] == list(range(1, 7))
    assert [h["lr"] for h in history] == pytest.approx([h["lr"] for h in full["history"]], rel=1e-9)
    assert [h["loss"] for h in history] == pytest.approx([h["loss"] for h in full["history"]], abs=1e-5)
    a, b = _export(run), _export(tmp_path / "full")
    assert set(a) == set(b) and all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)


def test_checkpoint_without_consolidated_state_is_refused_on_another_world_size(tmp_path):
    """A checkpoint from before trainable_state.pt existed resumes only on its own world size, and says so."""
    from mmdist.training.checkpoint import TRAINABLE_STATE, CheckpointError

    run = tmp_path / "run"
    _train(toy_config(str(run), train={"max_steps": 2}))
    ckpt = run / "checkpoints" / "step_000002"
    assert (ckpt / TRAINABLE_STATE).is_file()
    (ckpt / TRAINABLE_STATE).unlink()
    client = torch.load(ckpt / "client_state_rank00000.pt", weights_only=False)
    torch.save(dict(client, world_size=2), ckpt / "client_state_rank00000.pt")  # as if 2 ranks had written it
    torch.save(dict(client, world_size=2), ckpt / "client_state_rank00001.pt")
    with pytest.raises(
        CheckpointError, match=r"written by 2 rank\(s\) and this run has 1, and it has no trainable_state.pt"
    ):
        _train(toy_config(str(run), train={"max_steps": 4}))


def test_zero3_checkpoint_with_the_old_optimizer_groups_resumes_by_parameter_name(tmp_path, monkeypatch, capsys):
    """A checkpoint written by a version that put every ZeRO-3 parameter in a .no_decay group (judged by the
    partition's 1-D shape) and did not record the groups resumes through its consolidated copy into this run's groups,
    and the run ends where an uninterrupted one does (weight decay 0, so the groups change nothing numerically)."""
    import mmdist.training.optimizer as optimizer_module
    from mmdist.training.checkpoint import TRAINABLE_STATE

    def config(run):
        return toy_config(str(tmp_path / run), train={"max_steps": 4, "lr_scheduler": "cosine", "warmup_ratio": 0.25},
                          engine={"zero_stage": 3})

    full = _train(config("full"))
    with monkeypatch.context() as old:
        old.setattr(optimizer_module, "_no_decay", lambda name, param: param.ndim < 2)  # that version's rule
        _train(config("split"), stop_after=2)
    ckpt = tmp_path / "split" / "checkpoints" / "step_000002"
    client_file = ckpt / "client_state_rank00000.pt"
    client = torch.load(client_file, weights_only=False)
    assert all(name.endswith(".no_decay") for name in client.pop("optimizer_groups"))  # that version's layout
    torch.save(client, client_file)  # as that version wrote it: no record of the groups
    capsys.readouterr()
    resumed = _train(config("split"))
    assert "optimizer groups differ from this run's" in capsys.readouterr().out
    assert [h["lr"] for h in resumed["history"]] == pytest.approx([h["lr"] for h in full["history"][2:]], rel=1e-9)
    a, b = _export(tmp_path / "split"), _export(tmp_path / "full")
    assert set(a) == set(b) and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    (ckpt / TRAINABLE_STATE).unlink()  # without the consolidated copy there is nothing to load by name: a clear error
    from mmdist.training.checkpoint import CheckpointError

    with pytest.raises(CheckpointError, match="other parameter groups than this run's"):
        _train(dict(config("split"), checkpoint={"resume": str(ckpt)}))
