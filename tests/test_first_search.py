"""The first search from each image's guess alone (InversionSettings.first_steps).

With a learned warm start and a belonging threshold, each image is first searched from its
guess alone; the images it leaves at or above their threshold get the full search and keep the
lower of the two losses. Checked against the two searches run by hand, for independence from
the images beside it, and for where it must not act (no threshold, no guess, a guess that is
itself a search).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from ronan_fast import warmstart as W
from ronan_fast.adapters import LatentGenerator
from ronan_fast.inversion import PRESETS, THRESHOLD_FIELDS, InversionSettings, invert
from ronan_fast.inversion.settings import FIRST_SETTLE_PATIENCE, LATER_FIELDS

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tiny_models import TinyGenerator  # noqa: E402

THRESHOLD = 2e-4
#: the full search: 4 starts (the guess and 3 screened draws) halved every 10 steps, a short polish;
#: the first search longer than it, so that some images end lower in the first and some in the full
FULL = PRESETS["authors"].replace(steps=12, restarts=4, schedule="cosine", min_lr_frac=0.01, halving_every=10,
                                  min_rows=2, check_every=10, polish_steps=3, screen=3, first_steps=40,
                                  settle_patience=6)


#: one torch thread for the whole module (conftest.py): the by-hand searches must match bit for bit
ONE_THREAD = True


@pytest.fixture(scope="module")
def trained():
    g = LatentGenerator(TinyGenerator(seed=0, latent=4, shape=(1, 8, 8)), 4, name="tiny0")
    return g, W.train_encoder(g, samples=512, steps=200, batch=32, lr=1e-2, width=8, hidden=32, image_steps=10,
                              seed=3)


def _images(g) -> torch.Tensor:
    """Six of the model's own 8-bit images and three random ones (which it cannot make)."""
    own = (g.generate(6, torch.Generator().manual_seed(7)).images * 255).round() / 255
    return torch.cat([own, torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(1))])


def _first_alone(s: InversionSettings) -> InversionSettings:
    """The first search's settings, as InversionSettings.first_steps documents them."""
    return s.replace(first_steps=0, restarts=1, screen=0, steps=s.first_steps, halving_every=0, polish_candidates=1,
                     settle_patience=min(s.settle_patience, FIRST_SETTLE_PATIENCE))


def test_first_steps_is_validated_new_and_acts_only_against_a_threshold():
    assert LATER_FIELDS["first_steps"] == 0 and "first_steps" in THRESHOLD_FIELDS
    assert "first_steps" not in InversionSettings().to_dict()
    assert InversionSettings().replace(first_steps=50).to_dict()["first_steps"] == 50
    assert InversionSettings.from_dict(InversionSettings().to_dict()).first_steps == 0
    for bad in (-1, 2.5, "50", True):
        with pytest.raises(ValueError, match="first_steps"):
            InversionSettings().replace(first_steps=bad)


def test_images_the_first_search_settles_keep_its_result_the_others_the_lower_of_both(trained):
    g, enc = trained
    warm = W.WarmStarted(g, enc)
    x = _images(g)
    got = invert(warm, x, settings=FULL, seed=5, stop_below=THRESHOLD)
    first = invert(warm, x, settings=_first_alone(FULL), seed=5, stop_below=THRESHOLD)
    settled = first.loss < THRESHOLD
    # both kinds are present, or the check below checks nothing
    assert 0 < int(settled.sum()) < x.shape[0]
    assert not bool(settled[6:].any())  # the random images are never settled by it
    assert torch.equal(got.loss[settled], first.loss[settled])
    assert torch.equal(got.inputs[settled], first.inputs[settled])
    assert torch.equal(got.row_steps[settled], first.row_steps[settled])
    rest = (~settled).nonzero().squeeze(1)
    full = invert(warm, x[rest], settings=FULL.replace(first_steps=0), seed=5, stop_below=THRESHOLD)
    assert torch.equal(got.loss[rest], torch.minimum(first.loss[rest], full.loss))
    lower = full.loss < first.loss[rest]
    assert bool(lower.any()) and not bool(lower.all())  # both ways, or the merge goes unchecked
    assert torch.equal(got.inputs[rest[lower]], full.inputs[lower])
    assert torch.equal(got.inputs[rest[~lower]], first.inputs[rest[~lower]])
    assert torch.equal(got.reconstruction[rest[lower]], full.reconstruction[lower])
    assert torch.equal(got.row_steps[rest], first.row_steps[rest] + full.row_steps)
    assert got.settings == FULL and got.settings.first_steps == 40
    assert bool(torch.isfinite(got.loss).all())


def test_each_image_gets_its_result_alone_or_in_company(trained):
    g, enc = trained
    warm = W.WarmStarted(g, enc)
    x = _images(g)
    whole = invert(warm, x, settings=FULL, seed=5, stop_below=THRESHOLD)
    for idx in (torch.tensor([7, 1]), torch.tensor([8, 0, 2, 6]), torch.tensor([3])):
        part = invert(warm, x[idx], settings=FULL, seed=5, stop_below=THRESHOLD)
        assert torch.equal(part.loss, whole.loss[idx])
        assert torch.equal(part.inputs, whole.inputs[idx])
    # per-image thresholds: an image with a threshold of 0 is settled by nothing and gets both searches
    sb = torch.full((x.shape[0],), THRESHOLD)
    sb[0] = 0.0
    per = invert(warm, x, settings=FULL, seed=5, stop_below=sb)
    assert torch.equal(per.loss[1:], whole.loss[1:])
    assert int(per.row_steps[0]) > int(whole.row_steps[0])


def test_progress_counts_every_image_once_in_order(trained):
    g, enc = trained
    seen: list[float] = []
    x = _images(g)
    invert(W.WarmStarted(g, enc), x, settings=FULL, seed=5, stop_below=THRESHOLD, progress=seen.append)
    assert seen and seen == sorted(seen) and seen[-1] == x.shape[0]


class _SearchingGuess:
    """The trained encoder presented as a start whose guess takes the threshold (as the mapping
    start's does: it searches with it itself)."""

    takes_threshold = True

    def __init__(self, enc):
        self.enc = enc

    def guess(self, images, stop_below=None):
        return self.enc.guess(images)

    def check(self, generator):
        self.enc.check(generator)

    def to(self, device):
        self.enc.to(device)
        return self


def test_no_first_search_without_a_threshold_a_guess_or_where_the_guess_searches(trained):
    g, enc = trained
    x = _images(g)
    plain = FULL.replace(first_steps=0)
    warm = W.WarmStarted(g, enc)
    for adapter, sb in ((warm, None), (g, THRESHOLD), (W.WarmStarted(g, _SearchingGuess(enc)), THRESHOLD)):
        with_first = invert(adapter, x, settings=FULL, seed=5, stop_below=sb)
        without = invert(adapter, x, settings=plain, seed=5, stop_below=sb)
        assert torch.equal(with_first.loss, without.loss)
        assert torch.equal(with_first.row_steps, without.row_steps)
    assert W.WarmStarted(g, _SearchingGuess(enc)).guess_searches and not warm.guess_searches


def test_rest_steps_shortens_the_full_search_of_the_images_the_first_leaves(trained):
    g, enc = trained
    warm = W.WarmStarted(g, enc)
    x = _images(g)
    s = FULL.replace(steps=20, halving_every=10, rest_steps=8, check_every=2)
    got = invert(warm, x, settings=s, seed=5, stop_below=THRESHOLD)
    first = invert(warm, x, settings=_first_alone(s).replace(rest_steps=0), seed=5, stop_below=THRESHOLD)
    rest = (first.loss >= THRESHOLD).nonzero().squeeze(1)
    assert rest.numel() > 0
    # 8 steps, halved every 10 * 8 / 20 = 4
    short = invert(warm, x[rest], settings=s.replace(first_steps=0, rest_steps=0, steps=8, halving_every=4), seed=5,
                   stop_below=THRESHOLD)
    assert torch.equal(got.loss[rest], torch.minimum(first.loss[rest], short.loss))
    assert torch.equal(got.row_steps[rest], first.row_steps[rest] + short.row_steps)
    # without a first search it changes nothing
    plain = s.replace(first_steps=0)
    assert torch.equal(invert(warm, x, settings=plain, seed=5, stop_below=THRESHOLD).loss,
                       invert(warm, x, settings=plain.replace(rest_steps=0), seed=5, stop_below=THRESHOLD).loss)
    assert "rest_steps" in THRESHOLD_FIELDS and LATER_FIELDS["rest_steps"] == 0
    with pytest.raises(ValueError, match="rest_steps"):
        InversionSettings().replace(rest_steps=-3)


def test_a_class_conditional_model_keeps_each_images_winning_class():
    """Class unknown: the first search has a guess in each class block; an image's reported
    class is the one of the search whose loss it keeps."""
    from ronan_fast.adapters import ConditionalGenerator
    from test_warmstart import TinyConditional

    g = ConditionalGenerator(TinyConditional(seed=0), (4,), num_classes=3, name="tinycond")
    enc = W.train_encoder(g, samples=256, steps=100, batch=32, lr=1e-2, width=4, hidden=16, image_steps=5, seed=1)
    warm = W.WarmStarted(g, enc)
    x = torch.cat([(g.generate(4, torch.Generator().manual_seed(3)).images * 255).round() / 255,
                   torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(2))])
    got = invert(warm, x, settings=FULL, seed=5, stop_below=THRESHOLD)
    first = invert(warm, x, settings=_first_alone(FULL), seed=5, stop_below=THRESHOLD)
    settled = first.loss < THRESHOLD
    rest = (~settled).nonzero().squeeze(1)
    assert 0 < rest.numel() < x.shape[0] and got.conditions is not None
    assert torch.equal(got.conditions[settled], first.conditions[settled])
    full = invert(warm, x[rest], settings=FULL.replace(first_steps=0), seed=5, stop_below=THRESHOLD)
    lower = full.loss < first.loss[rest]
    assert torch.equal(got.conditions[rest], torch.where(lower, full.conditions, first.conditions[rest]))
    assert torch.equal(got.loss[rest], torch.minimum(first.loss[rest], full.loss))
