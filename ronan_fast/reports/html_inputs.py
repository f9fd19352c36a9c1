"""What :func:`ronan_fast.reports.html.render_html` accepts: a report's header, records, profile
and thumbnails checked field by field, each error naming the field and what was wrong (a report
file may come from anywhere: nothing in it is trusted)."""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Mapping, Sequence

import numpy as np

#: the values of a record's ``verdict``
VERDICTS = ("belongs", "does not belong", "error")
_RULES = ("grubbs", "grubbs-log")
_THUMB_KINDS = ("image", "model", "reference")
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_NUMBER_FIELDS = ("loss", "reference_loss", "calibrated_loss", "statistic", "critical_value", "p_value",
                  "threshold", "alpha")
_STRING_FIELDS = ("notes", "error", "rule", "profile_id")


def _is_real(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def _number(value, name: str) -> float | None:
    if value is None:
        return None
    if not _is_real(value):
        raise ValueError(f"{name} must be a number or None, got {type(value).__name__} {value!r}")
    return float(value)


def _string(value, name: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise ValueError(f"{name} must be a string or None, got {type(value).__name__} {value!r}")
    return value


def _get(mapping: Mapping, key: str, name: str, kind: str):
    """``mapping[key]`` checked to be of ``kind`` ("str", "num", "int", "bool", "dict"); None when absent."""
    value = mapping.get(key)
    where = f"{name}[{key!r}]"
    if value is None:
        return None
    if kind == "str":
        return _string(value, where)
    if kind == "num":
        return _number(value, where)
    if kind == "int":
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise ValueError(f"{where} must be an integer or None, got {type(value).__name__} {value!r}")
        return int(value)
    if kind == "bool":
        if not isinstance(value, (bool, np.bool_)):
            raise ValueError(f"{where} must be true, false or None, got {type(value).__name__} {value!r}")
        return bool(value)
    if kind == "dict":
        if not isinstance(value, Mapping):
            raise ValueError(f"{where} must be an object (dict) or None, got {type(value).__name__}")
        return value
    raise AssertionError(kind)


def _check_profile(profile) -> dict:
    from ronan_fast.profile import BelongingProfile

    if isinstance(profile, BelongingProfile):
        profile = {"rule": profile.rule, "n": profile.n, "mu": profile.mu, "sigma": profile.sigma,
                   "threshold": profile.threshold, "calibrated_losses": profile.calibrated_losses}
    if not isinstance(profile, Mapping):
        raise TypeError(f"profile must be a dict with rule, n, mu, sigma, threshold and calibrated_losses, "
                        f"got {type(profile).__name__}")
    missing = [k for k in ("rule", "n", "mu", "sigma", "threshold", "calibrated_losses") if k not in profile]
    if missing:
        raise ValueError(f"profile lacks {', '.join(missing)}")
    rule = profile["rule"]
    if rule not in _RULES:
        raise ValueError(f"profile['rule'] must be one of {_RULES}, got {rule!r}")
    out = {"rule": rule, "n": _get(profile, "n", "profile", "int")}
    for key in ("mu", "sigma", "threshold"):
        out[key] = _get(profile, key, "profile", "num")
    losses = profile["calibrated_losses"]
    if hasattr(losses, "tolist") and not isinstance(losses, list):  # a NumPy array or a tensor
        losses = losses.tolist()
    if isinstance(losses, (str, bytes)) or not isinstance(losses, Sequence):
        raise ValueError(f"profile['calibrated_losses'] must be a list of numbers, got {type(losses).__name__}")
    checked = []
    for i, v in enumerate(losses):
        if not (_is_real(v) and math.isfinite(v) and v >= 0):
            raise ValueError(f"profile['calibrated_losses'][{i}] must be a finite number >= 0, got {v!r}")
        checked.append(float(v))
    out["calibrated_losses"] = checked
    return out


def _check_record(rec, i: int) -> dict:
    name = f"records[{i}]"
    if not isinstance(rec, Mapping):
        raise ValueError(f"{name} must be a dict, got {type(rec).__name__}")
    verdict = rec.get("verdict")
    if verdict not in VERDICTS:
        raise ValueError(f"{name}['verdict'] must be one of {VERDICTS}, got {verdict!r}")
    path = rec.get("path")
    if isinstance(path, bytes):
        path = os.fsdecode(path)
    elif isinstance(path, os.PathLike):
        path = os.fspath(path)
        path = os.fsdecode(path) if isinstance(path, bytes) else path
    out = {"verdict": verdict, "path": _string(path, f"{name}['path']")}
    for key in _NUMBER_FIELDS:
        out[key] = _get(rec, key, name, "num")
    for key in _STRING_FIELDS:
        out[key] = _get(rec, key, name, "str")
    out["belongs"] = _get(rec, "belongs", name, "bool")
    out["stopped_early"] = _get(rec, "stopped_early", name, "bool")
    out["row_steps"] = _get(rec, "row_steps", name, "int")
    return out


def _check_thumbnails(thumbnails, n: int) -> dict[int, dict[str, bytes | None]]:
    if thumbnails is None:
        return {}
    if not isinstance(thumbnails, Mapping):
        raise TypeError(f"thumbnails must be a dict {{record position: {{'image'|'model'|'reference': PNG bytes}}}}, "
                        f"got {type(thumbnails).__name__}")
    out = {}
    for key, kinds in thumbnails.items():
        if isinstance(key, bool) or not isinstance(key, numbers.Integral) or not 0 <= key < n:
            raise ValueError(f"thumbnails key {key!r} must be a record position, an integer in [0, {n})")
        if not isinstance(kinds, Mapping):
            raise ValueError(f"thumbnails[{key}] must be a dict of PNG bytes by 'image', 'model', 'reference', "
                             f"got {type(kinds).__name__}")
        entry = {}
        for kind, data in kinds.items():
            if kind not in _THUMB_KINDS:
                raise ValueError(f"thumbnails[{key}] has key {kind!r}; expected one of {_THUMB_KINDS}")
            if data is not None:
                if not isinstance(data, (bytes, bytearray, memoryview)):
                    raise ValueError(f"thumbnails[{key}][{kind!r}] must be PNG bytes or None, "
                                     f"got {type(data).__name__}")
                data = bytes(data)
                if not data.startswith(_PNG_MAGIC) or len(data) < 24:
                    raise ValueError(f"thumbnails[{key}][{kind!r}] is not a PNG file's bytes "
                                     "(make them with png_bytes)")
            entry[kind] = data
        out[int(key)] = entry
    return out
