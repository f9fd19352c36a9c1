"""A DCGAN variant that upsamples and then convolves, and a critic for WGAN-GP training.

* :class:`UpsampleDCGANGenerator` -- ``z [N, nz] -> images [N, channels, size, size]`` in (-1, 1):
  a linear layer to a 4x4 map, then per doubling nearest-neighbour upsampling and a 3x3
  convolution (BatchNorm + ReLU between), tanh out. Upsample + conv in place of the DCGAN's
  stride-2 transposed convolutions (Odena et al., 2016) has no checkerboard pattern, and a
  different local structure of the map from latents to pixels.
* :class:`WGANCritic` -- stride-2 4x4 convolutions with LeakyReLU and no normalisation (a
  gradient penalty is computed per sample, which BatchNorm would couple), to a score per image.
"""

from __future__ import annotations

from torch import Tensor, nn

from ronan_fast.models._base import ConfigModule, check_int
from ronan_fast.models.dcgan import _FlatLatentGenerator, _stride2_layers


class UpsampleDCGANGenerator(_FlatLatentGenerator):
    """``z [N, nz] -> images [N, channels, size, size]`` in (-1, 1), by upsampling and 3x3 convolutions.

    Linear -> (ngf * 2^(L-1), 4, 4) -> BN, ReLU -> (L - 1) x [nearest x2 -> conv 3x3 halving the
    width -> BN, ReLU] -> nearest x2 -> conv 3x3 -> tanh, with ``L = log2(size) - 2`` doublings
    (64x64: 4 -> 8 -> 16 -> 32 -> 64).
    """

    def __init__(self, nz: int = 32, ngf: int = 16, channels: int = 1, size: int = 64):
        super().__init__()
        check_int("nz", nz)
        check_int("ngf", ngf)
        check_int("channels", channels)
        n_up = _stride2_layers(size)
        self._set_config(nz=nz, ngf=ngf, channels=channels, size=size)
        self.nz = nz
        width = ngf * 2 ** (n_up - 1)
        self.width0 = width
        self.fc = nn.Linear(nz, width * 16, bias=False)
        layers: list[nn.Module] = [nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
        for _ in range(n_up - 1):
            layers += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(width, width // 2, 3, 1, 1, bias=False),
                       nn.BatchNorm2d(width // 2), nn.ReLU(inplace=True)]
            width //= 2
        layers += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(width, channels, 3, 1, 1), nn.Tanh()]
        self.net = nn.Sequential(*layers)

    def forward(self, z: Tensor) -> Tensor:
        self._check_z(z)
        return self.net(self.fc(z).view(z.shape[0], self.width0, 4, 4))


class WGANCritic(ConfigModule):
    """``images [N, channels, size, size] -> scores [N]``: stride-2 4x4 convs (LeakyReLU 0.2, no
    normalisation) down to 4x4, doubling the width, then a linear layer."""

    def __init__(self, ndf: int = 16, channels: int = 1, size: int = 64):
        super().__init__()
        check_int("ndf", ndf)
        check_int("channels", channels)
        n_down = _stride2_layers(size)
        self._set_config(ndf=ndf, channels=channels, size=size)
        layers: list[nn.Module] = [nn.Conv2d(channels, ndf, 4, 2, 1), nn.LeakyReLU(0.2, inplace=True)]
        width = ndf
        for _ in range(n_down - 1):
            layers += [nn.Conv2d(width, 2 * width, 4, 2, 1), nn.LeakyReLU(0.2, inplace=True)]
            width *= 2
        layers += [nn.Flatten(), nn.Linear(width * 16, 1)]
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x).squeeze(1)


__all__ = ["UpsampleDCGANGenerator", "WGANCritic"]
