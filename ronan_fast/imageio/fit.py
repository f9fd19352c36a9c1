"""Fitting an image to a model's shape: channels, centre crop, antialiased resize, and the note saying so."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


#: ITU-R BT.601 luma weights for RGB -> grey
LUMA_601 = (0.299, 0.587, 0.114)


def _check_shape(shape: Sequence[int]) -> tuple[int, int, int]:
    try:
        c, h, w = (int(s) for s in shape)
    except (TypeError, ValueError):
        raise ValueError(f"shape must be (C, H, W), got {shape!r}") from None
    if c not in (1, 3) or h < 1 or w < 1:
        raise ValueError(f"shape must be (C, H, W) with C in (1, 3) and H, W >= 1, got {tuple(shape)}")
    return c, h, w


def _crop_box(h0: int, w0: int, h: int, w: int, crop: bool) -> tuple[int, int, int, int]:
    """``(top, left, height, width)`` of the part of an ``h0 x w0`` image that is resized to
    ``h x w``: with ``crop``, the centred largest part of the target's aspect ratio, else all."""
    if crop and (h0, w0) != (h, w) and h0 * w != w0 * h:
        if w0 * h > h0 * w:  # too wide for the target aspect ratio
            cw = min(w0, max(1, round(h0 * w / h)))
            return 0, (w0 - cw) // 2, h0, cw
        ch = min(h0, max(1, round(w0 * h / w)))
        return (h0 - ch) // 2, 0, ch, w0
    return 0, 0, h0, w0


def _fit_note(c0: int, c: int, h0: int, w0: int, h: int, w: int, box: tuple[int, int, int, int], crop: bool) -> str:
    """What fitting a ``c0 x h0 x w0`` image to ``(c, h, w)`` does, e.g.
    ``"RGB->grey, 64x48->28x28 (centre crop to 48x48)"`` (sizes are width x height)."""
    steps = []
    if c0 != c:
        steps.append("grey->RGB" if c == 3 else "RGB->grey")
    if (h0, w0) != (h, w):
        how = f" (centre crop to {box[3]}x{box[2]})" if crop and h0 * w != w0 * h else ""
        steps.append(f"{w0}x{h0}->{w}x{h}{how}")
    return ", ".join(steps) or "unchanged"


def _channels(x: Tensor, c: int) -> Tensor:
    if x.shape[0] == c:
        return x
    if c == 3:
        return x.expand(3, -1, -1)
    luma = torch.tensor(LUMA_601, dtype=x.dtype, device=x.device).view(3, 1, 1)
    return (x * luma).sum(0, keepdim=True)


def _resize(x: Tensor, h: int, w: int) -> Tensor:
    return F.interpolate(x.unsqueeze(0), size=(h, w), mode="bilinear", align_corners=False, antialias=True)[0]


def _fit_one(x: Tensor, c: int, h: int, w: int, crop: bool) -> tuple[Tensor, str]:
    c0, h0, w0 = x.shape
    box = _crop_box(h0, w0, h, w, crop)
    note = _fit_note(c0, c, h0, w0, h, w, box, crop)
    x = _channels(x, c)
    top, left, ch, cw = box
    if (ch, cw) != (h0, w0):
        x = x[:, top:top + ch, left:left + cw]
    if tuple(x.shape[1:]) != (h, w):
        x = _resize(x, h, w)
    return x.clamp(0, 1), note


def to_model_shape(
    images: Tensor | Sequence[Tensor], shape: Sequence[int], crop: bool = True
) -> tuple[Tensor, list[str]]:
    """Fit images to a generator's ``(C, H, W)``: channels, then aspect ratio, then size.

    Grey becomes RGB by repetition, RGB becomes grey by ITU-R BT.601 luma
    (0.299 R + 0.587 G + 0.114 B). With ``crop=True`` an image whose aspect ratio differs from
    the target's is first centre-cropped to it; it is then resized with antialiased bilinear
    interpolation. The result is clamped to [0, 1].

    Args:
        images: ``[B, C, H, W]``, one ``[C, H, W]``, or a list of ``[C, H, W]`` of any sizes;
            float in [0, 1], C = 1 or 3.
        shape: the target ``(C, H, W)``.
        crop: centre-crop to the target aspect ratio before resizing (else the image is squashed).

    Returns:
        ``([B, C, H, W] float32, notes)`` where ``notes[i]`` says what was done to image i,
        e.g. ``"RGB->grey, 64x48->28x28 (centre crop to 48x48)"`` (sizes are width x height), or
        ``"unchanged"``.
    """
    c, h, w = _check_shape(shape)
    if isinstance(images, Tensor):
        if images.dim() == 3:
            images = images.unsqueeze(0)
        if images.dim() != 4:
            raise ValueError(f"images must be [B, C, H, W] or [C, H, W], got shape {tuple(images.shape)}")
        items = list(images.unbind(0))
    elif isinstance(images, Sequence) and not isinstance(images, (str, bytes)):
        items = list(images)
    else:
        raise TypeError(f"images must be a tensor or a list of [C, H, W] tensors, got {type(images).__name__}")
    if not items:
        raise ValueError("images is empty")
    out, notes = [], []
    for i, x in enumerate(items):
        if not isinstance(x, Tensor) or x.dim() != 3:
            got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"images[{i}] must be a [C, H, W] tensor, got {got}")
        if not x.is_floating_point():
            raise ValueError(f"images[{i}] must be float in [0, 1], got {x.dtype} (divide 8-bit data by 255)")
        if x.shape[0] not in (1, 3):
            raise ValueError(f"images[{i}] has {x.shape[0]} channels; expected 1 (grey) or 3 (RGB)")
        if x.shape[1] < 1 or x.shape[2] < 1:
            raise ValueError(f"images[{i}] is empty: shape {tuple(x.shape)}")
        if not bool(torch.isfinite(x).all()):
            raise ValueError(f"images[{i}] contains NaN or Inf")
        y, note = _fit_one(x.float(), c, h, w, crop)
        out.append(y)
        notes.append(note)
    return torch.stack(out).contiguous(), notes
