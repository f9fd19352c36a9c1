"""What fitting a belonging profile needs besides the inversions.

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
import json
import math
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

from ronan_fast.adapters import GeneratorAdapter
from ronan_fast.distributed import PART_GLOB
from ronan_fast.profile import profile_outliers

__all__ = ["CheckpointError", "profile_job", "read_checkpoint", "read_part_files", "retry_profile_outliers",
           "check_output_range", "CLIPPED_SHARE"]


class CheckpointError(ValueError):
    """A profile checkpoint file that cannot be resumed: unreadable, or written for another job."""


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
