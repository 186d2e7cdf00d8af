"""Stage hand-off: a stage-1 export loads into stage 2, mismatched manifests are refused naming the field,
and a stage-2 export rebuilds the trained model for inference."""

from __future__ import annotations

import json

import pytest
import torch
from helpers.tiny import align_batch, fuse_batch, make_cfg, make_model

from mmdist.export import load_stage1, read_export, save_export
from mmdist.materialize import build_run_model, load_fused_model
from mmdist.models.fused import FusedVLM


def _train_a_step(model, batch):
    model.train()
    opt = torch.optim.AdamW([p for ps in model.trainable_groups().values() for p in ps], lr=1e-2)
    model(batch)["loss"].backward()
    opt.step()
    model.eval()


@pytest.fixture(scope="module")
def stage1_export(tmp_path_factory):
    model = make_model("align", "mlp")
    _train_a_step(model, align_batch(model))
    folder = tmp_path_factory.mktemp("stage1") / "export"
    save_export(model, str(folder))
    return folder, model


def test_stage1_export_files_and_manifest(stage1_export):
    folder, model = stage1_export
    state, manifest = read_export(str(folder))
    assert set(state) == set(model.export_state_dict())
    assert "stage1.image_head.0.weight" in state and "stage1.text_head.0.weight" in state and "logit_scale" in state
    assert not any(k.startswith(("vision.", "text.")) for k in state)  # frozen encoders are not exported
    assert manifest["stage"] == "align" and manifest["connector"]["type"] == "mlp"
    assert manifest["vision"]["fingerprint"].startswith("init:") and manifest["vision"]["num_tokens"] == 16
    assert manifest["connector"]["shapes"]["image_head.0.weight"] == [32, 32]
    json.dumps(manifest)  # plain JSON


def test_stage1_weights_load_into_stage2(stage1_export):
    folder, stage1 = stage1_export
    model = make_model("fuse", "mlp", model={"connector": {"stage1_weights": str(folder)}})
    assert model.stage1 is not None and model.stage1.text_head is None
    for name, value in stage1.stage1.image_head.state_dict().items():
        assert torch.equal(model.stage1.image_head.state_dict()[name], value), name
    assert model.projector.in_dim == 32 and model.num_image_tokens == 16
    assert set(model.trainable_groups()) == {"stage1", "projector"}
    # Same image tokens as the stage-1 module computes.
    pixels = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(model.stage1.image_tokens_of(model.encode_images(pixels)),
                                   stage1.stage1.image_tokens_of(stage1.encode_images(pixels)))
    # A run folder works too, and load_stage1 can be called again explicitly.
    report = load_stage1(model, str(folder.parent))
    assert "text_head.0.weight" in report["ignored"]


def test_frozen_stage1_module_in_stage2(stage1_export):
    folder, _ = stage1_export
    model = make_model(
        "fuse", "mlp", model={"connector": {"stage1_weights": str(folder), "train_stage1_module": False}}
    )
    assert set(model.trainable_groups()) == {"projector"}
    assert not any(p.requires_grad for p in model.stage1.parameters())


@pytest.mark.parametrize("override,field", [
    ({"vision": {"init_seed": 5}}, "vision.fingerprint"),
    ({"vision": {"select_layer": -2}}, "vision.select_layer"),
    ({"connector": {"align_dim": 16}}, "connector.align_dim"),
    ({"connector": {"type": "linear"}}, "connector.type"),
    ({"text": {"init_seed": 9}}, "text.fingerprint"),
])
def test_mismatched_manifest_is_refused_naming_the_field(stage1_export, override, field):
    folder, _ = stage1_export
    model_overrides = {"connector": {"stage1_weights": str(folder)}}
    for key, value in override.items():
        model_overrides[key] = {**model_overrides.get(key, {}), **value}
    with pytest.raises(ValueError, match=field.replace(".", r"\.") + ": stage-1 export has"):
        make_model("fuse", "mlp", model=model_overrides)


def test_qformer_stage1_export_loads_into_stage2(tmp_path):
    align = make_model("align", "qformer")
    _train_a_step(align, align_batch(align))
    save_export(align, str(tmp_path / "s1"))
    state, _ = read_export(str(tmp_path / "s1"))
    assert any(k.startswith("text.") for k in state)  # the trained text encoder is exported with the Q-Former
    model = make_model("fuse", "qformer", model={"connector": {"stage1_weights": str(tmp_path / "s1")}})
    assert model.num_image_tokens == 4 and model.processors.num_image_tokens == 4
    assert torch.equal(model.stage1.queries, align.stage1.queries)
    pixels = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(model.stage1.image_tokens_of(model.encode_images(pixels)),
                                   align.stage1.image_tokens_of(align.encode_images(pixels)))
    out = model(fuse_batch(model))
    out["loss"].backward()
    assert model.stage1.queries.grad is not None


def test_stage2_export_rebuilds_the_trained_model(stage1_export, tmp_path):
    folder, _ = stage1_export
    model = make_model("fuse", "mlp", model={"connector": {"stage1_weights": str(folder)}})
    batch = fuse_batch(model)
    _train_a_step(model, batch)
    save_export(model, str(tmp_path / "run" / "export"))
    restored = load_fused_model(str(tmp_path / "run"))
    assert isinstance(restored, FusedVLM)
    with torch.no_grad():
        torch.testing.assert_close(restored(batch)["loss"], model(batch)["loss"])
    for name, value in model.projector.state_dict().items():
        assert torch.equal(restored.projector.state_dict()[name], value)
    # Inference needs no stage-1 export: the stage-2 manifest embeds it.
    state, manifest = read_export(str(tmp_path / "run"))
    assert manifest["stage1"]["stage"] == "align" and "stage1.image_head.0.weight" in state
    with pytest.raises(ValueError, match="inference needs a stage 'fuse' export"):
        load_fused_model(str(folder))


def test_build_model_returns_processors_for_both_stages():
    align = build_run_model(make_cfg("align"))
    fuse = build_run_model(make_cfg("fuse"))
    assert align.processors.text_tokenizer is not None and align.processors.tokenizer is None
    assert fuse.processors.tokenizer is not None and fuse.processors.image_token_id == fuse.image_token_id
    assert align.processors.fingerprint() != fuse.processors.fingerprint()
    img = align.processors.image_transform
    assert (img.size, img.mean) == (16, [0.5, 0.5, 0.5])


def test_wrong_stage1_path_fails_before_the_llm_loads(tmp_path, monkeypatch):
    from helpers.configs import tiny_run_config

    import mmdist.models.build as build
    from mmdist.materialize import build_run_model

    loaded = []
    monkeypatch.setattr(build, "load_llm", lambda cfg: loaded.append(cfg) or pytest.fail("the LLM was loaded first"))
    cfg = tiny_run_config("fuse", f"model.connector.stage1_weights={tmp_path / 'nope'}")
    with pytest.raises(FileNotFoundError, match="model.connector.stage1_weights"):
        build_run_model(cfg)
    assert not loaded
