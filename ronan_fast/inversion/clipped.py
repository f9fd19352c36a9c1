"""Pixels an image holds at an end of its range, and the loss's one-sided treatment of them.

An image is saved clipped to [0, 1]: where a generator's output overshoots the range (a VAE or
latent-diffusion decoder often does, by a few hundredths over one pixel in a hundred), the saved
pixel is exactly 0 or 1, and the output the generator made there can no longer be read back
from the file. The plain loss still asks the output to equal the end: at the very input that
made the image the loss is the overshoot's, not the 8-bit rounding's (the zoo's 64x64
AutoencoderKL: 1.5e-4 instead of 1.3e-6 on an own image with 1.2% of its pixels clipped, above
its convergence line). With ``InversionSettings.clip_aware`` (the default) a pixel the image
holds exactly at an end (as an 8-bit or float file stores a clipped pixel) is matched by any
output at or beyond that end: its residual counts only on the inner side. Pixels inside the
range are unchanged, so are generators whose output never leaves it (tanh GANs): for them the
loss is the plain one, bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["ClippedPixels"]


@dataclass(frozen=True)
class ClippedPixels:
    """Which pixels of each image lie at the low end (``low``) and the high end (``high``),
    bool ``[B, C, H, W]``; indexed by rows like the images (``clipped[rows]``)."""

    low: Tensor
    high: Tensor

    @classmethod
    def of(cls, images: Tensor) -> "ClippedPixels | None":
        """The clipped pixels of ``images`` in [0, 1]; None where no pixel is at an end."""
        low, high = images <= 0, images >= 1
        if not bool(low.any()) and not bool(high.any()):
            return None
        return cls(low, high)

    def __getitem__(self, rows) -> "ClippedPixels":
        return ClippedPixels(self.low[rows], self.high[rows])

    def beyond(self, diff: Tensor) -> Tensor:
        """Where ``diff`` (output minus target, same shape as the images, any positive scale of
        units) lies beyond a clipped pixel's end: the pixels that match."""
        return (self.high & (diff > 0)) | (self.low & (diff < 0))

    def residual(self, diff: Tensor) -> Tensor:
        """``diff`` (output minus target) with the pixels that match at 0; differentiable
        (forward and reverse mode) through ``diff``."""
        return diff.masked_fill(self.beyond(diff.detach()), 0)

    def output(self, out: Tensor, target: Tensor) -> Tensor:
        """``out`` with each matching pixel set to its target (not differentiable there): any
        plain loss of the result against ``target`` is the one-sided loss of ``out``."""
        target = target.to(out.dtype)
        return torch.where(self.beyond(out - target), target, out)
