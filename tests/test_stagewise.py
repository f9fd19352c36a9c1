"""Stagewise inversion of a DDIM sampler (ronan_fast.stagewise)."""

import pytest
import torch

from ronan_fast.adapters import LatentGenerator
from ronan_fast.inversion import FAMILY_DEFAULTS, PRESETS, InversionSettings, invert
from ronan_fast.inversion.clipped import ClippedPixels
from ronan_fast.inversion.stagewise import FinalStep, StepMap, solve_step
from ronan_fast.models.diffusion import DDIMSampler, TinyUNet, alphas_cumprod


class _DenoiserLike(TinyUNet):
    """A random UNet behind a noise prediction that keeps each predicted x_0 at about half the
    step's input (a random UNet alone predicts x_0 far outside [-1, 1] at t = 999, so every
    pixel would clip and no image would be worth inverting)."""

    def forward(self, x, t):
        ac = alphas_cumprod().float()[t].view(-1, 1, 1, 1)
        return x * (1 - 0.5 * ac.sqrt()) / (1 - ac).sqrt() + 0.05 * super().forward(x, t)


def _sampler(steps=3, seed=0, clip=True, tame=False):
    torch.manual_seed(seed)
    unet = (_DenoiserLike if tame else TinyUNet)(ch=8, channels=1, size=8, groups=4, patch=2)
    return DDIMSampler(unet, steps=steps, clip_x0=clip).eval()


def _adapter(sampler, **kw):
    return LatentGenerator(sampler, sampler.latent_shape, (-1.0, 1.0), family="diffusion", name="tiny-ddim", **kw)


def test_sampler_is_the_composition_of_its_steps_in_float64():
    s = _sampler(steps=4).double()
    x_T = torch.randn(3, 1, 8, 8, dtype=torch.float64)
    # reference: the DDIM update written out from the schedule, float64
    ac = s.alphas_cumprod.double()
    x = x_T
    for i, t in enumerate(s.timesteps.tolist()):
        a = ac[t]
        ap = ac[s.timesteps[i + 1]] if i + 1 < s.steps else torch.tensor(1.0, dtype=torch.float64)
        eps = s.unet(x, torch.full((3,), t))
        x0 = ((x - (1 - a).sqrt() * eps) / a.sqrt()).clamp(-1, 1)
        eps = (x - a.sqrt() * x0) / (1 - a).sqrt()
        x = ap.sqrt() * x0 + (1 - ap).sqrt() * eps
    with torch.no_grad():
        got = s(x_T)
        steps = x_T
        for i in range(s.steps - 1):
            steps = s.step(i, steps)
        via_steps = s.final_step(steps)
    torch.testing.assert_close(got, x0.detach(), rtol=1e-5, atol=1e-6)
    assert torch.equal(got, via_steps)
    # the start guesses are the DDIM scalings
    torch.testing.assert_close(s.step_start(0, x), (s.alpha_t[0] / s.alpha_prev[0]).sqrt() * x)
    noise = torch.randn_like(x)
    torch.testing.assert_close(s.final_start(x, noise), s.alpha_t[-1].sqrt() * x + (1 - s.alpha_t[-1]).sqrt() * noise)


def test_only_a_plain_multi_step_sampler_offers_a_chain():
    s = _sampler()
    assert _adapter(s).stage_chain() is s
    assert _adapter(s, call=lambda m, z: m(z)).stage_chain() is None  # a custom call may change the map
    assert _adapter(DDIMSampler(TinyUNet(ch=8, channels=1, size=8, groups=4, patch=2), steps=1)).stage_chain() is None
    from tiny_models import TinyGenerator

    assert LatentGenerator(TinyGenerator(seed=0), (3,), (-1.0, 1.0)).stage_chain() is None


def test_stagewise_setting_is_checked_and_keeps_old_cache_keys():
    with pytest.raises(ValueError, match="stagewise"):
        InversionSettings(stagewise="yes")
    assert "stagewise" not in InversionSettings().to_dict()  # profiles made before it keep their identity
    assert InversionSettings(stagewise=True).to_dict()["stagewise"] is True
    assert PRESETS["stagewise"].stagewise and not any(s.stagewise for s in FAMILY_DEFAULTS.values())


def test_step_maps_solve_back_to_the_true_inputs():
    s = _sampler(steps=3)
    ad = _adapter(s)
    x_T = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        x1 = s.step(0, x_T)
    part = StepMap(ad, s, 0)
    got, got_res = solve_step(part, x1.flatten(1), 64)
    with torch.no_grad():
        res = (part.decode_raw(got) - x1).flatten(1).square().mean(1)
    assert bool((res < 1e-10).all()), res
    torch.testing.assert_close(got_res, res)  # the residual it reports is the one at its answer


def test_stagewise_inversion_reconstructs_own_images_through_the_whole_sampler():
    s = _sampler(steps=3, seed=1, clip=False, tame=True)
    ad = _adapter(s)
    gen = ad.generate(2, torch.Generator().manual_seed(4))
    assert 0.05 < float(gen.images.mean()) < 0.95 and float(((gen.images <= 0) | (gen.images >= 1)).float().mean()) < 0.2
    r = invert(ad, gen.images, settings=PRESETS["stagewise"].replace(polish_steps=10), seed=0)
    assert r.inputs.shape == (2, 64) and r.reconstruction.shape == gen.images.shape
    # the reported loss is the whole sampler's, from the recovered initial noise (one-sided at
    # the images' pixels at 0 and 1, clip_aware), and the reconstruction its output clamped
    with torch.no_grad():
        again = ad.decode(r.inputs)
    clipped = ClippedPixels.of(gen.images)
    torch.testing.assert_close(r.loss, (clipped.output(again, gen.images) - gen.images).flatten(1).square().mean(1),
                               rtol=1e-4, atol=1e-12)
    torch.testing.assert_close(r.reconstruction, again.clamp(0, 1))
    assert bool((r.extra["chain_residual"] < 1e-10).all()), r.extra["chain_residual"]
    # the earlier steps are solved exactly: the whole chain loses nothing against its last step
    torch.testing.assert_close(r.loss, r.extra["last_step_loss"], rtol=1e-2, atol=1e-11)
    assert bool((r.loss < 1e-10).all()), r.loss
    # without the clip, every step is a bijection of R^64: even a checkerboard, nothing like the
    # sampler's images, has an exact preimage, and the stagewise inversion finds it
    board = ((torch.arange(8)[:, None] + torch.arange(8)[None]) % 2).float().view(1, 1, 8, 8)
    rb = invert(ad, board, settings=PRESETS["stagewise"].replace(polish_steps=10))
    assert float(rb.loss) < 1e-10
    # its pixels sit at exactly 0 and 1: the reconstruction is clamped to [0, 1], as invert's is
    assert 0.0 <= float(rb.reconstruction.min()) and float(rb.reconstruction.max()) <= 1.0


def test_stagewise_refuses_conditions_and_the_last_step_starts_near_the_image():
    s = _sampler(steps=3)
    ad = _adapter(s)
    with pytest.raises(ValueError, match="conditions"):
        invert(ad, torch.rand(1, 1, 8, 8), settings="stagewise", conditions=torch.zeros(1, dtype=torch.long))
    last = FinalStep(ad, s)
    img = torch.rand(2, 1, 8, 8)
    z = last.initial_latents(img, 5, torch.Generator().manual_seed(0))
    assert z.shape == (10, 64) and torch.isfinite(z).all()
    a = float(s.alpha_t[-1])
    centre = (a ** 0.5) * (img * 2 - 1).repeat_interleave(5, 0).flatten(1)
    spread = (z - centre) / (1 - a) ** 0.5  # standard-normal noise around the forward process's mean
    assert abs(float(spread.mean())) < 0.3 and 0.7 < float(spread.std()) < 1.3
