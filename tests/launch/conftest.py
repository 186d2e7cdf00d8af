"""Fixtures of the launcher tests."""

from __future__ import annotations

import pytest
from _harness import require_entry, write_recipe


@pytest.fixture(scope="session")
def tiny_recipe(tmp_path_factory):
    """Path of a copy of configs/tiny_fuse.yaml that reads demo shards from a temporary folder."""
    require_entry()
    return write_recipe(tmp_path_factory.mktemp("tiny_fuse"))
