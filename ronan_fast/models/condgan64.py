"""Class-conditional all-convolutional DCGAN (32-128 pixels): ``G(z, labels)`` and a projection discriminator.

:class:`CondDeepDCGANGenerator` concatenates a label embedding to ``z`` and runs the
:class:`~ronan_fast.models.DeepDCGANGenerator` trunk (4x4 seed, stride-2 transposed
convolutions, BN + ReLU, tanh). :class:`CondDeepDCGANDiscriminator` is the
:class:`~ronan_fast.models.DeepDCGANDiscriminator` trunk with a projection head (Miyato and
Koyama, 2018). Labels are int64 [N] or float one-hot / soft [N, num_classes], as for
:class:`~ronan_fast.models.CondGANGenerator`.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ronan_fast.models._base import ConfigModule, check_int
from ronan_fast.models.condgan import _embed
from ronan_fast.models.dcgan import _stride2_layers


class CondDeepDCGANGenerator(ConfigModule):
    """``(z [N, nz], labels) -> images [N, channels, size, size]`` in (-1, 1).

    [z, embed(label)] -> ConvTranspose (1x1 -> 4x4, ``ngf`` 2^(L-1) channels) -> BN, ReLU ->
    (L - 1) x [ConvTranspose x2 halving the width -> BN, ReLU] -> ConvTranspose x2 -> tanh.
    """

    output_range = (-1.0, 1.0)

    def __init__(self, nz: int = 64, num_classes: int = 10, ngf: int = 16, embed_dim: int = 16, channels: int = 1,
                 size: int = 64):
        super().__init__()
        for k, v in dict(nz=nz, num_classes=num_classes, ngf=ngf, embed_dim=embed_dim, channels=channels).items():
            check_int(k, v)
        n_up = _stride2_layers(size)
        self._set_config(nz=nz, num_classes=num_classes, ngf=ngf, embed_dim=embed_dim, channels=channels, size=size)
        self.nz, self.num_classes = nz, num_classes
        self.embed = nn.Embedding(num_classes, embed_dim)
        width = ngf * 2 ** (n_up - 1)
        layers: list[nn.Module] = [nn.ConvTranspose2d(nz + embed_dim, width, 4, 1, 0, bias=False),
                                   nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
        for _ in range(n_up - 1):
            layers += [nn.ConvTranspose2d(width, width // 2, 4, 2, 1, bias=False), nn.BatchNorm2d(width // 2),
                       nn.ReLU(inplace=True)]
            width //= 2
        layers += [nn.ConvTranspose2d(width, channels, 4, 2, 1), nn.Tanh()]
        self.net = nn.Sequential(*layers)

    @property
    def latent_shape(self) -> tuple[int, ...]:
        return (self.nz,)

    def forward(self, z: Tensor, labels: Tensor) -> Tensor:
        if z.dim() != 2 or z.shape[1] != self.nz:
            raise ValueError(f"z must be [N, {self.nz}], got shape {tuple(z.shape)}")
        e = _embed(self.embed, labels, self.num_classes, z.shape[0]).to(z.dtype)
        return self.net(torch.cat([z, e], dim=1)[:, :, None, None])


class CondDeepDCGANDiscriminator(ConfigModule):
    """Projection discriminator: stride-2 convs (BN + LeakyReLU) to 4x4, a 4x4 conv to features
    ``h`` (``4 ndf``), logit = linear(h) + <embed(label), h>."""

    def __init__(self, num_classes: int = 10, ndf: int = 16, channels: int = 1, size: int = 64):
        super().__init__()
        for k, v in dict(num_classes=num_classes, ndf=ndf, channels=channels).items():
            check_int(k, v)
        n_down = _stride2_layers(size)
        self._set_config(num_classes=num_classes, ndf=ndf, channels=channels, size=size)
        self.num_classes = num_classes
        layers: list[nn.Module] = [nn.Conv2d(channels, ndf, 4, 2, 1), nn.LeakyReLU(0.2, inplace=True)]
        width = ndf
        for _ in range(n_down - 1):
            layers += [nn.Conv2d(width, 2 * width, 4, 2, 1, bias=False), nn.BatchNorm2d(2 * width),
                       nn.LeakyReLU(0.2, inplace=True)]
            width *= 2
        feat = 4 * ndf
        layers += [nn.Conv2d(width, feat, 4, 1, 0), nn.LeakyReLU(0.2, inplace=True), nn.Flatten()]
        self.features = nn.Sequential(*layers)
        self.out = nn.Linear(feat, 1)
        self.embed = nn.Embedding(num_classes, feat)

    def forward(self, x: Tensor, labels: Tensor) -> Tensor:
        h = self.features(x)
        e = _embed(self.embed, labels, self.num_classes, x.shape[0])
        return self.out(h).squeeze(1) + (e * h).sum(1)


__all__ = ["CondDeepDCGANDiscriminator", "CondDeepDCGANGenerator"]
