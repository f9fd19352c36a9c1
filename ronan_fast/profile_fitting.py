"""Fitting a belonging profile: :class:`ProfileFitting`, the part of
:class:`~ronan_fast.attributor.Attributor` that builds it (``Attributor.fit``), and what it needs
besides the inversions.

- The job's identity and its saved parts: a profile fitted with a checkpoint
  (``Attributor.fit(checkpoint=...)``, one file) or spread over workers
  (:func:`ronan_fast.distributed.fit`, a folder of part files) reuses a finished part only for
  the same job (:func:`profile_job`'s key: model, reference, settings, images, seeds, edit,
  part size); a file of another job or a damaged one raises :class:`CheckpointError`.
- :func:`retry_profile_outliers`: profile images that fail the belonging test against the
  rest of the profile, inverted again from other starts.
- The checks on what the model makes before it is profiled: its values inside its declared
  range (:func:`check_output_range`), and a warning for a profile of few images.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

from ronan_fast._atomic import write_text
from ronan_fast.adapters import GeneratorAdapter
from ronan_fast.attribution_inputs import fit_to_model
from ronan_fast.distributed import PART_GLOB
from ronan_fast.edits import apply_edit, check_edit, check_edit_metric
from ronan_fast.profile import BelongingProfile, profile_outliers
from ronan_fast.progress import ImageProgress, ProgressFn

__all__ = ["ProfileFitting", "CheckpointError", "profile_job", "read_checkpoint", "read_part_files",
           "retry_profile_outliers", "check_output_range", "CLIPPED_SHARE"]


class CheckpointError(ValueError):
    """A profile checkpoint file that cannot be resumed: unreadable, or written for another job."""


#: a profile of fewer images than this gets a warning: its threshold rests on too few losses
SMALL_PROFILE = 30
#: a reference loss of exactly 0 (the reference reconstructs the image perfectly) is raised to this
_REFERENCE_FLOOR = 1e-30


class ProfileFitting:
    """``Attributor.fit`` and its steps, which :func:`ronan_fast.distributed.fit` runs part by
    part on its workers. Uses the Attributor's models, settings, ``sample`` and ``_invert``."""

    def fit(self, n: int = 100, seed: int = 0, progress: ProgressFn | bool | None = None,
            edit: str | None = None, checkpoint: str | os.PathLike | None = None,
            checkpoint_every: int = 50) -> BelongingProfile:
        """Build the belonging profile from ``n`` images the model generates (seeded by ``seed``).

        The images are inverted with the model and, when calibrated, the reference model (the
        class of a class-conditional model is searched, as it is for images under test).
        ``edit`` (see :mod:`ronan_fast.edits`, e.g. ``"jpeg75"``) first applies that edit to the
        profile's images (as 8-bit images): the profile then tests "made by the model, then
        edited so", for images known to reach the inspector edited; it is recorded in the profile.
        ``edit="tone"`` (random tone edits, for a tone edit not known in advance) and ``edit="any"``
        (the same, half of them then saved as JPEG at a random quality, for an edit not known at
        all) need the metric ``"mse-tone"`` and work best with ``rule="grubbs"`` (README, Table 8).
        Returns the profile and keeps it as :attr:`profile`.

        ``checkpoint``: a JSON file (written atomically) that keeps the losses of every finished
        part of ``checkpoint_every`` images; called again with the same file and job (model,
        reference, settings, ``n``, seeds, edit, part size), the fit resumes after the last finished
        part, and an interrupted fit loses at most one part. Each image's inversion does not
        depend on the part it is in (starts drawn from its pixels, fixed-shape generator calls:
        see :func:`~ronan_fast.inversion.invert`), so the profile is the one a single batch gives,
        bit for bit on CPU; smaller parts cost some throughput. A file of another job, or an
        unreadable or damaged one, raises :class:`CheckpointError`. The file is left in
        place: delete it once the profile is saved. The retries run after the last part and are
        not kept in it.
        """
        self._check_fit(n, seed, edit, checkpoint_every, "checkpoint_every")
        bar = None
        if progress is True:  # a bar of our own on stderr
            bar = ImageProgress(n, "profile", enabled=True)
            progress = bar.part(0, self.stages())
        try:
            return self._fit(n, seed, progress or None, edit, checkpoint, checkpoint_every)
        finally:
            if bar is not None:
                bar.close()

    def _check_fit(self, n, seed, edit, every, every_name: str) -> None:
        """``ValueError`` for a fit's bad arguments; a warning for a small profile."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 3:
            raise ValueError(f"n (profile images) must be an integer >= 3, got {n!r}; the paper uses 100")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed must be an integer, got {seed!r}")
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"{every_name} must be an integer >= 1, got {every!r}")
        if edit is not None:
            check_edit(edit)
            check_edit_metric(edit, self.metric)
        if n < SMALL_PROFILE:
            warn_small_profile(n, self.alpha)

    def _fit(self, n, seed, progress, edit, checkpoint, checkpoint_every) -> BelongingProfile:
        images = self._profile_images(n, seed, edit, progress)
        path = None if checkpoint is None else Path(checkpoint)  # None: one part, nothing saved
        raw, ref_loss = self._fit_in_parts(images, seed, edit, path, n if path is None else checkpoint_every, progress)
        return self._profile_from_losses(images, raw, ref_loss, seed, edit, progress)

    def _profile_images(self, n: int, seed: int, edit: str | None, progress: ProgressFn | None) -> Tensor:
        """The ``n`` profile images (CPU), edited by ``edit``."""
        if progress:
            progress("generate", 0, n)
        images = self.sample(n, seed, purpose="profile")
        if edit is not None:
            images = apply_edit(images, edit)
        if progress:
            progress("generate", n, n)
        return images

    def _profile_from_losses(self, images: Tensor, raw: Tensor, ref_loss: Tensor | None, seed: int,
                             edit: str | None, progress: ProgressFn | None) -> BelongingProfile:
        """The profile from its images' losses (model, reference): the retries, then the statistics.
        Keeps it as :attr:`profile`."""
        ref = None if ref_loss is None else ref_loss.clamp_min(_REFERENCE_FLOOR)
        retried = None
        if self.profile_retries:
            rounds = itertools.count(1)  # a progress stage per round
            raw, retried = retry_profile_outliers(
                raw, ref, self.rule, self.alpha, self.profile_retries,
                lambda idx, seed: self._invert(self.generator, images[idx], None, progress,
                                               f"model, again ({next(rounds)})", seed=seed).loss,
                self.seed)
        self.profile = BelongingProfile.from_losses(
            raw, ref, alpha=self.alpha, rule=self.rule, metric=self.metric, settings=self.settings,
            generator=self.generator, reference=self.reference, seed=seed, inversion_seed=self.seed,
            image_bits=self.image_bits, edit=edit,
            retries=self.profile_retries or None, retried=retried, generator_name=self.name,
            warm_start=None if self.warm_start is None else self.warm_start.describe(),
        )
        warn_weak_profile(self.profile)
        return self.profile

    def _fit_in_parts(self, images: Tensor, seed: int, edit: str | None, path: Path | None, every: int,
                      progress: ProgressFn | None) -> tuple[Tensor, Tensor | None]:
        """The profile images' losses (model, reference; float64, CPU), ``every`` images at a
        time, each part saved to ``path`` as it finishes and skipped when ``path`` already holds
        it (``path`` None: nothing saved or read)."""
        n = images.shape[0]
        done: dict[str, dict] = {}  # finished parts: first image's index (a string) -> losses
        if path is not None:
            key, job = profile_job(self, images, seed, edit, every)
            done = read_checkpoint(path, key, n, every, self.reference is not None)
        raw = torch.empty(n, dtype=torch.float64)
        ref = None if self.reference is None else torch.empty(n, dtype=torch.float64)
        for a in range(0, n, every):
            b = min(n, a + every)
            part = done.get(str(a))
            if part is None:
                part = self._part_losses(images, a, b, progress)
                if path is not None:
                    done[str(a)] = part
                    write_text(path, json.dumps({"key": key, "job": job, "parts": done}))
            raw[a:b] = torch.tensor(part["model"], dtype=torch.float64)
            if ref is not None:
                ref[a:b] = torch.tensor(part["reference"], dtype=torch.float64)
        return raw, ref

    def _part_losses(self, images: Tensor, a: int, b: int, progress: ProgressFn | None) -> dict[str, list[float]]:
        """The losses of profile images ``a`` to ``b`` (of all ``images``): ``{"model": [...]}``,
        with ``"reference"`` when calibrated; progress counts them from ``a``."""
        n = images.shape[0]
        stage = lambda name: (lambda st, d, t: progress(name, a + d, n)) if progress else None  # noqa: E731
        part = {}
        if self.reference is not None:
            ref_images, _ = fit_to_model(images[a:b], self.reference)
            part["reference"] = self._invert(self.reference, ref_images, None, stage("reference"),
                                             "reference").loss.cpu().double().tolist()
        part["model"] = self._invert(self.generator, images[a:b], None, stage("model"),
                                     "model").loss.cpu().double().tolist()
        return part


def stream_seed(purpose: str, seed: int) -> int:
    """A 63-bit seed for generating images, unrelated to the seeds inversion draws its starts from.

    Generating the profile images from the inversion's own seed could hand inversion the true
    latents; a stream of its own per purpose keeps them apart.
    """
    digest = hashlib.sha256(f"ronan_fast/{purpose}/{int(seed)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


# ---------------------------------------------------------------------------- the job and its parts


def profile_job(attributor, images: Tensor, seed: int, edit: str | None, every: int) -> tuple[str, dict]:
    """A profile job's description (model, reference, settings, images, seeds, edit, part size)
    and its key, a hash of it: saved parts are reused only by a job of the same key."""
    n = images.shape[0]
    job = {
        "format": 1, "n": n, "seed": seed, "inversion_seed": attributor.seed, "edit": edit, "every": every,
        "settings": attributor.settings.to_dict(),
        "images": hashlib.sha256(images.detach().cpu().float().numpy().tobytes()).hexdigest(),
        "generator": attributor.generator.fingerprint(),
        "reference": None if attributor.reference is None else attributor.reference.fingerprint(),
    }
    if attributor.warm_start is not None:  # only then: earlier jobs keep their key
        job["warm_start"] = attributor.warm_start.digest()
    return hashlib.sha256(json.dumps(job, sort_keys=True).encode()).hexdigest(), job


def _losses_fit(part: object, size: int, calibrated: bool) -> bool:
    """Whether a saved part holds ``size`` numbers for the model (and the reference when calibrated)."""
    kinds = ("model", "reference") if calibrated else ("model",)
    return isinstance(part, dict) and all(
        isinstance(part.get(k), list) and len(part[k]) == size
        and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in part[k]) for k in kinds)


def read_checkpoint(path: Path, key: str, n: int, every: int, calibrated: bool) -> dict[str, dict]:
    """The finished parts a checkpoint file holds for the job ``key`` (first image's index, a
    string -> losses); none if the file does not exist. :class:`CheckpointError` when it is
    unreadable, holds another job or a damaged part."""
    if not path.exists():
        return {}
    try:
        saved = json.loads(path.read_text())
        ok = isinstance(saved, dict) and isinstance(saved.get("parts"), dict)
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        raise CheckpointError(f"checkpoint {path}: not a readable checkpoint ({type(e).__name__})") from None
    if not ok:
        raise CheckpointError(f"checkpoint {path}: not a profile checkpoint")
    if saved.get("key") != key:
        raise CheckpointError(
            f"checkpoint {path} holds another profile job (model, reference, settings, n, seeds, edit or "
            "part size differ); delete it or choose another file")
    for start, part in saved["parts"].items():
        ok = isinstance(start, str) and start.isdigit() and int(start) % every == 0 and int(start) < n
        if not (ok and _losses_fit(part, min(n, int(start) + every) - int(start), calibrated)):
            raise CheckpointError(f"checkpoint {path}: part {str(start)[:20]!r} is damaged; delete the file")
    return saved["parts"]


def read_part_files(folder: Path, key: str, n: int, part: int, calibrated: bool) -> dict[int, dict]:
    """The parts ``folder`` holds for the job ``key`` (one ``part-START.json`` each, written by
    the workers of :func:`ronan_fast.distributed.fit`): first image's index -> losses. A file
    of another job or a damaged one: :class:`CheckpointError`."""
    done: dict[int, dict] = {}
    if not folder.is_dir():
        return done
    for f in sorted(folder.glob(PART_GLOB)):
        try:
            data = json.loads(f.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as e:
            raise CheckpointError(f"profile part {f}: not readable ({type(e).__name__}: {e})") from None
        if not isinstance(data, dict) or "key" not in data:
            raise CheckpointError(f"profile part {f}: not a profile part")
        if data["key"] != key:
            raise CheckpointError(f"profile part {f} belongs to another profile job (model, reference, settings, n, "
                                  f"seeds, edit or part size differ); delete {folder} or choose another output")
        a, b = data.get("start"), data.get("stop")
        ok = (isinstance(a, int) and isinstance(b, int) and a % part == 0 and 0 <= a < n and b == min(n, a + part)
              and f.name == f"part-{a}.json")
        if not (ok and _losses_fit(data, b - a, calibrated)):
            raise CheckpointError(f"profile part {f}: damaged (its images or losses do not fit the job)")
        done[a] = {k: data[k] for k in ("model", "reference") if data.get(k) is not None}
    return done


# ---------------------------------------------------------------------------- retries


def retry_profile_outliers(
    raw: Tensor, reference: Tensor | None, rule: str, alpha: float, rounds: int,
    invert_again: Callable[[Tensor, int], Tensor], inversion_seed: int,
) -> tuple[Tensor, list[int]]:
    """Profile losses with their outliers inverted again, and the images that were.

    Each round finds the profile images whose calibrated loss (``raw / reference``, or ``raw``
    uncalibrated) fails the belonging test against the others
    (:func:`~ronan_fast.profile.profile_outliers`) and calls ``invert_again(indices, seed)`` for
    their new losses, inverted with that ``seed``: a seed of its own for each round, derived
    from ``inversion_seed`` (the profile's), so the starts differ from the first inversion's and
    from every other round's. Each image keeps its lower loss. Stops after ``rounds`` rounds or
    once no image is an outlier. Returns the losses (float64, CPU) and the indices inverted
    again, round after round.
    """
    raw = raw.detach().cpu().double().clone()
    retried: list[int] = []
    for r in range(1, rounds + 1):
        cal = raw if reference is None else raw / reference
        out = profile_outliers(cal.numpy(), rule, alpha)
        if not out:
            break
        idx = torch.tensor(out, dtype=torch.long)
        again = invert_again(idx, stream_seed(f"retry{r}", inversion_seed)).detach().cpu().double()
        raw[idx] = torch.minimum(raw[idx], torch.where(torch.isfinite(again), again, raw[idx]))
        retried.extend(out)
    return raw, retried


# ---------------------------------------------------------------------------- checks


#: a model's output may overshoot its declared range by this fraction of the range (rounding)
RANGE_SLACK = 1e-3
#: with ``clip_aware`` settings, the share of output values that may lie beyond the declared
#: range (further than the slack): a decoder's overshoot, clipped when its images are saved and
#: counted one-sided by the loss (the zoo's AutoencoderKL: 0.4% of 256 images' values, at most
#: 3.8% of one image's). A range declared wrong puts a quarter to all of them outside.
CLIPPED_SHARE = 0.05


def check_output_range(generator: GeneratorAdapter, batch, name: str, clip_aware: bool = False) -> None:
    """Refuse a generator whose images leave its declared ``output_range``: mapped to [0, 1] and
    clipped, they would profile a model that does not exist. With ``clip_aware`` settings a
    decoder's overshoot is the model's own (its saved images are clipped, and so is the loss's
    view of them): up to :data:`CLIPPED_SHARE` of the values may lie outside. ``batch``: the
    :class:`~ronan_fast.adapters.GeneratedBatch` the profile images came from."""
    lo, hi = generator.output_range
    slack = RANGE_SLACK * (hi - lo)
    seen, outside, total = (math.inf, -math.inf), 0, 0
    with torch.no_grad():
        for a in range(0, batch.latents.shape[0], 256):
            c = None if batch.conditions is None else batch.conditions[a:a + 256]
            raw = generator.decode_raw(batch.latents[a:a + 256], c)
            seen = (min(seen[0], float(raw.min())), max(seen[1], float(raw.max())))
            outside += int(((raw < lo - slack) | (raw > hi + slack)).sum())
            total += raw.numel()
    if not outside:
        return
    share = outside / max(total, 1)
    if clip_aware and share <= CLIPPED_SHARE:
        return
    why = (f"{share:.1%} of its values lie outside, more than a decoder's overshoot ({CLIPPED_SHARE:.0%})"
           if clip_aware else "and the settings have clip_aware=False")
    raise ValueError(f"{name} makes values in [{seen[0]:.4g}, {seen[1]:.4g}], outside its declared output range "
                     f"({lo:g}, {hi:g}); {why}: declare the range it makes (output_range= / --output-range LOW HIGH), "
                     "or end the model in tanh (-1, 1) or a sigmoid (0, 1)")


def warn_small_profile(n: int, alpha: float) -> None:
    """Say what a profile of few images does to the threshold."""
    from ronan_fast.grubbs import grubbs_critical_value

    text = (f"a belonging profile of {n} images: its standard deviation is known only to about "
            f"+-{100 / math.sqrt(2 * (n - 1)):.0f}% and the critical value "
            f"G_crit={grubbs_critical_value(n, alpha):.2f} "
            f"(n=100: {grubbs_critical_value(100, alpha):.2f}), so the threshold can sit far from where the model's "
            "images fall and reject some of them; fit it on at least 30 images (the paper uses 100)")
    warnings.warn(text, UserWarning, stacklevel=4)  # the caller of Attributor.fit


def warn_weak_profile(profile) -> None:
    """Warn where a profile's threshold tells the model's images poorly from others
    (:attr:`~ronan_fast.profile.BelongingProfile.weakness`)."""
    if profile.weakness is not None:
        warnings.warn(profile.weakness, UserWarning, stacklevel=3)
