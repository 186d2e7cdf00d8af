"""Quantized frozen parts (mmdist/models/quantize.py): refusals naming the key, training through a quantized frozen
LLM (plain and through a bf16 DeepSpeed engine, whose cast must leave the packed weights alone), QLoRA, byte counts.

bitsandbytes and torchao are the optional extra mmdist[quant]; without them these tests skip, except the refusals
and the missing-backend message.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
from helpers.configs import RECIPES, TEST_OVERRIDES, tiny_run_config

from mmdist.config import ConfigError, load_config
from mmdist.config.quantization import hf_export_problem
from mmdist.models import build_model
from mmdist.models import quantize as quantize_mod
from mmdist.models.freeze import param_table, quantized_kind
from mmdist.models.quantize import quantized_bytes, quantized_tensors, resolve_backend

HAS = {name: importlib.util.find_spec(name) is not None for name in ("bitsandbytes", "torchao")}
COMBOS = [pytest.param(m, b, marks=pytest.mark.skipif(not HAS[b], reason=f"{b} not installed (extra mmdist[quant])"))
          for m, b in (("int8", "bitsandbytes"), ("nf4", "bitsandbytes"), ("int8", "torchao"), ("nf4", "torchao"))]


def recipe(*overrides: str):
    return load_config(RECIPES / "tiny_fuse.yaml", [*TEST_OVERRIDES, *overrides])


def batch_for(model) -> dict:
    """One image and a four-token answer."""
    n = model.num_image_tokens
    ids = torch.cat([torch.full((1, n), model.image_token_id), torch.tensor([[65, 66, 67, 68]])], 1)
    labels = ids.clone()
    labels[:, :n] = -100
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels, "pixel_values": torch.randn(1, 3, 16, 16)}


def quantized_state(llm) -> dict:
    """Name -> a copy of the packed data of every quantized weight."""
    return {n: p.data.clone() if type(p.data).__name__ not in ("Int8Tensor", "NF4Tensor") else
            [t.clone() for t in (getattr(p.data, a) for a in p.data.__tensor_flatten__()[0])]
            for n, p in quantized_tensors(llm)}


def same(a, b) -> bool:
    if isinstance(a, list):
        return all(torch.equal(x, y) for x, y in zip(a, b))
    return torch.equal(a, b)


# ---------------------------------------------------------------------------
# refusals


@pytest.mark.parametrize("overrides,key,words", [
    (("model.llm.quantize=int8", "model.llm.freeze=false"), "model.llm.quantize", "trainable"),
    (("model.vision.quantize=nf4", "model.vision.freeze=false"), "model.vision.quantize", "trainable"),
    (("model.llm.quantize=int8", "engine.zero_stage=3"), "model.llm.quantize", "cannot be partitioned"),
    (("model.llm.quantize=nf4", "engine.zero_stage=3"), "model.llm.quantize", "bnb_4bit_quant_storage"),
    (("model.llm.quantize=int8", "model.llm.quantize_backend=torchao", "model.llm.lora.enabled=true"),
     "model.llm.quantize_backend", "peft has no LoRA layer for torchao"),
])
def test_impossible_combination_is_refused_naming_the_key(overrides, key, words):
    with pytest.raises(ConfigError) as err:
        recipe(*overrides)
    assert key in str(err.value) and words in str(err.value)


def test_unknown_quantize_value_is_refused():
    with pytest.raises(ConfigError) as err:
        recipe("model.llm.quantize=int4")
    assert "model.llm.quantize" in str(err.value)


def test_quantized_combinations_that_work_are_accepted():
    cfg = recipe("model.llm.quantize=nf4", "model.llm.lora.enabled=true", "model.vision.quantize=int8", "engine.zero_stage=2")
    assert cfg.model.llm.quantize == "nf4" and cfg.model.vision.quantize == "int8"


def test_missing_backend_names_the_setting_and_the_extra(monkeypatch):
    monkeypatch.setattr(quantize_mod, "_importable", lambda name: False)
    with pytest.raises(ValueError, match=r"model.llm.quantize_backend=bitsandbytes.*mmdist\[quant\]"):
        resolve_backend("int8", "bitsandbytes", "model.llm.quantize_backend")
    with pytest.raises(ValueError, match=r"model.llm.quantize=nf4 needs bitsandbytes or torchao.*mmdist\[quant\]"):
        resolve_backend("nf4", "auto", "model.llm.quantize_backend")


def test_auto_backend_prefers_bitsandbytes_and_says_why(monkeypatch, caplog):
    monkeypatch.setattr(quantize_mod, "_importable", lambda name: True)
    with caplog.at_level("INFO", logger="mmdist.models.quantize"):
        assert resolve_backend("int8", "auto", "model.llm.quantize_backend") == "bitsandbytes"
    assert "model.llm.quantize_backend = bitsandbytes (auto)" in caplog.text and "QLoRA" in caplog.text
    monkeypatch.setattr(quantize_mod, "_importable", lambda name: name == "torchao")
    assert resolve_backend("int8", "auto", "model.llm.quantize_backend") == "torchao"


def test_hf_export_of_a_quantized_run_needs_dequantize():
    cfg = recipe("model.llm.quantize=int8")
    assert "dequantize" in hf_export_problem(cfg, dequantize=False) and "model.llm.quantize=int8" in hf_export_problem(cfg, False)
    assert hf_export_problem(cfg, dequantize=True) is None and hf_export_problem(recipe(), dequantize=False) is None


# ---------------------------------------------------------------------------
# training through the quantized LLM


@pytest.mark.parametrize("method,backend", COMBOS)
def test_gradients_reach_the_projector_through_a_quantized_llm(method, backend):
    model = build_model(tiny_run_config("fuse", f"model.llm.quantize={method}", f"model.llm.quantize_backend={backend}").model,
                        stage="fuse")
    before = quantized_state(model.llm)
    assert before, "no weight was quantized"
    model.train()
    model(batch_for(model))["loss"].backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.projector.parameters() if p.dim() > 1)
    assert all(p.grad is None and not p.requires_grad for p in model.llm.parameters())
    after = quantized_state(model.llm)
    assert all(same(before[n], after[n]) for n in before)
    assert method in param_table(model).split("llm", 1)[1].splitlines()[0]


@pytest.mark.parametrize("method,backend", COMBOS)
def test_quantized_weights_survive_a_bf16_deepspeed_engine_and_its_step(tmp_path, method, backend):
    """A bf16 engine casts every floating parameter, frozen ones too: the packed weights must stay packed and unchanged."""
    from mmdist.precision import resolve_precision
    from mmdist.training import dist
    from mmdist.training.engine import build_engine

    cfg, _ = resolve_precision(recipe("engine.zero_stage=2", "engine.precision=bf16", "engine.torch_adam=true", "train.lr_scheduler=constant",
                                      "train.global_batch_size=2",
                                      f"model.llm.quantize={method}", f"model.llm.quantize_backend={backend}",
                                      f"run_dir={tmp_path}"), "cpu")
    dist.init(dist.discover(argv=[], environ={}), backend="gloo", timeout_s=60)
    bundle = build_engine(cfg, world_size=1)
    try:
        model = bundle.model
        assert method in {quantized_kind(t) for _, t in quantized_tensors(model.llm)}
        before = quantized_state(model.llm)
        projector = [p.detach().float().clone() for p in model.projector.parameters()]
        out = bundle.engine(batch_for(model))
        bundle.engine.backward(out["loss"])
        bundle.engine.step()
        assert torch.isfinite(out["loss"])
        assert all(same(before[n], v) for n, v in quantized_state(model.llm).items())
        assert any(not torch.equal(a, p.detach().float()) for a, p in zip(projector, model.projector.parameters()))
        assert not any(p.requires_grad for p in model.llm.parameters())
    finally:
        bundle.close()
        dist.shutdown()


@pytest.mark.skipif(not HAS["bitsandbytes"], reason="bitsandbytes not installed (extra mmdist[quant])")
def test_qlora_trains_adapters_on_bitsandbytes_layers_and_exports_only_trainable_weights():
    model = build_model(tiny_run_config("fuse", "model.llm.quantize=nf4", "model.llm.lora.enabled=true",
                                        "model.llm.lora.r=4").model, stage="fuse")
    assert "lora" in model.trainable_groups()
    model.train()
    model(batch_for(model))["loss"].backward()
    lora = dict((n, p) for n, p in model.llm.named_parameters() if "lora_B" in n)  # B starts at zero, so A's gradient is zero
    assert lora and all(p.grad is not None and p.grad.abs().sum() > 0 for p in lora.values())
    state = model.export_state_dict()
    merged = [k for k in state if k.startswith("llm.")]
    assert merged and all(state[k].is_floating_point() for k in merged)  # dequantized W + BA, not packed int data
    assert all(k.startswith(("projector.", "stage1.", "llm.")) for k in state)


@pytest.mark.parametrize("method,backend", COMBOS)
def test_quantized_bytes_shrink(method, backend):
    """The tiny LLM's linears are a small share next to its embeddings, so the ratio here is loose; the 135M
    model's is measured by benchmarks/bench_quantized.py."""
    plain = build_model(tiny_run_config("fuse").model, stage="fuse")
    quant = build_model(tiny_run_config("fuse", f"model.llm.quantize={method}", f"model.llm.quantize_backend={backend}").model,
                        stage="fuse")
    linear = sum(p.numel() * 4 for n, p in plain.llm.named_parameters() if n.endswith("proj.weight"))
    saved = quantized_bytes(plain.llm) - quantized_bytes(quant.llm)
    expect = 0.72 if method == "int8" else 0.78  # fp32 -> int8 (+ scales) / nf4 (+ absmax per 64, code table)
    assert saved > expect * linear


@pytest.mark.skipif(not HAS["bitsandbytes"], reason="bitsandbytes not installed (extra mmdist[quant])")
def test_vision_tower_quantizes_too():
    model = build_model(tiny_run_config("fuse", "model.vision.quantize=int8").model, stage="fuse")
    assert any(quantized_kind(t) == "int8" for _, t in quantized_tensors(model.vision))
    assert model.encode_images(torch.randn(1, 3, 16, 16)).shape[0] == 1
    assert model.processors.identity["quantize"] == "int8"  # a feature cache of the unquantized tower is not reused


# ---------------------------------------------------------------------------
# the planner


def test_plan_counts_quantized_frozen_bytes_and_says_what_fits(capsys):
    from mmdist.commands import plan

    recipe_path = str(RECIPES / "fuse.yaml")
    args = ["--config", recipe_path, "--no-deepspeed", "--gpus", "1", "--gpu-memory", "40GB", "engine.zero_stage=2"]
    assert plan.main(args) == 0
    assert "with model.llm.quantize=int8" in capsys.readouterr().out  # 14B bf16 does not fit 40 GB at ZeRO 0-2
    assert plan.main([*args, "model.llm.quantize=nf4"]) == 0
    out = capsys.readouterr().out
    line = next(ln for ln in out.splitlines() if ln.startswith("quantized: model.llm.quantize=nf4"))
    ratio = float(line.split("(")[1].split("x)")[0])
    assert 0.3 < ratio <= 0.36 and "fits at" in out  # 0.5 byte + absmax per 64 on the linears, embeddings kept


def test_planned_bytes_per_param():
    from mmdist.plan.quantized import planned_bytes_per_param

    assert planned_bytes_per_param("int8") == pytest.approx(1.0039, abs=1e-3)
    assert planned_bytes_per_param("nf4") == pytest.approx(0.5625)
