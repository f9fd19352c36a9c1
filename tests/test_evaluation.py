"""The evaluation harness on tiny random generators: outputs, resume, corrupt caches, agreement
with the Attributor, and the cell plan over the real zoo (which needs no weights)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from ronan_fast._atomic import plain_file_mode
from ronan_fast.adapters import LatentGenerator
from ronan_fast.evaluation import CONFIGS, CacheWarning, Cell, EvalConfig, Evaluation, ImageSpec, build_cells
from ronan_fast.evaluation import runner as runner_mod
from ronan_fast.evaluation.__main__ import main
from ronan_fast.evaluation.config import select_cells
from ronan_fast.evaluation.images import apply_edit, quantise
from ronan_fast.evaluation.models import ModelSource, ZooModels, derived_seed
from ronan_fast.evaluation.report import CSV_COLUMNS
from ronan_fast.evaluation.scoring import confusion, roc_auc
from ronan_fast.models import DCGANGenerator, dcgan_init_
from ronan_fast.profile import RULES, BelongingProfile

torch.set_num_threads(1)

TINY = EvalConfig("tiny", n_profile=5, n_belonging=4, n_other=4, overrides=(("steps", 30),), preview=3,
                  metric_models=(), calibration_models=(), edit_models=())


class TinyModels(ModelSource):
    """Three random tiny DCGANs ("a", "b", "ref"), each 'trained' on its own data; real images are
    seeded random blobs: training images differ per model, unseen images are one shared pool."""

    reference_candidates = ("ref",)

    def __init__(self):
        self._adapters = {}

    def names(self):
        return ["a", "b", "ref"]

    def missing(self, name):
        return None

    def adapter(self, name):
        if name not in self._adapters:
            torch.manual_seed({"a": 1, "b": 2, "ref": 3}[name])
            module = dcgan_init_(DCGANGenerator(nz=4, ngf=4, channels=1, size=8))
            # weights far larger than DCGAN's init and random BatchNorm statistics, so that eval mode
            # gives images that differ by more than 8-bit rounding and a JPEG's quantisation
            with torch.no_grad():
                for p in module.parameters():
                    if p.dim() > 1:
                        p.mul_(25)
            for m in module.modules():
                if isinstance(m, torch.nn.BatchNorm2d):
                    m.running_mean.normal_(0, 0.1)
                    m.running_var.uniform_(0.05, 0.2)
            self._adapters[name] = LatentGenerator(module.eval(), (4,), (-1.0, 1.0), name=name)
        return self._adapters[name]

    def training_data(self, name):
        return f"data-{name}"

    def real_unavailable(self, name, split):
        return None

    def real_images(self, name, split, n, seed):
        g = torch.Generator().manual_seed(derived_seed("tiny", name if split == "train" else "", split, seed) % (2**31))
        x = torch.nn.functional.interpolate(torch.rand(n, 1, 3, 3, generator=g), size=(8, 8), mode="bilinear",
                                            align_corners=False)
        return x.clamp(0, 1)


@pytest.fixture
def inversions(monkeypatch):
    """Count calls of inversion made by the harness."""
    calls = []
    real = runner_mod.invert

    def counting(*args, **kwargs):
        calls.append(args[1].shape[0])
        return real(*args, **kwargs)

    monkeypatch.setattr(runner_mod, "invert", counting)
    return calls


@pytest.fixture
def tiny_config(monkeypatch):
    monkeypatch.setitem(CONFIGS, "tiny", TINY)
    return TINY


def _cli(out: Path, *extra: str) -> int:
    return main(["--config", "tiny", "--cells", "t2-a-*", "--out", str(out), "--no-progress", *extra], models=TinyModels())


def _read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_cli_outputs_resume_and_corrupt_caches(tmp_path, tiny_config, inversions):
    out = tmp_path / "eval"
    folder = out / "tiny"
    assert _cli(out) == 0
    # profile (model + reference), belonging (model + reference), train and unseen (model + reference)
    assert len(inversions) == 8

    rows = _read_csv(folder / "cells.csv")
    assert [r["cell"] for r in rows] == ["t2-a-train"] * 2 + ["t2-a-unseen"] * 2
    assert list(rows[0]) == CSV_COLUMNS
    assert [r["rule"] for r in rows] == list(RULES) * 2
    for r in rows:
        tp, fp, fn, tn = (int(r[k]) for k in ("tp", "fp", "fn", "tn"))
        assert tp + fn == 4 and fp + tn == 4
        assert float(r["accuracy"]) == pytest.approx((tp + tn) / 8)
        assert 0.0 <= float(r["auc"]) <= 1.0
        assert r["reference"] == "ref" and r["steps"] == "30"
    summary = (folder / "summary.md").read_text()
    assert "PARTIAL: 2 of" in summary and "| t2-a-unseen |" in summary and "not finished" in summary
    assert "    python -m ronan_fast.evaluation --config tiny --cells 't2-a-*'" in summary
    for cid in ("t2-a-train", "t2-a-unseen"):
        rec = json.loads((folder / "cells" / f"{cid}.json").read_text())
        assert len(rec["belonging"]["calibrated_loss"]) == 4
        np.testing.assert_allclose(rec["belonging"]["calibrated_loss"],
                                   np.asarray(rec["belonging"]["loss"]) / np.asarray(rec["belonging"]["reference_loss"]))
        for name in ("hist", "grid"):
            png = folder / "figures" / f"{name}-{cid}.png"
            assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
            assert png.stat().st_mode & 0o777 == plain_file_mode()  # as readable as any other output
    profiles = sorted((folder / "profiles").glob("*.json"))
    assert len(profiles) == len(RULES)
    assert {BelongingProfile.load(p).rule for p in profiles} == set(RULES)
    assert {BelongingProfile.load(p).image_bits for p in profiles} == {8}

    # a folder with finished cells is not continued by accident
    assert _cli(out) == 2
    # resume: nothing is inverted again and the finished cells are left as they are
    before = {p.name: p.read_bytes() for p in (folder / "cells").glob("*.json")}
    inversions.clear()
    assert _cli(out, "--jobs-resume") == 0
    assert inversions == []
    assert {p.name: p.read_bytes() for p in (folder / "cells").glob("*.json")} == before

    # a corrupt cell file is noticed and the cell recomputed (its inversions are cached)
    bad = folder / "cells" / "t2-a-train.json"
    bad.write_text(before["t2-a-train.json"].decode()[:200])
    with pytest.warns(CacheWarning, match="t2-a-train.json"):
        assert _cli(out, "--jobs-resume") == 0
    assert inversions == []
    fixed = json.loads(bad.read_text())
    old = json.loads(before["t2-a-train.json"])
    assert fixed["rules"] == old["rules"] and fixed["belonging"] == old["belonging"]

    # a corrupt inversion cache file is inverted again; a corrupt profile is refitted from cached losses
    loss_file = folder / json.loads(bad.read_text())["loss_files"]["other"]
    loss_file.write_text('{"format": "ronan-fast evaluation losses", "losses": [1, 2')
    bad.unlink()
    with pytest.warns(CacheWarning, match=loss_file.name):
        assert _cli(out, "--jobs-resume") == 0
    assert inversions == [4]
    inversions.clear()
    prof = profiles[0]
    prof.write_text(prof.read_text().replace('"mu": ', '"mu": 1', 1))
    bad.unlink()
    with pytest.warns(CacheWarning, match=prof.name):
        assert _cli(out, "--jobs-resume") == 0
    assert inversions == []
    BelongingProfile.load(prof)
    refit = json.loads(bad.read_text())["rules"]
    for rule in RULES:  # the same numbers; only the new profile's creation time (in its identity) differs
        refit[rule].pop("profile_identity"), old["rules"][rule].pop("profile_identity")
    assert refit == old["rules"]


def _cell(other: ImageSpec, reference="ref") -> Cell:
    return Cell("c", "2", "a", reference, "mse", ImageSpec("generated", "a", 4, 1), other)


def test_verdicts_match_the_attributor_and_stale_cells_are_recomputed(tmp_path, inversions):
    from ronan_fast.attributor import Attributor

    models = TinyModels()
    ev = Evaluation(TINY, tmp_path, models, progress=False)
    cell = _cell(ImageSpec("generated", "b", 4, 1))
    rec = ev.run_cell(cell)
    settings, keys, _ = ev.plan_keys(cell)
    prof = BelongingProfile.load(tmp_path / rec["rules"]["grubbs"]["profile"])

    att = Attributor(models.adapter("a"), models.adapter("ref"), settings=settings, seed=TINY.inversion_seed,
                     early_stop=False)
    att.use_profile(prof)
    for side, spec in (("belonging", cell.belonging), ("other", cell.other)):
        res = att.attribute(ev.images(spec))
        np.testing.assert_allclose(res.loss.numpy(), rec[side]["loss"], rtol=1e-6)
        np.testing.assert_allclose(res.calibrated_loss.numpy(), rec[side]["calibrated_loss"], rtol=1e-6)
        assert res.belongs.tolist() == rec["rules"]["grubbs"][f"belongs_{side}"]

    # other settings make the cached cell stale: it is recomputed, with a warning
    steps40 = EvalConfig("tiny", n_profile=5, n_belonging=4, n_other=4, overrides=(("steps", 40),), preview=3)
    inversions.clear()
    with pytest.warns(CacheWarning, match="stale"):
        rec40 = Evaluation(steps40, tmp_path, models, progress=False).run_cell(cell)
    assert rec40["settings"]["steps"] == 40 and len(inversions) == 6


def test_image_sets_with_the_same_pixels_share_inversions(tmp_path, inversions):
    ev = Evaluation(TINY, tmp_path, TinyModels(), progress=False)
    gen = lambda m: ImageSpec("generated", m, 4, 1)  # noqa: E731
    a = ev.run_cell(Cell("a", "2", "a", "ref", "mse", gen("a"), ImageSpec("unseen", "a", 4, 1)))
    assert len(inversions) == 6
    # "unseen-b" holds the same pixels as "unseen-a": the reference model's losses are reused
    b = ev.run_cell(Cell("b", "2", "b", "ref", "mse", gen("b"), ImageSpec("unseen", "b", 4, 1)))
    assert len(inversions) == 11
    assert a["loss_files"]["other_ref"] == b["loss_files"]["other_ref"]
    assert a["other"]["reference_loss"] == b["other"]["reference_loss"]
    for rec in (a, b):
        assert all((tmp_path / rel).is_file() for rel in rec["loss_files"].values())


def test_harness_settings_leave_out_the_threshold_rules(tmp_path):
    """The harness inverts in full, without a threshold: escalation and the settle rule (which
    act only with one) cannot change its losses and are left out of its settings, so the
    one-step family default's escalation and the GAN default's settle rule leave every cache
    key as it was."""
    from ronan_fast.inversion import FAMILY_DEFAULTS

    models = TinyModels()
    models.adapter("a").family = "consistency"  # an instance attribute: this adapter only
    ev = Evaluation(EvalConfig("tiny", n_profile=5, n_belonging=4, n_other=4, settings="default"), tmp_path, models,
                    progress=False)
    assert FAMILY_DEFAULTS["consistency"].polish_escalate > 0
    got = ev.settings("a", "mse")
    assert got == FAMILY_DEFAULTS["consistency"].replace(polish_escalate=0, escalate_within=4.0)
    assert "polish_escalate" not in got.to_dict() and got.polish_candidates == 2
    # the GAN default's settle rule, too (its cells were inverted before it existed)
    assert FAMILY_DEFAULTS["gan"].settle_patience > 0
    gan = ev.settings("b", "mse")
    assert gan == FAMILY_DEFAULTS["gan"].replace(settle_patience=0, polish_escalate=0)
    assert not any(k.startswith("settle_") for k in gan.to_dict()) and "polish_escalate" not in gan.to_dict()


def test_uncalibrated_cell_uses_raw_losses(tmp_path):
    ev = Evaluation(TINY, tmp_path, TinyModels(), progress=False)
    rec = ev.run_cell(_cell(ImageSpec("unseen", "a", 4, 1), reference=None))
    assert rec["belonging"]["reference_loss"] is None
    assert rec["belonging"]["calibrated_loss"] == rec["belonging"]["loss"]
    assert "uncalibrated" in rec["rules"]["grubbs"]["profile"]


def test_edit_aware_cell_fits_its_profile_on_edited_images(tmp_path):
    ev = Evaluation(TINY, tmp_path, TinyModels(), progress=False)
    plain = ev.run_cell(_cell(ImageSpec("unseen", "a", 4, 1)))
    cell = Cell("c-aware", "8", "a", "ref", "mse", ImageSpec("generated", "a", 4, 1, edit="jpeg75"),
                ImageSpec("unseen", "a", 4, 1, edit="jpeg75"), profile_edit="jpeg75")
    assert cell.profile_spec(TINY).edit == "jpeg75" and _cell(cell.other).profile_spec(TINY).edit is None
    assert "profile_edit" not in _cell(cell.other).to_dict()  # earlier cells keep their keys
    assert Cell.from_dict(cell.to_dict()) == cell
    rec = ev.run_cell(cell)
    prof = BelongingProfile.load(tmp_path / rec["rules"]["grubbs"]["profile"])
    assert prof.edit == "jpeg75"
    assert rec["loss_files"]["profile"] != plain["loss_files"]["profile"]
    assert rec["profile_calibrated_loss"] != plain["profile_calibrated_loss"]
    # the profile's images are the profile stream's images, edited
    images = ev.images(cell.profile_spec(TINY))
    from ronan_fast.evaluation.images import apply_edit

    assert torch.equal(images, apply_edit(ev.images(_cell(cell.other).profile_spec(TINY)), "jpeg75"))
    with pytest.raises(ValueError, match="profile_edit must be one of"):
        Cell("x", "8", "a", "ref", "mse", cell.belonging, cell.other, profile_edit="jpeg50")


def test_confusion_and_auc():
    c = confusion([True, True, False], [False, True, False, False])
    assert (c["tp"], c["fn"], c["fp"], c["tn"]) == (2, 1, 1, 3)
    assert c["tpr"] == pytest.approx(2 / 3) and c["fpr"] == pytest.approx(1 / 4)
    assert c["accuracy"] == pytest.approx(5 / 7)
    assert roc_auc([0.1, 0.2], [0.3, 0.4]) == 1.0  # lower = belonging
    assert roc_auc([0.3, 0.4], [0.1, 0.2]) == 0.0
    assert roc_auc([0.1, 0.3], [0.2, 0.3]) == pytest.approx(0.625)  # one tie counts half
    with pytest.raises(ValueError, match="both sides"):
        confusion([], [True])


def test_quantise_and_edits():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 1, 16, 16, generator=g)
    q = quantise(x)
    assert torch.equal(quantise(q), q) and float((q - x).abs().max()) <= 0.5 / 255 + 1e-7
    for edit in ("1977", "jpeg75"):
        e = apply_edit(q, edit)
        assert e.shape == q.shape and torch.equal(quantise(e), e)
        assert float((e - q).abs().mean()) > 1e-3  # the edit changed the images
    with pytest.raises(ValueError, match="edit must be one of"):
        apply_edit(q, "sepia")


def test_zoo_cell_plan():
    """The cells over the real zoo registry (only names and training data; no weights needed)."""
    models = ZooModels()
    plan = build_cells(CONFIGS["full"], models)
    ids = [c.id for c in plan.cells]
    assert len(ids) == len(set(ids))
    assert {c.table for c in plan.cells} == {"2", "3", "4", "5", "6", "7", "8", "S"}
    assert [(c.id, c.settings) for c in plan.cells if c.settings] == [("s-dcgan-fmnist-default", "default")]
    assert ("t2-dcgan-digits-unseen" in dict(plan.omitted))
    for c in plan.cells:
        assert c.reference != c.model
        if c.reference is not None:
            assert models.training_data(c.reference) != models.training_data(c.model)
            assert c.reference != c.other.source or c.other.kind != "generated"
        assert c.belonging.kind == "generated" and c.belonging.source == c.model
        assert c.belonging.n == 100 and c.other.n == 100
    by_id = {c.id: c for c in plan.cells}
    assert by_id["t4-dcgan-fmnist-vs-dcgan-digits"].reference == "dcgan-photos"
    assert by_id["t6-vae-fmnist-uncalibrated"].reference is None
    assert by_id["t8-ddim-fmnist-jpeg75"].belonging.edit == "jpeg75"
    aware = by_id["t8-vae-fmnist-1977-aware"]
    assert (aware.profile_edit, aware.belonging.edit, aware.other.edit) == ("1977", "1977", "1977")
    assert aware.other.kind == "unseen" and by_id["t8-vae-fmnist-1977"].profile_edit is None
    assert {c.other.source for c in plan.cells if c.table == "7"} == {f"dcgan-fmnist-overlap{p}" for p in range(50, 100, 10)}
    assert [c.id for c in select_cells(plan.cells, "t7-*,t4-*-photos")] == [
        "t4-dcgan-fmnist-vs-dcgan-photos", *(f"t7-dcgan-fmnist-vs-overlap{p}" for p in range(50, 100, 10))]
    with pytest.raises(ValueError, match="'t9-\\*' matches no cell"):
        select_cells(plan.cells, "t9-*")
    # the same cells with the package's defaults: every table but the settings comparison
    dplan = build_cells(CONFIGS["full-default"], models)
    assert CONFIGS["full-default"].settings == "default"
    # ... and the one-step model in Tables 6 and 8 too (the diffusion family the DDIM sampler cannot serve)
    onestep = {f"t6-onestep-fmnist-{k}" for k in ("calibrated", "uncalibrated")} | {
        f"t8-onestep-fmnist-{e}{a}" for e in ("1977", "jpeg75") for a in ("", "-aware")}
    assert onestep <= {c.id for c in dplan.cells} and not onestep & {c.id for c in plan.cells}
    assert [c.id for c in dplan.cells if "tone" not in c.id and "anyedit" not in c.id and c.id not in onestep] == [
        c.id for c in plan.cells if c.table != "S"]
    tone = {c.id: c for c in dplan.cells if "tone" in c.id}
    anyedit = {c.id: c for c in dplan.cells if c.id.endswith("-anyedit")}
    assert set(anyedit) == {f"t8-{m}-{e}-anyedit" for m in ("dcgan-fmnist", "vae-fmnist", "condgan-fmnist")
                            for e in ("1977", "jpeg75")}
    c = anyedit["t8-dcgan-fmnist-jpeg75-anyedit"]
    assert (c.metric, c.profile_edit, c.belonging.edit, c.other.edit) == ("mse-tone", "any", "jpeg75", "jpeg75")
    assert set(tone) == {"t5-dcgan-fmnist-mse-tone"} | {
        f"t8-{m}-{e}{a}" for m in ("dcgan-fmnist", "vae-fmnist", "condgan-fmnist") for e in ("1977", "jpeg75")
        for a in ("-tone", "-aware-tone", "-anytone")}
    assert {c.metric for c in tone.values()} == {"mse-tone"}
    assert tone["t8-vae-fmnist-1977-aware-tone"].profile_edit == "1977"
    assert tone["t8-vae-fmnist-1977-tone"].profile_edit is None
    assert tone["t8-vae-fmnist-1977-tone"].belonging.edit == "1977"
    anytone = tone["t8-vae-fmnist-1977-anytone"]
    assert (anytone.profile_edit, anytone.belonging.edit, anytone.other.edit) == ("tone", "1977", "1977")
    assert {"t2-onestep-fmnist-unseen", "t3-onestep-fmnist-vs-dcgan-fmnist"} <= {c.id for c in dplan.cells}


def test_profile_retries_in_the_harness_match_the_attributor_helper(tmp_path, inversions):
    """profile_retries=k: each rule's profile has its outliers inverted again exactly as
    retry_profile_outliers (Attributor.fit's code) does; without it the keys stay as before."""
    import dataclasses

    from ronan_fast.profile_fitting import retry_profile_outliers
    from ronan_fast.inversion import invert

    models = TinyModels()
    cell = _cell(ImageSpec("generated", "b", 4, 1))
    cfg = dataclasses.replace(TINY, n_profile=12, profile_retries=1)
    assert "profile_retries" not in TINY.identity() and cfg.identity()["profile_retries"] == 1
    with pytest.raises(ValueError, match="profile_retries must be an integer >= 0"):
        dataclasses.replace(TINY, profile_retries=-1)
    plain = Evaluation(dataclasses.replace(cfg, profile_retries=0), tmp_path / "plain", models, progress=False)
    rec0 = plain.run_cell(cell)
    ev = Evaluation(cfg, tmp_path / "retry", models, progress=False)
    rec = ev.run_cell(cell)
    settings, keys, _ = ev.plan_keys(cell)
    images = ev.images(cell.profile_spec(cfg))
    model = models.adapter("a")
    found = []
    for rule in RULES:
        before = BelongingProfile.load(tmp_path / "plain" / rec0["rules"][rule]["profile"])
        after = BelongingProfile.load(tmp_path / "retry" / rec["rules"][rule]["profile"])
        ref = torch.tensor(before.reference_losses)
        want, retried = retry_profile_outliers(
            torch.tensor(before.raw_losses), ref, rule, cfg.alpha, 1,
            lambda idx, seed: invert(model, images[idx], settings=settings, seed=seed).loss, 0)
        found.append(bool(retried))
        assert after.retries == 1 and after.retried == retried and before.retries is None
        np.testing.assert_allclose(after.raw_losses, want.numpy(), rtol=1e-12)
        assert rec["rules"][rule]["profile"] != rec0["rules"][rule]["profile"]
    assert any(found), "this profile has an outlier under some rule: the retries were exercised"


def test_grids_show_the_tone_fitted_reconstruction_for_mse_tone():
    from ronan_fast.evaluation.report import shown_reconstruction
    from ronan_fast.metrics import ToneMSE

    g = torch.Generator().manual_seed(0)
    recon = torch.rand(3, 1, 8, 8, generator=g)
    images = (recon * 1.2 + 0.1).clamp(0, 1)
    assert shown_reconstruction("mse", recon, images) is recon
    shown = shown_reconstruction("mse-tone", recon, images)
    assert shown.shape == recon.shape and float(shown.min()) >= 0 and float(shown.max()) <= 1
    assert float((shown - images).abs().max()) < 1e-4  # the fitted map undoes the brightening
    torch.testing.assert_close(shown, ToneMSE().fit(recon, images).clamp(0, 1).float())
    assert shown_reconstruction("mse-tone", recon, images[:2]).shape[0] == 2  # fewer previews of one side


def test_quick_configuration_on_the_zoo_reproduces_its_committed_cells(tmp_path):
    """The `quick` configuration on the real zoo and data (a few of its cells: Tables 2, 6 and 8,
    about a minute on one thread) gives the confusion counts committed in results/eval/quick."""
    from ronan_fast import data as D

    if not D.FASHION_MNIST_DIR.is_dir():
        pytest.skip(f"dataset-fashion-mnist not installed at {D.FASHION_MNIST_DIR}")
    committed = Path(__file__).resolve().parents[1] / "results" / "eval" / "quick" / "cells.csv"
    cells = "t2-dcgan-fmnist-unseen,t6-dcgan-fmnist-*,t8-dcgan-fmnist-jpeg75"
    before = torch.get_num_threads()
    try:
        assert main(["--config", "quick", "--cells", cells, "--out", str(tmp_path), "--threads", "1",
                     "--no-progress", "--no-figures"]) == 0
    finally:
        torch.set_num_threads(before)
    ours = _read_csv(tmp_path / "quick" / "cells.csv")
    ids = {r["cell"] for r in ours}
    assert ids == {"t2-dcgan-fmnist-unseen", "t6-dcgan-fmnist-calibrated", "t6-dcgan-fmnist-uncalibrated",
                   "t8-dcgan-fmnist-jpeg75"}
    assert (tmp_path / "quick" / "summary.md").is_file()
    want = {(r["cell"], r["rule"]): r for r in _read_csv(committed) if r["cell"] in ids}
    assert len(want) == len(ours) == 2 * len(ids)
    for r in ours:
        w = want[(r["cell"], r["rule"])]
        assert [r[k] for k in ("tp", "fp", "fn", "tn")] == [w[k] for k in ("tp", "fp", "fn", "tn")], (r, w)
        assert float(r["auc"]) == pytest.approx(float(w["auc"]), abs=0.02)
