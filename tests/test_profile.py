import inspect
import json
import math
import os
import sys
from pathlib import Path

import numpy as np
import pytest

from ronan_fast import grubbs_critical_value
from ronan_fast.adapters import LatentGenerator
from ronan_fast.inversion import PRESETS
from ronan_fast.profile import (
    DEFAULT_RULE,
    FORMAT_VERSION,
    BelongingProfile,
    ProfileError,
    ProfileMismatchError,
)

sys.path.insert(0, str(Path(__file__).resolve().parent))
import tiny_models  # noqa: E402

SETTINGS = PRESETS["authors"].replace(steps=50, restarts=2)


@pytest.fixture(scope="module")
def models():
    g = LatentGenerator(tiny_models.generator(), tiny_models.LATENT, name="tiny")
    r = LatentGenerator(tiny_models.reference(), tiny_models.LATENT, name="tiny ref")
    o = LatentGenerator(tiny_models.other_generator(), tiny_models.LATENT, name="other")
    return g, r, o


def make(models, rule="grubbs", calibrated=True, n=12, seed=3):
    g, r, _ = models
    rng = np.random.default_rng(seed)
    raw = rng.lognormal(-8, 1.0, n)
    ref = rng.uniform(0.05, 0.2, n) if calibrated else None
    return BelongingProfile.from_losses(
        raw, ref, alpha=0.05, rule=rule, metric="mse", settings=SETTINGS,
        generator=g, reference=r if calibrated else None, seed=7, inversion_seed=0,
    )


def test_default_rule_is_the_log_scale_test():
    # chosen by the full evaluation (results/eval/full): same TPR as the paper's rule, a third of its FPR
    assert DEFAULT_RULE == "grubbs-log"
    assert inspect.signature(BelongingProfile.from_losses).parameters["rule"].default == DEFAULT_RULE


def test_moments_on_the_rules_scale(models):
    p = make(models)
    cal = np.asarray(p.raw_losses) / np.asarray(p.reference_losses)
    np.testing.assert_allclose(p.calibrated_losses, cal)
    assert p.mu == pytest.approx(cal.mean())
    assert p.sigma == pytest.approx(cal.std(ddof=1))
    pl = make(models, rule="grubbs-log")
    assert pl.mu == pytest.approx(np.log(cal).mean())
    assert pl.sigma == pytest.approx(np.log(cal).std(ddof=1))
    assert p.critical_value == pytest.approx(grubbs_critical_value(12, 0.05))


@pytest.mark.parametrize("rule", ["grubbs", "grubbs-log"])
def test_threshold_is_the_edge_of_belonging(models, rule):
    p = make(models, rule=rule)
    t = p.threshold
    assert p.belongs(t * (1 - 1e-9))
    assert not p.belongs(t * (1 + 1e-9))
    assert p.statistic(t) == pytest.approx(p.critical_value)
    # p-value and verdict agree away from the edge
    a = np.geomspace(t / 100, t * 100, 301)
    a = a[np.abs(a / t - 1) > 1e-6]
    np.testing.assert_array_equal(p.p_value(p.statistic(a)) >= p.alpha, p.belongs(a))


def test_uncalibrated_profile(models):
    p = make(models, calibrated=False)
    assert not p.calibrated
    assert p.reference_fingerprint is None and p.reference_losses is None
    assert p.calibrated_losses == p.raw_losses


def test_json_round_trip(models, tmp_path):
    for rule in ("grubbs", "grubbs-log"):
        for calibrated in (True, False):
            p = make(models, rule=rule, calibrated=calibrated)
            path = p.save(tmp_path / "sub" / f"{rule}-{calibrated}.json")
            q = BelongingProfile.load(path)
            assert q == p
            assert q.threshold == p.threshold
            assert q.identity() == p.identity()
    data = json.loads(path.read_text())
    assert data["format_version"] == FORMAT_VERSION
    assert data["settings"]["steps"] == 50
    assert [f.name for f in tmp_path.joinpath("sub").iterdir() if f.name.endswith(".tmp")] == []
    mask = os.umask(0)
    os.umask(mask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~mask  # not mkstemp's 0600


def test_save_replaces_atomically(models, tmp_path, monkeypatch):
    p = make(models)
    path = p.save(tmp_path / "p.json")
    before = path.read_text()

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        make(models, seed=4).save(path)
    assert path.read_text() == before  # nothing already written is lost
    assert sorted(f.name for f in tmp_path.iterdir()) == ["p.json"]


def test_load_errors(models, tmp_path):
    with pytest.raises(ProfileError, match="not found"):
        BelongingProfile.load(tmp_path / "missing.json")
    with pytest.raises(ProfileError, match="not a file"):
        BelongingProfile.load(tmp_path)
    good = make(models).save(tmp_path / "good.json").read_text()

    def write(name, text):
        f = tmp_path / name
        f.write_text(text)
        return f

    with pytest.raises(ProfileError, match="empty"):
        BelongingProfile.load(write("empty.json", ""))
    with pytest.raises(ProfileError, match="not valid JSON.*truncated"):
        BelongingProfile.load(write("trunc.json", good[: len(good) // 2]))
    with pytest.raises(ProfileError, match="JSON object"):
        BelongingProfile.load(write("list.json", "[1, 2]"))
    d = json.loads(good)

    def variant(**changes):
        v = dict(d)
        for k, val in changes.items():
            if val is ...:
                v.pop(k)
            else:
                v[k] = val
        return write("v.json", json.dumps(v))

    with pytest.raises(ProfileError, match="not a belonging profile"):
        BelongingProfile.load(variant(format="something else"))
    with pytest.raises(ProfileError, match="format version 99 is not supported"):
        BelongingProfile.load(variant(format_version=99))
    with pytest.raises(ProfileError, match=r"missing field\(s\) \['sigma'\]"):
        BelongingProfile.load(variant(sigma=...))
    with pytest.raises(ProfileError, match="'sigma'"):
        BelongingProfile.load(variant(sigma=-1.0))
    with pytest.raises(ProfileError, match="'n'"):
        BelongingProfile.load(variant(n=2))
    with pytest.raises(ProfileError, match="calibrated_losses"):
        BelongingProfile.load(variant(n=13))
    with pytest.raises(ProfileError, match="'rule'"):
        BelongingProfile.load(variant(rule="t-test"))
    with pytest.raises(ProfileError, match="'alpha'"):
        BelongingProfile.load(variant(alpha=1.5))
    with pytest.raises(ProfileError, match="mean and sample std"):
        BelongingProfile.load(variant(mu=d["mu"] * 0.5))
    with pytest.raises(ProfileError, match="unknown field"):
        BelongingProfile.load(variant(extra=1))
    with pytest.raises(ProfileError, match="settings"):
        BelongingProfile.load(variant(settings=[1]))


def test_from_losses_errors(models):
    g, r, _ = models
    with pytest.raises(ValueError, match="at least 3"):
        BelongingProfile.from_losses([1e-3, 2e-3], generator=g)
    with pytest.raises(ValueError, match="sigma = 0"):
        BelongingProfile.from_losses([1e-3] * 5, generator=g)
    with pytest.raises(ValueError, match="reference_loss must be finite and > 0"):
        BelongingProfile.from_losses([1e-3, 2e-3, 3e-3], [0.1, 0.0, 0.1], generator=g, reference=r)
    with pytest.raises(ValueError, match="grubbs-log"):
        BelongingProfile.from_losses([0.0, 2e-3, 3e-3], rule="grubbs-log", generator=g)
    with pytest.raises(ValueError, match="rule"):
        BelongingProfile.from_losses([1e-3, 2e-3, 3e-3], rule="other", generator=g)


def test_check_compatible(models):
    g, r, o = models
    p = make(models)
    p.check_compatible(g, r, "mse", SETTINGS)  # the same: no error
    p.check_compatible(g, r, "mse", SETTINGS.to_dict())
    with pytest.raises(ProfileMismatchError, match="model fingerprint differs") as e:
        p.check_compatible(o, r, "mse", SETTINGS)
    assert len(e.value.differences) == 1
    with pytest.raises(ProfileMismatchError, match="reference model differs"):
        p.check_compatible(g, o, "mse", SETTINGS)
    with pytest.raises(ProfileMismatchError, match="no reference model was given"):
        p.check_compatible(g, None, "mse", SETTINGS)
    with pytest.raises(ProfileMismatchError, match="uncalibrated but reference model"):
        make(models, calibrated=False).check_compatible(g, r, "mse", SETTINGS)
    with pytest.raises(ProfileMismatchError, match="metric differs"):
        p.check_compatible(g, r, "mae", SETTINGS.replace(metric="mae"))
    with pytest.raises(ProfileMismatchError) as e:
        p.check_compatible(g, r, "mse", SETTINGS.replace(steps=51, lr=0.2))
    text = str(e.value)
    assert "'steps' differs (profile: 50, given: 51)" in text and "'lr' differs" in text
    assert len(e.value.differences) == 2
    # a profile from before a setting existed: fine at the setting's default, refused otherwise
    older = make(models)
    assert "polish_candidates" not in older.settings  # it has the value it had before it existed
    older.check_compatible(g, r, "mse", SETTINGS)
    with pytest.raises(ProfileMismatchError, match="'polish_candidates' is not in the profile"):
        older.check_compatible(g, r, "mse", SETTINGS.replace(polish_candidates=3))
    damaged = make(models)
    del damaged.settings["polish_steps"]  # a field of the first format is always there
    with pytest.raises(ProfileMismatchError, match="'polish_steps' is not in the profile"):
        damaged.check_compatible(g, r, "mse", SETTINGS)
    # settings that act only against a threshold (a profile's images are inverted without one)
    # cannot have changed its losses: a profile serves with or without them
    p.check_compatible(g, r, "mse", SETTINGS.replace(settle_patience=6, polish_escalate=2, escalate_within=3.0))
    older.check_compatible(g, r, "mse", SETTINGS.replace(settle_patience=6, settle_above=8.0))
    with pytest.raises(ProfileMismatchError, match="'polish_candidates' is not in the profile"):
        p.check_compatible(g, r, "mse", SETTINGS.replace(settle_patience=6, polish_candidates=2))


def test_profile_depends_on_weights(models):
    g, r, _ = models
    fp = g.fingerprint()
    m = tiny_models.generator()
    import torch

    with torch.no_grad():
        m.fc1.bias[0] += 1e-3
    assert LatentGenerator(m, tiny_models.LATENT).fingerprint() != fp
    p = make(models)
    with pytest.raises(ProfileMismatchError, match="model fingerprint"):
        p.check_compatible(LatentGenerator(m, tiny_models.LATENT), r, "mse", SETTINGS)
    assert math.isfinite(p.threshold)


def test_edit_aware_profile_field(models, tmp_path):
    g, r, _ = models
    p = make(models)
    assert p.edit is None and "edit" not in p.to_dict()  # unedited profiles keep their earlier identity
    rng = np.random.default_rng(3)
    e = BelongingProfile.from_losses(
        rng.lognormal(-8, 1.0, 12), rng.uniform(0.05, 0.2, 12), alpha=0.05, rule="grubbs", metric="mse",
        settings=SETTINGS, generator=g, reference=r, seed=7, inversion_seed=0, edit="jpeg75")
    assert e.to_dict()["edit"] == "jpeg75" and "edited by jpeg75" in e.describe()
    assert "edited" not in p.describe()
    q = BelongingProfile.load(e.save(tmp_path / "e.json"))
    assert q == e and q.identity() == e.identity() != p.identity()
    data = e.to_dict()
    data["edit"] = "blur"
    with pytest.raises(ProfileError, match="field 'edit' must be null or 'jpegQ'"):
        BelongingProfile.from_dict(data)


@pytest.mark.parametrize("rule", ["grubbs", "grubbs-log"])
def test_profile_outliers_leave_one_out(rule):
    """An image is an outlier when its statistic against the other n - 1 reaches the critical
    value for n - 1: checked against a direct computation on fresh random profiles, and a planted
    outlier is found even where a second one would mask it in the all-images statistic."""
    from scipy import stats

    from ronan_fast.profile import profile_outliers

    def reference(cal):
        v = np.log(cal) if rule == "grubbs-log" else cal
        n = len(v)
        t = stats.t.ppf(1 - 0.05 / (n - 1), n - 3)
        g = (n - 2) / np.sqrt(n - 1) * np.sqrt(t**2 / (n - 3 + t**2))
        return [i for i in range(n) if (v[i] - np.delete(v, i).mean()) / np.delete(v, i).std(ddof=1) >= g]

    rng = np.random.default_rng(17)
    for _ in range(20):
        cal = rng.lognormal(-15, 1.0, int(rng.integers(5, 120)))
        assert profile_outliers(cal, rule) == reference(cal)
    cal = rng.lognormal(-15, 0.3, 100)
    cal[[7, 42]] = cal.max() * (1e3 if rule == "grubbs" else 1e6)  # two far outliers
    assert profile_outliers(cal, rule) == [7, 42]
    assert profile_outliers(cal[:3], rule) == []  # too few for a test without the image
    with pytest.raises(ValueError, match="rule must be one of"):
        profile_outliers(cal, "mean")


def test_retry_fields_round_trip_and_validate(models, tmp_path):
    g, r, _ = models
    p = make(models)
    assert p.retries is None and "retries" not in p.to_dict() and "retried" not in p.to_dict()
    rng = np.random.default_rng(3)
    q = BelongingProfile.from_losses(
        rng.lognormal(-8, 1.0, 12), rng.uniform(0.05, 0.2, 12), alpha=0.05, rule="grubbs", metric="mse",
        settings=SETTINGS, generator=g, reference=r, seed=7, inversion_seed=0, retries=2, retried=[3, 3, 5])
    assert q.to_dict()["retried"] == [3, 3, 5] and "2 image(s) inverted again" in q.describe()
    assert BelongingProfile.load(q.save(tmp_path / "q.json")) == q
    for change, message in [({"retried": [12]}, "image indices in"), ({"retries": 0}, "integer >= 1"),
                            ({"retries": None}, "exactly when retries is")]:
        data = {**q.to_dict(), **change}
        with pytest.raises(ProfileError, match=message):
            BelongingProfile.from_dict(data)


def test_a_profile_whose_threshold_admits_reference_like_images_says_so(models):
    """A calibrated threshold of A' >= WEAK_THRESHOLD (a model whose inversions missed many of its
    own images: half of them 1000x higher, as on a StyleGAN from random starts) is named in the
    profile's description and warned of where an attributor adopts it; a converged profile and an
    uncalibrated one are not."""
    import warnings

    from ronan_fast import Attributor
    from ronan_fast.profile_checks import WEAK_THRESHOLD

    g, r, _ = models
    healthy = make(models, rule="grubbs-log")
    assert healthy.threshold < WEAK_THRESHOLD and healthy.weakness is None and "warning" not in healthy.describe()
    rng = np.random.default_rng(0)
    raw = np.concatenate([rng.lognormal(np.log(1e-6), 0.3, 50), rng.lognormal(np.log(1e-3), 0.7, 50)])
    ref = rng.lognormal(np.log(5e-3), 0.3, 100)
    weak = BelongingProfile.from_losses(raw, ref, alpha=0.05, rule="grubbs-log", metric="mse", settings=SETTINGS,
                                        generator=g, reference=r, seed=7, inversion_seed=0)
    assert weak.threshold >= WEAK_THRESHOLD
    assert "hardly tell the model's images from others" in weak.weakness
    assert f"warning: {weak.weakness}" in weak.describe()
    uncal = BelongingProfile.from_losses(raw * 1e3, None, alpha=0.05, rule="grubbs-log", metric="mse",
                                         settings=SETTINGS, generator=g, reference=None, seed=7, inversion_seed=0)
    assert uncal.threshold >= WEAK_THRESHOLD and uncal.weakness is None  # no reference: no anchor for A'
    att = Attributor(g, r, settings=SETTINGS)
    with pytest.warns(UserWarning, match="hardly tell the model's images from others"):
        att.use_profile(weak)
    assert att.report_header()["profile"]["warning"] == weak.weakness  # what a report records and shows
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        att.use_profile(healthy)
    assert att.report_header()["profile"]["warning"] is None
