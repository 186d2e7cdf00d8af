"""The DeepSpeed config (batch arithmetic, precision, offload, raw keys), optimizer groups,
gradient checkpointing of a frozen LLM, ZeRO-3 partition-on-load with 2 ranks, and the engine's teardown."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from helpers.toy_launch import launch
from helpers.trainer_toy import ToyModel, toy_config, toy_loader_builder, toy_model_builder

from mmdist.config.run import ConfigError, load_config
from mmdist.training.deepspeed_compat import enable_frozen_gradient_checkpointing
from mmdist.training.ds_config import deepspeed_config, total_steps
from mmdist.training.optimizer import build_optimizer_groups


def _cfg(tmp_path, **sections):
    return load_config(base=toy_config(str(tmp_path / "run"), **sections))


# ---------------------------------------------------------------------------
# deepspeed_config


@pytest.mark.parametrize(
    "world,micro,global_batch,accumulation", [(1, 2, 4, 2), (2, 2, 4, 1), (8, 4, 256, 8), (3, 1, 6, 2)]
)
def test_accumulation_is_global_over_micro_times_world(tmp_path, world, micro, global_batch, accumulation):
    cfg = _cfg(tmp_path, train={"micro_batch_size": micro, "global_batch_size": global_batch})
    ds = deepspeed_config(cfg, world)
    assert ds["gradient_accumulation_steps"] == accumulation
    assert ds["train_micro_batch_size_per_gpu"] == micro
    assert ds["train_batch_size"] == global_batch == micro * accumulation * world


def test_indivisible_global_batch_names_keys_and_world(tmp_path):
    cfg = _cfg(tmp_path, train={"micro_batch_size": 4, "global_batch_size": 12})
    with pytest.raises(ConfigError) as err:
        deepspeed_config(cfg, 2)
    text = str(err.value)
    assert "train.global_batch_size" in text and "train.micro_batch_size=4" in text and "world size=2" in text
    assert "16" in text or "8" in text  # a suggested multiple of 8


def test_zero_stage_offload_precision_and_clipping(tmp_path):
    cfg = _cfg(
        tmp_path,
        engine={
            "zero_stage": 3,
            "offload_optimizer": True,
            "offload_params": True,
            "precision": "fp16",
            "fp16_initial_scale_power": 12,
            "torch_adam": False,
        },
        train={"grad_clip": 0.5},
    )
    ds = deepspeed_config(cfg, 2)
    zero = ds["zero_optimization"]
    assert zero["stage"] == 3
    assert zero["offload_optimizer"]["device"] == "cpu" and zero["offload_param"]["device"] == "cpu"
    assert ds["fp16"]["enabled"] is True and ds["bf16"]["enabled"] is False
    assert ds["fp16"]["loss_scale"] == 0 and ds["fp16"]["initial_scale_power"] == 12  # dynamic scaling from 2**12
    assert ds["gradient_clipping"] == 0.5
    assert ds["optimizer"]["type"] == "AdamW" and ds["optimizer"]["params"]["lr"] == cfg.train.lr

    bf16 = deepspeed_config(_cfg(tmp_path, engine={"zero_stage": 1, "precision": "bf16"}), 1)
    assert bf16["bf16"]["enabled"] is True and bf16["fp16"]["enabled"] is False
    # torch_adam: client optimizer
    assert "offload_optimizer" not in bf16["zero_optimization"] and "optimizer" not in bf16
    assert bf16["zero_allow_untested_optimizer"] is True


def test_raw_keys_are_merged(tmp_path):
    cfg = _cfg(
        tmp_path,
        engine={"deepspeed": {"zero_optimization": {"reduce_bucket_size": 12345}, "comms_logger": {"enabled": False}}},
    )
    ds = deepspeed_config(cfg, 2)
    assert ds["zero_optimization"]["reduce_bucket_size"] == 12345
    assert ds["zero_optimization"]["stage"] == 3  # typed value kept next to the raw one
    assert ds["comms_logger"] == {"enabled": False}


def test_raw_key_equal_to_typed_value_is_accepted(tmp_path):
    cfg = _cfg(tmp_path, engine={"deepspeed": {"train_batch_size": 4, "zero_optimization": {"stage": 3}}})
    assert deepspeed_config(cfg, 2)["train_batch_size"] == 4


@pytest.mark.parametrize("raw,raw_key,typed_key", [
    ({"train_batch_size": 64}, "engine.deepspeed.train_batch_size", "train.global_batch_size"),
    ({"zero_optimization": {"stage": 2}}, "engine.deepspeed.zero_optimization.stage", "engine.zero_stage"),
    ({"bf16": {"enabled": True}}, "engine.deepspeed.bf16.enabled", "engine.precision"),
    ({"gradient_clipping": 5.0}, "engine.deepspeed.gradient_clipping", "train.grad_clip"),
])
def test_raw_key_conflicting_with_typed_setting_names_both(tmp_path, raw, raw_key, typed_key):
    cfg = _cfg(tmp_path, engine={"deepspeed": raw})
    with pytest.raises(ConfigError) as err:
        deepspeed_config(cfg, 2)
    assert raw_key in str(err.value) and typed_key in str(err.value)


def test_total_steps_from_steps_or_samples(tmp_path):
    assert total_steps(_cfg(tmp_path, train={"max_steps": 7})) == 7
    assert total_steps(_cfg(tmp_path, train={"max_steps": None, "max_samples": 10, "global_batch_size": 4})) == 3
    assert total_steps(_cfg(tmp_path, train={"max_steps": 2, "max_samples": 100})) == 2  # the smaller budget wins


# ---------------------------------------------------------------------------
# optimizer groups


def test_optimizer_groups_only_trainable_with_multipliers_and_no_decay(tmp_path):
    cfg = _cfg(tmp_path, train={"lr": 0.1, "weight_decay": 0.01, "lr_multipliers": {"stage1": 0.5}})
    model = ToyModel()
    groups = {g["name"]: g for g in build_optimizer_groups(model, cfg.train)}
    assert set(groups) == {"projector", "projector.no_decay", "stage1.no_decay", "temperature.no_decay"}
    assert groups["projector"]["params"] == [model.projector.weight] and groups["projector"]["weight_decay"] == 0.01
    assert (
        groups["projector.no_decay"]["params"] == [model.projector.bias]
        and groups["projector.no_decay"]["weight_decay"] == 0.0
    )
    assert groups["stage1.no_decay"]["lr"] == pytest.approx(0.05) and groups["projector"]["lr"] == pytest.approx(0.1)
    in_groups = {id(p) for g in groups.values() for p in g["params"]}
    assert not any(id(p) in in_groups for p in model.backbone.parameters())  # frozen: no optimizer state


def test_weight_decay_follows_the_full_shape_of_a_zero3_partitioned_weight(tmp_path):
    """Under ZeRO-3 a parameter's data is an empty 1-D partition and its shape is in ds_shape; a weight matrix must
    still get weight decay (judged by .ndim, every ZeRO-3 weight would go to the no-decay group)."""
    cfg = _cfg(tmp_path, train={"weight_decay": 0.01})
    model = ToyModel()
    weight = model.projector.weight
    weight.ds_shape = weight.shape
    weight.data = torch.empty(0)  # what zero.Init leaves outside a gather
    groups = {g["name"]: g for g in build_optimizer_groups(model, cfg.train)}
    assert groups["projector"]["params"] == [weight] and groups["projector"]["weight_decay"] == 0.01


def test_optimizer_groups_reject_unknown_group_and_stray_trainable(tmp_path):
    model = ToyModel()
    with pytest.raises(ConfigError, match=r"train\.lr_multipliers\.projecter.*projector"):
        build_optimizer_groups(model, _cfg(tmp_path, train={"lr_multipliers": {"projecter": 1.0}}).train)
    model.backbone[0].weight.requires_grad_(True)  # trainable but in no group: it would never be updated
    with pytest.raises(ConfigError, match="in no trainable group"):
        build_optimizer_groups(model, _cfg(tmp_path).train)


# ---------------------------------------------------------------------------
# gradient checkpointing of the frozen LLM


def _tiny_llama():
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    model = AutoModelForCausalLM.from_config(config).float()
    model.requires_grad_(False)
    return model.eval()  # frozen: eval, dropout off


def test_frozen_llm_checkpointing_keeps_gradients_to_inputs_embeds():
    llm = _tiny_llama()
    embeds = torch.randn(2, 6, 32)
    labels = torch.randint(0, 64, (2, 6))

    def grad_of_inputs() -> torch.Tensor:
        x = embeds.clone().requires_grad_(True)
        llm(inputs_embeds=x, labels=labels, use_cache=False).loss.backward()
        return x.grad

    reference = grad_of_inputs()
    layer = llm.model.layers[0]
    calls = []
    hook = layer.self_attn.register_forward_hook(lambda *a: calls.append(1))
    assert enable_frozen_gradient_checkpointing(llm) == 2
    assert not llm.training  # the frozen LLM stays in eval mode
    checkpointed = grad_of_inputs()
    hook.remove()
    assert torch.allclose(checkpointed, reference, atol=1e-6)
    assert len(calls) == 2  # forward + recompute in backward: activations were not kept
    assert all(p.grad is None for p in llm.parameters())  # frozen weights get no gradient
    with torch.no_grad():  # no recompute without grad
        calls.clear()
        hook = layer.self_attn.register_forward_hook(lambda *a: calls.append(1))
        llm(inputs_embeds=embeds)
        hook.remove()
    assert len(calls) == 1


# ---------------------------------------------------------------------------
# ZeRO-3 partition-on-load (2 ranks)


@pytest.mark.multiproc
def test_zero3_partitions_frozen_llm_and_gathers_written_weights(tmp_path):
    """Each of 2 ranks holds half of an LLM loaded with from_pretrained (HfDeepSpeedConfig alive), and the
    gathered weights equal the file; the optimizer holds only trainable params; weights written through the
    model's `gather` read back equal on both ranks."""
    from helpers.trainer_toy import tiny_llama_config
    from transformers import AutoModelForCausalLM

    torch.manual_seed(1)
    pretrained = tmp_path / "tiny_llama"
    AutoModelForCausalLM.from_config(tiny_llama_config()).save_pretrained(pretrained)
    result = launch(
        tmp_path,
        {"config": toy_config(str(tmp_path / "run")), "mode": "probe", "pretrained_dir": str(pretrained)},
        nproc=2,
    )
    ranks = result["ranks"]
    assert len(ranks) == 2
    for r in ranks:
        assert r["llm_full"] > 20000
        assert r["llm_local"] == r["llm_full"] // 2  # no rank holds the whole frozen LLM
        assert r["llm_visible"] == 0  # partitioned: empty outside a gather
        assert r["optimizer_names"] == ["log_scale", "norm.bias", "norm.weight", "projector.bias", "projector.weight"]
        assert r["gathered_shapes_ok"] and r["gathered_max_err"] == 0.0
        assert r["hf_saw_zero3"]  # transformers knew about ZeRO-3 while loading
        assert r["pretrained_compared"] >= 10 and r["pretrained_max_err"] == 0.0


def test_zero_dim_parameter_trains_under_zero2(tmp_path):
    """DeepSpeed 0.19 cannot broadcast 0-dim parameters; the engine handles them at ZeRO stages 0-2."""
    from helpers.trainer_toy import ToyModel, toy_loader_builder

    from mmdist.training.loop import train

    def builder(cfg, gather):
        return ToyModel(gather, scalar_dim0=True)

    cfg = _cfg(tmp_path, train={"max_steps": 2}, engine={"zero_stage": 2})
    summary = train(cfg, model_builder=builder, loader_builder=toy_loader_builder())
    from safetensors.torch import load_file

    weights = load_file(str(tmp_path / "run" / "export" / "model.safetensors"))
    assert weights["log_scale"].shape == () and float(weights["log_scale"]) != 0.0  # still a scalar, and it trained
    assert summary["step"] == 2


REFERENCE_RECIPES = ("align.yaml", "fuse.yaml")


@pytest.mark.parametrize(
    "path",
    sorted((__import__("pathlib").Path(__file__).resolve().parents[2] / "configs").glob("*.yaml")),
    ids=lambda p: p.name,
)
def test_every_shipped_recipe_gives_a_deepspeed_config(path, monkeypatch):
    """The reference recipes on their 8 GPUs of 80 GB, the tiny twins on 2 CPU ranks (and 1), any other recipe on 1."""
    from mmdist.plan.auto import DEVICE_MEMORY_ENV, resolve_zero_stage

    cfg = load_config(path)
    if path.name in REFERENCE_RECIPES:
        assert cfg.engine.zero_stage == "auto"  # the planner's fastest stage that fits, at start-up
        with pytest.raises(ConfigError, match="engine.zero_stage"):
            deepspeed_config(cfg, 8)
        monkeypatch.setenv(DEVICE_MEMORY_ENV, "80GB")
        cfg, _ = resolve_zero_stage(cfg, 8, "cpu")
    worlds = (8,) if path.name in REFERENCE_RECIPES else (1, 2) if path.name.startswith("tiny_") else (1,)
    for world in worlds:
        ds = deepspeed_config(cfg, world)
        assert (
            ds["train_batch_size"] == ds["train_micro_batch_size_per_gpu"] * ds["gradient_accumulation_steps"] * world
        )
    if path.name in REFERENCE_RECIPES:
        assert cfg.engine.zero_stage == 1 and cfg.engine.precision == "bf16"  # bf16: no ZeRO-0 (mmdist.plan.auto)
    elif path.name.startswith("tiny_"):
        assert cfg.engine.precision == "auto" and cfg.engine.torch_adam  # resolved from the hardware at start-up


def test_raw_keys_may_tune_defaults_that_no_typed_setting_decides(tmp_path):
    cfg = _cfg(
        tmp_path,
        engine={
            "precision": "fp16",
            "zero_stage": 3,
            "torch_adam": False,
            "deepspeed": {
                "fp16": {"loss_scale_window": 200, "hysteresis": 4},
                "optimizer": {"params": {"eps": 1e-6}},
                "zero_optimization": {"stage3_gather_16bit_weights_on_model_save": True},
            },
        },
    )
    ds = deepspeed_config(cfg, 2)
    assert ds["fp16"]["loss_scale_window"] == 200 and ds["fp16"]["hysteresis"] == 4 and ds["fp16"]["enabled"] is True
    assert ds["optimizer"]["params"]["eps"] == 1e-6 and ds["optimizer"]["params"]["lr"] == cfg.train.lr
    assert ds["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
    # a whole typed section replaced by a raw one still clashes with the typed leaves inside it
    with pytest.raises(ConfigError, match=r"engine\.deepspeed\.fp16.*engine\.(precision|fp16_initial_scale_power)"):
        deepspeed_config(_cfg(tmp_path, engine={"precision": "fp16", "deepspeed": {"fp16": "off"}}), 2)


def test_frozen_checkpointing_defers_to_active_transformers_checkpointing():
    llm = _tiny_llama()
    llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    enable_frozen_gradient_checkpointing(llm)
    llm.train()  # transformers' checkpointing is now active: ours must not add a second recompute
    for module in llm.modules():
        if isinstance(module, torch.nn.Dropout):
            module.eval()
    calls = []
    hook = llm.model.layers[0].self_attn.register_forward_hook(lambda *a: calls.append(1))
    x = torch.randn(1, 5, 32, requires_grad=True)
    llm(inputs_embeds=x, labels=torch.randint(0, 64, (1, 5)), use_cache=False).loss.backward()
    hook.remove()
    assert len(calls) == 2 and x.grad is not None  # one forward + one recompute, not three


# ---------------------------------------------------------------------------
# teardown: EngineBundle.close()


CLOSE_PROBE = textwrap.dedent("""
    import json, sys, torch
    import torch.distributed as tdist
    ORIGINAL_LINEAR = torch.nn.functional.linear
    from transformers.integrations import is_deepspeed_zero3_enabled
    from mmdist.config.run import load_config
    from mmdist import distributed as dist
    from mmdist.training.engine import build_engine
    from mmdist.training.teardown import deepspeed_shm_buffer

    class Head(torch.nn.Module):
        processors = None  # the model contract's members; the engine never steps this model

        def __init__(self):
            super().__init__()
            self.projector = torch.nn.Linear(2, 2)

        def trainable_groups(self):
            return {"projector": list(self.projector.parameters())}

        def parts(self):
            return []

        def export_state_dict(self):
            return {}

        def batch_counts(self, batch):
            raise NotImplementedError

        def flop_count(self, *, vision_runs=True, text_runs=True):
            raise NotImplementedError

    def failing(cfg, gather):
        raise ValueError("no model today")

    def head(cfg, gather):
        return Head()

    cfg = load_config(base=json.loads(sys.argv[1]))
    for attempt, builder in (("first", head), ("second", head), ("failed", failing)):
        env = dist.init(dist.discover(argv=[], environ={}), backend="gloo", timeout_s=30)
        buffer = deepspeed_shm_buffer(env.rank)
        try:
            bundle = build_engine(cfg, world_size=1, model_builder=builder)
        except ValueError:
            pass  # build_engine released DeepSpeed's state itself
        else:
            print(attempt, "built", buffer.exists(), is_deepspeed_zero3_enabled())
            bundle.close()
            bundle.close()  # idempotent
        print(attempt, "closed", buffer.exists(), is_deepspeed_zero3_enabled(), tdist.is_initialized(),
              torch.nn.functional.linear is ORIGINAL_LINEAR)  # ZeRO-3's zero.Init swaps in its own linear
        dist.shutdown()
""")


def test_close_releases_deepspeed_groups_zero3_setting_and_shm_buffer(tmp_path):
    """DeepSpeed's CPU all-reduce leaves a 66 MB /dev/shm file per rank per run, its groups outlive the run and
    transformers keeps the ZeRO-3 setting; close() (and a failed build) releases all three, so a second engine
    in the same process builds.

    In a fresh process: DeepSpeed creates the buffer once per process, so a test process that
    already initialised DeepSpeed would prove nothing.
    """
    script = tmp_path / "probe.py"
    script.write_text(CLOSE_PROBE)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE",
                                                         "LOCAL_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env["DS_ACCELERATOR"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[2]), env.get("PYTHONPATH", "")])
    cfg = toy_config(str(tmp_path / "run"), train={"max_steps": 1})
    out = subprocess.run(
        [sys.executable, str(script), json.dumps(cfg)], env=env, capture_output=True, text=True, timeout=180
    )
    assert out.returncode == 0, out.stderr[-2000:]
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith(("first", "second", "failed"))]
    assert lines == [
        "first built True True", "first closed False False False True",
        # DeepSpeed makes its buffer once per process
        "second built False True", "second closed False False False True",
        "failed closed False False False True",
    ], out.stdout[-2000:] + out.stderr[-2000:]


@pytest.mark.parametrize(("world", "micro", "fitted"), [(2, 4, 3), (3, 4, 4), (5, 8, 6), (4, 2, 1)])
def test_micro_batch_fits_the_global_batch_on_any_world_size(tmp_path, world, micro, fitted):
    """Global batch 60: the micro-batch only goes down, to the largest that divides 60 / world; accumulation follows."""
    from mmdist.training.ds_config import fit_micro_batch

    cfg = _cfg(tmp_path, train={"micro_batch_size": micro, "global_batch_size": 60})
    out, line = fit_micro_batch(cfg, world)
    assert out.train.micro_batch_size == fitted and out.train.global_batch_size == 60
    assert (line is None) == (fitted == micro) and cfg.train.micro_batch_size == micro  # the input is not changed
    ds = deepspeed_config(out, world)
    assert ds["train_batch_size"] == 60 == fitted * ds["gradient_accumulation_steps"] * world
    if line:
        assert f"train.micro_batch_size: {micro} -> {fitted}" in line


def test_global_batch_that_the_world_does_not_divide_is_refused_with_the_sizes_that_work(tmp_path):
    from mmdist.training.ds_config import fit_micro_batch

    with pytest.raises(
        ConfigError, match=r"12 samples per step cannot be split evenly over 5 ranks.*\(1, 2, 3, 4, 6, 12\)"
    ):
        fit_micro_batch(_cfg(tmp_path, train={"micro_batch_size": 2, "global_batch_size": 12}), 5)
    strict = _cfg(tmp_path, train={"micro_batch_size": 4, "global_batch_size": 12, "fit_micro_batch": False})
    assert fit_micro_batch(strict, 2) == (strict, None)  # left to batch_layout, which refuses
    with pytest.raises(ConfigError, match="not divisible"):
        deepspeed_config(strict, 2)


def test_an_nccl_run_in_a_process_on_the_cpu_accelerator_is_refused_naming_ds_accelerator():
    """DeepSpeed keeps its first accelerator for the process: an NCCL run after it is refused, saying why."""
    code = textwrap.dedent("""
        from mmdist.training.engine import check_accelerator
        check_accelerator("gloo")  # the CPU accelerator's own backend: accepted
        try:
            check_accelerator("nccl")
        except RuntimeError as exc:
            print("refused:", exc)
    """)
    env = dict(os.environ, DS_ACCELERATOR="cpu", PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "refused: engine.backend resolves to nccl" in proc.stdout
    assert "DS_ACCELERATOR='cpu'" in proc.stdout


@pytest.mark.parametrize("zero_stage", [1, 2, 3])
def test_a_finished_run_frees_its_model(tmp_path, zero_stage):
    """After ``train`` returns, nothing keeps the engine or the model alive: DeepSpeed's gradient hooks on the
    parameters (out of the garbage collector's sight), ZeRO-3's module stack and its coordinator's method caches
    are released by ``EngineBundle.close``. Otherwise a process that builds a second model (a benchmark's bare
    side, a stage 2 after stage 1) holds both in device memory."""
    import gc
    import weakref

    from mmdist.training.loop import train

    built = []

    def builder(cfg, gather):
        model = toy_model_builder(cfg, gather)
        built.append(weakref.ref(model))
        return model

    cfg = toy_config(str(tmp_path / "run"), train={"max_steps": 2}, engine={"zero_stage": zero_stage},
                     checkpoint={"export": False})
    train(load_config(base=cfg), model_builder=builder, loader_builder=toy_loader_builder())
    gc.collect()
    assert len(built) == 1 and built[0]() is None, "the trained model is still referenced after train() returned"
