"""Reading a file straight to one or more models' shapes in memory that does not grow with its resolution."""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from ronan_fast.imageio.files import ImageLoadError, _as_path, _opened, display_path
from ronan_fast.imageio.fit import _channels, _check_shape, _crop_box, _fit_note, _fit_one
from ronan_fast.imageio.pixels import _as_chw, _check_float_range, _check_int_range, _frames_note, _pixels

log = logging.getLogger("ronan_fast.imageio")


#: :func:`load_at_shapes` reads an image of at most this many pixels whole, as :func:`load_image`
#: does, and a larger one a strip at a time
PLAIN_PIXELS = 1 << 20
#: :func:`load_at_shapes` decodes a large JPEG at 1/2, 1/4 or 1/8 of its size only as far as this
#: many decoded pixels remain per target pixel along each side
DRAFT_MARGIN = 8
#: floats in one strip of :func:`load_at_shapes`'s large-image path (4 MB)
_STRIP_FLOATS = 1 << 20


class LoadedImage(NamedTuple):
    """One file read at one or more models' shapes by :func:`load_at_shapes`."""

    #: ``[C, H, W]`` float32 in [0, 1], one per shape asked for, in order
    images: list[Tensor]
    #: what loading did ("" when nothing), e.g. ``"palette, alpha composited on white"``
    note: str
    #: per shape, what fitting did, as :func:`to_model_shape` says it (``"unchanged"`` when nothing)
    fit_notes: list[str]


def _draft_scale(w0: int, h0: int, parts: list[tuple[int, int, tuple[int, int, int, int]]]) -> int:
    """The largest JPEG DCT scale (8, 4, 2; else 1) that leaves every part (``h, w, crop box``)
    at least :data:`DRAFT_MARGIN` decoded pixels per target pixel along each side."""
    for s in (8, 4, 2):
        if all(ch / s >= DRAFT_MARGIN * h and cw / s >= DRAFT_MARGIN * w for h, w, (_, _, ch, cw) in parts):
            return s
    return 1


def _aa_weights(start: float, length: float, lo: int, hi: int, out: int) -> tuple[Tensor, Tensor]:
    """Antialiased bilinear resampling of the span ``[start, start + length)`` of a row of pixels
    to ``out`` samples, reading only pixels ``lo .. hi - 1``: for each sample, the pixels it
    reads (``[out, K]``, counted from ``lo``) and their weights (``[out, K]``, summing to 1).

    The weights are those of ``F.interpolate(..., mode="bilinear", antialias=True,
    align_corners=False)`` (a triangle filter as wide as the scale when shrinking); with
    ``start = lo`` and ``length = hi - lo`` it is that resize of pixels ``lo .. hi - 1``."""
    scale = length / out
    support = scale if scale >= 1.0 else 1.0
    inv = 1.0 / scale if scale >= 1.0 else 1.0
    centre = start + scale * (np.arange(out) + 0.5)
    first = np.maximum((centre - support + 0.5).astype(np.int64), lo)  # truncation, as torch's C++ casts
    stop = np.minimum((centre + support + 0.5).astype(np.int64), hi)
    k = int(max(1, (stop - first).max()))
    idx = first[:, None] + np.arange(k)
    weight = np.clip(1.0 - np.abs((idx - centre[:, None] + 0.5) * inv), 0.0, None)
    weight[idx >= stop[:, None]] = 0.0
    total = weight.sum(1, keepdims=True)
    weight = np.divide(weight, total, out=np.zeros_like(weight), where=total > 0)
    idx = np.clip(idx, lo, hi - 1) - lo
    return torch.from_numpy(idx), torch.from_numpy(weight.astype(np.float32))


def _fit_in_strips(img: Image.Image, path: Path, c: int, h: int, w: int, box: tuple[float, float, float, float],
                   scale: float) -> tuple[Tensor, int, str]:
    """The part ``box`` (``top, left, height, width`` in the file's pixels) of the decoded image
    ``img`` (``scale`` file pixels a decoded pixel) fitted to ``(c, h, w)``, as :func:`_fit_one`
    fits the whole image's float copy, without making that copy: a strip of rows at a time is
    made float, resized along the rows, and added into the output rows it reaches. Returns the
    ``[c, h, w]`` image, the file's channels and the loading note."""
    top, left, ch, cw = (v / scale for v in box)
    x_lo, y_lo = int(math.floor(left)), int(math.floor(top))
    x_hi, y_hi = min(img.width, math.ceil(left + cw)), min(img.height, math.ceil(top + ch))
    cols, cols_w = _aa_weights(left, cw, x_lo, x_hi, w)
    rows, rows_w = _aa_weights(top, ch, y_lo, y_hi, h)
    # the vertical pass as (output row, input row, weight) triples, by input row
    pairs = rows_w.reshape(-1) > 0
    out_row = torch.arange(h).repeat_interleave(rows.shape[1])[pairs]
    in_row, in_w = rows.reshape(-1)[pairs], rows_w.reshape(-1)[pairs]
    order = torch.argsort(in_row, stable=True)
    out_row, in_row, in_w = out_row[order], in_row[order], in_w[order]
    bounds = torch.searchsorted(in_row, torch.arange(y_hi - y_lo + 1))
    width = x_hi - x_lo
    strip = max(1, min(y_hi - y_lo, _STRIP_FLOATS // (3 * (width + w * cols.shape[1]))))
    out = c0 = note = None
    for r0 in range(0, y_hi - y_lo, strip):
        r1 = min(y_hi - y_lo, r0 + strip)
        arr, note = _pixels(img.crop((x_lo, y_lo + r0, x_hi, y_lo + r1)), path)
        x = _as_chw(arr, path)
        del arr
        c0 = x.shape[0]
        if c0 == 3 and c == 1:
            x = _channels(x, 1)
        x = (x[:, :, cols] * cols_w).sum(-1)  # [C, rows, w]
        a, b = int(bounds[r0]), int(bounds[r1])
        if out is None:
            out = torch.zeros(x.shape[0], h, w)
        if b > a:
            out.index_add_(1, out_row[a:b], x[:, in_row[a:b] - r0, :] * in_w[a:b, None])
    return _channels(out, c), c0, note


def load_at_shapes(
    path: str | bytes | os.PathLike, shapes: Sequence[Sequence[int]], crop: bool = True
) -> LoadedImage:
    """Read an image file straight to each of ``shapes``, in memory that does not grow with its resolution.

    The result is what ``to_model_shape(load_image(path), shape, crop)`` gives for each shape:
    the same channels, centre crop and antialiased bilinear resize, the same notes. An image of
    at most :data:`PLAIN_PIXELS` pixels (1 megapixel) is read exactly so. A larger one is never
    made float as a whole:

    * a JPEG is decoded at 1/2, 1/4 or 1/8 of its size by libjpeg's DCT scaling
      (:meth:`PIL.Image.Image.draft`) as far as every shape keeps at least
      :data:`DRAFT_MARGIN` (8) decoded pixels per target pixel along each side;
    * the decoded 8-bit (or 16-bit) pixels are made float a strip of rows at a time, each strip
      resized along its rows and added into the output rows it reaches, with the weights of
      :func:`to_model_shape`'s resize over the crop's exact span.

    Peak memory is one file's decoded pixels in their own 8 or 16 bits (a JPEG's reduced while
    decoded: 1/64 of them at scale 1/8) plus a strip of a few megabytes and the results, instead
    of a float copy of the whole file (about 27 bytes a pixel for a colour image).

    Where the large-image path rounds differently from a full decode: the DCT-scaled JPEG
    decode is not the full decode followed by the same filter (on photos fitted to 28x28 and
    64x64, about 0.1/255 on average and at most a few 255ths at a pixel:
    ``bench/results/memory_cpu.md``); otherwise the only difference is the order of the float
    sums (about 1e-6).

    Args:
        path: the image file (only a regular file is opened).
        shapes: the ``(C, H, W)`` shapes to fit it to, e.g. the model's and the reference model's.
        crop: as for :func:`to_model_shape`.

    Raises:
        ImageLoadError: as :func:`load_image`.
    """
    targets = [_check_shape(s) for s in shapes]
    if not targets:
        raise ValueError("shapes is empty: give at least one (C, H, W)")
    path = _as_path(path)
    images, fit_notes = [], []
    with _opened(path) as img:
        frames = getattr(img, "n_frames", 1)
        w0, h0 = img.size
        boxes = [_crop_box(h0, w0, h, w, crop) for _, h, w in targets]
        if w0 * h0 <= PLAIN_PIXELS:
            img.load()  # a full decode, so truncated data is caught here
            arr, note = _pixels(img, path)
            full = _as_chw(arr, path)
            del arr
            for c, h, w in targets:
                x, fit = _fit_one(full, c, h, w, crop)
                images.append(x.contiguous())
                fit_notes.append(fit)
        else:
            scale = 1
            if img.format == "JPEG" and frames == 1:
                scale = _draft_scale(w0, h0, [(h, w, box) for (_, h, w), box in zip(targets, boxes)])
                if scale > 1:
                    img.draft(img.mode, (-(-w0 // scale), -(-h0 // scale)))
            img.load()  # a full decode (at the drafted size), so truncated data is caught here
            if img.size != (-(-w0 // scale), -(-h0 // scale)):  # the decoder chose another scale
                scale = max(1, round(w0 / max(1, img.width)))
                if img.size != (-(-w0 // scale), -(-h0 // scale)):
                    raise ImageLoadError(path, f"decoded to {img.width}x{img.height} pixels, not the {w0}x{h0} "
                                               "it declares (or a whole fraction of them)")
            if img.mode == "I":  # refused as a whole, as _pixels refuses it
                lo, hi = img.getextrema()
                _check_int_range(int(lo), int(hi), path)
            elif img.mode == "F":
                _check_float_range(np.asarray(img, dtype=np.float32), path)
            for (c, h, w), box in zip(targets, boxes):
                x, c0, note = _fit_in_strips(img, path, c, h, w, box, scale)
                images.append(x.clamp(0, 1).contiguous())
                fit_notes.append(_fit_note(c0, c, h0, w0, h, w, box, crop))
    note = _frames_note(note, frames)
    if note:
        log.debug("%s: %s", display_path(path), note)
    return LoadedImage(images, note, fit_notes)
