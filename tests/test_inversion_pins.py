"""The inversion's arithmetic, pinned: recorded inversions give the same bits again.

See ``tests/inversion_pins.py`` for the cases and how to record them. A change to the
inversion's structure must leave every loss, row-step count, best input and reconstruction
bit for bit as recorded; a change meant to alter the arithmetic records the pins again.
"""

from __future__ import annotations

import json

import pytest
from inversion_pins import PINS, cases, environment, run_case

_RECORDED = json.loads(PINS.read_text())


@pytest.mark.parametrize("name", sorted(_RECORDED["cases"]))
def test_inversion_is_bit_for_bit_as_recorded(name):
    if _RECORDED["environment"] != environment():
        pytest.skip(f"pins recorded with {_RECORDED['environment']}, running {environment()}: rounding may differ")
    assert run_case(cases()[name]) == _RECORDED["cases"][name]


def test_every_case_is_recorded():
    assert sorted(cases()) == sorted(_RECORDED["cases"])
