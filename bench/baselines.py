"""The two baselines every ronan_fast figure is measured against.

* :func:`authors_loop`: the paper's code path: one image at a time, a random start
  z ~ N(0, I) (drawn as ronan_fast draws an image's starts, from its pixels and the seed), ``torch.optim.Adam([z], lr=0.1)``, ``F.mse_loss`` through autograd, float32,
  1500 steps; the score is the lowest loss seen; R restarts run one after another.
* :func:`plain_batched`: the best plain-PyTorch version a user could write without us: all
  images times restarts in one batch, ``torch.optim.Adam(fused=True)`` where the device has it,
  optional autocast, per-row best tracking with ``torch.where``.

Both work on any :class:`ronan_fast.adapters.GeneratorAdapter` and report losses in [0, 1]
image space, like :func:`ronan_fast.invert`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ronan_fast.adapters import GeneratorAdapter
from ronan_fast.inversion import PRECISIONS
from ronan_fast.inversion.runtime import autocast
from ronan_fast.inversion.starts import row_latents


def authors_loop(
    generator: GeneratorAdapter, images: Tensor, steps: int = 1500, lr: float = 0.1, restarts: int = 1, seed: int = 0
) -> Tensor:
    """Per-image lowest MSE over steps and restarts, inverting one image at a time."""
    device = generator.device
    out = torch.empty(images.shape[0])
    for b in range(images.shape[0]):
        target = images[b : b + 1].to(device)
        # a class-conditional generator with the class unknown gets `restarts` starts per class
        cond, rows = generator.row_conditions(None, 1, restarts)
        starts = row_latents(generator, images[b : b + 1], rows, seed).to(device)
        best = float("inf")
        for r in range(rows):
            z = starts[r : r + 1].clone().requires_grad_(True)
            c = None if cond is None else cond[r : r + 1]
            opt = torch.optim.Adam([z], lr=lr)
            for _ in range(steps):
                opt.zero_grad(set_to_none=True)
                loss = F.mse_loss(generator.to_unit(generator.decode_raw(z, c)), target)
                loss.backward()
                opt.step()
                v = loss.item()
                if v < best:
                    best = v
        out[b] = best
    return out


def plain_batched(
    generator: GeneratorAdapter,
    images: Tensor,
    steps: int = 1500,
    lr: float = 0.1,
    restarts: int = 1,
    seed: int = 0,
    precision: str = "fp32",
) -> Tensor:
    """Per-image lowest MSE, all images times restarts in one batch with ``torch.optim.Adam``."""
    device = generator.device
    b = images.shape[0]
    cond, rows = generator.row_conditions(None, b, restarts)
    target = images.to(device).repeat_interleave(rows, 0)
    z = row_latents(generator, images, rows, seed).to(device).requires_grad_(True)
    try:
        opt = torch.optim.Adam([z], lr=lr, fused=True)
    except (RuntimeError, TypeError):
        opt = torch.optim.Adam([z], lr=lr, foreach=True)
    best = torch.full((z.shape[0],), float("inf"), device=device)
    assert precision in PRECISIONS
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        with autocast(device, precision):
            pred = generator.to_unit(generator.decode_raw(z, cond))
        per_row = (pred.float() - target).square().flatten(1).mean(1)
        per_row.sum().backward()
        opt.step()
        best = torch.minimum(best, per_row.detach())
    return best.view(b, rows).min(1).values.cpu()
