"""What one chunk of images asks of the inversion: the images, their rows, and the loss.

:class:`Loss` is the reconstruction loss L of Eq. 1: a metric the fused kernel computes ("mse",
"mae") or a metric object (SSIM, LPIPS, the tone-fitted MSE). :class:`Problem` holds one
chunk's images, which image each row (restart) belongs to, the target the generator's raw
output is compared with, and each image's belonging threshold when one is known.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ronan_fast import ops
from ronan_fast.adapters import GeneratorAdapter
from ronan_fast.inversion.calls import FixedShapeCalls, in_blocks
from ronan_fast.inversion.clipped import ClippedPixels
from ronan_fast.inversion.settings import InversionSettings
from ronan_fast.metrics import ToneMSE

__all__ = ["Loss", "Problem", "check_images"]


@dataclass(frozen=True)
class Loss:
    """The reconstruction loss: ``name`` and, for metrics the fused kernel does not compute,
    the metric object ``module`` (called on [0, 1] images, one loss per image)."""

    name: str
    module: object | None = None

    @classmethod
    def named(cls, name: str) -> "Loss":
        """The loss called ``name``: fused ("mse", "mae") or from :func:`ronan_fast.metrics.get_metric`."""
        if name in ops.METRICS:
            return cls(name)
        from ronan_fast.metrics import get_metric

        return cls(name, get_metric(name))

    @property
    def fused(self) -> bool:
        """Computed with its gradient by the fused kernel (``ops.recon_loss_grad``) on raw outputs."""
        return self.module is None

    @property
    def tone(self) -> ToneMSE | None:
        return self.module if isinstance(self.module, ToneMSE) else None

    @property
    def polishable(self) -> bool:
        """Whether the polish (a least-squares solver) applies: MSE, plain or tone-fitted."""
        return self.fused or self.tone is not None

    def raw_scale(self, output_range: tuple[float, float]) -> float:
        """Factor from the loss on raw outputs (``output_range``) to the loss on [0, 1] images."""
        lo, hi = output_range
        return 1.0 / (hi - lo) ** 2 if self.name in ("mse", "mse-tone") else 1.0 / (hi - lo)

    def clipped_pixels(self, images: Tensor, settings: InversionSettings) -> ClippedPixels | None:
        """The pixels of ``images`` this loss counts one-sided (``settings.clip_aware``, fused
        losses; None where none)."""
        return ClippedPixels.of(images) if settings.clip_aware and self.fused else None

    def on_unit(self, recon: Tensor, images: Tensor, rows: int | None = None,
                clipped: ClippedPixels | None = None) -> Tensor:
        """Per-image loss of reconstructions in [0, 1], float32 (the final score's definition);
        a metric module runs in blocks of ``rows`` images when given (:func:`in_blocks`); one-sided
        at the ``clipped`` pixels of ``images`` when given (:meth:`clipped_pixels`)."""
        if clipped is not None:
            recon = clipped.output(recon, images)
        if self.module is not None:
            if rows is not None:
                return in_blocks(self.module, rows, recon, images).float()
            return self.module(recon, images).float()
        diff = (recon - images).flatten(1)
        return diff.square().mean(1) if self.name == "mse" else diff.abs().mean(1)


def check_images(generator: GeneratorAdapter, images: Tensor) -> Tensor:
    """``images`` as float32 ``[B, C, H, W]`` in [0, 1] at the generator's shape, or a clear error."""
    if not isinstance(images, Tensor):
        raise TypeError(f"images must be a float tensor [B, C, H, W], got {type(images).__name__}")
    if images.dim() == 3:
        images = images.unsqueeze(0)
    if images.dim() != 4:
        raise ValueError(f"images must be [B, C, H, W], got shape {tuple(images.shape)}")
    if not images.is_floating_point():
        raise ValueError(f"images must be a float tensor in [0, 1], got {images.dtype} (divide 8-bit data by 255)")
    if tuple(images.shape[1:]) != tuple(generator.image_shape):
        shape = tuple(generator.image_shape)
        raise ValueError(
            f"images have shape {tuple(images.shape[1:])} per image but {generator.name} makes {shape}; resize/convert "
            "them first with ronan_fast.imageio.to_model_shape(images, shape), or give Attributor.attribute the image "
            "files (it converts them)"
        )
    if images.shape[0] == 0:
        raise ValueError("images is empty")
    bad = ~torch.isfinite(images).flatten(1).all(1)
    if bool(bad.any()):
        raise ValueError(f"images contain NaN or Inf (images {bad.nonzero().flatten().tolist()[:10]})")
    lo, hi = float(images.min()), float(images.max())
    if lo < -1e-3 or hi > 1 + 1e-3:
        raise ValueError(f"images must lie in [0, 1], got values in [{lo:.4g}, {hi:.4g}]")
    return images.float()


@dataclass
class Problem:
    """One chunk: ``b`` images with ``rows_per_image`` rows each (``m`` rows in all).

    ``index[r]`` is row ``r``'s image and ``row_cond[r]`` its condition (a class searched over
    the rows of a conditional generator, or None); ``target`` is what the generator's raw output
    is compared with (the images mapped to its output range for a fused loss, else the images);
    ``scale`` turns a fused loss on raw outputs into the loss on [0, 1] images; ``stop_below``
    is each image's belonging threshold (on the [0, 1] loss) or None; ``clipped`` the images'
    pixels at an end of the range, whose residual counts one-sided (``settings.clip_aware``,
    fused losses; None where off or no pixel is at an end).
    """

    generator: FixedShapeCalls
    images: Tensor
    settings: InversionSettings
    loss: Loss
    stop_below: Tensor | None
    impl: ops.Impl
    row_cond: Tensor | None
    rows_per_image: int
    index: Tensor
    target: Tensor
    scale: float
    clipped: ClippedPixels | None = None

    @classmethod
    def build(cls, generator: FixedShapeCalls, images: Tensor, conditions: Tensor | None, s: InversionSettings,
              loss: Loss, stop_below: Tensor | None, impl: ops.Impl) -> "Problem":
        b = images.shape[0]
        row_cond, rpi = generator.row_conditions(conditions, b, s.restarts)
        index = torch.arange(b, device=images.device).repeat_interleave(rpi)
        target = generator.from_unit(images) if loss.fused else images
        return cls(generator, images, s, loss, stop_below, impl, row_cond, rpi, index, target,
                   loss.raw_scale(generator.output_range), loss.clipped_pixels(images, s))

    @property
    def b(self) -> int:
        return self.images.shape[0]

    @property
    def m(self) -> int:
        return self.b * self.rows_per_image

    @property
    def device(self) -> torch.device:
        return self.images.device

    def cond_of(self, rows: Tensor) -> Tensor | None:
        """The conditions of rows ``rows`` (None for an unconditional generator)."""
        return None if self.row_cond is None else self.row_cond[rows]

    def score(self, inputs: Tensor, cond: Tensor | None, img: Tensor) -> tuple[Tensor, Tensor]:
        """Float32 reconstructions of ``inputs`` and their losses against images ``img``: the final score."""
        generator = self.generator
        with torch.no_grad():
            recon = generator.to_unit(generator.decode_raw(inputs, cond).float())
            clipped = None if self.clipped is None else self.clipped[img]
            return recon, self.loss.on_unit(recon, self.images[img], generator.rows, clipped)

    def raw_for_loss(self, raw: Tensor, img: Tensor) -> Tensor:
        """Raw outputs ``raw`` (row ``j`` of image ``img[j]``) as the fused loss compares them with
        the target: unchanged, or with the pixels a clipped image pixel matches set to the target."""
        if self.clipped is None:
            return raw
        return self.clipped[img].output(raw, self.target[img])
