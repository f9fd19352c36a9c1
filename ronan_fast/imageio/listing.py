"""Finding the image files among the inputs given (files, folders) and loading them at a shape."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch

from ronan_fast.imageio.files import ImageLoadError, _as_path, _kind, _os_reason, _stat
from ronan_fast.imageio.fit import _check_shape
from ronan_fast.imageio.large import load_at_shapes


#: file suffixes (lower case) that :func:`list_images` treats as images
IMAGE_SUFFIXES = (
    ".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp",
    ".ppm", ".pgm", ".pbm", ".pnm",
)  # fmt: skip


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
