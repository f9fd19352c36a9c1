"""The dense polish's Jacobians in bf16 (``InversionSettings.polish_precision``).

The low-precision twin of a generator is checked against a float64 reference on fresh random
inputs (its output to about 1e-2 relative, its Jacobian to bf16's rounding of a saturating
tanh), falls back to float32 where the twin's output is not finite, and leaves the adapter's own
module as it was. Inverting with it reports float32 losses of the inputs it returns, reaches the
model's own images as the float32 polish does, and gives an image the same bits alone or in a
batch.
"""

from __future__ import annotations

import copy
import os

import pytest
import torch
from torch import nn
from torch.func import jacfwd

from ronan_fast.adapters import DelegatingAdapter, LatentGenerator
from ronan_fast.inversion import PRESETS, InversionSettings, invert
from ronan_fast.inversion.polish import DenseLM, polish
from ronan_fast.inversion.runtime import low_precision_decode
from ronan_fast.mapping_start import mapping_start
from ronan_fast.models.stylegan import StyleGenerator

#: one torch thread for this module's tests (tests/conftest.py)
ONE_THREAD = True


def _net(seed: int = 0, nz: int = 8) -> nn.Module:
    """test_inversion.small_dcgan with LeakyReLU: bf16 rounding moves a pre-activation across
    ReLU's kink, which switches that unit's part of the Jacobian on or off, so that the Jacobian
    bound below would measure where the kinks fall rather than the twin's arithmetic. Built under
    its own seed without touching the global one."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        net = nn.Sequential(
            nn.Linear(nz, 32 * 4 * 4), nn.Unflatten(1, (32, 4, 4)), nn.BatchNorm2d(32), nn.LeakyReLU(0.2),
            nn.ConvTranspose2d(32, 16, 4, 2, 1), nn.BatchNorm2d(16), nn.LeakyReLU(0.2),
            nn.ConvTranspose2d(16, 1, 4, 2, 1), nn.Tanh(),
        )
        with torch.no_grad():  # non-trivial running statistics
            net.train()
            net(torch.randn(256, nz))
    return net


@pytest.fixture(autouse=True)
def native_bf16(monkeypatch):
    """The twin on any CPU: where oneDNN has no bf16 the product keeps float32 (tested below),
    but the twin's arithmetic is the same, only slower."""
    import ronan_fast.inversion.runtime as runtime

    monkeypatch.setattr(runtime, "fast_low_precision", lambda device, dtype: True)


@pytest.fixture(scope="module")
def gen():
    return LatentGenerator(_net(), 8, (-1, 1))


def _fresh_seed() -> int:
    return int.from_bytes(os.urandom(4), "little")


def _rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    return float((a.double() - ref.double()).norm() / ref.double().norm())


def test_the_bf16_twin_and_its_jacobian_match_a_float64_reference(gen):
    decode, how = low_precision_decode(gen, "bf16")
    assert how == "twin"
    assert all(p.dtype == torch.float32 for p in gen.module.parameters())  # the adapter's module untouched
    ref_module = copy.deepcopy(gen.module).double()
    seed = _fresh_seed()
    z = torch.randn(6, 8, generator=torch.Generator().manual_seed(seed))
    out = decode(z)
    assert out.dtype == torch.float32 and bool(torch.isfinite(out).all())
    with torch.no_grad():
        ref = ref_module(z.double())
    assert _rel(out, ref) < 1e-2, f"seed {seed}: output off by {_rel(out, ref):.3g}"
    for k in range(2):
        jac = jacfwd(lambda q: decode(q[None]).flatten())(z[k])
        jac_ref = jacfwd(lambda q: ref_module(q[None]).flatten())(z[k].double())
        assert bool(torch.isfinite(jac).all())
        # looser than the output: tanh's derivative 1 - y^2 cancels in bf16 where the output
        # saturates (over 60 draws: 3.7% off on average, 8% at most)
        assert _rel(jac, jac_ref) < 0.15, f"seed {seed}, row {k}: Jacobian off by {_rel(jac, jac_ref):.3g}"
    assert low_precision_decode(gen, "fp32") == (gen.decode_raw, "fp32")


class _LosesTheDifference(nn.Module):
    """Finite in float32, not in bf16: ``1 + 1e-5`` rounds to 1 in bf16, so the log of the
    difference is -inf there, and the output NaN."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 16)
        self.register_buffer("one", torch.tensor(1.0))
        self.register_buffer("eps", torch.tensor(1e-5))

    def forward(self, z):
        return (torch.tanh(self.lin(z)) + 0 * torch.log((self.one + self.eps) - self.one)).view(-1, 1, 4, 4)


def test_a_twin_that_is_not_finite_or_off_or_not_native_is_not_used(monkeypatch, gen):
    g = LatentGenerator(_LosesTheDifference(), 4, (-1, 1))
    with torch.no_grad():
        assert torch.isfinite(g.decode_raw(torch.randn(2, 4))).all()
    decode, how = low_precision_decode(g, "bf16")
    assert how == "fp32" and decode == g.decode_raw
    import ronan_fast.inversion.runtime as runtime

    monkeypatch.setattr(runtime, "LOW_PRECISION_TOLERANCE", 1e-6)  # bf16's rounding is more than that
    assert low_precision_decode(gen, "bf16")[1] == "fp32"
    monkeypatch.undo()
    # a device without native bf16 keeps float32, whatever its twin would give
    monkeypatch.setattr(runtime, "fast_low_precision", lambda device, dtype: False)
    assert low_precision_decode(gen, "bf16") == (gen.decode_raw, "fp32")
    assert low_precision_decode(DelegatingAdapter(gen), "bf16")[1] == "fp32"


class _Shifted(DelegatingAdapter):
    """An adapter that changes ``decode_raw``: no twin of its base would compute it."""

    def decode_raw(self, latents, conditions=None):
        return self.base.decode_raw(latents + 0.25, conditions)


def test_delegating_adapters_reach_the_twin_unless_they_change_decode_raw(gen):
    z = torch.randn(3, 8, generator=torch.Generator().manual_seed(_fresh_seed()))
    plain = DelegatingAdapter(gen)
    decode, how = low_precision_decode(plain, "bf16")
    assert how == "twin"
    with torch.no_grad():
        assert _rel(decode(z), gen.decode_raw(z)) < 1e-2
    shifted = _Shifted(gen)
    decode, how = low_precision_decode(shifted, "bf16")
    assert how == "autocast"  # the shift is kept: the whole decode_raw runs under autocast
    with torch.no_grad():
        got, want = decode(z), shifted.decode_raw(z)
    assert got.dtype == torch.float32 and _rel(got, want) < 1e-2
    assert _rel(got, gen.decode_raw(z)) > 1e-2  # it is the shifted generator's output


def test_a_bf16_polish_reaches_the_float32_polishs_floor_and_reports_float32_losses(gen):
    seed = _fresh_seed()
    batch = gen.generate(4, torch.Generator().manual_seed(seed))
    target = gen.decode_raw(batch.latents, None).detach()
    start = batch.latents + 0.3 * torch.randn(4, 8, generator=torch.Generator().manual_seed(seed + 1))

    def mse(z):
        with torch.no_grad():
            return (gen.decode_raw(z, None) - target).square().flatten(1).mean(1)

    fp32 = mse(polish(DenseLM(), gen, start, None, target, 40))
    bf16 = mse(polish(DenseLM(precision="bf16"), gen, start, None, target, 40))
    assert bool((fp32 < 1e-12).all()), f"seed {seed}: {fp32}"
    assert bool((bf16 < 1e-12).all()), f"seed {seed}: {bf16}"
    # noise: a step is kept only where it lowers the float32 loss
    noise = torch.rand(4, *gen.image_shape, generator=torch.Generator().manual_seed(seed + 2)) * 2 - 1
    zs = torch.randn(4, 8, generator=torch.Generator().manual_seed(seed + 3))
    z = polish(DenseLM(precision="bf16"), gen, zs, None, noise, 5)
    with torch.no_grad():
        assert ((gen.decode_raw(z, None) - noise).square().flatten(1).mean(1)
                <= (gen.decode_raw(zs, None) - noise).square().flatten(1).mean(1)).all()
    with pytest.raises(ValueError, match="precision must be one of"):
        DenseLM(precision="fp16")


def test_polish_precision_is_a_setting_each_image_gets_alone_or_in_a_batch(gen):
    s = PRESETS["authors"].replace(steps=30, restarts=2, check_every=10, polish_steps=4, polish_precision="bf16")
    assert s.to_dict()["polish_precision"] == "bf16" and "polish_precision" not in s.replace(
        polish_precision="fp32").to_dict()
    assert InversionSettings.from_dict(s.to_dict()) == s
    images = gen.generate(3, torch.Generator().manual_seed(9)).images
    both = invert(gen, images, settings=s, seed=0)
    # the reported loss is the float32 loss of the reported reconstruction, and of the inputs
    direct = (both.reconstruction - images).square().flatten(1).mean(1)
    torch.testing.assert_close(both.loss, direct, rtol=1e-4, atol=1e-12)
    with torch.no_grad():
        torch.testing.assert_close(gen.decode(both.inputs), both.reconstruction)
    assert not torch.equal(both.inputs, invert(gen, images, settings=s.replace(polish_precision="fp32"),
                                               seed=0).inputs)
    for k in range(3):
        alone = invert(gen, images[k:k + 1], settings=s, seed=0)
        assert torch.equal(alone.loss[0], both.loss[k]) and torch.equal(alone.inputs[0], both.inputs[k])
    for bad in ("fp16", "half", None):
        with pytest.raises(ValueError, match="polish_precision must be one of"):
            s.replace(polish_precision=bad)


def test_the_mapping_starts_image_metric_follows_the_search_over_ws_polish_precision():
    with torch.random.fork_rng():
        torch.manual_seed(0)
        module = StyleGenerator(nz=16, w_dim=8, n_mlp=2, base=16, min_ch=8, channels=1, size=16)
    g = LatentGenerator(module, (16,), output_range=(-1, 1), name="style0")
    exact = mapping_start(g)
    low = mapping_start(g, w_settings=exact.w_settings.replace(polish_precision="bf16"))
    with torch.no_grad():
        w = exact._map(g.sample_latents(2, torch.Generator().manual_seed(_fresh_seed())))
    for k in range(2):
        a, b = exact._image_metric(w[k]).double(), low._image_metric(w[k]).double()
        h, h_low = a @ a.T, b @ b.T
        assert bool(torch.isfinite(h_low).all())
        err = _rel(h_low, h)
        # bf16 rounding, and no more (over 40 draws: 2.3% off on average, 8.4% at most)
        assert 0 < err < 0.2, err
