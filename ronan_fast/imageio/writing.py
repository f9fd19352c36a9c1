"""Writing images: PNGs and the labelled comparison grid, atomically."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from ronan_fast._atomic import atomic_path
from ronan_fast.imageio.files import _escaped


def _to_uint8_hwc(image: Tensor, arg: str) -> np.ndarray:
    if not isinstance(image, Tensor):
        raise TypeError(f"{arg} must be a tensor [C, H, W], got {type(image).__name__}")
    if image.dim() == 2:
        image = image.unsqueeze(0)
    if image.dim() != 3 or image.shape[0] not in (1, 3, 4):
        raise ValueError(f"{arg} must be [C, H, W] with C in (1, 3, 4) or [H, W], got shape {tuple(image.shape)}")
    if image.shape[1] < 1 or image.shape[2] < 1:
        raise ValueError(f"{arg} is empty: shape {tuple(image.shape)}")
    x = image.detach().to("cpu", torch.float32)
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{arg} contains NaN or Inf")
    a = (x.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    return a[..., 0] if a.shape[2] == 1 else a


def _atomic_png(array: np.ndarray, path: str | os.PathLike) -> Path:
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ValueError(f"path must end in .png (images are written as PNG), got {path}")
    with atomic_path(path) as tmp:
        Image.fromarray(array).save(tmp, format="PNG")
    return path


def save_image(image: Tensor, path: str | os.PathLike) -> Path:
    """Write ``[C, H, W]`` (C = 1, 3 or 4) or ``[H, W]`` values in [0, 1] as an 8-bit PNG, atomically.

    Values are clamped to [0, 1] and rounded. The file appears complete or not at all (written
    to a temporary file in the same folder, then renamed); missing parent folders are created.
    """
    return _atomic_png(_to_uint8_hwc(image, "image"), path)


#: grid labels wider than this many pixels (about 60 characters) are cut, unless label_width says otherwise
_MAX_LABEL_WIDTH = 360
#: pixels between a grid's text and the images or the next title
_TEXT_GAP = 4


def _label_font():
    """PIL's built-in bitmap font (Latin-1, 6 x 11 pixels a character): no font file needed."""
    from PIL import ImageFont

    loader = getattr(ImageFont, "load_default_imagefont", None)  # Pillow >= 10.1
    return loader() if loader is not None else ImageFont.load_default()


def _drawable(text: str) -> str:
    """``text`` with what the Latin-1 bitmap font cannot draw written as escapes: ``\\xNN`` for a
    control character or a byte of a file name that is not UTF-8 (a lone surrogate as
    ``surrogateescape`` decodes it), ``\\uXXXX`` / ``\\UXXXXXXXX`` for other characters."""
    return _escaped(text, lambda ch: 0x20 <= ord(ch) <= 0x7E or 0xA0 <= ord(ch) <= 0xFF)


def _fit_text(text: str, font, width: int) -> str:
    """``text``, or its longest start followed by "..." that is at most ``width`` pixels wide."""
    if font.getlength(text) <= width:
        return text
    lo, hi = 0, len(text)  # the longest fitting prefix length lies in [lo, hi]
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if font.getlength(text[:mid] + "...") <= width:
            lo = mid
        else:
            hi = mid - 1
    cut = text[:lo].rstrip() + "..."
    return cut if font.getlength(cut) <= width else ""


def _check_texts(texts, name: str, count: int | None) -> list[str] | None:
    if texts is None:
        return None
    if isinstance(texts, (str, bytes)) or not isinstance(texts, Sequence):
        raise ValueError(f"{name} must be a list of strings, got {type(texts).__name__}")
    texts = list(texts)
    for i, t in enumerate(texts):
        if t is not None and not isinstance(t, str):
            raise ValueError(f"{name}[{i}] must be a string or None, got {type(t).__name__}")
    if count is not None and len(texts) != count:
        raise ValueError(f"{name} has {len(texts)} entries for {count} rows; give one per row")
    return [_drawable(t or "") for t in texts]


def save_grid(
    rows: Sequence[Sequence[Tensor]],
    path: str | os.PathLike,
    pad: int = 2,
    pad_value: float = 1.0,
    labels: Sequence[str | None] | None = None,
    column_titles: Sequence[str | None] | None = None,
    label_width: int | None = None,
) -> Path:
    """Write rows of images side by side as one PNG, atomically, e.g. each image beside its reconstruction.

    Each row is a list of ``[C, H, W]`` images (or a ``[N, C, H, W]`` tensor). Cells are as large
    as the largest image in their column and row; smaller images sit at the top left. Grey
    images are repeated to RGB when any image is RGB. ``pad`` pixels of ``pad_value`` separate
    and surround the cells; missing cells of short rows are left as padding.

    Text is drawn in PIL's built-in bitmap font (6 x 11 pixels a character, no font file),
    black on a light ``pad_value`` and white on a dark one. Characters it cannot draw (it has
    Latin-1 only) are written as escapes such as ``\\u732b`` and, for bytes of file names that
    are not UTF-8, ``\\xff``.

    Args:
        labels: one line of text per row (None or "" for none), e.g. ``"cat.png  belongs  G=-1.23"``,
            drawn in a strip to the right of the rows, vertically centred on its row. The strip
            is ``label_width`` pixels wide plus a gap of 4 and ``pad``; a label wider than
            ``label_width`` is cut and ends in "...".
        column_titles: a title above each column (at most one per column), in a strip of the
            text's height plus ``pad`` above the first row; a column is widened to its title's
            width plus 4 pixels.
        label_width: the label strip's width in pixels; default: the longest label's, at most
            360 (about 60 characters).

    Without labels and titles the PNG is ``sum(column widths) + pad * (columns + 1)`` wide and
    ``sum(row heights) + pad * (rows + 1)`` high; a row is at least the text's height (11
    pixels) high when labelled.
    """
    if not isinstance(pad, int) or isinstance(pad, bool) or pad < 0:
        raise ValueError(f"pad must be an integer >= 0, got {pad!r}")
    if not 0 <= float(pad_value) <= 1:
        raise ValueError(f"pad_value must lie in [0, 1], got {pad_value!r}")
    if isinstance(rows, Tensor) and rows.dim() != 5:
        raise ValueError(f"rows must be a list of rows of [C, H, W] images, got a tensor of shape {tuple(rows.shape)}")
    grid_rows = [list(r) for r in rows]
    if not grid_rows or not any(grid_rows):
        raise ValueError("rows holds no images")
    labels = _check_texts(labels, "labels", len(grid_rows))
    titles = _check_texts(column_titles, "column_titles", None)
    if label_width is not None:
        if labels is None:
            raise ValueError("label_width is given but labels is None")
        if not isinstance(label_width, int) or isinstance(label_width, bool) or label_width < 1:
            raise ValueError(f"label_width must be an integer >= 1 (pixels), got {label_width!r}")
    cells: list[list[np.ndarray]] = []
    for i, row in enumerate(grid_rows):
        cells.append([_to_uint8_hwc(im, f"rows[{i}][{j}]") for j, im in enumerate(row)])
    channels = 3 if any(a.ndim == 3 and a.shape[2] == 3 for r in cells for a in r) else 1
    if any(a.ndim == 3 and a.shape[2] == 4 for r in cells for a in r):
        raise ValueError("save_grid takes grey or RGB images, not RGBA")
    ncols = max(len(r) for r in cells)
    if titles is not None and len(titles) > ncols:
        raise ValueError(f"column_titles has {len(titles)} entries for {ncols} columns")
    font = _label_font() if labels is not None or titles is not None else None
    text_h = 0 if font is None else font.getbbox("Ag")[3]
    col_w = [max((r[j].shape[1] for r in cells if j < len(r)), default=0) for j in range(ncols)]
    if titles is not None:
        col_w = [max(w, math.ceil(font.getlength(titles[j])) + _TEXT_GAP) if j < len(titles) and titles[j] else w
                 for j, w in enumerate(col_w)]
    row_h = [max((a.shape[0] for a in r), default=0) for r in cells]
    strip_w = 0
    if labels is not None:
        row_h = [max(h, text_h) for h in row_h]
        widest = max((math.ceil(font.getlength(t)) for t in labels), default=0)
        strip_w = label_width if label_width is not None else min(widest, _MAX_LABEL_WIDTH)
    title_h = text_h + pad if titles is not None else 0
    height = title_h + sum(row_h) + pad * (len(cells) + 1)
    width = sum(col_w) + pad * (ncols + 1) + (_TEXT_GAP + strip_w + pad if strip_w else 0)
    canvas = np.full((height, width, channels), round(float(pad_value) * 255), dtype=np.uint8)
    y = pad + title_h
    for r, rh in zip(cells, row_h):
        x = pad
        for j, a in enumerate(r):
            if a.ndim == 2:
                a = a[..., None]
            if a.shape[2] != channels:
                a = np.repeat(a, channels, axis=2)
            canvas[y:y + a.shape[0], x:x + a.shape[1]] = a
            x += col_w[j] + pad
        y += rh + pad
    if math.prod(canvas.shape[:2]) == 0:
        raise ValueError("rows holds no images")
    if font is not None:
        from PIL import ImageDraw

        image = Image.fromarray(canvas[..., 0] if channels == 1 else canvas)
        draw = ImageDraw.Draw(image)
        ink = 0 if float(pad_value) >= 0.5 else 255
        fill = ink if channels == 1 else (ink, ink, ink)
        if titles is not None:
            x = pad
            for j, title in enumerate(titles):
                draw.text((x, pad), _fit_text(title, font, col_w[j]), font=font, fill=fill)
                x += col_w[j] + pad
        if labels is not None and strip_w:
            x = pad + sum(col_w) + pad * ncols + _TEXT_GAP
            y = pad + title_h
            for label, rh in zip(labels, row_h):
                draw.text((x, y + (rh - text_h) // 2), _fit_text(label, font, strip_w), font=font, fill=fill)
                y += rh + pad
        canvas = np.asarray(image)
        return _atomic_png(canvas, path)
    return _atomic_png(canvas[..., 0] if channels == 1 else canvas, path)
