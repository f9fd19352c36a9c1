"""diffusers adapters on tiny random models saved to and loaded from local folders."""

from __future__ import annotations

import importlib
import importlib.util
import sys

import pytest
import torch

from ronan_fast.inversion import FAMILY_DEFAULTS, invert

HAS_DIFFUSERS = importlib.util.find_spec("diffusers") is not None
needs_diffusers = pytest.mark.skipif(not HAS_DIFFUSERS, reason="diffusers not installed (pip install 'ronan-fast[diffusers]')")

if HAS_DIFFUSERS:
    import diffusers

    from ronan_fast.diffusers_adapters import LatentDiffusionDecoder, OneStepSampler

TINY_AE = dict(
    in_channels=3, out_channels=3, block_out_channels=(4, 8), norm_num_groups=2, sample_size=16,
    down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
    up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
)  # fmt: skip


def _kl(**over):
    torch.manual_seed(0)
    return diffusers.AutoencoderKL(**{**TINY_AE, "latent_channels": 4, **over})


def _vq(**over):
    torch.manual_seed(1)
    return diffusers.VQModel(**{**TINY_AE, "latent_channels": 3, "num_vq_embeddings": 16, **over})


def _unet(**over):
    torch.manual_seed(2)
    cfg = dict(
        sample_size=16, in_channels=3, out_channels=3, block_out_channels=(4, 8), layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=2, attention_head_dim=4,
    )
    return diffusers.UNet2DModel(**{**cfg, **over})


def _noise(n, d, seed=3):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------- without diffusers


def test_clear_import_error_without_diffusers(monkeypatch):
    monkeypatch.setitem(sys.modules, "diffusers", None)  # makes `import diffusers` fail
    # A fresh copy of the module, outside sys.modules: it imports without diffusers.
    spec = importlib.util.find_spec("ronan_fast.diffusers_adapters")
    da = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(da)
    with pytest.raises(ImportError, match=r"pip install 'ronan-fast\[diffusers\]'"):
        da.LatentDiffusionDecoder(torch.nn.Linear(1, 1))
    with pytest.raises(ImportError, match=r"pip install 'ronan-fast\[diffusers\]'"):
        da.OneStepSampler.from_pretrained("anywhere")


# --------------------------------------------------------------------------- latent diffusion decoder


@pytest.fixture(scope="module")
def kl_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("kl")
    _kl(scaling_factor=0.5).save_pretrained(folder)
    return folder


@needs_diffusers
def test_kl_decoder_shapes_and_matches_diffusers_decode(kl_folder):
    adapter = LatentDiffusionDecoder.from_pretrained(kl_folder)
    assert adapter.latent_shape == (4, 8, 8) and adapter.latent_dim == 256
    assert adapter.image_shape == (3, 16, 16) and adapter.output_range == (-1.0, 1.0)
    assert adapter.family == "vae" and adapter.scaling_factor == 0.5
    z = _noise(3, adapter.latent_dim)
    with torch.no_grad():
        raw = adapter.decode_raw(z)
        ref = adapter.vae.decode(z.view(3, 4, 8, 8) / 0.5).sample
        torch.testing.assert_close(raw, ref)
        torch.testing.assert_close(adapter.decode(z), (ref + 1) / 2)
        torch.testing.assert_close(adapter.decode(z), adapter.decode(z), rtol=0, atol=0)  # deterministic


@needs_diffusers
def test_kl_decoder_other_image_size_and_shift_factor():
    vae = _kl(shift_factor=0.25)
    adapter = LatentDiffusionDecoder(vae, image_size=(8, 24))
    assert adapter.latent_shape == (4, 4, 12) and adapter.image_shape == (3, 8, 24)
    z = _noise(2, adapter.latent_dim)
    with torch.no_grad():
        ref = vae.decode(z.view(2, 4, 4, 12) / vae.config.scaling_factor + 0.25).sample
        torch.testing.assert_close(adapter.decode_raw(z), ref)
    assert adapter.config()["shift_factor"] == 0.25
    with pytest.raises(ValueError, match="image_size 9x16 must be a multiple of .* factor 2"):
        LatentDiffusionDecoder(vae, image_size=(9, 16))


@needs_diffusers
def test_kl_latents_mean_and_std():
    vae = _kl(latents_mean=[0.1, 0.2, 0.3, 0.4], latents_std=[1.0, 2.0, 3.0, 4.0])
    adapter = LatentDiffusionDecoder(vae)
    z = _noise(2, adapter.latent_dim)
    mean = torch.tensor([0.1, 0.2, 0.3, 0.4]).view(1, 4, 1, 1)
    std = torch.tensor([1.0, 2.0, 3.0, 4.0]).view(1, 4, 1, 1)
    with torch.no_grad():
        ref = vae.decode(z.view(2, 4, 8, 8) * std / vae.config.scaling_factor + mean).sample
        torch.testing.assert_close(adapter.decode_raw(z), ref)
        # encoder_latents is the inverse scaling of the posterior mean
        images = adapter.decode(z).clamp(0, 1)
        h = vae.encode(images * 2 - 1).latent_dist.mean
        torch.testing.assert_close(adapter.encoder_latents(images),
                                   ((h - mean) * vae.config.scaling_factor / std).reshape(2, -1))


@needs_diffusers
def test_gradients_reach_the_latent(kl_folder):
    adapter = LatentDiffusionDecoder.from_pretrained(kl_folder)
    z = _noise(2, adapter.latent_dim).requires_grad_(True)
    (grad,) = torch.autograd.grad(adapter.decode(z).square().sum(), z)
    assert bool(torch.isfinite(grad).all()) and float(grad.abs().sum()) > 0
    assert all(not p.requires_grad for p in adapter.vae.parameters()) and not adapter.vae.training


@needs_diffusers
def test_fingerprint_stable_across_save_and_load(kl_folder, tmp_path):
    vae = _kl(scaling_factor=0.5)
    in_memory = LatentDiffusionDecoder(vae)
    loaded = LatentDiffusionDecoder.from_pretrained(kl_folder)
    assert in_memory.fingerprint() == loaded.fingerprint()
    # A pipeline-style folder with a vae/ sub-folder is found as well.
    vae.save_pretrained(tmp_path / "pipe" / "vae")
    assert LatentDiffusionDecoder.from_pretrained(tmp_path / "pipe").fingerprint() == loaded.fingerprint()
    assert LatentDiffusionDecoder(_kl(scaling_factor=0.25)).fingerprint() != loaded.fingerprint()
    assert LatentDiffusionDecoder(vae, image_size=8).fingerprint() != loaded.fingerprint()


@needs_diffusers
def test_encoder_latents_and_initial_latents(kl_folder):
    adapter = LatentDiffusionDecoder.from_pretrained(kl_folder, init="encoder")
    images = torch.rand(2, 3, 16, 16)
    enc = adapter.encoder_latents(images)
    with torch.no_grad():
        ref = adapter.vae.encode(images * 2 - 1).latent_dist.mean * 0.5
    torch.testing.assert_close(enc, ref.reshape(2, -1))
    rows = adapter.initial_latents(images, 3, torch.Generator().manual_seed(7))
    assert rows.shape == (6, adapter.latent_dim)
    prior = adapter.sample_latents(6, torch.Generator().manual_seed(7))
    torch.testing.assert_close(rows[[0, 3]], enc)
    torch.testing.assert_close(rows[[1, 2, 4, 5]], prior[[1, 2, 4, 5]])
    random_init = LatentDiffusionDecoder.from_pretrained(kl_folder)
    torch.testing.assert_close(random_init.initial_latents(images, 3, torch.Generator().manual_seed(7)), prior)
    with pytest.raises(ValueError, match=r"images must be \[B, 3, 16, 16\]"):
        adapter.encoder_latents(torch.rand(2, 1, 16, 16))


@needs_diffusers
def test_encoder_start_reconstructs_better_than_random(kl_folder):
    adapter = LatentDiffusionDecoder.from_pretrained(kl_folder, init="encoder")
    images = adapter.generate(2, torch.Generator().manual_seed(0)).images
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        from_encoder = adapter.decode(adapter.encoder_latents(images))
        from_prior = adapter.decode(adapter.sample_latents(2, g))
    err_enc = (from_encoder - images).square().mean()
    err_prior = (from_prior - images).square().mean()
    assert float(err_enc) < float(err_prior)


@needs_diffusers
def test_the_autoencoder_start_is_the_encoder_start_wherever_a_warm_start_goes(kl_folder):
    """AutoencoderStart puts the encoder's latent in each image's first start: the same starts,
    bit for bit, as init="encoder"; it refuses another autoencoder and a model without an encoder."""
    from ronan_fast.adapters import LatentGenerator
    from ronan_fast.autoencoder_start import AutoencoderStart, autoencoder_start
    from ronan_fast.warmstart import EncoderError, EncoderMismatchError, WarmStarted

    plain = LatentDiffusionDecoder.from_pretrained(kl_folder)
    start = autoencoder_start(plain)
    images = plain.generate(3, torch.Generator().manual_seed(2)).images
    torch.testing.assert_close(start.guess(images), plain.encoder_latents(images), rtol=1e-5, atol=1e-6)
    # one image's guess is the same alone or in a batch, to the bit
    assert torch.equal(start.guess(images[1:2])[0], start.guess(images)[1])
    warm = WarmStarted(plain, start)
    own = LatentDiffusionDecoder.from_pretrained(kl_folder, init="encoder")
    assert warm.guided_starts and warm.fingerprint() == plain.fingerprint()
    for k in range(3):  # as the inversion asks for them: one image at a time, from its own stream
        g1, g2 = torch.Generator().manual_seed(5 + k), torch.Generator().manual_seed(5 + k)
        assert torch.equal(warm.initial_latents(images[k:k + 1], 4, g1), own.initial_latents(images[k:k + 1], 4, g2))
    assert start.describe()["recipe"] == {"kind": "autoencoder"} and len(start.digest()) == 64
    other = LatentDiffusionDecoder(_kl(scaling_factor=0.7))
    assert autoencoder_start(other).digest() != start.digest()
    with pytest.raises(EncoderMismatchError, match="made for the model with fingerprint"):
        WarmStarted(other, start)
    with pytest.raises(EncoderError, match=r"images must be \[B, 3, 16, 16\]"):
        start.guess(torch.rand(2, 1, 16, 16))
    with pytest.raises(TypeError, match="no encoder of its own"):
        AutoencoderStart(LatentGenerator(torch.nn.Sequential(torch.nn.Linear(4, 12), torch.nn.Tanh(),
                                                             torch.nn.Unflatten(1, (3, 2, 2))), 4))


@needs_diffusers
def test_an_init_encoder_decoder_is_judged_with_the_autoencoder_start_its_profile_records(kl_folder):
    """A decoder built with init="encoder" starts each image from its encoder in any batch, and an
    Attributor records that start in the profile (AutoencoderStart); a profile fitted with random
    starts refuses it by name, and a second warm start is refused."""
    import warnings

    from ronan_fast import Attributor
    from ronan_fast.autoencoder_start import AutoencoderStart, autoencoder_start
    from ronan_fast.profile import ProfileMismatchError
    from ronan_fast.warmstart import train_encoder

    own = LatentDiffusionDecoder.from_pretrained(kl_folder, init="encoder")
    plain = LatentDiffusionDecoder.from_pretrained(kl_folder)
    images = plain.generate(3, torch.Generator().manual_seed(4)).images
    batch = own.initial_latents(images, 2, torch.Generator().manual_seed(0)).view(3, 2, -1)
    guess = autoencoder_start(plain).guess(images)
    for k in range(3):  # each image's first start, to the bit, is its guess computed alone
        assert torch.equal(batch[k, 0], guess[k])
        assert torch.equal(own.initial_latents(images[k:k + 1], 2, torch.Generator().manual_seed(0))[0], guess[k])
    att = Attributor(own, None, steps=5, polish_steps=0)
    assert isinstance(att.warm_start, AutoencoderStart)
    assert att.settings == Attributor(plain, None, warm_start=autoencoder_start(plain), steps=5,
                                      polish_steps=0).settings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a small profile
        prof = att.fit(n=3, seed=1)
        random_prof = Attributor(plain, None, steps=5, polish_steps=0).fit(n=3, seed=1)
    assert prof.warm_start["recipe"] == {"kind": "autoencoder"}
    assert isinstance(Attributor.from_profile(prof, plain, None).warm_start, AutoencoderStart)
    with pytest.raises(ProfileMismatchError, match="autoencoder's own encoder.*init='encoder'.*random starts only"):
        Attributor.from_profile(random_prof, own, None)
    enc = train_encoder(plain, samples=16, steps=2, batch=8)
    with pytest.raises(ValueError, match="init='encoder'.*warm_start is a WarmStartEncoder: choose one"):
        Attributor(own, None, warm_start=enc)


@needs_diffusers
def test_a_profile_with_the_autoencoder_start_is_rebuilt_from_the_model(tmp_path, capsys):
    """On the zoo's AutoencoderKL (a diffusers folder; its decoder overshoots [-1, 1] on some
    pixels, which clip_aware settings accept): the profile records the start; from_profile and
    inspect rebuild it from the model alone; profile --warm-start on the folder uses its own
    encoder (nothing trained)."""
    import json
    import warnings

    from ronan_fast import Attributor, cli
    from ronan_fast.autoencoder_start import AutoencoderStart, autoencoder_start
    from ronan_fast.imageio import save_image
    from ronan_fast.profile import ProfileError
    from ronan_fast.zoo import ZOO

    kl_folder = ZOO["aekl64-photos"].path
    model = LatentDiffusionDecoder.from_pretrained(kl_folder)
    att = Attributor(model, None, warm_start=autoencoder_start(model), steps=20, polish_steps=0)
    assert att.settings.restarts == 4 and att.settings.screen == 8  # the vae family's warm-start default
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a small profile
        prof = att.fit(n=4, seed=1)
    assert prof.warm_start["recipe"] == {"kind": "autoencoder"}
    path = prof.save(tmp_path / "p.json")
    again = Attributor.from_profile(path, model, None)
    assert isinstance(again.warm_start, AutoencoderStart)
    x = model.generate(2, torch.Generator().manual_seed(9)).images
    assert torch.equal(again.attribute(x).loss, att.attribute(x).loss)
    with pytest.raises(ProfileError, match="another autoencoder|fingerprint"):
        Attributor.from_profile(path, LatentDiffusionDecoder(_kl(sample_size=64)), None)
    # the command line: a bare --warm-start on a latent-diffusion decoder takes its own encoder
    out = tmp_path / "cli.json"
    argv = ["profile", "--model", f"diffusers:{kl_folder}", "--reference", "none", "-n", "4", "--steps", "10",
            "--retries", "0", "--warm-start", "-q", "-o", str(out)]
    assert cli.main(argv) == 0, capsys.readouterr().err
    assert json.loads(out.read_text())["warm_start"]["recipe"] == {"kind": "autoencoder"}
    assert not (tmp_path / "cli.encoder.safetensors").exists()
    save_image(x[0], tmp_path / "x.png")
    capsys.readouterr()
    assert cli.main(["inspect", "--profile", str(out), "--model", f"diffusers:{kl_folder}", str(tmp_path / "x.png"),
                     "-q"]) == 0, capsys.readouterr().err
    # asked of a model without an encoder of its own: refused by name
    assert cli.main(["profile", "--model", "default", "--reference", "none", "-n", "4", "--warm-start",
                     "autoencoder", "-q", "-o", str(tmp_path / "b.json")]) == 2
    assert "--warm-start autoencoder" in capsys.readouterr().err


@needs_diffusers
def test_vq_decoder_matches_diffusers(tmp_path):
    vq = _vq()
    vq.save_pretrained(tmp_path / "vq")
    adapter = LatentDiffusionDecoder.from_pretrained(tmp_path / "vq")
    assert adapter.latent_shape == (3, 8, 8)
    z = _noise(2, adapter.latent_dim)
    sf = vq.config.scaling_factor
    with torch.no_grad():
        torch.testing.assert_close(adapter.decode_raw(z), adapter.vae.decode(z.view(2, 3, 8, 8) / sf).sample)
        plain = LatentDiffusionDecoder(adapter.vae, quantize=False)
        torch.testing.assert_close(plain.decode_raw(z),
                                   adapter.vae.decode(z.view(2, 3, 8, 8) / sf, force_not_quantize=True).sample)
        assert not torch.allclose(plain.decode_raw(z), adapter.decode_raw(z))
    # Quantisation passes gradients straight through.
    zg = z.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(adapter.decode(zg).sum(), zg)
    assert float(grad.abs().sum()) > 0
    assert adapter.fingerprint() == LatentDiffusionDecoder(vq).fingerprint()
    assert plain.fingerprint() != adapter.fingerprint()


@needs_diffusers
def test_decoder_bad_arguments(tmp_path, kl_folder):
    with pytest.raises(TypeError, match="AutoencoderKL or VQModel"):
        LatentDiffusionDecoder(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="init must be"):
        LatentDiffusionDecoder.from_pretrained(kl_folder, init="zeros")
    with pytest.raises(FileNotFoundError, match="not a local folder"):
        LatentDiffusionDecoder.from_pretrained(tmp_path / "nothing-here")
    with pytest.raises(FileNotFoundError, match="no autoencoder config.json"):
        LatentDiffusionDecoder.from_pretrained(tmp_path)
    _unet().save_pretrained(tmp_path / "u")
    with pytest.raises(ValueError, match="describes 'UNet2DModel'"):
        LatentDiffusionDecoder.from_pretrained(tmp_path / "u")


@needs_diffusers
@pytest.mark.parametrize("kind", ["kl", "vq"])
def test_invert_runs_on_decoder(kind, kl_folder):
    adapter = LatentDiffusionDecoder(_vq()) if kind == "vq" else LatentDiffusionDecoder.from_pretrained(kl_folder)
    images = adapter.generate(2, torch.Generator().manual_seed(0)).images
    res = invert(adapter, images, steps=5, restarts=2, seed=0)
    assert res.loss.shape == (2,) and bool(torch.isfinite(res.loss).all())
    assert res.inputs.shape == (2, adapter.latent_dim) and res.reconstruction.shape == (2, 3, 16, 16)


# --------------------------------------------------------------------------- consistency model, one step


@pytest.fixture(scope="module")
def cm_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cm")
    pipe = diffusers.ConsistencyModelPipeline(unet=_unet(), scheduler=diffusers.CMStochasticIterativeScheduler())
    pipe.save_pretrained(folder)
    return folder


def _pipeline_images(unet, scheduler, noise, **kw):
    pipe = diffusers.ConsistencyModelPipeline(unet=unet, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe(batch_size=noise.shape[0], num_inference_steps=1, latents=noise, output_type="pt", **kw).images


@needs_diffusers
def test_one_step_matches_pipeline(cm_folder):
    adapter = OneStepSampler.from_pretrained(cm_folder)
    assert adapter.latent_dim == 3 * 16 * 16 and adapter.image_shape == (3, 16, 16)
    assert adapter.family == "consistency" and adapter.output_range == (-1.0, 1.0)
    z = _noise(3, adapter.latent_dim)
    with torch.no_grad():
        ours = adapter.decode(z)
    ref = _pipeline_images(adapter.unet, diffusers.CMStochasticIterativeScheduler.from_pretrained(cm_folder, subfolder="scheduler"),
                           z.view(3, 3, 16, 16))
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(adapter.decode(z), ours, rtol=0, atol=0)  # deterministic


@needs_diffusers
def test_one_step_matches_scheduler_step_by_hand():
    unet = _unet()
    scheduler = diffusers.CMStochasticIterativeScheduler(sigma_max=20.0, sigma_data=0.7, clip_denoised=False)
    adapter = OneStepSampler(unet, scheduler)
    assert len(scheduler.timesteps) == scheduler.config.num_train_timesteps  # the caller's scheduler untouched
    z = _noise(2, adapter.latent_dim, seed=4)
    sched = diffusers.CMStochasticIterativeScheduler.from_config(scheduler.config)
    sched.set_timesteps(1)
    t = sched.timesteps[0]
    with torch.no_grad():
        x = z.view(2, 3, 16, 16) * sched.init_noise_sigma
        out = unet(sched.scale_model_input(x, t), t).sample
        ref = sched.step(out, t, x).prev_sample
        raw = adapter.decode_raw(z)
    torch.testing.assert_close(raw, ref, rtol=0, atol=1e-6)
    # Without clipping the raw output is the unclamped denoised sample.
    with torch.no_grad():
        clipped = OneStepSampler(unet, diffusers.CMStochasticIterativeScheduler(sigma_max=20.0, sigma_data=0.7))
        torch.testing.assert_close(clipped.decode_raw(z), raw.clamp(-1, 1))
    assert OneStepSampler(unet, scheduler, clip_denoised=True).config()["clip_denoised"] is True


@needs_diffusers
def test_one_step_range_and_gradients(cm_folder):
    adapter = OneStepSampler.from_pretrained(cm_folder)
    z = _noise(2, adapter.latent_dim).requires_grad_(True)
    raw = adapter.decode_raw(z).detach()
    assert float(raw.min()) >= -1 and float(raw.max()) <= 1
    img = adapter.decode(z)
    assert float(img.detach().min()) >= 0 and float(img.detach().max()) <= 1
    (grad,) = torch.autograd.grad(img.square().sum(), z)
    assert bool(torch.isfinite(grad).all()) and float(grad.abs().sum()) > 0


@needs_diffusers
def test_one_step_fingerprint_stable_across_save_and_load(cm_folder, tmp_path):
    loaded = OneStepSampler.from_pretrained(cm_folder)
    in_memory = OneStepSampler(_unet(), diffusers.CMStochasticIterativeScheduler())
    assert loaded.fingerprint() == in_memory.fingerprint()
    diffusers.ConsistencyModelPipeline(unet=loaded.unet, scheduler=diffusers.CMStochasticIterativeScheduler()).save_pretrained(tmp_path)
    assert OneStepSampler.from_pretrained(tmp_path).fingerprint() == loaded.fingerprint()
    other = OneStepSampler(_unet(), diffusers.CMStochasticIterativeScheduler(sigma_max=40.0))
    assert other.fingerprint() != loaded.fingerprint()


@needs_diffusers
def test_one_step_class_conditional():
    unet = _unet(num_class_embeds=3)
    scheduler = diffusers.CMStochasticIterativeScheduler()
    adapter = OneStepSampler(unet, scheduler, class_label=2)
    z = _noise(2, adapter.latent_dim, seed=5)
    with torch.no_grad():
        ours = adapter.decode(z)
        other = adapter.decode(z, torch.tensor([0, 1]))
    ref = _pipeline_images(unet, scheduler, z.view(2, 3, 16, 16), class_labels=[2, 2])
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-6)
    assert not torch.allclose(ours, other)
    images = adapter.generate(2, torch.Generator().manual_seed(0)).images
    # a short polish: this checks the class handling, not convergence
    res = invert(adapter, images, settings=FAMILY_DEFAULTS["consistency"].replace(polish_steps=3), steps=5, restarts=2,
                 conditions=torch.tensor([2, 0]))
    assert bool(torch.isfinite(res.loss).all())
    assert res.conditions.tolist() == [2, 0]
    with pytest.raises(ValueError, match="class-conditional: pass each image's class"):
        invert(OneStepSampler(unet, scheduler), images, steps=1)
    with pytest.raises(ValueError, match=r"class_label must be an int in \[0, 3\)"):
        OneStepSampler(unet, scheduler, class_label=3)
    with pytest.raises(ValueError, match="not class-conditional"):
        OneStepSampler(_unet(), scheduler, class_label=0)


@needs_diffusers
def test_one_step_bad_arguments(tmp_path):
    with pytest.raises(TypeError, match="UNet2DModel"):
        OneStepSampler(torch.nn.Linear(1, 1), diffusers.CMStochasticIterativeScheduler())
    with pytest.raises(TypeError, match="CMStochasticIterativeScheduler"):
        OneStepSampler(_unet(), diffusers.DDIMScheduler())
    with pytest.raises(FileNotFoundError, match="no sub-folder 'unet'"):
        OneStepSampler.from_pretrained(tmp_path)


@needs_diffusers
def test_invert_runs_on_one_step_sampler(cm_folder):
    adapter = OneStepSampler.from_pretrained(cm_folder)
    images = adapter.generate(2, torch.Generator().manual_seed(0)).images
    # a short polish: this checks that the sampler inverts, not how far
    res = invert(adapter, images, settings=FAMILY_DEFAULTS["consistency"].replace(polish_steps=3), steps=5, restarts=2,
                 seed=0)
    assert res.loss.shape == (2,) and bool(torch.isfinite(res.loss).all())
    assert res.reconstruction.shape == (2, 3, 16, 16)


# --------------------------------------------------------------------------- a folder by what it holds


@needs_diffusers
def test_from_folder_picks_the_adapter(cm_folder, kl_folder, tmp_path):
    from ronan_fast.diffusers_adapters import from_folder

    assert isinstance(from_folder(cm_folder), OneStepSampler)
    assert isinstance(from_folder(kl_folder), LatentDiffusionDecoder)
    pipe = tmp_path / "pipe"
    _vq().save_pretrained(pipe / "vqvae")
    dec = from_folder(pipe)
    assert isinstance(dec, LatentDiffusionDecoder) and dec.kind == "vq"
    with pytest.raises(FileNotFoundError, match="holds no diffusers model"):
        from_folder(tmp_path)
    with pytest.raises(FileNotFoundError, match="is not a local folder"):
        from_folder(tmp_path / "absent")
    ddpm = tmp_path / "ddpm"
    diffusers.DDPMPipeline(unet=_unet(), scheduler=diffusers.DDPMScheduler()).save_pretrained(ddpm)
    with pytest.raises(ValueError, match="only one-step consistency models"):
        from_folder(ddpm)


@needs_diffusers
def test_command_line_takes_a_diffusers_folder(cm_folder, tmp_path, capsys):
    """ronan-fast profile / inspect with --model diffusers:FOLDER, and its refusals."""
    from ronan_fast import cli
    from ronan_fast.imageio import save_image

    out = tmp_path / "cm.json"
    argv = ["profile", "--model", f"diffusers:{cm_folder}", "--reference", "none", "-n", "4", "--settings",
            "authors", "--steps", "5", "--retries", "0", "-q", "-o", str(out)]
    assert cli.main(argv) == 0, capsys.readouterr().err
    import json

    saved = json.loads(out.read_text())
    assert saved["generator_name"].startswith("ConsistencyModel:")
    assert saved["generator_fingerprint"] == OneStepSampler.from_pretrained(cm_folder).fingerprint()
    img = tmp_path / "x.png"
    save_image(OneStepSampler.from_pretrained(cm_folder).generate(1, torch.Generator().manual_seed(1)).images[0], img)
    capsys.readouterr()
    assert cli.main(["inspect", "--profile", str(out), "--model", f"diffusers:{cm_folder}", str(img), "-q"]) == 0
    assert "x.png" in capsys.readouterr().out
    assert cli.main(["profile", "--model", f"diffusers:{tmp_path / 'absent'}", "-o", str(out)]) == 2
    assert "is not a local folder" in capsys.readouterr().err
    assert cli.main(["profile", "--model", f"diffusers:{cm_folder}", "--latent-shape", "3", "-o", str(out)]) == 2
    assert "a diffusers folder holds its own weights and shapes" in capsys.readouterr().err
    conditional = tmp_path / "cm3"
    diffusers.ConsistencyModelPipeline(unet=_unet(num_class_embeds=3),
                                       scheduler=diffusers.CMStochasticIterativeScheduler()).save_pretrained(conditional)
    assert cli.main(["profile", "--model", f"diffusers:{conditional}", "-o", str(out)]) == 2
    assert "class-conditional (3 classes): give its class with --class-label K" in capsys.readouterr().err
    # with its class: profiled and inspected as that class; another class is another model
    argv = ["profile", "--model", f"diffusers:{conditional}", "--class-label", "2", "--reference", "none", "-n", "4",
            "--settings", "authors", "--steps", "5", "--retries", "0", "-q", "-o", str(out)]
    assert cli.main(argv) == 0, capsys.readouterr().err
    two = OneStepSampler.from_pretrained(conditional, class_label=2)
    assert json.loads(out.read_text())["generator_fingerprint"] == two.fingerprint()
    assert two.with_class(1).fingerprint() == OneStepSampler.from_pretrained(conditional, class_label=1).fingerprint()
    assert cli.main(["inspect", "--profile", str(out), "--model", f"diffusers:{conditional}", "--class-label", "2",
                     str(img), "-q"]) == 0, capsys.readouterr().err
    capsys.readouterr()
    assert cli.main(["inspect", "--profile", str(out), "--model", f"diffusers:{conditional}", "--class-label", "1",
                     str(img), "-q"]) == 3
    assert "model fingerprint differs" in capsys.readouterr().err
    assert cli.main(["profile", "--model", f"diffusers:{conditional}", "--class-label", "3", "-o", str(out)]) == 2
    assert "--class-label 3: class_label must be an int in [0, 3)" in capsys.readouterr().err
    assert cli.main(["profile", "--model", f"diffusers:{cm_folder}", "--class-label", "0", "-o", str(out)]) == 2
    assert "not class-conditional" in capsys.readouterr().err


@needs_diffusers
def test_channels_last_on_diffusers_adapters(kl_folder, cm_folder):
    """ronan_fast.channels_last converts a diffusers VAE decoder's and a UNet's convolutions: the
    same images up to rounding and the same fingerprint."""
    from ronan_fast.adapters import channels_last

    for adapter in (LatentDiffusionDecoder.from_pretrained(kl_folder), OneStepSampler.from_pretrained(cm_folder)):
        z = _noise(2, adapter.latent_dim)
        before = adapter.fingerprint()
        with torch.no_grad():
            ref = adapter.decode(z)
        channels_last(adapter)
        four = [p for m in adapter.modules() for p in m.parameters() if p.dim() == 4 and p.shape[1] > 1
                and p.shape[2] * p.shape[3] > 1]  # else NHWC and NCHW coincide
        assert four and all(p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous()
                            for p in four)
        with torch.no_grad():
            torch.testing.assert_close(adapter.decode(z), ref, rtol=1e-4, atol=1e-5)
        assert adapter.fingerprint() == before
