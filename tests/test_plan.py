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
from mmdist.settings import ConfigError

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
    fp32 and bf16, tiny fuse config, real DeepSpeed engines."""
    import memory_per_rank

    rows = memory_per_rank.run(settings=[(1, 0), (2, 2), (1, 3), (2, 3)])
    bf16 = memory_per_rank.run(settings=[(1, 0), (2, 2), (2, 3)],
                               extra=["engine.precision=bf16", "model.llm.dtype=bf16", "model.vision.dtype=bf16"])
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


# ---------------------------------------------------------------------------
# the model menu: conv and timm towers, the resampler, tiling (mmdist/plan/towers.py, images.py)

TINY_RESNET = {"model_type": "resnet", "layer_type": "basic", "depths": [1, 1], "hidden_sizes": [8, 16],
               "embedding_size": 8, "num_channels": 3}
TINY_CONVNEXT = {
    "model_type": "convnext",
    "num_stages": 2,
    "depths": [1, 1],
    "hidden_sizes": [8, 16],
    "num_channels": 3,
}


def _with_tower(stage: str, init_config: dict, *overrides: str, connector: str = "mlp"):
    """The tiny recipe of ``stage`` with its ViT replaced by ``init_config`` (the whole dict, not merged)."""
    import json

    return tiny_run_config(
        stage, f"model.vision.init_config={json.dumps(init_config)}", *overrides, connector=connector
    )


def _split(model) -> tuple[int, int]:
    return (sum(p.numel() for p in model.parameters() if p.requires_grad),
            sum(p.numel() for p in model.parameters() if not p.requires_grad))


@pytest.mark.parametrize("init_config", [TINY_RESNET, TINY_CONVNEXT], ids=["resnet", "convnext"])
@pytest.mark.parametrize("select", [[], ["model.vision.feature_stage=1"], ["model.vision.feature_grid=2"],
                                    ["model.vision.feature_stage=0", "model.vision.feature_grid=1"]],
                         ids=["last", "stage1", "grid2", "stem-grid1"])
def test_a_conv_tower_is_planned_as_the_built_tower(init_config, select):
    """Parameters, tokens, width and forward FLOPs of an HF conv tower: the planner's meta-device probe against the
    real tower built from the same settings (its own probe and a FLOP count of a real forward)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from mmdist.models.vision import VisionTower

    cfg = _with_tower("fuse", init_config, "model.vision.image_size=32", *select)
    vision = plan.model_shapes(cfg)[0]
    tower = VisionTower(cfg.model.vision).eval()
    assert vision.params == sum(p.numel() for p in tower.parameters())
    assert (vision.dims["tokens"], vision.dims["hidden"]) == (tower.num_tokens, tower.hidden_size)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        features = tower(torch.zeros(2, 3, 32, 32))
    assert tuple(features.shape) == (2, vision.dims["tokens"], vision.dims["hidden"])
    assert vision.dims["flops_per_image"] == counter.get_total_flops() / 2 > 0
    assert vision.dims["kind"] == "conv" and "seq" not in vision.dims


def test_a_conv_tower_in_a_fused_model_and_its_plan_line(capsys):
    from mmdist.materialize import build_run_model

    cfg = _with_tower("fuse", TINY_RESNET, "model.vision.image_size=32", "model.vision.feature_grid=3")
    shapes = plan.model_shapes(cfg)
    model = build_run_model(cfg)
    by = {s.name: s for s in shapes}
    assert (sum(s.params for s in shapes if s.trainable), sum(s.params for s in shapes if not s.trainable)) == _split(
        model
    )
    assert by["projector"].dims["tokens"] == model.num_image_tokens == 9
    assert by["projector"].dims["in"] == model.vision.hidden_size == 16
    # the resolution comes from the tower's settings: a larger input gives a larger map and more FLOPs
    big = plan.model_shapes(_with_tower("fuse", TINY_RESNET, "model.vision.image_size=64"))[0]
    assert (
        big.dims["tokens"]
        == 4 * plan.model_shapes(_with_tower("fuse", TINY_RESNET, "model.vision.image_size=32"))[0].dims["tokens"]
    )
    assert big.dims["flops_per_image"] > by["vision_encoder"].dims["flops_per_image"]
    text = plan.format_plan(cfg, shapes, plan.estimate(cfg, shapes, 1), 1, plan.parse_bytes("80GB"))
    assert "the convolutional tower gives 9 tokens of width 16 per image at 32 px" in text
    line = plan.input_line(shapes, "H100 SXM", 8, 0)[0]
    assert "at 32 px" in line and f"{by['vision_encoder'].dims['flops_per_image'] / 1e12:.2f} TFLOP/image" in line


def test_a_vit_pooled_to_a_grid_is_planned_with_the_pooled_tokens():
    from mmdist.models.vision import VisionTower

    cfg = tiny_run_config("fuse", "model.vision.feature_grid=2")
    vision = plan.model_shapes(cfg)[0]
    tower = VisionTower(cfg.model.vision)
    assert vision.dims["tokens"] == tower.num_tokens == 4, "16 patches pooled to 2 x 2"
    assert vision.dims["seq"] == 17, "the tower still computes every patch and the class token"


def test_timm_without_timm_is_a_clear_error(tmp_path, capsys):
    try:
        import timm  # noqa: F401
    except Exception as exc:  # ImportError, or a torchvision built for another torch
        print(f"timm does not import here ({type(exc).__name__}): testing the planner's message")
    else:
        pytest.skip(
            "timm imports here: the planner counts timm towers (test_a_timm_tower_is_planned_as_the_built_tower)"
        )
    from mmdist.config.run import config_to_dict

    cfg = tiny_run_config(
        "fuse", "model.vision.source=timm", "model.vision.name_or_path=resnet18", "model.vision.init_config=null"
    )
    with pytest.raises(ValueError, match=r"model\.vision\.source=timm.*mmdist\[vision\].*meta device"):
        plan.model_shapes(cfg)
    path = tmp_path / "timm.yaml"
    path.write_text(yaml.safe_dump(config_to_dict(cfg)))
    assert plan_command.main(["--config", str(path), "--no-deepspeed"]) == 2
    assert "model.vision.source=timm" in capsys.readouterr().err


def _fake_timm(monkeypatch):
    """A stand-in ``timm`` (create_model, timm.data.resolve_data_config) whose one architecture is a 2-stage CNN,
    so the planner's timm path and VisionTower's run the same code on machines without timm."""
    import importlib.machinery
    import sys
    import types

    import torch

    class TwoStageCNN(torch.nn.Module):
        def __init__(self, num_classes: int = 0, width: int = 12):
            super().__init__()
            self.stem = torch.nn.Conv2d(3, 8, 3, stride=2, padding=1)
            self.stage = torch.nn.Conv2d(8, width, 3, stride=2, padding=1)
            self.pretrained_cfg = {"classifier": "head"}

        def forward_intermediates(self, x, indices, intermediates_only=True):
            maps = [self.stem(x)]
            maps.append(self.stage(maps[0]))
            return [maps[i] for i in indices]

        def forward_features(self, x):
            return self.stage(self.stem(x))

    def create_model(name, pretrained=False, **kwargs):
        if name != "two_stage_cnn":
            raise RuntimeError(f"Unknown model ({name})")
        assert not pretrained
        return TwoStageCNN(**kwargs)

    # Specs as an imported package has: transformers asks importlib.util.find_spec("timm") where timm is installed.
    timm = types.ModuleType("timm")
    timm.__spec__ = importlib.machinery.ModuleSpec("timm", None, is_package=True)
    timm.create_model = create_model
    data = types.ModuleType("timm.data")
    data.__spec__ = importlib.machinery.ModuleSpec("timm.data", None)
    data.resolve_data_config = lambda args, model=None: {
        "input_size": (3, 32, 32),
        "mean": (0.5,) * 3,
        "std": (0.5,) * 3,
        "crop_pct": 1.0,
        "interpolation": "bicubic",
        "crop_mode": "center",
    }
    timm.data = data
    monkeypatch.setitem(sys.modules, "timm", timm)
    monkeypatch.setitem(sys.modules, "timm.data", data)


@pytest.mark.parametrize("select", [[], ["model.vision.feature_stage=0"], ["model.vision.feature_grid=2"]])
def test_a_timm_tower_is_planned_as_the_built_tower(monkeypatch, select):
    from mmdist.models.vision import VisionTower

    _fake_timm(monkeypatch)
    cfg = tiny_run_config("fuse", "model.vision.source=timm", "model.vision.name_or_path=two_stage_cnn",
                          "model.vision.init_config=null", 'model.vision.timm_kwargs={"width": 20}', *select)
    vision = plan.model_shapes(cfg)[0]
    tower = VisionTower(cfg.model.vision)
    assert vision.params == sum(p.numel() for p in tower.parameters()) == 8 * 3 * 9 + 8 + 20 * 8 * 9 + 20
    assert (vision.dims["tokens"], vision.dims["hidden"], vision.dims["image_size"]) == (
        tower.num_tokens,
        tower.hidden_size,
        32,
    )
    assert vision.dims["kind"] == "timm" and vision.dims["flops_per_image"] > 0
    bad = tiny_run_config(
        "fuse", "model.vision.source=timm", "model.vision.name_or_path=no_such_net", "model.vision.init_config=null"
    )
    with pytest.raises(ValueError, match="no timm architecture"):
        plan.model_shapes(bad)


def test_a_real_timm_resnet_is_planned_as_the_built_tower():
    """With the real timm (where it imports: it needs a torchvision built for this torch), a ResNet's stage map."""
    try:
        import timm  # noqa: F401
    except Exception as exc:
        pytest.skip(
            f"timm cannot be imported here ({type(exc).__name__}: {exc}); the stand-in test covers the code path"
        )
    from mmdist.models.vision import VisionTower

    cfg = tiny_run_config(
        "fuse",
        "model.vision.source=timm",
        "model.vision.name_or_path=resnet10t",
        "model.vision.init_config=null",
        "model.vision.feature_stage=2",
        "model.vision.feature_grid=2",
    )
    vision = plan.model_shapes(cfg)[0]
    tower = VisionTower(cfg.model.vision)
    assert vision.params == sum(p.numel() for p in tower.parameters())
    assert (vision.dims["tokens"], vision.dims["hidden"]) == (tower.num_tokens, tower.hidden_size) == (4, 128)


@pytest.mark.parametrize("overrides", [["model.connector.resampler.before_projector=true"], []],
                         ids=["mlp+resampler-before-projector", "type=resampler"])
def test_a_resampler_is_counted_where_the_fused_model_holds_it(overrides):
    """Stage 2 puts a new trainable resampler in the projector (ResampledProjector): its parameters are counted
    there, fp32 and trainable, and the LLM gets num_queries tokens per image."""
    from mmdist.materialize import build_run_model

    connector = "mlp" if overrides else "resampler"
    cfg = tiny_run_config("fuse", "model.connector.resampler.num_queries=5", "model.connector.resampler.hidden_size=16",
                          *overrides, connector=connector)
    shapes = plan.model_shapes(cfg)
    by = {s.name: s for s in shapes}
    model = build_run_model(cfg)
    assert (by["projector"].params, by["projector"].trainable, by["projector"].dtype) == (
        sum(p.numel() for p in model.projector.parameters()), True, "fp32")
    assert "stage1" not in by
    assert (sum(s.params for s in shapes if s.trainable), sum(s.params for s in shapes if not s.trainable)) == _split(
        model
    )
    assert by["projector"].dims["tokens"] == model.num_image_tokens == 5
    assert by["projector"].dims["resampler"]["in_tokens"] == model.vision.num_tokens == 16
    plain = {s.name: s for s in plan.model_shapes(tiny_run_config("fuse"))}
    assert plan.activation_bytes_per_sample(shapes, cfg, False) != plan.activation_bytes_per_sample(
        list(plain.values()), cfg, False
    )


def test_a_stage1_resampler_is_counted_as_the_align_model_builds_it():
    from mmdist.materialize import build_run_model

    cfg = tiny_run_config(
        "align",
        "model.connector.resampler.num_queries=6",
        "model.connector.resampler.hidden_size=16",
        connector="resampler",
    )
    shapes = plan.model_shapes(cfg)
    stage1 = next(s for s in shapes if s.name == "stage1")
    model = build_run_model(cfg)
    assert (sum(s.params for s in shapes if s.trainable), sum(s.params for s in shapes if not s.trainable)) == _split(
        model
    )
    assert stage1.dims["tokens"] == model.stage1.num_tokens == 6
    assert stage1.params == sum(p.numel() for p in model.stage1.parameters()) + 1, "+ the learnable temperature"


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


def test_tiling_is_planned_as_the_preprocessor_lays_out_a_sample():
    """With data.image_tiling the planner's positions, image tokens and tower images per sample are those of a
    real sample on the costliest grid (2 x 2 here), rendered by the preprocessor with the model's own processors."""
    import io

    import numpy as np
    from PIL import Image

    from mmdist.data.preprocess import make_preprocessor
    from mmdist.data.reader import decode_sample
    from mmdist.materialize import build_run_model

    cfg = tiny_run_config("fuse", "data.image_tiling.enabled=true", "data.template=plain")
    plain_cfg = tiny_run_config("fuse", "data.template=plain")
    shapes, plain = plan.model_shapes(cfg), plan.model_shapes(plain_cfg)
    proj = next(s for s in shapes if s.name == "projector").dims
    model = build_run_model(cfg)
    n = model.num_image_tokens
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(buf, format="PNG")
    raw = {"__key__": "k", "__url__": "mem.tar", "png": buf.getvalue(), "txt": b"a picture"}
    out = make_preprocessor(cfg, model.processors)(decode_sample(raw, 10**8, 10_000))
    assert out["image_grids"] == [(2, 2)]
    separators = model.processors.tokenizer.encode(cfg.data.image_tiling.separator, add_special_tokens=False)
    image_ids = sum(t == model.processors.image_token_id for t in out["input_ids"])
    assert proj["images"] == out["num_images"] == 5 and proj["tokens"] == image_ids == 5 * n
    assert proj["separator_tokens"] == len(separators) == 1 and "tiny-bytes" in proj["separator_note"]
    assert proj["positions"] == image_ids + 2 * len(separators) == 5 * n + 2
    # every tiled image is one more tower forward and n more image tokens: activations and FLOPs grow with them
    vision = next(s for s in shapes if s.name == "vision_encoder").dims
    assert vision["images"] == 5
    act = plan.activation_bytes_per_sample(shapes, cfg, False) - plan.activation_bytes_per_sample(
        plain, plain_cfg, False
    )
    e = plan.DTYPE_BYTES[cfg.engine.precision]
    hidden_in, llm_hidden = proj["in"], next(s for s in shapes if s.name == "llm").dims["hidden"]
    assert act == 4 * vision["working_set"] * e + 4 * n * (hidden_in + 2 * llm_hidden) * 4
    from mmdist.plan.speed import _micro_batch_flops

    flops = plan.model_flops(shapes)  # each tile: one more tower forward, n more image tokens, n fewer answer tokens
    per_tile = flops.per_image + n * (flops.per_image_token - flops.per_supervised_token)
    assert _micro_batch_flops(cfg, shapes)[0] - _micro_batch_flops(plain_cfg, plain)[0] == pytest.approx(
        cfg.train.micro_batch_size * 4 * per_tile)


def test_tiling_past_max_len_is_refused_before_the_plan():
    """Tiles whose image tokens leave no room for text are refused when the config is checked, naming the numbers;
    a max_len with room plans the tiles' tokens without a warning."""
    with pytest.raises(ConfigError) as err:
        tiny_run_config("fuse", "data.image_tiling.enabled=true", "data.max_len=64")
    assert "80 image tokens" in str(err.value) and "data.max_len=64" in str(err.value)
    cfg = tiny_run_config("fuse", "data.image_tiling.enabled=true", "data.max_len=128")
    shapes = plan.model_shapes(cfg)
    text = plan.format_plan(cfg, shapes, plan.estimate(cfg, shapes, 1), 1, plan.parse_bytes("80GB"))
    assert "up to 5 images per sample (base + 4 tiles) = 80 image tokens" in text
    assert "more than data.max_len" not in text
