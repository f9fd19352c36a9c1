"""Where each image's restarts begin: its starting latents, drawn from the image itself.

Each image's starts come from a random stream seeded by a hash of its pixels (as the float32
tensor at the model's shape that inversion receives) and the inversion seed. So an image gets
the same starts whatever else is in the batch, wherever it stands in it, and however a job is
split, resumed or spread over processes: with the fixed-shape generator calls of
:mod:`~ronan_fast.inversion.calls`, the same image and seed give the same loss and verdict.
"""

from __future__ import annotations

import hashlib

import torch
from torch import Tensor

from ronan_fast.adapters import GeneratorAdapter

__all__ = ["row_latents", "image_seed"]


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
