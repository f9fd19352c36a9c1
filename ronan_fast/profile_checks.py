"""Reading and checking a saved belonging profile: the file read with a size cap, and every
field of a profile checked (types, ranges, the losses' consistency with ``mu``/``sigma`` and the
rule, a finite threshold) before it is used. :mod:`ronan_fast.profile` re-exports
:class:`ProfileError` and the format constants."""

from __future__ import annotations

import math
import os
import reprlib
import stat
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from ronan_fast.profile import BelongingProfile

FORMAT = "ronan-fast belonging profile"
FORMAT_VERSION = 1
#: the largest profile file :meth:`BelongingProfile.load` reads (a profile of 100,000 images is about 9 MB)
MAX_PROFILE_BYTES = 64 * 2**20
#: the belonging rules: the Grubbs test on A' ("grubbs", the paper's) or on log A'
RULES = ("grubbs", "grubbs-log")
#: a calibrated profile whose threshold A' reaches this judges an image the model's own even where
#: the model reconstructs it only a few times better than the reference model does. On the
#: evaluation's cells (bench/results/profile_retry_full_default_cpu.md: 56 cells, both rules, after
#: the retries) the 9 thresholds from 0.49 up admitted 91-100% of the other images, the 103 up to
#: 0.065 at most 15%. A threshold under it is no guarantee: before the retries, one of 0.051 admitted 67%.
WEAK_THRESHOLD = 0.2
#: how a mismatch message names a warm start of each recorded ``kind`` (a learned encoder has none)
_START_NAMES = {"autoencoder": "the autoencoder's own encoder (--warm-start autoencoder, or a decoder built with "
                               "init='encoder')", "mapping": "starts through the mapping network (--warm-start mapping)"}


class ProfileError(ValueError):
    """A profile file or value is missing, unreadable or invalid."""


_brief_repr = reprlib.Repr()
_brief_repr.maxstring = _brief_repr.maxother = 80
_brief_repr.maxlist = _brief_repr.maxdict = _brief_repr.maxtuple = 6
_brief_repr.maxlevel = 3
_brief_repr.maxlong = 40


def _brief(value) -> str:
    """A short one-line ``repr`` of a value read from a file, however large or deep it is."""
    try:
        return _brief_repr.repr(value)
    except (RecursionError, ValueError):  # ValueError: an int too long to write in decimal
        return f"<{type(value).__name__}>"


def _shown(path: Path) -> str:
    from ronan_fast.imageio import display_path

    return display_path(path)


def _read_capped(path: Path, where: str) -> str:
    """The text of the regular file ``path`` (at most :data:`MAX_PROFILE_BYTES`), as UTF-8."""
    try:
        st = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        if os.path.lexists(path):
            raise ProfileError(f"{where}: a symbolic link to a missing file") from None
        raise ProfileError(f"profile file not found: {_shown(path)}") from None
    except OSError as e:
        raise ProfileError(f"cannot read {where}: {e.strerror or type(e).__name__}") from None
    except ValueError:
        raise ProfileError(f"{where}: not a usable file name (it holds a NUL character)") from None
    if stat.S_ISDIR(st.st_mode):
        raise ProfileError(f"profile path is not a file but a folder: {_shown(path)}")
    if not stat.S_ISREG(st.st_mode):
        raise ProfileError(f"profile path is not a file but a FIFO, device or socket: {_shown(path)}")
    too_big = (f"{where} is over {MAX_PROFILE_BYTES >> 20} MB, more than any profile (one of 100,000 images "
               "is about 9 MB); not a profile written by ronan-fast")
    if st.st_size > MAX_PROFILE_BYTES:
        raise ProfileError(too_big)
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_BINARY", 0)
    try:
        fd = os.open(path, flags)
        with os.fdopen(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                raise ProfileError(f"profile path is not a file but a FIFO, device or socket: {_shown(path)}")
            raw = f.read(MAX_PROFILE_BYTES + 1)
    except OSError as e:
        raise ProfileError(f"cannot read {where}: {e.strerror or type(e).__name__}") from None
    if len(raw) > MAX_PROFILE_BYTES:
        raise ProfileError(too_big)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ProfileError(f"{where} is not UTF-8 text (byte {e.start} is {raw[e.start]:#04x}); "
                           "not a profile written by ronan-fast") from None


def _moments(calibrated: np.ndarray, rule: str) -> tuple[float, float]:
    if calibrated.ndim != 1 or calibrated.shape[0] < 3:
        raise ValueError(f"a belonging profile needs at least 3 losses, got {calibrated.size}")
    if not np.isfinite(calibrated).all():
        raise ValueError("profile losses contain NaN or Inf")
    if rule == "grubbs-log":
        if (calibrated <= 0).any():
            raise ValueError("rule 'grubbs-log' needs calibrated losses > 0; got a loss of 0 "
                             "(use rule 'grubbs')")
        values = np.log(calibrated)
    else:
        values = calibrated
    mu = float(values.mean())
    sigma = float(values.std(ddof=1))
    if not sigma > 0:
        raise ValueError("the profile losses are all equal (sigma = 0); the Grubbs test needs spread")
    return mu, sigma


def _is_num(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _validate(p: BelongingProfile) -> None:
    with np.errstate(all="ignore"):  # overflow in a hostile file's numbers is refused below, not warned about
        _validate_fields(p)


def _validate_fields(p: BelongingProfile) -> None:
    def bad(name: str, why: str):
        raise ProfileError(f"field {name!r} {why}, got {_brief(getattr(p, name))}"[:400])

    if p.format_version != FORMAT_VERSION:
        bad("format_version", f"must be {FORMAT_VERSION}")
    if not _is_num(p.mu):
        bad("mu", "must be a finite number")
    if not (_is_num(p.sigma) and p.sigma > 0):
        bad("sigma", "must be a finite number > 0")
    if not (_is_int(p.n) and p.n >= 3):
        bad("n", "must be an integer >= 3")
    if not (_is_num(p.alpha) and 0 < p.alpha < 1):
        bad("alpha", "must be a number in (0, 1)")
    if p.rule not in RULES:
        bad("rule", f"must be one of {RULES}")
    if not (isinstance(p.metric, str) and p.metric):
        bad("metric", "must be a metric name")
    if not isinstance(p.settings, dict):
        bad("settings", "must be an object")
    if not isinstance(p.generator_fingerprint, str):
        bad("generator_fingerprint", "must be a string")
    if not isinstance(p.generator_config, dict):
        bad("generator_config", "must be an object")
    if (p.reference_fingerprint is None) != (p.reference_config is None):
        bad("reference_config", "must be given exactly when reference_fingerprint is")
    if p.reference_fingerprint is not None and not isinstance(p.reference_fingerprint, str):
        bad("reference_fingerprint", "must be a string or null")
    if p.reference_config is not None and not isinstance(p.reference_config, dict):
        bad("reference_config", "must be an object or null")
    for name in ("calibrated_losses", "raw_losses"):
        v = getattr(p, name)
        if not (isinstance(v, list) and len(v) == p.n and all(_is_num(x) and x >= 0 for x in v)):
            bad(name, f"must be a list of n={p.n} finite losses >= 0")
    if p.reference_losses is not None:
        v = p.reference_losses
        if not (isinstance(v, list) and len(v) == p.n and all(_is_num(x) and x > 0 for x in v)):
            bad("reference_losses", f"must be null or a list of n={p.n} finite losses > 0")
    if (p.reference_losses is None) != (p.reference_fingerprint is None):
        bad("reference_losses", "must be given exactly when the profile is calibrated (reference_fingerprint)")
    if p.reference_losses is not None:
        expect = np.asarray(p.raw_losses) / np.asarray(p.reference_losses)
        if not np.allclose(expect, p.calibrated_losses, rtol=1e-9, atol=0):
            bad("calibrated_losses", "must equal raw_losses / reference_losses")
    elif p.calibrated_losses != p.raw_losses:
        bad("calibrated_losses", "must equal raw_losses in an uncalibrated profile")
    for name in ("seed", "inversion_seed"):
        if not _is_int(getattr(p, name)):
            bad(name, "must be an integer")
    for name in ("version", "created", "generator_name"):
        if not isinstance(getattr(p, name), str):
            bad(name, "must be a string")
    if p.reference_name is not None and not isinstance(p.reference_name, str):
        bad("reference_name", "must be a string or null")
    if p.image_bits is not None and not (_is_int(p.image_bits) and 1 <= p.image_bits <= 16):
        bad("image_bits", "must be null or an integer in [1, 16]")
    if p.edit is not None:
        from ronan_fast.edits import EDIT_HELP, check_edit

        try:
            check_edit(p.edit)
        except ValueError:
            bad("edit", f"must be null or {EDIT_HELP}")
    if p.reference_source is not None:
        src = p.reference_source
        if not (isinstance(src, dict) and isinstance(src.get("spec"), str) and src["spec"]
                and all(isinstance(k, str) for k in src)):
            bad("reference_source", "must be null or an object with a 'spec' string")
        if p.reference_fingerprint is None:
            bad("reference_source", "must be null in an uncalibrated profile")
    if p.warm_start is not None:
        ws = p.warm_start
        if not (isinstance(ws, dict) and isinstance(ws.get("sha256"), str) and len(ws["sha256"]) == 64
                and all(isinstance(k, str) for k in ws)):
            bad("warm_start", "must be null or an object with a 64-digit 'sha256' string")
    if (p.retries is None) != (p.retried is None):
        bad("retried", "must be given exactly when retries is")
    if p.retries is not None:
        if not (_is_int(p.retries) and p.retries >= 1):
            bad("retries", "must be null or an integer >= 1")
        if not (isinstance(p.retried, list) and all(_is_int(i) and 0 <= i < p.n for i in p.retried)):
            bad("retried", f"must be a list of image indices in [0, {p.n})")
    # mu and sigma must be the moments of the stored losses on the rule's scale.
    try:
        mu, sigma = _moments(np.asarray(p.calibrated_losses, dtype=np.float64), p.rule)
    except ValueError as e:
        raise ProfileError(f"calibrated_losses: {e}") from None
    if not (math.isclose(mu, p.mu, rel_tol=1e-9, abs_tol=1e-12) and math.isclose(sigma, p.sigma, rel_tol=1e-9)):
        raise ProfileError(f"mu/sigma ({p.mu!r}, {p.sigma!r}) are not the mean and sample std of the stored "
                           f"calibrated_losses on the {p.rule!r} scale ({mu!r}, {sigma!r})")
    # the test itself must give numbers: a finite critical value and threshold
    try:
        crit = p.critical_value
        edge = p.mu + crit * p.sigma
    except (ValueError, ArithmeticError) as e:
        raise ProfileError(f"n={p.n} and alpha={p.alpha!r} give no Grubbs critical value ({e})") from None
    if not math.isfinite(crit):
        bad("alpha", f"gives no finite Grubbs critical value for n={p.n}")
    if not (math.isfinite(edge) and (p.rule != "grubbs-log" or edge < math.log(sys.float_info.max))):
        raise ProfileError(f"the belonging threshold (mu + G_crit * sigma = {edge!r} on the {p.rule!r} scale) "
                           "is not a finite loss")


def weak_threshold_text(calibrated: bool, threshold: float, rule: str, sigma: float) -> str | None:
    """What a calibrated profile whose threshold is at least :data:`WEAK_THRESHOLD` means for its
    verdicts (None for any other profile)."""
    if not calibrated or not threshold >= WEAK_THRESHOLD:
        return None
    scale = "log A'" if rule == "grubbs-log" else "A'"
    return (f"the profile's threshold is A' < {threshold:.3g}: an image whose loss under this model is "
            f"{threshold:.2g} times its loss under the reference model would be judged this model's, so the test can "
            f"hardly tell the model's images from others (in the evaluation, every profile with a threshold from 0.49 "
            f"up admitted 91-100% of the other images). Either the inversion missed many of the model's own images "
            f"(sigma {sigma:.3g} on {scale}; docs/performance.md#held-out-generators names the models it does not "
            "converge on: try --warm-start or more restarts), or the reference model reconstructs them nearly as "
            "well as this one (an edit that removes their detail, a reference too like the model)")
