"""`engine.zero_stage: auto`: the planner's fastest stage that fits the device, resolved at start-up and written down;
the step FLOPs of the time model; models built where the engine says (mmdist/plan/auto.py, mmdist/plan/speed.py)."""

from __future__ import annotations

import contextlib

import pytest
import torch
import yaml
from helpers.configs import tiny_run_config

from mmdist import plan
from mmdist.plan.auto import DEVICE_MEMORY_ENV, auto_candidates, resolve_zero_stage
from mmdist.plan.speed import choose, micro_batch_tokens, step_inputs
from mmdist.plan.step_time import GB, Interconnect

NET = Interconnect("test", intra_node=100 * GB, inter_node=10 * GB, gpus_per_node=8)


@pytest.mark.parametrize("stage", ["fuse", "align"])
@pytest.mark.parametrize("world", [1, 2])
def test_auto_picks_zero0_for_the_tiny_recipes_on_the_cpu(monkeypatch, stage, world):
    monkeypatch.delenv(DEVICE_MEMORY_ENV, raising=False)
    cfg = tiny_run_config(stage, "engine.zero_stage=auto")
    assert cfg.engine.zero_stage == "auto"
    out, why = resolve_zero_stage(cfg, world, "cpu")
    assert out.engine.zero_stage == 0
    assert why.startswith("engine.zero_stage = 0 (auto): predicted fastest") and "RAM" in why
    assert resolve_zero_stage(out, world, "cpu") == (out, None)  # a concrete stage is left alone


def test_a_small_forced_budget_picks_zero3(monkeypatch):
    # an 8-layer, 2048-wide frozen LLM (~0.5B parameters, 2 GB in fp32; counted on the meta device) over 8 ranks:
    # only ZeRO-3 partitions it
    cfg = tiny_run_config("fuse", "engine.zero_stage=auto", "model.llm.init_config.hidden_size=2048",
                          "model.llm.init_config.intermediate_size=8192", "model.llm.init_config.num_hidden_layers=8",
                          "model.llm.init_config.num_attention_heads=8", "model.llm.init_config.num_key_value_heads=8")
    shapes = plan.model_shapes(cfg)
    by = {e.setting.zero_stage: e for e in plan.estimate(cfg, shapes, 8, settings=auto_candidates(cfg))}
    budget = (by[3].total(False) + min(by[z].total(False) for z in (0, 1, 2))) // 2
    assert by[3].total(False) <= budget < min(by[z].total(False) for z in (0, 1, 2))
    monkeypatch.setenv(DEVICE_MEMORY_ENV, str(budget))
    out, why = resolve_zero_stage(cfg, 8, "cpu")
    assert out.engine.zero_stage == 3
    assert f"{DEVICE_MEMORY_ENV}={budget}" in why and "ZeRO-0" in why and "does not fit" in why
    monkeypatch.setenv(DEVICE_MEMORY_ENV, "1MB")
    out, why = resolve_zero_stage(cfg, 8, "cpu")
    assert out.engine.zero_stage == 3 and "nothing fits" in why  # the least memory, said so


def test_a_half_precision_engine_gets_zero1_not_zero0(monkeypatch):
    """DeepSpeed's bf16 ZeRO-0 path keeps no exportable fp32 masters (mmdist.plan.auto.ZERO0_HALF_PRECISION)."""
    monkeypatch.delenv(DEVICE_MEMORY_ENV, raising=False)
    cfg = tiny_run_config("fuse", "engine.zero_stage=auto", "engine.precision=bf16", "model.llm.dtype=bf16",
                          "model.vision.dtype=bf16")
    assert [s.zero_stage for s in auto_candidates(cfg)] == [1, 2, 3]
    out, why = resolve_zero_stage(cfg, 1, "cpu")
    assert out.engine.zero_stage == 1 and "ZeRO-0 is not a candidate" in why


def test_auto_without_the_planners_shapes_names_the_key(monkeypatch):
    from mmdist.plan import auto
    from mmdist.settings import ConfigError

    def fail(cfg):
        raise ValueError("model.vision.hidden_size: the planner needs the feature width of a custom encoder")

    monkeypatch.setattr(auto, "model_shapes", fail)
    with pytest.raises(ConfigError, match=r"engine\.zero_stage.*hidden_size.*Name a stage"):
        resolve_zero_stage(tiny_run_config("fuse", "engine.zero_stage=auto"), 1, "cpu")


def test_offload_flags_limit_the_candidates():
    assert [s.zero_stage for s in auto_candidates(tiny_run_config("fuse", "engine.zero_stage=auto"))] == [0, 1, 2, 3]
    opt = tiny_run_config("fuse", "engine.zero_stage=auto", "engine.offload_optimizer=true")
    assert [s.zero_stage for s in auto_candidates(opt)] == [1, 2, 3]
    params = tiny_run_config(
        "fuse", "engine.zero_stage=auto", "engine.offload_optimizer=true", "engine.offload_params=true"
    )
    assert [s.label for s in auto_candidates(params)] == ["ZeRO-3 offload=opt+param"]


def test_fastest_fitting_wins_and_ties_go_to_the_lower_stage():
    cfg = load_reference()
    shapes = plan.model_shapes(cfg)
    estimates = plan.estimate(cfg, shapes, 64, settings=[plan.Setting(z) for z in (0, 1, 2, 3)])
    inputs = step_inputs(cfg, shapes, 64, "H100 SXM")
    big = plan.parse_bytes("80GB")
    best, candidates = choose(estimates, inputs, 64, NET, big, [True])
    assert best.setting.zero_stage == 0 and best.fits  # 0, 1, 2 predict the same time within TIE: the lowest
    z3 = next(c for c in candidates if c.setting.zero_stage == 3)
    assert z3.time.step_s > 1.5 * best.time.step_s  # gathers across nodes and the per-module fetch cost
    # where only ZeRO-3 fits, it is chosen even though it is slower
    budget = next(e for e in estimates if e.setting.zero_stage == 3).total(True) + 1
    assert all(e.total(True) > budget for e in estimates if e.setting.zero_stage < 3)
    assert choose(estimates, inputs, 64, NET, budget, [True])[0].setting.zero_stage == 3


def load_reference():
    from pathlib import Path

    from mmdist.config.run import load_config

    return load_config(Path(__file__).resolve().parents[1] / "configs" / "fuse.yaml")


@pytest.mark.parametrize("stage,connector", [("fuse", "mlp"), ("align", "mlp"), ("align", "qformer")])
def test_step_flops_are_the_models_own_count(stage, connector):
    """The planner counts with the model's code on the meta device: the bar's count; 2 more per weight of the LLM's
    layers per token when recomputing."""
    cfg = tiny_run_config(stage, "train.micro_batch_size=2", connector=connector)
    shapes = plan.model_shapes(cfg)
    from mmdist.materialize import build_run_model

    bar = build_run_model(cfg).flop_count()
    planned = plan.model_flops(shapes)
    assert planned.rates() == pytest.approx(bar.rates()) and bar.any()
    if stage == "align":
        samples = cfg.train.micro_batch_size
        assert step_inputs(cfg, shapes, 1, "H100 SXM", micro_batches=1).model_flops == pytest.approx(
            bar.step(samples * cfg.model.text.max_length, images=samples, samples=samples))
        return
    inputs = step_inputs(cfg, shapes, 1, "H100 SXM", micro_batches=1)
    tokens = micro_batch_tokens(cfg)
    assert tokens == 2 * cfg.data.max_len
    # recomputation runs the decoder layers' forward again (2 of their 4 per weight), not the LM head after them,
    # which the bar counts apart at the supervised tokens
    assert bar.per_supervised_token > 0
    assert inputs.recompute_flops == pytest.approx(bar.per_token / 2 * tokens)
    assert inputs.model_flops >= bar.per_token * tokens
    assert not inputs.calibration.measured  # no calibration file: the shipped defaults
    assert inputs.modules == sum(s.modules for s in shapes) > 0


def test_run_dir_holds_the_resolved_stage_and_why(tmp_path, monkeypatch):
    from mmdist.config.run import load_config
    from mmdist.training.resolve import resolve_zero_stage_agreed
    from mmdist.training.run_setup import write_run_dir

    monkeypatch.delenv(DEVICE_MEMORY_ENV, raising=False)
    cfg = tiny_run_config("fuse", "engine.zero_stage=auto", f"run_dir={tmp_path}")
    cfg, note = resolve_zero_stage_agreed(cfg, 1)
    write_run_dir(cfg, 0, notes=[note])
    text = (tmp_path / "config.yaml").read_text()
    assert "# engine.zero_stage = 0 (auto): predicted fastest" in text
    assert yaml.safe_load(text)["engine"]["zero_stage"] == 0
    assert load_config(tmp_path / "config.yaml").engine.zero_stage == 0


def test_plan_prints_the_time_model_and_takes_link_speeds(capsys):
    from pathlib import Path

    from mmdist.commands.plan import main

    recipe = str(Path(__file__).resolve().parents[1] / "configs" / "fuse.yaml")
    assert main(["--config", recipe, "--gpus", "8", "--gpu-memory", "80GB", "--no-deepspeed", "--gpu", "H100 SXM",
                 "--intra-gbps", "100", "--inter-gbps", "5", "--gpus-per-node", "4"]) == 0
    out = capsys.readouterr().out
    assert "100 GB/s in a node, 5 GB/s across" in out
    assert "512 GPU" in out and "ZeRO-0 " in out and "ZeRO-3 " in out
    assert "predicted fastest that fits" in out
    assert "engine.zero_stage=auto on 8 GPU(s) of this size picks ZeRO-" in out


# ---------------------------------------------------------------------------
# models built on the engine's device


def test_large_random_llm_is_built_on_the_context_device_in_its_dtype(monkeypatch):
    from mmdist.models import llm as llm_module
    from mmdist.models import seeded

    cfg = tiny_run_config("fuse", "model.llm.dtype=bf16").model.llm
    monkeypatch.setattr(seeded, "MAX_REPRODUCIBLE_PARAMS", 0)  # every model counts as a large shape study
    with torch.device("meta"):
        model = llm_module.load_llm(cfg)
    params = list(model.parameters())
    assert all(p.device.type == "meta" for p in params)
    assert all(p.dtype == torch.bfloat16 for p in params)  # created in bf16, never whole in fp32 first


def test_small_random_llm_keeps_its_cpu_values_under_a_device_context():
    from mmdist.models import llm as llm_module

    cfg = tiny_run_config("fuse").model.llm
    plain = llm_module.load_llm(cfg)
    with torch.device("meta"):
        in_context = llm_module.load_llm(cfg)
    for (name, a), (_, b) in zip(plain.named_parameters(), in_context.named_parameters()):
        assert b.device.type == "cpu" and torch.equal(a, b), name


def test_engine_builds_zero_0_to_2_inside_the_device_context(monkeypatch):
    from mmdist.training import engine

    assert isinstance(engine.build_device(), contextlib.nullcontext)  # the CPU: nothing changes
    monkeypatch.setattr(engine, "default_device", lambda: "cuda")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert engine.build_device() == torch.device("cuda", 0)


def test_why_zero0_is_left_out_with_bf16(tmp_path, monkeypatch):
    """The reason of ZERO0_HALF_PRECISION, measured: a bf16 ZeRO-0 engine exports bf16 weights. When DeepSpeed links
    fp32 masters on this path this test fails, and ZeRO-0 can return to auto's candidates for bf16."""
    from helpers.trainer_toy import toy_config, toy_loader_builder, toy_model_builder
    from safetensors.torch import load_file

    from mmdist.config.run import load_config
    from mmdist.training.loop import train

    cfg = load_config(
        base=toy_config(str(tmp_path), train={"max_steps": 2}, engine={"zero_stage": 0, "precision": "bf16"})
    )
    train(cfg, model_builder=toy_model_builder, loader_builder=toy_loader_builder())
    exported = load_file(str(tmp_path / "export" / "model.safetensors"))
    assert {v.dtype for v in exported.values()} == {torch.bfloat16}


@pytest.fixture(scope="module")
def demo_shards(tmp_path_factory):
    pytest.importorskip("sklearn")
    from mmdist.data.shards import shard_pattern, write_demo_shards

    written = write_demo_shards(tmp_path_factory.mktemp("demo"), image_size=16, samples_per_shard=64, limit=128)
    return shard_pattern(written["train"]), shard_pattern(written["eval"])


@pytest.mark.multiproc
@pytest.mark.slow
def test_two_cpu_ranks_train_the_tiny_fuse_recipe_with_auto(tmp_path, demo_shards):
    """auto at 2 CPU ranks: ZeRO-0 (fp32, a frozen LLM; no DeepSpeed partitioning), agreed by both ranks, trains and
    writes the concrete stage with its reason into config.yaml."""
    from helpers.toy_launch import launch

    recipe = yaml.safe_load(
        open(__import__("pathlib").Path(__file__).resolve().parents[1] / "configs" / "tiny_fuse.yaml")
    )
    recipe.update(run_dir=str(tmp_path / "run"))
    recipe["data"].update(train=[{"shards": [demo_shards[0]]}], eval=[{"shards": [demo_shards[1]]}])
    recipe["train"].update(max_steps=2, eval_every=0, eval_batches=1)
    recipe["engine"]["zero_stage"] = "auto"
    recipe["log"].update(progress_bar=False, tensorboard=False, param_table=False, peak_flops=1e9)
    summary = launch(tmp_path, {"config": recipe, "mode": "real"}, nproc=2, timeout=400)
    assert summary["step"] == 2
    text = (tmp_path / "run" / "config.yaml").read_text()
    assert yaml.safe_load(text)["engine"]["zero_stage"] == 0 and "# engine.zero_stage = 0 (auto)" in text
