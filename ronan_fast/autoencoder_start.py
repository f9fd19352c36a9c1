"""First starts from an autoencoder's own encoder, for a latent-diffusion decoder.

A latent-diffusion model's images are decoded from a latent by its autoencoder's decoder, and
the same autoencoder's encoder maps an image to a latent near the one that decodes to it (as
LatentTracer starts its inversion): nothing has to be learned, and the guess is one encoder
pass. :class:`AutoencoderStart` puts the encoder's latent for each image (the posterior mean of
an ``AutoencoderKL``, the pre-quantisation embedding of a ``VQModel``; see
:meth:`~ronan_fast.diffusers_adapters.LatentDiffusionDecoder.encoder_latents`) in the image's
first start; the other starts stay random, and the loss reported is the decoder's over its
latent (Eq. 1), as without it.

It has the interface of a learned encoder (:class:`ronan_fast.warmstart.WarmStartEncoder`:
``guess``, ``check``, ``digest``, ``describe``), so it goes wherever one does:
``Attributor(warm_start=autoencoder_start(model))``, ``WarmStarted(model, ...)``,
``ronan-fast profile --warm-start autoencoder``. A profile records it, and
``Attributor.from_profile`` / ``inspect`` rebuild it from the model alone: the model's
fingerprint covers the encoder's weights. On the zoo's held-out AutoencoderKL it converged 100
of 100 own 8-bit images at 5.7x the authors' loop's speed to the verdict
(docs/performance.md#held-out-generators).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ronan_fast.adapters import GeneratorAdapter
from ronan_fast.warmstart import EncoderError, ModelDerivedStart

__all__ = ["AutoencoderStart", "autoencoder_start", "encoder_latents_each", "has_own_encoder"]


class AutoencoderStart(ModelDerivedStart):
    """Each image's first start at its autoencoder encoder's latent (module docstring).

    Args:
        generator: a latent-diffusion decoder adapter with ``encoder_latents(images)``
            (:class:`~ronan_fast.diffusers_adapters.LatentDiffusionDecoder`).
    """

    #: what a profile's ``warm_start`` record calls this kind of start
    kind = "autoencoder"
    _DIGEST_TAG = b"ronan_fast/autoencoder_start/v1"
    _MADE_FOR = "the autoencoder start was made for the model"

    def __init__(self, generator: GeneratorAdapter):
        if not isinstance(generator, GeneratorAdapter):
            raise TypeError(f"generator must be a GeneratorAdapter, got {type(generator).__name__}")
        if not has_own_encoder(generator):
            raise TypeError(f"{generator.name!r} has no encoder of its own (encoder_latents): the autoencoder start "
                            "is for latent-diffusion decoders (ronan_fast.diffusers_adapters.LatentDiffusionDecoder); "
                            "train one with ronan_fast.warmstart.train_encoder instead")
        self.generator = generator
        self.fingerprint = generator.fingerprint()

    @property
    def recipe(self) -> dict:
        return {"kind": self.kind}

    def check(self, generator: GeneratorAdapter) -> None:
        """Raise :class:`~ronan_fast.warmstart.EncoderMismatchError` unless ``generator`` is the
        autoencoder this start was made for (the fingerprint covers its encoder's weights)."""
        self._check_fingerprint(generator)

    def guess(self, images: Tensor) -> Tensor:
        """``[B, latent_dim]``: each image's encoder latent, float32, computed from that image alone."""
        shape = tuple(self.generator.image_shape)
        if not isinstance(images, Tensor) or images.dim() != 4 or tuple(images.shape[1:]) != shape:
            got = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
            raise EncoderError(f"images must be [B, {', '.join(map(str, shape))}], got {got}")
        try:
            return encoder_latents_each(self.generator, images)
        except ValueError as e:
            raise EncoderError(str(e)) from None


def encoder_latents_each(generator: GeneratorAdapter, images: Tensor) -> Tensor:
    """``generator.encoder_latents`` of each image computed from that image alone, float32
    ``[B, D]``: an image's latent is then the same in any batch."""
    return torch.cat([generator.encoder_latents(images[k:k + 1]).float() for k in range(images.shape[0])])


def has_own_encoder(generator: GeneratorAdapter) -> bool:
    """Whether ``generator`` carries an encoder of its own (``encoder_latents(images)``, as a
    latent-diffusion decoder does): what :class:`AutoencoderStart` needs."""
    return callable(getattr(generator, "encoder_latents", None))


def autoencoder_start(generator: GeneratorAdapter) -> AutoencoderStart:
    """An :class:`AutoencoderStart` for a latent-diffusion decoder (``TypeError`` for a model
    without an encoder of its own)."""
    return AutoencoderStart(generator)
