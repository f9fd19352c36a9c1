"""Tiny random generators for the tests, importable as ``tiny_models:factory`` (tests/ on sys.path),
and :func:`in_channels_last`, what ``ronan_fast.channels_last`` leaves them in."""

from __future__ import annotations

import torch
from torch import nn

LATENT = 3
SHAPE = (1, 8, 8)


class TinyGenerator(nn.Module):
    """``z [N, 3] -> [N, 1, 8, 8]`` in (-1, 1): two linear layers with tanh."""

    def __init__(self, seed: int = 0, latent: int = LATENT, shape=SHAPE):
        super().__init__()
        self.shape = tuple(shape)
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            self.fc1 = nn.Linear(latent, 32)
            self.fc2 = nn.Linear(32, int(torch.tensor(shape).prod()))
            with torch.no_grad():
                self.fc2.weight.mul_(2.0)

    def forward(self, z):
        return torch.tanh(self.fc2(torch.tanh(self.fc1(z)))).view(z.shape[0], *self.shape)


def generator():
    return TinyGenerator(seed=0)


def reference():
    return TinyGenerator(seed=1)


def other_generator():
    return TinyGenerator(seed=2)


def rgb_generator():
    """A reference-style model with another native shape (3 x 12 x 12)."""
    return TinyGenerator(seed=3, shape=(3, 12, 12))


def style_generator():
    """A tiny StyleGAN-style generator (z 16 -> mapping -> w 8 -> 1 x 16 x 16), random weights."""
    from ronan_fast.models.stylegan import StyleGenerator

    with torch.random.fork_rng():
        torch.manual_seed(0)
        return StyleGenerator(nz=16, w_dim=8, n_mlp=2, base=16, min_ch=8, channels=1, size=16)


def adapter():
    from ronan_fast.adapters import LatentGenerator

    return LatentGenerator(TinyGenerator(seed=0), LATENT, name="tiny adapter")


class NotWeights:
    """An arbitrary object: a file pickling it must not be loaded (weights_only=True)."""


def not_a_model():
    return "nope"


def broken():
    raise RuntimeError("factory failed on purpose")


def in_channels_last(module: nn.Module) -> bool:
    """Whether every 4-D parameter of ``module`` is channels-last (NHWC) contiguous and not all of
    them also plain contiguous (a 1x1 kernel's weight is both at once): what
    ``ronan_fast.channels_last`` leaves a generator in, not a plain one."""
    convs = [p for p in module.parameters() if p.dim() == 4]
    return all(p.is_contiguous(memory_format=torch.channels_last) for p in convs) and \
        any(not p.is_contiguous() for p in convs)
