"""The 64x64 generator benchmark: its split, every model's weights, adapter and inversion, the
new architectures, and the recipes' determinism."""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import math

import pytest
import torch

from ronan_fast import zoo
from ronan_fast.inversion import invert
from ronan_fast.models import (
    CondDeepDCGANDiscriminator,
    CondDeepDCGANGenerator,
    DeepVAE,
    StyleDiscriminator,
    StyleGenerator,
    UpsampleDCGANGenerator,
    WGANCritic,
    load_model,
    save_model,
)
from ronan_fast.models.stylegan import ModulatedConv2d

HAS_DIFFUSERS = importlib.util.find_spec("diffusers") is not None
needs_diffusers = pytest.mark.skipif(not HAS_DIFFUSERS, reason="diffusers not installed (pip install 'ronan-fast[diffusers]')")

BENCHMARK = zoo.benchmark_models()
AEKL = "aekl64-photos"


# --------------------------------------------------------------------------- the split


def test_the_benchmark_and_its_split():
    tuning, held = zoo.benchmark_models("tuning"), zoo.benchmark_models("held-out")
    assert BENCHMARK == tuning + held and not set(tuning) & set(held)
    assert len(BENCHMARK) >= 6 and abs(len(tuning) - len(held)) <= 1
    assert "dcgan64-photos" in tuning and "stylegan64-photos" in held
    entries = [zoo.ZOO[n] for n in BENCHMARK]
    assert sum(e.image_shape == (3, 64, 64) for e in entries) > len(entries) / 2
    assert sum(e.image_shape[1:] == (28, 28) for e in entries) <= 2
    assert all(not e.evaluated and e.recipe for e in entries)
    assert {e.family for e in entries} <= {"gan", "vae", "conditional"}
    # the held-out half has architectures and losses of its own, and a model of each kind the tuning half has
    assert {zoo.ZOO[n].architecture for n in held} - {zoo.ZOO[n].architecture for n in tuning}
    assert {zoo.ZOO[n].family for n in held} >= {"gan", "vae"}
    assert {n for n, e in zoo.ZOO.items() if e.split is not None} == set(BENCHMARK)
    with pytest.raises(ValueError, match="split must be"):
        zoo.benchmark_models("test")
    with pytest.raises(ValueError, match="split must be"):
        dataclasses.replace(zoo.ZOO["dcgan64-photos"], split="validation")


def test_the_twins_differ_only_in_training_length():
    from ronan_fast.zoo.train import RECIPES

    short, long = RECIPES["dcgan64n-opencv"], RECIPES["dcgan64n-opencv-long"]
    assert short.params is long.params and short.seed == long.seed and long.steps >= 3 * short.steps
    assert zoo.ZOO["dcgan64n-opencv"].split != zoo.ZOO["dcgan64n-opencv-long"].split


# --------------------------------------------------------------------------- every model


@pytest.mark.parametrize("name", BENCHMARK, ids=str)
def test_benchmark_model_loads_generates_and_inverts(name):
    if zoo.ZOO[name].architecture in zoo.DIFFUSERS_ARCHITECTURES and not HAS_DIFFUSERS:
        pytest.skip("diffusers not installed")
    torch.manual_seed(0)
    entry = zoo.ZOO[name]
    module = zoo.load_zoo_module(name)
    assert not module.training and module.info["steps_done"] >= 1000
    adapter = zoo.zoo_adapter(name)
    assert adapter.name == name and adapter.family == entry.family
    assert adapter.image_shape == entry.image_shape and adapter.latent_dim == math.prod(entry.latent_shape)
    g = torch.Generator().manual_seed(7)
    batch = adapter.generate(3, generator=g)
    assert batch.images.shape == (3, *entry.image_shape)
    assert 0 <= float(batch.images.min()) and float(batch.images.max()) <= 1
    assert batch.images.std() > 0.01  # not a constant image
    with torch.no_grad():
        raw = adapter.decode_raw(batch.latents, batch.conditions)
    lo, hi = entry.output_range
    assert torch.isfinite(raw).all()
    if entry.architecture not in zoo.DIFFUSERS_ARCHITECTURES:  # tanh / sigmoid outputs
        assert lo <= float(raw.min()) and float(raw.max()) <= hi
    # a round trip through the inversion: a few steps of the paper's settings (one start; an
    # unknown class is searched over all classes)
    images = batch.images[:2]
    res = invert(adapter, images, settings="authors", steps=5)
    assert res.loss.shape == (2,) and torch.isfinite(res.loss).all()
    assert res.reconstruction.shape == images.shape and res.inputs.shape == (2, adapter.latent_dim)
    with torch.no_grad():
        again = adapter.decode(res.inputs, res.conditions)  # the loss is the unclamped output's
    assert torch.allclose((again - images).square().flatten(1).mean(1), res.loss, rtol=1e-3, atol=1e-6)
    if entry.family == "conditional":
        assert res.conditions is not None and res.conditions.shape == (2,)


@needs_diffusers
def test_the_autoencoder_kl_is_a_diffusers_folder():
    from ronan_fast.diffusers_adapters import LatentDiffusionDecoder, from_folder

    entry = zoo.ZOO[AEKL]
    assert entry.path.is_dir() and (entry.path / "config.json").is_file()
    assert (entry.path / "diffusion_pytorch_model.safetensors").is_file()
    assert not list(entry.path.glob("*.bin"))  # no pickle
    adapter = from_folder(entry.path)
    assert isinstance(adapter, LatentDiffusionDecoder) and adapter.kind == "kl"
    assert adapter.latent_shape == entry.latent_shape and adapter.image_shape == entry.image_shape
    assert adapter.fingerprint() == zoo.zoo_adapter(AEKL).fingerprint()
    info = zoo.load_zoo_module(AEKL).info
    assert info["latent_stats"] == "per-channel" and adapter.scaling_factor == 1.0
    assert adapter.latents_mean.flatten().tolist() == pytest.approx(info["latent_channel_means"])
    assert adapter.latents_std.flatten().tolist() == pytest.approx(info["latent_channel_stds"])
    # the encoder's latent of an image is its first start, and decodes near the image
    from ronan_fast import data as D

    x = D.photo_patches(size=64, n=4, grey=False, seed=999)
    enc = LatentDiffusionDecoder.from_pretrained(entry.path, init="encoder")
    z = enc.initial_latents(x, 2, torch.Generator().manual_seed(0))
    assert z.shape == (8, adapter.latent_dim)
    with torch.no_grad():
        rec = enc.decode(z[::2]).clamp(0, 1)
        prior = enc.decode(z[1::2]).clamp(0, 1)
    assert float((rec - x).square().mean()) < 0.5 * float((prior - x).square().mean())
    # scaled latents of training-like images have roughly the prior's mean and spread, channel by channel
    lat = enc.encoder_latents(D.photo_patches(size=64, n=64, grey=False, seed=998)).view(64, *adapter.latent_shape)
    assert lat.mean((0, 2, 3)).abs().max() < 0.5 and 0.5 < float(lat.std((0, 2, 3)).min())
    assert float(lat.std((0, 2, 3)).max()) < 2.0
    # and the decoder's own images stay (nearly) inside the image range: the clamp that makes
    # them images changes almost nothing, so their own latents reconstruct them almost exactly
    with torch.no_grad():
        raw = adapter.decode_raw(adapter.sample_latents(16, torch.Generator().manual_seed(3)))
    assert float((raw.abs() > 1).float().mean()) < 0.02


# --------------------------------------------------------------------------- architectures


def _grads_everywhere(module: torch.nn.Module) -> None:
    for n, p in module.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), n


def test_stylegan_generator_shapes_gradients_and_determinism():
    g = StyleGenerator(nz=16, w_dim=12, n_mlp=2, base=16, min_ch=4, channels=3, size=32)
    z = torch.randn(5, 16, requires_grad=True)
    x = g(z)
    assert x.shape == (5, 3, 32, 32) and float(x.detach().abs().max()) < 1
    x.square().mean().backward()
    _grads_everywhere(g)
    assert z.grad is not None and bool((z.grad.abs().sum(1) > 0).all())
    g.eval()
    with torch.no_grad():  # no noise, no batch statistics: each image depends on its own z alone
        a = g(z[:3])
        assert torch.equal(a, g(z[:3])) and torch.allclose(a[1:2], g(z[1:2]), atol=1e-6)
    assert g.latent_shape == (16,) and len(g.up_convs) == 3 and g.const.shape == (1, 16, 4, 4)
    assert [c.conv.weight.shape[0] for c in g.convs] == [16, 8, 4]
    with pytest.raises(ValueError, match="z must be"):
        g(torch.randn(2, 15))
    with pytest.raises(ValueError, match="size must be"):
        StyleGenerator(size=48)
    with pytest.raises(ValueError, match="lr_mul"):
        StyleGenerator(lr_mul=0)


def test_modulated_conv_is_a_per_sample_demodulated_convolution():
    torch.manual_seed(0)
    mc = ModulatedConv2d(6, 5, 3, w_dim=4, demodulate=True)
    x, w = torch.randn(3, 6, 8, 8), torch.randn(3, 4)
    out = mc(x, w)
    s = mc.affine(w)
    for i in range(3):  # the StyleGAN2 formula, one sample at a time
        wi = mc.weight * mc.scale * s[i].view(1, -1, 1, 1)
        wi = wi * torch.rsqrt(wi.square().sum((1, 2, 3), keepdim=True) + 1e-8)
        want = torch.nn.functional.conv2d(x[i:i + 1], wi, padding=1)
        assert torch.allclose(out[i:i + 1], want, atol=1e-5)
    up = ModulatedConv2d(6, 5, 3, w_dim=4, upsample=True)
    assert up(x, w).shape == (3, 5, 16, 16)


def test_style_discriminator_and_minibatch_std():
    d = StyleDiscriminator(base=16, min_ch=4, channels=3, size=32)
    x = torch.randn(6, 3, 32, 32, requires_grad=True)  # 6: groups of 3
    out = d(x)
    assert out.shape == (6,)
    out.sum().backward()
    _grads_everywhere(d)
    assert d(torch.randn(1, 3, 32, 32)).shape == (1,)


def test_upsample_dcgan_and_critic():
    g = UpsampleDCGANGenerator(nz=8, ngf=4, channels=3, size=64)
    z = torch.randn(4, 8, requires_grad=True)
    x = g(z)
    assert x.shape == (4, 3, 64, 64) and float(x.detach().abs().max()) <= 1
    c = WGANCritic(ndf=4, channels=3, size=64)
    c(x).sum().backward()
    _grads_everywhere(g)
    _grads_everywhere(c)
    assert not [m for m in g.modules() if isinstance(m, torch.nn.ConvTranspose2d)]
    assert not [m for m in c.modules() if isinstance(m, torch.nn.BatchNorm2d)]  # per-sample gradient penalty
    with pytest.raises(ValueError, match="z must be"):
        g(torch.randn(4, 9))


def test_deep_vae_decoder_range_and_elbo():
    v = DeepVAE(nz=6, nf=4, channels=1, size=64)
    x = torch.rand(3, 1, 64, 64)
    total, recon, kl = v.loss(x, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(total) and float(kl.detach()) >= 0 and float(recon.detach()) > 0
    total.backward()
    _grads_everywhere(v)
    v.eval()
    with torch.no_grad():
        out = v(torch.randn(5, 6) * 5)
    assert out.shape == (5, 1, 64, 64) and 0 <= float(out.min()) and float(out.max()) <= 1
    mu, logvar = v.encode(x)
    assert mu.shape == logvar.shape == (3, 6)


def test_conditional_deep_dcgan_labels():
    g = CondDeepDCGANGenerator(nz=8, num_classes=4, ngf=4, embed_dim=3, channels=1, size=32).eval()
    z, y = torch.randn(4, 8), torch.tensor([0, 1, 2, 3])
    a = g(z, y)
    assert a.shape == (4, 1, 32, 32)
    assert torch.allclose(a, g(z, torch.nn.functional.one_hot(y, 4).float()), atol=1e-6)
    assert not torch.allclose(g(z, torch.zeros(4, dtype=torch.long)), a)
    with pytest.raises(ValueError, match="labels must lie"):
        g(z, torch.full((4,), 4))
    d = CondDeepDCGANDiscriminator(num_classes=4, ndf=4, channels=1, size=32)
    assert d(a, y).shape == (4,)


@pytest.mark.parametrize("model,args", [
    (StyleGenerator(nz=8, w_dim=8, n_mlp=2, base=8, min_ch=4, size=16), lambda: (torch.randn(3, 8),)),
    (StyleDiscriminator(base=8, min_ch=4, size=16), lambda: (torch.rand(4, 3, 16, 16),)),
    (UpsampleDCGANGenerator(nz=8, ngf=4, size=32), lambda: (torch.randn(3, 8),)),
    (WGANCritic(ndf=4, size=32), lambda: (torch.rand(3, 1, 32, 32),)),
    (DeepVAE(nz=4, nf=4, size=32), lambda: (torch.randn(3, 4),)),
    (CondDeepDCGANGenerator(nz=8, ngf=4, size=32), lambda: (torch.randn(3, 8), torch.tensor([1, 2, 3]))),
    (CondDeepDCGANDiscriminator(ndf=4, size=32), lambda: (torch.rand(3, 1, 32, 32), torch.tensor([1, 2, 3]))),
], ids=lambda v: type(v).__name__ if isinstance(v, torch.nn.Module) else "")
def test_new_architectures_save_and_load(tmp_path, model, args):
    g = torch.Generator().manual_seed(0)
    for m in model.modules():  # non-trivial BatchNorm statistics, so a load that lost them would show
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
    model.eval()
    inputs = args()
    with torch.no_grad():
        want = model(*inputs)
    back = load_model(save_model(model, tmp_path / "m.safetensors"))
    assert type(back) is type(model) and back.config == model.config
    with torch.no_grad():
        assert torch.equal(back(*inputs), want)


# --------------------------------------------------------------------------- recipes


def _tiny(recipe, tmp_path, tag: str):
    """The recipe writing into ``tmp_path``, on its data's first 64 images (the loaders are
    tested elsewhere; the full sets take a minute to build)."""
    p = dict(recipe.params)
    full = p["data"]

    def small(cache={}):
        if "x" not in cache:
            if recipe.name.startswith(("stylegan", "aekl", "dcgan64n")):  # photo patches: a few, built fast
                from ronan_fast import data as D

                x = D.photo_patches(size=64, n=64, grey=False, seed=5,
                                    sources=("opencv",) if "opencv" in recipe.name else ("skimage",))
                cache["x"] = (x, torch.zeros(64, dtype=torch.long))
            else:
                x, y = full()
                cache["x"] = (x[:64].clone(), y[:64].clone())
        return cache["x"]

    p["data"] = small
    if "held_out" in p:
        p["held_out"] = lambda: small()[0][:8]
        p["recon_grid"] = tmp_path / f"{tag}-recon.png"
        p["stat_images"] = 32
    suffix = "" if recipe.name.startswith("aekl") else ".safetensors"
    return dataclasses.replace(recipe, out=tmp_path / f"{tag}{suffix}", grid=[tmp_path / f"{tag}.png"], params=p)


def _weights(path):
    from safetensors.torch import load_file

    f = path / "diffusion_pytorch_model.safetensors" if path.is_dir() else path
    return load_file(str(f))


RECIPES64 = ["dcgan64n-opencv", "stylegan64-photos", "upgan64-fmnist", "condgan64-digits", "vae64-fmnist", AEKL]


@pytest.mark.parametrize("name", RECIPES64)
def test_recipe_is_deterministic(tmp_path, name):
    """Two runs of a recipe (2 steps, same seed) write the same weights; another seed does not."""
    if name == AEKL and not HAS_DIFFUSERS:
        pytest.skip("diffusers not installed")
    from ronan_fast.zoo.train import RECIPES

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        args = argparse.Namespace(seed=None, steps=2, minutes=None)
        runs = []
        for tag in ("a", "b"):
            rec = _tiny(RECIPES[name], tmp_path, tag)
            info = rec.run(rec, args)
            assert info["steps_done"] == 2 and info["seed"] == RECIPES[name].seed
            assert rec.grid[0].is_file()
            runs.append(_weights(rec.out))
        other = _tiny(RECIPES[name], tmp_path, "c")
        other.run(other, argparse.Namespace(seed=RECIPES[name].seed + 1, steps=2, minutes=None))
    finally:
        torch.set_num_threads(threads)
    a, b, c = runs[0], runs[1], _weights(other.out)
    assert a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)
    if name == AEKL:
        from ronan_fast.diffusers_adapters import from_folder

        ad = from_folder(tmp_path / "a")
        assert ad.latent_shape == (4, 8, 8) and ad.image_shape == (3, 64, 64)
        assert (tmp_path / "a" / "training_info.json").is_file() and (tmp_path / "a-recon.png").is_file()


def test_recipes_are_listed_by_the_one_entry_point(capsys):
    from ronan_fast.zoo.train import main

    assert main(["--list"]) == 0
    listed = capsys.readouterr().out
    for name in RECIPES64 + ["dcgan64n-opencv-long", "dcgan64-photos", "default-generator"]:
        assert f"\n{name} " in "\n" + listed, name
    for name in BENCHMARK:
        assert zoo.ZOO[name].recipe in listed
