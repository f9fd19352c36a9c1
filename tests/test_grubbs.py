import math

import numpy as np
import pytest
import torch

from ronan_fast import grubbs_critical_value
from ronan_fast.grubbs import grubbs_p_value, grubbs_statistic, max_statistic

# One-sided Grubbs critical values (Grubbs & Beck 1972, Technometrics 14; reprinted in ASTM E178
# and the NIST/SEMATECH handbook): n -> (alpha=0.05, alpha=0.01). The tables for large n were
# computed with approximations, hence the looser tolerance there.
TABLE = {
    3: (1.153, 1.155),
    4: (1.463, 1.492),
    5: (1.672, 1.749),
    10: (2.176, 2.410),
    20: (2.557, 2.884),
    50: (2.956, 3.336),
    100: (3.207, 3.600),
}


@pytest.mark.parametrize("n", sorted(TABLE))
def test_critical_values_match_published_tables(n):
    tol = 1e-3 if n <= 20 else 2e-3 if n <= 50 else 4e-3
    for alpha, want in zip((0.05, 0.01), TABLE[n]):
        assert grubbs_critical_value(n, alpha) == pytest.approx(want, abs=tol)


def test_brief_values():
    assert round(grubbs_critical_value(10, 0.05), 3) == 2.176
    assert grubbs_critical_value(100) == pytest.approx(3.207, abs=4e-3)


def test_monotone_and_bounded():
    values = [grubbs_critical_value(n) for n in range(3, 300)]
    assert all(b > a for a, b in zip(values, values[1:]))
    assert all(v < max_statistic(n) for n, v in zip(range(3, 300), values))
    alphas = [0.001, 0.01, 0.05, 0.1, 0.2, 0.5]
    crit = [grubbs_critical_value(30, a) for a in alphas]
    assert all(b < a for a, b in zip(crit, crit[1:]))


@pytest.mark.parametrize("bad_n", [2, 1, 0, -5, 3.5, "10", True])
def test_bad_n(bad_n):
    with pytest.raises(ValueError, match="n "):
        grubbs_critical_value(bad_n)
    with pytest.raises(ValueError, match="n "):
        grubbs_p_value(1.0, bad_n)


@pytest.mark.parametrize("bad_alpha", [0, 1, -0.1, 1.5, float("nan"), "0.05"])
def test_bad_alpha(bad_alpha):
    with pytest.raises(ValueError, match="alpha"):
        grubbs_critical_value(10, bad_alpha)


def test_statistic_kinds():
    assert grubbs_statistic(3.0, 1.0, 2.0) == 1.0
    np.testing.assert_allclose(grubbs_statistic([1.0, 5.0], 1.0, 2.0), [0.0, 2.0])
    t = grubbs_statistic(torch.tensor([1.0, 5.0]), 1.0, 2.0)
    assert isinstance(t, torch.Tensor) and t.tolist() == [0.0, 2.0]
    with pytest.raises(ValueError, match="sigma"):
        grubbs_statistic(1.0, 0.0, 0.0)
    with pytest.raises(ValueError, match="mu"):
        grubbs_statistic(1.0, float("nan"), 1.0)


def test_p_value_edges():
    n = 50
    assert grubbs_p_value(-2.0, n) == 1.0
    assert grubbs_p_value(0.0, n) == 1.0
    assert grubbs_p_value(max_statistic(n), n) == 0.0
    assert grubbs_p_value(max_statistic(n) + 1, n) == 0.0
    assert grubbs_p_value(1e-3, n) == 1.0  # Bonferroni bound capped at 1
    with pytest.raises(ValueError, match="NaN"):
        grubbs_p_value(float("nan"), n)


@pytest.mark.parametrize("n", [3, 5, 10, 37, 100, 500])
@pytest.mark.parametrize("alpha", [0.01, 0.05, 0.1])
def test_p_value_consistent_with_critical_value(n, alpha):
    crit = grubbs_critical_value(n, alpha)
    assert grubbs_p_value(crit, n) == pytest.approx(alpha, rel=1e-6)
    g = np.linspace(-1.0, max_statistic(n) * 1.1, 2001)
    g = g[np.abs(g - crit) > 1e-6 * crit]  # away from the exact edge, where rounding decides
    p = grubbs_p_value(g, n)
    np.testing.assert_array_equal(p < alpha, g > crit)


def test_p_value_monotone_and_vectorised():
    g = np.linspace(0, 9.9, 500)
    p = grubbs_p_value(g, 100)
    assert p.shape == g.shape
    assert np.all(np.diff(p) <= 0)
    assert np.all((p >= 0) & (p <= 1))
    pt = grubbs_p_value(torch.tensor(g), 100)
    np.testing.assert_allclose(pt, p)
    assert isinstance(grubbs_p_value(2.0, 100), float)
    assert math.isclose(grubbs_p_value(np.float64(2.0), 100), grubbs_p_value(2.0, 100))
