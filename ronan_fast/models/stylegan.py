"""A small StyleGAN2-style generator: mapping network, weight-demodulated convolutions, constant input.

* :class:`StyleGenerator` -- ``z [N, nz] -> images [N, channels, size, size]`` in (-1, 1):
  ``z`` is normalised and mapped by an MLP to ``w``; synthesis starts from a learned constant
  4x4 map and, at every resolution, runs modulated 3x3 convolutions whose per-layer style is an
  affine map of ``w`` (Karras et al., 2020: modulation, demodulation, bilinear upsampling, skip
  toRGB outputs summed across resolutions). There are no noise inputs, so the image is a
  deterministic function of ``z``; a tanh bounds the summed RGB output.
* :class:`StyleDiscriminator` -- a residual discriminator (average-pool downsampling,
  minibatch standard deviation, no normalisation), to be trained with an R1 penalty.

All layers use the equalised learning rate (weights drawn N(0, 1), scaled at run time); the
mapping network's learning rate is scaled by ``lr_mul`` as in StyleGAN. The modulated
convolution is computed the non-fused way (scale the input channels by the style, convolve with
the shared weight, scale the output channels by the demodulation coefficient), which is exactly
convolving each sample with its own demodulated weight and runs as one ordinary convolution.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ronan_fast.models._base import ConfigModule, check_int

_SQRT2 = math.sqrt(2.0)


def _lrelu(x: Tensor) -> Tensor:
    """LeakyReLU(0.2) with StyleGAN's gain sqrt(2)."""
    return F.leaky_relu(x, 0.2) * _SQRT2


def _widths(size: int, base: int, min_ch: int) -> dict[int, int]:
    """Channels per resolution 4, 8, ..., size: ``base`` up to 8x8, then halved per doubling."""
    if size not in (16, 32, 64, 128):
        raise ValueError(f"size must be 16, 32, 64 or 128, got {size!r}")
    out, res, ch = {}, 4, base
    while res <= size:
        out[res] = max(min_ch, ch)
        if res >= 8:
            ch //= 2
        res *= 2
    return out


class EqualLinear(nn.Module):
    """Linear layer with the equalised learning rate: ``x @ (W * lr_mul / sqrt(in)).T + b * lr_mul``."""

    def __init__(self, in_features: int, out_features: int, bias_init: float = 0.0, lr_mul: float = 1.0,
                 activation: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_features, in_features) / lr_mul)
        self.bias = nn.Parameter(torch.full((out_features,), float(bias_init) / lr_mul))
        self.scale = lr_mul / math.sqrt(in_features)
        self.lr_mul = lr_mul
        self.activation = activation

    def forward(self, x: Tensor) -> Tensor:
        out = F.linear(x, self.weight * self.scale, self.bias * self.lr_mul)
        return _lrelu(out) if self.activation else out


class EqualConv2d(nn.Module):
    """Conv2d with the equalised learning rate (discriminator layers)."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int, bias: bool = True):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_ch, in_ch, kernel, kernel))
        self.bias = nn.Parameter(torch.zeros(out_ch)) if bias else None
        self.scale = 1.0 / math.sqrt(in_ch * kernel * kernel)
        self.padding = kernel // 2

    def forward(self, x: Tensor) -> Tensor:
        return F.conv2d(x, self.weight * self.scale, self.bias, padding=self.padding)


class ModulatedConv2d(nn.Module):
    """A convolution modulated per sample by a style ``s = affine(w)`` (bias-initialised to 1).

    ``demodulate=True`` divides each output channel by the norm of its modulated weight,
    ``sqrt(sum_{i,k} (s_i W_oik)^2 + eps)``; ``upsample=True`` doubles the input bilinearly first.
    """

    def __init__(self, in_ch: int, out_ch: int, kernel: int, w_dim: int, demodulate: bool = True,
                 upsample: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_ch, in_ch, kernel, kernel))
        self.affine = EqualLinear(w_dim, in_ch, bias_init=1.0)
        self.scale = 1.0 / math.sqrt(in_ch * kernel * kernel)
        self.demodulate = demodulate
        self.upsample = upsample
        self.padding = kernel // 2

    def forward(self, x: Tensor, w: Tensor) -> Tensor:
        s = self.affine(w)  # [N, in]
        weight = self.weight * self.scale
        x = x * s[:, :, None, None]
        if self.upsample:
            x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
        out = F.conv2d(x, weight, padding=self.padding)
        if self.demodulate:
            d = torch.rsqrt(s.square() @ weight.square().sum((2, 3)).t() + 1e-8)  # [N, out]
            out = out * d[:, :, None, None]
        return out


class StyledLayer(nn.Module):
    """Modulated 3x3 conv (demodulated), bias, LeakyReLU with gain."""

    def __init__(self, in_ch: int, out_ch: int, w_dim: int, upsample: bool = False):
        super().__init__()
        self.conv = ModulatedConv2d(in_ch, out_ch, 3, w_dim, demodulate=True, upsample=upsample)
        self.bias = nn.Parameter(torch.zeros(out_ch))

    def forward(self, x: Tensor, w: Tensor) -> Tensor:
        return _lrelu(self.conv(x, w) + self.bias[None, :, None, None])


class ToRGB(nn.Module):
    """Modulated 1x1 conv to the image channels (no demodulation), plus bias."""

    def __init__(self, in_ch: int, channels: int, w_dim: int):
        super().__init__()
        self.conv = ModulatedConv2d(in_ch, channels, 1, w_dim, demodulate=False)
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: Tensor, w: Tensor) -> Tensor:
        return self.conv(x, w) + self.bias[None, :, None, None]


class StyleGenerator(ConfigModule):
    """``z [N, nz] -> images [N, channels, size, size]`` in (-1, 1), StyleGAN2 style.

    Mapping: ``z / rms(z)`` -> ``n_mlp`` equalised linear layers (LeakyReLU, learning rate
    ``lr_mul``) -> ``w [N, w_dim]``; the same ``w`` styles every layer (no style mixing at
    inference). Synthesis: a learned constant ``[base, 4, 4]``, one styled 3x3 conv at 4x4, then
    per doubling an upsampling styled conv and a styled conv; a toRGB at every resolution whose
    outputs are upsampled and summed (skip architecture); tanh. Widths: ``base`` channels up to
    8x8, halved per doubling after, at least ``min_ch``. No noise inputs.
    """

    output_range = (-1.0, 1.0)

    def __init__(self, nz: int = 128, w_dim: int = 128, n_mlp: int = 4, base: int = 64, min_ch: int = 8,
                 channels: int = 3, size: int = 64, lr_mul: float = 0.01):
        super().__init__()
        for k, v in dict(nz=nz, w_dim=w_dim, n_mlp=n_mlp, base=base, min_ch=min_ch, channels=channels).items():
            check_int(k, v)
        if not (isinstance(lr_mul, (int, float)) and not isinstance(lr_mul, bool) and lr_mul > 0):
            raise ValueError(f"lr_mul must be a positive number, got {lr_mul!r}")
        widths = _widths(size, base, min_ch)
        self._set_config(nz=nz, w_dim=w_dim, n_mlp=n_mlp, base=base, min_ch=min_ch, channels=channels, size=size,
                         lr_mul=float(lr_mul))
        self.nz, self.w_dim = nz, w_dim
        dims = [nz] + [w_dim] * n_mlp
        self.mapping = nn.ModuleList(EqualLinear(a, b, lr_mul=lr_mul, activation=True) for a, b in zip(dims, dims[1:]))
        self.const = nn.Parameter(torch.randn(1, widths[4], 4, 4))
        self.conv4 = StyledLayer(widths[4], widths[4], w_dim)
        self.rgb4 = ToRGB(widths[4], channels, w_dim)
        self.up_convs = nn.ModuleList()
        self.convs = nn.ModuleList()
        self.rgbs = nn.ModuleList()
        res = 8
        while res <= size:
            self.up_convs.append(StyledLayer(widths[res // 2], widths[res], w_dim, upsample=True))
            self.convs.append(StyledLayer(widths[res], widths[res], w_dim))
            self.rgbs.append(ToRGB(widths[res], channels, w_dim))
            res *= 2

    @property
    def latent_shape(self) -> tuple[int, ...]:
        return (self.nz,)

    def mapping_net(self, z: Tensor) -> Tensor:
        """``z [N, nz] -> w [N, w_dim]``."""
        w = z * torch.rsqrt(z.square().mean(1, keepdim=True) + 1e-8)
        for layer in self.mapping:
            w = layer(w)
        return w

    def synthesis(self, w: Tensor) -> Tensor:
        """``w [N, w_dim]`` -> images in (-1, 1)."""
        x = self.const.expand(w.shape[0], -1, -1, -1)
        x = self.conv4(x, w)
        rgb = self.rgb4(x, w)
        for up, conv, to_rgb in zip(self.up_convs, self.convs, self.rgbs):
            x = conv(up(x, w), w)
            rgb = F.interpolate(rgb, scale_factor=2, mode="bilinear", align_corners=False) + to_rgb(x, w)
        return torch.tanh(rgb)

    def forward(self, z: Tensor) -> Tensor:
        if z.dim() != 2 or z.shape[1] != self.nz:
            raise ValueError(f"z must be [N, {self.nz}], got shape {tuple(z.shape)}")
        return self.synthesis(self.mapping_net(z))


class _DownBlock(nn.Module):
    """Residual block: two 3x3 convs then 2x average pooling, plus a pooled 1x1 skip; scaled by 1/sqrt(2)."""

    def __init__(self, in_ch: int, out_ch: int):
        super().__init__()
        self.conv1 = EqualConv2d(in_ch, in_ch, 3)
        self.conv2 = EqualConv2d(in_ch, out_ch, 3)
        self.skip = EqualConv2d(in_ch, out_ch, 1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        h = _lrelu(self.conv1(x))
        h = F.avg_pool2d(_lrelu(self.conv2(h)), 2)
        return (h + self.skip(F.avg_pool2d(x, 2))) / _SQRT2


class StyleDiscriminator(ConfigModule):
    """``images [N, channels, size, size] -> logits [N]``: fromRGB, residual down-blocks to 4x4,
    minibatch standard deviation (groups of up to 4), a 3x3 conv and two linear layers. Widths
    mirror :class:`StyleGenerator`'s (``base`` at 4x4 and 8x8)."""

    def __init__(self, base: int = 64, min_ch: int = 8, channels: int = 3, size: int = 64):
        super().__init__()
        for k, v in dict(base=base, min_ch=min_ch, channels=channels).items():
            check_int(k, v)
        widths = _widths(size, base, min_ch)
        self._set_config(base=base, min_ch=min_ch, channels=channels, size=size)
        self.from_rgb = EqualConv2d(channels, widths[size], 1)
        blocks = []
        res = size
        while res > 4:
            blocks.append(_DownBlock(widths[res], widths[res // 2]))
            res //= 2
        self.blocks = nn.ModuleList(blocks)
        c4 = widths[4]
        self.conv = EqualConv2d(c4 + 1, c4, 3)
        self.fc = EqualLinear(c4 * 16, c4, activation=True)
        self.out = EqualLinear(c4, 1)

    @staticmethod
    def _minibatch_std(x: Tensor, group: int = 4) -> Tensor:
        n, c, h, w = x.shape
        g = min(group, n)
        while n % g:
            g -= 1
        y = x.view(g, n // g, c, h, w)
        y = (y - y.mean(0)).square().mean(0).add(1e-8).sqrt().mean((1, 2, 3))  # [n // g]
        y = y.view(1, n // g, 1, 1, 1).expand(g, -1, 1, h, w).reshape(n, 1, h, w)
        return torch.cat([x, y], dim=1)

    def forward(self, x: Tensor) -> Tensor:
        h = _lrelu(self.from_rgb(x))
        for block in self.blocks:
            h = block(h)
        h = _lrelu(self.conv(self._minibatch_std(h)))
        return self.out(self.fc(h.flatten(1))).squeeze(1)


__all__ = ["StyleDiscriminator", "StyleGenerator"]
