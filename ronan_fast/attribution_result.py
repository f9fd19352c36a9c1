"""The outcome of attributing images: :class:`AttributionResult` (one entry per image judged)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from torch import Tensor

__all__ = ["AttributionResult"]


def _json_float(x: float) -> float | None:
    x = float(x)
    return x if math.isfinite(x) else None


@dataclass
class AttributionResult:
    """Per-image outcome of :meth:`Attributor.attribute` (one entry per image that could be processed).

    Attributes:
        loss: ``[B]`` float64, the reconstruction loss ``A`` under the model. With early stop an
            image whose loss fell clearly under the verdict threshold stopped there
            (``stopped_early``), and its loss is the loss at stopping, not the lowest reachable.
        reference_loss: ``[B]`` float64 ``A_r`` under the reference model (None uncalibrated).
        calibrated_loss: ``[B]`` ``A' = A / A_r`` (``= A`` uncalibrated).
        statistic: ``[B]`` the Grubbs statistic ``(A' - mu) / sigma`` (on ``log A'`` for "grubbs-log");
            for an image that stopped early, the statistic at stopping, a little under ``critical_value``.
        critical_value: ``G_crit`` for the profile's ``n`` and ``alpha`` (the same for every image).
        p_value: ``[B]`` one-sided p-value of the statistic under "the image belongs" (at stopping
            for an image that stopped early: a little over ``alpha``, a lower bound).
        belongs: ``[B]`` bool, ``statistic < critical_value``: the verdict (the same name as the
            records' ``belongs`` and :meth:`BelongingProfile.belongs`).
        threshold: the calibrated loss at the edge of belonging.
        reconstruction / reference_reconstruction: ``[B, C, H, W]`` the best reconstructions.
        images: ``[B, C, H, W]`` the inputs at the model's shape.
        paths: the image files when attributing files, else None.
        notes: per image, what loading and shape conversion did ("" when nothing).
        errors: ``(path, message)`` of each file that could not be read.
    """

    loss: Tensor
    reference_loss: Tensor | None
    calibrated_loss: Tensor
    statistic: Tensor
    critical_value: float
    p_value: Tensor
    belongs: Tensor
    threshold: float
    alpha: float
    rule: str
    stopped_early: Tensor
    row_steps: Tensor
    images: Tensor
    reconstruction: Tensor
    reference_reconstruction: Tensor | None = None
    paths: list[str] | None = None
    notes: list[str] = field(default_factory=list)
    errors: list[tuple[str, str]] = field(default_factory=list)

    def __len__(self) -> int:
        return int(self.loss.shape[0])

    @property
    def verdicts(self) -> list[str]:
        return ["belongs" if b else "does not belong" for b in self.belongs.tolist()]

    def to_records(self, include_errors: bool = True, profile_id: str | None = None) -> list[dict]:
        """One JSON-safe dict per image (non-finite numbers become None), then one per unreadable
        file: the report records of docs/reports.md, tagged with ``profile_id``."""
        records = []
        ref = None if self.reference_loss is None else self.reference_loss.tolist()
        for i in range(len(self)):
            records.append({
                "path": None if self.paths is None else self.paths[i],
                "verdict": "belongs" if bool(self.belongs[i]) else "does not belong",
                "belongs": bool(self.belongs[i]),
                "loss": _json_float(self.loss[i]),
                "reference_loss": None if ref is None else _json_float(ref[i]),
                "calibrated_loss": _json_float(self.calibrated_loss[i]),
                "statistic": _json_float(self.statistic[i]),
                "critical_value": _json_float(self.critical_value),
                "p_value": _json_float(self.p_value[i]),
                "threshold": _json_float(self.threshold),
                "alpha": self.alpha,
                "rule": self.rule,
                "stopped_early": bool(self.stopped_early[i]),
                "row_steps": int(self.row_steps[i]),
                "notes": self.notes[i] if i < len(self.notes) else "",
                "error": None,
                "profile_id": profile_id,
            })
        if include_errors:
            for path, message in self.errors:
                records.append({"path": path, "verdict": "error", "belongs": None, "error": message,
                                "profile_id": profile_id})
        return records

    def summary(self) -> str:
        """One line: how many images belong, the test used, and how many files failed."""
        n = len(self)
        yes = int(self.belongs.sum()) if n else 0
        text = (f"{n} image{'s' if n != 1 else ''}: {yes} belong{'s' if yes == 1 else ''} to the model, "
                f"{n - yes} {'does' if n - yes == 1 else 'do'} not "
                f"(one-sided Grubbs test, rule {self.rule}, alpha={self.alpha}, G_crit={self.critical_value:.4f})")
        if self.errors:
            text += f"; {len(self.errors)} file{'s' if len(self.errors) != 1 else ''} could not be read"
        return text


# ---------------------------------------------------------------------------- attributor
