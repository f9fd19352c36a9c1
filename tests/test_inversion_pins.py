"""The inversion's arithmetic, pinned: recorded inversions give the same bits again.

See ``tests/inversion_pins.py`` for the cases and how to record them. A change to the
inversion's structure must leave every loss, row-step count, best input and reconstruction
bit for bit as recorded; a change meant to alter the arithmetic records the pins again.
"""

from __future__ import annotations

import pytest
from inversion_pins import cases, environment, recorded, records, run_case

_RECORDS = records()
_MINE = recorded(environment(), _RECORDS)


@pytest.mark.parametrize("name", sorted(cases()))
def test_inversion_is_bit_for_bit_as_recorded(name):
    if _MINE is None:
        pytest.skip(f"no pins recorded in {environment()} (recorded: {[r['environment'] for r in _RECORDS]}): "
                    "rounding may differ")
    assert run_case(cases()[name]) == _MINE[name]


def test_every_case_is_recorded_in_every_environment():
    assert _RECORDS, "no pins recorded"
    for rec in _RECORDS:
        assert sorted(rec["cases"]) == sorted(cases()), rec["environment"]
