"""The belonging profile: what a model's own images look like to the belonging test (Eq. 3).

Offline, ``n`` images are generated with the model and inverted; their calibrated
reconstruction losses ``A'`` give a mean ``mu`` and a sample standard deviation ``sigma``
(``ddof=1``). A new image belongs to the model when its Grubbs statistic
``(A' - mu) / sigma`` is below the one-sided critical value for ``n`` and ``alpha``.

Two rules are offered:

* ``"grubbs-log"`` (the default) -- the test on ``log A'``: a model's own losses have a heavy
  right tail, and on the log scale a few slow inversions no longer inflate ``sigma``;
* ``"grubbs"`` -- the paper's test, on ``A'`` itself (the default for one-step "consistency"
  models, see :data:`FAMILY_RULES`).

A profile is only valid for the model, reference model, metric and inversion settings that
made it; :meth:`BelongingProfile.check_compatible` refuses any other combination. Profiles are
saved as JSON (written atomically) with a format version.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from ronan_fast._atomic import write_text
from ronan_fast.grubbs import grubbs_critical_value, grubbs_p_value
from ronan_fast.profile_checks import MAX_PROFILE_BYTES  # noqa: F401  (the file cap, importable from here as before)
from ronan_fast.profile_checks import (_START_NAMES, FORMAT, FORMAT_VERSION, RULES, ProfileError, _brief, _is_int,
                                      _moments, _read_capped, _shown, _validate, weak_threshold_text)

__all__ = [
    "BelongingProfile",
    "ProfileError",
    "ProfileMismatchError",
    "RULES",
    "DEFAULT_RULE",
    "FAMILY_RULES",
    "default_rule",
    "FORMAT",
    "FORMAT_VERSION",
]

#: the rule used when none is given: the Grubbs test on log A'. Over the full evaluation's
#: attribution cells (results/eval/full) it kept the paper's TPR (99.2% vs 99.0%) at a third
#: of its FPR (12.5% vs 38.7%): the model's own losses are log-normal-like, not normal.
DEFAULT_RULE = "grubbs-log"
#: families whose default rule is another. One-step ("consistency") models: their latent is as
#: wide as the image, so the inversion solves many of their own images to float32's floor
#: (1e-15) and leaves others near 1e-8: on the log scale that spread is ten decades, sigma
#: admits every real image (full-default evaluation, one-step cells: 50% with grubbs-log,
#: 88-95% with grubbs).
FAMILY_RULES = {"consistency": "grubbs"}


def default_rule(generator: object) -> str:
    """The rule used when none is given: ``FAMILY_RULES`` for the generator's family, else ``DEFAULT_RULE``."""
    return FAMILY_RULES.get(getattr(generator, "family", "gan"), DEFAULT_RULE)


class ProfileMismatchError(ValueError):
    """A profile does not belong to the given model / reference model / metric / settings.

    ``differences`` lists one line per thing that differs.
    """

    def __init__(self, differences: Sequence[str]):
        self.differences = list(differences)
        super().__init__("the belonging profile does not match: " + "; ".join(self.differences) + ". "
                         + " ".join(dict.fromkeys(_remedy(d) for d in self.differences)))


def _remedy(difference: str) -> str:
    """What fixes one difference between a profile and what it is used with."""
    if difference.startswith("model fingerprint"):
        return ("Use the model (and weights: --weights) the profile was fitted for, or fit a profile for this "
                "one.")
    if "reference model" in difference or difference.startswith("the profile is uncalibrated"):
        return ("Give the reference model the profile was fitted with (reference=..., or on the command line "
                "leave --reference out to rebuild it from the profile, or --reference SPEC --reference-weights "
                "FILE), or fit a profile with this one.")
    return ("The metric and inversion settings come from the profile: drop the options that change them "
            "(--metric, --steps, --set, ...), or fit a profile with these.")


def _version() -> str:
    from ronan_fast import __version__

    return __version__


def _settings_dict(settings) -> dict:
    if settings is None:
        return {}
    if isinstance(settings, dict):
        return dict(settings)
    if hasattr(settings, "to_dict"):
        return settings.to_dict()
    raise TypeError(f"settings must be InversionSettings or a dict, got {type(settings).__name__}")


@dataclass
class BelongingProfile:
    """Statistics of a model's own calibrated reconstruction losses, and what made them.

    ``mu`` and ``sigma`` are on the rule's scale (``A'`` for "grubbs", ``log A'`` for
    "grubbs-log"); ``calibrated_losses`` and ``raw_losses`` are the ``n`` profile images'
    ``A'`` and ``A`` (they are equal for an uncalibrated profile, whose reference fields are None).
    """

    mu: float
    sigma: float
    n: int
    alpha: float
    rule: str
    metric: str
    settings: dict
    generator_fingerprint: str
    generator_config: dict
    reference_fingerprint: str | None
    reference_config: dict | None
    calibrated_losses: list[float]
    raw_losses: list[float]
    reference_losses: list[float] | None = None
    seed: int = 0
    inversion_seed: int = 0
    generator_name: str = ""
    reference_name: str | None = None
    #: bits per channel the profile's generated images were rounded to (None: unrounded floats)
    image_bits: int | None = None
    #: the edit (:mod:`ronan_fast.edits`) applied to the profile's generated images before
    #: inversion, for images known to reach the inspector so edited (None: unedited)
    edit: str | None = None
    #: rounds of re-inverting profile images that fail the belonging test against the rest of the
    #: profile (:func:`profile_outliers`; None: not done), and the images re-inverted, in order
    #: (an image re-inverted in two rounds appears twice). Every profile image is the model's
    #: own, so such a loss is an inversion that missed, not evidence; ``raw_losses`` holds each
    #: image's lowest loss over its inversions
    retries: int | None = None
    retried: list[int] | None = None
    #: how to build the reference model again (None: not known, or uncalibrated): ``{"spec":
    #: "default" | a zoo name | "package.module:factory" | "diffusers:FOLDER"}``, with, for a
    #: factory, ``"weights"`` (a path) and ``"weights_sha256"``, ``"latent_shape"`` and
    #: ``"output_range"``: ``inspect`` rebuilds it from here, so only the model need be given
    reference_source: dict | None = None
    #: the learned warm start the model's inversions began at (None: random starts only):
    #: ``{"sha256": the encoder's digest, "recipe": ..., "cost": ...}``
    #: (:meth:`ronan_fast.warmstart.WarmStartEncoder.describe`); the encoder file sits beside
    #: the profile (``PROFILE.encoder.safetensors``) and images are judged with the same one
    warm_start: dict | None = None
    version: str = field(default_factory=_version)
    created: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        _validate(self)

    # ------------------------------------------------------------------ building

    @classmethod
    def from_losses(
        cls,
        raw_losses,
        reference_losses=None,
        *,
        alpha: float = 0.05,
        rule: str = DEFAULT_RULE,
        metric: str = "mse",
        settings=None,
        generator=None,
        reference=None,
        seed: int = 0,
        inversion_seed: int = 0,
        image_bits: int | None = None,
        edit: str | None = None,
        retries: int | None = None,
        retried: Sequence[int] | None = None,
        generator_name: str | None = None,
        warm_start: dict | None = None,
    ) -> "BelongingProfile":
        """A profile from the ``n`` profile images' losses under the model (and the reference model).

        ``generator`` / ``reference`` are adapters (their fingerprint, config and name are
        recorded); ``reference_losses=None`` makes an uncalibrated profile (``A' = A``).
        """
        from ronan_fast.calibration import calibrate

        raw = np.asarray(_as_list(raw_losses), dtype=np.float64)
        if reference_losses is None:
            if reference is not None:
                raise ValueError("a reference model was given but no reference_losses")
            ref = None
            cal = raw
        else:
            if reference is None:
                raise ValueError("reference_losses were given but no reference model")
            ref = np.asarray(_as_list(reference_losses), dtype=np.float64)
            if ref.shape != raw.shape:
                raise ValueError(f"raw_losses ({raw.shape[0]}) and reference_losses ({ref.shape[0]}) differ in length")
            cal = calibrate(raw, ref)
        if rule not in RULES:
            raise ValueError(f"rule must be one of {RULES}, got {rule!r}")
        mu, sigma = _moments(cal, rule)
        return cls(
            mu=mu,
            sigma=sigma,
            n=int(raw.shape[0]),
            alpha=float(alpha),
            rule=rule,
            metric=str(metric),
            settings=_settings_dict(settings),
            generator_fingerprint=generator.fingerprint() if generator is not None else "",
            generator_config=generator.config() if generator is not None else {},
            reference_fingerprint=None if reference is None else reference.fingerprint(),
            reference_config=None if reference is None else reference.config(),
            calibrated_losses=cal.tolist(),
            raw_losses=raw.tolist(),
            reference_losses=None if ref is None else ref.tolist(),
            seed=int(seed),
            inversion_seed=int(inversion_seed),
            generator_name=(generator_name if generator_name is not None
                            else getattr(generator, "name", "") if generator is not None else ""),
            reference_name=None if reference is None else getattr(reference, "name", None),
            reference_source=None if reference is None else _source(reference),
            image_bits=image_bits,
            edit=edit,
            retries=retries,
            retried=None if retried is None else [int(i) for i in retried],
            warm_start=warm_start,
        )

    # ------------------------------------------------------------------ the test

    @property
    def calibrated(self) -> bool:
        """Whether losses are divided by a reference model's (False: the uncalibrated ablation)."""
        return self.reference_fingerprint is not None

    @property
    def critical_value(self) -> float:
        """G_crit for this profile's ``n`` and ``alpha``."""
        return grubbs_critical_value(self.n, self.alpha)

    @property
    def threshold(self) -> float:
        """The calibrated loss A' at the edge of belonging: images below it belong.

        ``mu + G_crit * sigma`` for "grubbs", ``exp(mu + G_crit * sigma)`` for "grubbs-log".
        """
        edge = self.mu + self.critical_value * self.sigma
        return math.exp(edge) if self.rule == "grubbs-log" else edge

    @property
    def weakness(self) -> str | None:
        """Why this profile's verdicts can hardly tell the model's images from others (its
        calibrated threshold is at least :data:`~ronan_fast.profile_checks.WEAK_THRESHOLD`), or None."""
        return weak_threshold_text(self.calibrated, self.threshold, self.rule, self.sigma)

    def to_scale(self, calibrated_loss) -> np.ndarray:
        """Calibrated losses on the rule's scale (``log`` for "grubbs-log"; a loss of 0 gives -inf)."""
        a = np.asarray(calibrated_loss, dtype=np.float64)
        if self.rule == "grubbs-log":
            with np.errstate(divide="ignore"):
                return np.log(a)
        return a

    def statistic(self, calibrated_loss) -> np.ndarray:
        """The Grubbs statistic ``(scale(A') - mu) / sigma`` of each calibrated loss."""
        return (self.to_scale(calibrated_loss) - self.mu) / self.sigma

    def p_value(self, statistic) -> np.ndarray:
        """One-sided p-value(s) of Grubbs statistic(s) for this profile's ``n``."""
        return grubbs_p_value(np.asarray(statistic, dtype=np.float64), self.n)

    def belongs(self, calibrated_loss) -> np.ndarray:
        """True where the statistic is below the critical value (the image belongs to the model)."""
        return self.statistic(calibrated_loss) < self.critical_value

    # ------------------------------------------------------------------ compatibility

    def check_compatible(self, generator, reference, metric: str, settings, warm_start=None) -> None:
        """Raise :class:`ProfileMismatchError` unless this profile was made for exactly these.

        ``generator`` and ``reference`` are adapters (``reference=None`` for uncalibrated use),
        ``settings`` an :class:`~ronan_fast.inversion.InversionSettings` or its dict. Every
        difference is named: the model fingerprint, the reference model, the metric, and each
        inversion setting that differs, except those that act only against a belonging threshold
        (:data:`~ronan_fast.inversion.THRESHOLD_FIELDS`: escalation, the settle rule), which
        cannot change a profile's losses, and the learned warm start (``warm_start``: a
        :class:`~ronan_fast.warmstart.WarmStartEncoder` or None).
        """
        diffs: list[str] = []
        mine = None if self.warm_start is None else self.warm_start.get("sha256")
        given_ws = None if warm_start is None else warm_start.digest()
        if mine != given_ws:
            if given_ws is None:
                diffs.append(f"the profile's inversions start at a learned encoder's guesses (sha256 {mine[:12]}) "
                             "but no encoder was given: keep PROFILE.encoder.safetensors beside the profile "
                             "(or pass warm_start=ronan_fast.warmstart.load_encoder(...))")
            elif mine is None:
                what = _START_NAMES.get((warm_start.describe().get("recipe") or {}).get("kind"), "a learned encoder")
                diffs.append(f"the inversions here would start at {what} but the profile was fitted with random "
                             "starts only: fit the profile with that start (profile --warm-start) or judge without it")
            else:
                diffs.append(f"the encoder differs (profile: sha256 {mine[:12]}, given: {given_ws[:12]}): "
                             "use the encoder file the profile was fitted with")
        fp = generator.fingerprint()
        if fp != self.generator_fingerprint:
            diffs.append(
                f"model fingerprint differs (profile: {self.generator_name or '?'} {self.generator_fingerprint[:12]}, "
                f"given: {getattr(generator, 'name', '?')} {fp[:12]}); other weights or configuration"
            )
        if reference is None and self.reference_fingerprint is not None:
            diffs.append(f"the profile is calibrated with reference model {self.reference_name or '?'} "
                         f"({self.reference_fingerprint[:12]}) but no reference model was given")
        elif reference is not None and self.reference_fingerprint is None:
            diffs.append(f"the profile is uncalibrated but reference model {getattr(reference, 'name', '?')} was given")
        elif reference is not None:
            rfp = reference.fingerprint()
            if rfp != self.reference_fingerprint:
                diffs.append(
                    f"reference model differs (profile: {self.reference_name or '?'} {self.reference_fingerprint[:12]}, "
                    f"given: {getattr(reference, 'name', '?')} {rfp[:12]})"
                )
        if metric != self.metric:
            diffs.append(f"metric differs (profile: {self.metric!r}, given: {metric!r})")
        given = _settings_dict(settings)
        defaults = _setting_defaults()
        from ronan_fast.inversion import THRESHOLD_FIELDS

        for key in sorted(set(given) | set(self.settings)):
            if key == "metric":
                continue  # reported above
            if key in THRESHOLD_FIELDS:
                # they act only when an image is inverted against a threshold; a profile's images
                # never are, so they cannot have changed its losses
                continue
            if key not in self.settings:
                # a setting added after the profile was made is harmless at its default
                if key in defaults and given[key] == defaults[key]:
                    continue
                diffs.append(f"setting {key!r} is not in the profile (given: {given[key]!r})")
            elif key not in given:
                diffs.append(f"setting {key!r} is missing (profile: {self.settings[key]!r})")
            elif given[key] != self.settings[key]:
                diffs.append(f"setting {key!r} differs (profile: {self.settings[key]!r}, given: {given[key]!r})")
        if diffs:
            raise ProfileMismatchError(diffs)

    # ------------------------------------------------------------------ files

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        for k in ("edit", "retries", "retried", "reference_source", "warm_start"):
            if d[k] is None:
                del d[k]  # added later: profiles without them keep their earlier identity
        return {"format": FORMAT, **d}

    @classmethod
    def from_dict(cls, data: dict, source: str = "profile") -> "BelongingProfile":
        """A profile from :meth:`to_dict`'s output, with clear errors naming ``source``."""
        if not isinstance(data, dict):
            raise ProfileError(f"{source}: expected a JSON object, got {type(data).__name__}")
        if not (isinstance(data.get("format"), str) and data.get("format") == FORMAT):
            raise ProfileError(f"{source}: not a belonging profile (format is {_brief(data.get('format'))}, "
                               f"expected {FORMAT!r})")
        version = data.get("format_version")
        if not (_is_int(version) and version == FORMAT_VERSION):
            raise ProfileError(f"{source}: profile format version {_brief(version)} is not supported "
                               f"(this is ronan_fast {_version()}, reading version {FORMAT_VERSION}); "
                               "fit the profile again")
        names = {f.name: f for f in dataclasses.fields(cls)}
        required = [n for n, f in names.items()
                    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
        missing = [n for n in required if n not in data]
        if missing:
            raise ProfileError(f"{source}: missing field(s) {missing}")
        unknown = sorted(set(data) - set(names) - {"format"})
        if unknown:
            raise ProfileError(f"{source}: unknown field(s) {_brief(unknown)}")
        kwargs = {k: v for k, v in data.items() if k in names}
        try:
            return cls(**kwargs)
        except ProfileError as e:
            raise ProfileError(f"{source}: {e}") from None
        except (TypeError, ValueError, ArithmeticError, RecursionError) as e:  # a check that met a value it did not expect
            raise ProfileError(f"{source}: invalid field values ({type(e).__name__}: {_brief(str(e))})") from None

    def save(self, path: str | os.PathLike) -> Path:
        """Write the profile as JSON to ``path`` atomically (a temporary file, then a rename)."""
        path = Path(path)
        if path.is_dir():
            raise ProfileError(f"cannot write the profile to {path}: it is a directory")
        text = json.dumps(self.to_dict(), indent=2, allow_nan=False) + "\n"
        return write_text(path, text)

    @classmethod
    def load(cls, path: str | bytes | os.PathLike) -> "BelongingProfile":
        """Read a profile written by :meth:`save`.

        Whatever the file holds, the outcome is a valid profile or a :class:`ProfileError`
        with a one-line message naming the file and what is wrong: a missing file, one that is
        not a regular file (a FIFO or a device is never opened), one over
        :data:`MAX_PROFILE_BYTES` (64 MB; nothing past that is read), bytes that are not UTF-8,
        text that is not JSON or is nested too deeply, and any field of the wrong type or value.
        """
        path = Path(os.fsdecode(path)) if isinstance(path, bytes) else Path(path)
        where = f"profile {_shown(path)}"
        text = _read_capped(path, where)
        if not text.strip():
            raise ProfileError(f"{where} is empty")
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ProfileError(f"{where} is not valid JSON ({e.msg} at line {e.lineno}, column {e.colno}); "
                               "the file is truncated or corrupt") from None
        except RecursionError:
            raise ProfileError(f"{where} is not a profile: its JSON is nested too deeply to read") from None
        except ValueError as e:  # e.g. an integer with more digits than Python converts
            raise ProfileError(f"{where} is not a profile: its JSON cannot be read ({_brief(str(e))})") from None
        return cls.from_dict(data, source=where)

    def identity(self) -> str:
        """A short hash of the profile's content (reports record it to refuse mixing profiles)."""
        blob = json.dumps(self.to_dict(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def describe(self) -> str:
        """A few lines for people: model, calibration, rule, n, alpha, mu, sigma, threshold."""
        ref = f"calibrated by {self.reference_name or self.reference_fingerprint[:12]}" if self.calibrated \
            else "uncalibrated (A' = A)"
        scale = "log A'" if self.rule == "grubbs-log" else "A'"
        return (
            f"belonging profile of {self.generator_name or self.generator_fingerprint[:12]}, {ref}"
            f"{'' if self.edit is None else f', of its images edited by {self.edit}'}"
            f"{'' if not self.retried else f', {len(set(self.retried))} image(s) inverted again'}\n"
            f"  rule {self.rule} on {scale}, n={self.n}, alpha={self.alpha}, metric={self.metric}\n"
            f"  mu={self.mu:.6g}  sigma={self.sigma:.6g}  G_crit={self.critical_value:.4f}  "
            f"threshold A' < {self.threshold:.6g}" + ("" if self.weakness is None else f"\n  warning: {self.weakness}")
        )


def profile_outliers(calibrated_losses, rule: str, alpha: float = 0.05) -> list[int]:
    """Profile images whose calibrated loss fails the belonging test against the others.

    Image ``i`` is an outlier when the rule's Grubbs statistic of its ``A'`` against the mean and
    standard deviation of the other ``n - 1`` (on the rule's scale) is at or above the critical
    value for ``n - 1`` images at ``alpha``: the test an image under inspection gets, with the
    image left out so that it cannot mask itself. Every profile image is the model's own, so an
    outlier is an inversion that missed (a basin its starts did not leave), and inverting it
    again from other starts can only lower its loss.
    """
    if rule not in RULES:
        raise ValueError(f"rule must be one of {RULES}, got {rule!r}")
    cal = np.asarray(calibrated_losses, dtype=np.float64).reshape(-1)
    n = cal.shape[0]
    if n < 4:
        return []  # n - 1 >= 3 images are needed for a test
    if rule == "grubbs-log":
        with np.errstate(divide="ignore"):
            values = np.log(cal)
    else:
        values = cal
    if not np.isfinite(values).all():
        return []
    g = grubbs_critical_value(n - 1, alpha)
    out = []
    for i in range(n):
        others = np.delete(values, i)
        sigma = others.std(ddof=1)
        if sigma > 0 and (values[i] - others.mean()) / sigma >= g:
            out.append(i)
    return out


# ---------------------------------------------------------------------- helpers


def _source(adapter) -> dict | None:
    source = getattr(adapter, "source", None)
    return dict(source) if isinstance(source, dict) else None


def _setting_defaults() -> dict:
    """The values a setting added after a profile was made had before it existed (a profile that
    lacks it was made with that value)."""
    from ronan_fast.inversion.settings import LATER_FIELDS

    return dict(LATER_FIELDS)


def _as_list(values) -> list[float]:
    if hasattr(values, "detach"):
        values = values.detach().cpu().double().numpy()
    return np.asarray(values, dtype=np.float64).reshape(-1).tolist()


