"""The tests' tiny run configs: the shipped tiny recipes (configs/tiny_align.yaml, configs/tiny_fuse.yaml)
loaded with ``mmdist.config.run.load_config`` and a few overrides, so tests run what the recipes ship.

``TEST_OVERRIDES`` lists, once, where a test run differs from the recipe and why; a test adds its
own dotted overrides (``"engine.precision=bf16"``) or nested sections (``data={"train": [...]}``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mmdist.config.run import RunConfig, config_to_dict, load_config
from mmdist.precision import resolve_precision

RECIPES = Path(__file__).resolve().parents[2] / "configs"

TEST_OVERRIDES = (
    # one process, no DeepSpeed partitioning, unless a test asks for it
    "engine.zero_stage=0",
    # a short run of small batches: the trainer tests count steps and samples against these
    "train.max_steps=2", "train.global_batch_size=4", "train.micro_batch_size=2",
    # the model tests build many models; those about checkpointing switch it on themselves
    "model.llm.gradient_checkpointing=false",
    # the recipes keep the Q-Former's defaults (32 queries, width 256); tests use a tiny one
    "model.connector.qformer.num_queries=4", "model.connector.qformer.hidden_size=32",
    # the data tests with models read conversations through the tokenizer's chat template
    "data.template=auto",
)


def tiny_run_config(stage: str = "fuse", *overrides: str, connector: str = "mlp", **sections: Any) -> RunConfig:
    """configs/tiny_{stage}.yaml with ``TEST_OVERRIDES``, ``connector`` ('linear', 'mlp' or 'qformer';
    a Q-Former trains the text encoder), nested ``sections`` (e.g. ``model={"llm": {"dtype": "bf16"}}``,
    merged key by key) and then dotted ``overrides``."""
    stage_overrides = [f"model.connector.type={connector}", f"model.text.freeze={str(connector != 'qformer').lower()}"]
    cfg = load_config(
        RECIPES / f"tiny_{stage}.yaml", [*TEST_OVERRIDES, *stage_overrides, *dotted(sections), *overrides]
    )
    # The recipes say `auto`: resolved for the CPU as every command does at start-up (fp32 under the tests'
    # MMDIST_CPU_BF16=0), so models built straight from this config get concrete dtypes.
    return resolve_precision(cfg, "cpu")[0]


def dotted(sections: dict, prefix: str = "") -> list[str]:
    """Nested settings as ``a.b=value`` overrides, one per leaf, so a section is merged key by key into the
    recipe's (an empty one changes nothing); values are written as JSON, which YAML reads."""
    out = []
    for key, value in sections.items():
        if isinstance(value, dict):
            out += dotted(value, f"{prefix}{key}.")
        else:
            out.append(f"{prefix}{key}={json.dumps(value)}")
    return out


def tiny_llm_config(**settings: Any) -> dict:
    """model.llm of the tiny fuse recipe (2-layer llama, hidden 64, the byte tokenizer), with ``settings`` replaced.

    vocab_size equals the tokenizer's 259 ids, so the added image placeholder is
    *outside* the embedding matrix: this exercises the no-resize path.
    """
    return {**config_to_dict(tiny_run_config("fuse"))["model"]["llm"], **settings}


def tiny_vision_config(**settings: Any) -> dict:
    """model.vision of the tiny recipes (2-layer HF ViT, hidden 32,
    16x16 images in 16 patches), with ``settings`` replaced."""
    return {**config_to_dict(tiny_run_config("fuse"))["model"]["vision"], **settings}
