"""Random-init backbones and LoRA adapters start the same under ZeRO-3's zero.Init as in a plain build
(mmdist/models/seeded.py, mmdist/models/lora.py)."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import yaml

from mmdist.config.run import load_config

REPO = Path(__file__).resolve().parents[2]


def _frozen_weights(recipe: dict, zero_stage: int) -> dict[str, torch.Tensor]:
    """Every backbone's parameters (LoRA adapters included),
    gathered whole, as the engine of ``zero_stage`` builds them."""
    import deepspeed

    from mmdist import distributed as dist
    from mmdist.training.engine import build_engine

    cfg = copy.deepcopy(recipe)
    cfg["engine"]["zero_stage"] = zero_stage
    dist.init(backend="gloo")
    bundle = None
    try:
        bundle = build_engine(load_config(base=cfg), world_size=1)
        out = {}
        for part in ("vision", "llm", "text"):
            module = getattr(bundle.model, part, None)
            if module is None:
                continue
            params = dict(module.named_parameters())
            with deepspeed.zero.GatheredParameters(list(params.values()), enabled=zero_stage == 3):
                out.update({f"{part}.{n}": p.detach().float().clone() for n, p in params.items()})
        return out
    finally:
        if bundle is not None:
            bundle.close()
        dist.shutdown()


@pytest.mark.parametrize("recipe_name", ["tiny_fuse", "tiny_align"])
def test_random_init_backbones_are_the_same_on_zero2_and_zero3(tmp_path, recipe_name):
    """The tiny recipes' random ViT, LLM and BERT: the same values whether built plain (ZeRO-2) or partitioned (ZeRO-3);
    before, the same seed gave weights up to 0.14 apart, so a stage-1 export met another frozen tower in stage 2."""
    recipe = yaml.safe_load((REPO / "configs" / f"{recipe_name}.yaml").read_text())
    recipe["run_dir"] = str(tmp_path / "run")
    plain, partitioned = _frozen_weights(recipe, 2), _frozen_weights(recipe, 3)
    assert set(plain) == set(partitioned) and len(plain) > 10
    assert any(k.startswith("vision.") for k in plain)
    different = [k for k in plain if not torch.equal(plain[k], partitioned[k])]
    assert not different, different[:5]


def test_lora_adapters_start_at_zero_delta_under_zero3(tmp_path):
    """peft creates LoRA's B as zeros so the adapted LLM starts as the base one. Under zero.Init its zeros_ wrote into
    an empty partition and B kept nn.Linear's random init (|B| up to 0.5): stage 2 began from a perturbed LLM."""
    recipe = yaml.safe_load((REPO / "configs" / "tiny_fuse.yaml").read_text())
    recipe["run_dir"] = str(tmp_path / "run")
    recipe["model"]["llm"]["lora"] = {"enabled": True, "r": 4, "alpha": 8}
    for zero_stage in (2, 3):
        weights = _frozen_weights(recipe, zero_stage)
        b = [v for k, v in weights.items() if "lora_B" in k]
        a = [v for k, v in weights.items() if "lora_A" in k]
        assert b and all(not v.any() for v in b), zero_stage  # B = 0: no change to the LLM at the start
        assert a and all(v.abs().sum() > 0 for v in a), zero_stage  # A random, so B gets a gradient
