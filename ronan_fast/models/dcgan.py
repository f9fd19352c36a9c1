"""DCGAN generators and discriminators.

* :class:`DCGANGenerator` -- a shallow, CPU-fast DCGAN for small images (28x28 by default):
  one linear layer and two transposed convolutions.
* :class:`DeepDCGANGenerator` -- the all-convolutional DCGAN of Radford et al. (the paper's
  DCGAN): a 4x4 seed from ``z [N, nz, 1, 1]``-style input, doubled by a stride-2 transposed
  convolution per layer up to ``size`` (32, 64 or 128), BatchNorm + ReLU between, tanh out.
"""

from __future__ import annotations

from torch import Tensor, nn

from ronan_fast.models._base import ConfigModule, check_int


class _FlatLatentGenerator(ConfigModule):
    """What the DCGAN generators share: a flat latent ``z [N, nz]`` and an output in (-1, 1)."""

    output_range = (-1.0, 1.0)
    nz: int

    @property
    def latent_shape(self) -> tuple[int, ...]:
        return (self.nz,)

    def _check_z(self, z: Tensor) -> None:
        if z.dim() != 2 or z.shape[1] != self.nz:
            raise ValueError(f"z must be [N, {self.nz}], got shape {tuple(z.shape)}")


def _stride2_layers(size: int) -> int:
    """Stride-2 (de)convolutions between a 4x4 map and a ``size`` x ``size`` image (32, 64 or 128)."""
    if size not in (32, 64, 128):
        raise ValueError(f"size must be 32, 64 or 128, got {size!r}")
    return size.bit_length() - 1 - 2


class DCGANGenerator(_FlatLatentGenerator):
    """``z [N, nz] -> images [N, channels, size, size]`` in (-1, 1).

    Linear -> (2*ngf, size/4, size/4) -> BN, ReLU -> ConvTranspose (x2) -> BN, ReLU ->
    ConvTranspose (x2) -> tanh. ``size`` must be a multiple of 4.
    """

    def __init__(self, nz: int = 32, ngf: int = 64, channels: int = 1, size: int = 28):
        super().__init__()
        check_int("nz", nz)
        check_int("ngf", ngf)
        check_int("channels", channels)
        check_int("size", size, 4)
        if size % 4:
            raise ValueError(f"size must be a multiple of 4, got {size}")
        self._set_config(nz=nz, ngf=ngf, channels=channels, size=size)
        self.nz, self.s0 = nz, size // 4
        c0 = 2 * ngf
        self.fc = nn.Linear(nz, c0 * self.s0 * self.s0, bias=False)
        self.net = nn.Sequential(
            nn.BatchNorm2d(c0),
            nn.ReLU(inplace=True),
            nn.ConvTranspose2d(c0, ngf, 4, 2, 1, bias=False),
            nn.BatchNorm2d(ngf),
            nn.ReLU(inplace=True),
            nn.ConvTranspose2d(ngf, channels, 4, 2, 1),
            nn.Tanh(),
        )

    def forward(self, z: Tensor) -> Tensor:
        self._check_z(z)
        h = self.fc(z).view(z.shape[0], -1, self.s0, self.s0)
        return self.net(h)


class DCGANDiscriminator(ConfigModule):
    """``images [N, channels, size, size] in (-1, 1) -> logits [N]`` (strided convs, LeakyReLU)."""

    def __init__(self, ndf: int = 64, channels: int = 1, size: int = 28):
        super().__init__()
        check_int("ndf", ndf)
        check_int("channels", channels)
        check_int("size", size, 4)
        if size % 4:
            raise ValueError(f"size must be a multiple of 4, got {size}")
        self._set_config(ndf=ndf, channels=channels, size=size)
        s = size // 4
        self.features = nn.Sequential(
            nn.Conv2d(channels, ndf, 4, 2, 1),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(ndf, 2 * ndf, 4, 2, 1, bias=False),
            nn.BatchNorm2d(2 * ndf),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Flatten(),
        )
        self.out = nn.Linear(2 * ndf * s * s, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(self.features(x)).squeeze(1)


class DeepDCGANGenerator(_FlatLatentGenerator):
    """``z [N, nz] -> images [N, channels, size, size]`` in (-1, 1), the all-convolutional DCGAN.

    ConvTranspose(nz -> ngf*2^(L-1), 4x4 from 1x1) -> BN, ReLU -> (L-1) x [ConvTranspose x2 ->
    BN, ReLU] halving the width each time -> ConvTranspose x2 -> tanh, with ``L = log2(size) - 2``
    (64x64: 4x4 -> 8 -> 16 -> 32 -> 64, the paper's DCGAN with ``nz=100, ngf=64``).
    """

    def __init__(self, nz: int = 100, ngf: int = 64, channels: int = 3, size: int = 64):
        super().__init__()
        check_int("nz", nz)
        check_int("ngf", ngf)
        check_int("channels", channels)
        n_up = _stride2_layers(size)  # after the 4x4 seed
        self._set_config(nz=nz, ngf=ngf, channels=channels, size=size)
        self.nz = nz
        width = ngf * 2 ** (n_up - 1)
        layers: list[nn.Module] = [nn.ConvTranspose2d(nz, width, 4, 1, 0, bias=False), nn.BatchNorm2d(width),
                                   nn.ReLU(inplace=True)]
        for _ in range(n_up - 1):
            layers += [nn.ConvTranspose2d(width, width // 2, 4, 2, 1, bias=False), nn.BatchNorm2d(width // 2),
                       nn.ReLU(inplace=True)]
            width //= 2
        layers += [nn.ConvTranspose2d(width, channels, 4, 2, 1), nn.Tanh()]
        self.net = nn.Sequential(*layers)

    def forward(self, z: Tensor) -> Tensor:
        self._check_z(z)
        return self.net(z[:, :, None, None])


class DeepDCGANDiscriminator(ConfigModule):
    """The mirror of :class:`DeepDCGANGenerator`: stride-2 convs (BN + LeakyReLU) down to 4x4, then a 4x4 conv to a logit."""

    def __init__(self, ndf: int = 64, channels: int = 3, size: int = 64):
        super().__init__()
        check_int("ndf", ndf)
        check_int("channels", channels)
        n_down = _stride2_layers(size)
        self._set_config(ndf=ndf, channels=channels, size=size)
        layers: list[nn.Module] = [nn.Conv2d(channels, ndf, 4, 2, 1), nn.LeakyReLU(0.2, inplace=True)]
        width = ndf
        for _ in range(n_down - 1):
            layers += [nn.Conv2d(width, 2 * width, 4, 2, 1, bias=False), nn.BatchNorm2d(2 * width),
                       nn.LeakyReLU(0.2, inplace=True)]
            width *= 2
        layers += [nn.Conv2d(width, 1, 4, 1, 0)]
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x).flatten(1).squeeze(1)


def dcgan_init_(module: nn.Module) -> nn.Module:
    """DCGAN weight init: conv/linear N(0, 0.02), BatchNorm weight N(1, 0.02) and bias 0."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, 0.0, 0.02)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)):
            nn.init.normal_(m.weight, 1.0, 0.02)
            nn.init.zeros_(m.bias)
    return module


__all__ = ["DCGANGenerator", "DCGANDiscriminator", "DeepDCGANDiscriminator", "DeepDCGANGenerator", "dcgan_init_"]
