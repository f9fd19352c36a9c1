"""Image files in and out: load any common image file as float32 CHW in [0, 1], fit images to a
generator's native shape (saying what was done), and write PNGs and comparison grids atomically.

Loading keeps the stored pixel order (EXIF orientation tags are not applied) and reads the first
frame of animated or multi-page files. Transparent images are composited on white.
"""

from __future__ import annotations

import logging
import math
import os
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from torch import Tensor

from ronan_fast._atomic import atomic_path

__all__ = [
    "IMAGE_SUFFIXES",
    "ImageLoadError",
    "load_image",
    "load_image_with_note",
    "list_images",
    "to_model_shape",
    "load_images",
    "save_image",
    "save_grid",
]

log = logging.getLogger(__name__)

#: file suffixes (lower case) that :func:`list_images` treats as images
IMAGE_SUFFIXES = (
    ".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp",
    ".ppm", ".pgm", ".pbm", ".pnm",
)  # fmt: skip

#: ITU-R BT.601 luma weights for RGB -> grey
LUMA_601 = (0.299, 0.587, 0.114)

_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")


class ImageLoadError(ValueError):
    """A file could not be read as an image; ``path`` is the file and ``reason`` what was wrong."""

    def __init__(self, path: str | os.PathLike, reason: str) -> None:
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


# --------------------------------------------------------------------------- loading


def _composite_on_white(rgba: np.ndarray) -> np.ndarray:
    """[H, W, k+1] float in [0, 1] with alpha last -> [H, W, k] composited on a white background."""
    colour, alpha = rgba[..., :-1], rgba[..., -1:]
    return colour * alpha + (1.0 - alpha)


def _pixels(img: Image.Image, path: Path) -> tuple[np.ndarray, str]:
    """The image's pixels as float32 [H, W, C] in [0, 1] (C = 1 or 3) and a note on any conversion."""
    mode = img.mode
    if mode in _SIXTEEN_BIT_MODES:
        return np.array(img, dtype=np.float32)[..., None] / 65535.0, "16-bit grey"
    if mode == "I":
        a = np.array(img)
        lo, hi = int(a.min()), int(a.max())
        if lo < 0 or hi > 65535:
            raise ImageLoadError(path, f"32-bit integer image with values in [{lo}, {hi}], outside the 16-bit range")
        return a.astype(np.float32)[..., None] / 65535.0, "16-bit grey"
    if mode == "F":
        a = np.array(img, dtype=np.float32)
        if not np.isfinite(a).all() or a.min() < 0 or a.max() > 1:
            raise ImageLoadError(path, "32-bit float image with values outside [0, 1] (or NaN/Inf); cannot tell its range")
        return a[..., None], "32-bit float grey"
    if mode == "1":
        return np.array(img.convert("L"), dtype=np.float32)[..., None] / 255.0, "1-bit"
    if mode == "L":
        return np.array(img, dtype=np.float32)[..., None] / 255.0, ""
    if mode == "RGB":
        return np.array(img, dtype=np.float32) / 255.0, ""
    if mode in ("LA", "La"):
        a = np.array(img.convert("LA"), dtype=np.float32) / 255.0
        return _composite_on_white(a), "alpha composited on white"
    if mode == "P":
        if "transparency" in img.info:
            a = np.array(img.convert("RGBA"), dtype=np.float32) / 255.0
            return _composite_on_white(a), "palette, alpha composited on white"
        return np.array(img.convert("RGB"), dtype=np.float32) / 255.0, "palette"
    if mode == "PA":
        a = np.array(img.convert("RGBA"), dtype=np.float32) / 255.0
        return _composite_on_white(a), "palette, alpha composited on white"
    if mode in ("RGBA", "RGBa"):
        a = np.array(img.convert("RGBA"), dtype=np.float32) / 255.0
        return _composite_on_white(a), "alpha composited on white"
    if mode in ("CMYK", "YCbCr", "LAB", "HSV", "RGBX"):
        return np.array(img.convert("RGB"), dtype=np.float32) / 255.0, f"{mode}->RGB"
    raise ImageLoadError(path, f"unsupported image mode {mode!r}")


def load_image_with_note(path: str | os.PathLike) -> tuple[Tensor, str]:
    """Like :func:`load_image`, also returning a short note on any conversion ("" when none)."""
    path = Path(path)
    if not path.exists():
        raise ImageLoadError(path, "file not found")
    if path.is_dir():
        raise ImageLoadError(path, "is a folder, not an image file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                frames = getattr(img, "n_frames", 1)
                img.load()  # a full decode, so truncated data is caught here
                arr, note = _pixels(img, path)
    except ImageLoadError:
        raise
    except UnidentifiedImageError:
        raise ImageLoadError(path, "not a recognised image file") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageLoadError(path, f"too many pixels (over PIL.Image.MAX_IMAGE_PIXELS={Image.MAX_IMAGE_PIXELS}): {e}") from None
    except MemoryError:
        raise
    except Exception as e:  # any decoder failure means the file's data is bad
        raise ImageLoadError(path, f"truncated or corrupt image data ({type(e).__name__}: {e})") from None
    if arr.ndim != 3 or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ImageLoadError(path, f"decoded to an empty or malformed pixel array {arr.shape}")
    if frames > 1:
        note = ", ".join(filter(None, [note, f"first of {frames} frames"]))
    if note:
        log.debug("%s: %s", path, note)
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1))).float(), note


def load_image(path: str | os.PathLike) -> Tensor:
    """Read an image file as float32 ``[C, H, W]`` in [0, 1], C = 1 (grey) or 3 (colour).

    Handles 8-bit grey, RGB, RGBA/LA and palette images (transparency composited on white),
    16-bit grey (scaled by 65535), 1-bit, CMYK and other colour modes, JPEG, PNG, and whatever
    else Pillow decodes. Raises :class:`ImageLoadError` for a missing, unreadable, truncated or
    non-image file, or one with more pixels than ``PIL.Image.MAX_IMAGE_PIXELS`` (Pillow only
    warns between that and twice it; here it is the limit).
    """
    return load_image_with_note(path)[0]


def list_images(paths_or_folders: str | os.PathLike | Iterable[str | os.PathLike], recursive: bool = False) -> list[Path]:
    """Expand files and folders into a list of image files.

    A folder contributes its files whose suffix is in :data:`IMAGE_SUFFIXES` (any case), sorted
    by path, skipping hidden files; sub-folders only with ``recursive=True``. A file named
    directly is kept whatever its suffix (loading says if it is not an image). Duplicates are
    dropped, keeping the first.

    Raises:
        FileNotFoundError: a path does not exist.
        ValueError: a folder holds no image files, or nothing was given.
    """
    if isinstance(paths_or_folders, (str, os.PathLike)):
        paths_or_folders = [paths_or_folders]
    out: list[Path] = []
    seen: set[Path] = set()
    given = 0
    for p in paths_or_folders:
        given += 1
        path = Path(p)
        if not path.exists():
            raise FileNotFoundError(f"image path not found: {path}")
        if path.is_dir():
            walker = path.rglob("*") if recursive else path.iterdir()
            found = sorted(
                f for f in walker
                if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES
                and not any(part.startswith(".") for part in f.relative_to(path).parts)
            )
            if not found:
                hint = "" if recursive else " (sub-folders are searched only with recursive=True)"
                raise ValueError(f"folder {path} holds no image files with suffixes {', '.join(IMAGE_SUFFIXES)}{hint}")
        else:
            found = [path]
        for f in found:
            key = f.resolve()
            if key not in seen:
                seen.add(key)
                out.append(f)
    if given == 0:
        raise ValueError("no image paths or folders given")
    return out


# --------------------------------------------------------------------------- fitting to a model


def _check_shape(shape: Sequence[int]) -> tuple[int, int, int]:
    try:
        c, h, w = (int(s) for s in shape)
    except (TypeError, ValueError):
        raise ValueError(f"shape must be (C, H, W), got {shape!r}") from None
    if c not in (1, 3) or h < 1 or w < 1:
        raise ValueError(f"shape must be (C, H, W) with C in (1, 3) and H, W >= 1, got {tuple(shape)}")
    return c, h, w


def _fit_one(x: Tensor, c: int, h: int, w: int, crop: bool) -> tuple[Tensor, str]:
    steps = []
    if x.shape[0] != c:
        if c == 3:
            x = x.expand(3, -1, -1)
            steps.append("grey->RGB")
        else:
            luma = torch.tensor(LUMA_601, dtype=x.dtype, device=x.device).view(3, 1, 1)
            x = (x * luma).sum(0, keepdim=True)
            steps.append("RGB->grey")
    h0, w0 = x.shape[1:]
    if (h0, w0) != (h, w):
        how = ""
        if crop and h0 * w != w0 * h:
            if w0 * h > h0 * w:  # too wide for the target aspect ratio
                cw = min(w0, max(1, round(h0 * w / h)))
                left = (w0 - cw) // 2
                x = x[:, :, left:left + cw]
            else:
                ch = min(h0, max(1, round(w0 * h / w)))
                top = (h0 - ch) // 2
                x = x[:, top:top + ch, :]
            how = f" (centre crop to {x.shape[2]}x{x.shape[1]})"
        if tuple(x.shape[1:]) != (h, w):
            x = F.interpolate(x.unsqueeze(0), size=(h, w), mode="bilinear", align_corners=False, antialias=True)[0]
        steps.append(f"{w0}x{h0}->{w}x{h}{how}")
    return x.clamp(0, 1), ", ".join(steps) or "unchanged"


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


def load_images(
    paths: Iterable[str | os.PathLike] | str | os.PathLike,
    shape: Sequence[int],
    crop: bool = True,
    recursive: bool = False,
    with_notes: bool = False,
):
    """Load image files (or folders of them) fitted to ``shape``, skipping files that fail to load.

    Args:
        paths: files and/or folders (expanded by :func:`list_images`).
        shape: the generator's ``(C, H, W)``.
        crop, recursive: as for :func:`to_model_shape` and :func:`list_images`.
        with_notes: also return, per kept image, a note on what loading and fitting did.

    Returns:
        ``(images [N, C, H, W], kept_paths, errors)`` -- ``errors`` holds an :class:`ImageLoadError`
        per file that could not be read -- plus ``notes`` when ``with_notes`` is set. When no file
        loads, ``images`` is ``[0, C, H, W]``.
    """
    c, h, w = _check_shape(shape)
    files = list_images(paths, recursive=recursive)
    tensors, kept, errors, load_notes = [], [], [], []
    for f in files:
        try:
            x, note = load_image_with_note(f)
        except ImageLoadError as e:
            errors.append(e)
            continue
        tensors.append(x)
        kept.append(f)
        load_notes.append(note)
    if tensors:
        images, fit_notes = to_model_shape(tensors, (c, h, w), crop=crop)
    else:
        images, fit_notes = torch.empty(0, c, h, w), []
    if not with_notes:
        return images, kept, errors
    notes = [", ".join(n for n in (ln, fn) if n and n != "unchanged") or "unchanged"
             for ln, fn in zip(load_notes, fit_notes)]
    return images, kept, errors, notes


# --------------------------------------------------------------------------- writing


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
    out = []
    for ch in text:
        c = ord(ch)
        if 0x20 <= c <= 0x7E or 0xA0 <= c <= 0xFF:
            out.append(ch)
        elif 0xDC80 <= c <= 0xDCFF:
            out.append(f"\\x{c - 0xDC00:02x}")
        elif c < 0x100:
            out.append(f"\\x{c:02x}")
        elif c < 0x10000:
            out.append(f"\\u{c:04x}")
        else:
            out.append(f"\\U{c:08x}")
    return "".join(out)


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
