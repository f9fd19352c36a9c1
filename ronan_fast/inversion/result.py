"""What an inversion returns for each image."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor

from ronan_fast.inversion.settings import InversionSettings

__all__ = ["InversionResult"]


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
