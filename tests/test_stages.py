"""A stage is an object: its name is parsed where the config is read, and nothing else in mmdist compares it.

The grep below is the rule's guard: a comparison of an expression with a stage
name (``cfg.stage == "fuse"``, ``name in ("align", "fuse")``, a ``match`` case)
anywhere in mmdist/ outside the places that parse the config fails the test,
naming the file and line. Code asks the stage object for the fact it needs.
"""

from __future__ import annotations

import ast
import pickle
from pathlib import Path

import pytest
import yaml
from helpers.configs import tiny_run_config

from mmdist.config.run import RunConfig, dump_config, load_config
from mmdist.settings import ConfigError, to_dict
from mmdist.stages import ALIGN, FUSE, Batch, Measure, Stage, manifest_stage
from mmdist.stages.base import _REGISTRY
from mmdist.stages.fuse import FuseStage

PACKAGE = Path(__file__).resolve().parents[1] / "mmdist"
# Where the config (and an export's manifest) is parsed: the only places a stage's name may be compared.
PARSING = ("mmdist/settings.py", "mmdist/config/", "mmdist/stages/")
MAX_PARSING_PLACES = 3
# Code outside the parsing places that still compares a stage name, with the reason it may for now.
ALLOWED: dict[str, str] = {}


def _names_in(node: ast.AST, names: set[str]) -> bool:
    if isinstance(node, ast.Constant):
        return node.value in names
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        return any(_names_in(e, names) for e in node.elts)
    return False


def comparisons_in(tree: ast.AST, names: set[str]) -> list[int]:
    """Lines of every comparison with one of ``names`` as a literal, and of every ``match`` case on one."""
    lines = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare) and any(_names_in(n, names) for n in (node.left, *node.comparators)):
            lines.append(node.lineno)
        elif isinstance(node, ast.MatchValue) and _names_in(node.value, names):
            lines.append(node.value.lineno)
    return lines


def stage_name_comparisons(names: set[str]) -> list[tuple[str, int]]:
    """(file, line) of every comparison with a stage-name literal in mmdist/."""
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE.parent).as_posix()
        found += [(rel, line) for line in comparisons_in(ast.parse(path.read_text(), str(path)), names)]
    return found


def test_stage_names_are_compared_only_where_the_config_is_parsed():
    found = stage_name_comparisons(set(Stage.names()))
    parsing = [f for f in found if f[0].startswith(PARSING)]
    elsewhere = [f"{file}:{line}" for file, line in found if not file.startswith(PARSING) and file not in ALLOWED]
    assert not elsewhere, ("a stage's name is compared outside the config parsing; ask the stage for the fact "
                           "(mmdist/stages/base.py) instead:\n  " + "\n  ".join(elsewhere))
    assert len(parsing) <= MAX_PARSING_PLACES, f"stage names compared in {len(parsing)} parsing places: {parsing}"
    stale = [file for file in ALLOWED if file not in {f[0] for f in found}]
    assert not stale, f"ALLOWED names files that no longer compare a stage name: {stale}"


def test_the_guard_sees_comparisons_and_match_cases():
    code = ('if cfg.stage == "fuse": pass\nif x in ("align", "other"): pass\nif y != "elsewhere": pass\n'
            'match z:\n    case "align": pass\n')
    assert sorted(comparisons_in(ast.parse(code), {"align", "fuse"})) == [1, 2, 5]


def test_the_yaml_name_is_parsed_once_into_the_one_object_and_written_back(tmp_path):
    cfg = tiny_run_config("align")
    assert cfg.stage is ALIGN and isinstance(cfg.stage, Stage) and str(cfg.stage) == "align"
    assert to_dict(cfg)["stage"] == "align"
    path = dump_config(cfg, tmp_path / "config.yaml")
    assert yaml.safe_load(path.read_text())["stage"] == "align"
    assert load_config(path).stage is ALIGN
    assert pickle.loads(pickle.dumps(cfg)).stage is ALIGN  # data workers and rank broadcasts keep the one object
    assert RunConfig().stage is FUSE
    with pytest.raises(ConfigError, match=r"stage: 'fus' is not one of 'align', 'fuse' \(did you mean 'fuse'\?\)"):
        load_config(path, ["stage=fus"])


def test_comparing_a_stage_with_a_string_raises_instead_of_being_false():
    with pytest.raises(TypeError, match="ask the stage for the fact"):
        _ = FUSE == "fuse"
    assert FUSE == FUSE and FUSE != ALIGN and FUSE.loads is ALIGN and ALIGN.loads is None


def test_what_each_stage_owns():
    assert (ALIGN.parts, ALIGN.heavy_part, ALIGN.batch, ALIGN.measures, ALIGN.packs, ALIGN.tiles) == (
        ("vision", "text"), "vision", Batch.CAPTIONS, Measure.RETRIEVAL, False, False)
    assert (FUSE.parts, FUSE.heavy_part, FUSE.batch, FUSE.measures, FUSE.packs, FUSE.tiles) == (
        ("vision", "llm"), "llm", Batch.CONVERSATIONS, Measure.ANSWERS, True, True)
    fuse = tiny_run_config("fuse", "model.llm.gradient_checkpointing=true")
    assert FUSE.llm_checkpointing(fuse.model) is True and ALIGN.llm_checkpointing(fuse.model) is None
    assert FUSE.frozen_parts(fuse.model) == ["vision", "llm"]
    assert manifest_stage({"stage": "align"}) is ALIGN and manifest_stage({"stage": "other"}) is None


def test_a_third_stage_is_one_subclass_and_its_recipe():
    """What docs/design.md describes: instruction tuning with LoRA on the LLM, as a stage of its own."""

    class InstructStage(FuseStage):
        name = "instruct"
        number = 3
        summary = "stage 3: instruction tuning with LoRA on the LLM"

        def check(self, model, data):
            out = super().check(model, data)
            if not model.llm.lora.enabled:
                out.append(("model.llm.lora.enabled", "stage instruct trains LoRA adapters on the LLM: set it true"))
            return out

    try:
        instruct = InstructStage()
        assert Stage.names() == ("align", "fuse", "instruct")
        with pytest.raises(ConfigError, match="model.llm.lora.enabled: stage instruct trains LoRA"):
            tiny_run_config("fuse", "stage=instruct")
        cfg = tiny_run_config("fuse", "stage=instruct", "model.llm.lora.enabled=true", "model.llm.lora.r=4")
        assert cfg.stage is instruct and cfg.stage.builds("llm") and to_dict(cfg)["stage"] == "instruct"
    finally:
        _REGISTRY.pop("instruct", None)
    assert Stage.names() == ("align", "fuse")
