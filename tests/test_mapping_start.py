"""Starts through a mapping network (ronan_fast.mapping_start) for StyleGAN-style generators.

The start is checked against the generator it was made for (fingerprint, and synthesis(mapping(z))
against the generator's own output), is the same for an image alone or in a batch, lands the
model's own images far closer than prior draws, and a profile fitted with it records it and
rebuilds it from the generator alone.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from ronan_fast.adapters import LatentGenerator
from ronan_fast.inversion import InversionSettings, invert
from ronan_fast.mapping_start import W_ENCODER_RECIPE, MappingStart, mapping_start, train_w_encoder
from ronan_fast.models.stylegan import StyleGenerator
from ronan_fast.warmstart import EncoderError, EncoderMismatchError, WarmStarted

FAST_W = InversionSettings(steps=60, lr=0.1, restarts=4, halving_every=20, polish_steps=0, polish_escalate=0,
                           settle_patience=0)


#: one torch thread for this module's tests (tests/conftest.py)
ONE_THREAD = True


def _style(seed: int = 0, w_dim: int = 8) -> LatentGenerator:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        module = StyleGenerator(nz=16, w_dim=w_dim, n_mlp=2, base=16, min_ch=8, channels=1, size=16)
    return LatentGenerator(module, (16,), output_range=(-1, 1), name=f"style{seed}")


def _own(g, n: int, seed: int = 7) -> torch.Tensor:
    return (g.generate(n, torch.Generator().manual_seed(seed)).images * 255).round() / 255


def _mse(g, z, x):
    with torch.no_grad():
        return (g.decode(z) - x).square().flatten(1).mean(1)


def test_the_guess_lands_own_images_far_closer_than_prior_draws():
    g = _style()
    ms = mapping_start(g, w_settings=FAST_W, mapping_steps=100)
    x = _own(g, 4)
    guess = _mse(g, ms.guess(x), x)
    drawn = _mse(g, g.sample_latents(4, torch.Generator().manual_seed(0)), x)
    assert torch.isfinite(guess).all()
    assert float(guess.median()) < 0.2 * float(drawn.median())


def test_the_solve_for_z_reaches_a_w_that_mapping_makes():
    # w = mapping(z0) of fresh prior draws: some z maps onto it exactly, and the solve (Adam, then
    # Levenberg-Marquardt steps whose Jacobian is taken for all rows at once) must find one to far
    # under the error Adam alone leaves
    g = _style()
    ms = mapping_start(g)
    # fixed draws: from some targets the solve ends in another basin (one fresh draw ended at a
    # relative squared error of 1.0e-6), so fresh draws would make the test fail by chance
    seed = 0
    z0 = g.sample_latents(3, torch.Generator().manual_seed(seed))
    with torch.no_grad():
        w = ms._map(z0)
    for k in range(3):
        z = ms._solve_mapping(w[k], torch.Generator().manual_seed(seed + k + 1))
        with torch.no_grad():
            err = float((ms._map(z[None]) - w[k : k + 1]).square().sum() / w[k].square().sum())
        assert err < 1e-8, f"seed {seed}, row {k}: relative squared error {err:.3g}"


def _reference_metric(ms, w: torch.Tensor) -> torch.Tensor:
    """J^T J + ridge in float64: J the synthesis' Jacobian at w, by reverse mode, one output at a time."""
    from ronan_fast.mapping_start import IMAGE_METRIC_RIDGE

    syn = ms.w_generator.module.double()
    try:
        jac = torch.autograd.functional.jacobian(lambda q: syn(q[None]).flatten(), w.double())
    finally:
        syn.float()
    h = jac.T @ jac
    return h + IMAGE_METRIC_RIDGE * h.diagonal().mean() * torch.eye(h.shape[0], dtype=h.dtype)


#: how near LeakyReLU's kink (relative to the largest pre-activation of its layer) a draw's
#: pre-activations may come: float32 rounds a pre-activation by about 1e-7 of its layer's scale
KINK_MARGIN = 1e-5


def _clear_of_the_kinks(monkeypatch, ms, n: int) -> tuple[int, torch.Tensor]:
    """A fresh seed and ``n`` rows of ``w = mapping(z)`` none of whose synthesis pre-activations
    lies within :data:`KINK_MARGIN` of LeakyReLU's kink (in float64). The Jacobian jumps there,
    so float32 and float64 can take different sides of it and differ by far more than their
    arithmetic (seed 3672336441, row 0: a pre-activation 5e-8 from it, 5.5e-4 relative in
    J^T J, plain float32 reverse mode as much as the metric; over 300 fresh single rows, 74
    came within the margin, and the rest agreed to 1.9e-6)."""
    import os

    import ronan_fast.models.stylegan as sg

    real, nearest = sg._lrelu, []

    def watch(x):
        nearest.append(float((x.abs().min() / x.abs().max().clamp_min(1e-300))))
        return real(x)

    syn = ms.w_generator.module
    for _ in range(50):
        seed = int.from_bytes(os.urandom(4), "little")
        with torch.no_grad():  # (mapping's layers use _lrelu too: watched only in synthesis)
            w = ms._map(ms.generator.sample_latents(n, torch.Generator().manual_seed(seed)))
        nearest.clear()
        monkeypatch.setattr(sg, "_lrelu", watch)
        syn.double()
        try:
            with torch.no_grad():
                for k in range(n):  # a row at a time: each layer's largest pre-activation is that row's
                    syn(w[k : k + 1].double())
        finally:
            syn.float()
            monkeypatch.setattr(sg, "_lrelu", real)
        if min(nearest) > KINK_MARGIN:
            return seed, w
    raise AssertionError("50 fresh draws all came within KINK_MARGIN of a kink")


@pytest.mark.parametrize("blocked", [False, True])
def test_the_image_metric_is_the_synthesis_jacobians_gram_matrix(monkeypatch, blocked):
    import ronan_fast.mapping_start as msm

    g = _style()
    ms = mapping_start(g)
    if blocked:  # J^T J built 3 columns at a time by vector-Jacobian products, as for a large image
        monkeypatch.setattr(msm, "METRIC_CHUNK_ELEMENTS", 3 * math.prod(g.image_shape))
    seed, w = _clear_of_the_kinks(monkeypatch, ms, 2)
    for k in range(2):
        chol = ms._image_metric(w[k])
        got = chol.double() @ chol.double().T
        ref = _reference_metric(ms, w[k])
        assert torch.isfinite(got).all()
        err = float((got - ref).abs().max() / ref.abs().max())
        assert err < 1e-5, f"seed {seed}, row {k}: relative error {err:.3g}"
    assert ms._image_metric(torch.full_like(w[0], float("nan"))) is None  # Cholesky refuses it: Euclidean


def test_the_image_metric_built_a_few_columns_at_a_time_is_the_same(monkeypatch):
    """On CPU the whole Jacobian is built in blocks of at most DENSE_CPU_COLUMNS forward-mode
    passes (faster than all at once): the same metric as in one block, to float32 rounding (a
    convolution over another number of tangents may sum in another order)."""
    from ronan_fast.inversion.polish import dense

    ms = mapping_start(_style())
    w = ms._map(ms.generator.sample_latents(2, torch.Generator().manual_seed(int.from_bytes(
        __import__("os").urandom(4), "little"))))
    whole = [ms._image_metric(w[k]) for k in range(2)]
    assert ms.w_dim > 5
    monkeypatch.setattr(dense, "DENSE_CPU_COLUMNS", 5)  # 5 columns a block, the last one short
    for k in range(2):
        got = ms._image_metric(w[k])
        assert torch.isfinite(got).all()
        err = float((got - whole[k]).abs().max() / whole[k].abs().max())
        assert err < 1e-6, f"row {k}: relative difference {err:.3g}"


def _off_range(ms, n: int, noise: float):
    """A fresh seed, ``n`` rows of ``w`` a little off what ``mapping`` makes (``noise`` times
    their spread; as the search over ``w`` ends), and the images ``synthesis`` makes of them."""
    seed = int.from_bytes(__import__("os").urandom(4), "little")
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        w = ms._map(ms.generator.sample_latents(n, gen))
        w = w + noise * w.std() * torch.randn(w.shape, generator=gen)
        return seed, w, ms.w_generator.decode(w)


def test_the_image_metric_solve_lands_closer_in_the_image_than_the_euclidean_one():
    # a w* a little off what mapping reaches (as the search over w ends): the z whose w is closest
    # is not the one whose image is closest
    g = _style()
    ms_img, ms_w = mapping_start(g), mapping_start(g, solve_metric="w")
    seed, w, target = _off_range(ms_img, 6, 0.05)
    losses = {}
    for name, ms in (("image", ms_img), ("w", ms_w)):
        out = []
        for k in range(6):
            z = ms._solve_for(w[k], torch.Generator().manual_seed(seed + k))
            out.append(float(_mse(g, z[None], target[k : k + 1])))
        losses[name] = torch.tensor(out)
    # in total over the rows: where both solves reach w* exactly (it lies in what mapping makes), both are exact
    # (over 50 seeds the image metric's total was 0.13-0.56 of the Euclidean one's)
    assert float(losses["image"].sum()) < 0.8 * float(losses["w"].sum()), (seed, losses)


def test_solve_choice_loss_takes_the_draw_whose_image_is_closest():
    # the same draws and steps either way (the same seeds): "loss" picks among the same rows, so
    # its image is never farther than "metric"'s, and it is the closest of them
    g = _style()
    by_metric, by_loss = mapping_start(g), mapping_start(g, solve_choice="loss")
    assert "solve_choice" not in by_metric.recipe and by_loss.recipe["solve_choice"] == "loss"
    seed, w, images = _off_range(by_metric, 4, 0.2)
    rows = {}
    real = by_loss._levenberg_marquardt

    def keep_rows(z, target, scale, metric=None):
        out = real(z, target, scale, metric)
        rows["z"] = out[0]
        return out

    by_loss._levenberg_marquardt = keep_rows
    z_loss = by_loss.solve_z(w, images)
    z_metric = by_metric.solve_z(w, images)
    # the last image's draws, scored in one call as the solve scores them
    assert torch.equal(z_loss[-1], rows["z"][int(torch.argmin(_mse(g, rows["z"], images[-1:])))]), seed
    assert bool((_mse(g, z_loss, images) <= _mse(g, z_metric, images)).all()), seed
    # the same choice alone as in the batch
    assert torch.equal(by_loss.solve_z(w[1:2], images[1:2])[0], z_loss[1])
    with pytest.raises(ValueError, match="solve_choice must be one of"):
        mapping_start(g, solve_choice="image")
    # a profile's recipe rebuilds the choice; one recorded before it existed rebuilds "metric"
    from types import SimpleNamespace

    from ronan_fast.profile_loading import _rebuild_mapping_start

    assert by_loss.digest() != by_metric.digest()
    for ms in (by_metric, mapping_start(g, solve_choice="loss")):
        again = _rebuild_mapping_start(SimpleNamespace(warm_start={"recipe": ms.recipe, "sha256": ms.digest()}), g)
        assert again.solve_choice == ms.solve_choice and again.digest() == ms.digest()


def test_a_recipe_from_before_the_image_metric_rebuilds_the_euclidean_solve():
    from types import SimpleNamespace

    from ronan_fast.profile_loading import _rebuild_mapping_start

    g = _style()
    old = mapping_start(g, mapping_steps=50, solve_metric="w")
    new = mapping_start(g, mapping_steps=50)
    # "w" is what every start recorded before the choice existed: its recipe, and so its digest, are unchanged
    assert "solve_metric" not in old.recipe and new.recipe["solve_metric"] == "image"
    assert old.digest() != new.digest()
    for ms in (old, new):
        profile = SimpleNamespace(warm_start={"recipe": ms.recipe, "sha256": ms.digest()})
        again = _rebuild_mapping_start(profile, g)
        assert again.solve_metric == ms.solve_metric and again.digest() == ms.digest()


def test_the_search_over_w_runs_in_coordinates_whitened_by_the_mappings_spread():
    # u with w = mean + L u: the search's prior draws are mapping's w in those coordinates, whose
    # mean is 0 and covariance the identity on fresh draws (the whitening's own draws are others);
    # an image of u is synthesis' image of its w; and "w" searches w itself
    g = _style()
    ms = mapping_start(g)
    search, plain = ms._w_search, ms.w_generator
    u = search.sample_latents(20000, torch.Generator().manual_seed(123)).double()
    assert u.mean(0).abs().max() < 0.05
    cov = torch.cov(u.T)
    assert (cov - torch.eye(8, dtype=cov.dtype)).abs().max() < 0.08, cov
    w = plain.sample_latents(20000, torch.Generator().manual_seed(123)).double()
    assert float(torch.linalg.eigvalsh(torch.cov(w.T)).max() / torch.linalg.eigvalsh(torch.cov(w.T)).min()) > 4
    wh = search.module
    q = torch.randn(5, 8)
    torch.testing.assert_close(wh.to_u(wh.to_w(q)), q, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(search.decode(q), plain.decode(wh.to_w(q)))
    assert ms.recipe["w_space"] == "whitened" and ms.recipe["whiten_draws"] == 4096
    flat = mapping_start(g, w_space="w")
    assert flat._w_search is flat.w_generator and "w_space" not in flat.recipe
    assert flat.digest() != ms.digest()
    with pytest.raises(ValueError, match="w_space must be one of"):
        mapping_start(g, w_space="z")
    # a mapping whose w has no spread (or NaN) has nothing to whiten by: refused by name, not a NaN search
    for bad, says in ((lambda z: torch.zeros(z.shape[0], 8), "does not vary"),
                      (lambda z: torch.full((z.shape[0], 8), float("nan")), "holds NaN or Inf")):
        with pytest.raises(EncoderError, match=f"w_space='whitened'.*{says}.*pass w_space='w'"):
            MappingStart(g, bad, g.module.synthesis, 8, [g.module])
        MappingStart(g, bad, g.module.synthesis, 8, [g.module], w_space="w")  # nothing to whiten: accepted


def test_a_recipe_from_before_the_whitened_search_rebuilds_the_search_in_w():
    from types import SimpleNamespace

    from ronan_fast.profile_loading import _rebuild_mapping_start

    g = _style()
    for ms in (mapping_start(g, mapping_steps=50, w_space="w"), mapping_start(g, mapping_steps=50)):
        profile = SimpleNamespace(warm_start={"recipe": ms.recipe, "sha256": ms.digest()})
        again = _rebuild_mapping_start(profile, g)
        assert again.w_space == ms.w_space and again.digest() == ms.digest()


def test_each_image_gets_the_same_guess_alone_or_in_a_batch():
    g = _style()
    ms = mapping_start(g, w_settings=FAST_W, mapping_steps=50)
    x = _own(g, 3)
    together = ms.guess(x)
    assert torch.equal(ms.guess(x[2:3])[0], together[2])
    assert torch.equal(ms.guess(x.flip(0))[0], together[2])
    r = invert(WarmStarted(g, ms), x, settings=FAST_W.replace(restarts=2), seed=0)
    alone = invert(WarmStarted(g, ms), x[1:2], settings=FAST_W.replace(restarts=2), seed=0)
    assert torch.equal(r.loss[1:2], alone.loss)
    # a wider w, whose whitening's product over a batch sums in another order than over one row
    g = _style(w_dim=32)
    ms = mapping_start(g, w_settings=FAST_W, mapping_steps=20)
    x = _own(g, 3)
    assert torch.equal(ms.search_w(x).inputs[2], ms.search_w(x[2:3]).inputs[0])
    assert torch.equal(ms.guess(x)[2], ms.guess(x[2:3])[0])


def test_an_inversion_makes_a_whole_chunks_guesses_in_one_call_with_their_thresholds(monkeypatch):
    # the guess of an image is the same alone or in any batch (batch_invariant): WarmStarted asks
    # for all of a chunk's guesses at once, with each image's threshold where the metric is MSE,
    # and the inversion ends exactly as with one call per image
    g = _style()
    ms = mapping_start(g, w_settings=FAST_W, mapping_steps=30)
    calls = []
    guess = ms.guess_and_settled
    monkeypatch.setattr(ms, "guess_and_settled",
                        lambda images, **kw: (calls.append((images.shape[0], kw)), guess(images, **kw))[1])
    monkeypatch.setattr(ms, "guess", lambda images, **kw: ms.guess_and_settled(images, **kw)[0])
    x = torch.cat([_own(g, 2), _own(g, 1)])  # the last image twice: the first and the third
    x = torch.cat([x, x[:1]])
    for screen in (1, 4):
        s = FAST_W.replace(restarts=2, screen=screen)
        calls.clear()
        together = invert(WarmStarted(g, ms), x, settings=s, seed=0, stop_below=torch.tensor([1e-3, 2e-3, 3e-3, 4e-3]))
        assert [c[0] for c in calls] == [4]
        torch.testing.assert_close(calls[0][1]["stop_below"], torch.tensor([1e-3, 2e-3, 3e-3, 4e-3]))
        monkeypatch.setattr(ms, "batch_invariant", False)
        calls.clear()
        apart = invert(WarmStarted(g, ms), x, settings=s, seed=0, stop_below=torch.tensor([1e-3, 2e-3, 3e-3, 4e-3]))
        monkeypatch.setattr(ms, "batch_invariant", True)
        assert [c[0] for c in calls] == [1, 1, 1, 1]
        assert torch.equal(together.loss, apart.loss) and torch.equal(together.inputs, apart.inputs)
    # another metric's threshold is not MSE: the guess is not given it
    calls.clear()
    invert(WarmStarted(g, ms), x[:2], settings=FAST_W.replace(restarts=2), seed=0, stop_below=1e-3, metric="mae")
    assert [c[0] for c in calls] == [2] and "stop_below" not in calls[0][1]


def test_a_first_search_from_the_encoders_guess_settles_images_and_leaves_the_rest_to_the_full_search():
    g = _style()
    plain = mapping_start(g, w_settings=FAST_W, mapping_steps=30)
    enc = train_w_encoder(plain, samples=256, steps=40, batch=32, image_steps=10)
    # every image the first search does not settle gets the full search (w_full_within=inf)
    ms = mapping_start(g, w_settings=FAST_W, mapping_steps=30, w_encoder=enc, w_full_within=math.inf)
    assert ms.w_first_steps == 50 and ms.recipe["w_first_steps"] == 50 and "w_first_steps" not in plain.recipe
    x = _own(g, 3)
    full = ms.search_w(x)  # no threshold: the full search for every image
    # a threshold no first search reaches: the full search too, and the lower of the two kept
    low = ms.search_w(x, stop_below=1e-30)
    assert (low.loss <= full.loss).all() and (low.row_steps > full.row_steps).all()
    # one every first search reaches: none goes on to the full search
    high = ms.search_w(x, stop_below=1e3)
    assert (high.row_steps < full.row_steps).all() and (high.row_steps <= 50).all()
    # an image's result depends on it and its threshold only
    mixed = ms.search_w(x, stop_below=torch.tensor([1e-30, 1e3, 1e-30]))
    assert torch.equal(mixed.loss[0], low.loss[0]) and torch.equal(mixed.loss[1], high.loss[1])
    assert torch.equal(mixed.inputs[2], low.inputs[2])
    assert torch.equal(ms.search_w(x[2:3], stop_below=1e-30).inputs[0], low.inputs[2])
    assert torch.equal(ms.guess(x, stop_below=1e3), ms.solve_z(high.inputs, x))
    # w_full_within: an image the first search leaves farther above its threshold keeps its result
    near = mapping_start(g, w_settings=FAST_W, mapping_steps=30, w_encoder=enc, w_full_within=4.0)
    assert near.recipe["w_full_within"] == 4.0 and "w_full_within" not in ms.recipe
    first_only = near.search_w(x, stop_below=1e-30)  # every image is far above: none gets the full search
    assert (first_only.row_steps <= 50).all() and (first_only.row_steps < low.row_steps).all()
    assert (first_only.loss >= low.loss).all()
    sb = first_only.loss / 2  # every image left within 4x of its threshold: the full search, as without the bound
    assert torch.equal(near.search_w(x, stop_below=sb).loss, ms.search_w(x, stop_below=sb).loss)
    assert (near.search_w(x, stop_below=sb).row_steps > 50).all()
    # w_full_within == w_first_done: the first search alone, however near an image is left
    alone = mapping_start(g, w_settings=FAST_W, mapping_steps=30, w_encoder=enc, w_full_within=ms.w_first_done)
    assert torch.equal(alone.search_w(x, stop_below=1e-30).loss, first_only.loss)
    near_alone = alone.search_w(x, stop_below=sb)
    assert torch.equal(near_alone.loss, first_only.loss) and (near_alone.row_steps <= 50).all()
    # without a first search (w_first_steps=0) or an encoder, a threshold changes nothing
    off = mapping_start(g, w_settings=FAST_W, mapping_steps=30, w_encoder=enc, w_first_steps=0)
    assert torch.equal(off.search_w(x, stop_below=1e3).loss, full.loss) and "w_first_steps" not in off.recipe
    assert torch.equal(plain.search_w(x, stop_below=1e3).loss, plain.search_w(x).loss)
    # a threshold that is not positive and finite settles nothing: the full search, as without one
    odd = ms.search_w(x, stop_below=torch.tensor([0.0, float("nan"), float("inf")]))
    assert (odd.loss <= full.loss).all() and (odd.row_steps > full.row_steps).all()
    with pytest.raises(ValueError, match=r"one per image \(3\), got 2 values"):
        ms.search_w(x, stop_below=torch.ones(2))
    for bad in (-1, 2.5, True):
        with pytest.raises(ValueError, match="w_first_steps must be an int >= 0"):
            mapping_start(g, w_first_steps=bad)
    for bad in (0.0, 1.5, "0.1"):
        with pytest.raises(ValueError, match=r"w_first_done must be a float in \(0, 1\]"):
            mapping_start(g, w_first_done=bad)
    for bad in (0.01, float("nan"), "4"):
        with pytest.raises(ValueError, match="w_full_within must be a number at least w_first_done"):
            mapping_start(g, w_full_within=bad)


def test_the_full_search_over_w_stops_each_image_where_the_first_search_would_have_settled_it():
    g = _style()
    ws = FAST_W.replace(steps=200, check_every=5)
    plain = mapping_start(g, w_settings=ws, mapping_steps=30)
    enc = train_w_encoder(plain, samples=256, steps=40, batch=32, image_steps=10)
    ms = mapping_start(g, w_settings=ws, mapping_steps=30, w_encoder=enc)  # w_full_stops=True, the default
    off = mapping_start(g, w_settings=ws, mapping_steps=30, w_encoder=enc, w_full_stops=False)
    assert ms.w_full_stops and ms.recipe["w_full_stops"] is True and "w_full_stops" not in off.recipe
    x = _own(g, 3)
    # a threshold no search reaches: the full search runs to its end, as without the stop
    low_on, low_off = ms.search_w(x, stop_below=1e-30), off.search_w(x, stop_below=1e-30)
    assert torch.equal(low_on.loss, low_off.loss) and torch.equal(low_on.row_steps, low_off.row_steps)
    # a threshold the full search passes on its way and the first search never reaches: the full
    # search stops each image there (at a check), without the option it runs to its end
    first_alone = invert(ms._w_search, x, settings=ws.replace(restarts=1, steps=ms.w_first_steps), seed=ms.seed)
    assert (low_off.loss < first_alone.loss / 4).all()  # the full search goes far lower
    sb = torch.sqrt(first_alone.loss * low_off.loss) / ms.w_first_done
    on, without = ms.search_w(x, stop_below=sb), off.search_w(x, stop_below=sb)
    assert (on.loss < ms.w_first_done * sb).all() and torch.equal(without.loss, low_off.loss)
    assert (on.row_steps < without.row_steps).all(), (on.row_steps, without.row_steps)
    # each image's result depends on it and its threshold only, usable thresholds or not
    mixed = torch.stack([sb[0], torch.tensor(float("nan")), sb[2]])
    both = ms.search_w(x, stop_below=mixed)
    assert torch.equal(both.loss[[0, 2]], on.loss[[0, 2]]) and torch.equal(both.inputs[[0, 2]], on.inputs[[0, 2]])
    assert torch.equal(both.row_steps[[0, 2]], on.row_steps[[0, 2]])
    nan_alone = ms.search_w(x[1:2], stop_below=torch.tensor([float("nan")]))
    assert torch.equal(both.loss[1], nan_alone.loss[0]) and torch.equal(both.row_steps[1], nan_alone.row_steps[0])
    assert torch.equal(nan_alone.loss[0], low_off.loss[1])  # no usable threshold: the full search to its end
    for bad in (1, "yes", None):
        with pytest.raises(ValueError, match="w_full_stops must be True or False"):
            mapping_start(g, w_full_stops=bad)


def test_images_the_search_over_w_leaves_far_above_their_threshold_are_settled_without_a_search_over_z():
    g = _style()
    plain = mapping_start(g, w_settings=FAST_W, mapping_steps=30, w_settle_above=math.inf)
    ms = mapping_start(g, w_settings=FAST_W, mapping_steps=30)  # w_settle_above=4, the default
    assert ms.w_settle_above == 4.0 and ms.settles_above and not plain.settles_above
    assert ms.recipe["w_settle_above"] == 4.0 and "w_settle_above" not in plain.recipe
    x = _own(g, 3)
    over_w = ms.search_w(x).loss.float()
    z, settled = ms.guess_and_settled(x)  # no threshold: none settled, the guess as without the option
    assert settled.tolist() == [False] * 3 and torch.equal(z, plain.guess(x))
    # above 4x its threshold over w: settled; under it, or without a usable threshold: not
    sb = torch.stack([over_w[0] / 8, over_w[1] / 2, torch.tensor(float("nan"))])
    z2, settled = ms.guess_and_settled(x, stop_below=sb)
    assert settled.tolist() == [True, False, False] and torch.equal(z2, z)
    # the inversion: a settled image has no search over z (no row-steps) and reports its guess and
    # the guess's loss; the others are searched as without the option, each image's result its own
    s = FAST_W.replace(restarts=2, screen=3)
    sb = torch.stack([over_w[0] / 8, over_w[1] * 10, over_w[2] / 8])
    both = invert(WarmStarted(g, ms), x, settings=s, seed=0, stop_below=sb)
    assert both.row_steps.tolist()[0] == 0 and both.row_steps.tolist()[2] == 0 and int(both.row_steps[1]) > 0
    assert both.settled.tolist() == [True, False, True]
    assert torch.equal(both.inputs[[0, 2]], z[[0, 2]])
    torch.testing.assert_close(both.loss[[0, 2]], _mse(g, z[[0, 2]], x[[0, 2]]), rtol=1e-5, atol=1e-9)
    assert (both.loss[[0, 2]] >= sb[[0, 2]]).all()
    without = invert(WarmStarted(g, plain), x, settings=s, seed=0, stop_below=sb)
    assert (without.row_steps > 0).all() and without.settled.tolist() == [False] * 3
    assert torch.equal(both.loss[1], without.loss[1]) and torch.equal(both.inputs[1], without.inputs[1])
    for k in range(3):
        alone = invert(WarmStarted(g, ms), x[k : k + 1], settings=s, seed=0, stop_below=sb[k : k + 1])
        assert torch.equal(alone.loss[0], both.loss[k]) and torch.equal(alone.inputs[0], both.inputs[k])
    # fitting a profile (no threshold): every image searched
    assert (invert(WarmStarted(g, ms), x, settings=s, seed=0).row_steps > 0).all()
    for bad in (0.5, float("nan"), "4", True):
        with pytest.raises(ValueError, match="w_settle_above must be a number >= 1"):
            mapping_start(g, w_settle_above=bad)


def test_an_image_settled_by_its_start_is_searched_after_all_where_its_guess_is_under_its_threshold():
    # the inversion confirms a start's claim by the guess's own loss: a guess under the threshold
    # (an image the model made, guessed at its own input) is searched as any other
    g = _style()
    z_own = g.sample_latents(2, torch.Generator().manual_seed(3))
    with torch.no_grad():
        x = (g.decode(z_own) * 255).round() / 255

    far = g.sample_latents(1, torch.Generator().manual_seed(9))[0]

    class Claims:  # a start that claims every image settled above, guessing image 0 at its own input
        takes_threshold = settles_above = True

        def __init__(self, batch_invariant):
            self.batch_invariant = batch_invariant

        def guess_and_settled(self, images, stop_below):
            guesses = torch.stack([z_own[0] if torch.equal(im, x[0]) else far for im in images])
            return guesses, torch.ones(images.shape[0], dtype=torch.bool)

        def check(self, generator):
            pass

        def to(self, device):
            return self

    for together in (True, False):  # the chunk's guesses in one call, or one call per image
        res = invert(WarmStarted(g, Claims(together)), x, settings=FAST_W.replace(restarts=2), seed=0,
                     stop_below=1e-3)
        assert int(res.row_steps[0]) > 0 and float(res.loss[0]) < 1e-3 and not bool(res.settled[0])
        assert int(res.row_steps[1]) == 0 and float(res.loss[1]) >= 1e-3 and bool(res.settled[1])
        assert torch.equal(res.inputs[1], far)


def test_a_recipe_from_before_the_first_search_rebuilds_the_full_search_for_every_image(tmp_path):
    from types import SimpleNamespace

    from ronan_fast.profile_loading import _rebuild_mapping_start
    from ronan_fast.warmstart import encoder_path

    g = _style()
    plain = mapping_start(g, mapping_steps=50)
    enc = train_w_encoder(plain, samples=128, steps=20, batch=32, image_steps=5)
    path = tmp_path / "p.json"
    enc.save(encoder_path(path))
    # without w_first_steps in the recipe (as every encoder of w recorded before the first search
    # existed): its digest unchanged, rebuilt with none; with it: rebuilt as recorded
    for ms in (plain.with_w_encoder(enc), mapping_start(g, mapping_steps=50, w_encoder=enc, w_first_steps=0),
               mapping_start(g, mapping_steps=50, w_encoder=enc, w_first_steps=20, w_first_done=0.1),
               mapping_start(g, mapping_steps=50, w_encoder=enc, w_full_within=4.0),
               mapping_start(g, mapping_steps=50, w_encoder=enc, w_settle_above=math.inf, w_full_within=math.inf),
               mapping_start(g, mapping_steps=50, w_encoder=enc, w_full_stops=False)):
        profile = SimpleNamespace(warm_start={"recipe": ms.recipe, "sha256": ms.digest()})
        again = _rebuild_mapping_start(profile, g, path)
        # (w_full_within acts only with the first search, and is recorded only with it)
        assert (again.recipe, again.w_first_steps, again.w_settle_above, again.digest()) == \
            (ms.recipe, ms.w_first_steps, ms.w_settle_above, ms.digest())
        if ms.w_first_steps:
            assert (again.w_first_done, again.w_full_within, again.w_full_stops) == \
                (ms.w_first_done, ms.w_full_within, ms.w_full_stops)


def test_the_guess_is_the_solve_for_z_of_the_search_over_w():
    # search_w and solve_z are the guess's two steps, each callable alone (bench.wsearch traces
    # them): their composition is the guess itself, bit for bit, and the search over w alone
    # reports each image's w* and its loss over w
    g = _style()
    ms = mapping_start(g, w_settings=FAST_W, mapping_steps=60)
    x = _own(g, 3)
    found = ms.search_w(x)
    assert found.inputs.shape == (3, 8)
    with torch.no_grad():
        over_w = (ms.w_generator.decode(found.inputs) - x).square().flatten(1).mean(1)
    torch.testing.assert_close(found.loss.float(), over_w, rtol=1e-4, atol=1e-9)
    assert torch.equal(ms.solve_z(found.inputs, x), ms.guess(x))
    with pytest.raises(ValueError, match=r"w must be \[3, 8\]"):
        ms.solve_z(found.inputs[:2], x)
    with pytest.raises(ValueError, match=r"w must be \[3, 8\]"):
        ms.solve_z(found.inputs[:, :4], x)


def test_it_is_refused_for_another_generator_or_functions_that_are_not_the_generators():
    g, other = _style(0), _style(1)
    ms = mapping_start(g)
    ms.check(g)
    with pytest.raises(EncoderMismatchError, match="fingerprint"):
        WarmStarted(other, ms)
    wrong = MappingStart(g, g.module.mapping_net, lambda w: other.module.synthesis(w), 8, [g.module])
    with pytest.raises(EncoderMismatchError, match="synthesis\\(mapping\\(z\\)\\) differs"):
        wrong.check(g)
    with pytest.raises(EncoderError, match=r"images must be \[B, 1, 16, 16\]"):
        ms.guess(torch.zeros(2, 3, 16, 16))


def test_a_w_encoder_gives_the_first_start_of_the_search_over_w(monkeypatch):
    g = _style()
    plain = mapping_start(g, w_settings=FAST_W, mapping_steps=30)
    enc = train_w_encoder(plain, samples=256, steps=40, batch=32, image_steps=10)
    assert enc.module.latent_dim == 8  # images to w, not to z
    # one start and a learning rate too small to move it: the search over w ends at the guess
    still = FAST_W.replace(restarts=1, steps=1, lr=1e-12)
    ms = mapping_start(g, w_settings=still, mapping_steps=30, w_encoder=enc)
    targets = []
    solve = ms._solve_for
    monkeypatch.setattr(ms, "_solve_for", lambda w, gen: (targets.append(w.clone()), solve(w, gen))[1])
    x = _own(g, 3)
    ms.guess(x)
    assert torch.allclose(torch.stack(targets), enc.guess(x), atol=1e-5)
    # recorded: a profile fitted with it is refused with another encoder or none
    assert ms.recipe["w_encoder"] == enc.digest() and "w_encoder" not in plain.recipe
    assert ms.digest() != mapping_start(g, w_settings=still, mapping_steps=30).digest()
    assert ms.cost == enc.cost and plain.cost["train_s"] == 0.0
    # the same guess for an image alone or in a batch
    ms = mapping_start(g, w_settings=FAST_W, mapping_steps=30, w_encoder=enc)
    assert plain.with_w_encoder(enc).digest() == ms.digest() and plain.w_encoder is None
    assert torch.equal(ms.guess(x[1:2])[0], ms.guess(x)[1])


def test_a_w_encoder_for_another_space_is_refused():
    from ronan_fast.warmstart import train_encoder

    g = _style()
    z_encoder = train_encoder(g, samples=32, steps=2, batch=16, image_steps=0)  # images to z (16 wide)
    with pytest.raises(EncoderMismatchError, match="8-wide"):
        mapping_start(g, w_encoder=z_encoder)
    other = mapping_start(_style(1))
    with pytest.raises(EncoderMismatchError, match="fingerprint"):
        mapping_start(g, w_encoder=train_w_encoder(other, samples=32, steps=2, batch=16, image_steps=0))
    with pytest.raises(TypeError, match="w_encoder must be a WarmStartEncoder"):
        mapping_start(g, w_encoder="enc.safetensors")
    with pytest.raises(TypeError, match="start must be a MappingStart"):
        train_w_encoder(g)


def test_train_w_encoder_takes_its_recipe_under_the_arguments_given():
    """train_w_encoder trains W_ENCODER_RECIPE where an argument does not replace it, and a bad
    argument is named."""
    plain = mapping_start(_style(0))
    enc = train_w_encoder(plain, samples=32, steps=2, batch=16, image_steps=0)
    want = {**W_ENCODER_RECIPE, "samples": 32, "steps": 2, "batch": 16, "image_steps": 0}
    assert {k: enc.recipe[k] for k in want} == want
    assert enc.module.width == W_ENCODER_RECIPE["width"] and enc.module.hidden == W_ENCODER_RECIPE["hidden"]
    with pytest.raises(EncoderError, match="image_steps must be an integer in \\[0, steps\\]"):
        train_w_encoder(plain, samples=32, steps=2, batch=16)  # the recipe's 400 image steps in 2 steps


def test_bad_arguments_are_named():
    g = _style()
    m = g.module
    with pytest.raises(ValueError, match="w_dim must be a positive int"):
        MappingStart(g, m.mapping_net, m.synthesis, 0)
    with pytest.raises(ValueError, match="mapping_steps must be a positive int"):
        MappingStart(g, m.mapping_net, m.synthesis, 8, mapping_steps=-1)
    with pytest.raises(TypeError, match="mapping and synthesis must be callables"):
        MappingStart(g, m.mapping_net, "synthesis", 8)
    with pytest.raises(TypeError, match="w_settings must be InversionSettings"):
        MappingStart(g, m.mapping_net, m.synthesis, 8, w_settings={"steps": 3})
    with pytest.raises(ValueError, match="solve_metric must be one of"):
        MappingStart(g, m.mapping_net, m.synthesis, 8, solve_metric="pixels")
    plain = LatentGenerator(torch.nn.Sequential(torch.nn.Linear(4, 64), torch.nn.Unflatten(1, (1, 8, 8))), 4)
    with pytest.raises(TypeError, match="no module with mapping_net"):
        mapping_start(plain)


def test_a_profile_records_it_and_rebuilds_it_from_the_generator(tmp_path):
    from ronan_fast import Attributor
    from ronan_fast.profile import ProfileError, ProfileMismatchError

    g = _style()
    ms = mapping_start(g, w_settings=FAST_W, mapping_steps=50)
    att = Attributor(g, None, warm_start=ms, steps=30, restarts=2, polish_steps=0)
    assert att.settings.screen == 8  # a guided first start brings the family's warm-start default
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a small profile
        prof = att.fit(n=5, seed=1)
    assert prof.warm_start["sha256"] == ms.digest() and prof.warm_start["recipe"]["kind"] == "mapping"
    path = prof.save(tmp_path / "p.json")
    again = Attributor.from_profile(path, g, None)  # rebuilt from the recipe; no file beside the profile
    assert isinstance(again.warm_start, MappingStart) and again.warm_start.digest() == ms.digest()
    x = _own(g, 2, seed=9)
    assert torch.equal(again.attribute(x).loss, att.attribute(x).loss)
    # an image far from any the model makes is settled above its threshold by the search over w
    # (w_settle_above=4, the default): no search over z, and its report says so
    from ronan_fast.attributor import SETTLED_NOTE

    stripes = torch.zeros(1, 1, 16, 16)
    stripes[..., ::2, :] = 1.0
    res = att.attribute(torch.cat([x[1:], stripes]))  # x[1], which belongs: searched over z
    assert int(res.row_steps[1]) == 0 and SETTLED_NOTE in res.notes[1] and not bool(res.belongs[1])
    assert int(res.row_steps[0]) > 0 and res.notes[0] == "" and bool(res.belongs[0])
    assert res.to_records()[1]["notes"] == SETTLED_NOTE
    with pytest.raises(ProfileMismatchError, match="no encoder was given"):
        Attributor.from_profile(prof, g, None, warm_start=None)
    with pytest.raises(ProfileMismatchError, match="the encoder differs"):
        Attributor.from_profile(prof, g, None, warm_start=mapping_start(g, mapping_steps=7))
    plain = LatentGenerator(torch.nn.Sequential(torch.nn.Linear(16, 256), torch.nn.Unflatten(1, (1, 16, 16)),
                                                torch.nn.Tanh()), 16)
    with pytest.raises((ProfileError, ProfileMismatchError), match="mapping network|fingerprint"):
        Attributor.from_profile(path, plain, None)


def test_a_profile_with_a_w_encoder_loads_it_from_beside_the_profile(tmp_path):
    from ronan_fast import Attributor
    from ronan_fast.profile import ProfileError
    from ronan_fast.warmstart import encoder_path

    g = _style()
    plain = mapping_start(g, w_settings=FAST_W, mapping_steps=30)
    enc = train_w_encoder(plain, samples=128, steps=20, batch=32, image_steps=5)
    ms = mapping_start(g, w_settings=FAST_W, mapping_steps=30, w_encoder=enc)
    att = Attributor(g, None, warm_start=ms, steps=30, restarts=2, polish_steps=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a small profile
        prof = att.fit(n=5, seed=1)
    assert prof.warm_start["recipe"]["w_encoder"] == enc.digest() and prof.warm_start["cost"] == enc.cost
    path = prof.save(tmp_path / "p.json")
    with pytest.raises(ProfileError, match=r"encoder of w .*p\.encoder\.safetensors"):
        Attributor.from_profile(path, g, None)  # not saved yet
    with pytest.raises(ProfileError, match="give the profile as a path"):
        Attributor.from_profile(prof, g, None)
    train_w_encoder(plain, samples=128, steps=20, batch=32, image_steps=5, seed=1).save(encoder_path(path))
    with pytest.raises(ProfileError, match="is not the encoder of w the profile was fitted with"):
        Attributor.from_profile(path, g, None)
    enc.save(encoder_path(path))
    again = Attributor.from_profile(path, g, None)
    assert again.warm_start.digest() == ms.digest()
    x = _own(g, 2, seed=9)
    assert torch.equal(again.attribute(x).loss, att.attribute(x).loss)


@pytest.fixture
def style_cli(tmp_path, monkeypatch) -> list[str]:
    """The command line's model options for tests/tiny_models.py's StyleGAN (importable from
    tests/), with ``tmp_path`` the working folder."""
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parent))
    monkeypatch.chdir(tmp_path)
    return ["--model", "tiny_models:style_generator", "--latent-shape", "16", "--reference", "none"]


def test_cli_profile_warm_start_mapping_and_inspect_rebuild_it(style_cli, tmp_path, monkeypatch, capsys):
    """profile --warm-start mapping records the start in the profile (no file beside it);
    inspect rebuilds it from the model; a model without a mapping network is refused by name."""
    import json
    import sys

    from ronan_fast.cli import main
    from ronan_fast.imageio import save_image

    model = style_cli
    args = ["profile", *model, "-n", "4", "--steps", "20", "--restarts", "2", "--retries", "0",
            "--warm-start", "mapping", "-q", "-o", "p.json"]
    assert main(args) == 0
    ws = json.loads((tmp_path / "p.json").read_text())["warm_start"]
    assert ws["recipe"]["kind"] == "mapping" and len(ws["sha256"]) == 64
    assert not (tmp_path / "p.encoder.safetensors").exists()
    monkeypatch.delitem(sys.modules, "tiny_models", raising=False)  # put back after the test
    import tiny_models

    g = LatentGenerator(tiny_models.style_generator(), 16)
    save_image(_own(g, 1)[0], tmp_path / "own.png")
    capsys.readouterr()
    assert main(["inspect", "own.png", "--profile", "p.json", *model[:4], "-q", "-o", "r.jsonl"]) == 0
    assert main(["profile", "--model", "tiny_models:generator", "--latent-shape", "3", "--reference", "none",
                 "-n", "4", "--warm-start", "mapping", "-q", "-o", "q.json"]) == 2
    assert "--warm-start mapping" in capsys.readouterr().err


def test_a_bare_warm_start_means_mapping_for_a_stylegan_and_an_encoder_otherwise(tmp_path, monkeypatch):
    """A bare --warm-start on a model with mapping_net/synthesis/w_dim records the mapping start
    (nothing trained, no encoder file); any other GAN gets a learned encoder."""
    import json
    from pathlib import Path

    from ronan_fast.cli import main
    from ronan_fast.cli.profile_cmd import _auto_warm_start
    from ronan_fast.mapping_start import has_mapping_network

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parent))
    monkeypatch.chdir(tmp_path)
    import tiny_models

    style = LatentGenerator(tiny_models.style_generator(), 16)
    plain = LatentGenerator(tiny_models.generator(), 3)
    assert has_mapping_network(style) and not has_mapping_network(plain)
    assert _auto_warm_start(style) == "mapping" and _auto_warm_start(plain) == "encoder"
    args = ["profile", "--model", "tiny_models:style_generator", "--latent-shape", "16", "--reference", "none",
            "-n", "4", "--steps", "20", "--restarts", "2", "--retries", "0", "--warm-start", "-q", "-o", "p.json"]
    assert main(args) == 0
    recipe = json.loads((tmp_path / "p.json").read_text())["warm_start"]["recipe"]
    assert recipe["kind"] == "mapping" and recipe["w_space"] == "whitened"
    assert not (tmp_path / "p.encoder.safetensors").exists()


def test_cli_profile_w_encoder_trains_it_beside_the_profile_and_inspect_loads_it(style_cli, tmp_path, monkeypatch, capsys):
    """--warm-start mapping --w-encoder trains an encoder of w (PROFILE.encoder.safetensors),
    reuses it on a second run, and inspect finds it; --w-encoder without the mapping start is refused."""
    import json
    import sys

    from ronan_fast.cli import main
    from ronan_fast.imageio import save_image
    from ronan_fast.warmstart import load_encoder

    model = style_cli
    args = ["profile", *model, "-n", "4", "--steps", "20", "--restarts", "2", "--retries", "0", "--warm-start",
            "mapping", "--w-encoder", "--encoder-samples", "64", "--encoder-steps", "5", "-o", "p.json"]
    assert main(args) == 0
    assert "training an encoder of w" in capsys.readouterr().err
    ws = json.loads((tmp_path / "p.json").read_text())["warm_start"]
    assert ws["recipe"]["kind"] == "mapping" and ws["cost"]["samples"] == 64
    monkeypatch.delitem(sys.modules, "tiny_models", raising=False)  # put back after the test
    import tiny_models

    g = LatentGenerator(tiny_models.style_generator(), 16)
    enc = load_encoder(tmp_path / "p.encoder.safetensors", mapping_start(g).w_generator)
    assert ws["recipe"]["w_encoder"] == enc.digest()
    # the encoder of w's own recipe, the given samples and steps in it (its image steps keep their
    # share of the steps: 5 * 400 // 8000 = 0)
    assert {k: enc.recipe[k] for k in ("samples", "steps", "image_steps", "width", "hidden")} == \
        {"samples": 64, "steps": 5, "image_steps": 0, "width": W_ENCODER_RECIPE["width"],
         "hidden": W_ENCODER_RECIPE["hidden"]}
    assert main(args) == 0  # the encoder beside the profile is reused
    assert "training an encoder of w" not in capsys.readouterr().err
    save_image(_own(g, 1)[0], tmp_path / "own.png")
    assert main(["inspect", "own.png", "--profile", "p.json", *model[:4], "-q", "-o", "r.jsonl"]) == 0
    capsys.readouterr()
    assert main(["profile", *model, "-n", "4", "--warm-start", "encoder", "--w-encoder", "-q", "-o", "q.json"]) == 2
    assert "--w-encoder goes with --warm-start mapping" in capsys.readouterr().err
    # the first search from the encoder's guess: 50 steps unless --w-first-steps says otherwise (0: none)
    assert (ws["recipe"]["w_first_steps"], ws["recipe"]["w_first_done"]) == (50, 0.05)
    assert main([*args[:-2], "--w-first-steps", "0", "-q", "-o", "p.json"]) == 0
    assert "w_first_steps" not in json.loads((tmp_path / "p.json").read_text())["warm_start"]["recipe"]
    assert main(["inspect", "own.png", "--profile", "p.json", *model[:4], "-q", "-o", "r0.jsonl"]) == 0
    capsys.readouterr()
    assert main(["profile", *model, "-n", "4", "--warm-start", "mapping", "--w-first-steps", "5", "-q",
                 "-o", "q.json"]) == 2
    assert "--w-first-steps goes with --w-encoder" in capsys.readouterr().err
    assert main(["profile", *model, "-n", "4", "--warm-start", "encoder", "--w-first-steps", "5", "-q",
                 "-o", "q.json"]) == 2
    assert "--w-first-steps goes with --warm-start mapping" in capsys.readouterr().err
    assert main([*args[:-2], "--w-first-steps", "-1", "-o", "q.json"]) == 2
    assert "--w-first-steps: expected a number >= 0" in capsys.readouterr().err
    # the full search's bound: none by default (left out of the recipe), one given recorded
    assert "w_full_within" not in ws["recipe"]
    assert main([*args[:-2], "--w-full-within", "8", "-q", "-o", "p8.json"]) == 0
    assert json.loads((tmp_path / "p8.json").read_text())["warm_start"]["recipe"]["w_full_within"] == 8.0
    assert main([*args[:-2], "--w-full-within", "inf", "-q", "-o", "pinf.json"]) == 0
    assert "w_full_within" not in json.loads((tmp_path / "pinf.json").read_text())["warm_start"]["recipe"]
    assert main(["profile", *model, "-n", "4", "--warm-start", "mapping", "--w-full-within", "4", "-q",
                 "-o", "q.json"]) == 2
    assert "--w-full-within goes with --w-encoder" in capsys.readouterr().err
    assert main([*args[:-2], "--w-full-within", "0.5", "-o", "q.json"]) == 2
    assert "--w-full-within: expected a number >= 1 or inf" in capsys.readouterr().err
    # the full search stops each image under its first search's stop unless --w-full-to-end
    assert ws["recipe"]["w_full_stops"] is True
    assert main([*args[:-2], "--w-full-to-end", "-q", "-o", "p.json"]) == 0
    assert "w_full_stops" not in json.loads((tmp_path / "p.json").read_text())["warm_start"]["recipe"]
    assert main(["inspect", "own.png", "--profile", "p.json", *model[:4], "-q", "-o", "r1.jsonl"]) == 0
    capsys.readouterr()
    assert main(["profile", *model, "-n", "4", "--warm-start", "mapping", "--w-full-to-end", "-q", "-o", "q.json"]) == 2
    assert "--w-full-to-end goes with --w-encoder" in capsys.readouterr().err


def test_cli_profile_w_set_changes_the_search_over_w_and_inspect_follows_it(style_cli, tmp_path, monkeypatch, capsys):
    """--w-set FIELD=VALUE overrides W_SETTINGS' fields for the mapping start and --w-space its
    coordinates; the profile records them and inspect rebuilds the same start; bad pairs, and
    --w-set or --w-space without the mapping start, are refused with the option named."""
    import json
    import sys

    from ronan_fast.cli import main
    from ronan_fast.imageio import save_image
    from ronan_fast.mapping_start import W_SETTINGS

    model = style_cli
    base = ["profile", *model, "-n", "4", "--steps", "20", "--restarts", "2", "--retries", "0", "-q"]
    assert main([*base, "--warm-start", "mapping", "--w-set", "restarts=3", "--w-set", "steps=40", "--w-space", "w",
                 "-o", "p.json"]) == 0
    recipe = json.loads((tmp_path / "p.json").read_text())["warm_start"]["recipe"]
    assert recipe["w_settings"] == W_SETTINGS.replace(restarts=3, steps=40).to_dict()
    assert "w_space" not in recipe  # the search in w itself (--w-space w), as before the choice existed
    monkeypatch.delitem(sys.modules, "tiny_models", raising=False)  # put back after the test
    import tiny_models

    g = LatentGenerator(tiny_models.style_generator(), 16)
    save_image(_own(g, 1)[0], tmp_path / "own.png")
    assert main(["inspect", "own.png", "--profile", "p.json", *model[:4], "-q", "-o", "r.jsonl"]) == 0
    capsys.readouterr()
    for extra, message in [(["--warm-start", "mapping", "--w-set", "restarts=0"], "--w-set: restarts must be"),
                           (["--warm-start", "mapping", "--w-set", "warp=3"], "--w-set 'warp=3': 'warp' is not an"),
                           (["--warm-start", "mapping", "--w-set", "restarts"], "--w-set 'restarts': expected FIELD"),
                           (["--warm-start", "encoder", "--w-set", "restarts=48"],
                            "--w-set goes with --warm-start mapping"),
                           (["--w-set", "restarts=48"], "--w-set goes with --warm-start mapping"),
                           (["--warm-start", "encoder", "--w-space", "w"], "--w-space goes with --warm-start mapping")]:
        assert main([*base, *extra, "-o", "q.json"]) == 2, extra
        assert message in capsys.readouterr().err, extra
    assert not (tmp_path / "q.json").exists()


def test_cli_profile_w_settle_above_is_recorded_and_inspect_follows_it(style_cli, tmp_path, monkeypatch, capsys):
    """--w-settle-above X goes in the mapping start's recipe (inspect rebuilds it); a value under 1,
    or the flag without --warm-start mapping, is refused by name."""
    import json
    import sys

    from ronan_fast.cli import main
    from ronan_fast.imageio import save_image

    model = style_cli
    args = ["profile", *model, "-n", "4", "--steps", "20", "--restarts", "2", "--retries", "0", "--warm-start",
            "mapping", "--w-settle-above", "4", "-q", "-o", "p.json"]
    assert main(args) == 0
    assert json.loads((tmp_path / "p.json").read_text())["warm_start"]["recipe"]["w_settle_above"] == 4.0
    monkeypatch.delitem(sys.modules, "tiny_models", raising=False)  # put back after the test
    import tiny_models

    g = LatentGenerator(tiny_models.style_generator(), 16)
    save_image(_own(g, 1)[0], tmp_path / "own.png")
    assert main(["inspect", "own.png", "--profile", "p.json", *model[:4], "-q", "-o", "r.jsonl"]) == 0
    assert main([*args[:-4], "inf", "-q", "-o", "q.json"]) == 0
    assert "w_settle_above" not in json.loads((tmp_path / "q.json").read_text())["warm_start"]["recipe"]
    assert main([*args[:-5], "-q", "-o", "q.json"]) == 0  # without the flag: the default, 4
    assert json.loads((tmp_path / "q.json").read_text())["warm_start"]["recipe"]["w_settle_above"] == 4.0
    capsys.readouterr()
    assert main([*args[:-4], "0.5", "-q", "-o", "q.json"]) == 2
    assert "--w-settle-above: expected a number >= 1 or inf, got 0.5" in capsys.readouterr().err
    assert main(["profile", *model, "-n", "4", "--warm-start", "encoder", "--w-settle-above", "4", "-q",
                 "-o", "q.json"]) == 2
    assert "--w-settle-above goes with --warm-start mapping" in capsys.readouterr().err


def test_cli_profile_solve_choice_is_recorded_and_inspect_rebuilds_it(style_cli, tmp_path, monkeypatch, capsys):
    """--solve-choice loss goes in the mapping start's recipe and inspect's rebuilt start has it;
    without the flag the recipe says nothing (the metric's draw); the flag without --warm-start
    mapping, or an unknown choice, is refused."""
    import json
    import sys

    import ronan_fast.mapping_start as ms_module
    from ronan_fast.cli import main
    from ronan_fast.imageio import save_image

    model = style_cli
    args = ["profile", *model, "-n", "4", "--steps", "20", "--restarts", "2", "--retries", "0", "--warm-start",
            "mapping", "--solve-choice", "loss", "-q", "-o", "p.json"]
    assert main(args) == 0
    assert json.loads((tmp_path / "p.json").read_text())["warm_start"]["recipe"]["solve_choice"] == "loss"
    monkeypatch.delitem(sys.modules, "tiny_models", raising=False)  # put back after the test
    import tiny_models

    built = []
    real_build = ms_module.mapping_start

    def spy(*a, **kw):
        built.append(real_build(*a, **kw))
        return built[-1]

    monkeypatch.setattr(ms_module, "mapping_start", spy)
    g = LatentGenerator(tiny_models.style_generator(), 16)
    save_image(_own(g, 1)[0], tmp_path / "own.png")
    assert main(["inspect", "own.png", "--profile", "p.json", *model[:4], "-q", "-o", "r.jsonl"]) == 0
    assert [b.solve_choice for b in built] == ["loss"]
    monkeypatch.setattr(ms_module, "mapping_start", real_build)
    assert main([*args[:-5], "-q", "-o", "q.json"]) == 0  # without the flag
    assert "solve_choice" not in json.loads((tmp_path / "q.json").read_text())["warm_start"]["recipe"]
    capsys.readouterr()
    assert main([*args[:-4], "nearest", "-q", "-o", "q.json"]) == 2
    assert "--solve-choice: invalid choice: 'nearest'" in capsys.readouterr().err
    assert main(["profile", *model, "-n", "4", "--warm-start", "encoder", "--solve-choice", "loss", "-q",
                 "-o", "q.json"]) == 2
    assert "--solve-choice goes with --warm-start mapping" in capsys.readouterr().err


def test_cli_channels_last_reaches_the_mapping_starts_search(style_cli, tmp_path, monkeypatch, capsys):
    """--channels-last with --warm-start mapping: the start is built on the converted model, so
    its search over w runs NHWC convolutions; the profile it writes serves inspect with or
    without the flag (the same function and fingerprint), with the same verdict."""
    import sys

    import ronan_fast.mapping_start as ms_module
    from ronan_fast.cli import main
    from ronan_fast.imageio import save_image
    from ronan_fast.reports.files import read_report

    built = []
    real_build = ms_module.mapping_start

    def spy(*a, **kw):
        built.append(real_build(*a, **kw))
        return built[-1]

    def nhwc(start) -> bool:
        from tiny_models import in_channels_last

        return in_channels_last(start.generator.module)

    monkeypatch.setattr(ms_module, "mapping_start", spy)
    model = style_cli
    args = ["profile", *model, "-n", "4", "--steps", "20", "--restarts", "2", "--retries", "0", "--warm-start",
            "mapping", "--channels-last", "-q", "-o", "p.json"]
    assert main(args) == 0
    assert [nhwc(b) for b in built] == [True]
    monkeypatch.delitem(sys.modules, "tiny_models", raising=False)  # put back after the test
    import tiny_models

    g = LatentGenerator(tiny_models.style_generator(), 16)
    save_image(_own(g, 1)[0], tmp_path / "own.png")
    records = {}
    for flag in ([], ["--channels-last"]):
        assert main(["inspect", "own.png", "--profile", "p.json", *model[:4], *flag, "-q", "-o", "r.jsonl"]) == 0
        records[bool(flag)] = read_report(tmp_path / "r.jsonl")[1][0]
    assert [nhwc(b) for b in built[1:]] == [False, True]
    assert records[True]["verdict"] == records[False]["verdict"]
    assert records[True]["loss"] == pytest.approx(records[False]["loss"], rel=1e-2, abs=1e-6)
