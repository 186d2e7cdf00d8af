"""`mmdist plan`: runs from the config alone, counts frozen parameters as frozen, and its
model-state bytes match what DeepSpeed engines hold (benchmarks/memory_per_rank.py)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import yaml
from helpers.configs import tiny_run_config

from mmdist import plan
from mmdist.commands import plan as plan_command
from mmdist.config.run import load_config

ROOT = Path(__file__).resolve().parents[1]

REFERENCE = {
    "stage": "fuse",
    "model": {
        "llm": {"name_or_path": "Qwen/Qwen-14B", "trust_remote_code": True, "dtype": "bf16"},
        "vision": {"name_or_path": "openai/clip-vit-large-patch14-336", "dtype": "bf16"},
        "connector": {"type": "mlp", "projector_layers": 2},
    },
    "data": {"train": [{"shards": ["data/x-{000000..000009}.tar"]}], "max_len": 2048, "packing": True},
    "train": {"max_steps": 10, "global_batch_size": 256, "micro_batch_size": 4},
    "engine": {"zero_stage": 2, "precision": "bf16"},
}


def saved_activation_bytes(module, forward) -> int:
    """Bytes of the tensors autograd saves for backward while ``forward()`` runs, ``module``'s parameters left out
    (each storage counted once, at its largest)."""
    import torch

    params = {p.untyped_storage().data_ptr() for p in module.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = max(seen.get(storage.data_ptr(), 0), storage.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        forward()
    return sum(seen.values())


def reference_config_file(tmp_path: Path) -> Path:
    """configs/fuse.yaml when the engine recipes ship it, else the same recipe written here."""
    shipped = ROOT / "configs" / "fuse.yaml"
    if shipped.is_file():
        return shipped
    path = tmp_path / "fuse.yaml"
    path.write_text(yaml.safe_dump(REFERENCE))
    return path


def test_plan_runs_from_the_config_alone_in_seconds(tmp_path, capsys):
    path = tmp_path / "fuse.yaml"
    path.write_text(yaml.safe_dump(REFERENCE))
    start = time.perf_counter()
    assert plan_command.main(["--config", str(path), "--gpus", "8", "--gpu-memory", "80GB"]) == 0
    elapsed = time.perf_counter() - start
    out = capsys.readouterr().out
    assert elapsed < 30, f"plan took {elapsed:.1f} s"
    # Qwen-14B from the built-in shape table, counted on the meta device: 14.17B parameters
    assert "14,167,290,880" in out
    for setting in plan.ALL_SETTINGS:
        assert setting.label in out
    assert "recommended: ZeRO-" in out and "largest micro-batch that fits" in out
    assert "DeepSpeed's estimators" in out


def test_shipped_reference_recipe_plans(tmp_path, capsys):
    path = reference_config_file(tmp_path)
    assert plan_command.main(["--config", str(path), "--gpus", "8", "--gpu-memory", "80GB", "--no-deepspeed"]) == 0
    assert "recommended:" in capsys.readouterr().out


def test_frozen_parameters_are_counted_as_frozen():
    from mmdist.materialize import build_run_model

    cfg = tiny_run_config("fuse")
    shapes = plan.model_shapes(cfg)
    model = build_run_model(cfg)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    assert sum(s.params for s in shapes if s.trainable) == trainable
    assert sum(s.params for s in shapes if not s.trainable) == frozen
    # model states: frozen weights only; gradients and optimizer state from the trainable parameters alone
    ms = plan.model_state_bytes(shapes, plan.Setting(0), 1, "fp32")
    assert sum(ms["frozen"].values()) == 4 * frozen
    assert ms["gradients"] == 4 * trainable
    assert ms["optimizer"] == 8 * trainable  # Adam m and v; fp32 training keeps no extra master copy at ZeRO-0
    bigger = tiny_run_config("fuse", "model.llm.init_config.num_hidden_layers=6")
    ms_big = plan.model_state_bytes(plan.model_shapes(bigger), plan.Setting(0), 1, "fp32")
    assert sum(ms_big["frozen"].values()) > sum(ms["frozen"].values())
    assert (ms_big["gradients"], ms_big["optimizer"]) == (ms["gradients"], ms["optimizer"])


def test_reference_recipe_against_deepspeeds_estimators(tmp_path):
    cfg = load_config(reference_config_file(tmp_path))
    shapes = plan.model_shapes(cfg)
    total = sum(s.params for s in shapes)
    trainable = sum(s.params for s in shapes if s.trainable)
    assert trainable / total < 0.01  # only the projector trains
    ds = plan.deepspeed_estimates(shapes, 8)
    ours = {e.setting.label: e for e in plan.estimate(cfg, shapes, 8)}
    # DeepSpeed: 2 + 18/N bytes per parameter at ZeRO-2, as if all 14.5B trained
    assert ds["ZeRO-2 offload=none"]["gpu"] == pytest.approx(2 * total + 18 * total / 8, rel=1e-6)
    z2 = ours["ZeRO-2 offload=none"]
    assert z2.model_states < 0.55 * ds["ZeRO-2 offload=none"]["gpu"]
    assert z2.gradients + z2.optimizer < 16 * trainable  # nothing for frozen parameters
    frozen = sum(z2.frozen.values())
    assert frozen == pytest.approx(2 * (total - trainable), rel=1e-6)  # bf16
    z3 = ours["ZeRO-3 offload=none"]
    assert sum(z3.frozen.values()) == pytest.approx(frozen / 8, rel=1e-6)


def test_fit_and_largest_micro_batch():
    cfg = load_config(base=REFERENCE)
    shapes = plan.model_shapes(cfg)
    small = {e.setting.label: e for e in plan.estimate(cfg, shapes, 8)}
    budget = plan.parse_bytes("80GB")
    for est in small.values():
        b = est.max_micro_batch(budget, checkpointing=True)
        # the largest micro-batch fits and one more does not
        fixed = est.model_states + est.comm + est.fixed_reserve
        assert fixed + b * est.per_sample_ckpt <= budget < fixed + (b + 1) * est.per_sample_ckpt
        assert est.max_micro_batch(budget, checkpointing=False) <= b
    assert small["ZeRO-3 offload=none"].max_micro_batch(budget, True) >= small["ZeRO-0 offload=none"].max_micro_batch(
        budget, True
    )
    best, _ = plan.recommend(list(small.values()), budget, configured_ckpt=False)
    assert best.total(True) <= budget


def test_parse_bytes():
    assert plan.parse_bytes("80GB") == 80 * 2**30
    assert plan.parse_bytes("141 GiB") == 141 * 2**30
    assert plan.parse_bytes("512MB") == 512 * 2**20
    with pytest.raises(ValueError, match="--gpu-memory"):
        plan.parse_bytes("lots")


def test_unknown_hub_model_offline_names_the_key(tmp_path, capsys):
    data = dict(REFERENCE, model=dict(REFERENCE["model"], llm={"name_or_path": str(tmp_path / "no-such-model")}))
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    assert plan_command.main(["--config", str(path), "--no-deepspeed"]) == 2
    err = capsys.readouterr().err
    assert "model.llm" in err and "init_config" in err


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_llm_activation_estimate_matches_saved_tensors(dtype):
    """The per-layer activation model against what autograd really saves for a frozen tiny llama."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    dims = dict(hidden=128, intermediate=256, layers=3, heads=4, kv_heads=2, vocab=300)
    config = AutoConfig.for_model("llama", vocab_size=300, hidden_size=128, intermediate_size=256, num_hidden_layers=3,
                                  num_attention_heads=4, num_key_value_heads=2)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    tdtype = torch.float32 if dtype == "fp32" else torch.bfloat16
    model = AutoModelForCausalLM.from_config(config).to(tdtype).requires_grad_(False)
    seq = 128
    embeds = torch.randn(2, seq, 128, dtype=tdtype, requires_grad=True)
    measured = saved_activation_bytes(model, lambda: model.model(inputs_embeds=embeds))
    predicted = 2 * plan.llm_activation_bytes(dims, seq, plan.DTYPE_BYTES[dtype])
    assert measured == pytest.approx(predicted, rel=0.15)


@pytest.mark.slow
@pytest.mark.multiproc
def test_prediction_matches_measured_engines_within_10_percent():
    """benchmarks/memory_per_rank.py: 1 and 2 ranks, ZeRO 0, 2, 3,
    fp32 and bf16, tiny fuse config, real DeepSpeed engines (one launch per world size)."""
    import memory_per_rank

    half = ["engine.precision=bf16", "model.llm.dtype=bf16", "model.vision.dtype=bf16"]
    measured = memory_per_rank.run(
        settings=[(1, 0), (2, 2), (1, 3), (2, 3), (1, 0, half), (2, 2, half), (2, 3, half)], fresh=False
    )
    rows, bf16 = measured[:4], measured[4:]
    assert {r["precision"] for r in rows} == {"fp32"} and {r["precision"] for r in bf16} == {"bf16"}
    for row in rows + bf16:
        for kind in ("frozen", "trainable", "grads", "optim"):
            measured, predicted = row[f"{kind} B"], row[f"pred {kind} B"]
            assert measured == pytest.approx(predicted, rel=0.10), (
                row["ranks"],
                row["zero"],
                kind,
                measured,
                predicted,
            )
        assert row["frozen w/ grad"] == 0 and row["frozen in optim"] == 0
        assert row["grads B"] < row["frozen B"]
    by = {(r["ranks"], r["zero"]): r for r in rows}
    assert by[(2, 3)]["frozen B"] <= 0.55 * by[(1, 3)]["frozen B"]
    assert by[(2, 2)]["optim B"] <= 0.55 * by[(1, 3)]["optim B"]


def test_input_line_sizes_the_cpu_side_of_the_vision_tower():
    from mmdist.plan import input_line, model_shapes

    shapes = model_shapes(load_config(ROOT / "configs" / "fuse.yaml"))
    vision = next(s for s in shapes if s.name == "vision_encoder")
    assert vision.dims["seq"] == 577, "ViT-L/14-336: 24 x 24 patches and the class token"
    line = input_line(shapes, "H100 SXM", gpus_per_node=8, cpus_per_node=0, images_per_core=100.0)
    need = 0.4 * 989e12 / (2 * vision.params * 577)
    assert (
        f"{need:,.0f} images/s per GPU" in line[0]
        and f"{need / 100:.1f} CPU cores per GPU" in line[0]
        and len(line) == 1
    )
    starved = input_line(shapes, "H100 SXM", gpus_per_node=8, cpus_per_node=64, images_per_core=100.0)
    assert "warning" in starved[1] and "8.0 per GPU" in starved[1]
    assert "unknown GPU" in input_line(shapes, "Voodoo 3", 8, 0)[0]


def test_plan_resolves_auto_for_the_target_gpu_not_this_machine(capsys):
    from mmdist.commands.plan import main as cli_main

    recipe = str(ROOT / "configs" / "tiny_fuse.yaml")
    assert cli_main(["--config", recipe, "--no-deepspeed", "--gpu", "A100"]) == 0
    out = capsys.readouterr().out
    assert "auto -> bf16 for A100" in out and "precision bf16" in out
    assert cli_main(["--config", recipe, "--no-deepspeed", "--gpu", "Tesla T4"]) == 0
    assert "auto -> fp16 for T4" in capsys.readouterr().out, "no bf16 on a T4: fp16 with loss scaling"


@pytest.mark.parametrize("packing", [True, False])
def test_a_micro_batch_means_the_same_samples_in_the_plan_and_the_trainer(packing):
    """``train.micro_batch_size`` counts samples in both; the plan's tokens per micro-batch are the most a batch of
    that many samples can hold from the real collator (every sample ``max_len`` long), packed or padded."""
    import random

    from mmdist.data.collate import collate_fuse
    from mmdist.plan.speed import micro_batch_tokens

    cfg = tiny_run_config("fuse", f"data.packing={str(packing).lower()}", "train.micro_batch_size=4")
    b, max_len = cfg.train.micro_batch_size, cfg.data.max_len

    def sample(n):
        return {"input_ids": list(range(n)), "labels": list(range(n))}

    worst = collate_fuse([sample(max_len)] * b, 0, pack=packing, max_len=max_len)["input_ids"]
    assert worst.numel() == micro_batch_tokens(cfg) == b * max_len
    rng = random.Random(0)
    for _ in range(50):
        batch = collate_fuse([sample(rng.randint(1, max_len)) for _ in range(b)], 0, pack=packing, max_len=max_len)
        assert batch["input_ids"].shape[0] <= b and batch["input_ids"].shape[1] <= max_len
        assert batch["input_ids"].numel() <= micro_batch_tokens(cfg)


def test_resampler_activation_estimate_matches_saved_tensors():
    import torch

    from mmdist.models.resampler import Resampler, ResamplerConfig
    from mmdist.plan.memory import resampler_activation_bytes

    torch.manual_seed(0)
    r = ResamplerConfig(num_queries=8, num_layers=2, hidden_size=32, num_heads=4)
    module = Resampler(r, 24, 48)
    measured = saved_activation_bytes(module, lambda: module(torch.randn(1, 100, 24)))  # one image of 100 tower tokens
    predicted = resampler_activation_bytes(dict(in_tokens=100, in_width=24, queries=8, hidden=32, layers=2))
    assert measured == pytest.approx(predicted, rel=0.1)


def test_the_loss_keeps_activations_at_supervised_tokens_only():
    """Two micro-batches of the same positions, one with 26 more answer tokens: what autograd saves differs by the
    LM head's and loss's tensors at those tokens (the fp32 log-softmax at least), and the planner's activation
    estimate by its count for them (vocabulary x (e + 8) bytes each: the logits, their fp32 copy and log-softmax),
    not by anything at the other positions."""
    import torch
    from helpers.tiny import PAD_ID, make_cfg, make_model, pad_batch, sample

    model = make_model("fuse")
    few, many = ([sample(model, 1, list(range(10, 10 + p)), list(range(50, 50 + a)))] for p, a in ((30, 4), (4, 30)))
    measured = []
    for samples in (few, many):
        batch = pad_batch(samples, pad_id=PAD_ID)
        batch["pixel_values"] = torch.randn(1, 3, 16, 16)
        measured.append(saved_activation_bytes(model, lambda b=batch: model.token_losses(b)))
    vocab = model.llm.get_output_embeddings().out_features
    per_token = (measured[1] - measured[0]) / 26
    cfg = make_cfg("fuse")
    shapes = plan.model_shapes(cfg)
    positions = len(few[0][0])
    planned = [plan.activation_bytes(shapes, cfg, False, positions, 1, positions, supervised=s) for s in (4, 30)]
    e = plan.DTYPE_BYTES[cfg.engine.precision]
    assert planned[1] - planned[0] == pytest.approx(26 * vocab * (e + 8), rel=0.01)
    assert 4 * vocab <= per_token <= vocab * (e + 8), (per_token, vocab)
    # without a supervised count the planner takes every position (the full-logits path's bound)
    every = plan.activation_bytes(shapes, cfg, False, positions, 1, positions)
    assert every - planned[1] == pytest.approx((positions - 30) * vocab * (e + 8), rel=0.01)
