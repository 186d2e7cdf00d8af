"""Checkpoints: frozen weights never written, keep-last-K, a crash mid-save leaves the previous checkpoint
usable and the restart resumes from it, dangling `latest` pointers are reported, exports hold trainable
weights only; stage hand-off from a real stage-1 export into stage 2 under ZeRO-3."""

from __future__ import annotations

import json
import os

import pytest
import torch
from helpers.toy_launch import launch
from helpers.trainer_toy import ToyModel, toy_config, toy_loader_builder, toy_model_builder
from safetensors.torch import load_file

from mmdist.config.run import load_config
from mmdist.training.checkpoint import CheckpointError, CheckpointManager
from mmdist.training.loop import train


def _train(cfg_dict: dict, **kwargs) -> dict:
    return train(
        load_config(base=cfg_dict), model_builder=toy_model_builder, loader_builder=toy_loader_builder(), **kwargs
    )


def _tensors_in(path) -> dict[str, torch.Tensor]:
    """Every named tensor in a torch checkpoint file (nested dicts flattened with dots)."""
    found: dict[str, torch.Tensor] = {}

    def walk(obj, prefix):
        if isinstance(obj, torch.Tensor):
            found[prefix] = obj
        elif isinstance(obj, dict):
            for k, v in obj.items():
                walk(v, f"{prefix}.{k}" if prefix else str(k))
        elif isinstance(obj, (list, tuple)):
            for i, v in enumerate(obj):
                walk(v, f"{prefix}.{i}")

    walk(torch.load(path, map_location="cpu", weights_only=False), "")
    return found


@pytest.mark.parametrize("zero_stage", [0, 3])
def test_frozen_parameters_are_not_in_checkpoint_files(tmp_path, zero_stage):
    run = tmp_path / "run"
    _train(toy_config(str(run), train={"max_steps": 2}, engine={"zero_stage": zero_stage}))
    ckpt = run / "checkpoints" / "step_000002"
    files = sorted(ckpt.glob("*.pt"))
    assert files, f"no checkpoint files in {ckpt}"
    frozen_numel = sum(p.numel() for p in ToyModel().backbone.parameters())
    frozen_values = [p.detach().flatten() for p in ToyModel().backbone.parameters()]
    saved_elements = 0
    for path in files:
        for name, tensor in _tensors_in(path).items():
            assert "backbone" not in name, f"{path.name} holds frozen parameter {name}"
            saved_elements += tensor.numel() if tensor.is_floating_point() else 0
            # no saved float tensor equals a frozen weight under another name
            for ref in frozen_values:
                if tensor.is_floating_point() and tensor.numel() == ref.numel():
                    assert not torch.equal(tensor.flatten().float(), ref), (
                        f"{path.name}:{name} is a copy of a frozen weight"
                    )
    model_states = [p for p in files if "model_states" in p.name]
    module = torch.load(model_states[0], map_location="cpu", weights_only=False)["module"]
    assert set(module) <= {"norm.weight", "norm.bias", "projector.weight", "projector.bias", "log_scale"}
    # weights + 2 Adam moments of ~100 trainable values, in DeepSpeed's files and again in trainable_state.pt
    # (the world-size-independent copy), far below the frozen count x 1
    assert saved_elements < 8 * 100 + frozen_numel // 2


def test_keep_last_k_checkpoints(tmp_path):
    run = tmp_path / "run"
    _train(toy_config(str(run), train={"max_steps": 4}, checkpoint={"save_every": 1, "keep_last": 2}))
    assert sorted(p.name for p in (run / "checkpoints").glob("step_*")) == ["step_000003", "step_000004"]
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_000004"
    assert not list((run / "checkpoints").glob(".tmp-*"))


def test_crash_mid_save_keeps_previous_checkpoint_and_restart_resumes(tmp_path, monkeypatch):
    run = tmp_path / "run"
    cfg = toy_config(str(run), train={"max_steps": 4}, checkpoint={"save_every": 2})

    def crash(step):
        if step == 4:
            raise RuntimeError("simulated crash while saving step 4")

    monkeypatch.setattr(CheckpointManager, "fail_after_engine_save", crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        _train(cfg)
    ckpts = run / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == "step_000002"  # the pointer still names the complete one
    assert (ckpts / ".tmp-step_000004").is_dir()  # the half-written save was left under its temporary name
    assert not (ckpts / "step_000004").exists()
    monkeypatch.setattr(CheckpointManager, "fail_after_engine_save", None)

    resumed = _train(cfg)
    assert resumed["resumed_from"].endswith("step_000002")
    assert [h["step"] for h in resumed["history"]] == [3, 4]
    assert not (ckpts / ".tmp-step_000004").exists()  # stale temporary folder cleaned
    assert (ckpts / "latest").read_text().strip() == "step_000004"
    _train(toy_config(str(tmp_path / "straight"), train={"max_steps": 4}))
    a = load_file(str(run / "export" / "model.safetensors"))
    b = load_file(str(tmp_path / "straight" / "export" / "model.safetensors"))
    for name in b:
        assert torch.allclose(a[name], b[name], atol=1e-6), name


def test_dangling_latest_pointer_is_reported(tmp_path):
    manager = CheckpointManager(tmp_path / "checkpoints")
    (tmp_path / "checkpoints").mkdir()
    assert manager.latest() is None and manager.resolve_resume("auto") is None
    (tmp_path / "checkpoints" / "latest").write_text("step_000009\n")
    with pytest.raises(CheckpointError, match=r"names 'step_000009' but .* does not exist"):
        manager.latest()
    assert manager.resolve_resume("never") is None
    with pytest.raises(CheckpointError, match="no such checkpoint folder"):
        manager.resolve_resume(str(tmp_path / "nowhere"))


def test_export_holds_trainable_weights_and_manifest(tmp_path):
    run = tmp_path / "run"
    _train(toy_config(str(run), train={"max_steps": 2}))
    weights = load_file(str(run / "export" / "model.safetensors"))
    assert set(weights) == {"norm.weight", "norm.bias", "projector.weight", "projector.bias", "log_scale"}
    assert weights["projector.weight"].shape == (4, 16)  # gathered: full shapes, not ZeRO-3 partitions
    assert json.loads((run / "export" / "manifest.json").read_text()) == ToyModel().manifest()
    assert not (run / "export.tmp").exists()


# ---------------------------------------------------------------------------
# stage hand-off with the real tiny models and demo shards


@pytest.fixture(scope="module")
def demo_shards(tmp_path_factory):
    pytest.importorskip("sklearn")
    from mmdist.data.shards import shard_pattern, write_demo_shards

    out = tmp_path_factory.mktemp("demo")
    written = write_demo_shards(out, image_size=16, samples_per_shard=64, limit=128)
    return shard_pattern(written["train"]), shard_pattern(written["eval"])


def _tiny(stage: str, run_dir, shards, **overrides) -> dict:
    import yaml

    cfg = yaml.safe_load(open(os.path.join(os.path.dirname(__file__), "..", "..", "configs", f"tiny_{stage}.yaml")))
    cfg["run_dir"] = str(run_dir)
    cfg["data"]["train"] = [{"shards": [shards[0]]}]
    cfg["data"]["eval"] = [{"shards": [shards[1]]}]
    cfg["train"].update({"max_steps": 2, "eval_every": 0, "eval_batches": 1})
    cfg["checkpoint"]["save_every"] = 0
    cfg["log"].update({"progress_bar": False, "tensorboard": False, "param_table": False, "peak_flops": 1e9})
    # even the tiny parameters stay partitioned under ZeRO-3, as a 14B model's would
    cfg["engine"]["deepspeed"] = {"zero_optimization": {"stage3_param_persistence_threshold": 0}}
    for key, value in overrides.items():
        node = cfg
        *parents, last = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    return cfg


@pytest.mark.multiproc
@pytest.mark.slow
def test_stage1_export_loads_into_stage2_under_zero3(tmp_path, demo_shards):
    """Stage 1 (align, 2 ranks, ZeRO-3) exports; stage 2 (fuse, 2 ranks, ZeRO-3) loads it: the gathered
    stage-1 weights equal the file on both ranks; a manifest that differs is refused naming the field."""
    align_dir = tmp_path / "align"
    launch(
        tmp_path,
        {"config": _tiny("align", align_dir, demo_shards, **{"engine.zero_stage": 3}), "mode": "real"},
        nproc=2,
        timeout=400,
    )
    export = align_dir / "export"
    assert (export / "model.safetensors").is_file() and (export / "manifest.json").is_file()
    fuse = _tiny(
        "fuse",
        tmp_path / "fuse",
        demo_shards,
        **{"engine.zero_stage": 3, "model.connector.stage1_weights": str(export)},
    )
    report = launch(tmp_path, {"config": fuse, "mode": "stage1_probe"}, nproc=2, timeout=400)
    saved = load_file(str(export / "model.safetensors"))
    assert report["ranks"][0]["stage1_names"], "the fused model has no stage-1 weights"
    for rank_report in report["ranks"]:
        assert rank_report["max_abs_diff"] == 0.0 and rank_report["empty"] == []
        assert set(rank_report["stage1_names"]) <= {k.split("stage1.", 1)[-1] for k in saved}

    manifest = json.loads((export / "manifest.json").read_text())
    bad = tmp_path / "bad_export"
    bad.mkdir()
    (bad / "model.safetensors").write_bytes((export / "model.safetensors").read_bytes())
    manifest["vision"]["select_layer"] = -7  # as if stage 1 had used another layer of the encoder
    (bad / "manifest.json").write_text(json.dumps(manifest))
    fuse_bad = _tiny(
        "fuse",
        tmp_path / "fuse_bad",
        demo_shards,
        **{"engine.zero_stage": 3, "model.connector.stage1_weights": str(bad)},
    )
    with pytest.raises(AssertionError, match=r"vision\.select_layer: stage-1 export has -7"):
        launch(tmp_path, {"config": fuse_bad, "mode": "stage1_probe"}, nproc=2, timeout=400)


def test_restarting_a_finished_run_does_not_rewrite_its_checkpoint(tmp_path):
    run = tmp_path / "run"
    cfg = toy_config(str(run), train={"max_steps": 2})
    _train(cfg)
    ckpt = run / "checkpoints" / "step_000002"
    before = {p.name: p.stat().st_mtime_ns for p in ckpt.iterdir()}
    again = _train(cfg)
    assert again["resumed_from"].endswith("step_000002") and again["history"] == [] and again["finished"]
    assert {p.name: p.stat().st_mtime_ns for p in ckpt.iterdir()} == before
    assert again["checkpoint"] == str(ckpt)


def test_tied_alias_of_a_frozen_weight_is_not_saved():
    """DeepSpeed's own filter misses a frozen weight's tied alias (lm_head.weight = embed_tokens.weight)."""
    from deepspeed.runtime.engine import DeepSpeedEngine

    from mmdist.training.deepspeed_compat import frozen_aliases_excluded

    class Tied(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(50, 8)
            self.head = torch.nn.Linear(8, 50, bias=False)
            self.head.weight = self.embed.weight  # tied, as in SmolLM2 / tie_word_embeddings
            self.embed.weight.requires_grad_(False)
            self.projector = torch.nn.Linear(8, 8)

    class Engine:  # just what DeepSpeedEngine.module_state_dict reads
        def __init__(self):
            self.module = Tied()

        def random_ltd_enabled(self):
            return False

        module_state_dict = DeepSpeedEngine.module_state_dict

    engine = Engine()
    plain = engine.module_state_dict(exclude_frozen_parameters=True)
    assert "head.weight" in plain  # the DeepSpeed behaviour this guards against
    with frozen_aliases_excluded(engine):
        filtered = engine.module_state_dict(exclude_frozen_parameters=True)
    assert set(filtered) == {"projector.weight", "projector.bias"}
    assert "head.weight" in engine.module_state_dict(exclude_frozen_parameters=True)  # restored afterwards


def test_resume_with_another_world_size_is_refused(tmp_path, monkeypatch):
    run = tmp_path / "run"
    _train(toy_config(str(run), train={"max_steps": 2}, checkpoint={"save_every": 2}))
    import mmdist.training.checkpoint as checkpoint

    # a checkpoint from before trainable_state.pt (the world-size-independent copy) and the file list existed
    (run / "checkpoints" / "step_000002" / checkpoint.TRAINABLE_STATE).unlink()
    (run / "checkpoints" / "step_000002" / checkpoint.FILE_LIST).unlink()
    monkeypatch.setattr(checkpoint, "_world_size", lambda: 2)  # as if relaunched on 2 ranks
    with pytest.raises(
        CheckpointError, match=r"written by 1 rank\(s\) and this run has 2, and it has no trainable_state.pt"
    ):
        _train(toy_config(str(run), train={"max_steps": 4}, checkpoint={"save_every": 2}))
