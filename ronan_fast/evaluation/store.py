"""Cache files: JSON written atomically, read back with a warning (never an error) when unusable."""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Callable
from pathlib import Path

from ronan_fast import _atomic

__all__ = ["CacheWarning", "write_json", "write_text", "read_cache", "check"]


class CacheWarning(UserWarning):
    """A cache file was unreadable, corrupt or stale; what it held is computed again."""


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` atomically: a temporary file in the same folder, then a rename."""
    return _atomic.write_text(path, text)


def write_json(path: str | os.PathLike, data: dict) -> Path:
    """Write ``data`` as JSON atomically; NaN and Inf are refused (they are not JSON)."""
    return write_text(path, json.dumps(data, indent=1, allow_nan=False) + "\n")


def check(condition: bool, why: str) -> None:
    """For validators: raise ``ValueError(why)`` unless ``condition``."""
    if not condition:
        raise ValueError(why)


def finite_list(v, n: int | None = None, lo: float | None = 0.0) -> bool:
    return (isinstance(v, list) and (n is None or len(v) == n)
            and all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
                    and (lo is None or x >= lo) for x in v))


def read_cache(path: str | os.PathLike, what: str, validate: Callable[[dict], None]) -> dict | None:
    """The JSON object in ``path`` if it is there and passes ``validate``, else None.

    A missing file is simply None. A file that cannot be read, is not JSON, or fails
    ``validate`` (which raises ``ValueError`` saying why) gives a :class:`CacheWarning` naming
    the file and the reason, and None: the caller computes ``what`` again and overwrites it.
    """
    path = Path(path)
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, dict):
            raise ValueError(f"expected a JSON object, got {type(data).__name__}")
        validate(data)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, ValueError, KeyError, TypeError) as e:
        warnings.warn(f"{path}: unusable {what} ({type(e).__name__}: {e}); computing it again",
                      CacheWarning, stacklevel=2)
        return None
    return data
