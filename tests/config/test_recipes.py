"""Recipes by path or by name: a file that exists wins, `configs/NAME.yaml` elsewhere is the packaged recipe."""

from __future__ import annotations

from pathlib import Path

import pytest

from mmdist.config.recipes import packaged_recipes, recipe_path
from mmdist.config.run import ConfigError, load_config

REPO_CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def test_packaged_recipes_are_the_shipped_ones():
    shipped = sorted(p.name for p in REPO_CONFIGS.glob("*.yaml"))
    assert shipped and sorted(p.name for p in packaged_recipes().glob("*.yaml")) == shipped
    for name in shipped:
        assert (packaged_recipes() / name).read_bytes() == (REPO_CONFIGS / name).read_bytes()


def test_an_existing_file_wins_over_the_packaged_recipe(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "configs").mkdir()
    mine = tmp_path / "configs" / "tiny_fuse.yaml"
    mine.write_text((REPO_CONFIGS / "tiny_fuse.yaml").read_text().replace("name: tiny-fuse", "name: my-fuse"))
    assert recipe_path("configs/tiny_fuse.yaml") == Path("configs/tiny_fuse.yaml")
    assert load_config("configs/tiny_fuse.yaml").name == "my-fuse"


@pytest.mark.parametrize("given", ["configs/tiny_fuse.yaml", "tiny_fuse.yaml"])
def test_a_recipe_name_elsewhere_is_the_packaged_recipe(tmp_path, monkeypatch, given):
    monkeypatch.chdir(tmp_path)  # no configs/ here
    assert recipe_path(given) == packaged_recipes() / "tiny_fuse.yaml"
    cfg = load_config(given, ["train.max_steps=3"])
    assert cfg.stage.name == "fuse" and cfg.train.max_steps == 3


def test_missing_recipe_names_where_it_looked(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(
        ConfigError, match=r"configs/nope.yaml \(relative to .*\), and mmdist ships no recipe nope.yaml"
    ) as err:
        recipe_path("configs/nope.yaml")
    assert "tiny_fuse.yaml" in str(err.value)  # lists the recipes it does ship


def test_a_missing_path_of_ones_own_never_falls_back(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for given in ("experiments/tiny_fuse.yaml", tmp_path / "configs" / "tiny_fuse.yaml"):
        with pytest.raises(ConfigError, match="config file not found") as err:
            recipe_path(given)
        assert "ships" not in str(err.value)
