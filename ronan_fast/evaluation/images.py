"""Images as users see them: 8-bit quantisation, the paper's edits, hashing and compact storage."""

from __future__ import annotations

import base64
import hashlib

import numpy as np
import torch
from torch import Tensor

from ronan_fast import edits
from ronan_fast.edits import from_uint8, to_uint8

__all__ = ["EDITS", "PROFILE_EDITS", "IMAGE_BITS", "quantise", "apply_edit", "to_uint8", "from_uint8", "images_sha256", "encode_uint8", "decode_uint8"]

#: bits per channel of every image the harness inverts (8: as saved to PNG)
IMAGE_BITS = 8
#: edits of belonging images (Table 8): pilgram's "1977" Instagram filter, JPEG at quality 75
EDITS = ("1977", "jpeg75")
#: edits a profile's images may be given: Table 8's, and "tone" (random tone edits) and "any"
#: (the same, half of them then JPEG at a random quality) for cells that fit the profile without
#: knowing which edit the belonging images had
PROFILE_EDITS = EDITS + ("tone", "any")


def quantise(images: Tensor) -> Tensor:
    """``round(x * 255) / 255`` of images in [0, 1]: what a saved 8-bit PNG holds."""
    return torch.round(images.detach().float().clamp(0, 1) * 255.0) / 255.0


def images_sha256(images: Tensor) -> str:
    """SHA-256 of the images' 8-bit values and shape: the identity of an image set in cache keys."""
    arr = to_uint8(images)
    h = hashlib.sha256(repr(arr.shape).encode())
    h.update(arr.tobytes())
    return h.hexdigest()


def encode_uint8(images: Tensor) -> dict:
    """A JSON-safe record of images (8-bit, base64) for previews kept in cache files."""
    arr = to_uint8(images)
    return {"shape": list(arr.shape), "uint8_b64": base64.b64encode(arr.tobytes()).decode("ascii")}


def decode_uint8(record: dict) -> Tensor:
    """Inverse of :func:`encode_uint8`; raises ``ValueError`` when the record is malformed."""
    try:
        shape = tuple(int(s) for s in record["shape"])
        raw = base64.b64decode(record["uint8_b64"], validate=True)
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"malformed image record: {e}") from None
    if len(shape) != 4 or int(np.prod(shape)) != len(raw):
        raise ValueError(f"image record holds {len(raw)} bytes, not shape {shape}")
    return from_uint8(np.frombuffer(raw, dtype=np.uint8).reshape(shape))


def apply_edit(images: Tensor, edit: str) -> Tensor:
    """Apply an edit of :data:`PROFILE_EDITS` to 8-bit images; returns 8-bit images in [0, 1], same shape.

    ``"1977"``: ``pilgram._1977`` (greyscale images go through RGB and back to greyscale).
    ``"jpeg75"``: save as JPEG at quality 75 with Pillow and read back. ``"tone"``: random tone
    edits; ``"any"``: random tone edits, half of them then JPEG (see :mod:`ronan_fast.edits`).
    """
    if edit not in PROFILE_EDITS:
        raise ValueError(f"edit must be one of {PROFILE_EDITS}, got {edit!r}")
    return edits.apply_edit(images, edit)
