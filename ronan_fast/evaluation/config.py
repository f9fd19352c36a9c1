"""What an evaluation runs: its configuration (``quick`` / ``full``) and its cells.

A *cell* is one row of one of the paper's tables: a model under test, a reference model (or
none), a reconstruction metric, a set of belonging images (the model's own, fresh seed,
possibly edited) and a set of other images (real images or another model's). Both sets are
judged against the model's belonging profile, fitted from ``n_profile`` further images the
model generated.
"""

from __future__ import annotations

import fnmatch
from dataclasses import asdict, dataclass, field
from typing import Any

from ronan_fast.evaluation.images import EDITS, PROFILE_EDITS
from ronan_fast.evaluation.models import ModelSource

__all__ = ["EvalConfig", "ImageSpec", "Cell", "CONFIGS", "TABLES", "build_cells", "select_cells",
           "choose_reference"]

#: the paper's tables this harness reproduces, with what each varies
TABLES = {
    "2": "belonging vs real images (the model's training images, and unseen images)",
    "3": "belonging vs images of another architecture trained on the same data",
    "4": "belonging vs images of the same architecture trained on other data",
    "5": "reconstruction metric ablation (MSE, MAE, 1-SSIM)",
    "6": "calibration on / off",
    "7": "training-data overlap: the other model's data overlaps the tested model's by 50-90%",
    "8": "edited belonging images (pilgram 1977 filter, JPEG quality 75) vs real images; '-aware' cells fit the "
         "profile on the model's images edited the same way and edit the real images too; '-tone' cells score "
         "with mse-tone (the MSE left after each image's best affine tone map), '-anytone' cells too, with the "
         "profile fitted on random tone edits instead of the cell's edit; '-anyedit' cells too, with the profile "
         "fitted on random tone edits of which half are then saved as JPEG at a random quality (50 to 95)",
    "S": "inversion settings: the config's preset vs the package's default (multi-start); not a table of the paper",
}

_FMNIST_ARCHS = ("dcgan-fmnist", "vae-fmnist", "condgan-fmnist", "ddim-fmnist")
_OVERLAPS = (50, 60, 70, 80, 90)


@dataclass(frozen=True)
class EvalConfig:
    """Sizes, seeds and inversion settings of an evaluation, and which models some tables cover.

    ``settings`` names an inversion preset (``"authors"``: the paper's single-start Adam loop
    at lr 0.1) or ``"default"`` (the model family's default); ``overrides`` changes fields of it
    (e.g. fewer steps). Every number that changes a result is part of :meth:`identity`, which
    keys the caches.
    """

    name: str
    n_profile: int
    n_belonging: int
    n_other: int
    settings: str = "authors"
    overrides: tuple[tuple[str, Any], ...] = ()
    alpha: float = 0.05
    profile_seed: int = 0
    test_seed: int = 1
    inversion_seed: int = 0
    #: images per set whose reconstructions are kept for the figure grids
    preview: int = 6
    metric_models: tuple[str, ...] = ("dcgan-fmnist",)
    settings_models: tuple[str, ...] = ("dcgan-fmnist",)
    calibration_models: tuple[str, ...] = _FMNIST_ARCHS
    edit_models: tuple[str, ...] = ("dcgan-fmnist",)
    #: beyond the paper: Table 8's edit cells again, and a Table 5 cell where the model is also in
    #: ``metric_models``, with the tone-fitted metric "mse-tone"
    tone_models: tuple[str, ...] = ()
    #: rounds of inverting the profile's outliers again (``Attributor(profile_retries=...)``); 0: none
    profile_retries: int = 0

    def __post_init__(self) -> None:
        for k in ("n_profile", "n_belonging", "n_other"):
            v = getattr(self, k)
            if isinstance(v, bool) or not isinstance(v, int) or v < (3 if k == "n_profile" else 1):
                raise ValueError(f"{k} must be an integer >= {3 if k == 'n_profile' else 1}, got {v!r}")
        if not 0 < self.alpha < 1:
            raise ValueError(f"alpha must lie in (0, 1), got {self.alpha!r}")
        if isinstance(self.profile_retries, bool) or not isinstance(self.profile_retries, int) \
                or self.profile_retries < 0:
            raise ValueError(f"profile_retries must be an integer >= 0, got {self.profile_retries!r}")

    def identity(self) -> dict:
        """The fields that change numbers (not ``name``, nor which models a table covers)."""
        d = asdict(self)
        for k in ("name", "metric_models", "settings_models", "calibration_models", "edit_models", "tone_models"):
            d.pop(k)
        d["overrides"] = dict(self.overrides)
        if not d["profile_retries"]:
            del d["profile_retries"]  # added later: configurations without retries keep their keys
        return d


CONFIGS: dict[str, EvalConfig] = {
    # minutes on two CPU cores: every table, few images, short inversions
    "quick": EvalConfig("quick", n_profile=20, n_belonging=10, n_other=10, settings="authors",
                        overrides=(("steps", 300),), preview=6, tone_models=("dcgan-fmnist",)),
    # the paper's counts: 100 profile images, 100 belonging + 100 other per cell, 1500 Adam steps
    "full": EvalConfig("full", n_profile=100, n_belonging=100, n_other=100, settings="authors", preview=8,
                       edit_models=_FMNIST_ARCHS),
    # the same counts with the package's inversion defaults (the model family's multi-start
    # settings) in place of the paper's single start: the paper's rule on converged inversions;
    # Tables 6 and 8 also cover the one-step model, the diffusion family that inverts (the DDIM
    # sampler's range is nearly all of image space)
    "full-default": EvalConfig("full-default", n_profile=100, n_belonging=100, n_other=100, settings="default",
                               preview=8, calibration_models=_FMNIST_ARCHS + ("onestep-fmnist",),
                               edit_models=_FMNIST_ARCHS + ("onestep-fmnist",),
                               tone_models=("dcgan-fmnist", "vae-fmnist", "condgan-fmnist")),
}


@dataclass(frozen=True)
class ImageSpec:
    """A reproducible set of images.

    ``kind``: ``"generated"`` (by model ``source``; ``purpose`` names the seed stream, so the
    profile's images differ from the test images), ``"train"`` or ``"unseen"`` (real images of
    model ``source``'s data, see :class:`~ronan_fast.evaluation.models.ModelSource`). ``edit``
    is applied after 8-bit quantisation (Table 8).
    """

    kind: str
    source: str
    n: int
    seed: int
    purpose: str = "test"
    edit: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in ("generated", "train", "unseen"):
            raise ValueError(f"ImageSpec.kind must be 'generated', 'train' or 'unseen', got {self.kind!r}")
        if self.edit is not None and self.edit not in PROFILE_EDITS:
            raise ValueError(f"ImageSpec.edit must be one of {PROFILE_EDITS} or None, got {self.edit!r}")

    def key(self) -> str:
        k = f"{self.kind}-{self.source}-{self.purpose}-n{self.n}-s{self.seed}" if self.kind == "generated" \
            else f"{self.kind}-{self.source}-n{self.n}-s{self.seed}"
        return k + (f"-{self.edit}" if self.edit else "")

    def describe(self, models: ModelSource | None = None) -> str:
        if self.kind == "generated":
            text = f"generated by {self.source}"
        elif models is not None:
            text = models.describe_real(self.source, self.kind)
        else:
            text = f"real {self.kind} images of {self.source}'s data"
        return text + (f", edited ({self.edit})" if self.edit else "")


@dataclass(frozen=True)
class Cell:
    """One evaluated setting: model, reference, metric, belonging images, other images.

    ``settings`` names an inversion preset for this cell in place of the config's (the config's
    overrides still apply); None: the config's. ``profile_edit`` (one of :data:`PROFILE_EDITS`): the
    belonging profile is fitted on the model's images edited so (an edit-aware profile); None:
    on its unedited images.
    """

    id: str
    table: str
    model: str
    reference: str | None
    metric: str
    belonging: ImageSpec
    other: ImageSpec
    note: str = ""
    settings: str | None = None
    profile_edit: str | None = None

    def __post_init__(self) -> None:
        if self.profile_edit is not None and self.profile_edit not in PROFILE_EDITS:
            raise ValueError(f"Cell.profile_edit must be one of {PROFILE_EDITS} or None, got {self.profile_edit!r}")

    def profile_spec(self, config: "EvalConfig") -> ImageSpec:
        """The images the cell's belonging profile is fitted on."""
        return ImageSpec("generated", self.model, config.n_profile, config.profile_seed, purpose="profile",
                         edit=self.profile_edit)

    def to_dict(self) -> dict:
        d = asdict(self)
        if d["profile_edit"] is None:
            del d["profile_edit"]  # added later: earlier cells keep their keys
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Cell":
        d = dict(d)
        d["belonging"] = ImageSpec(**d["belonging"])
        d["other"] = ImageSpec(**d["other"])
        return cls(**d)


def choose_reference(models: ModelSource, model: str, other_sources: tuple[str, ...] = ()) -> tuple[str | None, str]:
    """The reference model for ``model``: the first of ``models.reference_candidates`` trained on
    other data than the model and not a source of the other images.

    Returns ``(name, why)``: ``why`` explains a substitution ("" for the first candidate); the
    name is None (and ``why`` says so) when no candidate fits.
    """
    candidates = tuple(models.reference_candidates)
    if not candidates:
        return None, "the model source names no reference models"
    data = models.training_data(model)
    for c in candidates:
        if c == model or c not in models.names():
            continue
        if models.training_data(c) == data:
            continue
        if c in other_sources:
            continue
        if c == candidates[0]:
            return c, ""
        first = candidates[0]
        if first == model:
            why = f"{first} is the model under test"
        elif first in models.names() and models.training_data(first) == data:
            why = f"{first} is trained on the same data as {model}"
        elif first in other_sources:
            why = f"{first} made the other images"
        else:
            why = f"{first} is not available"
        return c, f"reference {c} instead of {first}: {why}"
    return None, f"no reference model among {candidates} is trained on other data than {model}"


@dataclass
class CellPlan:
    """The cells of a configuration and the ones left out, with why."""

    cells: list[Cell] = field(default_factory=list)
    omitted: list[tuple[str, str]] = field(default_factory=list)


def build_cells(config: EvalConfig, models: ModelSource) -> CellPlan:
    """Every cell of Tables 2-8 for ``config`` over ``models`` (a zoo with the names used here)."""
    plan = CellPlan()
    names = models.names()
    nb, no, seed = config.n_belonging, config.n_other, config.test_seed

    def gen(m: str, n: int, edit: str | None = None) -> ImageSpec:
        return ImageSpec("generated", m, n, seed, edit=edit)

    def add(cid: str, table: str, model: str, other: ImageSpec, metric: str = "mse", calibrated: bool = True,
            belonging: ImageSpec | None = None, settings: str | None = None, profile_edit: str | None = None,
            note: str = "") -> None:
        if model not in names:
            plan.omitted.append((cid, f"model {model} is not in the zoo"))
            return
        ref = None
        if calibrated:
            sources = (other.source,) if other.kind == "generated" else ()
            ref, why = choose_reference(models, model, sources)
            if ref is None:
                plan.omitted.append((cid, why))
                return
            note = "; ".join(t for t in (why, note) if t)
        plan.cells.append(Cell(cid, table, model, ref, metric, belonging or gen(model, nb), other, note, settings,
                               profile_edit))

    # Table 2: every zoo model against its own training images and unseen real images
    for m in names:
        for split in ("train", "unseen"):
            cid = f"t2-{m}-{split}"
            why = models.real_unavailable(m, split)
            if why:
                plan.omitted.append((cid, why))
            else:
                add(cid, "2", m, ImageSpec(split, m, no, seed))
    # Table 3: another architecture on the same data, both directions
    for a, b in (("dcgan-fmnist", "vae-fmnist"), ("dcgan-fmnist", "condgan-fmnist"), ("dcgan-fmnist", "ddim-fmnist"),
                 ("dcgan-fmnist", "onestep-fmnist")):
        add(f"t3-{a}-vs-{b}", "3", a, gen(b, no))
        add(f"t3-{b}-vs-{a}", "3", b, gen(a, no))
    # Table 4: the same architecture on other data
    for b in ("dcgan-digits", "dcgan-photos"):
        add(f"t4-dcgan-fmnist-vs-{b}", "4", "dcgan-fmnist", gen(b, no))
    # Table 5: metric ablation, belonging vs unseen real images
    for m in config.metric_models:
        for metric in ("mse", "mae", "ssim") + (("mse-tone",) if m in config.tone_models else ()):
            add(f"t5-{m}-{metric}", "5", m, ImageSpec("unseen", m, no, seed), metric=metric)
    # Table 6: calibration on / off, belonging vs unseen real images
    for m in config.calibration_models:
        add(f"t6-{m}-calibrated", "6", m, ImageSpec("unseen", m, no, seed))
        add(f"t6-{m}-uncalibrated", "6", m, ImageSpec("unseen", m, no, seed), calibrated=False)
    # Table 7: the other images come from a model whose training data overlaps the tested model's
    for pct in _OVERLAPS:
        add(f"t7-dcgan-fmnist-vs-overlap{pct}", "7", "dcgan-fmnist", gen(f"dcgan-fmnist-overlap{pct}", no))
    # Table 8: edited belonging images still count as belonging; the others are unseen real images.
    # Beyond the paper, "-aware": the profile is fitted on the model's images edited the same way,
    # and the other images (unseen real ones) are edited too, so the edit itself tells nothing.
    def aware_note(edit: str) -> str:
        return (f"edit-aware profile: fitted on the model's images edited by {edit}; the other images are edited "
                f"by {edit} too")

    for m in config.edit_models:
        for edit in EDITS:
            add(f"t8-{m}-{edit}", "8", m, ImageSpec("unseen", m, no, seed), belonging=gen(m, nb, edit))
        for edit in EDITS:
            add(f"t8-{m}-{edit}-aware", "8", m, ImageSpec("unseen", m, no, seed, edit=edit),
                belonging=gen(m, nb, edit), profile_edit=edit, note=aware_note(edit))
    # Beyond the paper, "-tone": the same edit cells scored with "mse-tone", the MSE left after each
    # image's best affine tone map (an edit the generator cannot make but such a map can undo)
    for m in config.tone_models:
        for edit in EDITS:
            add(f"t8-{m}-{edit}-tone", "8", m, ImageSpec("unseen", m, no, seed), metric="mse-tone",
                belonging=gen(m, nb, edit))
            add(f"t8-{m}-{edit}-aware-tone", "8", m, ImageSpec("unseen", m, no, seed, edit=edit), metric="mse-tone",
                belonging=gen(m, nb, edit), profile_edit=edit, note=aware_note(edit))
            # the edit unknown to the profile: fitted on random tone edits of the model's images
            add(f"t8-{m}-{edit}-anytone", "8", m, ImageSpec("unseen", m, no, seed, edit=edit), metric="mse-tone",
                belonging=gen(m, nb, edit), profile_edit="tone",
                note=f"profile fitted on random tone edits of the model's images (edit 'tone'), not on {edit}; "
                     f"the other images are edited by {edit} too")
            # ... fitted on random tone edits, half of them then JPEG at a random quality (edit 'any')
            add(f"t8-{m}-{edit}-anyedit", "8", m, ImageSpec("unseen", m, no, seed, edit=edit), metric="mse-tone",
                belonging=gen(m, nb, edit), profile_edit="any",
                note=f"profile fitted on random edits of the model's images (edit 'any': tone edits, half of them "
                     f"then JPEG at a quality from 50 to 95), not on {edit}; the other images are edited by {edit} "
                     "too")
    # Beyond the paper: the package's default inversion settings instead of the config's preset
    for m in config.settings_models:
        if config.settings != "default":
            add(f"s-{m}-default", "S", m, ImageSpec("unseen", m, no, seed), settings="default")
    return plan


def select_cells(cells: list[Cell], patterns: str | None) -> list[Cell]:
    """The cells whose id matches any of the comma-separated glob ``patterns`` (all when None).

    Raises ``ValueError`` naming a pattern that matches no cell.
    """
    if not patterns:
        return list(cells)
    pats = [p.strip() for p in patterns.split(",") if p.strip()]
    if not pats:
        raise ValueError(f"--cells {patterns!r} holds no pattern")
    for p in pats:
        if not any(fnmatch.fnmatchcase(c.id, p) for c in cells):
            raise ValueError(f"--cells pattern {p!r} matches no cell; cells are e.g. "
                             f"{', '.join(c.id for c in cells[:6])} (use --list)")
    return [c for c in cells if any(fnmatch.fnmatchcase(c.id, p) for p in pats)]
