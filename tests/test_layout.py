"""The house layout: no Python file in mmdist/ or tests/ runs past 500 lines, so each stays about one thing."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MAX_LINES = 500


@pytest.mark.parametrize("folder", ["mmdist", "tests"])
def test_no_file_is_longer_than_500_lines(folder):
    files = sorted((ROOT / folder).rglob("*.py"))
    assert len(files) > 20, f"found only {len(files)} Python files under {ROOT / folder}"
    too_long = [(path.relative_to(ROOT), n) for path in files
                if (n := len(path.read_text(encoding="utf-8").splitlines())) > MAX_LINES]
    assert not too_long, (f"over {MAX_LINES} lines: " + ", ".join(f"{p} ({n})" for p, n in too_long)
                          + ". Split the file by topic (tests: whole tests, shared fixtures into conftest.py or "
                          "tests/helpers).")
