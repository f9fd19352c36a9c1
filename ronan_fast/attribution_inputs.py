"""The images an :class:`~ronan_fast.Attributor` is given, at the shapes the model and the
reference model make: files and folders read, a tensor fitted to the reference model (a tensor
is checked as :func:`~ronan_fast.inversion.invert` checks it).

A file is read straight to the shapes it is needed at before the next one is opened
(:func:`~ronan_fast.imageio.load_at_shapes`); one that cannot be read is an error of its own,
and the others are judged.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

from ronan_fast.adapters import GeneratorAdapter

__all__ = ["fit_to_model", "load_image_files"]


def fit_to_model(images: Tensor, model: GeneratorAdapter) -> tuple[Tensor, list[str]]:
    """``images`` at ``model``'s image shape, with a note per image of what was changed."""
    shape = tuple(model.image_shape)
    if tuple(images.shape[1:]) == shape:
        return images, ["unchanged"] * images.shape[0]
    from ronan_fast.imageio import to_model_shape

    return to_model_shape(images.detach().cpu(), shape)


def load_image_files(items, generator: GeneratorAdapter, reference: GeneratorAdapter | None):
    """Files and folders -> (images at ``generator``'s shape, at ``reference``'s (None
    uncalibrated), paths, notes, errors). Each file is read straight to the shapes it is
    needed at (:func:`~ronan_fast.imageio.load_at_shapes`) before the next is opened, so
    memory holds one file's decoded pixels and the fitted images, whatever the files' size."""
    from ronan_fast.imageio import ImageLoadError, list_images, load_at_shapes

    if isinstance(items, (str, bytes, os.PathLike)):
        items = [items]
    items = list(items)
    if not items:
        raise ValueError("no images given: pass a tensor, image files or folders")
    for item in items:
        if not isinstance(item, (str, bytes, os.PathLike)):
            raise TypeError(f"images must be a tensor or paths, got an item of type {type(item).__name__}")
    listing = list_images(items)  # a missing path, an empty folder, a FIFO...: an error each
    errors: list[tuple[str, str]] = [(str(e.path), e.reason) for e in listing.errors]
    shape = tuple(generator.image_shape)
    ref_shape = None if reference is None else tuple(reference.image_shape)
    shapes = [shape] if ref_shape in (None, shape) else [shape, ref_shape]
    xs, ref_xs, paths, notes = [], [], [], []
    for f in listing:
        try:
            loaded = load_at_shapes(f, shapes)
        except ImageLoadError as e:
            errors.append((str(e.path), e.reason))
            continue
        xs.append(loaded.images[0])
        paths.append(str(f))
        note = _join(loaded.note, loaded.fit_notes[0])
        if len(shapes) > 1:
            ref_xs.append(loaded.images[1])
            rn = loaded.fit_notes[1]
            note = _join(note, f"reference: {rn}" if rn != "unchanged" else "")
        notes.append(note)
    if not xs:
        return torch.empty(0, *shape), None, paths, [], errors
    x = torch.stack(xs)
    ref_x = None if ref_shape is None else (x if len(shapes) == 1 else torch.stack(ref_xs))
    return x, ref_x, paths, notes, errors


def _join(*parts: str) -> str:
    return ", ".join(p for p in parts if p and p != "unchanged")
