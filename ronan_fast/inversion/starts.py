"""Where each image's restarts begin: its starting latents, drawn from the image itself.

Each image's starts come from a random stream seeded by a hash of its pixels (as the float32
tensor at the model's shape that inversion receives) and the inversion seed. So an image gets
the same starts whatever else is in the batch, wherever it stands in it, and however a job is
split, resumed or spread over processes: with the fixed-shape generator calls of
:mod:`~ronan_fast.inversion.calls`, the same image and seed give the same loss and verdict.
"""

from __future__ import annotations

import contextlib
import hashlib
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from ronan_fast.adapters import GeneratorAdapter

if TYPE_CHECKING:
    from ronan_fast.inversion.problem import Problem

__all__ = ["row_latents", "image_seed", "start_latents", "starts_and_settled", "screened"]


def image_seed(image: Tensor, seed: int) -> int:
    """A 63-bit seed from ``image``'s pixels (float32, its shape included) and ``seed``."""
    pixels = image.detach().to("cpu", torch.float32).contiguous()
    h = hashlib.sha256(b"ronan_fast/starts/v1")
    h.update(repr((int(seed), tuple(pixels.shape))).encode())
    h.update(pixels.numpy().tobytes())
    return int.from_bytes(h.digest()[:8], "little") & ((1 << 63) - 1)


def row_latents(generator: GeneratorAdapter, images: Tensor, rows_per_image: int, seed: int) -> Tensor:
    """Each image's ``rows_per_image`` starting latents, image-major, from its own stream
    (:func:`image_seed`).

    An adapter with an ``initial_latents(images, rows_per_image, generator)`` hook (for example a
    latent-diffusion decoder starting from its encoder's latent) chooses its own starts.
    """
    init = getattr(generator, "initial_latents", None)
    out = []
    for k in range(images.shape[0]):
        g = torch.Generator(device="cpu").manual_seed(image_seed(images[k], seed))
        if init is not None:
            out.append(init(images[k : k + 1], rows_per_image, g))
        else:
            out.append(generator.sample_latents(rows_per_image, g))
    return torch.cat(out)


def start_latents(problem: "Problem", seed: int) -> Tensor:
    """The starting rows of ``problem``'s images, image-major: :func:`row_latents`, each start
    screened from ``settings.screen`` candidates when that is above 1 (:func:`screened`)."""
    return starts_and_settled(problem, seed)[0]


def starts_and_settled(problem: "Problem", seed: int) -> tuple[Tensor, Tensor | None]:
    """:func:`start_latents`, and which images the warm start settled above their threshold
    while finding their guesses (a bool per image; None where it settles none: see
    :meth:`ronan_fast.warmstart.WarmStarted.guesses_for`)."""
    s = problem.settings
    # a warm-started generator makes its guesses for all of them at once, with their thresholds
    # where the loss is MSE, the one a guess's own search measures (WarmStarted.guesses_for)
    prepare = getattr(problem.generator, "guesses_for", None)
    stop_below = problem.stop_below if problem.loss.name == "mse" else None
    with contextlib.nullcontext() if prepare is None else prepare(problem.images, stop_below) as settled:
        if s.screen <= 1:
            z = row_latents(problem.generator, problem.images, problem.rows_per_image, seed)
        else:
            z = torch.cat([screened(problem, k, seed) for k in range(problem.b)])
    return z, settled


def screened(problem: "Problem", k: int, seed: int) -> Tensor:
    """Image ``k``'s ``rows_per_image`` starts, screened: its stream gives ``screen`` times as
    many candidates, one forward pass each scores them (the final score's loss, generator
    calls in blocks of one shape), and each block of ``restarts`` starts (one block per class
    searched) keeps its ``restarts`` lowest, lowest first. A guided generator's first
    candidate of each block (``generator.guided_starts``: an encoder's guess) is kept first
    whatever its loss. Depends on the image and ``seed`` only, not on the rest of the batch."""
    s, generator = problem.settings, problem.generator
    rpi, per = problem.rows_per_image, problem.settings.restarts
    blocks = rpi // per
    many = per * s.screen
    cand = row_latents(generator, problem.images[k : k + 1], blocks * many, seed).to(problem.device)
    cond = None
    if problem.row_cond is not None:  # each block's condition, for each of its candidates
        first = problem.row_cond[k * rpi : (k + 1) * rpi : per]
        cond = first.repeat_interleave(many, dim=0)
    img = torch.full((cand.shape[0],), k, dtype=torch.long, device=problem.device)
    _, loss = problem.score(cand, cond, img)
    loss = torch.where(torch.isfinite(loss), loss, torch.full_like(loss, float("inf"))).view(blocks, many)
    guided = bool(getattr(generator, "guided_starts", False))
    if guided:
        rest = loss[:, 1:].argsort(dim=1, stable=True)[:, : per - 1] + 1
        pick = torch.cat([torch.zeros(blocks, 1, dtype=torch.long, device=loss.device), rest], dim=1)
    else:
        pick = loss.argsort(dim=1, stable=True)[:, :per]
    rows = (pick + torch.arange(blocks, device=loss.device).unsqueeze(1) * many).flatten()
    return cand[rows]
