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

Everything is importable from here; the parts live in submodules: :mod:`~ronan_fast.imageio.files`
(opening files safely), :mod:`~ronan_fast.imageio.pixels` (decoding one file),
:mod:`~ronan_fast.imageio.fit` (fitting to a model's shape), :mod:`~ronan_fast.imageio.large`
(reading straight to a shape), :mod:`~ronan_fast.imageio.listing` (finding the inputs' image
files) and :mod:`~ronan_fast.imageio.writing` (PNGs and grids).
"""

from __future__ import annotations

from ronan_fast.imageio.files import ImageLoadError, display_path
from ronan_fast.imageio.fit import to_model_shape
from ronan_fast.imageio.large import DRAFT_MARGIN, PLAIN_PIXELS, LoadedImage, load_at_shapes
from ronan_fast.imageio.listing import IMAGE_SUFFIXES, ImageList, list_images, load_images
from ronan_fast.imageio.pixels import load_image, load_image_with_note
from ronan_fast.imageio.writing import save_grid, save_image

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
