"""A deeper convolutional VAE for 32-128 pixel images; its decoder is the generator.

:class:`DeepVAE` mirrors the all-convolutional DCGAN: the encoder halves the image with stride-2
convolutions down to 4x4, the decoder doubles a 4x4 map with stride-2 transposed convolutions
(BatchNorm + ReLU between) up to the image, sigmoid out. ``forward(z)`` is the decoder:
``z [N, nz] -> [N, channels, size, size]`` in (0, 1). Same training interface as
:class:`ronan_fast.models.VAE` (:meth:`encode`, :meth:`reparameterize`, :meth:`loss`).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ronan_fast.models._base import ConfigModule, check_int
from ronan_fast.models.dcgan import _stride2_layers
from ronan_fast.models.vae import VAE


class DeepVAE(ConfigModule):
    """Encoder: L stride-2 4x4 convs (``nf``, 2 ``nf``, ... channels, LeakyReLU 0.2) -> linear to the
    mean and log-variance of a ``nz``-dim Gaussian. Decoder: linear -> (``nf`` 2^(L-1), 4, 4) ->
    BN, ReLU -> (L - 1) x [ConvTranspose x2 halving the width -> BN, ReLU] -> ConvTranspose x2 ->
    sigmoid, with ``L = log2(size) - 2``."""

    output_range = (0.0, 1.0)

    def __init__(self, nz: int = 32, nf: int = 16, channels: int = 1, size: int = 64):
        super().__init__()
        check_int("nz", nz)
        check_int("nf", nf)
        check_int("channels", channels)
        n = _stride2_layers(size)
        self._set_config(nz=nz, nf=nf, channels=channels, size=size)
        self.nz = nz
        enc: list[nn.Module] = []
        c_in, width = channels, nf
        for _ in range(n):
            enc += [nn.Conv2d(c_in, width, 4, 2, 1), nn.LeakyReLU(0.2, inplace=True)]
            c_in, width = width, width * 2
        self.width0 = c_in
        enc += [nn.Flatten(), nn.Linear(c_in * 16, 2 * nz)]
        self.encoder = nn.Sequential(*enc)
        self.fc = nn.Linear(nz, self.width0 * 16)
        width = self.width0
        dec: list[nn.Module] = [nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
        for _ in range(n - 1):
            dec += [nn.ConvTranspose2d(width, width // 2, 4, 2, 1, bias=False), nn.BatchNorm2d(width // 2),
                    nn.ReLU(inplace=True)]
            width //= 2
        dec += [nn.ConvTranspose2d(width, channels, 4, 2, 1), nn.Sigmoid()]
        self.decoder = nn.Sequential(*dec)

    @property
    def latent_shape(self) -> tuple[int, ...]:
        return (self.nz,)

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Images in [0, 1] -> (mean, log-variance), each [N, nz]."""
        mu, logvar = self.encoder(x).chunk(2, dim=1)
        return mu, logvar.clamp(-12.0, 8.0)

    reparameterize = staticmethod(VAE.reparameterize)

    def decode(self, z: Tensor) -> Tensor:
        if z.dim() != 2 or z.shape[1] != self.nz:
            raise ValueError(f"z must be [N, {self.nz}], got shape {tuple(z.shape)}")
        return self.decoder(self.fc(z).view(z.shape[0], self.width0, 4, 4))

    def forward(self, z: Tensor) -> Tensor:
        return self.decode(z)

    def loss(self, x: Tensor, generator: torch.Generator | None = None, beta: float = 1.0) -> tuple[Tensor, Tensor, Tensor]:
        """Negative ELBO per image (Bernoulli likelihood summed over pixels): (total, recon, kl), means over N."""
        mu, logvar = self.encode(x)
        xr = self.decode(self.reparameterize(mu, logvar, generator))
        recon = nn.functional.binary_cross_entropy(xr, x, reduction="sum") / x.shape[0]
        kl = -0.5 * (1 + logvar - mu.square() - logvar.exp()).sum() / x.shape[0]
        return recon + beta * kl, recon, kl


__all__ = ["DeepVAE"]
