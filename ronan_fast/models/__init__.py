"""Small, CPU-fast generator architectures, each rebuilt from its ``config`` dict.

* :class:`DCGANGenerator` / :class:`DCGANDiscriminator` -- unconditional GAN, ``z [N, nz]``.
* :class:`DeepDCGANGenerator` / :class:`DeepDCGANDiscriminator` -- the all-convolutional DCGAN
  (32 to 128 pixels; 64x64 with ``nz=100`` is the paper's DCGAN).
* :class:`VAE` -- convolutional VAE; ``forward(z)`` is the decoder, output in (0, 1).
* :class:`CondGANGenerator` / :class:`CondGANDiscriminator` -- class-conditional GAN ``G(z, labels)``.
* :class:`TinyUNet` / :class:`DDIMSampler` -- DDPM noise predictor and its differentiable
  few-step DDIM sampler ``x_T -> x_0``; :class:`OneStepStudent` -- a one-step student of it.
* :class:`StyleGenerator` / :class:`StyleDiscriminator` -- StyleGAN2-style: mapping network,
  weight-demodulated convolutions with per-layer styles, constant input, no noise inputs.
* :class:`UpsampleDCGANGenerator` / :class:`WGANCritic` -- DCGAN with upsample + conv in place
  of transposed convolutions, and a normalisation-free critic for WGAN-GP.
* :class:`DeepVAE` -- a VAE whose encoder and decoder mirror the all-convolutional DCGAN (64x64).
* :class:`CondDeepDCGANGenerator` / :class:`CondDeepDCGANDiscriminator` -- class-conditional
  all-convolutional DCGAN (64x64) and its projection discriminator.

Weights travel as safetensors with the architecture name and config in the metadata:
:func:`save_model` / :func:`load_model`.
"""

from ronan_fast.models.condgan import CondGANDiscriminator, CondGANGenerator
from ronan_fast.models.condgan64 import CondDeepDCGANDiscriminator, CondDeepDCGANGenerator
from ronan_fast.models.dcgan import (
    DCGANDiscriminator,
    DCGANGenerator,
    DeepDCGANDiscriminator,
    DeepDCGANGenerator,
    dcgan_init_,
)
from ronan_fast.models.diffusion import DDIMSampler, OneStepStudent, TinyUNet
from ronan_fast.models.io import load_model, read_metadata, save_model
from ronan_fast.models.stylegan import StyleDiscriminator, StyleGenerator
from ronan_fast.models.upconv import UpsampleDCGANGenerator, WGANCritic
from ronan_fast.models.vae import VAE
from ronan_fast.models.vae64 import DeepVAE

ARCHITECTURES: dict[str, type] = {
    "DCGANGenerator": DCGANGenerator,
    "DCGANDiscriminator": DCGANDiscriminator,
    "DeepDCGANGenerator": DeepDCGANGenerator,
    "DeepDCGANDiscriminator": DeepDCGANDiscriminator,
    "VAE": VAE,
    "CondGANGenerator": CondGANGenerator,
    "CondGANDiscriminator": CondGANDiscriminator,
    "TinyUNet": TinyUNet,
    "DDIMSampler": DDIMSampler,
    "OneStepStudent": OneStepStudent,
    "StyleGenerator": StyleGenerator,
    "StyleDiscriminator": StyleDiscriminator,
    "UpsampleDCGANGenerator": UpsampleDCGANGenerator,
    "WGANCritic": WGANCritic,
    "DeepVAE": DeepVAE,
    "CondDeepDCGANGenerator": CondDeepDCGANGenerator,
    "CondDeepDCGANDiscriminator": CondDeepDCGANDiscriminator,
}

__all__ = [
    "ARCHITECTURES",
    "CondDeepDCGANDiscriminator",
    "CondDeepDCGANGenerator",
    "CondGANDiscriminator",
    "CondGANGenerator",
    "DeepVAE",
    "StyleDiscriminator",
    "StyleGenerator",
    "UpsampleDCGANGenerator",
    "WGANCritic",
    "DDIMSampler",
    "OneStepStudent",
    "TinyUNet",
    "VAE",
    "DCGANDiscriminator",
    "DCGANGenerator",
    "DeepDCGANDiscriminator",
    "DeepDCGANGenerator",
    "dcgan_init_",
    "load_model",
    "read_metadata",
    "save_model",
]
