"""Class-conditional GAN: ``G(z, labels)`` and a projection discriminator."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ronan_fast.models._base import ConfigModule, check_int


def _embed(emb: nn.Embedding, labels: Tensor, num_classes: int, n: int) -> Tensor:
    """Embed int labels [N], or soft / one-hot labels [N, num_classes] as a weighted sum of embeddings."""
    if labels.dim() == 1 and not labels.is_floating_point():
        if labels.shape[0] != n:
            raise ValueError(f"labels must have {n} entries, got {labels.shape[0]}")
        if labels.numel():
            try:
                lo, hi = int(labels.min()), int(labels.max())
            except RuntimeError:  # a label inside torch.func.vmap (the polish's per-row Jacobians) has no
                lo, hi = 0, 0  # value to read; nn.Embedding still refuses an index out of range
            if lo < 0 or hi >= num_classes:
                raise ValueError(f"labels must lie in [0, {num_classes}), got range [{lo}, {hi}]")
        return emb(labels)
    if labels.dim() == 2 and labels.is_floating_point() and labels.shape == (n, num_classes):
        return labels @ emb.weight
    raise ValueError(
        f"labels must be int64 [N] or float [N, {num_classes}] (one-hot or soft), got {labels.dtype} {tuple(labels.shape)}"
    )


class CondGANGenerator(ConfigModule):
    """``(z [N, nz], labels) -> images [N, channels, size, size]`` in (-1, 1).

    The label embedding (``embed_dim``) is concatenated to z, then the DCGAN trunk follows:
    Linear -> (2*ngf, size/4, size/4) -> BN, ReLU -> ConvTranspose x2 -> BN, ReLU ->
    ConvTranspose x2 -> tanh. ``labels`` are int64 [N] or float one-hot / soft [N, num_classes].
    """

    output_range = (-1.0, 1.0)

    def __init__(self, nz: int = 32, num_classes: int = 10, ngf: int = 16, embed_dim: int = 16,
                 channels: int = 1, size: int = 28):
        super().__init__()
        for k, v in dict(nz=nz, num_classes=num_classes, ngf=ngf, embed_dim=embed_dim, channels=channels).items():
            check_int(k, v)
        check_int("size", size, 4)
        if size % 4:
            raise ValueError(f"size must be a multiple of 4, got {size}")
        self._set_config(nz=nz, num_classes=num_classes, ngf=ngf, embed_dim=embed_dim, channels=channels, size=size)
        self.nz, self.num_classes, self.s0 = nz, num_classes, size // 4
        self.embed = nn.Embedding(num_classes, embed_dim)
        self.fc = nn.Linear(nz + embed_dim, 2 * ngf * self.s0 * self.s0, bias=False)
        self.net = nn.Sequential(
            nn.BatchNorm2d(2 * ngf),
            nn.ReLU(inplace=True),
            nn.ConvTranspose2d(2 * ngf, ngf, 4, 2, 1, bias=False),
            nn.BatchNorm2d(ngf),
            nn.ReLU(inplace=True),
            nn.ConvTranspose2d(ngf, channels, 4, 2, 1),
            nn.Tanh(),
        )

    @property
    def latent_shape(self) -> tuple[int, ...]:
        return (self.nz,)

    def forward(self, z: Tensor, labels: Tensor) -> Tensor:
        if z.dim() != 2 or z.shape[1] != self.nz:
            raise ValueError(f"z must be [N, {self.nz}], got shape {tuple(z.shape)}")
        e = _embed(self.embed, labels, self.num_classes, z.shape[0]).to(z.dtype)
        h = self.fc(torch.cat([z, e], dim=1)).view(z.shape[0], -1, self.s0, self.s0)
        return self.net(h)


class CondGANDiscriminator(ConfigModule):
    """Projection discriminator: ``(images, labels) -> logits [N]`` = linear(h) + <embed(label), h>."""

    def __init__(self, num_classes: int = 10, ndf: int = 32, channels: int = 1, size: int = 28):
        super().__init__()
        for k, v in dict(num_classes=num_classes, ndf=ndf, channels=channels).items():
            check_int(k, v)
        check_int("size", size, 4)
        if size % 4:
            raise ValueError(f"size must be a multiple of 4, got {size}")
        self._set_config(num_classes=num_classes, ndf=ndf, channels=channels, size=size)
        self.num_classes = num_classes
        s = size // 4
        self.features = nn.Sequential(
            nn.Conv2d(channels, ndf, 4, 2, 1),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(ndf, 2 * ndf, 4, 2, 1, bias=False),
            nn.BatchNorm2d(2 * ndf),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Flatten(),
            nn.Linear(2 * ndf * s * s, 4 * ndf),
            nn.LeakyReLU(0.2, inplace=True),
        )
        self.out = nn.Linear(4 * ndf, 1)
        self.embed = nn.Embedding(num_classes, 4 * ndf)

    def forward(self, x: Tensor, labels: Tensor) -> Tensor:
        h = self.features(x)
        e = _embed(self.embed, labels, self.num_classes, x.shape[0])
        return self.out(h).squeeze(1) + (e * h).sum(1)

