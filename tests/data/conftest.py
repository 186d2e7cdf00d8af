"""Fixtures of the data-pipeline tests (helpers.data_fixtures)."""

from __future__ import annotations

import pytest
from helpers.data_fixtures import FakeProcessors, make_processors


@pytest.fixture
def processors() -> FakeProcessors:
    return make_processors()
