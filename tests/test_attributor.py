import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from ronan_fast import Attributor, BelongingProfile, LatentGenerator, ProfileMismatchError
from ronan_fast.imageio import save_image

sys.path.insert(0, str(Path(__file__).resolve().parent))
import tiny_models  # noqa: E402

FAST = dict(steps=200, restarts=2)
N_PROFILE = 12


#: one torch thread for this module's tests (tests/conftest.py): tiny batches run as fast on one
#: thread, and much faster on shared cores
ONE_THREAD = True


def adapter(factory, name):
    return LatentGenerator(factory(), tiny_models.LATENT, name=name)


@pytest.fixture(scope="module")
def g():
    return adapter(tiny_models.generator, "tiny")


@pytest.fixture(scope="module")
def r():
    return adapter(tiny_models.reference, "tiny ref")


@pytest.fixture(scope="module")
def fitted(g, r):
    att = Attributor(g, r, **FAST)
    att.fit(n=N_PROFILE, seed=0)
    return att


@pytest.fixture(scope="module")
def test_images(fitted):
    generated = fitted.sample(6, seed=1)
    noise = torch.rand(6, *tiny_models.SHAPE, generator=torch.Generator().manual_seed(5))
    return generated, noise


def test_fit_profile(fitted, g, r):
    p = fitted.profile
    assert p.n == N_PROFILE and p.calibrated and p.rule == "grubbs-log"
    assert p.generator_fingerprint == g.fingerprint()
    assert p.reference_fingerprint == r.fingerprint()
    assert p.settings == fitted.settings.to_dict()
    assert p.settings["steps"] == 200 and p.settings["restarts"] == 2
    assert len(p.raw_losses) == N_PROFILE
    np.testing.assert_allclose(p.calibrated_losses, np.array(p.raw_losses) / np.array(p.reference_losses))


def test_generated_belong_noise_does_not(fitted, test_images):
    generated, noise = test_images
    res = fitted.attribute(torch.cat([generated, noise]))
    assert res.belongs.tolist() == [True] * 6 + [False] * 6
    assert len(res) == 12
    assert res.critical_value == pytest.approx(fitted.profile.critical_value)
    # verdicts and p-values agree
    assert ((res.p_value >= fitted.profile.alpha) == res.belongs).all()
    assert (res.p_value[6:] < 1e-6).all()
    assert (res.calibrated_loss == res.loss / res.reference_loss).all()
    assert res.reconstruction.shape == generated.shape[:0] + (12, *tiny_models.SHAPE)
    assert "6 belong" in res.summary() and "6 do not" in res.summary()


def _with_and_without_early_stop(att, images):
    with_stop = att.attribute(images)
    att.early_stop = False
    try:
        return with_stop, att.attribute(images)
    finally:
        att.early_stop = True


def test_early_stop_same_verdicts(fitted, g, r, test_images):
    generated, noise = test_images
    images = torch.cat([generated, noise])
    with_stop, without = _with_and_without_early_stop(fitted, images)
    assert with_stop.belongs.tolist() == without.belongs.tolist()
    assert with_stop.stopped_early[:6].all() and not with_stop.stopped_early[6:].any()
    assert not without.stopped_early.any()
    # early-stopped images spent fewer steps
    assert (with_stop.row_steps[:6] < without.row_steps[:6]).all()
    assert (without.loss[:6] <= with_stop.loss[:6]).all()
    # the noise images did not stop; against the threshold the settle rule may end their polish
    # sooner (they are far above it), which can only leave a loss higher
    assert (with_stop.loss[6:] >= without.loss[6:]).all()
    # without the rules that act against a threshold, the images that did not stop ran the very
    # same inversion, bit for bit (those rules are not part of the profile: it is adopted as is)
    plain = Attributor(g, r, **FAST, settle_patience=0, polish_escalate=0)
    plain.use_profile(fitted.profile)
    with_stop, without = _with_and_without_early_stop(plain, images)
    assert with_stop.belongs.tolist() == without.belongs.tolist()
    assert with_stop.stopped_early[:6].all() and not with_stop.stopped_early[6:].any()
    assert torch.equal(with_stop.loss[6:], without.loss[6:])


def test_records_are_json_safe(fitted, test_images):
    generated, _ = test_images
    res = fitted.attribute(generated[:2])
    records = res.to_records()
    assert len(records) == 2
    text = json.dumps(records, allow_nan=False)
    back = json.loads(text)
    assert back[0]["verdict"] == "belongs" and back[0]["belongs"] is True
    assert set(back[0]) >= {"loss", "reference_loss", "calibrated_loss", "statistic", "critical_value", "p_value"}


def test_determinism(g, r):
    a = Attributor(g, r, steps=60, restarts=2).fit(n=5, seed=3)
    b = Attributor(g, r, steps=60, restarts=2).fit(n=5, seed=3)
    c = Attributor(g, r, steps=60, restarts=2).fit(n=5, seed=4)
    assert a.raw_losses == b.raw_losses and a.reference_losses == b.reference_losses
    assert (a.mu, a.sigma) == (b.mu, b.sigma)
    assert a.raw_losses != c.raw_losses


def test_profile_images_are_not_the_inversion_starts(g):
    # Inversion draws an image's starts from its pixels and the inversion seed; the profile's
    # images come from a stream of their own, so no start is the very latent that made its image.
    from ronan_fast.profile_fitting import stream_seed
    from ronan_fast.inversion.starts import row_latents

    for seed in (0, 1):
        made = g.sample_latents(8, torch.Generator().manual_seed(stream_seed("profile", seed)))
        with torch.no_grad():
            images = g.decode(made)
        starts = row_latents(g, images, 4, 0).view(8, 4, -1)
        assert not (starts == made[:, None, :]).all(-1).any()
        assert not torch.isin(made, starts).any()


def test_uncalibrated_ablation(g, test_images):
    att = Attributor(g, None, **FAST)
    p = att.fit(n=N_PROFILE, seed=0)
    assert not p.calibrated and p.reference_losses is None
    generated, noise = test_images
    res = att.attribute(torch.cat([generated[:3], noise[:3]]))
    assert res.reference_loss is None
    assert torch.equal(res.calibrated_loss, res.loss)
    assert res.belongs.tolist() == [True] * 3 + [False] * 3
    assert res.to_records()[0]["reference_loss"] is None


def test_log_rule(g, r, test_images):
    att = Attributor(g, r, rule="grubbs-log", **FAST)
    p = att.fit(n=N_PROFILE, seed=0)
    assert p.rule == "grubbs-log"
    generated, noise = test_images
    res = att.attribute(torch.cat([generated[:3], noise[:3]]))
    assert res.belongs.tolist() == [True] * 3 + [False] * 3


def test_from_profile(fitted, g, r, tmp_path, test_images):
    path = fitted.profile.save(tmp_path / "p.json")
    att = Attributor.from_profile(path, g, r)
    assert att.settings == fitted.settings and att.profile == fitted.profile
    generated, noise = test_images
    assert att.attribute(torch.cat([generated[:2], noise[:2]])).belongs.tolist() == [True, True, False, False]
    other = adapter(tiny_models.other_generator, "other")
    with pytest.raises(ProfileMismatchError, match="model fingerprint"):
        Attributor.from_profile(path, other, r)
    with pytest.raises(ProfileMismatchError, match="reference model differs"):
        Attributor.from_profile(path, g, other)
    with pytest.raises(ProfileMismatchError, match="no reference model"):
        Attributor.from_profile(path, g, None)
    strict = Attributor.from_profile(BelongingProfile.load(path), g, r, alpha=0.01)
    assert strict.profile.alpha == 0.01 and strict.profile.threshold > fitted.profile.threshold
    with pytest.raises(ProfileMismatchError, match="'steps' differs"):
        Attributor(g, r, steps=201, restarts=2).use_profile(fitted.profile)


def test_bad_tensor_inputs(fitted):
    shape = tiny_models.SHAPE
    x = torch.rand(2, *shape)
    x[1, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        fitted.attribute(x)
    with pytest.raises(ValueError, match=r"shape \(1, 9, 9\).*makes \(1, 8, 8\)"):
        fitted.attribute(torch.rand(2, 1, 9, 9))
    with pytest.raises(ValueError, match=r"\[B, C, H, W\]"):
        fitted.attribute(torch.rand(8, 8))
    with pytest.raises(ValueError, match="empty"):
        fitted.attribute(torch.rand(0, *shape))
    with pytest.raises(ValueError, match="float"):
        fitted.attribute(torch.zeros(1, *shape, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        fitted.attribute(torch.rand(1, *shape) * 2 - 1)
    with pytest.raises(ValueError, match="no images given"):
        fitted.attribute([])
    # one image [C, H, W] is accepted
    assert len(fitted.attribute(torch.rand(*shape))) == 1


def test_constructor_errors(g, r):
    with pytest.raises(TypeError, match="LatentGenerator"):
        Attributor(tiny_models.generator())
    with pytest.raises(ValueError, match="rule"):
        Attributor(g, r, rule="t")
    with pytest.raises(ValueError, match="alpha"):
        Attributor(g, r, alpha=0)
    with pytest.raises(TypeError, match="unknown inversion setting"):
        Attributor(g, r, stepz=3)
    with pytest.raises(ValueError, match="reference"):
        Attributor(g, "mnist")
    with pytest.raises(RuntimeError, match="no belonging profile"):
        Attributor(g, r).attribute(torch.rand(1, *tiny_models.SHAPE))
    with pytest.raises(ValueError, match="at least|>= 3"):
        Attributor(g, r).fit(n=2)


def test_files_with_a_broken_one(fitted, test_images, tmp_path):
    generated, noise = test_images
    folder = tmp_path / "imgs"
    for i in range(3):
        save_image(noise[i], folder / f"noise{i}.png")
    save_image(generated[0], folder / "gen0.png")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (folder / "notes.txt").write_text("not an image, not listed")
    res = fitted.attribute([folder, tmp_path / "missing.png"])
    assert len(res) == 4
    assert [Path(p).name for p in res.paths] == ["gen0.png", "noise0.png", "noise1.png", "noise2.png"]
    assert res.belongs[1:].tolist() == [False, False, False]
    errs = dict((Path(p).name, m) for p, m in res.errors)
    assert set(errs) == {"broken.png", "missing.png"}
    assert "not found" in errs["missing.png"]
    records = res.to_records()
    assert len(records) == 6 and records[-1]["verdict"] == "error"
    assert "2 files could not be read" in res.summary()
    json.dumps(records, allow_nan=False)
    # only broken files: an empty result that still reports them
    only = fitted.attribute([folder / "broken.png"])
    assert len(only) == 0 and len(only.errors) == 1


def test_reference_with_another_native_shape(g, test_images, tmp_path):
    rgb = LatentGenerator(tiny_models.rgb_generator(), tiny_models.LATENT, name="rgb ref")
    att = Attributor(g, rgb, **FAST)
    att.fit(n=N_PROFILE, seed=0)
    generated, noise = test_images
    res = att.attribute(torch.cat([generated[:2], noise[:2]]))
    assert res.reference_reconstruction.shape == (4, 3, 12, 12)
    assert res.reconstruction.shape == (4, 1, 8, 8)
    assert res.notes[0] == "reference: grey->RGB, 8x8->12x12"
    assert res.belongs.tolist() == [True, True, False, False]
    # files are converted separately for each model, from the file itself
    save_image(torch.rand(3, 20, 30), tmp_path / "colour.png")
    res = att.attribute([tmp_path / "colour.png"])
    assert res.notes[0] == "RGB->grey, 30x20->8x8 (centre crop to 20x20), reference: 30x20->12x12 (centre crop to 20x20)"


def test_profile_images_are_rounded_like_saved_files(fitted, g, r, tmp_path):
    """A profile of 8-bit images accepts the model's own images read back from PNG files."""
    assert fitted.profile.image_bits == 8
    own = fitted.sample(4, seed=3, purpose="png")
    assert torch.equal(own, torch.round(own * 255) / 255)
    paths = []
    for i, img in enumerate(own):
        save_image(img, tmp_path / f"own{i}.png")
        paths.append(tmp_path / f"own{i}.png")
    res = fitted.attribute(paths)
    assert all(res.belongs)
    p = tmp_path / "p.json"
    fitted.profile.save(p)
    assert BelongingProfile.load(p).image_bits == 8
    assert Attributor.from_profile(p, g, r).image_bits == 8
    floats = Attributor(g, r, image_bits=None, **FAST)
    assert not torch.equal(floats.sample(4, seed=3), own)
    with pytest.raises(ValueError, match="image_bits"):
        Attributor(g, r, image_bits=0)


def test_edit_aware_profile(g, r, tmp_path):
    from ronan_fast.edits import apply_edit

    att = Attributor(g, r, steps=60, restarts=2)
    plain = att.fit(n=5, seed=3)
    jp = att.fit(n=5, seed=3, edit="jpeg50")
    assert plain.edit is None and jp.edit == "jpeg50" and att.profile is jp
    # the profile's images are the model's own images, edited, then inverted as any image is
    images = apply_edit(att.sample(5, 3, purpose="profile"), "jpeg50")
    raw = att._invert(g, images, None, None, "model").loss
    assert jp.raw_losses == pytest.approx(raw.double().tolist(), rel=1e-6)
    assert jp.raw_losses != plain.raw_losses
    assert BelongingProfile.load(jp.save(tmp_path / "jp.json")).edit == "jpeg50"
    with pytest.raises(ValueError, match="edit must be 'jpegQ'"):
        att.fit(n=5, edit="blur")


def test_tone_metric_attributes_tone_edited_images(fitted, g, r, test_images):
    """metric="mse-tone": the model's own images under a brightness / contrast change (not known
    to the profile) still belong; plain MSE rejects them; noise still does not belong."""
    generated, noise = test_images
    edited = (generated * 1.3 - 0.08).clamp(0, 1)
    assert fitted.attribute(edited).belongs.tolist() == [False] * 6
    # two starts leave one edited image (a fifth of its pixels clipped) in a local minimum; four do not
    att = Attributor(g, r, metric="mse-tone", steps=200, restarts=4)
    att.fit(n=N_PROFILE, seed=0)
    assert att.profile.metric == "mse-tone"
    res = att.attribute(torch.cat([edited, generated, noise]))
    assert res.belongs.tolist() == [True] * 12 + [False] * 6, res.loss
    with pytest.raises(ValueError, match="edit='tone' .* is for the metric 'mse-tone'.*with 'mse'"):
        fitted.fit(n=5, edit="tone")


def test_default_rule_follows_the_model_family(r):
    """One-step ("consistency") models default to the paper's rule, the others to the log rule;
    a rule given explicitly wins."""
    from ronan_fast import DEFAULT_RULE, default_rule
    from ronan_fast.adapters import LatentGenerator

    def made(family):
        return LatentGenerator(tiny_models.generator(), (3,), (-1.0, 1.0), family=family, name=family)

    assert DEFAULT_RULE == "grubbs-log"
    assert Attributor(made("gan"), r, **FAST).rule == "grubbs-log" == default_rule(made("vae"))
    assert Attributor(made("consistency"), r, **FAST).rule == "grubbs" == default_rule(made("consistency"))
    assert Attributor(made("consistency"), r, rule="grubbs-log", **FAST).rule == "grubbs-log"
    assert default_rule(object()) == DEFAULT_RULE  # an adapter without a family: a GAN's
    with pytest.raises(ValueError, match="rule must be one of .* or None"):
        Attributor(made("gan"), r, rule="log")


def test_fit_inverts_profile_outliers_again():
    """profile_retries: profile images that fail the test against the rest of the profile (a
    30-step single-start inversion leaves some in a worse basin) are inverted again from other
    starts; each keeps its lower loss, the others are untouched, and the profile records which."""
    from test_inversion import small_dcgan

    from ronan_fast.profile import profile_outliers

    g = LatentGenerator(small_dcgan(), 8, (-1, 1), name="small")
    kw = dict(settings="authors", steps=30, rule="grubbs", image_bits=None)
    plain = Attributor(g, None, profile_retries=0, **kw).fit(n=40, seed=0)
    first = profile_outliers(plain.calibrated_losses, "grubbs")
    assert first, "the short inversion should leave some profile image unconverged"
    again = Attributor(g, None, **kw).fit(n=40, seed=0)  # two rounds by default
    before, after = np.array(plain.raw_losses), np.array(again.raw_losses)
    assert again.retries == 2 and again.retried[: len(first)] == first
    untouched = np.setdiff1d(np.arange(40), again.retried)
    np.testing.assert_array_equal(after[untouched], before[untouched])
    assert (after <= before).all()
    assert (after[first] < 0.5 * before[first]).all(), (before[first], after[first])  # from other starts
    assert again.sigma < 0.5 * plain.sigma
    assert plain.retries is None and plain.retried is None
    with pytest.raises(ValueError, match="profile_retries must be an integer >= 0"):
        Attributor(g, None, profile_retries=-1)


class Interrupted(Exception):
    """Stands in for Ctrl-C or a killed job in the middle of an inversion."""


def test_fit_checkpoint_resumes_after_an_interruption(g, r, tmp_path, monkeypatch):
    """A fit with a checkpoint saves each finished part; interrupted and called again, it inverts
    only the parts not yet saved and ends with the profile an uninterrupted fit gives."""
    kw = dict(profile_retries=0, **FAST)
    whole = Attributor(g, r, **kw).fit(n=10, seed=3, checkpoint=tmp_path / "whole.json", checkpoint_every=4)
    plain = Attributor(g, r, **kw).fit(n=10, seed=3)
    assert whole.raw_losses == plain.raw_losses  # each image inverted as in one batch, bit for bit

    att = Attributor(g, r, **kw)
    calls, fail = [], [True]
    real_invert = Attributor._invert

    def failing(self, model, images, *args, **kwargs):
        calls.append((model is g, images.shape[0]))
        if fail[0] and len(calls) == 3:  # the second part's reference inversion
            fail[0] = False
            raise Interrupted
        return real_invert(self, model, images, *args, **kwargs)

    path = tmp_path / "part.json"
    monkeypatch.setattr(Attributor, "_invert", failing)
    with pytest.raises(Interrupted):
        att.fit(n=10, seed=3, checkpoint=path, checkpoint_every=4)
    saved = json.loads(path.read_text())
    assert list(saved["parts"]) == ["0"] and len(saved["parts"]["0"]["model"]) == 4
    calls.clear()
    resumed = att.fit(n=10, seed=3, checkpoint=path, checkpoint_every=4)
    assert calls == [(False, 4), (True, 4), (False, 2), (True, 2)]  # parts 2 and 3 only
    assert resumed.raw_losses == whole.raw_losses and resumed.reference_losses == whole.reference_losses
    calls.clear()
    assert att.fit(n=10, seed=3, checkpoint=path, checkpoint_every=4).raw_losses == whole.raw_losses
    assert calls == []  # every part saved: nothing inverted again
    monkeypatch.undo()

    with pytest.raises(ValueError, match="holds another profile job"):
        att.fit(n=10, seed=4, checkpoint=path, checkpoint_every=4)
    with pytest.raises(ValueError, match="holds another profile job"):
        att.fit(n=10, seed=3, checkpoint=path, checkpoint_every=5)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="not a readable checkpoint"):
        att.fit(n=10, seed=3, checkpoint=bad)
    with pytest.raises(ValueError, match="checkpoint_every must be an integer >= 1"):
        att.fit(n=10, checkpoint=path, checkpoint_every=0)
