"""What an inversion returns for each image."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from torch import Tensor

from ronan_fast.inversion.settings import InversionSettings

__all__ = ["InversionResult", "after_second_search"]


@dataclass
class InversionResult:
    """Per image: the reconstruction loss (lowest over steps and restarts), the best input, its image."""

    loss: Tensor  # [B] float32, in [0, 1] image space
    inputs: Tensor  # [B, D] float32
    reconstruction: Tensor  # [B, C, H, W] in [0, 1]
    conditions: Tensor | None  # [B] (the winning class) or [B, E], or None
    row_steps: Tensor  # [B] int64: generator row-steps spent on each image (cost)
    settings: InversionSettings
    metric: str
    extra: dict = field(default_factory=dict)
    #: [B] bool: the images whose warm start settled them above their threshold while finding
    #: their guess (ronan_fast.mapping_start's ``w_settle_above``): no search ran for them (no
    #: row-steps), and their loss, input and reconstruction are the guess's. None from an
    #: inversion that settles none this way (the stagewise one)
    settled: Tensor | None = None


def after_second_search(first: InversionResult, rows: Tensor, second: InversionResult, take: Tensor) -> InversionResult:
    """``first`` after a second search of its images ``rows`` (indices into ``first``; ``second``
    holds one result per index): each such image takes ``second``'s loss, input, reconstruction
    (and class, and settled flag, where both results have them) where ``take`` (a bool per index)
    holds, and its row-steps are both searches'."""
    out = {k: getattr(first, k).clone() for k in ("loss", "inputs", "reconstruction", "row_steps")}
    for k in ("conditions", "settled"):
        if getattr(first, k) is not None and getattr(second, k) is not None:
            out[k] = getattr(first, k).clone()
    for k, merged in out.items():
        at, new = rows.to(merged.device), getattr(second, k).to(merged.device)
        if k == "row_steps":
            merged[at] += new
        else:
            keep = take.to(merged.device)
            merged[at[keep]] = new[keep]
    return dataclasses.replace(first, **out)
