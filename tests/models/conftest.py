"""Fixtures for the model tests: tiny models built from configs (helpers in tiny.py)."""

from __future__ import annotations

import pytest
from tiny import make_model


@pytest.fixture
def fused_model():
    return make_model("fuse")


@pytest.fixture
def align_model():
    return make_model("align")
