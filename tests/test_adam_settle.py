"""The Adam phase's settle rule (InversionSettings.adam_settle_window).

With a belonging threshold, a row that has levelled off far above its image's threshold in the
second half of its schedule stops. Checked on the rule itself (which rows, when, against which
reference), end to end (random images stop sooner, a model's own images are untouched, an
image's result does not depend on the images beside it), and for where it must not act.
"""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from ronan_fast.adapters import LatentGenerator
from ronan_fast.inversion import PRESETS, THRESHOLD_FIELDS, InversionSettings, invert
from ronan_fast.inversion.presets import SEARCHED_GUESS_FIELDS, WARM_DEFAULTS, resolve_settings
from ronan_fast.inversion.settings import LATER_FIELDS
from ronan_fast.inversion.stopping import _levelled_off, rows_to_keep

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tiny_models import TinyGenerator  # noqa: E402

#: one torch thread for the whole module (conftest.py): runs with and without the rule compare bit for bit
ONE_THREAD = True

THRESHOLD = 2e-4
S = PRESETS["authors"].replace(steps=60, restarts=3, schedule="cosine", min_lr_frac=0.01, check_every=10,
                               polish_steps=3, adam_settle_window=10)


def _batch(t, best, ref, stop_below, index=None):
    """A stand-in for the rule's view of a RowBatch: steps done, best losses, references, thresholds."""
    n = len(t)
    index = torch.arange(n) if index is None else torch.tensor(index)
    return SimpleNamespace(t=torch.tensor(t), best_loss=torch.tensor(best), settle_ref=torch.tensor(ref),
                           index=index, problem=SimpleNamespace(stop_below=torch.tensor(stop_below)))


def test_the_rule_stops_rows_levelled_off_far_above_the_threshold_in_the_second_half_only():
    s = InversionSettings(steps=300, check_every=25, adam_settle_window=50)
    inf = float("inf")
    # rows: 0 flat at 100x (stops); 1 the same before the midpoint (goes on); 2 flat but at 10x (goes
    # on); 3 at 100x falling 6% (goes on); 4 flat at 100x off a window boundary (goes on); 5 flat at
    # 100x with no reference yet (goes on); 6 flat at 100x of image 0's threshold, its own 10x lower
    b = _batch([150, 100, 200, 250, 175, 150, 150], [1e-2, 1e-2, 1e-3, 9.4e-3, 1e-2, 1e-2, 1e-2],
               [1.02e-2, 1.02e-2, 1.02e-3, 1e-2, 1.02e-2, inf, 1.02e-2], [1e-4] * 6 + [1e-3])
    due = torch.ones(7, dtype=torch.bool)
    got = _levelled_off(b, s, due)
    assert got.tolist() == [True, False, False, False, False, False, False]
    # the references move to the best losses at the window boundaries only
    assert b.settle_ref.tolist() == pytest.approx([1e-2, 1e-2, 1e-3, 9.4e-3, 1.02e-2, 1e-2, 1e-2])
    # a row between its checks is not judged, nor its reference moved
    b = _batch([150], [1e-2], [1.02e-2], [1e-4])
    assert not bool(_levelled_off(b, s, torch.zeros(1, dtype=torch.bool)).any())
    assert b.settle_ref.tolist() == pytest.approx([1.02e-2])
    # the drop is judged against min_drop, the level against settle_above
    for change, stops in ((dict(adam_settle_min_drop=0.01), False), (dict(adam_settle_above=200.0), False),
                          (dict(adam_settle_min_drop=0.5), True)):
        b = _batch([150], [1e-2], [1.5e-2], [1e-4])
        assert _levelled_off(b, s.replace(**change), torch.ones(1, dtype=torch.bool)).tolist() == [stops], change


def test_the_rule_acts_only_when_on_and_given_a_threshold(monkeypatch):
    import ronan_fast.inversion.stopping as stopping

    calls = []
    real = stopping._levelled_off
    monkeypatch.setattr(stopping, "_levelled_off", lambda *a: calls.append(1) or real(*a))

    def batch(stop):  # a row flat at 100x its threshold, at a window boundary in the second half
        b = _batch([150], [1e-2], [1e-2], [1e-4])
        b.stop, b.z, b.problem.b = stop, torch.zeros(1, 2), 1
        return b

    s = InversionSettings(steps=300, check_every=25, halving_every=0, patience=0)
    assert rows_to_keep(batch(torch.tensor([1e-4])), s, False).tolist() == [True]  # off
    assert rows_to_keep(batch(None), s.replace(adam_settle_window=50), False).tolist() == [True]  # no threshold
    assert not calls
    assert rows_to_keep(batch(torch.tensor([1e-4])), s.replace(adam_settle_window=50), False).tolist() == [False]
    assert calls


@pytest.fixture(scope="module")
def gen():
    return LatentGenerator(TinyGenerator(seed=0, latent=4, shape=(1, 8, 8)), 4, name="tiny0")


def _images(g) -> torch.Tensor:
    """Four of the model's own images and three random ones (which it cannot make)."""
    own = g.generate(4, torch.Generator().manual_seed(7)).images
    return torch.cat([own, torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(1))])


def test_random_images_stop_sooner_own_images_are_untouched_and_each_image_stands_alone(gen):
    x = _images(gen)
    off = invert(gen, x, settings=S.replace(adam_settle_window=0), seed=3, stop_below=THRESHOLD)
    on = invert(gen, x, settings=S, seed=3, stop_below=THRESHOLD)
    assert bool((off.loss[:4] < THRESHOLD).all())  # the own images converge, in their basin all along
    for k in ("loss", "inputs", "row_steps"):
        assert torch.equal(getattr(on, k)[:4], getattr(off, k)[:4]), k
    # the random images leave the Adam phase sooner (then polished as before), far above the line
    assert bool((on.row_steps[4:] < off.row_steps[4:]).all()), (on.row_steps, off.row_steps)
    assert bool((on.loss[4:] > 20 * THRESHOLD).all())
    torch.testing.assert_close(on.loss[4:], off.loss[4:], rtol=0.05, atol=0)
    direct = (on.reconstruction[4:] - x[4:]).square().flatten(1).mean(1)
    torch.testing.assert_close(on.loss[4:], direct, rtol=1e-4, atol=1e-9)
    # each image's result is its own: alone as in company
    for k in (0, 5):
        alone = invert(gen, x[k : k + 1], settings=S, seed=3, stop_below=THRESHOLD)
        assert torch.equal(alone.loss, on.loss[k : k + 1]) and torch.equal(alone.row_steps, on.row_steps[k : k + 1])
    # per-image thresholds: a random image whose threshold is near its loss is not let go by the rule
    near = torch.full((7,), THRESHOLD)
    near[4] = float(off.loss[4]) / 10
    mixed = invert(gen, x, settings=S, seed=3, stop_below=near)
    assert int(mixed.row_steps[4]) == int(off.row_steps[4]) and int(mixed.row_steps[5]) == int(on.row_steps[5])
    # without a threshold the rule is ignored
    plain_on, plain_off = invert(gen, x, settings=S, seed=3), invert(gen, x, settings=S.replace(adam_settle_window=0),
                                                                      seed=3)
    assert torch.equal(plain_on.loss, plain_off.loss) and torch.equal(plain_on.row_steps, plain_off.row_steps)


def test_the_fields_are_validated_new_and_threshold_only():
    for k, v in (("adam_settle_window", 0), ("adam_settle_min_drop", 0.05), ("adam_settle_above", 30.0)):
        assert LATER_FIELDS[k] == v and k in THRESHOLD_FIELDS and k not in InversionSettings().to_dict()
    s = InversionSettings(adam_settle_window=50)
    assert s.to_dict()["adam_settle_window"] == 50 and InversionSettings.from_dict(s.to_dict()) == s
    assert s.without_threshold_rules().adam_settle_window == 0
    assert "adam_settle_window" not in PRESETS["authors"].to_dict()
    for bad, match in ((dict(adam_settle_window=-25), "adam_settle_window"),
                       (dict(adam_settle_window=30), "multiple of check_every"),
                       (dict(adam_settle_window=True), "adam_settle_window"),
                       (dict(adam_settle_min_drop=0.0), "adam_settle_min_drop"),
                       (dict(adam_settle_min_drop=1.0), "adam_settle_min_drop"),
                       (dict(adam_settle_above=1.0), "adam_settle_above"),
                       (dict(adam_settle_above=float("inf")), "adam_settle_above")):
        with pytest.raises(ValueError, match=match):
            InversionSettings(**bad)


def test_the_warm_gan_default_has_it_the_mapping_start_the_conditional_and_the_vae_not():
    assert WARM_DEFAULTS["gan"].adam_settle_window == 50
    assert WARM_DEFAULTS["conditional"].adam_settle_window == 0 and WARM_DEFAULTS["vae"].adam_settle_window == 0
    guided = SimpleNamespace(family="gan", guided_starts=True, guess_searches=False)
    assert resolve_settings(guided) == WARM_DEFAULTS["gan"]
    mapped = SimpleNamespace(family="gan", guided_starts=True, guess_searches=True)
    # the mapping start's search over z: as it was measured, without the rule and with the GAN
    # family's escalation (2 more polished rows), not the warm default's 4
    assert resolve_settings(mapped) == WARM_DEFAULTS["gan"].replace(adam_settle_window=0, polish_escalate=2)
    assert resolve_settings(mapped) == WARM_DEFAULTS["gan"].replace(**SEARCHED_GUESS_FIELDS)
    # the real thing: a StyleGAN-style generator started through its mapping network
    from ronan_fast.mapping_start import mapping_start
    from ronan_fast.models.stylegan import StyleGenerator
    from ronan_fast.warmstart import WarmStarted

    with torch.random.fork_rng():
        torch.manual_seed(0)
        module = StyleGenerator(nz=16, w_dim=8, n_mlp=2, base=16, min_ch=8, channels=1, size=16)
    style = LatentGenerator(module, (16,), output_range=(-1, 1), name="style0")
    got = resolve_settings(WarmStarted(style, mapping_start(style)))
    assert got.adam_settle_window == 0 and got.polish_escalate == 2
    # a user's own settings are the user's
    assert resolve_settings(mapped, InversionSettings(adam_settle_window=50)).adam_settle_window == 50
