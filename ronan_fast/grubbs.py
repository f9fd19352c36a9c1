"""The one-sided Grubbs test behind the belonging decision (Eq. 3 of the paper).

A belonging profile holds the mean ``mu`` and sample standard deviation ``sigma`` of the
calibrated reconstruction losses of ``n`` images the model itself generated. A new image with
calibrated loss ``a`` gets the statistic ``G = (a - mu) / sigma``; it is judged to belong to
the model when ``G < G_crit``, where

    G_crit = ((n - 1) / sqrt(n)) * sqrt(t^2 / (n - 2 + t^2)),

``t`` being the upper critical value of Student's t with ``n - 2`` degrees of freedom at
significance ``alpha / n``. The test is one-sided: only a loss that is too *large* counts
against belonging; an unusually small loss is no evidence of another origin.
"""

from __future__ import annotations

import math
import numbers

import numpy as np
from scipy import stats

__all__ = ["grubbs_critical_value", "grubbs_statistic", "grubbs_p_value", "max_statistic"]


def _check_n(n) -> int:
    if isinstance(n, bool) or not isinstance(n, numbers.Integral):
        raise ValueError(f"n (the number of profile images) must be an integer >= 3, got {n!r}")
    if n < 3:
        raise ValueError(f"n (the number of profile images) must be >= 3 for a Grubbs test, got {n}")
    return int(n)


def _check_alpha(alpha) -> float:
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not math.isfinite(alpha):
        raise ValueError(f"alpha (the significance level) must be a number in (0, 1), got {alpha!r}")
    if not 0 < alpha < 1:
        raise ValueError(f"alpha (the significance level) must lie strictly between 0 and 1, got {alpha}")
    return float(alpha)


def max_statistic(n: int) -> float:
    """The largest value the Grubbs statistic can take in a sample of ``n``: ``(n - 1) / sqrt(n)``."""
    n = _check_n(n)
    return (n - 1) / math.sqrt(n)


def grubbs_critical_value(n: int, alpha: float = 0.05) -> float:
    """Critical value of the one-sided Grubbs test for a sample of ``n`` at significance ``alpha``.

    ``grubbs_critical_value(10) == 2.176...`` and ``grubbs_critical_value(100) == 3.207...``.
    """
    n = _check_n(n)
    alpha = _check_alpha(alpha)
    t = float(stats.t.isf(alpha / n, n - 2))
    return (n - 1) / math.sqrt(n) * math.sqrt(t * t / (n - 2 + t * t))


def grubbs_statistic(values, mu: float, sigma: float):
    """``(values - mu) / sigma``: the Grubbs statistic of each value against a profile.

    ``values`` may be a number, a sequence, a NumPy array or a torch tensor; the result has the
    same kind (a float for a number).
    """
    if not (isinstance(mu, numbers.Real) and math.isfinite(mu)):
        raise ValueError(f"mu must be a finite number, got {mu!r}")
    if not (isinstance(sigma, numbers.Real) and math.isfinite(sigma) and sigma > 0):
        raise ValueError(f"sigma must be a finite number > 0, got {sigma!r}")
    if isinstance(values, numbers.Real):
        return (float(values) - mu) / sigma
    try:
        import torch

        if isinstance(values, torch.Tensor):
            return (values.double() - mu) / sigma
    except ImportError:  # pragma: no cover - torch is a dependency
        pass
    return (np.asarray(values, dtype=np.float64) - mu) / sigma


def grubbs_p_value(g, n: int):
    """One-sided p-value of Grubbs statistic(s) ``g`` for a profile of ``n`` images.

    The statistic is turned back into Student's t with ``n - 2`` degrees of freedom,
    ``t^2 = n (n - 2) G^2 / ((n - 1)^2 - n G^2)``, and ``p = min(1, n * P(T > t))`` (the
    Bonferroni bound the critical value is built on). ``G <= 0`` gives 1 and
    ``G >= (n - 1) / sqrt(n)`` gives 0. By construction ``p < alpha`` exactly when
    ``G > grubbs_critical_value(n, alpha)``.

    Returns a float for a number, else a NumPy array of the same shape.
    """
    n = _check_n(n)
    scalar = isinstance(g, numbers.Real)
    if not scalar:
        try:
            import torch

            if isinstance(g, torch.Tensor):
                g = g.detach().cpu().double().numpy()
        except ImportError:  # pragma: no cover
            pass
    arr = np.asarray(g, dtype=np.float64)
    if np.isnan(arr).any():
        raise ValueError("the Grubbs statistic contains NaN")
    gmax = (n - 1) / math.sqrt(n)
    p = np.empty_like(arr)
    low = arr <= 0
    high = arr >= gmax
    mid = ~(low | high)
    p[low] = 1.0
    p[high] = 0.0
    if mid.any():
        gm = arr[mid]
        t2 = n * (n - 2) * gm * gm / ((n - 1) ** 2 - n * gm * gm)
        p[mid] = np.minimum(1.0, n * stats.t.sf(np.sqrt(t2), n - 2))
    return float(p) if scalar or arr.ndim == 0 else p
