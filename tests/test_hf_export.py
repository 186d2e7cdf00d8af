"""`mmdist export --format hf`: a tiny stage-2 export becomes a LlavaForConditionalGeneration folder that plain
transformers loads, in a fresh Python process that never imports mmdist, and computes what mmdist computes;
chains with no exact Llava form are refused naming their shapes.

The exports are built in code from the tiny recipes' settings (tiny_run_config), with the trainable weights
(stage-1 head, projector, LoRA) randomised so that a wrong fold or a lost LoRA merge shows in the logits.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers.configs import dotted, tiny_run_config

from mmdist.commands.export import main as cli_main
from mmdist.config.run import RunConfig
from mmdist.export import save_export
from mmdist.hf_export import ExportRefused, Linear, check_hf_exportable, fold_chain
from mmdist.materialize import build_run_model

PROMPT = "What digit is this?"
MAX_NEW_TOKENS = 8
CLIP_TOWER = {
    "source": "hf",
    "init_config": {
        "model_type": "clip_vision_model",
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "image_size": 16,
        "patch_size": 4,
    },
    "select_layer": -2,
    "select_tokens": "patch",
    "image_mean": [0.5],
    "image_std": [0.25],
}
QWEN2_LLM = {"init_config": {"model_type": "qwen2", "vocab_size": 300, "hidden_size": 64, "intermediate_size": 128,
                             "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                             "max_position_embeddings": 512, "tie_word_embeddings": False,
                             "bos_token_id": 257, "eos_token_id": 258, "pad_token_id": 256}}
LORA = {"lora": {"enabled": True, "r": 4, "alpha": 8, "dropout": 0.0}}

# Runs in a fresh interpreter (-I: no PYTHONPATH, no user site, no script folder on sys.path). Any attempt to
# import mmdist fails loudly, and the end asserts it never was imported.
CHILD = r"""
import importlib.abc, json, sys
class NoMmdist(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "mmdist" or name.startswith("mmdist."):
            raise ImportError("the exported folder must load without mmdist")
sys.meta_path.insert(0, NoMmdist())
import torch
from PIL import Image
from transformers import AutoProcessor, LlavaForConditionalGeneration

request = json.loads(sys.argv[1])
image = Image.open(request["image"])
for folder, out in request["exports"]:
    model, info = LlavaForConditionalGeneration.from_pretrained(folder, output_loading_info=True)
    model.eval()
    processor = AutoProcessor.from_pretrained(folder, backend="pil")
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": request["prompt"]}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(images=image, text=text, return_tensors="pt")
    with torch.no_grad():
        logits = model(**inputs).logits
        new = model.generate(**inputs, max_new_tokens=request["max_new_tokens"])[:, inputs["input_ids"].shape[1]:]
    torch.save({"input_ids": inputs["input_ids"][0], "pixel_values": inputs["pixel_values"][0], "logits": logits[0],
                "new_ids": new[0], "answer": processor.decode(new[0], skip_special_tokens=True).strip(),
                "loading": {k: [str(x) for x in v] for k, v in info.items()}}, out)
assert "mmdist" not in sys.modules, "mmdist was imported"
print("ok")
"""


def _cfg(stage: str, connector_type: str = "mlp", data: dict | None = None, **model) -> RunConfig:
    """The tiny recipe of ``stage`` with ``model`` sections; an
    ``init_config`` given here replaces the recipe's whole."""
    model = {part: dict(settings) for part, settings in model.items()}
    replaced = [f"model.{part}.init_config={json.dumps(settings.pop('init_config'))}"
                for part, settings in model.items() if "init_config" in settings]
    return tiny_run_config(stage, *dotted({"model": model, "data": data or {}}), *replaced, connector=connector_type)


@torch.no_grad()
def _randomise(module: torch.nn.Module, pattern: str = "") -> None:
    gen = torch.Generator().manual_seed(1)
    for name, p in module.named_parameters():
        if pattern in name:
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)


def _stage1_export(root: Path, connector: str, **model) -> Path:
    align = build_run_model(_cfg("align", connector, **model))
    _randomise(align.stage1)
    return Path(save_export(align, str(root / f"align-{connector}")))


def _fuse_export(root: Path, name: str, data: dict | None = None, **model) -> Path:
    """A stage-2 export with randomised trainable weights (LoRA B too, so the merge changes the LLM)."""
    torch.manual_seed(0)
    fused = build_run_model(_cfg("fuse", data=data, **model))
    _randomise(fused.projector)
    if fused.stage1 is not None:
        _randomise(fused.stage1)
    _randomise(fused.llm, "lora_B")
    return Path(save_export(fused, str(root / name / "export")))


def _image(path: Path) -> Path:
    """A non-square RGB image, so the resize is exercised."""
    from PIL import Image

    array = np.random.default_rng(0).integers(0, 256, (21, 27, 3), dtype=np.uint8)
    Image.fromarray(array).save(path)
    return path


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """name -> (stage-2 export, HF folder): the three foldable chains, with and without LoRA."""
    root = tmp_path_factory.mktemp("hf")
    linear_head = _stage1_export(root, "linear", vision=CLIP_TOWER)
    mlp_head = _stage1_export(root, "mlp")
    cases = {
        # CLIP tower, patches (strategy default), llama, linear stage-1
        # head folded into linear_1 + MLP projector, plain template
        "clip-llama-linear-head": _fuse_export(
            root,
            "a",
            data={"template": "plain"},
            vision=CLIP_TOWER,
            connector={"type": "linear", "stage1_weights": str(linear_head)},
        ),
        # CLIP tower, all tokens (strategy full), Qwen2 (untied,
        # image token inside the vocabulary), MLP projector, LoRA,
        # template 'auto' = the tiny tokenizer's ChatML chat template
        "clip-qwen2-lora": _fuse_export(
            root, "b", vision={**CLIP_TOWER, "select_tokens": "all", "select_layer": -1}, llm=QWEN2_LLM | LORA
        ),
        # ViT tower, llama + LoRA, mlp stage-1 head (width 32 < 64) +
        # linear projector: padded into linear_1 -> gelu -> linear_2
        "vit-llama-mlp-head-lora": _fuse_export(
            root, "c", llm=LORA, connector={"type": "mlp", "stage1_weights": str(mlp_head), "projector_layers": 1}
        ),
    }
    out = {}
    for name, export in cases.items():
        assert cli_main(["--run", str(export.parent), "--format", "hf", "--out", str(root / f"hf-{name}")]) == 0
        out[name] = (export, root / f"hf-{name}")
    return out


@pytest.fixture(scope="module")
def transformers_results(exports, tmp_path_factory):
    """What plain transformers computes on each HF folder, from one fresh interpreter that never imports mmdist."""
    root = tmp_path_factory.mktemp("child")
    image = _image(root / "image.png")
    request = {"image": str(image), "prompt": PROMPT, "max_new_tokens": MAX_NEW_TOKENS,
               "exports": [[str(hf), str(root / f"{name}.pt")] for name, (_, hf) in exports.items()]}
    done = subprocess.run(
        [sys.executable, "-I", "-c", CHILD, json.dumps(request)],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=600,
        env={"PATH": "/usr/bin:/bin", "HOME": str(root)},
    )
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]
    return image, {name: torch.load(root / f"{name}.pt") for name in exports}


@pytest.mark.parametrize("name", ["clip-llama-linear-head", "clip-qwen2-lora", "vit-llama-mlp-head-lora"])
def test_transformers_reproduces_mmdist(name, exports, transformers_results):
    from PIL import Image

    from mmdist import generate
    from mmdist.commands import generate as generate_command

    image_path, results = transformers_results
    theirs = results[name]
    assert theirs["loading"]["missing_keys"] == [] and theirs["loading"]["unexpected_keys"] == []
    model = generate_command.load_model(exports[name][0])
    image = Image.open(image_path)

    ids = generate.prompt_ids(model, PROMPT)
    assert theirs["input_ids"].tolist() == ids  # same template, same <image> expansion, same tokens
    # mmdist resizes with torch's uint8 kernels, transformers' PIL backend with PIL's: the same filters, within
    # 2 levels of 255 (tests/data/test_image_pipeline.py states the tolerance); the model is compared on one input.
    transform = model.processors.image_transform
    levels = ((theirs["pixel_values"] - transform(image)) * torch.tensor(transform.std).view(3, 1, 1) * 255).abs()
    pixel_diff = float(levels.max())
    assert pixel_diff <= 2 + 1e-3 and float(levels.mean()) <= 0.25
    pixels = theirs["pixel_values"]

    with torch.no_grad():
        input_ids = torch.tensor([ids])
        embeds = model.embed(input_ids, model.image_embeddings(pixels[None]))
        logits = model.llm(inputs_embeds=embeds, attention_mask=torch.ones_like(input_ids)).logits[0]
    vocab = logits.shape[-1]
    diff = float((theirs["logits"][:, :vocab] - logits).abs().max())
    print(
        f"{name}: max abs logit difference {diff:.2e}, pixel difference "
        f"{pixel_diff:.2f} levels, answer ids {theirs['new_ids'].tolist()}"
    )
    assert diff <= 1e-4
    # added placeholder rows are zero (and suppressed in generate)
    assert bool((theirs["logits"][:, vocab:] == 0).all())

    ours = generate.answer_images(model, [image], PROMPT, max_new_tokens=MAX_NEW_TOKENS)[0]
    with torch.no_grad():
        new = model.generate(input_ids, pixel_values=pixels[None], max_new_tokens=MAX_NEW_TOKENS)[0]
    assert theirs["new_ids"].tolist() == new.tolist()
    assert theirs["answer"] == ours


def test_hf_folder_layout(exports):
    export, hf = exports["clip-qwen2-lora"]
    config = json.loads((hf / "config.json").read_text())
    assert config["model_type"] == "llava" and config["vision_feature_select_strategy"] == "full"
    assert config["vision_feature_layer"] == -1 and config["image_seq_length"] == 17  # 16 patches + class token
    assert "_attn_implementation" not in config["text_config"]
    processor = json.loads((hf / "processor_config.json").read_text())
    assert processor["num_additional_image_tokens"] == 1 and processor["patch_size"] == 4
    a = json.loads((exports["clip-llama-linear-head"][1] / "config.json").read_text())
    assert a["vision_feature_select_strategy"] == "default" and a["projector_hidden_act"] == "gelu"
    generation = json.loads((exports["clip-llama-linear-head"][1] / "generation_config.json").read_text())
    # the image token row added to the tiny vocab
    assert generation["suppress_tokens"] == [259] and generation["do_sample"] is False


def test_mmdist_format_copies_the_export(exports, tmp_path):
    export, _ = exports["clip-llama-linear-head"]
    assert cli_main(["--run", str(export.parent), "--out", str(tmp_path / "copy")]) == 0
    from safetensors.torch import load_file

    original, copied = load_file(export / "model.safetensors"), load_file(tmp_path / "copy" / "model.safetensors")
    assert set(original) == set(copied) and all(torch.equal(original[k], copied[k]) for k in original)
    assert json.loads((tmp_path / "copy" / "manifest.json").read_text()) == json.loads(
        (export / "manifest.json").read_text()
    )


# ---------------------------------------------------------------------------
# refusals


def _linear(n_in: int, n_out: int, where: str, seed: int) -> Linear:
    gen = torch.Generator().manual_seed(seed)
    return Linear(
        torch.randn(n_out, n_in, generator=gen, dtype=torch.float64),
        torch.randn(n_out, generator=gen, dtype=torch.float64),
        where,
    )


@pytest.mark.parametrize("chain_kind", ["linear", "linear+mlp", "mlp+linear", "mlp"])
def test_fold_is_exact(chain_kind):
    """Each foldable chain computes the same as its Llava projector (fp32, 1e-5)."""
    from transformers.activations import ACT2FN

    head = {
        "linear": [],
        "linear+mlp": [_linear(8, 6, "head", 1)],
        "mlp+linear": [_linear(8, 5, "head", 1), "GELU", _linear(5, 5, "head", 2)],
        "mlp": [],
    }[chain_kind]
    width = 8 if not head else head[-1].weight.shape[0]
    tail = (
        [_linear(width, 12, "proj", 3)]
        if chain_kind in ("linear", "mlp+linear")
        else [_linear(width, 12, "proj", 3), "GELU", _linear(12, 12, "proj", 4)]
    )
    chain = head + tail
    folded = fold_chain(chain, 12)
    x = torch.randn(3, 8, dtype=torch.float64)
    expected = x
    for item in chain:
        expected = torch.nn.functional.gelu(expected) if item == "GELU" else expected @ item.weight.T + item.bias
    w1, b1 = folded.linear_1
    w2, b2 = folded.linear_2
    got = ACT2FN[folded.act](x.float() @ w1.T + b1) @ w2.T + b2
    torch.testing.assert_close(got, expected.float(), rtol=1e-5, atol=1e-5)


def test_two_nonlinearities_are_refused_naming_the_shapes():
    chain = [_linear(32, 32, "stage-1 mlp head", 1), "GELU", _linear(32, 32, "stage-1 mlp head", 2),
             _linear(32, 64, "projector (2 layer(s))", 3), "GELU", _linear(64, 64, "projector (2 layer(s))", 4)]
    with pytest.raises(ExportRefused) as err:
        fold_chain(chain, 64)
    message = str(err.value)
    assert "stage-1 mlp head: Linear(32->32) -> GELU -> Linear(32->32)" in message
    assert "projector (2 layer(s)): Linear(32->64) -> GELU -> Linear(64->64)" in message
    assert "2 nonlinearities" in message


def test_hidden_wider_than_the_llm_is_refused():
    chain = [
        _linear(32, 128, "stage-1 mlp head", 1),
        "GELU",
        _linear(128, 128, "stage-1 mlp head", 2),
        _linear(128, 64, "projector (1 layer(s))", 3),
    ]
    with pytest.raises(ExportRefused, match=r"hidden width of 128 .* LLM's width 64"):
        fold_chain(chain, 64)


def test_refusals_from_the_export(tmp_path, capsys):
    """Refused from the export alone (before any backbone loads), with the reason on stderr and exit code 2."""
    mlp_head = _stage1_export(tmp_path, "mlp")
    cases = {
        "two-gelus": (
            {"connector": {"type": "mlp", "stage1_weights": str(mlp_head)}},
            r"stage-1 mlp head: Linear\(32->32\) -> GELU -> Linear\(32->32\), "
            r"then projector \(2 layer\(s\)\): Linear\(32->64\)",
        ),
        "pooling": (
            {"connector": {"image_tokens": 4}},
            r"image_tokens=4 pools the vision tower's 16 tokens of width 32",
        ),
        "cls": ({"vision": {"select_tokens": "cls"}}, r"select_tokens=cls"),
    }
    for name, (model, pattern) in cases.items():
        export = _fuse_export(tmp_path, name, **model)
        with pytest.raises(ExportRefused, match=pattern):
            check_hf_exportable(str(export))
        assert cli_main(["--run", str(export), "--format", "hf", "--out", str(tmp_path / f"hf-{name}")]) == 2
        assert "error:" in capsys.readouterr().err
        assert not (tmp_path / f"hf-{name}").exists()


def test_qformer_is_refused_with_the_reason(tmp_path):
    align = build_run_model(_cfg("align", "qformer"))
    stage1 = save_export(align, str(tmp_path / "s1"))
    export = _fuse_export(
        tmp_path,
        "q",
        text={"freeze": False},
        connector={"type": "qformer", "stage1_weights": str(stage1), "projector_layers": 1},
    )
    with pytest.raises(ExportRefused, match=r"Blip2QFormerModel\.layernorm"):
        check_hf_exportable(str(export))


@pytest.mark.parametrize("geometry", [{"resize": "shortest_edge"}, {"pad_to_square": True}, {}])
def test_image_processor_reproduces_each_geometry(geometry):
    """CLIP's shortest edge + centre crop, LLaVA-1.5's pad to square with the CLIP mean, and a square resize."""
    from PIL import Image

    from mmdist.hf_export import image_processor_of
    from mmdist.models.processors import ImageTransform

    clip_mean, clip_std = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]
    transform = ImageTransform(32, clip_mean, clip_std, **geometry)
    image = Image.fromarray(np.random.default_rng(2).integers(0, 256, (41, 67, 3), dtype=np.uint8))
    theirs = image_processor_of(transform)(image, return_tensors="pt")["pixel_values"][0]
    levels = ((theirs - transform(image)) * torch.tensor(clip_std).view(3, 1, 1) * 255).abs()
    assert theirs.shape == (3, 32, 32) and float(levels.max()) <= 2 + 1e-3 and float(levels.mean()) <= 0.25
