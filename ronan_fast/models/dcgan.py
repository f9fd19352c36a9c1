"""DCGAN generator and discriminator for small square images (28x28 by default)."""

from __future__ import annotations

from torch import Tensor, nn

from ronan_fast.models._base import ConfigModule, check_int


class DCGANGenerator(ConfigModule):
    """``z [N, nz] -> images [N, channels, size, size]`` in (-1, 1).

    Linear -> (2*ngf, size/4, size/4) -> BN, ReLU -> ConvTranspose (x2) -> BN, ReLU ->
    ConvTranspose (x2) -> tanh. ``size`` must be a multiple of 4.
    """

    output_range = (-1.0, 1.0)

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

    @property
    def latent_shape(self) -> tuple[int, ...]:
        return (self.nz,)

    def forward(self, z: Tensor) -> Tensor:
        if z.dim() != 2 or z.shape[1] != self.nz:
            raise ValueError(f"z must be [N, {self.nz}], got shape {tuple(z.shape)}")
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


__all__ = ["DCGANGenerator", "DCGANDiscriminator", "dcgan_init_"]
