"""A small convolutional VAE; its decoder is the generator: ``z [N, nz] -> [N, C, size, size]`` in (0, 1)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ronan_fast.models._base import ConfigModule, check_int


class VAE(ConfigModule):
    """Encoder (two strided convs -> mean and log-variance of a ``nz``-dim Gaussian) and decoder.

    ``forward(z)`` is the decoder (the generative map, output in (0, 1) via sigmoid); use
    :meth:`encode`, :meth:`reparameterize` and :meth:`loss` for training.
    """

    output_range = (0.0, 1.0)

    def __init__(self, nz: int = 16, nf: int = 16, channels: int = 1, size: int = 28):
        super().__init__()
        check_int("nz", nz)
        check_int("nf", nf)
        check_int("channels", channels)
        check_int("size", size, 4)
        if size % 4:
            raise ValueError(f"size must be a multiple of 4, got {size}")
        self._set_config(nz=nz, nf=nf, channels=channels, size=size)
        self.nz, self.s0 = nz, size // 4
        flat = 2 * nf * self.s0 * self.s0
        self.encoder = nn.Sequential(
            nn.Conv2d(channels, nf, 4, 2, 1),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(nf, 2 * nf, 4, 2, 1),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Flatten(),
            nn.Linear(flat, 2 * nz),
        )
        self.fc = nn.Linear(nz, flat)
        self.decoder = nn.Sequential(
            nn.BatchNorm2d(2 * nf),
            nn.ReLU(inplace=True),
            nn.ConvTranspose2d(2 * nf, nf, 4, 2, 1, bias=False),
            nn.BatchNorm2d(nf),
            nn.ReLU(inplace=True),
            nn.ConvTranspose2d(nf, channels, 4, 2, 1),
            nn.Sigmoid(),
        )

    @property
    def latent_shape(self) -> tuple[int, ...]:
        return (self.nz,)

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Images in [0, 1] -> (mean, log-variance), each [N, nz]."""
        mu, logvar = self.encoder(x).chunk(2, dim=1)
        return mu, logvar.clamp(-12.0, 8.0)

    @staticmethod
    def reparameterize(mu: Tensor, logvar: Tensor, generator: torch.Generator | None = None) -> Tensor:
        eps = torch.randn(mu.shape, generator=generator, dtype=mu.dtype, device=mu.device)
        return mu + eps * (0.5 * logvar).exp()

    def decode(self, z: Tensor) -> Tensor:
        if z.dim() != 2 or z.shape[1] != self.nz:
            raise ValueError(f"z must be [N, {self.nz}], got shape {tuple(z.shape)}")
        return self.decoder(self.fc(z).view(z.shape[0], -1, self.s0, self.s0))

    def forward(self, z: Tensor) -> Tensor:
        return self.decode(z)

    def loss(self, x: Tensor, generator: torch.Generator | None = None, beta: float = 1.0) -> tuple[Tensor, Tensor, Tensor]:
        """Negative ELBO per image (Bernoulli likelihood summed over pixels): (total, recon, kl), means over N."""
        mu, logvar = self.encode(x)
        z = self.reparameterize(mu, logvar, generator)
        xr = self.decode(z)
        recon = nn.functional.binary_cross_entropy(xr, x, reduction="sum") / x.shape[0]
        kl = -0.5 * (1 + logvar - mu.square() - logvar.exp()).sum() / x.shape[0]
        return recon + beta * kl, recon, kl
