"""Fixtures for the model tests: tiny models built from configs (helpers.tiny)."""

from __future__ import annotations

import pytest
from helpers.tiny import make_model


@pytest.fixture
def fused_model():
    return make_model("fuse")


@pytest.fixture
def align_model():
    return make_model("align")
