"""Train the zoo's diffusion models: the ``ddim-fmnist`` DDIM sampler (DDPM epsilon-prediction
training of its UNet) and ``onestep-fmnist``, its one-step student distilled from it.

The recipes are registered in :mod:`ronan_fast.zoo.train`'s ``RECIPES`` and run through its
entry point.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ronan_fast import data as D
from ronan_fast.zoo.training import Recipe, base_info, log, seed_steps, train_steps
from ronan_fast.models import DDIMSampler, OneStepStudent, TinyUNet, load_model, save_model



def run_ddim(recipe: Recipe, args: argparse.Namespace) -> dict[str, Any]:
    """DDPM epsilon-prediction training; half of each batch at the sampler's own timesteps.

    The sampler only ever queries the UNet at its ``steps`` timesteps, so on a tight CPU budget
    half of each batch draws t among them and half uniformly over all T (the usual DDPM loss).
    The saved weights are an exponential moving average of the trained ones.
    """
    x, _ = recipe.params["data"]()
    x = D.to_signed(x)
    seed, steps, cap = seed_steps(recipe, args)
    torch.manual_seed(seed)
    sampler = DDIMSampler(TinyUNet(**recipe.params["unet"]), **recipe.params["sampler"])
    ema_model = DDIMSampler(TinyUNet(**recipe.params["unet"]), **recipe.params["sampler"])
    ema_model.load_state_dict(sampler.state_dict())
    for p in ema_model.parameters():
        p.requires_grad_(False)
    unet = sampler.unet
    batch, lr, decay = recipe.params.get("batch", 64), recipe.params.get("lr", 1e-3), recipe.params.get("ema", 0.995)
    warmup = 200
    opt = torch.optim.Adam(unet.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup))
    gen = torch.Generator().manual_seed(seed + 1)
    T = sampler.config["num_train_timesteps"]
    log(f"{recipe.name}: {recipe.description}")
    log(f"data {tuple(x.shape)}, UNet params {sum(p.numel() for p in unet.parameters())}, seed {seed}, "
        f"steps {steps}, sampler timesteps {sampler.timesteps.tolist()}")

    def step() -> tuple[float]:
        x0 = x[torch.randint(0, x.shape[0], (batch,), generator=gen)]
        half = batch // 2
        t_uniform = torch.randint(0, T, (batch - half,), generator=gen)
        t_sampler = sampler.timesteps[torch.randint(0, sampler.steps, (half,), generator=gen)]
        t = torch.cat([t_sampler, t_uniform])
        noise = torch.randn(x0.shape, generator=gen)
        loss = F.mse_loss(unet(sampler.add_noise(x0, t, noise), t), noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        sched.step()
        with torch.no_grad():
            for pe, p in zip(ema_model.parameters(), sampler.parameters()):
                pe.lerp_(p, 1.0 - decay)
        return (loss.item(),)

    def report(i: int, ema: tuple[float, ...], el: float) -> None:
        log(f"step {i:6d}/{steps}  eps-MSE {ema[0]:.4f}  ({el:.0f} s, {el / i * 1e3:.0f} ms/step)")

    unet.train()
    (ema_loss,), done, seconds = train_steps(steps, cap, step, report)
    info = {**base_info(recipe, seed, steps, x), "loss": "DDPM epsilon MSE (half the batch at sampler timesteps)",
            "optimizer": "Adam", "lr": lr, "warmup": warmup, "batch": batch, "ema_decay": decay, "steps_done": done,
            "final_eps_mse_ema": ema_loss, "seconds": round(seconds, 1)}
    ema_model.eval()
    save_model(ema_model, recipe.out, info=info)
    log(f"wrote {recipe.out}")
    g = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        out = D.to_unit(ema_model(torch.randn(64, *ema_model.latent_shape, generator=g)))
    for p in recipe.grid:
        D.save_grid(out, p)
        log(f"wrote sample grid {p}")
    return info


def _teacher_pairs(teacher: nn.Module, n: int, seed: int, chunk: int = 500) -> tuple[Tensor, Tensor]:
    """``n`` (noise, teacher image) pairs, the noise drawn from a generator seeded with ``seed``."""
    g = torch.Generator().manual_seed(seed)
    xs, ys = [], []
    with torch.no_grad():
        for i in range(0, n, chunk):
            x_T = torch.randn(min(chunk, n - i), *teacher.latent_shape, generator=g)
            xs.append(x_T)
            ys.append(teacher(x_T))
    return torch.cat(xs), torch.cat(ys)


def run_distill(recipe: Recipe, args: argparse.Namespace) -> dict[str, Any]:
    """A one-step student of a DDIM sampler: regress the teacher's image from the same noise.

    The teacher (``params["teacher"]``, a weights file) makes ``pairs`` (x_T, x_0) pairs once;
    the student (:class:`OneStepStudent`, the teacher's UNet architecture, initialised from its
    weights) is trained on them with an MSE loss, Adam with warm-up and cosine decay, and an EMA
    of its weights is saved. A held-out set of pairs (another seed) measures how closely the
    student follows the teacher.
    """
    teacher_path = Path(recipe.params["teacher"])
    if not teacher_path.is_file():
        raise FileNotFoundError(f"the teacher {teacher_path} is missing; train it first "
                                f"(python -m ronan_fast.zoo.train {recipe.params['teacher_recipe']})")
    teacher = load_model(teacher_path, eval=True)
    if not isinstance(teacher, DDIMSampler):
        raise TypeError(f"{teacher_path} holds a {type(teacher).__name__}, not a DDIMSampler")
    seed, steps, cap = seed_steps(recipe, args)
    torch.manual_seed(seed)
    n_pairs, n_val = recipe.params.get("pairs", 40000), recipe.params.get("val_pairs", 1000)
    batch, lr, decay = recipe.params.get("batch", 64), recipe.params.get("lr", 1e-3), recipe.params.get("ema", 0.995)
    warmup = 200
    log(f"{recipe.name}: {recipe.description}")
    t0 = time.perf_counter()
    x_T, x_0 = _teacher_pairs(teacher, n_pairs, seed + 1)
    v_T, v_0 = _teacher_pairs(teacher, n_val, seed + 2)
    pair_seconds = time.perf_counter() - t0
    log(f"teacher {teacher_path.name}: {n_pairs} training + {n_val} held-out pairs in {pair_seconds:.0f} s")
    student = OneStepStudent(dict(teacher.unet.config), timestep=int(teacher.timesteps[0]))
    student.unet.load_state_dict(teacher.unet.state_dict())
    ema_model = OneStepStudent(dict(teacher.unet.config), timestep=int(teacher.timesteps[0]))
    ema_model.load_state_dict(student.state_dict())
    for p in ema_model.parameters():
        p.requires_grad_(False)
    opt = torch.optim.Adam(student.parameters(), lr=lr)

    def lr_factor(s: int) -> float:
        if s < warmup:
            return (s + 1) / warmup
        return 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * min(1.0, (s - warmup) / max(1, steps - warmup))))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
    gen = torch.Generator().manual_seed(seed + 3)
    log(f"student params {sum(p.numel() for p in student.parameters())}, seed {seed}, steps {steps}, batch {batch}")

    def held_out_mse(model: nn.Module) -> float:
        with torch.no_grad():
            return float(sum(F.mse_loss(model(v_T[i:i + 500]), v_0[i:i + 500], reduction="sum")
                             for i in range(0, n_val, 500)) / v_0.numel())

    def step() -> tuple[float]:
        idx = torch.randint(0, n_pairs, (batch,), generator=gen)
        loss = F.mse_loss(student(x_T[idx]), x_0[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
        sched.step()
        with torch.no_grad():
            for pe, p in zip(ema_model.parameters(), student.parameters()):
                pe.lerp_(p, 1.0 - decay)
        return (loss.item(),)

    def report(i: int, ema: tuple[float, ...], el: float) -> None:
        log(f"step {i:6d}/{steps}  train MSE {ema[0]:.5f}  held-out MSE (EMA weights) "
            f"{held_out_mse(ema_model):.5f}  ({el:.0f} s, {el / i * 1e3:.0f} ms/step)")

    student.train()
    (ema_loss,), done, _ = train_steps(steps, cap, step, report, every=500)
    ema_model.eval()
    val = held_out_mse(ema_model)
    info = {**base_info(recipe, seed, steps, x_0), "teacher": teacher_path.name,
            "loss": "MSE between the student's and the teacher's image from the same x_T (pixels in [-1, 1])",
            "optimizer": "Adam", "lr": lr, "warmup": warmup, "schedule": "cosine to 1% of lr", "batch": batch,
            "ema_decay": decay, "pairs": n_pairs, "val_pairs": n_val, "pair_seconds": round(pair_seconds, 1),
            "steps_done": done, "final_train_mse_ema": ema_loss, "held_out_mse": val,
            "seconds": round(time.perf_counter() - t0, 1)}
    save_model(ema_model, recipe.out, info=info)
    log(f"wrote {recipe.out} (held-out MSE to the teacher {val:.5f})")
    g = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        noise = torch.randn(64, *ema_model.latent_shape, generator=g)
        out = D.to_unit(ema_model(noise))
    for p in recipe.grid:
        D.save_grid(out, p)
        log(f"wrote sample grid {p}")
    return info
