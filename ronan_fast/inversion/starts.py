"""Where each image's restarts begin: its starting latents."""

from __future__ import annotations

import torch
from torch import Tensor

from ronan_fast.adapters import GeneratorAdapter

__all__ = ["row_latents"]


def row_latents(
    generator: GeneratorAdapter, image_ids: Tensor, rows_per_image: int, seed: int, images: Tensor | None = None
) -> Tensor:
    """Starting latents, drawn per image from its own seeded stream so chunking never changes them.

    An adapter with an ``initial_latents(images, rows_per_image, generator)`` hook (for example a
    latent-diffusion decoder starting from its encoder's latent) chooses its own starts.
    """
    init = getattr(generator, "initial_latents", None)
    out = []
    for k, b in enumerate(image_ids.tolist()):
        g = torch.Generator(device="cpu").manual_seed((seed * 1_000_003 + b) % (2**63 - 1))
        if init is not None and images is not None:
            out.append(init(images[k : k + 1], rows_per_image, g))
        else:
            out.append(generator.sample_latents(rows_per_image, g))
    return torch.cat(out)
