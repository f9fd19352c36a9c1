"""Learned warm starts (ronan_fast.warmstart) and screened starts (InversionSettings.screen).

The encoder round-trips through safetensors and is refused for another generator; the starts it
gives are the encoder's guess in the first row of each block and the image's own random draws
elsewhere, deterministic per image and independent of the batch; screening keeps the
lowest-loss candidates of each block (and a guided first start); and both keep an image's
inversion independent of the images beside it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from ronan_fast import warmstart as W
from ronan_fast.adapters import ConditionalGenerator, LatentGenerator
from ronan_fast.inversion import PRESETS, InversionSettings, invert
from ronan_fast.inversion.calls import FixedShapeCalls
from ronan_fast.inversion.problem import Loss, Problem
from ronan_fast.inversion.settings import LATER_FIELDS
from ronan_fast.inversion.starts import image_seed, row_latents, start_latents

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tiny_models import TinyGenerator  # noqa: E402


class TinyConditional(nn.Module):
    """``(z [N, 4], class [N]) -> [N, 1, 8, 8]``: a tiny class-conditional generator."""

    def __init__(self, seed: int = 0, classes: int = 3):
        super().__init__()
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            self.num_classes = classes
            self.emb = nn.Embedding(classes, 64)
            self.fc = nn.Linear(4, 64)

    def forward(self, z, c):
        return torch.tanh(self.fc(z) + self.emb(c)).view(-1, 1, 8, 8)


def _adapter(seed: int = 0) -> LatentGenerator:
    return LatentGenerator(TinyGenerator(seed=seed, latent=4, shape=(1, 8, 8)), 4, name=f"tiny{seed}")


@pytest.fixture(scope="module")
def trained():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        g = _adapter()
        enc = W.train_encoder(g, samples=512, steps=200, batch=32, lr=1e-2, width=8, hidden=32, image_steps=10, seed=3)
        yield g, enc
    finally:
        torch.set_num_threads(threads)


def _images(g, n: int, seed: int = 7) -> torch.Tensor:
    return (g.generate(n, torch.Generator().manual_seed(seed)).images * 255).round() / 255


def test_training_learns_something_and_records_its_cost(trained):
    g, enc = trained
    x = g.generate(64, torch.Generator().manual_seed(11))
    guess = enc.guess((x.images * 255).round() / 255)
    err = (guess - x.latents).square().mean()
    assert err < 0.8 * x.latents.square().mean()  # better than guessing 0 (the prior's mean)
    assert enc.cost["samples"] == 512 and enc.cost["generator_calls"] == 512 + 10 * 32
    assert enc.cost["train_s"] >= enc.cost["generate_s"] > 0
    assert enc.fingerprint == g.fingerprint()
    assert enc.recipe["steps"] == 200 and enc.recipe["image_steps"] == 10


def test_encoder_round_trips_through_safetensors(trained, tmp_path):
    g, enc = trained
    path = enc.save(tmp_path / "m.encoder.safetensors")
    back = W.load_encoder(path, g)
    x = _images(g, 5)
    assert torch.equal(back.guess(x), enc.guess(x))
    assert back.fingerprint == enc.fingerprint and back.recipe == enc.recipe and back.cost == enc.cost
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        assert f.metadata()["fingerprint"] == g.fingerprint()
        assert f.metadata()["format"] == W.FORMAT
    assert path.read_bytes()[:8] != b"\x80\x04\x95"  # not a pickle


def test_encoder_is_refused_for_another_generator(trained, tmp_path):
    g, enc = trained
    path = enc.save(tmp_path / "m.encoder.safetensors")
    other = _adapter(seed=5)  # same shapes, other weights
    with pytest.raises(W.EncoderMismatchError, match="trained for the generator with fingerprint"):
        W.load_encoder(path, other)
    with pytest.raises(W.EncoderMismatchError):
        W.WarmStarted(other, enc)
    wider = LatentGenerator(TinyGenerator(seed=0, latent=6, shape=(1, 8, 8)), 6, name="wide")
    with pytest.raises(W.EncoderMismatchError, match="6-wide"):
        W.load_encoder(path, wider)


def test_files_that_are_not_encoders_are_refused(tmp_path):
    from safetensors.torch import save_file

    junk = tmp_path / "junk.encoder.safetensors"
    junk.write_bytes(b"not a safetensors file at all")
    with pytest.raises(W.EncoderError, match="not a readable safetensors"):
        W.load_encoder(junk)
    weights = tmp_path / "weights.safetensors"
    save_file({"w": torch.zeros(2)}, str(weights), metadata={"format": "something else"})
    with pytest.raises(W.EncoderError, match="not a ronan_fast encoder"):
        W.load_encoder(weights)
    with pytest.raises(W.EncoderError, match="no encoder file"):
        W.load_encoder(tmp_path / "missing.safetensors")
    with pytest.raises(W.EncoderError, match="steps"):
        W.train_encoder(_adapter(), steps=0)


def test_encoder_path_sits_beside_the_profile(tmp_path):
    assert W.encoder_path(tmp_path / "model.json") == tmp_path / "model.encoder.safetensors"
    assert W.encoder_path("p/model.profile") == W.encoder_path("p/model.profile")
    assert W.encoder_path("p/model.profile").name == "model.profile.encoder.safetensors"


def test_warm_starts_are_the_guess_then_the_images_own_draws(trained):
    g, enc = trained
    warm = W.WarmStarted(g, enc)
    assert warm.fingerprint() == g.fingerprint() and warm.latent_dim == g.latent_dim
    x = _images(g, 4)
    rows = row_latents(warm, x, 3, seed=2).view(4, 3, -1)
    plain = row_latents(g, x, 3, seed=2).view(4, 3, -1)
    assert torch.equal(rows[:, 0], enc.guess(x))
    assert torch.equal(rows[:, 1:], plain[:, 1:])  # random starts remain, as without the encoder
    # per image, whatever the batch: each image alone, and in another order
    for k in range(4):
        assert torch.equal(row_latents(warm, x[k : k + 1], 3, seed=2), rows[k])
    perm = torch.tensor([2, 0, 3, 1])
    assert torch.equal(row_latents(warm, x[perm], 3, seed=2).view(4, 3, -1), rows[perm])


def test_conditional_search_gets_a_guess_in_each_class_block():
    module = TinyConditional(seed=0)
    g = ConditionalGenerator(module, (4,), num_classes=3, name="tinycond")
    enc = W.train_encoder(g, samples=64, steps=3, batch=16, width=4, hidden=16)
    warm = W.WarmStarted(g, enc)
    x = _images(g, 2)
    rows = row_latents(warm, x, 3 * 2, seed=1).view(2, 3, 2, -1)  # 3 classes x 2 starts
    guess = enc.guess(x)
    for c in range(3):
        assert torch.equal(rows[:, c, 0], guess)
    plain = row_latents(g, x, 6, seed=1).view(2, 3, 2, -1)
    assert torch.equal(rows[:, :, 1], plain[:, :, 1])


def _problem(g, images, s):
    calls = FixedShapeCalls(g, 8)
    return Problem.build(calls, images, None, s, Loss.named("mse"), None, "reference")


def test_screening_keeps_the_lowest_loss_candidates(trained):
    g, _ = trained
    x = _images(g, 3)
    s = PRESETS["authors"].replace(restarts=3, screen=5)
    z = start_latents(_problem(g, x, s), seed=4).view(3, 3, -1)
    for k in range(3):
        cand = row_latents(g, x[k : k + 1], 15, seed=4)
        with torch.no_grad():
            loss = (g.decode(cand) - x[k : k + 1]).square().flatten(1).mean(1)
        best = cand[loss.argsort()[:3]]
        torch.testing.assert_close(z[k], best, rtol=0, atol=0)
        worst_kept = (g.decode(z[k]) - x[k : k + 1]).square().flatten(1).mean(1).max()
        assert int((loss < worst_kept).sum()) <= 2  # nothing left out was better than what was kept


def test_screening_keeps_a_guided_first_start(trained):
    g, enc = trained
    warm = W.WarmStarted(g, enc)
    x = _images(g, 2)
    s = PRESETS["authors"].replace(restarts=3, screen=4)
    z = start_latents(_problem(warm, x, s), seed=4).view(2, 3, -1)
    assert torch.equal(z[:, 0], enc.guess(x))
    for k in range(2):
        cand = row_latents(warm, x[k : k + 1], 12, seed=4)
        with torch.no_grad():
            loss = (g.decode(cand[1:]) - x[k : k + 1]).square().flatten(1).mean(1)
        torch.testing.assert_close(z[k, 1:], cand[1:][loss.argsort()[:2]], rtol=0, atol=0)
    off = start_latents(_problem(warm, x, s.replace(screen=0)), seed=4)
    assert torch.equal(off, row_latents(warm, x, 3, seed=4))


def test_each_image_gets_its_bits_alone_or_in_company(trained):
    g, enc = trained
    warm = W.WarmStarted(g, enc)
    x = torch.cat([_images(g, 3), torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(1))])
    s = PRESETS["authors"].replace(steps=40, restarts=4, schedule="cosine", min_lr_frac=0.01, halving_every=10,
                                   min_rows=2, check_every=10, polish_steps=2, screen=3)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        whole = invert(warm, x, settings=s, seed=5, stop_below=1e-4)
        for idx in (torch.tensor([3, 1]), torch.tensor([4, 0, 2])):
            part = invert(warm, x[idx], settings=s, seed=5, stop_below=1e-4)
            assert torch.equal(part.loss, whole.loss[idx])
            assert torch.equal(part.inputs, whole.inputs[idx])
    finally:
        torch.set_num_threads(threads)


def test_screen_setting_is_validated_and_new():
    assert LATER_FIELDS["screen"] == 0
    assert "screen" not in InversionSettings().replace(screen=0).to_dict()
    assert InversionSettings().replace(screen=8).to_dict()["screen"] == 8
    for bad in (-1, 1.5, "4"):
        with pytest.raises(ValueError, match="screen"):
            InversionSettings().replace(screen=bad)


def test_image_seed_is_what_the_starts_hang_on():
    a = torch.zeros(1, 8, 8)
    b = a.clone()
    b[0, 0, 0] = 1 / 255
    assert image_seed(a, 0) != image_seed(b, 0) and image_seed(a, 0) == image_seed(a.clone(), 0)


# ---------------------------------------------------------------------------- with a profile


def _attributor(g, enc, **kw):
    from ronan_fast import Attributor

    return Attributor(g, None, steps=40, restarts=2, halving_every=0, polish_steps=0, profile_retries=0,
                      warm_start=enc, **kw)


def test_profile_records_the_encoder_and_refuses_another(trained, tmp_path):
    """A warm-started profile records the encoder's digest; Attributor.from_profile reads the
    encoder from beside the profile file, and a missing or other encoder is refused by name."""
    import warnings

    from ronan_fast import Attributor
    from ronan_fast.profile import ProfileError, ProfileMismatchError

    g, enc = trained
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a small profile
        prof = _attributor(g, enc).fit(n=6, seed=1)
    assert prof.warm_start["sha256"] == enc.digest() and prof.warm_start["recipe"]["steps"] == 200
    path = prof.save(tmp_path / "m.json")
    with pytest.raises(ProfileError, match="m.encoder.safetensors"):
        Attributor.from_profile(path, g, None)  # the encoder file is not there yet
    enc.save(W.encoder_path(path))
    att = Attributor.from_profile(path, g, None)
    assert att.warm_start.digest() == enc.digest()
    x = _images(g, 3, seed=9)
    again = _attributor(g, enc)
    again.use_profile(prof)
    assert torch.equal(att.attribute(x).loss, again.attribute(x).loss)
    with pytest.raises(ProfileMismatchError, match="no encoder was given"):
        Attributor.from_profile(prof, g, None, warm_start=None)
    other = W.train_encoder(g, samples=64, steps=5, batch=16, width=8, hidden=16, image_steps=0, seed=4)
    with pytest.raises(ProfileMismatchError, match="the encoder differs"):
        Attributor.from_profile(prof, g, None, warm_start=other)
    other.save(W.encoder_path(path))
    with pytest.raises(ProfileError, match="not the encoder the profile was fitted with"):
        Attributor.from_profile(path, g, None)
    plain = dict(prof.to_dict())
    del plain["warm_start"]
    from ronan_fast.profile import BelongingProfile

    with pytest.raises(ProfileMismatchError, match="random starts only"):
        Attributor.from_profile(BelongingProfile.from_dict(plain), g, None, warm_start=enc)
    with pytest.raises(TypeError, match="warm_start must be"):
        _attributor(g, "encoder.safetensors")


def test_warm_started_profile_changes_the_models_starts_only(trained):
    """The encoder changes where the model's inversions begin; with it, each image's first row
    starts at its guess, so the model's own images start far lower than from random draws."""
    g, enc = trained
    x = _images(g, 8, seed=11)
    z0 = W.WarmStarted(g, enc).initial_latents(x, 2, None)[::2]
    guess = (g.to_unit(g.decode_raw(z0)) - x).square().flatten(1).mean(1)
    drawn = (g.to_unit(g.decode_raw(g.sample_latents(8, torch.Generator().manual_seed(0)))) - x
             ).square().flatten(1).mean(1)
    assert float(guess.median()) < 0.5 * float(drawn.median())


def test_cli_profile_warm_start_trains_saves_and_inspect_uses_it(tmp_path, monkeypatch, capsys):
    """profile --warm-start trains the encoder once, saves it beside the profile and reuses it on
    a rerun; inspect finds it there, and refuses the profile once the file is gone."""
    from ronan_fast.cli import main

    monkeypatch.chdir(tmp_path)
    args = ["profile", "--model", "default", "-n", "4", "--steps", "20", "--restarts", "2", "--retries", "0",
            "--warm-start", "--encoder-samples", "256", "--encoder-steps", "20", "-q", "-o", "p.json"]
    assert main(args) == 0
    enc_file = tmp_path / "p.encoder.safetensors"
    assert enc_file.is_file()
    assert json.loads((tmp_path / "p.json").read_text())["warm_start"]["recipe"]["samples"] == 256
    stamp = enc_file.stat().st_mtime_ns
    assert main(args) == 0
    assert enc_file.stat().st_mtime_ns == stamp  # reused, not trained again
    from ronan_fast.attributor import Attributor
    from ronan_fast.calibration import default_generator

    from ronan_fast.imageio import save_image

    att = Attributor(default_generator(), None)

    for i, img in enumerate(att.sample(2, seed=5)):
        save_image(img, tmp_path / f"own{i}.png")
    assert main(["inspect", "--profile", "p.json", "--model", "default", "own0.png", "own1.png", "-q",
                 "-o", "r.jsonl"]) == 0
    enc_file.unlink()
    assert main(["inspect", "--profile", "p.json", "--model", "default", "own0.png", "-q", "-o", "r2.jsonl"]) == 2
    assert "p.encoder.safetensors" in capsys.readouterr().err


def test_a_warm_start_brings_its_familys_lean_default(trained):
    """With an encoder and no settings, a GAN is inverted with WARM_DEFAULTS['gan'] (4 starts,
    screened, 300 steps); settings given explicitly are kept; a family without a warm default
    keeps its own."""
    from ronan_fast import Attributor
    from ronan_fast.inversion import FAMILY_DEFAULTS, resolve_settings
    from ronan_fast.inversion.presets import WARM_DEFAULTS

    g, enc = trained
    assert Attributor(g, None, warm_start=enc).settings == WARM_DEFAULTS["gan"]
    assert Attributor(g, None).settings == FAMILY_DEFAULTS["gan"]
    assert Attributor(g, None, warm_start=enc, settings="authors").settings == PRESETS["authors"]
    assert Attributor(g, None, warm_start=enc, steps=50).settings == WARM_DEFAULTS["gan"].replace(steps=50)
    assert WARM_DEFAULTS["gan"].restarts == 4 and WARM_DEFAULTS["gan"].screen == 8
    assert WARM_DEFAULTS["gan"].first_steps == 50 and WARM_DEFAULTS["conditional"].first_steps == 50
    assert WARM_DEFAULTS["vae"].first_steps == 0
    # an image left within 4x of its threshold has every one of its 4 rows polished
    assert WARM_DEFAULTS["gan"].polish_escalate == 4 and FAMILY_DEFAULTS["gan"].polish_escalate == 2
    assert WARM_DEFAULTS["conditional"].polish_escalate == 8
    assert resolve_settings(W.WarmStarted(g, enc), None) == WARM_DEFAULTS["gan"]
    one_step = W.WarmStarted(g, enc)
    one_step.base.family = "consistency"
    try:
        assert resolve_settings(one_step, None) == FAMILY_DEFAULTS["consistency"]
    finally:
        one_step.base.family = "gan"
