"""Clipped pixels: an image saved clipped to [0, 1] is matched by any output at or beyond its ends."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ronan_fast import ops
from ronan_fast.adapters import LatentGenerator
from ronan_fast.inversion import PRESETS, InversionSettings, invert
from ronan_fast.inversion.clipped import ClippedPixels

ONE_THREAD = True


class Overshooting(nn.Module):
    """A small decoder whose output leaves [-1, 1] on some pixels, as VAE decoders' do."""

    def __init__(self, nz: int = 6, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.fc = nn.Linear(nz, 3 * 8 * 8)

    def forward(self, z):
        return 1.6 * torch.tanh(2 * self.fc(z)).view(-1, 3, 8, 8)


def overshooting(seed: int = 0) -> LatentGenerator:
    return LatentGenerator(Overshooting(seed=seed), (6,), (-1, 1), family="vae", name="overshooting")


def own_images(gen, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    out = gen.generate(n, torch.Generator().manual_seed(seed))  # clamped to [0, 1], as saved
    return out.images, out.latents


def one_sided_reference(pred, target, metric):
    """The one-sided loss in float64 by plain autograd: the per-row loss and its gradient."""
    p = pred.double().detach().requires_grad_(True)
    t = target.double()
    diff = p - t
    matched = ((t >= 1) & (diff > 0)) | ((t <= -1) & (diff < 0))  # raw range (-1, 1)
    r = torch.where(matched, torch.zeros_like(diff), diff).flatten(1)
    loss = r.square().mean(1) if metric == "mse" else r.abs().mean(1)
    (grad,) = torch.autograd.grad(loss.sum(), p)
    return loss.detach(), grad


def test_clipped_pixels_count_only_on_the_inner_side():
    images = torch.tensor([[0.0, 0.5, 1.0, 1.0, 0.0]]).view(1, 1, 1, 5)
    clip = ClippedPixels.of(images)
    diff = torch.tensor([[-0.2, 0.3, 0.2, -0.1, 0.4]]).view(1, 1, 1, 5)
    # under 0 at a black pixel and over 1 at a white one match; the rest count as usual
    assert clip.residual(diff).flatten().tolist() == pytest.approx([0.0, 0.3, 0.0, -0.1, 0.4])
    out = images + diff
    assert clip.output(out, images).flatten().tolist() == pytest.approx([0.0, 0.8, 1.0, 0.9, 0.4])
    # nothing at an end: nothing to treat
    assert ClippedPixels.of(torch.full((2, 1, 3, 3), 0.5)) is None
    # almost at an end is not at it (resampled or float images are not clipped there)
    assert ClippedPixels.of(torch.full((1, 1, 2, 2), 1 - 1e-6)) is None


@pytest.mark.parametrize("metric", ["mse", "mae"])
@pytest.mark.parametrize("impl", ["auto", "ref"])
def test_the_fused_loss_of_clipped_outputs_matches_a_float64_reference(metric, impl):
    """The Adam phase's loss and gradient (matched pixels set to the target, then the fused
    kernel) are the one-sided loss's, on fresh random outputs with pixels beyond both ends."""
    g = torch.Generator().manual_seed(torch.seed() % (1 << 31))
    target_unit = torch.rand(3, 3, 8, 8, generator=g)
    target_unit[target_unit < 0.2] = 0.0
    target_unit[target_unit > 0.8] = 1.0
    target = target_unit * 2 - 1
    index = torch.tensor([0, 0, 1, 2, 2])
    pred = target[index] + 0.3 * torch.randn(5, 3, 8, 8, generator=g)
    weight = torch.ones(5)
    clip = ClippedPixels.of(target_unit)
    matched = clip[index].beyond(pred - target[index])
    assert int(matched.sum()) > 20 and int((~matched & (clip.low | clip.high)[index]).sum()) > 20
    loss, grad = ops.recon_loss_grad(clip[index].output(pred, target[index]), target, index, weight, metric,
                                     impl=impl)
    want_loss, want_grad = one_sided_reference(pred, target[index], metric)
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
    torch.testing.assert_close(loss.double(), want_loss, rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(grad.double(), want_grad, rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("method", ["dense", "dense-rev", "cg"])
def test_an_overshooting_decoder_gets_its_own_images_back(method):
    """At the input that made it, an own image's plain loss is the overshoot's; the one-sided
    loss is 0 there, and the inversion (a short Adam phase, then the polish named) finds it."""
    gen = overshooting()
    images, latents = own_images(gen, 4, seed=3)
    with torch.no_grad():
        raw = gen.decode_raw(latents)
    assert bool(((raw < -1) | (raw > 1)).flatten(1).any(1).all())  # every image has clipped pixels
    plain_at_truth = (gen.to_unit(raw) - images).square().flatten(1).mean(1)
    assert bool((plain_at_truth > 1e-4).all())
    s = InversionSettings(steps=60, restarts=4, halving_every=20, polish_steps=30, polish_method=method,
                          polish_cg_iters=12, check_every=10)
    clipped = invert(gen, images, settings=s, seed=0)
    plain = invert(gen, images, settings=s.replace(clip_aware=False), seed=0)
    assert bool((clipped.loss < 1e-10).all()), clipped.loss
    assert bool((plain.loss > 1e-5).all()), plain.loss  # the plain loss cannot get there
    # the reported loss is the one-sided loss of the reconstruction it returns
    assert bool((clipped.reconstruction - images).abs().max() < 1e-4)


def test_the_polishes_residuals_and_jacobians_are_the_one_sided_loss_s():
    """The residual every polish reduces (the dense polish's, and the one whose Jacobian
    products the CG and GMRES polishes take) and the dense polish's Jacobian are those of the
    one-sided residual, against float64 autograd at points with pixels beyond both ends."""
    from ronan_fast.inversion.polish.dense import DenseLM
    from ronan_fast.inversion.polish.jacobian import raw_residual

    gen = overshooting()
    images, latents = own_images(gen, 3, seed=4)
    z = latents + 0.3 * torch.randn(latents.shape, generator=torch.Generator().manual_seed(1))
    target_raw = gen.from_unit(images)
    clip = ClippedPixels.of(images)
    rows = torch.arange(3)
    net64 = Overshooting().double()
    net64.load_state_dict(gen.module.state_dict())

    def one_sided64(zr, k):
        diff = (net64(zr.unsqueeze(0)) - target_raw[k : k + 1].double()).flatten()
        return torch.where(clip[k : k + 1].beyond(diff.detach().view(1, 3, 8, 8)).flatten(), 0.0, diff)

    dense_res, jac_map = DenseLM()._residual(gen, target_raw, clip)
    cg_res = raw_residual(gen, target_raw, clip)
    with torch.no_grad():
        gen_jac = torch.stack([torch.autograd.functional.jacobian(lambda q: gen.decode_raw(q.unsqueeze(0)).flatten(),
                                                                  z[k]) for k in range(3)])
    mapped = jac_map(gen_jac, z, None, rows)
    matched = 0
    for k in range(3):
        want_r = one_sided64(z[k].double(), k)
        want_j = torch.autograd.functional.jacobian(lambda q: one_sided64(q, k), z[k].double())
        matched += int((want_j.abs().sum(1) == 0).sum())
        torch.testing.assert_close(dense_res(z, None, rows)[k].double(), want_r, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(cg_res(z, None, rows)[k].double(), want_r, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(mapped[k].double(), want_j, rtol=1e-4, atol=1e-5)
    assert matched > 10  # pixels the one-sided residual leaves flat were there to be zeroed


def test_a_generator_in_range_inverts_bit_for_bit_as_with_the_plain_loss():
    """tanh output never passes an end: clip_aware changes nothing, to the bit, even on images
    with pixels at 0 and 1."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 3 * 8 * 8), nn.Tanh(), nn.Unflatten(1, (3, 8, 8)))
    gen = LatentGenerator(net, (6,), (-1, 1))
    images = (own_images(gen, 3, seed=2)[0] * 255).round() / 255
    images[:, 0, :2] = 1.0
    images[:, 1, :2] = 0.0
    s = InversionSettings(steps=40, restarts=4, halving_every=20, polish_steps=5, check_every=10)
    a = invert(gen, images, settings=s, seed=0)
    b = invert(gen, images, settings=s.replace(clip_aware=False), seed=0)
    assert torch.equal(a.loss, b.loss) and torch.equal(a.inputs, b.inputs)


def test_the_setting_its_default_and_older_records():
    assert InversionSettings().clip_aware is True
    assert PRESETS["authors"].clip_aware is False  # the paper's loop keeps the plain loss
    with pytest.raises(ValueError, match="clip_aware must be True or False"):
        InversionSettings(clip_aware="yes")
    d = InversionSettings().to_dict()
    assert d["clip_aware"] is True
    # settings recorded before the field existed were made with the plain loss, and read back so
    d.pop("clip_aware")
    assert InversionSettings.from_dict(d).clip_aware is False
    assert "clip_aware" not in InversionSettings(clip_aware=False).to_dict()


class Spiked(nn.Module):
    """tanh output with a fixed share of its values held beyond the range, at 1.2."""

    def __init__(self, share: float):
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(6, 3 * 10 * 10)
        self.register_buffer("spike", torch.arange(300) < round(share * 300))

    def forward(self, z):
        out = torch.tanh(self.fc(z))
        return torch.where(self.spike, torch.full_like(out, 1.2), out).view(-1, 3, 10, 10)


def test_an_overshooting_decoder_is_profiled_with_clip_aware_settings_only():
    """A decoder whose output leaves its range on a few values is accepted (its saved images are
    clipped, and the loss counts them one-sided); without clip_aware, or with a share of values
    outside that only a range declared wrong gives, it is refused by name."""
    from ronan_fast import Attributor
    from ronan_fast.profile_fitting import CLIPPED_SHARE

    few = LatentGenerator(Spiked(0.02), (6,), (-1, 1), name="few")
    images = Attributor(few, None).sample(4)
    assert images.shape == (4, 3, 10, 10) and float(images.max()) == 1.0
    with pytest.raises(ValueError, match=r"few makes values in \[.*, 1\.2\], outside its declared output range "
                                         r"\(-1, 1\); and the settings have clip_aware=False"):
        Attributor(few, None, clip_aware=False).sample(4)
    many = LatentGenerator(Spiked(2 * CLIPPED_SHARE), (6,), (-1, 1), name="many")
    with pytest.raises(ValueError, match=r"many makes values .* 10\.0% of its values lie outside, more than a "
                                         r"decoder's overshoot \(5%\): declare the range it makes"):
        Attributor(many, None).sample(4)
