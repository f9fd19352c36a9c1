"""Architectures: shapes, output ranges, config rebuild, safetensors save/load, clear errors."""

from __future__ import annotations

import json
import os

import pytest
import torch

from ronan_fast.models import (
    ARCHITECTURES,
    VAE,
    CondGANDiscriminator,
    CondGANGenerator,
    DCGANDiscriminator,
    DCGANGenerator,
    DDIMSampler,
    DeepDCGANDiscriminator,
    DeepDCGANGenerator,
    OneStepStudent,
    TinyUNet,
    load_model,
    read_metadata,
    save_model,
)
from ronan_fast.models.diffusion import alphas_cumprod, ddim_timesteps

torch.set_num_threads(2)


def _perturb_bn(model):
    """Give BatchNorm layers non-trivial running statistics so a load that lost them would show."""
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
    return model


def test_dcgan_shapes_and_range():
    g = DCGANGenerator(nz=8, ngf=8).eval()
    z = torch.randn(5, 8) * 10
    x = g(z)
    assert x.shape == (5, 1, 28, 28)
    assert float(x.abs().max()) <= 1.0
    d = DCGANDiscriminator(ndf=8)
    assert d(x).shape == (5,)
    assert DCGANGenerator(nz=4, ngf=4, channels=3, size=16)(torch.randn(2, 4)).shape == (2, 3, 16, 16)
    with pytest.raises(ValueError, match="z must be"):
        g(torch.randn(5, 9))
    with pytest.raises(ValueError, match="size"):
        DCGANGenerator(size=30)
    with pytest.raises(ValueError, match="ngf"):
        DCGANGenerator(ngf=0)


@pytest.mark.parametrize("size", [32, 64])
def test_deep_dcgan_shapes_and_range(size):
    g = DeepDCGANGenerator(nz=10, ngf=4, channels=3, size=size).eval()
    x = g(torch.randn(3, 10) * 10)
    assert x.shape == (3, 3, size, size) and float(x.abs().max()) <= 1.0
    # one transposed convolution per doubling from the 4x4 seed, the last one to the image
    convs = [m for m in g.modules() if isinstance(m, torch.nn.ConvTranspose2d)]
    assert len(convs) == size.bit_length() - 2 and convs[-1].out_channels == 3
    assert DeepDCGANDiscriminator(ndf=4, channels=3, size=size)(x).shape == (3,)
    with pytest.raises(ValueError, match="z must be"):
        g(torch.randn(3, 10, 1, 1))
    with pytest.raises(ValueError, match="size must be 32, 64 or 128"):
        DeepDCGANGenerator(size=48)
    with pytest.raises(ValueError, match="ndf"):
        DeepDCGANDiscriminator(ndf=0)


def test_vae_decoder_range_and_elbo():
    v = VAE(nz=6, nf=8)
    x = torch.rand(4, 1, 28, 28)
    total, recon, kl = v.loss(x, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(total) and float(kl) >= 0 and float(recon) > 0
    v.eval()
    out = v(torch.randn(4, 6) * 5)
    assert out.shape == (4, 1, 28, 28) and float(out.min()) >= 0 and float(out.max()) <= 1


def test_condgan_int_and_onehot_labels_agree():
    g = CondGANGenerator(nz=8, num_classes=10, ngf=8, embed_dim=4).eval()
    z = torch.randn(6, 8)
    y = torch.tensor([0, 1, 2, 3, 9, 5])
    a = g(z, y)
    b = g(z, torch.nn.functional.one_hot(y, 10).float())
    assert a.shape == (6, 1, 28, 28) and torch.allclose(a, b, atol=1e-6)
    assert not torch.allclose(g(z, torch.zeros(6, dtype=torch.long)), a)
    with pytest.raises(ValueError, match="labels must lie"):
        g(z, torch.full((6,), 10))
    with pytest.raises(ValueError, match="labels must be"):
        g(z, torch.zeros(6, 3))
    d = CondGANDiscriminator(num_classes=10, ndf=8)
    assert d(a, y).shape == (6,)


def test_ddim_schedule():
    assert ddim_timesteps(10, 1000) == [999, 899, 799, 699, 599, 499, 399, 299, 199, 99]
    assert ddim_timesteps(6, 1000) == [999, 832, 666, 499, 332, 166]
    assert ddim_timesteps(4, 1000)[0] == 999
    ac = alphas_cumprod()
    assert ac.shape == (1000,) and float(ac[0]) == pytest.approx(1 - 1e-4) and float(ac[-1]) < 1e-4


def test_ddim_sampler_is_differentiable_in_the_noise():
    s = DDIMSampler(TinyUNet(ch=8, patch=1), steps=4).eval()
    xT = torch.randn(3, 1, 28, 28, requires_grad=True)
    x0 = s(xT)
    assert x0.shape == (3, 1, 28, 28) and float(x0.abs().max()) <= 1.0
    x0.square().sum().backward()
    assert xT.grad is not None and torch.isfinite(xT.grad).all() and float(xT.grad.abs().sum()) > 0
    assert s.latent_shape == (1, 28, 28)
    with pytest.raises(ValueError, match="x_T must be"):
        s(torch.randn(3, 28, 28))
    with pytest.raises(ValueError, match="steps"):
        DDIMSampler(TinyUNet(ch=8, patch=1), steps=0)
    # one step with the zero-noise predictor returns x_T rescaled to abar_T, clipped
    one = DDIMSampler(TinyUNet(ch=8, patch=1), steps=1).eval()
    for p in one.unet.conv_out.parameters():
        torch.nn.init.zeros_(p)
    x = torch.randn(2, 1, 28, 28) * 0.001
    assert torch.allclose(one(x), (x / one.alpha_t[0].sqrt()).clamp(-1, 1), atol=1e-5)


def test_one_step_sampler_is_smooth_and_checks_its_input():
    s = OneStepStudent(TinyUNet(ch=8, patch=1), timestep=999).eval()
    xT = torch.randn(3, 1, 28, 28, requires_grad=True)
    x0 = s(xT)
    assert x0.shape == (3, 1, 28, 28) and float(x0.detach().abs().max()) < 1.0
    # tanh(unet(x_T, t)) exactly, with the configured timestep
    with torch.no_grad():
        want = torch.tanh(s.unet(xT, torch.full((3,), 999)))
    assert torch.allclose(x0.detach(), want, atol=1e-6)
    x0.square().sum().backward()
    assert torch.isfinite(xT.grad).all() and bool((xT.grad != 0).all())  # no clip: every pixel has a gradient
    assert s.latent_shape == (1, 28, 28)
    with pytest.raises(ValueError, match="x_T must be"):
        s(torch.randn(3, 1, 14, 14))
    with pytest.raises(TypeError, match="unet must be"):
        OneStepStudent(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="timestep"):
        OneStepStudent(TinyUNet(ch=8, patch=1), timestep=-1)


def test_distillation_recipe_brings_the_student_to_its_teacher(tmp_path):
    """The onestep recipe on a tiny teacher: the saved student follows the teacher more closely
    than the teacher-initialised student did before training, and records how closely."""
    import argparse

    from ronan_fast.zoo.train import Recipe
    from ronan_fast.zoo.train_diffusion import _teacher_pairs, run_distill

    torch.manual_seed(0)
    teacher = DDIMSampler(TinyUNet(ch=8, patch=2), steps=2).eval()
    tpath = save_model(teacher, tmp_path / "teacher.safetensors", info={"steps_done": 0})
    rec = Recipe("tiny-onestep", "test", run_distill, steps=150, seed=3, out=tmp_path / "student.safetensors",
                 grid=[tmp_path / "grid.png"],
                 params={"teacher": tpath, "teacher_recipe": "none", "pairs": 256, "val_pairs": 64, "batch": 32,
                         "lr": 3e-3, "ema": 0.9})
    args = argparse.Namespace(seed=None, steps=None, minutes=None)
    info = run_distill(rec, args)
    student = load_model(rec.out)
    assert isinstance(student, OneStepStudent) and student.config["timestep"] == 999
    v_T, v_0 = _teacher_pairs(load_model(tpath), 64, rec.seed + 2)
    init = OneStepStudent(dict(teacher.unet.config), timestep=999).eval()
    init.unet.load_state_dict(teacher.unet.state_dict())
    with torch.no_grad():
        before = float((init(v_T) - v_0).square().mean())
        after = float((student(v_T) - v_0).square().mean())
    assert after == pytest.approx(info["held_out_mse"], rel=1e-4)
    assert after < 0.5 * before, (before, after)
    assert info["steps_done"] == 150 and (tmp_path / "grid.png").is_file()
    with pytest.raises(FileNotFoundError, match="teacher"):
        run_distill(Recipe("x", "x", run_distill, 1, 0, tmp_path / "y.safetensors",
                           params={"teacher": tmp_path / "missing.safetensors", "teacher_recipe": "t"}), args)


@pytest.mark.parametrize(
    "model,args",
    [
        (DCGANGenerator(nz=8, ngf=8), lambda: (torch.randn(3, 8),)),
        (DCGANDiscriminator(ndf=8), lambda: (torch.rand(3, 1, 28, 28),)),
        (DeepDCGANGenerator(nz=6, ngf=4, size=32), lambda: (torch.randn(3, 6),)),
        (DeepDCGANDiscriminator(ndf=4, size=32), lambda: (torch.rand(3, 3, 32, 32),)),
        (VAE(nz=4, nf=8), lambda: (torch.randn(3, 4),)),
        (CondGANGenerator(nz=8, ngf=8, embed_dim=4), lambda: (torch.randn(3, 8), torch.tensor([1, 2, 3]))),
        (DDIMSampler(TinyUNet(ch=8, patch=2), steps=3), lambda: (torch.randn(3, 1, 28, 28),)),
        (OneStepStudent(TinyUNet(ch=8, patch=2), timestep=999), lambda: (torch.randn(3, 1, 28, 28),)),
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, torch.nn.Module) else "",
)
def test_save_load_roundtrip(tmp_path, model, args):
    model = _perturb_bn(model).eval()
    inputs = args()
    with torch.no_grad():
        want = model(*inputs)
    p = save_model(model, tmp_path / "m.safetensors", info={"note": "test", "steps": 3})
    assert not list(tmp_path.glob("*.tmp"))
    mask = os.umask(0)
    os.umask(mask)
    assert p.stat().st_mode & 0o777 == 0o666 & ~mask  # readable like any new file, not mkstemp's 0o600
    meta = read_metadata(p)
    assert meta["architecture"] == type(model).__name__ and meta["info"] == {"note": "test", "steps": 3}
    assert meta["config"] == json.loads(json.dumps(model.config))
    back = load_model(p)
    assert type(back) is type(model) and not back.training
    with torch.no_grad():
        assert torch.equal(back(*inputs), want)


def test_config_rebuilds_every_architecture():
    for name, cls in ARCHITECTURES.items():
        m = cls()
        twin = cls(**m.config)
        assert twin.config == m.config, name
        assert {k: v.shape for k, v in twin.state_dict().items()} == {k: v.shape for k, v in m.state_dict().items()}


def test_load_errors(tmp_path):
    from safetensors.torch import save_file

    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        load_model(tmp_path / "nope.safetensors")
    pkl = tmp_path / "pickled.safetensors"
    torch.save({"w": torch.zeros(1)}, pkl)
    with pytest.raises(ValueError, match="not a readable safetensors"):
        load_model(pkl)
    bare = tmp_path / "bare.safetensors"
    save_file({"w": torch.zeros(1)}, str(bare))
    with pytest.raises(ValueError, match="metadata format"):
        load_model(bare)
    unknown = tmp_path / "unknown.safetensors"
    save_file({"w": torch.zeros(1)}, str(unknown),
              metadata={"format": "ronan_fast.model/1", "architecture": "StyleGAN9", "config": "{}"})
    with pytest.raises(ValueError, match="unknown architecture 'StyleGAN9'"):
        load_model(unknown)
    wrong = tmp_path / "wrong.safetensors"
    save_model(DCGANGenerator(nz=8, ngf=8), wrong)
    from safetensors.torch import load_file

    state = load_file(str(wrong))
    save_file(state, str(wrong), metadata={"format": "ronan_fast.model/1", "architecture": "DCGANGenerator",
                                           "config": json.dumps({"nz": 8, "ngf": 16})})
    with pytest.raises((ValueError, RuntimeError), match="size mismatch|do not match"):
        load_model(wrong)
    with pytest.raises(TypeError, match="not a registered architecture"):
        save_model(torch.nn.Linear(2, 2), tmp_path / "lin.safetensors")


# --------------------------------------------------------------------------- zoo


def test_overlap_split_construction():
    from ronan_fast.zoo.datasets import OVERLAP_SIZE, overlap_indices

    prev_tr, prev_te = None, None
    for pct in (50, 60, 70, 80, 90):
        tr, te = overlap_indices(pct / 100)
        assert len(tr) + len(te) == OVERLAP_SIZE and len(tr) == OVERLAP_SIZE * pct // 100
        assert len(set(tr.tolist())) == len(tr) and len(set(te.tolist())) == len(te)
        assert 0 <= int(tr.min()) and int(tr.max()) < 60000
        assert 5000 <= int(te.min()) and int(te.max()) < 10000  # never the held-out test[0:5000]
        if prev_tr is not None:
            assert set(prev_tr.tolist()) <= set(tr.tolist()) and set(te.tolist()) <= set(prev_te.tolist())
        prev_tr, prev_te = tr, te
    a, b = overlap_indices(0.7)
    assert torch.equal(a, overlap_indices(0.7)[0]) and torch.equal(b, overlap_indices(0.7)[1])
    with pytest.raises(ValueError, match="fraction"):
        overlap_indices(1.5)


def test_zoo_registry_and_weights():
    from ronan_fast.zoo import DIFFUSERS_ARCHITECTURES, ZOO, ZOO_REFERENCE, load_zoo_module

    assert ZOO_REFERENCE in ZOO
    assert {e.family for e in ZOO.values()} == {"gan", "vae", "conditional", "diffusion", "consistency"}
    assert ZOO[ZOO_REFERENCE].training_data not in {e.training_data for n, e in ZOO.items() if "fmnist" in n}
    g = torch.Generator().manual_seed(0)
    for name, entry in ZOO.items():
        if entry.architecture in DIFFUSERS_ARCHITECTURES:  # a diffusers folder: tests/test_zoo_benchmark.py
            continue
        m = load_zoo_module(name)
        assert type(m).__name__ == entry.architecture and not m.training, name
        assert tuple(m.latent_shape) == entry.latent_shape, name
        z = torch.randn(4, *entry.latent_shape, generator=g)
        with torch.no_grad():
            x = m(z, torch.arange(4)) if entry.num_classes else m(z)
        lo, hi = entry.output_range
        assert x.shape == (4, *entry.image_shape), name
        assert torch.isfinite(x).all() and lo <= float(x.min()) and float(x.max()) <= hi, name
        assert m.info["steps_done"] >= 1000, name  # trained weights, by their own record
    with pytest.raises(KeyError, match="unknown zoo model"):
        load_zoo_module("stylegan-ffhq")
