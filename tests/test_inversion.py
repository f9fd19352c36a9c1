"""Batched multi-restart inversion on small generators the tests build."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ronan_fast import ops
from ronan_fast.adapters import ConditionalGenerator, GeneratorOutputError, LatentGenerator
from ronan_fast.inversion import FAMILY_DEFAULTS, PRESETS, InversionSettings, invert, resolve_settings
from ronan_fast.inversion.polish import (
    ConjugateGradientLM,
    DenseLM,
    GMRESGaussNewton,
    Leaving,
    PolishResult,
    polish,
    unsettled,
)
from ronan_fast.inversion.polish import dense as dense_polish
from ronan_fast.inversion.stopping import halve


def small_dcgan(nz: int = 8, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.Linear(nz, 32 * 4 * 4), nn.Unflatten(1, (32, 4, 4)), nn.BatchNorm2d(32), nn.ReLU(),
        nn.ConvTranspose2d(32, 16, 4, 2, 1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.ConvTranspose2d(16, 1, 4, 2, 1), nn.Tanh(),
    )
    with torch.no_grad():  # give BatchNorm non-trivial running statistics
        net.train()
        net(torch.randn(256, nz))
    return net


class CondNet(nn.Module):
    """A class-conditional generator whose classes make clearly different images."""

    def __init__(self, nz: int = 4, classes: int = 3):
        super().__init__()
        torch.manual_seed(1)
        self.num_classes = classes
        self.emb = nn.Embedding(classes, 64)
        self.fc = nn.Linear(nz, 64)

    def forward(self, z, c):
        return torch.tanh(self.fc(z) * 0.3 + 2 * self.emb(c)).view(-1, 1, 8, 8)


@pytest.fixture(scope="module")
def gen():
    return LatentGenerator(small_dcgan(), 8, (-1, 1))


def quick(**kw) -> InversionSettings:
    base = dict(steps=200, lr=0.1, restarts=2, schedule="cosine", check_every=10)
    base.update(kw)
    return PRESETS["authors"].replace(**base)  # the paper's loop, with these fields changed


def test_generated_images_reconstruct_far_better_than_noise(gen):
    g = torch.Generator().manual_seed(3)
    own = gen.generate(6, g).images
    noise = torch.rand(6, *gen.image_shape, generator=g)
    res = invert(gen, torch.cat([own, noise]), settings=quick(restarts=4, steps=300), seed=0)
    assert res.loss.shape == (12,)
    assert torch.isfinite(res.loss).all()
    assert res.loss[:6].max() < 1e-3 * res.loss[6:].min()
    # the reported loss is the loss of the reported reconstruction
    direct = (res.reconstruction - torch.cat([own, noise])).square().flatten(1).mean(1)
    torch.testing.assert_close(res.loss, direct, rtol=1e-4, atol=1e-9)
    assert res.inputs.shape == (12, gen.latent_dim)


def test_deterministic_and_independent_of_chunking(gen):
    """Each image's starts come from its pixels and the seed, and every generator call has one
    shape: an image gets the same bits alone, in a batch, in chunks or in another order."""
    images = gen.generate(5, torch.Generator().manual_seed(4)).images
    s = quick(steps=60)
    a = invert(gen, images, settings=s, seed=7)
    b = invert(gen, images, settings=s, seed=7, max_rows=4)  # 2 images per chunk
    c = invert(gen, images[2:3], settings=s, seed=7)
    assert torch.equal(a.loss, b.loss) and torch.equal(a.inputs, b.inputs)
    assert torch.equal(c.loss, a.loss[2:3]) and torch.equal(c.inputs, a.inputs[2:3])
    f = invert(gen, images[2:5], settings=s, seed=7)
    assert torch.equal(f.loss, a.loss[2:5]) and torch.equal(f.inputs, a.inputs[2:5])
    e = invert(gen, images, settings=s, seed=8)
    assert not torch.equal(e.inputs, a.inputs)
    # another block shape rounds otherwise, but finds the same inputs up to rounding
    g = invert(gen, images, settings=s, seed=7, call_rows=3)
    torch.testing.assert_close(g.loss, a.loss, rtol=1e-3, atol=1e-10)
    for bad in (0, 1.5, True):
        with pytest.raises(ValueError, match="call_rows must be an integer >= 1"):
            invert(gen, images, settings=s, call_rows=bad)


@pytest.mark.parametrize("kw", [
    # successive halving to 2 of 6 rows, a plateau rule, a threshold, a polish with escalation
    dict(restarts=6, steps=90, halving_every=10, min_rows=2, patience=30, polish_steps=3, polish_escalate=2),
    # steps not a multiple of check_every: a row's last step is a check of its own
    dict(restarts=4, steps=47, halving_every=20, min_rows=1, check_every=10),
])
def test_images_admitted_as_rows_stop_invert_as_in_one_batch(gen, kw, monkeypatch):
    """With a row budget, images enter the batch as rows stop (ADMITTED_BATCHES per chunk): each
    runs its own schedule, checks and halvings, so every image's result is the one it gets in a
    batch of all images at once, whatever the batch holds beside it."""
    own = gen.generate(5, torch.Generator().manual_seed(11)).images
    noise = torch.rand(4, *gen.image_shape, generator=torch.Generator().manual_seed(12))
    images = torch.cat([own, noise])
    s = quick(**kw)
    stop = torch.full((9,), 2e-4)
    batches = []
    real_step = ops.latent_adam_step_

    def spy(latent, *a, **k):
        batches.append(latent.shape[0])
        return real_step(latent, *a, **k)

    monkeypatch.setattr(ops, "latent_adam_step_", spy)
    whole = invert(gen, images, settings=s, seed=3, stop_below=stop, max_rows=9 * s.restarts)
    assert max(batches) == 9 * s.restarts
    batches.clear()
    fed = invert(gen, images, settings=s, seed=3, stop_below=stop, max_rows=2 * s.restarts)
    # the batch never exceeds its budget, and later images ran beside earlier ones: fewer steps
    # than 5 batches of 2 images one after another
    assert max(batches) <= 2 * s.restarts
    assert s.steps < len(batches) < 5 * s.steps
    assert sum(batches) >= int(fed.row_steps.sum())
    torch.testing.assert_close(fed.loss, whole.loss, rtol=1e-4, atol=1e-10)
    torch.testing.assert_close(fed.inputs, whole.inputs, rtol=1e-4, atol=1e-6)
    assert torch.equal(fed.row_steps, whole.row_steps)
    assert (fed.loss[:5] < 2e-4).all() and (fed.loss[5:] > 2e-4).all()


def test_stop_below_stops_early_and_keeps_verdict(gen):
    g = torch.Generator().manual_seed(5)
    own = gen.generate(4, g).images
    noise = torch.rand(4, *gen.image_shape, generator=g)
    images = torch.cat([own, noise])
    s = quick(steps=300)
    full = invert(gen, images, settings=s, seed=0)
    thr = 1e-3
    early = invert(gen, images, settings=s, seed=0, stop_below=thr)
    assert ((full.loss < thr) == (early.loss < thr)).all()
    assert early.row_steps[:4].sum() < full.row_steps[:4].sum()
    assert torch.equal(early.row_steps[4:], full.row_steps[4:])


def test_successive_halving_and_plateau_save_row_steps(gen):
    images = gen.generate(3, torch.Generator().manual_seed(6)).images
    plain = invert(gen, images, settings=quick(restarts=8, steps=200), seed=0)
    halved = invert(gen, images, settings=quick(restarts=8, steps=200, halving_every=50, min_rows=2), seed=0)
    assert (plain.row_steps == 8 * 200).all()
    # 8 rows for 50 steps, 4 for 50, 2 for the last 100
    assert (halved.row_steps == 8 * 50 + 4 * 50 + 2 * 100).all()
    assert (halved.loss < 1e-4).all()


def test_halving_between_checks_acts_at_the_next_check(gen):
    """halving_every need not be a multiple of check_every (10 here): a halving point between
    two checks acts at the next one, two at once keep a quarter."""
    images = gen.generate(2, torch.Generator().manual_seed(6)).images
    res = invert(gen, images, settings=quick(restarts=8, steps=100, halving_every=25), seed=0)
    # points 25, 50, 75 act at checks 30, 50, 80: 8 rows for 30 steps, 4 for 20, 2 for 30, 1 for 20
    assert (res.row_steps == 8 * 30 + 4 * 20 + 2 * 30 + 1 * 20).all()
    res = invert(gen, images, settings=quick(restarts=8, steps=100, halving_every=4), seed=0)
    # two or three points between checks: 8 * 0.5 ** 2 = 2 rows at the first check, then 1
    assert (res.row_steps == 8 * 10 + 2 * 10 + 1 * 80).all()


def test_halve_keeps_best_rows_per_image():
    loss = torch.tensor([5.0, 1.0, 3.0, 2.0, 9.0, 0.5, float("nan"), 4.0])
    index = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    keep = halve(loss, index, 0.5, 1)
    assert keep.tolist() == [False, True, False, True, False, True, False, True]
    keep = halve(loss, index, 0.25, 2)
    assert keep.sum() == 4


def test_unknown_class_is_searched_over_restarts():
    adapter = ConditionalGenerator(CondNet(), 4, num_classes=3)
    g = torch.Generator().manual_seed(0)
    batch = adapter.generate(6, g)
    res = invert(adapter, batch.images, settings=quick(restarts=2, steps=150), seed=0)
    assert torch.equal(res.conditions, batch.conditions)
    assert (res.loss < 1e-3).all()
    known = invert(adapter, batch.images, settings=quick(restarts=2, steps=150), seed=0, conditions=batch.conditions)
    assert (known.row_steps == 2 * 150).all() and (res.row_steps == 6 * 150).all()


def test_typical_set_projection_keeps_latents_on_the_shell(gen):
    images = gen.generate(2, torch.Generator().manual_seed(8)).images
    res = invert(gen, images, settings=quick(typical_set="project", steps=50), seed=0)
    torch.testing.assert_close(res.inputs.norm(dim=1), torch.full((2,), 8**0.5), rtol=1e-4, atol=1e-4)


def test_levenberg_marquardt_polish_does_not_hurt(gen):
    images = gen.generate(3, torch.Generator().manual_seed(9)).images
    s = quick(steps=40, restarts=2)
    before = invert(gen, images, settings=s, seed=0)
    after = invert(gen, images, settings=s.replace(polish_steps=8), seed=0)
    assert (after.loss <= before.loss * (1 + 1e-4)).all()
    assert after.loss.mean() < before.loss.mean()


def test_polish_leaves_solved_rows_and_solves_the_rest(gen):
    batch = gen.generate(3, torch.Generator().manual_seed(11))
    target = gen.decode_raw(batch.latents, None).detach()  # raw-range images, exactly reachable
    start = batch.latents.clone()
    start[1:] += 0.05 * torch.randn(2, 8, generator=torch.Generator().manual_seed(12))
    with torch.no_grad():
        before = (gen.decode_raw(start, None) - target).square().flatten(1).mean(1)
        z = polish(DenseLM(), gen, start, None, target, 30)
        after = (gen.decode_raw(z, None) - target).square().flatten(1).mean(1)
    assert before[0] == 0 and torch.equal(z[0], start[0])  # solved at the start: left alone
    assert bool((before[1:] > 1e-6).all()) and bool((after[1:] < 1e-10).all()), (before, after)
    assert polish(DenseLM(), gen, start, None, target, 30, metric="mae") is start  # MSE only


def test_reverse_mode_dense_polish_matches_forward_mode(gen):
    """polish_method="dense-rev" builds the same Jacobian by reverse mode (row by row, 128
    products at a time), so it takes the forward-mode polish's steps; conditional rows too."""
    batch = gen.generate(3, torch.Generator().manual_seed(11))
    target = gen.decode_raw(batch.latents, None).detach()
    start = batch.latents + 0.05 * torch.randn(3, 8, generator=torch.Generator().manual_seed(13))
    fwd = polish(DenseLM(), gen, start, None, target, 6)
    rev = polish(DenseLM(reverse=True), gen, start, None, target, 6)
    torch.testing.assert_close(rev, fwd, rtol=1e-4, atol=1e-6)
    assert not torch.allclose(rev, start)
    with torch.no_grad():
        after = (gen.decode_raw(rev, None) - target).square().flatten(1).mean(1)
    assert bool((after < 1e-10).all()), after

    torch.manual_seed(0)
    cgen = ConditionalGenerator(CondNet(), 4, num_classes=3)
    cond = torch.tensor([0, 2])
    z0 = torch.randn(2, 4, generator=torch.Generator().manual_seed(3))
    ctarget = cgen.decode_raw(z0, cond).detach()
    cstart = z0 + 0.05 * torch.randn(2, 4, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(polish(DenseLM(reverse=True), cgen, cstart, cond, ctarget, 4),
                               polish(DenseLM(), cgen, cstart, cond, ctarget, 4), rtol=1e-4, atol=1e-6)
    s = quick(steps=30, restarts=2, polish_steps=4, polish_method="dense-rev")
    images = gen.generate(2, torch.Generator().manual_seed(9)).images
    a = invert(gen, images, settings=s, seed=0)
    b = invert(gen, images, settings=s.replace(polish_method="dense"), seed=0)
    torch.testing.assert_close(a.loss, b.loss, rtol=1e-3, atol=1e-10)


@pytest.mark.parametrize("reverse", [False, True])
def test_dense_polish_builds_its_jacobians_in_chunks_with_the_same_steps(gen, monkeypatch, reverse):
    """The dense polish builds J^T J and J^T r a few rows at a time (memory: a chunk of 512
    images' Jacobians at once would not fit); one row per chunk takes the same steps as all rows
    in one, plain and conditional."""
    batch = gen.generate(5, torch.Generator().manual_seed(11))
    target = gen.decode_raw(batch.latents, None).detach()
    start = batch.latents + 0.05 * torch.randn(5, 8, generator=torch.Generator().manual_seed(13))
    out = target[0].numel()
    rows = dense_polish.dense_rows
    assert rows(8, out) >= 5  # the default: these rows in one chunk
    assert rows(8, out, cpu=True) >= 5
    # on CPU at most DENSE_CPU_PASSES forward-mode passes a chunk: one row of a 100-wide latent
    assert rows(100, 12288, cpu=True) == 1 and rows(100, 12288) == 27
    whole = polish(DenseLM(reverse=reverse), gen, start, None, target, 4)
    monkeypatch.setattr(dense_polish, "DENSE_CHUNK_ELEMENTS", 8 * out)  # one row per chunk
    assert rows(8, out) == 1 and rows(8, 10 * out) == 1
    split = polish(DenseLM(reverse=reverse), gen, start, None, target, 4)
    torch.testing.assert_close(split, whole, rtol=1e-5, atol=1e-7)
    assert not torch.allclose(split, start)

    torch.manual_seed(0)
    cgen = ConditionalGenerator(CondNet(), 4, num_classes=3)
    cond = torch.tensor([0, 2, 1])
    z0 = torch.randn(3, 4, generator=torch.Generator().manual_seed(3))
    ctarget = cgen.decode_raw(z0, cond).detach()
    cstart = z0 + 0.05 * torch.randn(3, 4, generator=torch.Generator().manual_seed(4))
    csplit = polish(DenseLM(reverse=reverse), cgen, cstart, cond, ctarget, 3)
    monkeypatch.setattr(dense_polish, "DENSE_CHUNK_ELEMENTS", 1 << 25)
    torch.testing.assert_close(csplit, polish(DenseLM(reverse=reverse), cgen, cstart, cond, ctarget, 3),
                               rtol=1e-5, atol=1e-7)


def test_forward_jacobian_in_blocks_of_columns_is_jacfwds_to_the_bit():
    """A row's Jacobian built a few forward-mode passes at a time (on CPU at most
    DENSE_CPU_COLUMNS, as the dense polish builds a wide latent's) is the one all columns in one
    pass give, to float32 rounding, and agrees with a float64 reference; under vmap over rows
    too."""
    from torch.func import jacfwd, vmap

    torch.manual_seed(int.from_bytes(__import__("os").urandom(4), "little"))
    net = small_dcgan()
    g = LatentGenerator(net, 8, (-1, 1))

    def f(q):
        return g.decode_raw(q.unsqueeze(0), None).flatten()

    z = torch.randn(3, 8)
    whole = vmap(jacfwd(f))(z)
    assert whole.shape == (3, 16 * 16, 8) and torch.isfinite(whole).all()
    for cols in (1, 3, 8, 100):
        got = vmap(lambda zr: dense_polish.forward_jacobian(f, zr, cols))(z)
        assert got.shape == whole.shape and torch.isfinite(got).all()
        assert float((got - whole).abs().max() / whole.abs().max()) < 1e-6
    net.double()
    try:
        ref = jacfwd(lambda q: net(q.view(1, 8)).flatten())(z[0].double())
    finally:
        net.float()
    err = float((dense_polish.forward_jacobian(f, z[0], 3).double() - ref).abs().max() / ref.abs().max())
    assert err < 1e-5
    assert dense_polish.dense_columns(256, cpu=True) == dense_polish.DENSE_CPU_COLUMNS < 256
    assert dense_polish.dense_columns(256) == 256 and dense_polish.dense_columns(4, cpu=True) == 4


def test_dense_polish_with_its_jacobians_built_in_blocks_of_columns_takes_the_same_steps(gen, monkeypatch):
    """On CPU a row's Jacobian is built DENSE_CPU_COLUMNS columns at a time: with blocks
    narrower than the latent, the same polish (to float32 rounding)."""
    batch = gen.generate(3, torch.Generator().manual_seed(21))
    target = gen.decode_raw(batch.latents, None).detach()
    start = batch.latents + 0.05 * torch.randn(3, 8, generator=torch.Generator().manual_seed(22))
    # one row per chunk both times (as a wide latent on CPU): only the columns' blocks differ
    monkeypatch.setattr(dense_polish, "DENSE_CHUNK_ELEMENTS", 8 * target[0].numel())
    whole = polish(DenseLM(), gen, start, None, target, 4)
    monkeypatch.setattr(dense_polish, "DENSE_CPU_COLUMNS", 3)  # 3 columns a block, the last one short
    assert dense_polish.dense_columns(8, cpu=True) == 3
    blocked = polish(DenseLM(), gen, start, None, target, 4)
    torch.testing.assert_close(blocked, whole, rtol=1e-5, atol=1e-7)
    assert not torch.allclose(blocked, start)


@pytest.mark.parametrize("reverse", [False, True])
def test_dense_polish_builds_no_jacobian_again_after_a_refused_step(gen, monkeypatch, reverse):
    """A row whose Levenberg-Marquardt step was refused has not moved: its J^T J and J^T r are
    reused (only the damping changes), so Jacobians are built for the first step and after each
    accepted one only."""
    built = []
    real_normal_equations = dense_polish._normal_equations

    def normal_equations(one, jac_map, zl, cl, live, fresh, *rest):  # the rows whose Jacobian is built
        built.append(fresh.numel())
        return real_normal_equations(one, jac_map, zl, cl, live, fresh, *rest)

    monkeypatch.setattr(dense_polish, "_normal_equations", normal_equations)
    # noise targets: no exact preimage, so steps are refused now and then, and no row leaves
    target = torch.rand(4, *gen.image_shape, generator=torch.Generator().manual_seed(5)) * 2 - 1
    start = torch.randn(4, 8, generator=torch.Generator().manual_seed(6))
    costs = [gen.decode_raw(start, None).sub(target).square().flatten(1).mean(1)]
    z = polish(DenseLM(reverse=reverse), gen, start, None, target, 8, report=lambda k, mse: costs.append(mse.clone()))
    assert len(costs) == 9
    accepted = [(costs[k] < costs[k - 1]).sum().item() for k in range(1, 9)]
    assert sum(accepted) < 4 * 8  # some steps were refused
    assert sum(built) == 4 + sum(accepted[:-1])  # the first step, then after each accepted one
    assert (costs[-1] <= costs[0]).all() and not torch.allclose(z, start)


def test_a_reuse_step_is_the_chord_step_of_the_last_jacobian(gen):
    """A reuse step solves the last step's damped normal equations with the residual at the row's
    new input: checked against a float64 reference (the Jacobian at the step's old input by
    forward mode, the solve in float64)."""
    from torch.func import jacfwd

    batch = gen.generate(3, torch.Generator().manual_seed(21))
    target = gen.decode_raw(batch.latents, None).detach()
    noise = torch.randn(3, 8, generator=torch.Generator().manual_seed(22))
    zl = batch.latents + 0.03 * noise  # where the Jacobian was built
    z1 = batch.latents + 0.01 * noise  # where the step took the rows

    def residual(z, c, rows):
        return (gen.decode_raw(z, c).float() - target[rows]).flatten(1)

    live = torch.arange(3)
    jac = torch.stack([jacfwd(lambda q: residual(q[None], None, live[k:k + 1])[0])(zl[k]) for k in range(3)])
    jtj = (jac.transpose(1, 2) @ jac).float()
    diag = torch.diagonal(jtj, dim1=1, dim2=2).unsqueeze(2)
    lam = torch.tensor([1e-3, 1e-2, 1e-1]).view(3, 1, 1)
    eye = torch.eye(8)
    with torch.no_grad():
        r1 = residual(z1, None, live)
    cost1 = r1.square().sum(1)
    better = torch.tensor([True, False, True])  # row 1 refused its step: no reuse step for it
    z, r, cost = dense_polish._reuse_steps(residual, z1.clone(), zl, None, live, better, jtj, lam, diag, eye,
                                           r1.clone(), cost1.clone(), 1)
    j64, jtj64, eye64 = jac.double(), jtj.double(), torch.eye(8, dtype=torch.float64)
    a64 = jtj64 + lam.double() * (diag.double() * eye64 + 1e-6 * eye64)
    want = z1.double() - torch.linalg.solve(a64, (j64.transpose(1, 2) @ r1.double().unsqueeze(2))).squeeze(2)
    assert torch.isfinite(z).all()
    torch.testing.assert_close(z[[0, 2]].double(), want[[0, 2]], rtol=1e-5, atol=1e-6)
    assert torch.equal(z[1], z1[1]) and torch.equal(cost[1], cost1[1])
    with torch.no_grad():
        torch.testing.assert_close(cost, residual(z, None, live).square().sum(1), rtol=1e-5, atol=1e-12)
    assert (cost[[0, 2]] < cost1[[0, 2]]).all()


@pytest.mark.parametrize("reverse", [False, True])
def test_reuse_steps_take_a_polish_further_for_the_jacobians_it_builds(gen, monkeypatch, reverse):
    """polish_reuse: the same number of Jacobians takes rows with an exact preimage lower, and a
    polish run to the end builds fewer of them; reuse steps are refused where they would raise
    the loss (noise targets end no higher than without them)."""
    built = []
    real_normal_equations = dense_polish._normal_equations

    def normal_equations(one, jac_map, zl, cl, live, fresh, *rest):
        built.append(fresh.numel())
        return real_normal_equations(one, jac_map, zl, cl, live, fresh, *rest)

    monkeypatch.setattr(dense_polish, "_normal_equations", normal_equations)
    batch = gen.generate(4, torch.Generator().manual_seed(11))
    target = gen.decode_raw(batch.latents, None).detach()
    start = batch.latents + 0.3 * torch.randn(4, 8, generator=torch.Generator().manual_seed(13))

    def mse(z):
        with torch.no_grad():
            return (gen.decode_raw(z, None) - target).square().flatten(1).mean(1)

    plain3 = mse(polish(DenseLM(reverse=reverse), gen, start, None, target, 3))
    reuse3 = mse(polish(DenseLM(reverse=reverse, reuse=8), gen, start, None, target, 3))
    assert reuse3.sum() < plain3.sum(), (plain3, reuse3)
    built.clear()
    assert bool((mse(polish(DenseLM(reverse=reverse), gen, start, None, target, 40)) < 1e-12).all())
    plain_built = sum(built)
    built.clear()
    assert bool((mse(polish(DenseLM(reverse=reverse, reuse=8), gen, start, None, target, 40)) < 1e-12).all())
    assert sum(built) < plain_built, (sum(built), plain_built)
    noise = torch.rand(4, *gen.image_shape, generator=torch.Generator().manual_seed(5)) * 2 - 1
    zs = torch.randn(4, 8, generator=torch.Generator().manual_seed(6))
    z = polish(DenseLM(reverse=reverse, reuse=8), gen, zs, None, noise, 5)
    with torch.no_grad():
        assert ((gen.decode_raw(z, None) - noise).square().flatten(1).mean(1)
                <= (gen.decode_raw(zs, None) - noise).square().flatten(1).mean(1)).all()


def test_polish_reuse_is_a_setting_each_image_gets_alone_or_in_a_batch(gen):
    s = quick(steps=30, restarts=2, polish_steps=3, polish_reuse=6)
    assert s.to_dict()["polish_reuse"] == 6 and "polish_reuse" not in quick().to_dict()
    assert InversionSettings.from_dict(s.to_dict()) == s
    images = gen.generate(3, torch.Generator().manual_seed(9)).images
    both = invert(gen, images, settings=s, seed=0)
    assert not torch.equal(both.loss, invert(gen, images, settings=s.replace(polish_reuse=0), seed=0).loss)
    for k in range(3):
        alone = invert(gen, images[k:k + 1], settings=s, seed=0)
        assert torch.equal(alone.loss[0], both.loss[k]) and torch.equal(alone.inputs[0], both.inputs[k])
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="polish_reuse must be an integer >= 0"):
            quick(polish_reuse=bad)
        with pytest.raises(ValueError, match="reuse must be an integer >= 0"):
            DenseLM(reuse=bad)
    from ronan_fast.metrics import ToneMSE

    assert DenseLM(reuse=4).reuse == 4 and DenseLM(tone=ToneMSE(), reuse=4).reuse == 0  # plain residuals only


def test_matrix_free_polish_leaves_solved_rows_and_solves_the_rest(gen):
    """The conjugate-gradient polish (no Jacobian formed) reaches what the dense one reaches."""
    batch = gen.generate(3, torch.Generator().manual_seed(11))
    target = gen.decode_raw(batch.latents, None).detach()
    start = batch.latents.clone()
    start[1:] += 0.05 * torch.randn(2, 8, generator=torch.Generator().manual_seed(12))
    with torch.no_grad():
        before = (gen.decode_raw(start, None) - target).square().flatten(1).mean(1)
    z = polish(ConjugateGradientLM(cg_iters=8), gen, start, None, target, 30)
    assert not z.requires_grad
    with torch.no_grad():
        after = (gen.decode_raw(z, None) - target).square().flatten(1).mean(1)
    assert before[0] == 0 and torch.equal(z[0], start[0])
    assert bool((before[1:] > 1e-6).all()) and bool((after[1:] < 1e-10).all()), (before, after)
    assert polish(ConjugateGradientLM(), gen, start, None, target, 30, metric="mae") is start


class _Counting:
    """A generator that records how many rows each decode call carries."""

    def __init__(self, g):
        self.g, self.sizes = g, []

    def decode_raw(self, z, c):
        self.sizes.append(z.shape[0])
        return self.g.decode_raw(z, c)


@pytest.mark.parametrize("method", ["dense", "cg"])
def test_polish_stops_levelled_off_rows_and_rows_under_stop(gen, method):
    method = DenseLM() if method == "dense" else ConjugateGradientLM(cg_iters=8)
    batch = gen.generate(2, torch.Generator().manual_seed(11))
    with torch.no_grad():
        reach = gen.decode_raw(batch.latents, None)
    # row 0 is exactly reachable; row 1 is noise, whose loss levels off far above 0
    target = torch.stack([reach[0], torch.rand(reach[1].shape, generator=torch.Generator().manual_seed(3)) * 2 - 1])
    start = batch.latents + 0.05 * torch.randn(2, 8, generator=torch.Generator().manual_seed(12))

    def mse(z):
        with torch.no_grad():
            return (gen.decode_raw(z, None) - target).square().flatten(1).mean(1)

    runs = {}
    for patience in (0, 3):
        g = _Counting(gen)
        z = polish(method, g, start, None, target, 40, patience=patience, min_drop=0.3)
        runs[patience] = (z, len(g.sizes))
        assert float(mse(z)[0]) < 1e-10  # the reachable row is solved either way
    # without the plateau rule the noise row goes on after the reachable row is solved; with it
    # the noise row leaves after a few steps
    assert runs[3][1] < runs[0][1] / 2, (runs[0][1], runs[3][1])
    assert float(mse(runs[3][0])[1]) > 0.1
    # a row already under its stop_below leaves at once and keeps its input
    z = polish(method, gen, start, None, target, 40, stop_raw=torch.tensor([0.0, 10.0]))
    assert torch.equal(z[1], start[1]) and float(mse(z)[0]) < 1e-10
    with pytest.raises(ValueError, match="polish_min_drop must lie in"):
        InversionSettings(polish_min_drop=1.0)
    with pytest.raises(ValueError, match="polish_patience must be an integer >= 0"):
        InversionSettings(polish_patience=-1)


@pytest.mark.parametrize("method", ["dense", "cg"])
def test_polish_through_invert_stops_under_stop_below(gen, method):
    """stop_below is in [0, 1]-image MSE units; the polish works in the generator's raw range."""
    images = gen.generate(2, torch.Generator().manual_seed(9)).images
    s = quick(steps=30, restarts=2, polish_method=method, polish_cg_iters=8)
    adam = invert(gen, images, settings=s, seed=0).loss
    full = invert(gen, images, settings=s.replace(polish_steps=30), seed=0).loss
    assert bool((full < adam * 1e-3).all()), (adam, full)
    stop = (adam * full).sqrt()  # halfway on the log scale
    got = invert(gen, images, settings=s.replace(polish_steps=30), seed=0, stop_below=stop).loss
    assert bool((got < stop).all()) and bool((got >= full * (1 - 1e-3)).all()), (stop, got, full)


def test_polish_gets_stop_below_in_raw_units(monkeypatch):
    seen = {}

    def spy(self, generator, inputs, cond, target_raw, steps, leaving, report=None, clip=None):
        seen.update(stop_raw=leaving.stop_raw, patience=leaving.patience, min_drop=leaving.min_drop)
        return PolishResult(inputs, torch.zeros(inputs.shape[0]))

    monkeypatch.setattr(DenseLM, "__call__", spy)
    g = LatentGenerator(small_dcgan(), 8, (-2.0, 1.0))  # raw range 3 wide: raw MSE = 9 x [0, 1] MSE
    images = torch.rand(2, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    invert(g, images, settings=quick(steps=5, polish_steps=3, polish_patience=4, polish_min_drop=0.5), seed=0,
           stop_below=torch.tensor([1e-9, 2e-9]))
    torch.testing.assert_close(seen["stop_raw"], torch.tensor([9e-9, 18e-9]), rtol=1e-5, atol=0)
    assert (seen["patience"], seen["min_drop"]) == (4, 0.5)


@pytest.mark.parametrize("method", ["dense", "cg"])
def test_polishing_more_candidates_per_image_keeps_the_best(gen, method):
    """With polish_candidates=k each image's k lowest Adam rows are polished and the lowest
    result wins: never worse than polishing the best row alone (rows are polished independently),
    and the reported loss is the reported reconstruction's."""
    own = gen.generate(8, torch.Generator().manual_seed(11)).images
    images = torch.cat([own, torch.rand(2, *gen.image_shape, generator=torch.Generator().manual_seed(12))])
    # few steps of each phase: the best Adam row is not always the one the polish takes furthest
    s = quick(steps=3, restarts=6, polish_steps=3, polish_method=method, polish_cg_iters=8)
    one = invert(gen, images, settings=s, seed=0)
    two = invert(gen, images, settings=s.replace(polish_candidates=3), seed=0)
    assert (two.loss <= one.loss * (1 + 1e-4) + 1e-12).all(), (one.loss, two.loss)
    assert (two.loss < 0.5 * one.loss).any(), (one.loss, two.loss)
    direct = (two.reconstruction - images).square().flatten(1).mean(1)
    torch.testing.assert_close(two.loss, direct, rtol=1e-4, atol=1e-9)
    # more candidates than starts: every start is polished, nothing breaks
    every = invert(gen, images, settings=s.replace(polish_candidates=9), seed=0)
    assert (every.loss <= two.loss * (1 + 1e-4) + 1e-12).all()
    # under stop_below the verdict is settled: an image whose Adam loss is under it is not polished
    adam = invert(gen, images, settings=s.replace(polish_steps=0), seed=0).loss
    stop = torch.cat([2 * adam[:8], torch.zeros(2)])  # own images settled after Adam, noise not
    settled = invert(gen, images, settings=s.replace(polish_steps=0), seed=0, stop_below=stop).loss
    assert (settled[:8] < stop[:8]).all()
    got = invert(gen, images, settings=s.replace(polish_candidates=2), seed=0, stop_below=stop).loss
    torch.testing.assert_close(got[:8], settled[:8], rtol=1e-5, atol=1e-12)
    assert (got[8:] < settled[8:]).all()
    with pytest.raises(ValueError, match="polish_candidates"):
        InversionSettings(polish_candidates=0)
    assert "polish_candidates" not in InversionSettings().to_dict()
    assert InversionSettings(polish_candidates=2).to_dict()["polish_candidates"] == 2


def test_escalation_polishes_more_starts_only_where_the_verdict_is_in_doubt(gen, monkeypatch):
    """polish_escalate=e: an image whose polished row ended above its stop_below but within
    escalate_within times it gets its next e best Adam rows polished, the lowest loss winning;
    images far above their threshold, or under it, are left as they were; no threshold, no
    escalation."""
    own = gen.generate(8, torch.Generator().manual_seed(11)).images
    images = torch.cat([own, torch.rand(2, *gen.image_shape, generator=torch.Generator().manual_seed(12))])
    s = quick(steps=3, restarts=6, polish_steps=3, polish_cg_iters=8)
    plain = invert(gen, images, settings=s, seed=0).loss
    # images 0-5 in doubt (their polished loss is 2x the threshold), 6-7 far above it (10x), 8-9 under it
    stop = torch.cat([plain[:6] / 2, plain[6:8] / 10, plain[8:] * 2])
    groups = []
    real = DenseLM.__call__

    def spy(self, generator, inputs, cond, target_raw, steps, leaving, report=None, clip=None):
        groups.append(leaving.group.tolist())
        return real(self, generator, inputs, cond, target_raw, steps, leaving, report, clip)

    monkeypatch.setattr(DenseLM, "__call__", spy)
    one = invert(gen, images, settings=s, seed=0, stop_below=stop)
    assert len(groups) == 1
    groups.clear()
    esc = invert(gen, images, settings=s.replace(polish_escalate=2), seed=0, stop_below=stop)
    doubt = [i for i in range(10) if stop[i] <= one.loss[i] < 4 * stop[i]]
    assert doubt == list(range(6)), (one.loss / stop)
    # the first polish as before, then the images in doubt, two more starts each
    assert groups[1] == [i for i in doubt for _ in range(2)], groups
    torch.testing.assert_close(esc.loss[6:], one.loss[6:], rtol=0, atol=0)
    assert (esc.loss[:6] <= one.loss[:6]).all() and (esc.loss[:6] < one.loss[:6]).any(), (one.loss, esc.loss)
    direct = (esc.reconstruction - images).square().flatten(1).mean(1)
    torch.testing.assert_close(esc.loss, direct, rtol=1e-4, atol=1e-9)  # the reported loss is its reconstruction's
    # without a threshold nothing is in doubt
    torch.testing.assert_close(invert(gen, images, settings=s.replace(polish_escalate=2), seed=0).loss, plain,
                               rtol=0, atol=0)
    for bad in (dict(polish_escalate=-1), dict(escalate_within=1.0), dict(escalate_within=float("inf"))):
        with pytest.raises(ValueError, match=next(iter(bad))):
            InversionSettings(**bad)
    authors = PRESETS["authors"].to_dict()  # settings made before escalation keep their identity
    assert "polish_escalate" not in authors and "escalate_within" not in authors
    assert InversionSettings().to_dict()["polish_escalate"] == 2  # the package default escalates


def test_settle_rule_takes_rows_levelled_off_far_above_the_threshold_out_of_the_polish():
    """Leaving with ``settle=(w, drop, above)``: a row over ``above`` times its threshold whose
    loss fell by less than ``drop`` over the last ``w`` steps leaves; a row
    still falling, or levelled off within ``above`` times its threshold, stays; no threshold,
    no rule."""
    stop = torch.tensor([1.0, 1.0, 1.0, 1.0])
    # per step k: row 0 flat at 100x, row 1 falling by half each step, row 2 flat at 3x,
    # row 3 flat at 100x but solved (under its threshold) at step 2
    costs = [torch.tensor([100.0, 100.0 * 0.5 ** k, 3.0, 100.0 if k < 2 else 0.5]) for k in range(6)]
    live = torch.arange(4)
    leave = Leaving(4, 0, 0.3, stop, settle=(2, 0.2, 4.0))
    seen = []
    for k, c in enumerate(costs):
        done = leave(k, c[live], 1, torch.zeros(live.numel(), dtype=torch.bool), live)
        seen.append(live[done].tolist())
        live = live[~done]
    assert seen[:3] == [[], [], [0, 3]], seen  # row 0 at step 2 (two steps flat), row 3 solved
    # row 3 leaves as solved, by the threshold alone; row 0 only by the settle rule
    plain = Leaving(4, 0, 0.3, stop)
    assert [plain(k, c, 1, torch.zeros(4, dtype=torch.bool), torch.arange(4)).tolist()
            for k, c in enumerate(costs)][2] == [False, False, False, True]
    assert 2 in live.tolist() and 1 in live.tolist()
    # without a threshold the rule does nothing
    bare = Leaving(4, 0, 0.3, None, settle=(2, 0.2, 4.0))
    assert not any(bool(bare(k, c, 1, torch.zeros(4, dtype=torch.bool), torch.arange(4)).any())
                   for k, c in enumerate(costs))
    # with the plateau rule as well: both rings read the right step
    both = Leaving(4, 3, 0.5, stop, settle=(1, 0.2, 4.0))
    got = [both(k, c, 1, torch.zeros(4, dtype=torch.bool), torch.arange(4)).tolist() for k, c in enumerate(costs)]
    assert got[0] == [False] * 4
    assert got[1] == [True, False, False, True]  # settled after one flat step: the rows flat at 100x
    assert got[2] == [True, False, False, True]  # row 2 (3x) is no settle case; the plateau rule waits 3 steps
    assert got[3] == [True, False, True, True]  # now the plateau (under half off over 3 steps) takes row 2


def test_settle_rule_shortens_the_polish_of_images_far_above_their_threshold_only(gen, monkeypatch):
    """settle_patience=w: with a threshold, noise images (far above it, levelled off) leave the
    Levenberg-Marquardt polish after a few steps; without one, the inversion is bit-identical."""
    noise = torch.rand(3, *gen.image_shape, generator=torch.Generator().manual_seed(12))
    s = quick(steps=30, restarts=2, polish_steps=30)
    steps_run = []
    real = DenseLM.__call__

    def spy(self, generator, inputs, cond, target_raw, steps, leaving, report=None, clip=None):
        calls = []
        out = real(self, generator, inputs, cond, target_raw, steps, leaving, lambda k, mse: calls.append(k))
        steps_run.append(len(calls))
        return out

    monkeypatch.setattr(DenseLM, "__call__", spy)
    stop = torch.full((3,), 1e-9)  # far under any noise image's loss
    plain = invert(gen, noise, settings=s, seed=0, stop_below=stop)
    settled = invert(gen, noise, settings=s.replace(settle_patience=3), seed=0, stop_below=stop)
    assert steps_run[1] < steps_run[0], steps_run
    assert (settled.loss >= plain.loss * (1 - 1e-5)).all() and (settled.loss < 2 * plain.loss).all()
    direct = (settled.reconstruction - noise).square().flatten(1).mean(1)
    torch.testing.assert_close(settled.loss, direct, rtol=1e-4, atol=1e-9)
    # no threshold: the rule is off
    torch.testing.assert_close(invert(gen, noise, settings=s.replace(settle_patience=3), seed=0).loss,
                               invert(gen, noise, settings=s, seed=0).loss, rtol=0, atol=0)
    for bad in (dict(settle_patience=-1), dict(settle_min_drop=0.0), dict(settle_min_drop=1.0),
                dict(settle_above=1.0), dict(settle_above=float("nan"))):
        with pytest.raises(ValueError, match=next(iter(bad))):
            InversionSettings(**bad)
    assert not any(k.startswith("settle_") for k in PRESETS["authors"].to_dict())


@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_an_autocast_adam_phase_settles_verdicts_in_float32(gen, monkeypatch, precision):
    """Under autocast the Adam phase's losses are not the final (float32) score: an image they put
    under its threshold is measured again in float32 before the polish and polished if it is not
    under it there. Simulated by making the Adam phase's best losses read 1000x too low."""
    images = gen.generate(4, torch.Generator().manual_seed(21)).images
    s = quick(steps=3, restarts=2, check_every=1, precision=precision, polish_steps=2)
    adam_end = invert(gen, images, settings=s.replace(polish_steps=0), seed=0).loss  # float32 at Adam's end
    stop = adam_end * 0.5
    best = ops.best_over_restarts
    monkeypatch.setattr(ops, "best_over_restarts", lambda loss, *a, **k: (lambda r: (r[0] * 1e-3, r[1]))(
        best(loss, *a, **k)))
    groups = []
    real = DenseLM.__call__

    def spy(self, generator, inputs, cond, target_raw, steps, leaving, report=None, clip=None):
        groups.append(sorted(set(leaving.group.tolist())))
        return real(self, generator, inputs, cond, target_raw, steps, leaving, report, clip)

    monkeypatch.setattr(DenseLM, "__call__", spy)
    res = invert(gen, images, settings=s, seed=0, stop_below=stop)
    if precision == "bf16":
        assert groups == [[0, 1, 2, 3]], groups  # all four measured over their threshold, all polished
        assert (res.loss < adam_end).all()
    else:
        assert groups == [], groups  # float32 losses are the score: taken as they are, nothing re-measured


@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_an_autocast_loss_stops_a_row_only_once_float32_confirms_it(gen, monkeypatch, precision):
    """Without a polish to catch it, a row whose autocast loss reads under its threshold is measured
    again in float32 before it stops, and goes on (its threshold lowered) if it is not under it
    there: its verdict is not flipped by the lower precision. Simulated by making the Adam phase's
    losses read 1000x too low; in float32 the losses are the score and nothing is measured twice."""
    from ronan_fast.inversion.problem import Loss

    images = gen.generate(4, torch.Generator().manual_seed(22)).images
    s = quick(steps=150, restarts=2, check_every=5, precision=precision)
    assert s.polish_steps == 0
    plain = invert(gen, images, settings=s.replace(steps=60), seed=0)
    stop = plain.loss * 2  # reached in 60 steps: well before the end of the budget
    adam = ops.latent_adam_step_
    if precision == "bf16":
        monkeypatch.setattr(ops, "latent_adam_step_",
                            lambda z, g, m, v, st, lr, act, loss, *a, **k: adam(z, g, m, v, st, lr, act, loss * 1e-3,
                                                                                *a, **k))
    calls = []
    on_unit = Loss.on_unit
    monkeypatch.setattr(Loss, "on_unit", lambda self, recon, images, rows=None, clipped=None: calls.append(
                        recon.shape[0]) or on_unit(self, recon, images, rows, clipped))
    res = invert(gen, images, settings=s, seed=0, stop_below=stop)
    assert (res.loss < stop).all(), (res.loss / stop)  # each image under its threshold, as it really is
    assert (res.row_steps > 2 * s.check_every).all()  # not stopped at the first check on a loss read too low
    assert (res.row_steps < 2 * s.steps).all()  # but still stopped early, once confirmed
    direct = (res.reconstruction - images).square().flatten(1).mean(1)
    torch.testing.assert_close(res.loss, direct, rtol=1e-4, atol=1e-9)
    if precision == "fp32":
        assert calls == [4], calls  # the final score only
    else:
        assert len(calls) > 1 and sum(calls[:-1]) >= 8, calls  # every row measured again before stopping


def test_escalation_never_names_a_polished_row_again_on_tied_losses():
    """The rows escalation adds are each image's next best among rows not yet polished, also when
    Adam losses tie exactly (identical starts), where ranks k.. of a longer topk may repeat one."""
    from ronan_fast.inversion.finish import next_ranked

    inf = float("inf")
    ranked = torch.tensor([[1.0, 1.0, 1.0, 1.0],     # all tied
                           [3.0, 1.0, 1.0, 2.0],     # a tie between the polished row and the next
                           [0.5, inf, 0.7, 0.6]])    # a non-finite loss ranks last
    polished = torch.tensor([2, 4 + 1, 8 + 0])       # one polished row per image (k = 1)
    for images, extra in ((torch.tensor([0, 1, 2]), 2), (torch.tensor([1, 2]), 3), (torch.tensor([0]), 1)):
        more = next_ranked(ranked, polished, images, extra).view(-1, extra)
        for row, i in zip(more.tolist(), images.tolist()):
            assert len(set(row)) == extra and not set(row) & set(polished.tolist()), (i, row)
            assert all(i * 4 <= r < i * 4 + 4 for r in row), (i, row)
            # the lowest losses left, in order
            left = sorted(ranked[i, j].item() for j in range(4) if i * 4 + j not in polished.tolist())
            assert [ranked.flatten()[r].item() for r in row] == left[:extra], (i, row)
    # two polished rows per image (k = 2), tied with the rest
    more = next_ranked(ranked[:1], torch.tensor([0, 3]), torch.tensor([0]), 2)
    assert sorted(more.tolist()) == [1, 2]
    with pytest.raises(ValueError, match="extra"):
        next_ranked(ranked, polished, torch.tensor([0]), 4)


@pytest.mark.parametrize("method", ["dense", "cg", "gmres"])
def test_polished_starts_of_an_image_stop_once_one_settles_its_verdict(gen, method):
    """Grouped rows (the polished starts of one image) leave together once one of them is under
    its stop_raw; other images' rows are not affected, and without a stop_raw nothing is grouped."""
    g = _square_gen() if method == "gmres" else gen
    width = 16 if method == "gmres" else 8
    batch = g.generate(2, torch.Generator().manual_seed(11))
    with torch.no_grad():
        reach = g.decode_raw(batch.latents, None)
    far = batch.latents + 0.5 * torch.randn(2, width, generator=torch.Generator().manual_seed(12))
    # rows: image 0 from its own latent (settled at once), image 0 from afar, image 1 from afar
    start = torch.stack([batch.latents[0], far[0], far[1]])
    target = torch.stack([reach[0], reach[0], reach[1]])
    group = torch.tensor([0, 0, 1])
    stop_raw = torch.full((3,), 1e-8)
    method = {"dense": DenseLM(), "cg": ConjugateGradientLM(cg_iters=8), "gmres": GMRESGaussNewton(krylov=8)}[method]
    done = torch.zeros(2, dtype=torch.bool)
    z = polish(method, g, start, None, target, 5, stop_raw=stop_raw, group=group, done_groups=done)
    assert bool(done[0]) and torch.equal(z[1], start[1])  # left with its sibling, untouched
    assert not torch.equal(z[2], start[2])  # image 1 went on
    ungrouped = polish(method, g, start, None, target, 5, stop_raw=stop_raw)
    assert not torch.equal(ungrouped[1], start[1])
    torch.testing.assert_close(ungrouped[2], z[2], rtol=1e-5, atol=1e-6)  # batched with other rows: rounding
    # no stop_raw: no verdict to settle, the rows run as without groups
    free = polish(method, g, start, None, target, 5, group=group, done_groups=torch.zeros(2, dtype=torch.bool))
    torch.testing.assert_close(free, polish(method, g, start, None, target, 5), rtol=0, atol=0)
    if isinstance(method, GMRESGaussNewton):  # the sibling is reported settled: it is not handed on to CG
        leaving = Leaving(3, stop_raw=stop_raw, group=group, done_groups=torch.zeros(2, dtype=torch.bool))
        assert unsettled(method(g, start, None, target, 5, leaving), leaving).tolist() == [False, False, True]


def test_invert_with_two_polished_starts_stops_the_sibling_under_stop_below(gen, monkeypatch):
    """Through invert: with stop_below and polish_candidates=2, an image's second polished start
    stops once the first is under stop_below. The verdicts are those of polishing both to the end,
    for fewer generator rows."""
    from ronan_fast.inversion import finish

    own = gen.generate(6, torch.Generator().manual_seed(21)).images
    images = torch.cat([own, torch.rand(2, *gen.image_shape, generator=torch.Generator().manual_seed(22))])
    s = quick(steps=20, restarts=4, polish_steps=30, polish_method="cg", polish_cg_iters=8, polish_candidates=2)
    stop = torch.full((8,), 1e-9)

    class Ungrouped(Leaving):  # the same polish with the grouping switched off
        def __init__(self, n, patience, min_drop, stop_raw, group=None, done_groups=None, settle=None):
            super().__init__(n, patience, min_drop, stop_raw, settle=settle)

    counted = []
    real = gen.decode_raw
    monkeypatch.setattr(gen, "decode_raw", lambda z, c=None: counted.append(z.shape[0]) or real(z, c))

    def run(leaving_cls):
        monkeypatch.setattr(finish, "Leaving", leaving_cls)
        counted.clear()
        res = invert(gen, images, settings=s, seed=0, stop_below=stop, call_rows=1)  # count rows, not blocks
        return res, sum(counted)

    grouped, n_grouped = run(Leaving)
    ungrouped, n_ungrouped = run(Ungrouped)
    assert torch.equal(grouped.loss < stop, ungrouped.loss < stop)
    assert bool((grouped.loss[:6] < stop[:6]).all()), grouped.loss  # own images settle in the polish
    assert n_grouped < n_ungrouped, (n_grouped, n_ungrouped)


def test_matrix_free_polish_through_invert_and_its_settings(gen):
    images = gen.generate(3, torch.Generator().manual_seed(9)).images
    s = quick(steps=40, restarts=2)
    before = invert(gen, images, settings=s, seed=0)
    after = invert(gen, images, settings=s.replace(polish_steps=8, polish_method="cg", polish_cg_iters=8), seed=0)
    assert (after.loss <= before.loss * (1 + 1e-4)).all()
    assert after.loss.mean() < 0.1 * before.loss.mean(), (before.loss, after.loss)
    with pytest.raises(ValueError, match="polish_method must be one of"):
        InversionSettings(polish_method="lbfgs")
    with pytest.raises(ValueError, match="polish_cg_iters"):
        InversionSettings(polish_cg_iters=0)
    # fields added later are written only when set, so earlier identities stay the same
    d = InversionSettings().to_dict()
    assert "polish_method" not in d and "polish_cg_iters" not in d and InversionSettings.from_dict(d) == InversionSettings()
    cg = InversionSettings(polish_method="cg", polish_cg_iters=5)
    assert cg.to_dict()["polish_method"] == "cg" and InversionSettings.from_dict(cg.to_dict()) == cg


def test_precision_bf16_runs_and_stays_close(gen):
    images = gen.generate(3, torch.Generator().manual_seed(10)).images
    res = invert(gen, images, settings=quick(precision="bf16"), seed=0)
    assert torch.isfinite(res.loss).all() and (res.loss < 1e-2).all()


def test_authors_preset_and_overrides(gen):
    s = resolve_settings(gen, "authors")
    assert (s.steps, s.lr, s.restarts, s.schedule) == (1500, 0.1, 1, "constant")
    assert resolve_settings(gen, "authors", steps=10).steps == 10
    # the earlier GAN default stays selectable by name: the current one but for its starts
    old = resolve_settings(gen, "gan-8-starts")
    assert (old.restarts, old.halving_every, old.polish_escalate) == (8, 100, 0)
    assert old.replace(restarts=24, halving_every=25, polish_escalate=2) == resolve_settings(gen, "default")
    with pytest.raises(ValueError, match="settings must be one of"):
        resolve_settings(gen, "fastest")
    with pytest.raises(TypeError, match="unknown inversion setting"):
        s.replace(stepz=3)


def test_family_defaults():
    """Each family's default: the one-step ("consistency") family ends with the matrix-free
    polish; the class-conditional family adds the GAN family's polish to the fallback; families
    without a tuned default share the fallback."""
    from ronan_fast.inversion import FALLBACK_DEFAULT

    def adapter(family, width):
        return LatentGenerator(nn.Sequential(nn.Linear(width, 16), nn.Tanh(), nn.Unflatten(1, (1, 4, 4))), width,
                               family=family)

    assert resolve_settings(adapter("gan", 8)) == FAMILY_DEFAULTS["gan"] == InversionSettings()  # the package's
    # the paper's loop keeps the identity profiles fitted with it have always had
    assert PRESETS["authors"].to_dict() == {
        "steps": 1500, "lr": 0.1, "restarts": 1, "schedule": "constant", "warmup": 0, "min_lr_frac": 0.0, "cycles": 3,
        "metric": "mse", "precision": "fp32", "halving_every": 0, "halving_keep": 0.5, "min_rows": 1, "patience": 0,
        "rel_tol": 0.001, "typical_set": "none", "penalty": 0.0, "polish_steps": 0, "beta1": 0.9, "beta2": 0.999,
        "eps": 1e-08, "check_every": 25}
    assert resolve_settings(adapter("gan", 8)).polish_method == "dense"
    cons = resolve_settings(adapter("consistency", 16), "default")
    assert cons == FAMILY_DEFAULTS["consistency"] and cons.polish_method == "cg" and cons.polish_steps > 0
    assert cons.polish_gmres_iters > 0  # a one-step model's latent is as wide as its image: GMRES first
    assert cons.polish_candidates == 2  # each image's two best starts are polished
    for family in ("vae", "diffusion", "something-new"):
        assert resolve_settings(adapter(family, 8)) == FALLBACK_DEFAULT
    # class-conditional: the fallback's Adam phase, then the GAN family's dense polish
    cond = resolve_settings(adapter("conditional", 8))
    assert cond == FALLBACK_DEFAULT.replace(polish_steps=25, polish_method="dense", settle_patience=6,
                                            polish_escalate=2)


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(steps=0), "steps must be an integer >= 1"),
        (dict(lr=-1.0), "lr must be a finite number > 0"),
        (dict(schedule="linear"), "schedule must be one of"),
        (dict(precision="fp8"), "precision must be one of"),
        (dict(halving_keep=1.5), "halving_keep must lie in"),
    ],
)
def test_bad_settings_name_the_argument(kw, match):
    with pytest.raises(ValueError, match=match):
        InversionSettings(**kw)


def test_bad_images_name_the_problem(gen):
    s = quick(steps=2)
    with pytest.raises(ValueError, match="resize/convert"):
        invert(gen, torch.rand(2, 3, 16, 16), settings=s)
    bad = torch.rand(2, *gen.image_shape)
    bad[1, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"NaN or Inf \(images \[1\]\)"):
        invert(gen, bad, settings=s)
    with pytest.raises(ValueError, match="must lie in \\[0, 1\\]"):
        invert(gen, torch.rand(2, *gen.image_shape) * 255, settings=s)
    with pytest.raises(ValueError, match="empty"):
        invert(gen, torch.rand(0, *gen.image_shape), settings=s)
    with pytest.raises(TypeError, match="images must be a float tensor"):
        invert(gen, [[0.0]], settings=s)


def test_generator_returning_nan_or_wrong_shape_is_refused():
    class NaNNet(nn.Module):
        def forward(self, z):
            return torch.full((z.shape[0], 1, 8, 8), float("nan"))

    class Shape(nn.Module):
        def __init__(self):
            super().__init__()
            self.n = 0

        def forward(self, z):
            self.n += 1
            return torch.zeros(z.shape[0], 1, 8, 8 if self.n == 1 else 9)

    adapter = LatentGenerator(NaNNet(), 4, (-1, 1))
    with pytest.raises(GeneratorOutputError, match="NaN"):
        invert(adapter, torch.rand(1, 1, 8, 8), settings=quick(steps=2))
    with pytest.raises(GeneratorOutputError, match="NaN"):
        adapter.generate(2)
    adapter = LatentGenerator(Shape(), 4, (-1, 1))
    with pytest.raises(GeneratorOutputError, match="returned shape"):
        invert(adapter, torch.rand(1, 1, 8, 8), settings=quick(steps=2))


def _square_gen(width: int = 16, seed: int = 0) -> LatentGenerator:
    """A one-step-like generator: a latent exactly as wide as its image (a square Jacobian)."""
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(width, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(),
                        nn.Unflatten(1, (1, 4, width // 4)))
    return LatentGenerator(net, width, (-1, 1), family="consistency")


def test_gmres_minimises_the_residual_over_the_krylov_space():
    """Against float64 references on fresh random systems: with the full space it is J^-1 (-r);
    with k < n iterations it is the least-squares solution over span(r, J r, ... J^(k-1) r)."""
    from ronan_fast.inversion.polish.gmres import gmres

    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, (1,))))
    m, n = 5, 12
    a = torch.randn(m, n, n, generator=g, dtype=torch.float64) / n**0.5 + 2 * torch.eye(n, dtype=torch.float64)
    r = torch.randn(m, n, generator=g, dtype=torch.float64)

    def jv(v):
        return (a @ v.unsqueeze(2)).squeeze(2)

    full = gmres(jv, r, n)
    exact = torch.linalg.solve(a, -r.unsqueeze(2)).squeeze(2)
    torch.testing.assert_close(full, exact, rtol=1e-8, atol=1e-10)
    k = 4
    got = gmres(jv, r, k)
    krylov = [r]
    for _ in range(k - 1):
        krylov.append(jv(krylov[-1]))
    basis = torch.stack(krylov, 2)  # [m, n, k]
    coef = torch.linalg.lstsq(a @ basis, -r.unsqueeze(2)).solution
    want = (basis @ coef).squeeze(2)
    torch.testing.assert_close(got, want, rtol=1e-7, atol=1e-9)
    assert (r + jv(got)).norm(dim=1).lt(r.norm(dim=1)).all()  # it descends
    # float32, the polish's precision: same answer to float32 accuracy, no NaN
    got32 = gmres(lambda v: jv(v.double()).float(), r.float(), k)
    assert torch.isfinite(got32).all()
    torch.testing.assert_close(got32.double(), want, rtol=1e-4, atol=1e-5)


def test_gmres_polish_solves_own_images_of_a_square_generator():
    """With the whole Krylov space, a GMRES step is the Newton step: own images of a square
    generator are solved in a few steps and reported settled."""
    gen = _square_gen()
    own = gen.generate(4, torch.Generator().manual_seed(2)).images
    start = invert(gen, own, settings=quick(steps=20, restarts=1), seed=0)
    seen = []
    leaving = Leaving(4)
    res = GMRESGaussNewton(krylov=16)(gen, start.inputs, None, gen.from_unit(own), 30, leaving,
                                      report=lambda k, mse: seen.append(mse.clone()))
    z, open_ = res.inputs, unsettled(res, leaving)
    with torch.no_grad():
        after = (gen.to_unit(gen.decode_raw(z)) - own).square().flatten(1).mean(1)
    assert bool((after < 1e-12).all()) and bool((start.loss > 1e-6).all()), (start.loss, after)
    assert not bool(open_.any()) and len(seen) < 30  # all solved: the loop ended early
    # a row's loss never rises from one step to the next (a step is kept only where it lowers it)
    for before_k, after_k in zip(seen, seen[1:]):
        assert bool((after_k <= before_k).all())


def test_gmres_phase_hands_the_rows_it_leaves_unsolved_to_the_cg_polish(monkeypatch):
    """A short Krylov space (8 of 16) stalls on this generator's rows; they are reported open and
    the CG polish that follows solves them. Settled rows are not polished again."""
    gen = _square_gen()
    own = gen.generate(4, torch.Generator().manual_seed(2)).images
    start = invert(gen, own, settings=quick(steps=20, restarts=1), seed=0)
    leaving = Leaving(4, patience=5)
    res = GMRESGaussNewton(krylov=8)(gen, start.inputs, None, gen.from_unit(own), 30, leaving)
    z, open_ = res.inputs, unsettled(res, leaving)
    with torch.no_grad():
        mid = (gen.to_unit(gen.decode_raw(z)) - own).square().flatten(1).mean(1)
    assert bool(open_.all()) and bool((mid > 1e-10).all()), mid
    calls = []
    real_cg = ConjugateGradientLM.__call__
    monkeypatch.setattr(ConjugateGradientLM, "__call__",
                        lambda self, g, x, *a, **k: calls.append(x.shape[0]) or real_cg(self, g, x, *a, **k))
    s = quick(steps=20, restarts=1, polish_steps=60, polish_method="cg", polish_cg_iters=16, polish_gmres_iters=8)
    res = invert(gen, own, settings=s, seed=0)
    assert calls == [4] and bool((res.loss < 1e-3 * mid).all()), (mid, res.loss)
    # with the full space the GMRES phase solves every row: the CG polish gets none of them
    res = invert(gen, own, settings=s.replace(polish_gmres_iters=16), seed=0)
    assert bool((res.loss < 1e-12).all()) and calls == [4], (res.loss, calls)
    # ... and with a stop_below every row already meets, neither phase runs
    invert(gen, own, settings=s, seed=0, stop_below=torch.ones(4))
    assert calls == [4]


def test_gmres_phase_is_skipped_for_a_non_square_generator(gen, monkeypatch):
    monkeypatch.setattr(GMRESGaussNewton, "__call__",
                        lambda *a, **k: pytest.fail("GMRES phase ran on a non-square Jacobian"))
    images = gen.generate(2, torch.Generator().manual_seed(2)).images  # latent 8, image 256
    s = quick(steps=30, restarts=2, polish_steps=8, polish_method="cg", polish_cg_iters=8, polish_gmres_iters=4)
    res = invert(gen, images, settings=s, seed=0)
    assert torch.isfinite(res.loss).all()
    with pytest.raises(ValueError, match="polish_gmres_iters must be an integer >= 0"):
        InversionSettings(polish_gmres_iters=-1)
    assert "polish_gmres_iters" not in InversionSettings().to_dict()
    assert InversionSettings.from_dict(s.to_dict()) == s and s.to_dict()["polish_gmres_iters"] == 4
    # what to_dict leaves out is read back at the value it had, not at the class's default
    for preset in (*PRESETS.values(), *FAMILY_DEFAULTS.values()):
        assert InversionSettings.from_dict(preset.to_dict()) == preset


class _OnceDifferentiableTanh(torch.autograd.Function):
    """tanh with a forward-mode rule whose backward may not itself be differentiated (PyTorch
    raises if it is)."""

    @staticmethod
    def forward(x):
        return torch.tanh(x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(output)
        ctx.save_for_forward(output)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        (y,) = ctx.saved_tensors
        return g * (1 - y * y)

    @staticmethod
    def jvp(ctx, t):
        (y,) = ctx.saved_tensors
        return t * (1 - y * y)


class _DetachingTanh(_OnceDifferentiableTanh):
    """tanh whose backward detaches: a second differentiation silently loses this layer's term."""

    @staticmethod
    def backward(ctx, g):
        (y,) = ctx.saved_tensors
        return g.detach() * (1 - y * y)


class _LegacyTanh(torch.autograd.Function):
    """An old-style Function: no forward-mode rule, and a backward that may not be differentiated."""

    @staticmethod
    def forward(ctx, x):
        y = torch.tanh(x)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        (y,) = ctx.saved_tensors
        return g * (1 - y * y)


class _LegacyDifferentiableTanh(_LegacyTanh):
    """An old-style Function without a forward-mode rule whose backward is made of differentiable
    operations: reverse mode is right, and only a finite difference can confirm it."""

    @staticmethod
    def backward(ctx, g):
        (y,) = ctx.saved_tensors
        return g * (1 - y * y)


class _ConvNet(nn.Module):
    """A small convolutional generator, latent [N, 1, 6, 6] -> image [N, 2, 6, 6]: ``act`` after
    the first conv, and a skip path around it (so a backward that detaches in ``act`` still
    depends on the output gradient, through the skip, and is silently wrong)."""

    def __init__(self, act=torch.tanh, seed: int = 0, skip: bool = True):
        super().__init__()
        torch.manual_seed(seed)
        self.c1, self.c2, self.act = nn.Conv2d(1, 8, 3, padding=1), nn.Conv2d(8, 2, 3, padding=1), act
        self.skip = nn.Conv2d(1, 2, 1) if skip else None

    def forward(self, z):
        h = self.c2(self.act(self.c1(z)))
        return torch.tanh(h if self.skip is None else h + self.skip(z))


@pytest.mark.parametrize("act, mode", [(torch.tanh, "reverse"), (_OnceDifferentiableTanh.apply, "forward"),
                                       (_DetachingTanh.apply, "forward"), (_LegacyDifferentiableTanh.apply, "reverse")])
def test_jacobian_products_match_a_float64_jacobian(act, mode):
    """J v and J^T w against the explicit float64 Jacobian, on fresh random points and vectors;
    reverse mode only where the generator's backward is itself differentiable and right."""
    from ronan_fast.inversion.polish.jacobian import JacobianProducts

    net = _ConvNet(act)
    z = torch.randn(5, 1, 6, 6)
    v, w = torch.randn(5, 36), torch.randn(5, 72)

    def f(q):
        return net(q.view(-1, 1, 6, 6)).flatten(1)

    prod = JacobianProducts(f, z.flatten(1))
    assert prod.mode == mode
    net64 = _ConvNet(torch.tanh).double()
    net64.load_state_dict(net.state_dict())
    for i in range(5):
        jac = torch.autograd.functional.jacobian(lambda q: net64(q.view(1, 1, 6, 6)).flatten(), z[i].flatten().double())
        want_jv, want_jtw = jac @ v[i].double(), jac.T @ w[i].double()
        got_jv, got_jtw = prod.jv(v)[i].double(), prod.jtw(w)[i].double()
        assert torch.isfinite(got_jv).all() and torch.isfinite(got_jtw).all()
        assert (got_jv - want_jv).norm() <= 1e-5 * want_jv.norm()
        assert (got_jtw - want_jtw).norm() <= 1e-5 * want_jtw.norm()
    # the choice is made once per polish and handed on: a given mode is used as it is
    assert JacobianProducts(f, z.flatten(1), "forward").mode == "forward"


def test_jacobian_products_refuse_a_generator_with_no_reliable_rule():
    """No forward-mode rule and a backward whose second differentiation misses the activation's
    term (it runs without a graph, the skip path keeps the rest): the finite-difference check
    refuses it, with the remedy named, instead of polishing with a wrong Jacobian."""
    from ronan_fast.inversion.polish.jacobian import JacobianProducts

    net = _ConvNet(_LegacyTanh.apply)
    with pytest.raises(ValueError, match="disagrees with a finite difference.*polish_steps=0"):
        JacobianProducts(lambda q: net(q.view(-1, 1, 6, 6)).flatten(1), torch.randn(2, 36))
    # without the skip the second differentiation has nothing to follow and fails outright
    net = _ConvNet(_LegacyTanh.apply, skip=False)
    with pytest.raises(ValueError, match="neither a differentiable backward.*nor forward-mode AD.*polish_steps=0"):
        JacobianProducts(lambda q: net(q.view(-1, 1, 6, 6)).flatten(1), torch.randn(2, 36))


def test_gmres_polish_uses_reverse_mode_products_and_matches_forward_mode(monkeypatch):
    """The Krylov polishes take reverse-mode products when the generator allows, with the same
    result as forward mode up to float32 rounding."""
    from ronan_fast.inversion.polish.jacobian import JacobianProducts

    gen = _square_gen()
    own = gen.to_unit(gen.decode_raw(gen.sample_latents(6, torch.Generator().manual_seed(3))))
    start = invert(gen, own, settings=quick(steps=30, restarts=1), seed=0)
    seen = []
    real_init = JacobianProducts.__init__

    def spy(self, f, z, mode=None):
        real_init(self, f, z, mode)
        seen.append(self.mode)

    monkeypatch.setattr(JacobianProducts, "__init__", spy)
    z_rev = polish(GMRESGaussNewton(krylov=8), gen, start.inputs, None, gen.from_unit(own), 6)
    assert seen and set(seen) == {"reverse"}
    monkeypatch.setattr(JacobianProducts, "_choose", lambda self: "forward")
    seen.clear()
    z_fwd = polish(GMRESGaussNewton(krylov=8), gen, start.inputs, None, gen.from_unit(own), 6)
    assert set(seen) == {"forward"}
    with torch.no_grad():
        l_rev = (gen.to_unit(gen.decode_raw(z_rev)) - own).square().flatten(1).mean(1)
        l_fwd = (gen.to_unit(gen.decode_raw(z_fwd)) - own).square().flatten(1).mean(1)
    assert torch.isfinite(l_rev).all()
    assert torch.allclose(l_rev, l_fwd, rtol=1e-2, atol=1e-12)


def test_compiled_generator_inverts_as_the_eager_one(gen):
    """compile_generator=True runs the Adam phase's generator through torch.compile (dynamic
    shapes: rows stop and the batch shrinks without a new compilation): the same inversion up to
    rounding, the compiled function kept per adapter; refused with cuda_graph or a non-bool."""
    from ronan_fast.inversion import runtime

    g = torch.Generator().manual_seed(5)
    images = torch.cat([gen.generate(3, g).images, torch.rand(2, *gen.image_shape, generator=g)])
    # halving and a plateau stop change the batch's size during the run
    s = quick(steps=60, restarts=4, halving_every=20, min_rows=1, patience=20, polish_steps=2)
    eager = invert(gen, images, settings=s, seed=0)
    compiled = invert(gen, images, settings=s, seed=0, compile_generator=True)
    assert torch.isfinite(compiled.loss).all()
    torch.testing.assert_close(compiled.loss, eager.loss, rtol=1e-2, atol=1e-7)
    assert (compiled.row_steps > 0).all()
    fn = runtime._COMPILED[gen]
    invert(gen, images[:1], settings=s, seed=0, compile_generator=True)
    assert runtime._COMPILED[gen] is fn  # made once per adapter
    # ... and forgotten with it: the kept function does not hold the adapter
    import gc

    other = LatentGenerator(small_dcgan(), 8, (-1, 1))
    invert(other, images[:1], settings=quick(steps=3, restarts=1), seed=0, compile_generator=True)
    assert other in runtime._COMPILED
    n = len(runtime._COMPILED)
    del other
    gc.collect()
    assert len(runtime._COMPILED) == n - 1
    with pytest.raises(ValueError, match="choose one"):
        invert(gen, images, settings=s, compile_generator=True, cuda_graph=True)
    with pytest.raises(ValueError, match="compile_generator must be True or False"):
        invert(gen, images, settings=s, compile_generator="yes")


def test_channels_last_changes_the_layout_not_the_generator():
    """channels_last: every 4-D weight in NHWC, others as they were; outputs equal up to rounding
    and the same fingerprint (a profile serves both); in place by default, a copy on request;
    inversions agree."""
    from ronan_fast.adapters import channels_last

    net = nn.Sequential(small_dcgan(), nn.Unflatten(1, (1, 1)), nn.Conv3d(1, 1, 1), nn.Flatten(1, 2))  # 5-D too
    gen = LatentGenerator(net, 8, (-1, 1))
    before = gen.fingerprint()
    z = torch.randn(5, 8, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        out = gen.decode_raw(z).clone()
    copied = channels_last(gen, copy=True)
    assert copied is not gen
    assert all(p.is_contiguous() for p in gen.module.parameters())  # the original untouched
    assert channels_last(gen) is gen
    four = [t for t in list(gen.module.parameters()) + list(gen.module.buffers()) if t.dim() == 4]
    assert len(four) == 2 and all(t.is_contiguous(memory_format=torch.channels_last) for t in four)
    assert not four[0].is_contiguous()  # [32, 16, 4, 4]: NHWC differs from NCHW (not so with one channel)
    assert all(t.is_contiguous() for t in gen.module.parameters() if t.dim() != 4)
    assert gen.fingerprint() == copied.fingerprint() == before
    with torch.no_grad():
        torch.testing.assert_close(gen.decode_raw(z), out, rtol=1e-5, atol=1e-6)
    plain = LatentGenerator(small_dcgan(), 8, (-1, 1))
    images = plain.generate(3, torch.Generator().manual_seed(4)).images
    s = quick(steps=40)
    a = invert(plain, images, settings=s, seed=0).loss
    b = invert(channels_last(plain, copy=True), images, settings=s, seed=0).loss
    torch.testing.assert_close(b, a, rtol=1e-2, atol=1e-7)
    with pytest.raises(TypeError, match="adapter"):
        channels_last(net)
