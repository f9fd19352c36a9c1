"""A tiny DDPM noise-prediction UNet for 28x28 images, a differentiable few-step DDIM sampler,
and a one-step student distilled from that sampler.

The sampler is the generator: ``DDIMSampler(unet, steps)(x_T) -> x_0``, a deterministic
(eta = 0) map from the initial noise ``x_T [N, C, 28, 28]`` to an image in [-1, 1], built from
plain differentiable tensor ops so the initial noise can be inverted by gradient descent.
``OneStepStudent(unet)(x_T) -> x_0`` is the same map in one network call (the role of a
consistency model's one-step generation ``f(x_T, T)``), trained to reproduce a DDIM sampler's
output from the same noise (``python -m ronan_fast.zoo.train onestep-fmnist``).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ronan_fast.models._base import ConfigModule, check_int


def linear_betas(num_train_timesteps: int, beta_start: float, beta_end: float) -> Tensor:
    return torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float64)


def alphas_cumprod(num_train_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> Tensor:
    """The DDPM linear schedule's cumulative products of (1 - beta_t), float64 [T]."""
    return torch.cumprod(1.0 - linear_betas(num_train_timesteps, beta_start, beta_end), 0)


def ddim_timesteps(steps: int, num_train_timesteps: int = 1000) -> list[int]:
    """Evenly spaced "trailing" timesteps, high to low, starting at T-1 (e.g. 999, 899, ..., 99)."""
    ts = torch.round(torch.arange(num_train_timesteps, 0, -num_train_timesteps / steps)).long() - 1
    return [int(t) for t in ts]


def timestep_embedding(t: Tensor, dim: int) -> Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([args.sin(), args.cos()], dim=1)


class _ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, tdim: int, groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(min(groups, cin), cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.temb = nn.Linear(tdim, cout)
        self.norm2 = nn.GroupNorm(min(groups, cout), cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: Tensor, temb: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.temb(temb)[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        return h + self.skip(x)


class TinyUNet(ConfigModule):
    """Noise prediction ``eps(x_t [N, C, H, W], t [N]) -> [N, C, H, W]``.

    With ``patch`` > 1 the image is first folded into ``patch x patch`` pixel blocks
    (space-to-depth, ``C * patch**2`` channels at ``H / patch``) and unfolded at the end, which
    cuts the cost of every layer by ``patch**2``. Then three resolutions (R, ceil(R/2),
    ceil(R/4)) with ``ch``, ``2*ch``, ``2*ch`` channels, one residual block each way, skip
    connections, GroupNorm and a sinusoidal timestep embedding through a 2-layer MLP.
    """

    def __init__(self, ch: int = 24, channels: int = 1, size: int = 28, groups: int = 8, patch: int = 2):
        super().__init__()
        check_int("ch", ch)
        check_int("channels", channels)
        check_int("groups", groups)
        check_int("patch", patch)
        check_int("size", size, 4)
        if size % patch:
            raise ValueError(f"size ({size}) must be a multiple of patch ({patch})")
        self._set_config(ch=ch, channels=channels, size=size, groups=groups, patch=patch)
        tdim = 4 * ch
        self.ch, self.patch = ch, patch
        cin = channels * patch * patch
        self.time_mlp = nn.Sequential(nn.Linear(ch, tdim), nn.SiLU(), nn.Linear(tdim, tdim))
        self.conv_in = nn.Conv2d(cin, ch, 3, padding=1)
        self.down1 = _ResBlock(ch, ch, tdim, groups)
        self.pool1 = nn.Conv2d(ch, ch, 3, stride=2, padding=1)
        self.down2 = _ResBlock(ch, 2 * ch, tdim, groups)
        self.pool2 = nn.Conv2d(2 * ch, 2 * ch, 3, stride=2, padding=1)
        self.mid = _ResBlock(2 * ch, 2 * ch, tdim, groups)
        self.up2 = _ResBlock(4 * ch, ch, tdim, groups)
        self.up1 = _ResBlock(2 * ch, ch, tdim, groups)
        self.norm_out = nn.GroupNorm(min(groups, ch), ch)
        self.conv_out = nn.Conv2d(ch, cin, 3, padding=1)

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        if t.dim() == 0:
            t = t.expand(x.shape[0])
        temb = self.time_mlp(timestep_embedding(t, self.ch).to(self.time_mlp[0].weight.dtype))
        if self.patch > 1:
            x = F.pixel_unshuffle(x, self.patch)
        h1 = self.down1(self.conv_in(x), temb)  # R
        h2 = self.down2(self.pool1(h1), temb)  # ceil(R/2)
        h3 = self.mid(self.pool2(h2), temb)  # ceil(R/4)
        u2 = self.up2(torch.cat([F.interpolate(h3, size=h2.shape[-2:], mode="nearest"), h2], 1), temb)
        u1 = self.up1(torch.cat([F.interpolate(u2, size=h1.shape[-2:], mode="nearest"), h1], 1), temb)
        out = self.conv_out(F.silu(self.norm_out(u1)))
        return F.pixel_shuffle(out, self.patch) if self.patch > 1 else out


def _as_unet(unet: "TinyUNet | dict[str, Any] | None") -> "TinyUNet":
    """A :class:`TinyUNet` from itself, its config dict, or None (the default one)."""
    if unet is None:
        return TinyUNet()
    if isinstance(unet, dict):
        return TinyUNet(**unet)
    if not isinstance(unet, TinyUNet):
        raise TypeError(f"unet must be a TinyUNet or its config dict, got {type(unet).__name__}")
    return unet


class _NoiseToImage(ConfigModule):
    """A generator from initial noise shaped like its UNet's image (``self.unet``)."""

    unet: TinyUNet

    @property
    def latent_shape(self) -> tuple[int, ...]:
        c = self.unet.config
        return (c["channels"], c["size"], c["size"])

    def _check_noise(self, x_T: Tensor) -> None:
        if x_T.dim() != 4 or tuple(x_T.shape[1:]) != self.latent_shape:
            raise ValueError(f"x_T must be [N, {', '.join(map(str, self.latent_shape))}], got shape {tuple(x_T.shape)}")


class DDIMSampler(_NoiseToImage):
    """Deterministic DDIM (eta = 0): ``x_T [N, C, H, W] -> x_0`` in [-1, 1] in ``steps`` UNet calls.

    ``unet`` is a :class:`TinyUNet` or its config dict. Timesteps are evenly spaced "trailing"
    (T-1 down to T/steps-1). Each predicted x_0 is clipped to [-1, 1] (``clip_x0``), as in
    standard DDPM/DDIM sampling; the map is differentiable in x_T (the clip passes zero gradient
    only where a prediction leaves [-1, 1]).
    """

    output_range = (-1.0, 1.0)

    def __init__(self, unet: TinyUNet | dict[str, Any] | None = None, steps: int = 6,
                 num_train_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02,
                 clip_x0: bool = True):
        super().__init__()
        check_int("steps", steps)
        check_int("num_train_timesteps", num_train_timesteps, 2)
        if steps > num_train_timesteps:
            raise ValueError(f"steps ({steps}) must not exceed num_train_timesteps ({num_train_timesteps})")
        if not (0 < beta_start < beta_end < 1):
            raise ValueError(f"need 0 < beta_start < beta_end < 1, got {beta_start}, {beta_end}")
        unet = _as_unet(unet)
        self.unet = unet
        self._set_config(unet=dict(unet.config), steps=steps, num_train_timesteps=num_train_timesteps,
                         beta_start=beta_start, beta_end=beta_end, clip_x0=clip_x0)
        self.steps, self.clip_x0 = steps, clip_x0
        ac = alphas_cumprod(num_train_timesteps, beta_start, beta_end)
        ts = ddim_timesteps(steps, num_train_timesteps)
        prev = ts[1:] + [-1]
        a_t = torch.tensor([ac[t] for t in ts])
        a_prev = torch.tensor([ac[p] if p >= 0 else 1.0 for p in prev])
        # derived from the config, so not stored in the weights file
        self.register_buffer("timesteps", torch.tensor(ts, dtype=torch.long), persistent=False)
        self.register_buffer("alpha_t", a_t.float(), persistent=False)
        self.register_buffer("alpha_prev", a_prev.float(), persistent=False)
        self.register_buffer("alphas_cumprod", ac.float(), persistent=False)

    def _predict(self, i: int, x: Tensor) -> tuple[Tensor, Tensor]:
        """Step ``i``'s predicted x_0 (clipped when ``clip_x0``) and the noise consistent with it."""
        a = self.alpha_t[i]
        eps = self.unet(x, self.timesteps[i].expand(x.shape[0]))
        x0 = (x - (1 - a).sqrt() * eps) / a.sqrt()
        if self.clip_x0:
            x0 = x0.clamp(-1.0, 1.0)
            eps = (x - a.sqrt() * x0) / (1 - a).sqrt()
        return x0, eps

    def step(self, i: int, x: Tensor) -> Tensor:
        """Step ``i`` (``0 <= i < steps - 1``): its input x_{t_i} to the next step's input."""
        x0, eps = self._predict(i, x)
        ap = self.alpha_prev[i]
        return ap.sqrt() * x0 + (1 - ap).sqrt() * eps

    def final_step(self, x: Tensor) -> Tensor:
        """The last step: its input to the image (its predicted x_0)."""
        return self._predict(self.steps - 1, x)[0]

    def step_start(self, i: int, x_next: Tensor) -> Tensor:
        """A first guess of step ``i``'s input from its output: the DDIM scaling
        ``sqrt(abar_t / abar_prev) x_next`` (exact where the predicted noise is zero)."""
        return (self.alpha_t[i] / self.alpha_prev[i]).sqrt() * x_next

    def final_start(self, image: Tensor, noise: Tensor) -> Tensor:
        """A starting input of the last step for an image in [-1, 1]: the forward process
        ``sqrt(abar_t) image + sqrt(1 - abar_t) noise`` at that step's timestep."""
        a = self.alpha_t[self.steps - 1]
        return a.sqrt() * image + (1 - a).sqrt() * noise

    def forward(self, x_T: Tensor) -> Tensor:
        self._check_noise(x_T)
        x = x_T
        for i in range(self.steps - 1):
            x = self.step(i, x)
        return self.final_step(x)

    def add_noise(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """The forward process: x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise."""
        a = self.alphas_cumprod[t].view(-1, *([1] * (x0.dim() - 1)))
        return a.sqrt() * x0 + (1 - a).sqrt() * noise


class OneStepStudent(_NoiseToImage):
    """One-step generator ``x_T [N, C, H, W] -> x_0 = tanh(unet(x_T, t_max))`` in (-1, 1).

    The student of a :class:`DDIMSampler` teacher: trained to give, in one UNet call, the image
    the teacher's sampler makes from the same initial noise (knowledge distillation of the
    sampler's deterministic noise-to-image map, as a consistency model's one-step ``f(x_T, T)``
    is). ``unet`` is a :class:`TinyUNet` or its config dict; ``timestep`` is the time input the
    UNet is always called with (the teacher's first step, so the student can start from the
    teacher's weights). The tanh keeps the output smooth in x_T, so inversion gradients do not
    vanish where a clip would cut them.
    """

    output_range = (-1.0, 1.0)

    def __init__(self, unet: TinyUNet | dict[str, Any] | None = None, timestep: int = 999):
        super().__init__()
        check_int("timestep", timestep, 0)
        unet = _as_unet(unet)
        self.unet = unet
        self._set_config(unet=dict(unet.config), timestep=timestep)
        self.register_buffer("timestep", torch.tensor(timestep, dtype=torch.long), persistent=False)

    def forward(self, x_T: Tensor) -> Tensor:
        self._check_noise(x_T)
        return torch.tanh(self.unet(x_T, self.timestep.expand(x_T.shape[0])))
