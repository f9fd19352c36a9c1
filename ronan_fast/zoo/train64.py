"""Recipes of the 64x64 generator benchmark: ``python -m ronan_fast.zoo.train NAME``.

Generators that differ in what makes inversion hard -- architecture (transposed-conv,
upsample + conv and StyleGAN-style DCGAN variants, a VAE decoder, a class-conditional GAN, a
Stable-Diffusion-style ``diffusers.AutoencoderKL`` decoder), latent width, training data and
length, and loss (non-saturating, hinge, WGAN-GP, non-saturating + R1) -- for choosing the
inversion's defaults on one half (``split="tuning"`` in :data:`ronan_fast.zoo.ZOO`) and checking
them on the other (``split="held-out"``). See ``ronan_fast/zoo/README.md``.

The recipes are registered with :mod:`ronan_fast.zoo.train` (its ``RECIPES``), which stays the
one entry point. Like every zoo recipe they are seeded and run a fixed number of steps: the same
seed, steps, thread count and torch build give the same weights. The
AutoencoderKL's training is in :mod:`ronan_fast.zoo.train_aekl`.
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ronan_fast import data as D
from ronan_fast.zoo.datasets import data_digits64, data_fmnist64, data_opencv64, data_photos64, identity, upscale
from ronan_fast.zoo.train_aekl import run_aekl
from ronan_fast.zoo.training import Recipe, base_info, log, n_params, seed_steps, train_steps
from ronan_fast.models import (
    CondDeepDCGANDiscriminator,
    CondDeepDCGANGenerator,
    DeepDCGANDiscriminator,
    DeepDCGANGenerator,
    DeepVAE,
    StyleDiscriminator,
    StyleGenerator,
    UpsampleDCGANGenerator,
    WGANCritic,
    dcgan_init_,
    save_model,
)

ZOO_DIR = Path(__file__).resolve().parent
WEIGHTS_DIR = ZOO_DIR / "weights"
RESULTS_DIR = ZOO_DIR.parent.parent / "results" / "zoo"



# --------------------------------------------------------------------------- GAN training

GAN_LOSSES = ("ns", "hinge", "wgan-gp")


def _d_loss(kind: str, d_real: Tensor, d_fake: Tensor) -> Tensor:
    if kind == "ns":
        return F.softplus(-d_real).mean() + F.softplus(d_fake).mean()
    if kind == "hinge":
        return F.relu(1.0 - d_real).mean() + F.relu(1.0 + d_fake).mean()
    return d_fake.mean() - d_real.mean()  # wgan-gp (the penalty is added by the caller)


def _g_loss(kind: str, d_gen: Tensor) -> Tensor:
    return F.softplus(-d_gen).mean() if kind == "ns" else -d_gen.mean()


class _EMA:
    """Exponential moving average of a generator's parameters, StyleGAN2-ADA style: a half-life of
    ``half_life`` images, ramped up as ``rampup`` x images seen so far; buffers are copied."""

    def __init__(self, model: nn.Module, half_life: float, rampup: float | None):
        self.model = copy.deepcopy(model).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.half_life, self.rampup = half_life, rampup

    @torch.no_grad()
    def update(self, model: nn.Module, images_seen: int, batch: int) -> None:
        hl = self.half_life if self.rampup is None else min(self.half_life, images_seen * self.rampup)
        beta = 0.5 ** (batch / max(hl, 1e-8))
        for pe, p in zip(self.model.parameters(), model.parameters()):
            pe.copy_(p.lerp(pe, beta))
        for be, b in zip(self.model.buffers(), model.buffers()):
            be.copy_(b)


def train_gan64(
    G: nn.Module,
    Dnet: nn.Module,
    x: Tensor,
    *,
    steps: int,
    loss: str = "ns",
    batch: int = 64,
    lr_g: float = 2e-4,
    lr_d: float = 2e-4,
    betas: tuple[float, float] = (0.5, 0.999),
    seed: int = 0,
    labels: Tensor | None = None,
    num_classes: int | None = None,
    n_critic: int = 1,
    gp_weight: float = 10.0,
    r1_gamma: float = 0.0,
    r1_every: int = 4,
    ema_half_life: float | None = None,
    ema_rampup: float | None = 0.05,
    prep: Callable[[Tensor], Tensor] = identity,
    max_seconds: float | None = None,
    log_every: int = 250,
) -> tuple[dict[str, Any], nn.Module | None]:
    """GAN training on ``x`` (in [0, 1]; each batch goes through ``prep`` then to (-1, 1)).

    ``loss``: "ns" (non-saturating), "hinge" or "wgan-gp" (critic loss plus ``gp_weight`` x
    (||grad D(x_hat)|| - 1)^2 at random interpolates). ``n_critic`` discriminator steps per
    generator step, each on a fresh real batch and fresh fakes. ``r1_gamma > 0`` adds the R1
    penalty ``gamma / 2 * ||grad D(real)||^2`` every ``r1_every`` steps, weighted by
    ``r1_every`` (lazy regularisation). ``ema_half_life`` (images) keeps an exponential moving
    average of G, returned as the second value (else None). Conditional when ``labels`` given
    (fakes get uniform random labels). Every random draw comes from one generator seeded
    ``seed + 1``.
    """
    if loss not in GAN_LOSSES:
        raise ValueError(f"loss must be one of {GAN_LOSSES}, got {loss!r}")
    gen = torch.Generator().manual_seed(seed + 1)
    n = x.shape[0]
    opt_g = torch.optim.Adam(G.parameters(), lr=lr_g, betas=betas)
    opt_d = torch.optim.Adam(Dnet.parameters(), lr=lr_d, betas=betas)
    G.train()
    Dnet.train()
    nz = G.config["nz"]
    ema = _EMA(G, ema_half_life, ema_rampup) if ema_half_life else None
    cond = labels is not None

    def real_batch() -> tuple[Tensor, Tensor | None]:
        idx = torch.randint(0, n, (batch,), generator=gen)
        return D.to_signed(prep(x[idx])), (labels[idx] if cond else None)

    def fakes() -> tuple[Tensor, Tensor | None]:
        z = torch.randn(batch, nz, generator=gen)
        if cond:
            y = torch.randint(0, num_classes, (batch,), generator=gen)
            return G(z, y), y
        return G(z), None

    def disc(img: Tensor, y: Tensor | None) -> Tensor:
        return Dnet(img, y) if cond else Dnet(img)

    t0 = time.perf_counter()
    ema_d = ema_g = ema_r1 = None
    done = 0
    for step in range(1, steps + 1):
        for _ in range(n_critic):
            real, y_real = real_batch()
            with torch.no_grad():
                fake, y_fake = fakes()
            r1_now = r1_gamma > 0 and (step - 1) % r1_every == 0
            if r1_now:
                real.requires_grad_(True)
            d_real = disc(real, y_real)
            loss_d = _d_loss(loss, d_real, disc(fake, y_fake))
            if loss == "wgan-gp":
                a = torch.rand(batch, 1, 1, 1, generator=gen)
                mix = (a * real.detach() + (1 - a) * fake).requires_grad_(True)
                (g,) = torch.autograd.grad(disc(mix, y_real).sum(), mix, create_graph=True)
                loss_d = loss_d + gp_weight * (g.flatten(1).norm(dim=1) - 1).square().mean()
            if r1_now:
                (g,) = torch.autograd.grad(d_real.sum(), real, create_graph=True)
                r1 = g.flatten(1).square().sum(1).mean()
                loss_d = loss_d + (r1_gamma / 2) * r1_every * r1
                ema_r1 = r1.item() if ema_r1 is None else 0.9 * ema_r1 + 0.1 * r1.item()
            opt_d.zero_grad(set_to_none=True)
            loss_d.backward()
            opt_d.step()
        fake, y_fake = fakes()
        loss_g = _g_loss(loss, disc(fake, y_fake))
        opt_g.zero_grad(set_to_none=True)
        loss_g.backward()
        opt_g.step()
        if ema is not None:
            ema.update(G, step * batch, batch)
        ld, lg = loss_d.item(), loss_g.item()
        ema_d = ld if ema_d is None else 0.98 * ema_d + 0.02 * ld
        ema_g = lg if ema_g is None else 0.98 * ema_g + 0.02 * lg
        done = step
        elapsed = time.perf_counter() - t0
        if step % log_every == 0 or step == steps:
            extra = f"  R1 {ema_r1:.3f}" if ema_r1 is not None else ""
            log(f"step {step:6d}/{steps}  loss_D {ema_d:.4f}  loss_G {ema_g:.4f}{extra}  "
                f"({elapsed:.0f} s, {elapsed / step * 1e3:.0f} ms/step)")
        if max_seconds is not None and elapsed > max_seconds:
            log(f"stopping at step {step}: wall-clock cap of {max_seconds:.0f} s reached")
            break
    stats = {"steps_done": done, "final_loss_D_ema": ema_d, "final_loss_G_ema": ema_g,
             "seconds": round(time.perf_counter() - t0, 1), "batch": batch, "lr_g": lr_g, "lr_d": lr_d,
             "betas": list(betas), "n_critic": n_critic}
    if loss == "wgan-gp":
        stats["gp_weight"] = gp_weight
    if r1_gamma > 0:
        stats.update(r1_gamma=r1_gamma, r1_every=r1_every, final_r1_ema=ema_r1)
    if ema is not None:
        stats.update(ema_half_life_images=ema_half_life, ema_rampup=ema_rampup)
    return stats, (ema.model if ema is not None else None)


_LOSS_NAMES = {"ns": "non-saturating GAN", "hinge": "hinge GAN", "wgan-gp": "WGAN-GP"}


def _grid(images: Tensor, recipe, nrow: int = 8, note: str = "") -> None:
    for p in recipe.grid:
        D.save_grid(images, p, nrow=nrow)
        log(f"wrote sample grid {p}{note}")



def _prep_note(prep: Callable[[Tensor], Tensor]) -> str:
    # the log names a batch transform by its docstring (as upscale's); identity's is written for readers
    return "as is" if prep is identity else prep.__doc__ or "as is"


def run_gan64(recipe, args: argparse.Namespace) -> dict[str, Any]:
    """Train ``params["generator"]`` (a (class, kwargs) pair) against ``params["discriminator"]``
    with :func:`train_gan64` and ``params["train"]`` as its settings; save G (or its EMA)."""
    p = recipe.params
    x, y = p["data"]()
    seed, steps, cap = seed_steps(recipe, args)
    torch.manual_seed(seed)
    (g_cls, g_kw), (d_cls, d_kw) = p["generator"], p["discriminator"]
    G, Dn = g_cls(**g_kw), d_cls(**d_kw)
    if p.get("dcgan_init", True):
        dcgan_init_(G)
        dcgan_init_(Dn)
    settings = dict(p.get("train", {}))
    conditional = bool(G.config.get("num_classes"))
    prep = p.get("prep", identity)
    log(f"{recipe.name}: {recipe.description}")
    log(f"data {tuple(x.shape)} ({_prep_note(prep)}), G params {n_params(G)}, D params {n_params(Dn)}, "
          f"seed {seed}, steps {steps}, {settings}")
    stats, G_ema = train_gan64(G, Dn, x, steps=steps, seed=seed, max_seconds=cap, prep=prep,
                               labels=y if conditional else None,
                               num_classes=G.config.get("num_classes"), **settings)
    out = G_ema if G_ema is not None else G
    loss = settings.get("loss", "ns")
    info = {**base_info(recipe, seed, steps, x), "loss": _LOSS_NAMES[loss] + (" + R1" if settings.get("r1_gamma") else ""),
            "optimizer": "Adam", "saved": "EMA of G" if G_ema is not None else "G", **stats}
    out.eval()
    save_model(out, recipe.out, info=info)
    log(f"wrote {recipe.out}")
    g = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        if conditional:
            k = out.config["num_classes"]
            lab = torch.arange(7 * k) % k  # column c of the grid is class c
            _grid(D.to_unit(out(torch.randn(7 * k, out.nz, generator=g), lab)), recipe, nrow=k, note=" (column = class)")
        else:
            _grid(D.to_unit(out(torch.randn(64, out.nz, generator=g))), recipe)
    return info


# --------------------------------------------------------------------------- VAE


def run_vae64(recipe, args: argparse.Namespace) -> dict[str, Any]:
    """A :class:`DeepVAE` on ``params["data"]`` (batches through ``params["prep"]``), negative ELBO, Adam."""
    p = recipe.params
    x, _ = p["data"]()
    prep = p.get("prep", identity)
    seed, steps, cap = seed_steps(recipe, args)
    torch.manual_seed(seed)
    model = DeepVAE(**p["model"])
    batch, lr = p.get("batch", 64), p.get("lr", 1e-3)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed + 1)
    log(f"{recipe.name}: {recipe.description}")
    log(f"data {tuple(x.shape)} ({_prep_note(prep)}), params {n_params(model)}, seed {seed}, steps {steps}")

    def step() -> tuple[float, float, float]:
        xb = prep(x[torch.randint(0, x.shape[0], (batch,), generator=gen)])
        total, recon, kl = model.loss(xb, generator=gen)
        opt.zero_grad(set_to_none=True)
        total.backward()
        opt.step()
        return total.item(), recon.item(), kl.item()

    def report(i: int, ema: tuple[float, ...], el: float) -> None:
        log(f"step {i:6d}/{steps}  -ELBO {ema[0]:.1f}  recon {ema[1]:.1f}  KL {ema[2]:.2f}  "
              f"({el:.0f} s, {el / i * 1e3:.0f} ms/step)")

    model.train()
    ema, done, seconds = train_steps(steps, cap, step, report)
    info = {**base_info(recipe, seed, steps, x), "loss": "negative ELBO (Bernoulli pixels)", "optimizer": "Adam",
            "lr": lr, "batch": batch, "steps_done": done, "final_neg_elbo_ema": ema[0], "final_recon_ema": ema[1],
            "final_kl_ema": ema[2], "seconds": round(seconds, 1)}
    model.eval()
    save_model(model, recipe.out, info=info)
    log(f"wrote {recipe.out}")
    g = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        _grid(model(torch.randn(64, model.nz, generator=g)), recipe)
    return info


# --------------------------------------------------------------------------- the recipes


def benchmark_recipes() -> dict[str, Recipe]:
    """The 64x64 benchmark's recipes, by name."""
    zoo = lambda n: WEIGHTS_DIR / f"{n}.safetensors"  # noqa: E731
    grid = lambda n: [RESULTS_DIR / f"{n}.png"]  # noqa: E731
    fm64, dig64 = upscale(64), upscale(64)
    r: dict[str, Any] = {}

    def add(rec) -> None:
        r[rec.name] = rec

    # Twins: the same narrow transposed-conv DCGAN on the same data with the same seed; the long
    # one trains 3x as many steps (a longer-trained GAN folds its latent space more).
    twin = {"data": data_opencv64,
            "generator": (DeepDCGANGenerator, dict(nz=64, ngf=16, channels=3, size=64)),
            "discriminator": (DeepDCGANDiscriminator, dict(ndf=16, channels=3, size=64)),
            "train": dict(loss="hinge", batch=32, lr_g=2e-4, lr_d=2e-4, betas=(0.5, 0.999))}
    add(Recipe(
        "dcgan64n-opencv", "narrow all-convolutional DCGAN (nz=64, ngf=16) on 20,000 colour 64x64 patches of "
        "OpenCV's sample photos, hinge loss, 1,250 steps (the short twin of dcgan64n-opencv-long)", run_gan64,
        steps=1250, seed=80, out=zoo("dcgan64n-opencv"), grid=grid("dcgan64n-opencv"), params=twin,
    ))
    add(Recipe(
        "dcgan64n-opencv-long", "dcgan64n-opencv trained 3x longer (3,750 steps): same architecture, data, loss "
        "and seed", run_gan64,
        steps=3750, seed=80, out=zoo("dcgan64n-opencv-long"), grid=grid("dcgan64n-opencv-long"), params=twin,
    ))
    def style_params(data, nz: int, w_dim: int) -> dict:
        """The StyleGAN-style models' recipe (both trained the same way): their data and widths apart."""
        return {"data": data, "dcgan_init": False,
                "generator": (StyleGenerator, dict(nz=nz, w_dim=w_dim, n_mlp=4, base=64, min_ch=8, channels=3,
                                                   size=64, lr_mul=0.01)),
                "discriminator": (StyleDiscriminator, dict(base=64, min_ch=8, channels=3, size=64)),
                "train": dict(loss="ns", batch=16, lr_g=2e-3, lr_d=2e-3, betas=(0.0, 0.99), r1_gamma=0.1,
                              r1_every=4, ema_half_life=5000, ema_rampup=0.05)}

    add(Recipe(
        "stylegan64-photos", "StyleGAN2-style generator (z 512 -> 4-layer mapping -> w 256, modulated and "
        "demodulated 3x3 convs, constant 4x4 input, no noise, skip toRGB; widths 64-8) on 20,000 colour 64x64 "
        "photo patches; non-saturating loss + lazy R1, EMA of G", run_gan64,
        steps=1500, seed=90, out=zoo("stylegan64-photos"), grid=grid("stylegan64-photos"),
        params=style_params(data_photos64, nz=512, w_dim=256),
    ))
    add(Recipe(
        "stylegan64-opencv", "StyleGAN2-style generator (z 256 -> 4-layer mapping -> w 128, modulated and "
        "demodulated 3x3 convs, constant 4x4 input, no noise, skip toRGB; widths 64-8) on 20,000 colour 64x64 "
        "patches of OpenCV's sample photos; non-saturating loss + lazy R1, EMA of G (the tuning half's "
        "StyleGAN: other data, widths and seed than stylegan64-photos)", run_gan64,
        steps=1500, seed=95, out=zoo("stylegan64-opencv"), grid=grid("stylegan64-opencv"),
        params=style_params(data_opencv64, nz=256, w_dim=128),
    ))
    add(Recipe(
        "upgan64-fmnist", "upsample + conv DCGAN (nz=32, ngf=16) on Fashion-MNIST train upscaled to 64x64, "
        "WGAN-GP (3 critic steps per generator step)", run_gan64,
        steps=1200, seed=100, out=zoo("upgan64-fmnist"), grid=grid("upgan64-fmnist"),
        params={"data": data_fmnist64, "prep": fm64,
                "generator": (UpsampleDCGANGenerator, dict(nz=32, ngf=16, channels=1, size=64)),
                "discriminator": (WGANCritic, dict(ndf=16, channels=1, size=64)),
                "train": dict(loss="wgan-gp", batch=32, lr_g=2e-4, lr_d=2e-4, betas=(0.0, 0.9), n_critic=3,
                              gp_weight=10.0)},
    ))
    add(Recipe(
        "condgan64-digits", "class-conditional all-convolutional DCGAN (nz=128, ngf=16, label embedding 16) "
        "with a projection discriminator on the zoo's 10,000 digits upscaled to 64x64, non-saturating loss",
        run_gan64, steps=3000, seed=110, out=zoo("condgan64-digits"), grid=grid("condgan64-digits"),
        params={"data": data_digits64, "prep": dig64,
                "generator": (CondDeepDCGANGenerator, dict(nz=128, num_classes=10, ngf=16, embed_dim=16, channels=1,
                                                           size=64)),
                "discriminator": (CondDeepDCGANDiscriminator, dict(num_classes=10, ndf=16, channels=1, size=64)),
                "train": dict(loss="ns", batch=32, lr_g=2e-4, lr_d=2e-4, betas=(0.5, 0.999))},
    ))
    add(Recipe(
        "vae64-fmnist", "DeepVAE (nz=32, nf=16) on Fashion-MNIST train upscaled to 64x64, Bernoulli negative ELBO",
        run_vae64, steps=3000, seed=120, out=zoo("vae64-fmnist"), grid=grid("vae64-fmnist"),
        params={"data": data_fmnist64, "prep": fm64, "model": dict(nz=32, nf=16, channels=1, size=64),
                "batch": 64, "lr": 1e-3},
    ))
    add(Recipe(
        "aekl64-photos", "Stable-Diffusion-style diffusers.AutoencoderKL (64x64 RGB, latent 4x8x8, widths "
        "16-32-32-64) on 20,000 colour 64x64 photo patches, MSE + light KL", run_aekl,
        steps=2400, seed=130, out=WEIGHTS_DIR / "aekl64-photos", grid=grid("aekl64-photos"),
        params={"data": data_photos64,
                "held_out": lambda: D.photo_patches(size=64, n=500, grey=False, seed=999),
                "recon_grid": RESULTS_DIR / "aekl64-photos-recon.png",
                "config": dict(in_channels=3, out_channels=3, latent_channels=4, sample_size=64,
                               block_out_channels=(16, 32, 32, 64), layers_per_block=1, norm_num_groups=8,
                               down_block_types=("DownEncoderBlock2D",) * 4,
                               up_block_types=("UpDecoderBlock2D",) * 4),
                "batch": 16, "lr": 1e-3, "warmup": 200, "kl_weight": 1e-4, "stat_images": 2000,
                "latent_stats": "per-channel"},
    ))
    return r


__all__ = ["benchmark_recipes", "run_gan64", "run_vae64", "train_gan64"]
