"""Named image edits: what happened to an image between the generator and the inspector.

An image a model generated may reach the inspector JPEG-compressed or filtered. Such an image no
longer inverts to (almost) zero loss, so a belonging profile fitted on the model's unedited images
rejects it. When the edit is known, fit the profile on the model's own images passed through the
same edit (:meth:`ronan_fast.Attributor.fit` ``edit=``; ``ronan-fast profile --edit``): the test
then asks "was this image made by the model and then edited so?".

Edits work on 8-bit images (as saved to files):

* ``"jpegQ"`` (``Q`` from 1 to 100, e.g. ``"jpeg75"``): save as JPEG at quality ``Q`` with Pillow
  and read back;
* ``"1977"``: pilgram's "1977" Instagram filter (greyscale images go through RGB and back); needs
  the ``pilgram`` package.
* ``"tone"``: a random chain of one to three tone edits, each a gain (0.8 to 1.25, log-uniform)
  and an offset (-0.08 to 0.08) per image, slightly different per colour channel, clipped and
  rounded to 8 bits after every stage. It stands for "some brightness / contrast / colour edit,
  not known which": a profile fitted on images edited so, scored with the metric ``"mse-tone"``
  (which undoes the map itself), expects the extra rounding such edits leave. The draws come
  from a hash of each image's bytes, so an image is always edited the same way.
* ``"any"``: the ``"tone"`` edit (the same draws), then, for about half of the images, JPEG at a
  quality drawn from 50 to 95. It stands for "some tone edit, perhaps saved as JPEG, not known
  which": a profile fitted on images edited so (metric ``"mse-tone"``) also expects what JPEG
  compression leaves, which no tone map undoes.
"""

from __future__ import annotations

import io
import re
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # torch is imported on use: the command line's argument checks stay cheap
    from torch import Tensor

__all__ = ["apply_edit", "check_edit", "check_edit_metric", "EDIT_HELP", "RANDOM_EDITS"]

EDIT_HELP = ("'jpegQ' (JPEG at quality Q, 1-100, e.g. jpeg75), '1977' (pilgram's 1977 filter), 'tone' (random "
             "brightness/contrast/colour edits, for an unknown tone edit; score with the metric mse-tone) or 'any' "
             "(random tone edits, half of them then saved as JPEG at a random quality from 50 to 95, for an unknown "
             "edit; score with mse-tone)")
#: edits that stand for an edit not known in advance; they go with the metric "mse-tone"
RANDOM_EDITS = ("tone", "any")
_JPEG = re.compile(r"jpeg([0-9]{1,3})")


def check_edit(edit: object, name: str = "edit") -> str:
    """Return ``edit`` if it names an edit; else raise ``ValueError`` naming the argument ``name``."""
    if isinstance(edit, str):
        if edit in ("1977", *RANDOM_EDITS):
            return edit
        m = _JPEG.fullmatch(edit)
        if m and 1 <= int(m.group(1)) <= 100 and str(int(m.group(1))) == m.group(1):
            return edit
    raise ValueError(f"{name} must be {EDIT_HELP}, got {edit!r}")


def check_edit_metric(edit: str | None, metric: str | None, edit_arg: str = "edit", metric_arg: str = "metric") -> None:
    """Raise ``ValueError`` when a profile edit and the metric do not go together: ``"tone"`` and
    ``"any"`` (random tone edits) need ``"mse-tone"``, which undoes the tone map; with any other
    metric the edited profile images would reconstruct as badly as any other image. ``edit_arg``
    and ``metric_arg`` name the arguments (``"--edit"``-style names are shown as ``--edit tone``)."""
    if edit not in RANDOM_EDITS or metric == "mse-tone":
        return

    def shown(arg: str, value: str) -> str:
        return f"{arg} {value}" if arg.startswith("--") else f"{arg}={value!r}"

    raise ValueError(f"{shown(edit_arg, edit)} (random tone edits) is for the metric 'mse-tone' "
                     f"({shown(metric_arg, 'mse-tone')}), which undoes the tone map; with {metric or 'mse'!r} the "
                     "edited profile images would reconstruct as badly as any other image")


def to_uint8(images: Tensor) -> np.ndarray:
    """Images ``[N, C, H, W]`` in [0, 1] as uint8 (rounded), same layout."""
    import torch

    return torch.round(images.detach().float().cpu().clamp(0, 1) * 255.0).to(torch.uint8).numpy()


def from_uint8(arr: np.ndarray) -> Tensor:
    """uint8 images as float images in [0, 1] (a copy), same layout."""
    import torch

    return torch.from_numpy(np.array(arr, dtype=np.uint8, copy=True)).float() / 255.0


def _pil(img: np.ndarray):
    from PIL import Image

    if img.shape[0] == 1:
        return Image.fromarray(img[0], mode="L")
    return Image.fromarray(np.transpose(img, (1, 2, 0)), mode="RGB")


def _back(im, channels: int) -> np.ndarray:
    if channels == 1:
        return np.asarray(im.convert("L"), dtype=np.uint8)[None]
    return np.transpose(np.asarray(im.convert("RGB"), dtype=np.uint8), (2, 0, 1))


def _image_rng(img: np.ndarray) -> np.random.Generator:
    """A random generator seeded by a hash of one uint8 image's bytes and shape."""
    import hashlib

    digest = hashlib.sha256(np.ascontiguousarray(img).tobytes() + repr(img.shape).encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def _random_tone(img: np.ndarray, rng: np.random.Generator | None = None) -> np.ndarray:
    """The ``"tone"`` edit of one uint8 image ``[C, H, W]``, drawn from ``rng`` (default: a hash of its bytes)."""
    rng = _image_rng(img) if rng is None else rng
    x = img.astype(np.float64)
    c = img.shape[0]
    for _ in range(int(rng.integers(1, 4))):
        gain = np.exp(rng.uniform(np.log(0.8), np.log(1.25)) + rng.uniform(-0.05, 0.05, size=(c, 1, 1)))
        offset = rng.uniform(-0.08, 0.08) + rng.uniform(-0.02, 0.02, size=(c, 1, 1))
        x = np.clip(np.round(gain * x + 255.0 * offset), 0, 255)
    return x.astype(np.uint8)


def _jpeg(img: np.ndarray, quality: int) -> np.ndarray:
    """One uint8 image ``[C, H, W]`` saved as JPEG at ``quality`` with Pillow and read back."""
    from PIL import Image

    buf = io.BytesIO()
    _pil(img).save(buf, format="JPEG", quality=quality)
    buf.seek(0)
    im = Image.open(buf)
    im.load()
    return _back(im, img.shape[0])


def _random_any(img: np.ndarray) -> np.ndarray:
    """The ``"any"`` edit of one uint8 image: its ``"tone"`` edit, then JPEG for about half of them."""
    rng = _image_rng(img)
    x = _random_tone(img, rng)
    if rng.random() < 0.5:
        x = _jpeg(x, int(rng.integers(50, 96)))
    return x


def apply_edit(images: Tensor, edit: str) -> Tensor:
    """``edit`` applied to each image of ``images`` (``[N, C, H, W]`` in [0, 1], C = 1 or 3).

    The images are rounded to 8 bits first; returns 8-bit-valued float images in [0, 1], same
    shape, on the CPU.
    """
    import torch
    from torch import Tensor

    check_edit(edit)
    if not isinstance(images, Tensor) or images.ndim != 4 or images.shape[1] not in (1, 3):
        shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise ValueError(f"images must be a tensor [N, C, H, W] with C = 1 or 3 to edit, got {shape}")
    if not bool(torch.isfinite(images).all()):
        raise ValueError("images contain NaN or Inf; cannot edit them")
    if edit == "1977":
        try:
            import pilgram
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise ImportError("the '1977' edit needs the pilgram package: pip install pilgram") from e
    arr = to_uint8(images)
    if edit in RANDOM_EDITS:
        one = _random_tone if edit == "tone" else _random_any
        return from_uint8(np.stack([one(img) for img in arr]) if len(arr) else arr)
    out = np.empty_like(arr)
    for i, img in enumerate(arr):
        if edit == "1977":
            out[i] = _back(pilgram._1977(_pil(img).convert("RGB")), img.shape[0])
        else:
            out[i] = _jpeg(img, int(edit[4:]))
    return from_uint8(out)
