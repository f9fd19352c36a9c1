"""Opening image files safely: regular files only, errors that name the file, names printed safely."""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import warnings
from collections.abc import Iterator
from pathlib import Path

from PIL import Image, UnidentifiedImageError


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
