"""benchmarks/step_time_model.py's tie rule: when two settings' measured times are too close to order."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

from step_time_model import TIE_BAND, tie_band  # noqa: E402


def test_tie_band_is_students_t_on_the_pooled_spread_of_runs():
    # every setting's two runs 10% apart: the pooled SD of a log time is log(1.1)/sqrt(2) on 3 degrees of freedom,
    # and a difference of two 2-run means has that SD again (sqrt(2/2))
    band, df = tie_band([[1.0, 1.1], [2.0, 2.2], [3.3, 3.0]])
    assert df == 3
    assert band == pytest.approx(math.expm1(3.182 * math.log(1.1) / math.sqrt(2)), rel=1e-3)
    # more runs, the same spread: more degrees of freedom and a narrower band
    wider, _ = tie_band([[1.0, 1.1, 1.0, 1.1], [2.0, 2.2, 2.0, 2.2], [3.0, 3.3, 3.0, 3.3]])
    assert wider < band and wider > 0.05
    # runs that agree: the floor; single runs: the floor and no degrees of freedom
    assert tie_band([[1.0, 1.0], [2.0, 2.0]]) == (TIE_BAND, 2)
    assert tie_band([[1.0], [2.0], [3.0]]) == (TIE_BAND, 0)
