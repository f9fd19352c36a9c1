"""Decoding one image file to float32 CHW in [0, 1]: modes, bit depths, alpha, frames."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from ronan_fast.imageio.files import ImageLoadError, _as_path, _opened, display_path

log = logging.getLogger("ronan_fast.imageio")


_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")


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
