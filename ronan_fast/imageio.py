"""Image files in and out: load any common image file as float32 CHW in [0, 1], fit images to a
generator's native shape (saying what was done), and write PNGs and comparison grids atomically.

Loading keeps the stored pixel order (EXIF orientation tags are not applied) and reads the first
frame of animated or multi-page files. Transparent images are composited on white.

Reading is safe with files from anyone: only regular files are opened (never a FIFO, a device or
a socket), Pillow's pixel limit (``PIL.Image.MAX_IMAGE_PIXELS``) refuses decompression bombs,
every failure is an :class:`ImageLoadError` naming the file and the reason, and
:func:`load_at_shapes` reads a file straight to a model's shape in memory that does not grow
with the file's resolution. File names are kept as Python decodes them (not-UTF-8 bytes as
lone surrogates); :func:`display_path` prints them safely.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import math
import os
import stat
import warnings
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from torch import Tensor

from ronan_fast._atomic import atomic_path

__all__ = [
    "IMAGE_SUFFIXES",
    "ImageLoadError",
    "ImageList",
    "LoadedImage",
    "PLAIN_PIXELS",
    "DRAFT_MARGIN",
    "display_path",
    "load_image",
    "load_image_with_note",
    "load_at_shapes",
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

#: :func:`load_at_shapes` reads an image of at most this many pixels whole, as :func:`load_image`
#: does, and a larger one a strip at a time
PLAIN_PIXELS = 1 << 20
#: :func:`load_at_shapes` decodes a large JPEG at 1/2, 1/4 or 1/8 of its size only as far as this
#: many decoded pixels remain per target pixel along each side
DRAFT_MARGIN = 8
#: floats in one strip of :func:`load_at_shapes`'s large-image path (4 MB)
_STRIP_FLOATS = 1 << 20


class ImageLoadError(ValueError):
    """A file could not be read as an image; ``path`` is the file and ``reason`` what was wrong.

    The message is ``"<path>: <reason>"`` with the path as :func:`display_path` shows it, so it
    can be printed whatever bytes the file name holds; ``path`` keeps the name itself.
    """

    def __init__(self, path: str | bytes | os.PathLike, reason: str) -> None:
        self.path = Path(os.fsdecode(path))
        self.reason = reason
        super().__init__(f"{display_path(self.path)}: {reason}")


def display_path(path: str | bytes | os.PathLike) -> str:
    """``path`` as text that is safe to print to a terminal or a log, on one line.

    File names on Linux are bytes; Python decodes those that are not UTF-8 with
    ``surrogateescape``, so ``b"\\xff.png"`` becomes the string ``"\\udcff.png"``, which cannot be
    encoded for printing. Here such a byte is written ``\\xff``, a control character (a newline,
    an escape sequence's ESC) ``\\x0a``, ``\\x1b``, and any other character that is not printable
    (other lone surrogates, format characters such as a right-to-left override, separators other
    than the space) ``\\uXXXX`` or ``\\UXXXXXXXX``. Printable characters, ``é`` or ``猫``
    included, are kept. The result is for people to read; keep ``path`` itself to open the file.
    """
    text = os.fsdecode(path) if isinstance(path, bytes) else os.fspath(path)
    if not isinstance(text, str):  # an os.PathLike giving bytes
        text = os.fsdecode(text)
    if text.isprintable():
        return text
    return _escaped(text, str.isprintable)


def _escape(ch: str) -> str:
    """One character as an escape: ``\\xNN`` for a byte of a file name that is not UTF-8 (a lone
    surrogate as ``surrogateescape`` decodes it) or a character under U+0100, else ``\\uXXXX`` /
    ``\\UXXXXXXXX``."""
    c = ord(ch)
    if 0xDC80 <= c <= 0xDCFF:
        return f"\\x{c - 0xDC00:02x}"
    if c < 0x100:
        return f"\\x{c:02x}"
    return f"\\u{c:04x}" if c < 0x10000 else f"\\U{c:08x}"


def _escaped(text: str, keep) -> str:
    """``text`` with every character ``keep`` refuses written as :func:`_escape` writes it."""
    return "".join(ch if keep(ch) else _escape(ch) for ch in text)


def _as_path(item) -> Path:
    if isinstance(item, bytes):
        return Path(os.fsdecode(item))
    if isinstance(item, (str, os.PathLike)):
        return Path(os.fsdecode(os.fspath(item)))
    raise TypeError(f"image paths must be str, bytes or os.PathLike, got {type(item).__name__}")


# --------------------------------------------------------------------------- regular files only

_FILE_KINDS = (
    (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a folder"),
)  # fmt: skip


def _kind(mode: int) -> str:
    return next((name for test, name in _FILE_KINDS if test(mode)), "a special file of an unknown kind")


def _os_reason(e: OSError) -> str:
    if isinstance(e, PermissionError):
        return "cannot read: permission denied"
    if e.errno == errno.ELOOP:
        return "not a regular file: a loop of symbolic links"
    return f"cannot read ({e.strerror or e})"


def _stat(path: Path) -> os.stat_result:
    """``os.stat(path)``, following symbolic links; :class:`ImageLoadError` when that fails."""
    try:
        return os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        if os.path.lexists(path):
            raise ImageLoadError(path, "not a regular file: a symbolic link to a missing target") from None
        raise ImageLoadError(path, "file not found") from None
    except OSError as e:
        raise ImageLoadError(path, _os_reason(e)) from None
    except ValueError:  # an embedded NUL character
        raise ImageLoadError(path, "not a usable file name (it holds a NUL character)") from None


def _stat_regular(path: Path) -> os.stat_result:
    st = _stat(path)
    if stat.S_ISDIR(st.st_mode):
        raise ImageLoadError(path, "is a folder, not an image file")
    if not stat.S_ISREG(st.st_mode):
        raise ImageLoadError(path, f"not a regular file: {_kind(st.st_mode)}")
    return st


_OPEN_FLAGS = (os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0)
               | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0))


@contextlib.contextmanager
def _open_regular(path: Path) -> Iterator:
    """The file opened for binary reading, only if it is a regular file.

    It is checked with ``os.stat`` before it is opened (a FIFO, a device or a socket is never
    opened), then opened without blocking and checked again on the open descriptor, so that a
    file swapped for a FIFO in between cannot make a read wait forever."""
    _stat_regular(path)
    try:
        fd = os.open(path, _OPEN_FLAGS)
    except OSError as e:
        if isinstance(e, FileNotFoundError):
            raise ImageLoadError(path, "file not found") from None
        raise ImageLoadError(path, _os_reason(e)) from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise ImageLoadError(path, f"not a regular file: {_kind(mode)}")
        f = os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise
    with f:
        yield f


# --------------------------------------------------------------------------- decoding

#: Pillow formats never opened: Pillow hands an EPS file to Ghostscript, an outside program
_REFUSED_FORMATS = frozenset({"EPS"})


def _formats() -> list[str]:
    Image.init()
    return [f for f in Image.ID if f not in _REFUSED_FORMATS]


@contextlib.contextmanager
def _opened(path: Path) -> Iterator[Image.Image]:
    """The image file opened by Pillow (not yet decoded); anything that goes wrong while the
    body reads it becomes an :class:`ImageLoadError` naming what was wrong."""
    try:
        with warnings.catch_warnings():
            # Pillow's warnings about damaged metadata (EXIF, TIFF tags) would print lines of their
            # own; damaged pixel data is an error below
            warnings.filterwarnings("ignore", category=UserWarning, module="PIL")
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with _open_regular(path) as fp, Image.open(fp, formats=_formats()) as img:
                yield img
    except ImageLoadError:
        raise
    except UnidentifiedImageError:
        raise ImageLoadError(path, "not a recognised image file") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageLoadError(path, f"too many pixels (over PIL.Image.MAX_IMAGE_PIXELS={Image.MAX_IMAGE_PIXELS}): {e}") from None
    except MemoryError:
        raise ImageLoadError(path, "not enough memory to decode it") from None
    except RecursionError:
        raise ImageLoadError(path, "corrupt image data (nested too deeply to decode)") from None
    except Exception as e:  # any decoder failure means the file's data is bad
        msg = " ".join(str(e).split())[:200]
        raise ImageLoadError(path, f"truncated or corrupt image data ({type(e).__name__}: {msg})") from None


def _composite_on_white(rgba: np.ndarray) -> np.ndarray:
    """[H, W, k+1] float in [0, 1] with alpha last -> [H, W, k] composited on a white background."""
    colour, alpha = rgba[..., :-1], rgba[..., -1:]
    return colour * alpha + (1.0 - alpha)


def _check_int_range(lo: int, hi: int, path: Path) -> None:
    if lo < 0 or hi > 65535:
        raise ImageLoadError(path, f"32-bit integer image with values in [{lo}, {hi}], outside the 16-bit range")


def _check_float_range(a: np.ndarray, path: Path) -> None:
    if not np.isfinite(a).all() or a.min() < 0 or a.max() > 1:
        raise ImageLoadError(path, "32-bit float image with values outside [0, 1] (or NaN/Inf); cannot tell its range")


def _pixels(img: Image.Image, path: Path) -> tuple[np.ndarray, str]:
    """The image's pixels as float32 [H, W, C] in [0, 1] (C = 1 or 3) and a note on any conversion."""
    mode = img.mode
    if mode in _SIXTEEN_BIT_MODES:
        return np.array(img, dtype=np.float32)[..., None] / 65535.0, "16-bit grey"
    if mode == "I":
        a = np.array(img)
        _check_int_range(int(a.min()), int(a.max()), path)
        return a.astype(np.float32)[..., None] / 65535.0, "16-bit grey"
    if mode == "F":
        a = np.array(img, dtype=np.float32)
        _check_float_range(a, path)
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


def _as_chw(arr: np.ndarray, path: Path) -> Tensor:
    if arr.ndim != 3 or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ImageLoadError(path, f"decoded to an empty or malformed pixel array {arr.shape}")
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1))).float()


def _frames_note(note: str, frames: int) -> str:
    if frames > 1:
        return ", ".join(filter(None, [note, f"first of {frames} frames"]))
    return note


def load_image_with_note(path: str | bytes | os.PathLike) -> tuple[Tensor, str]:
    """Like :func:`load_image`, also returning a short note on any conversion ("" when none)."""
    path = _as_path(path)
    with _opened(path) as img:
        frames = getattr(img, "n_frames", 1)
        img.load()  # a full decode, so truncated data is caught here
        arr, note = _pixels(img, path)
    x = _as_chw(arr, path)
    note = _frames_note(note, frames)
    if note:
        log.debug("%s: %s", display_path(path), note)
    return x, note


def load_image(path: str | bytes | os.PathLike) -> Tensor:
    """Read an image file as float32 ``[C, H, W]`` in [0, 1], C = 1 (grey) or 3 (colour), at its own size.

    Handles 8-bit grey, RGB, RGBA/LA and palette images (transparency composited on white),
    16-bit grey (scaled by 65535), 1-bit, CMYK and other colour modes, JPEG, PNG, and whatever
    else Pillow decodes (except EPS, which Pillow would hand to Ghostscript). Only a regular file
    is opened. Raises :class:`ImageLoadError` for a missing, unreadable, truncated or non-image
    file, one that is not a regular file (a FIFO, a device, a socket, a dangling symbolic link),
    or one with more pixels than ``PIL.Image.MAX_IMAGE_PIXELS`` (Pillow only warns between that
    and twice it; here it is the limit).

    The whole image is decoded: memory grows with its size (about 27 bytes a pixel for a
    colour image). To fit files to a model's shape, :func:`load_at_shapes` reads them
    reduced and needs far less.
    """
    return load_image_with_note(path)[0]


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


class ImageList(list):
    """The image files :func:`list_images` found (a ``list`` of :class:`~pathlib.Path`), and in
    ``errors`` an :class:`ImageLoadError` for each input that gave none or part of none: a path
    that does not exist or is not a regular file or folder, a folder that cannot be listed or
    holds no image files, an entry of a folder with an image suffix that is not a regular file."""

    def __init__(self, files: Iterable[Path] = (), errors: Iterable[ImageLoadError] = ()) -> None:
        super().__init__(files)
        self.errors: list[ImageLoadError] = list(errors)


def _wanted(name: str) -> bool:
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_SUFFIXES


def _folder_entry(path: Path, found: list[Path], errors: list[ImageLoadError]) -> None:
    """``path``, an entry of a folder with an image suffix: kept if it is a regular file,
    skipped if it is a folder, an error if it is anything else."""
    try:
        mode = _stat(path).st_mode
    except ImageLoadError as e:
        errors.append(e)
        return
    if stat.S_ISREG(mode):
        found.append(path)
    elif not stat.S_ISDIR(mode):
        errors.append(ImageLoadError(path, f"not a regular file: {_kind(mode)}"))


def _scan_folder(folder: Path, recursive: bool, errors: list[ImageLoadError]) -> list[Path]:
    found: list[Path] = []
    unlisted: list[ImageLoadError] = []
    if recursive:
        def failed(e: OSError) -> None:
            where = Path(os.fsdecode(e.filename)) if e.filename is not None else folder
            unlisted.append(ImageLoadError(where, f"cannot list the folder ({_os_reason(e).removeprefix('cannot read: ')})"))

        for root, dirs, names in os.walk(folder, onerror=failed):
            dirs[:] = [d for d in dirs if not d.startswith(".")]
            for name in names:
                if _wanted(name):
                    _folder_entry(Path(root) / name, found, errors)
    else:
        try:
            with os.scandir(folder) as it:
                entries = [e.name for e in it if _wanted(e.name)]
        except OSError as e:
            unlisted.append(ImageLoadError(folder, f"cannot list the folder ({_os_reason(e).removeprefix('cannot read: ')})"))
            entries = []
        for name in entries:
            _folder_entry(folder / name, found, errors)
    errors.extend(unlisted)
    if not found and not unlisted:
        hint = "" if recursive else " (sub-folders are searched only with recursive=True)"
        errors.append(ImageLoadError(folder, f"folder holds no image files with suffixes {', '.join(IMAGE_SUFFIXES)}{hint}"))
    return sorted(found)


def list_images(
    paths_or_folders: str | bytes | os.PathLike | Iterable[str | bytes | os.PathLike], recursive: bool = False
) -> ImageList:
    """Expand files and folders into a list of image files, and say what could not be used.

    A folder contributes its regular files whose suffix is in :data:`IMAGE_SUFFIXES` (any case),
    sorted by path, skipping hidden files; sub-folders only with ``recursive=True`` (symbolic
    links to folders are not followed). A file named directly is kept whatever its suffix
    (loading says if it is not an image) if it is a regular file (or a link to one). Duplicates
    (the same file by its real path) are dropped, keeping the first. File names that are not
    UTF-8 stay ``str`` as Python decodes them (``surrogateescape``); ``bytes`` paths are decoded so.

    Nothing here stops at a bad input: each one that gives no file is an :class:`ImageLoadError`
    in the result's ``errors`` -- a path that does not exist, a FIFO, device, socket or dangling
    symbolic link (named or found in a folder under an image suffix; never opened), a folder
    that cannot be listed or holds no image files -- and the other inputs are still listed.

    Returns:
        an :class:`ImageList`: the files (a ``list`` of ``Path``), with ``.errors``.

    Raises:
        ValueError: nothing was given. TypeError: an item is not a path.
    """
    if isinstance(paths_or_folders, (str, bytes, os.PathLike)):
        paths_or_folders = [paths_or_folders]
    result = ImageList()
    seen: set[str] = set()
    given = 0
    for p in paths_or_folders:
        given += 1
        path = _as_path(p)
        if not os.fspath(p):
            result.errors.append(ImageLoadError(path, "an empty path names no file"))
            continue
        try:
            st = _stat(path)
        except ImageLoadError as e:
            result.errors.append(e)
            continue
        if stat.S_ISDIR(st.st_mode):
            found = _scan_folder(path, recursive, result.errors)
        elif stat.S_ISREG(st.st_mode):
            found = [path]
        else:
            result.errors.append(ImageLoadError(path, f"not a regular file: {_kind(st.st_mode)}"))
            continue
        for f in found:
            key = os.path.normcase(os.path.realpath(f))
            if key not in seen:
                seen.add(key)
                result.append(f)
    if given == 0:
        raise ValueError("no image paths or folders given")
    return result


# --------------------------------------------------------------------------- fitting to a model


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


def load_images(
    paths: Iterable[str | bytes | os.PathLike] | str | bytes | os.PathLike,
    shape: Sequence[int],
    crop: bool = True,
    recursive: bool = False,
    with_notes: bool = False,
):
    """Load image files (or folders of them) fitted to ``shape``, skipping what cannot be read.

    Each file is read by :func:`load_at_shapes`, so memory holds one file's pixels at a time
    (reduced while read) and the fitted images.

    Args:
        paths: files and/or folders (expanded by :func:`list_images`).
        shape: the generator's ``(C, H, W)``.
        crop, recursive: as for :func:`to_model_shape` and :func:`list_images`.
        with_notes: also return, per kept image, a note on what loading and fitting did.

    Returns:
        ``(images [N, C, H, W], kept_paths, errors)`` -- ``errors`` holds an :class:`ImageLoadError`
        per input that gave nothing (a missing path, an empty folder: see :func:`list_images`)
        and per file that could not be read -- plus ``notes`` when ``with_notes`` is set. When
        no file loads, ``images`` is ``[0, C, H, W]``.
    """
    c, h, w = _check_shape(shape)
    listing = list_images(paths, recursive=recursive)
    tensors, kept, notes = [], [], []
    errors: list[ImageLoadError] = list(listing.errors)
    for f in listing:
        try:
            loaded = load_at_shapes(f, [(c, h, w)], crop=crop)
        except ImageLoadError as e:
            errors.append(e)
            continue
        tensors.append(loaded.images[0])
        kept.append(f)
        notes.append(", ".join(n for n in (loaded.note, loaded.fit_notes[0]) if n and n != "unchanged")
                     or "unchanged")
    images = torch.stack(tensors) if tensors else torch.empty(0, c, h, w)
    if not with_notes:
        return images, kept, errors
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
