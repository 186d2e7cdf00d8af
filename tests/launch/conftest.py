"""Fixtures of the launcher tests."""

from __future__ import annotations

import pytest
from helpers.launch_harness import require_entry, write_recipes


@pytest.fixture(scope="session")
def tiny_recipes(tmp_path_factory):
    """{"align": path, "fuse": path}: copies of configs/tiny_*.yaml that read demo shards from a temporary folder."""
    require_entry()
    return write_recipes(tmp_path_factory.mktemp("tiny_recipes"))


@pytest.fixture
def tiny_recipe(tiny_recipes):
    """The stage-2 (fuse) tiny recipe, the one every launcher test runs."""
    return tiny_recipes["fuse"]
