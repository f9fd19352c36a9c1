"""Train the zoo's Stable-Diffusion-style autoencoder, a ``diffusers.AutoencoderKL``
(``aekl64-photos``, whose decoder is a generator of the 64x64 benchmark): MSE + light KL
training, the latent scaling from its encoder's posterior means, and saving it as a diffusers
model folder.

Its recipe is registered by :mod:`ronan_fast.zoo.train64`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ronan_fast import data as D
from ronan_fast.zoo.training import base_info, log, n_params, seed_steps, train_steps

#: the training record written beside a diffusers model folder's weights
AEKL_INFO_FILE = "training_info.json"




def build_autoencoder_kl(config: dict[str, Any]) -> nn.Module:
    """A ``diffusers.AutoencoderKL`` of ``config`` (its constructor's keyword arguments)."""
    from ronan_fast.diffusers_adapters import require_diffusers

    return require_diffusers().AutoencoderKL(**config)


def _aekl_loss(ae: nn.Module, x: Tensor, kl_weight: float, gen: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
    """(total, MSE, KL per image): MSE over pixels in (-1, 1) + ``kl_weight`` x KL summed over the
    latent / pixels per image, the decoder fed a posterior sample drawn from ``gen``."""
    post = ae.encode(x).latent_dist
    z = post.mean + post.std * torch.randn(post.mean.shape, generator=gen)
    rec = ae.decode(z).sample
    mse = F.mse_loss(rec, x)
    kl = post.kl().mean()  # summed over the latent's elements, mean over images
    return mse + kl_weight * kl / x[0].numel(), mse, kl


@torch.no_grad()
def _encoder_means(ae: nn.Module, x: Tensor, chunk: int = 256) -> Tensor:
    return torch.cat([ae.encode(x[i:i + chunk]).latent_dist.mean for i in range(0, x.shape[0], chunk)])


@torch.no_grad()
def _reconstruction_mse(ae: nn.Module, x: Tensor, chunk: int = 256) -> float:
    """Mean squared error of ``decode(posterior mean)`` against ``x`` (both in (-1, 1))."""
    total = 0.0
    for i in range(0, x.shape[0], chunk):
        xb = x[i:i + chunk]
        total += float(F.mse_loss(ae.decode(ae.encode(xb).latent_dist.mean).sample, xb, reduction="sum"))
    return total / x.numel()


def run_aekl(recipe, args: argparse.Namespace) -> dict[str, Any]:
    """A small Stable-Diffusion-style ``diffusers.AutoencoderKL`` (``params["config"]``) trained
    with MSE + a light KL term (``params["kl_weight"]``), Adam with a linear warm-up.

    Afterwards, as Stable Diffusion chose its ``scaling_factor``, the encoder's posterior means
    over ``params["stat_images"]`` training images set the latent's scaling, so that the scaled
    latents the inversion optimises have mean 0 and variance 1 like its N(0, I) prior: with
    ``params["latent_stats"] == "per-channel"``, per-channel ``latents_mean`` / ``latents_std``
    (the config fields some diffusers pipelines use) and ``scaling_factor`` 1; otherwise one
    ``shift_factor`` (their mean, as SD3) and ``scaling_factor`` (1 / their standard deviation).
    Per channel matters: this autoencoder's channel means differ by more than their spread
    (about +-2.8 against 1.7-2.7), so one global scale leaves the prior's draws too wide on some
    channels, whose decodes then overshoot the (-1, 1) range on about 15% of pixels.
    Saved with ``save_pretrained`` (config.json + safetensors) to the folder ``recipe.out``,
    with the training record in ``training_info.json``; the grid shows decodes of 64 prior
    latents, and ``params["recon_grid"]`` held-out patches beside their reconstructions.
    """
    p = recipe.params
    x, _ = p["data"]()
    seed, steps, cap = seed_steps(recipe, args)
    torch.manual_seed(seed)
    ae = build_autoencoder_kl(p["config"])
    batch, lr, warmup = p.get("batch", 16), p.get("lr", 1e-3), p.get("warmup", 200)
    kl_weight = p.get("kl_weight", 1e-4)
    opt = torch.optim.Adam(ae.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup))
    gen = torch.Generator().manual_seed(seed + 1)
    log(f"{recipe.name}: {recipe.description}")
    log(f"data {tuple(x.shape)}, params {n_params(ae)} (decoder {n_params(ae.decoder) + n_params(ae.post_quant_conv)}), "
          f"seed {seed}, steps {steps}, batch {batch}, kl_weight {kl_weight}")

    def step() -> tuple[float, float, float]:
        xb = D.to_signed(x[torch.randint(0, x.shape[0], (batch,), generator=gen)])
        total, mse, kl = _aekl_loss(ae, xb, kl_weight, gen)
        opt.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(ae.parameters(), 1.0)
        opt.step()
        sched.step()
        return total.item(), mse.item(), kl.item()

    def report(i: int, ema: tuple[float, ...], el: float) -> None:
        log(f"step {i:6d}/{steps}  loss {ema[0]:.5f}  MSE {ema[1]:.5f}  KL {ema[2]:.1f} nats/image  "
              f"({el:.0f} s, {el / i * 1e3:.0f} ms/step)")

    ae.train()
    ema, done, seconds = train_steps(steps, cap, step, report)
    ae.eval()
    g = torch.Generator().manual_seed(seed + 2)
    stat_x = D.to_signed(x[torch.randperm(x.shape[0], generator=g)[: p.get("stat_images", 2000)]])
    means = _encoder_means(ae, stat_x)
    shift, std = float(means.mean()), float(means.std())
    ch_mean = means.mean((0, 2, 3)).tolist()
    ch_std = means.std((0, 2, 3)).tolist()
    if p.get("latent_stats", "global") == "per-channel":
        ae.register_to_config(scaling_factor=1.0, shift_factor=None, latents_mean=ch_mean, latents_std=ch_std)
    else:
        ae.register_to_config(scaling_factor=1.0 / std, shift_factor=shift)
    held = D.to_signed(p["held_out"]()) if "held_out" in p else None
    held_mse = _reconstruction_mse(ae, held) if held is not None else None
    info = {**base_info(recipe, seed, steps, x), "loss": "MSE (pixels in [-1, 1]) + kl_weight * KL / pixels",
            "kl_weight": kl_weight, "optimizer": "Adam", "lr": lr, "warmup": warmup, "batch": batch,
            "grad_clip": 1.0, "steps_done": done, "final_loss_ema": ema[0], "final_mse_ema": ema[1],
            "final_kl_ema": ema[2], "latent_mean": shift, "latent_std": std, "latent_channel_means": ch_mean,
            "latent_channel_stds": ch_std, "latent_stats": p.get("latent_stats", "global"),
            "scaling_factor": ae.config.scaling_factor, "shift_factor": ae.config.shift_factor, "seconds": round(seconds, 1), "architecture": "diffusers.AutoencoderKL",
            "config": {k: list(v) if isinstance(v, tuple) else v for k, v in p["config"].items()}}
    if held is not None:
        info.update(held_out_images=int(held.shape[0]), held_out_recon_mse=held_mse,
                    held_out_recon_psnr_db=10 * math.log10(4.0 / held_mse))  # peak-to-peak 2 in (-1, 1)
    save_autoencoder(ae, recipe.out, info)
    log(f"wrote {recipe.out}" + (f" (held-out reconstruction MSE {held_mse:.5f}, PSNR "
                                    f"{info['held_out_recon_psnr_db']:.1f} dB)" if held is not None else ""))
    from ronan_fast.diffusers_adapters import LatentDiffusionDecoder

    adapter = LatentDiffusionDecoder.from_pretrained(recipe.out, name=recipe.name)
    z = adapter.sample_latents(64, torch.Generator().manual_seed(1234))
    with torch.no_grad():
        prior = adapter.decode(z).clamp(0, 1)
        for path in recipe.grid:
            D.save_grid(prior, path, nrow=8)
            log(f"wrote sample grid {path} (decodes of prior latents)")
        if held is not None and p.get("recon_grid"):
            k = 32
            rec = ae.decode(ae.encode(held[:k]).latent_dist.mean).sample
            pairs = torch.stack([held[:k], rec], 1).flatten(0, 1)  # original, reconstruction, ...
            D.save_grid(D.to_unit(pairs), p["recon_grid"], nrow=8)
            log(f"wrote {p['recon_grid']} (held-out patch, its reconstruction, ...)")
    return info


def save_autoencoder(ae: nn.Module, folder: str | os.PathLike, info: dict[str, Any]) -> Path:
    """``ae.save_pretrained`` into ``folder`` (safetensors), with ``info`` as training_info.json;
    written to a temporary folder beside it and swapped in, so a reader never sees half a model."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}."))
    try:
        ae.save_pretrained(tmp, safe_serialization=True)
        (tmp / AEKL_INFO_FILE).write_text(json.dumps(info, indent=1, sort_keys=True, default=str) + "\n")
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(tmp, 0o777 & ~mask)  # readable like any new folder and file, not mkdtemp's 0o700
        for f in tmp.iterdir():
            os.chmod(f, 0o666 & ~mask)
        old = None
        if folder.exists():
            old = folder.parent / f".{folder.name}.old"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(folder, old)
        os.replace(tmp, folder)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder

__all__ = ["AEKL_INFO_FILE", "build_autoencoder_kl", "run_aekl", "save_autoencoder"]
