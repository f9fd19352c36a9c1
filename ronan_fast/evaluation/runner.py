"""Running cells: images, cached inversions, cached belonging profiles, per-cell results.

Work is shared and cached at three levels, all JSON written atomically under the output folder:

* ``cache/losses/``: the reconstruction losses of one image set under one model with one set of
  inversion settings (plus a few reconstructions for the figures). The key is a hash of the
  model's fingerprint, the settings, the inversion seed and the images' 8-bit content, so the
  belonging images of a model are inverted once for all the cells that use them.
* ``profiles/``: belonging profiles (:meth:`BelongingProfile.save`), one per model, reference
  model, metric, settings and rule.
* ``cells/``: one file per finished cell, keyed by everything its numbers depend on. A rerun
  skips a cell whose file is valid and current; an unreadable, corrupt or stale file gives a
  :class:`~ronan_fast.evaluation.store.CacheWarning` and the cell is computed again.

Every image is quantised to 8 bits before it is inverted (``round(x * 255) / 255``, as if
saved to PNG) -- the profile's images too, as :meth:`Attributor.fit` does (``image_bits=8``).
The profile is built here with :meth:`BelongingProfile.from_losses` from cached losses, with
the same settings, seeds, reference model and loss floor as :meth:`Attributor.fit` (only the
seed stream of the generated images is the harness's own), and each image is judged exactly
as :meth:`Attributor.attribute` judges it without early stopping: inversion runs its full
length, so the losses also give a meaningful ROC AUC and serve both rules.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
import time
import traceback
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ronan_fast.profile_fitting import retry_profile_outliers
from ronan_fast.evaluation.config import Cell, EvalConfig, ImageSpec
from ronan_fast.evaluation.images import IMAGE_BITS, apply_edit, decode_uint8, encode_uint8, images_sha256, quantise
from ronan_fast.evaluation.models import ModelSource, derived_seed
from ronan_fast.evaluation.scoring import confusion, roc_auc
from ronan_fast.evaluation.store import CacheWarning, check, finite_list, read_cache, write_json
from ronan_fast.inversion import InversionSettings, invert, resolve_settings
from ronan_fast.profile import RULES, BelongingProfile, ProfileError

__all__ = ["Evaluation", "RunStats", "FORMAT_CELL", "FORMAT_LOSSES", "FORMAT_VERSION", "cell_path", "load_cell"]

FORMAT_LOSSES = "ronan-fast evaluation losses"
FORMAT_CELL = "ronan-fast evaluation cell"
FORMAT_VERSION = 1
#: a reference loss of exactly 0 is raised to this before dividing, as Attributor does
_REFERENCE_FLOOR = 1e-30


def _hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def cell_path(out_dir: str | Path, cell_id: str) -> Path:
    return Path(out_dir) / "cells" / f"{_safe(cell_id)}.json"


@dataclass
class RunStats:
    """What a run did: inversions run (calls and images), cells computed, reused, skipped, failed."""

    inversions: int = 0
    inverted_images: int = 0
    cells_computed: list[str] = field(default_factory=list)
    cells_reused: list[str] = field(default_factory=list)
    cells_skipped: list[tuple[str, str]] = field(default_factory=list)
    cells_failed: list[tuple[str, str]] = field(default_factory=list)


@dataclass
class _LossKey:
    model: str
    spec: ImageSpec
    key: str
    n: int


def _validate_cell_structure(d: dict) -> None:
    check(d.get("format") == FORMAT_CELL, f"format is {d.get('format')!r}, expected {FORMAT_CELL!r}")
    check(d.get("format_version") == FORMAT_VERSION, f"format_version is {d.get('format_version')!r}")
    Cell.from_dict(d["cell"])
    for side in ("belonging", "other"):
        s = d[side]
        n = s["n"]
        check(finite_list(s["loss"], n), f"{side}.loss is not a list of {n} finite losses >= 0")
        check(finite_list(s["calibrated_loss"], n), f"{side}.calibrated_loss is not {n} finite losses")
        if s["reference_loss"] is not None:
            check(finite_list(s["reference_loss"], n), f"{side}.reference_loss is not {n} finite losses")
    for rule in RULES:
        r = d["rules"][rule]
        for k in ("tp", "fp", "fn", "tn"):
            check(isinstance(r[k], int) and r[k] >= 0, f"rules.{rule}.{k} is not a count")
        check(r["tp"] + r["fn"] == d["belonging"]["n"] and r["fp"] + r["tn"] == d["other"]["n"],
              f"rules.{rule}: counts do not add up to the image counts")
        for k in ("belongs_belonging", "belongs_other"):
            check(isinstance(r[k], list) and all(isinstance(v, bool) for v in r[k]), f"rules.{rule}.{k} is not booleans")
        check(sum(r["belongs_belonging"]) == r["tp"] and sum(r["belongs_other"]) == r["fp"],
              f"rules.{rule}: verdicts disagree with the counts")
    check(isinstance(d["auc"], (int, float)), "auc is not a number")
    check(isinstance(d["seconds"], (int, float)), "seconds is not a number")


def load_cell(path: str | Path, expected_key: str | None = None) -> dict | None:
    """A finished cell's record, or None (with a :class:`CacheWarning` when the file is unusable
    or, given ``expected_key``, was made from other images, weights or settings)."""

    def validate(d: dict) -> None:
        _validate_cell_structure(d)
        if expected_key is not None:
            check(d.get("cell_key") == expected_key,
                  "stale: made from other images, model weights, settings or cell definition")

    return read_cache(path, "cell result", validate)


class Evaluation:
    """Runs cells of one configuration into ``out_dir``, reusing finished work.

    Args:
        config: sizes, seeds and inversion settings.
        out_dir: the configuration's output folder (``results/eval/quick`` ...).
        models: where models and real images come from (default: the trained zoo).
        reuse: reuse valid cache files (cells, profiles, losses); False recomputes everything
            and overwrites them.
        progress: a tqdm bar over cells on stderr.
        impl: kernel implementation for inversion (see :mod:`ronan_fast.ops`).
    """

    def __init__(self, config: EvalConfig, out_dir: str | Path, models: ModelSource | None = None,
                 reuse: bool = True, progress: bool = True, impl: str = "auto") -> None:
        if models is None:
            from ronan_fast.evaluation.models import ZooModels

            models = ZooModels()
        self.config = config
        self.dir = Path(out_dir)
        self.models = models
        self.reuse = reuse
        self.progress = progress
        self.impl = impl
        self.stats = RunStats()
        self._images: dict[str, Tensor] = {}
        self._fingerprints: dict[str, str] = {}
        self._losses: dict[str, dict] = {}
        self._bar = None

    # ------------------------------------------------------------------ images and keys

    def images(self, spec: ImageSpec) -> Tensor:
        """The image set ``spec`` as 8-bit-quantised float images (edited when the spec says so)."""
        k = spec.key()
        if k not in self._images:
            if spec.kind == "generated":
                adapter = self.models.adapter(spec.source)
                g = torch.Generator().manual_seed(derived_seed("generated", spec.purpose, spec.source, spec.seed))
                x = adapter.generate(spec.n, generator=g).images.detach().cpu()
            else:
                x = self.models.real_images(spec.source, spec.kind, spec.n, spec.seed)
            x = quantise(x)
            if spec.edit:
                x = apply_edit(x, spec.edit)
            if x.shape[0] != spec.n:
                raise RuntimeError(f"image set {k}: got {x.shape[0]} images, expected {spec.n}")
            self._images[k] = x
        return self._images[k]

    def fingerprint(self, model: str) -> str:
        if model not in self._fingerprints:
            self._fingerprints[model] = self.models.adapter(model).fingerprint()
        return self._fingerprints[model]

    def settings(self, model: str, metric: str, preset: str | None = None) -> InversionSettings:
        """Inversion settings of ``model`` for ``metric``: ``preset`` (default: the config's) with
        the config's overrides."""
        s = resolve_settings(self.models.adapter(model), preset or self.config.settings, metric=metric,
                             **dict(self.config.overrides))
        # The harness inverts every image in full, without a belonging threshold (as
        # Attributor.attribute(early_stop=False) does): escalation and the settle rule act only
        # with a threshold, so they cannot change a loss here, and are left out of the settings
        # and every key.
        return s.without_threshold_rules()

    def loss_key(self, model: str, spec: ImageSpec, settings: InversionSettings) -> _LossKey:
        key = _hash({
            "format_version": FORMAT_VERSION,
            "model": self.fingerprint(model),
            "settings": settings.to_dict(),
            "inversion_seed": self.config.inversion_seed,
            "images": images_sha256(self.images(spec)),
        })
        return _LossKey(model, spec, key, spec.n)

    def _loss_path(self, lk: _LossKey) -> Path:
        # named by content only: image sets with the same pixels (e.g. one model's unseen images and
        # another's) share one file, in this process and in later ones
        return self.dir / "cache" / "losses" / _safe(lk.model) / f"{lk.key[:24]}.json"

    # ------------------------------------------------------------------ inversions

    def _stage(self, text: str) -> None:
        if self._bar is not None:
            self._bar.set_postfix_str(text[:90], refresh=True)

    def losses(self, lk: _LossKey, settings: InversionSettings) -> dict:
        """The loss record of image set ``lk.spec`` under ``lk.model``: cached, else inverted now."""
        if lk.key in self._losses:
            return self._losses[lk.key]
        path = self._loss_path(lk)
        rec = None
        if self.reuse:
            def validate(d: dict) -> None:
                check(d.get("format") == FORMAT_LOSSES, f"format is {d.get('format')!r}")
                check(d.get("format_version") == FORMAT_VERSION, f"format_version is {d.get('format_version')!r}")
                check(d.get("key") == lk.key, "its key does not match the file it should be")
                check(finite_list(d["losses"], lk.n), f"losses is not a list of {lk.n} finite numbers >= 0")
                check(isinstance(d["seconds"], (int, float)) and d["seconds"] >= 0, "seconds is not a number")
                for k in ("images", "reconstructions"):
                    decode_uint8(d["preview"][k])

            rec = read_cache(path, "loss cache file", validate)
        if rec is None:
            images = self.images(lk.spec)
            self._stage(f"inverting {lk.n} images ({lk.spec.key()}) with {lk.model}")
            t0 = time.perf_counter()
            res = invert(self.models.adapter(lk.model), images, settings=settings, seed=self.config.inversion_seed,
                         impl=self.impl)
            seconds = time.perf_counter() - t0
            self.stats.inversions += 1
            self.stats.inverted_images += lk.n
            loss = res.loss.detach().cpu().double()
            if not bool(torch.isfinite(loss).all()):
                raise RuntimeError(f"inverting {lk.spec.key()} with {lk.model} gave non-finite losses")
            k = min(self.config.preview, lk.n)
            rec = {
                "format": FORMAT_LOSSES,
                "format_version": FORMAT_VERSION,
                "key": lk.key,
                "model": lk.model,
                "computed_for": lk.spec.key(),  # the first image set with these pixels
                "settings": settings.to_dict(),
                "inversion_seed": self.config.inversion_seed,
                "losses": loss.tolist(),
                "row_steps": res.row_steps.detach().cpu().tolist(),
                "seconds": seconds,
                "threads": torch.get_num_threads(),
                "created": _now(),
                "preview": {"images": encode_uint8(images[:k]),
                            "reconstructions": encode_uint8(res.reconstruction[:k].detach().cpu())},
            }
            write_json(path, rec)
        self._losses[lk.key] = rec
        return rec

    # ------------------------------------------------------------------ profiles

    def _profile_path(self, cell: Cell, pkey: str, rule: str) -> Path:
        ref = cell.reference or "uncalibrated"
        return self.dir / "profiles" / f"{_safe(cell.model)}__{_safe(ref)}__{cell.metric}__{pkey[:12]}.{rule}.json"

    def _load_profile(self, path: Path, cell: Cell, settings: InversionSettings, rule: str) -> BelongingProfile | None:
        if not (self.reuse and path.exists()):
            return None
        import warnings

        try:
            p = BelongingProfile.load(path)
            ref = None if cell.reference is None else self.models.adapter(cell.reference)
            p.check_compatible(self.models.adapter(cell.model), ref, cell.metric, settings)
            check(p.rule == rule, f"rule is {p.rule!r}, expected {rule!r}")
            check(p.n == self.config.n_profile, f"n is {p.n}, expected {self.config.n_profile}")
            check(p.alpha == self.config.alpha, f"alpha is {p.alpha}, expected {self.config.alpha}")
            check(getattr(p, "image_bits", None) == IMAGE_BITS,
                  f"image_bits is {getattr(p, 'image_bits', None)}, expected {IMAGE_BITS}")
            check(p.seed == self.config.profile_seed and p.inversion_seed == self.config.inversion_seed,
                  "made with other seeds")
            check(p.edit == cell.profile_edit, f"edit is {p.edit!r}, expected {cell.profile_edit!r}")
            check(p.retries == (self.config.profile_retries or None),
                  f"retries is {p.retries!r}, expected {self.config.profile_retries or None!r}")
        except (ProfileError, ValueError) as e:
            warnings.warn(f"{path}: unusable belonging profile ({type(e).__name__}: {e}); computing it again",
                          CacheWarning, stacklevel=2)
            return None
        return p

    def _profile_key(self, cell: Cell, keys: dict) -> str:
        d = {"raw": keys["profile"].key, "reference": keys["profile_ref"].key if cell.reference else None,
             "alpha": self.config.alpha}
        if self.config.profile_retries:  # added later: profiles without retries keep their keys
            d["retries"] = self.config.profile_retries
        return _hash(d)

    def profiles(self, cell: Cell, settings: InversionSettings, keys: dict) -> dict[str, BelongingProfile]:
        """The belonging profile of ``cell``'s model, one per rule, from cache or fitted now."""
        pkey = self._profile_key(cell, keys)
        out: dict[str, BelongingProfile] = {}
        for rule in RULES:
            p = self._load_profile(self._profile_path(cell, pkey, rule), cell, settings, rule)
            if p is not None:
                out[rule] = p
        if len(out) == len(RULES):
            return out
        raw = np.asarray(self.losses(keys["profile"], settings)["losses"])
        ref = None
        if cell.reference:
            ref = np.maximum(np.asarray(self.losses(keys["profile_ref"], settings)["losses"]), _REFERENCE_FLOOR)
        model = self.models.adapter(cell.model)
        ref_adapter = None if cell.reference is None else self.models.adapter(cell.reference)
        for rule in RULES:
            if rule in out:
                continue
            raw_r, retried = raw, None
            if self.config.profile_retries:  # as Attributor.fit does (its seeds too)
                images = self.images(cell.profile_spec(self.config))
                self._stage(f"inverting the outliers of {cell.model}'s profile again ({rule})")
                raw_r, retried = retry_profile_outliers(
                    torch.from_numpy(raw), None if ref is None else torch.from_numpy(ref), rule, self.config.alpha,
                    self.config.profile_retries,
                    lambda idx, seed: invert(model, images[idx], settings=settings, seed=seed, impl=self.impl).loss,
                    self.config.inversion_seed)
                raw_r = raw_r.numpy()
            p = BelongingProfile.from_losses(
                raw_r, ref, alpha=self.config.alpha, rule=rule, metric=cell.metric, settings=settings,
                generator=model, reference=ref_adapter, seed=self.config.profile_seed,
                inversion_seed=self.config.inversion_seed, image_bits=IMAGE_BITS, edit=cell.profile_edit,
                retries=self.config.profile_retries or None, retried=retried,
            )
            p.save(self._profile_path(cell, pkey, rule))
            out[rule] = p
        return out

    # ------------------------------------------------------------------ cells

    def missing(self, cell: Cell) -> str | None:
        """Why ``cell`` cannot run now (a model it needs is not available), or None."""
        need = [cell.model] + ([cell.reference] if cell.reference else [])
        need += [s.source for s in (cell.belonging, cell.other) if s.kind == "generated"]
        for m in dict.fromkeys(need):
            why = self.models.missing(m)
            if why:
                return f"{m}: {why}"
        return None

    def plan_keys(self, cell: Cell) -> tuple[InversionSettings, dict, str]:
        """The cell's settings, the keys of every loss set it uses, and its own key."""
        settings = self.settings(cell.model, cell.metric, cell.settings)
        profile_spec = cell.profile_spec(self.config)
        keys = {"profile": self.loss_key(cell.model, profile_spec, settings),
                "belonging": self.loss_key(cell.model, cell.belonging, settings),
                "other": self.loss_key(cell.model, cell.other, settings)}
        if cell.reference:
            for name in ("profile", "belonging", "other"):
                keys[f"{name}_ref"] = self.loss_key(cell.reference, keys[name].spec, settings)
        cell_key = _hash({"format_version": FORMAT_VERSION, "image_bits": IMAGE_BITS, "cell": cell.to_dict(),
                          "config": self.config.identity(),
                          "losses": {k: v.key for k, v in sorted(keys.items())}})
        return settings, keys, cell_key

    def run_cell(self, cell: Cell) -> dict:
        """The cell's record: reused when its file is valid and current, else computed and written."""
        settings, keys, cell_key = self.plan_keys(cell)
        path = cell_path(self.dir, cell.id)
        if self.reuse:
            rec = load_cell(path, cell_key)
            if rec is not None:
                self.stats.cells_reused.append(cell.id)
                return rec
        t0 = time.perf_counter()
        profiles = self.profiles(cell, settings, keys)
        pkey = self._profile_key(cell, keys)
        sides = {}
        used = [keys["profile"]] + ([keys["profile_ref"]] if cell.reference else [])
        for side in ("belonging", "other"):
            loss = np.asarray(self.losses(keys[side], settings)["losses"])
            ref = None
            if cell.reference:
                ref = np.maximum(np.asarray(self.losses(keys[f"{side}_ref"], settings)["losses"]), _REFERENCE_FLOOR)
                used.append(keys[f"{side}_ref"])
            used.append(keys[side])
            sides[side] = {"images": getattr(cell, side).key(), "n": int(loss.shape[0]), "loss": loss.tolist(),
                           "reference_loss": None if ref is None else ref.tolist(),
                           "calibrated_loss": (loss if ref is None else loss / ref).tolist()}
        rules = {}
        for rule, prof in profiles.items():
            r = {"mu": prof.mu, "sigma": prof.sigma, "n": prof.n, "critical_value": prof.critical_value,
                 "threshold": prof.threshold,
                 "profile": str(self._profile_path(cell, pkey, rule).relative_to(self.dir)),
                 "profile_identity": prof.identity()}
            verdicts = {}
            for side in ("belonging", "other"):
                stat = np.asarray(prof.statistic(sides[side]["calibrated_loss"]), dtype=np.float64)
                verdicts[side] = stat < prof.critical_value
                r[f"statistic_{side}"] = [float(v) if math.isfinite(v) else None for v in stat]
                r[f"p_value_{side}"] = np.atleast_1d(prof.p_value(stat)).astype(float).tolist()
                r[f"belongs_{side}"] = [bool(v) for v in verdicts[side]]
            r.update(confusion(verdicts["belonging"], verdicts["other"]))
            rules[rule] = r
        profile_cal = profiles[RULES[0]].calibrated_losses
        seen = {}
        for lk in used:
            seen[lk.key] = self.losses(lk, settings)["seconds"]
        rec = {
            "format": FORMAT_CELL,
            "format_version": FORMAT_VERSION,
            "cell_key": cell_key,
            "cell": cell.to_dict(),
            "config": self.config.name,
            "config_identity": self.config.identity(),
            "settings": settings.to_dict(),
            "belonging_description": cell.belonging.describe(self.models),
            "other_description": cell.other.describe(self.models),
            "profile_calibrated_loss": list(profile_cal),
            "belonging": sides["belonging"],
            "other": sides["other"],
            "rules": rules,
            "auc": roc_auc(sides["belonging"]["calibrated_loss"], sides["other"]["calibrated_loss"]),
            "auc_score": "calibrated loss A' (lower = belonging); the same for both rules",
            "seconds": time.perf_counter() - t0,
            "compute_seconds": float(sum(seen.values())),
            "loss_files": {name: str(self._loss_path(lk).relative_to(self.dir)) for name, lk in keys.items()},
            "threads": torch.get_num_threads(),
            "finished": _now(),
        }
        write_json(path, rec)
        self.stats.cells_computed.append(cell.id)
        return rec

    def run(self, cells: list[Cell]) -> list[dict]:
        """Run ``cells`` in order; returns the records of the cells that are finished.

        A cell whose models are not available is skipped (listed in :attr:`stats`); a cell that
        fails is reported on stderr and the run goes on. Interrupting loses only the cell under
        way: every finished cell and inversion is already on disk.
        """
        records = []
        bar = None
        if self.progress:
            from tqdm import tqdm

            bar = tqdm(total=len(cells), file=sys.stderr, unit="cell", dynamic_ncols=True)
        self._bar = bar
        try:
            for cell in cells:
                if bar is not None:
                    bar.set_description(cell.id)
                why = self.missing(cell)
                if why:
                    self.stats.cells_skipped.append((cell.id, why))
                else:
                    try:
                        records.append(self.run_cell(cell))
                    except (KeyboardInterrupt, SystemExit):
                        raise
                    except Exception as e:  # noqa: BLE001 - one broken cell must not stop the others
                        self.stats.cells_failed.append((cell.id, f"{type(e).__name__}: {e}"))
                        print(f"\ncell {cell.id} failed:\n{traceback.format_exc()}", file=sys.stderr)
                if bar is not None:
                    bar.update(1)
        finally:
            if bar is not None:
                bar.close()
            self._bar = None
        return records

    def previews(self, record: dict) -> dict[str, tuple[Tensor, Tensor]]:
        """For a cell record: per loss set ("belonging", "belonging_ref", ...), its preview images
        and their reconstructions, read from the loss cache (missing sets are left out)."""
        out = {}
        for name, rel in record.get("loss_files", {}).items():
            path = self.dir / rel
            d = read_cache(path, "loss cache file", lambda d: (decode_uint8(d["preview"]["images"]),
                                                               decode_uint8(d["preview"]["reconstructions"])))
            if d is not None:
                out[name] = (decode_uint8(d["preview"]["images"]), decode_uint8(d["preview"]["reconstructions"]))
        return out
