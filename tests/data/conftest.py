"""Fixtures of the data-pipeline tests (helpers live in data_fixtures.py)."""

from __future__ import annotations

import pytest
from data_fixtures import FakeProcessors, make_processors


@pytest.fixture
def processors() -> FakeProcessors:
    return make_processors()
