"""Scores of one cell: the confusion counts of a rule's verdicts and the ROC AUC of a score."""

from __future__ import annotations

import math

import numpy as np
from scipy.stats import rankdata

__all__ = ["confusion", "roc_auc"]


def confusion(belonging_verdicts, other_verdicts) -> dict:
    """Counts and rates with belonging images as positives.

    ``belonging_verdicts`` / ``other_verdicts``: per image, True where the test said "belongs".
    TP: belonging images judged belonging; FN: belonging images judged not; FP: other images
    judged belonging; TN: other images judged not. ``tpr = TP / (TP + FN)``,
    ``fpr = FP / (FP + TN)``, ``accuracy = (TP + TN) / all``.
    """
    pos = np.asarray(belonging_verdicts, dtype=bool).reshape(-1)
    neg = np.asarray(other_verdicts, dtype=bool).reshape(-1)
    if pos.size == 0 or neg.size == 0:
        raise ValueError(f"confusion needs images on both sides, got {pos.size} belonging and {neg.size} other")
    tp, fn = int(pos.sum()), int((~pos).sum())
    fp, tn = int(neg.sum()), int((~neg).sum())
    return {
        "tp": tp, "fp": fp, "fn": fn, "tn": tn,
        "accuracy": (tp + tn) / (tp + tn + fp + fn),
        "tpr": tp / (tp + fn),
        "fpr": fp / (fp + tn),
    }


def roc_auc(belonging_scores, other_scores) -> float:
    """ROC AUC of a score where *lower* means "belongs": P(belonging < other) + P(tie) / 2.

    Computed from ranks (the Mann-Whitney U statistic), ties counted half. ``+inf`` is allowed
    (an image that could not be reconstructed at all); NaN is not.
    """
    pos = np.asarray(belonging_scores, dtype=np.float64).reshape(-1)
    neg = np.asarray(other_scores, dtype=np.float64).reshape(-1)
    if pos.size == 0 or neg.size == 0:
        raise ValueError("roc_auc needs scores on both sides")
    if np.isnan(pos).any() or np.isnan(neg).any():
        raise ValueError("roc_auc: scores contain NaN")
    ranks = rankdata(np.concatenate([-pos, -neg]))  # negated: a higher rank for a lower score
    u = ranks[: pos.size].sum() - pos.size * (pos.size + 1) / 2
    auc = u / (pos.size * neg.size)
    return float(auc) if math.isfinite(auc) else float("nan")
