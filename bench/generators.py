"""Generators the benchmarks run on, each with held-out real images of its own data."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from ronan_fast.adapters import GeneratorAdapter, LatentGenerator, channels_last, fold_batchnorm


@dataclass
class BenchGenerator:
    name: str
    adapter: GeneratorAdapter
    real: Callable[[int], Tensor]  # n -> n held-out real images of the model's data, [n, C, H, W] in [0, 1]
    data: str


def _fmnist_test(n: int) -> Tensor:
    from ronan_fast.data import fashion_mnist

    x, _ = fashion_mnist("test")
    return x[-n:]  # the end of the test split: never in a training set, never a bundled sample


def default(device: str = "cpu") -> BenchGenerator:
    from ronan_fast import default as d

    adapter = LatentGenerator(d.default_generator_module(device), d.LATENT_SHAPE, d.OUTPUT_RANGE,
                              family=d.FAMILY, name="default")
    return BenchGenerator("default", adapter, _fmnist_test, "fashion-mnist test")


def zoo(name: str, device: str = "cpu") -> BenchGenerator:
    """A zoo model and real images of its data that it never trained on (its training images
    where no unseen ones exist), as the evaluation harness serves them."""
    from ronan_fast.evaluation.models import ZooModels

    src = ZooModels()
    adapter = src.adapter(name).to(device)
    split = "unseen" if src.real_unavailable(name, "unseen") is None else "train"
    return BenchGenerator(name, adapter, lambda n: src.real_images(name, split, n, seed=12345),
                          src.describe_real(name, split))


#: the GPU benchmark's larger generator: the paper's all-convolutional DCGAN at 128x128 RGB, wide
LARGE = dict(nz=128, ngf=96, channels=3, size=128)


def large(device: str = "cpu", seed: int = 0) -> BenchGenerator:
    """A generator of about 28 million parameters (``LARGE``), built here from ``seed``: untrained,
    for speed at a realistic size, not for its images. Its BatchNorm statistics are those of one
    batch of 64 latents, so every layer's activations keep a useful scale (with the initial
    statistics, DCGAN-initialised layers shrink them towards a flat image). Real images: 128x128
    RGB patches of the photographs scikit-image and scikit-learn ship (no download)."""
    from ronan_fast.data import photo_patches
    from ronan_fast.models import DeepDCGANGenerator, dcgan_init_

    torch.manual_seed(seed)
    net = dcgan_init_(DeepDCGANGenerator(**LARGE))
    bns = [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for m in bns:
        m.momentum = None  # cumulative average: one batch sets the statistics exactly
    with torch.no_grad():
        net.train()(torch.randn(64, LARGE["nz"], generator=torch.Generator().manual_seed(seed)))
    net.eval()
    adapter = LatentGenerator(net.to(device), (LARGE["nz"],), (-1.0, 1.0), family="gan", name="large-dcgan128")

    def real(n: int) -> Tensor:
        return photo_patches(LARGE["size"], n, grey=False, seed=777, sources=("skimage", "sklearn"), download=False)

    return BenchGenerator("large-dcgan128", adapter, real, "128x128 photo patches (scikit-image, scikit-learn)")


def get(name: str, device: str = "cpu") -> BenchGenerator:
    """``default``, ``large`` (see :func:`large`) or a zoo model's name."""
    if name == "default":
        return default(device)
    if name in ("large", "large-dcgan128"):
        return large(device)
    return zoo(name, device)


@torch.no_grad()
def generated(bg: BenchGenerator, n: int, seed: int) -> Tensor:
    return bg.adapter.generate(n, torch.Generator().manual_seed(seed)).images


def transformed(adapter: GeneratorAdapter, fold_bn: bool = False, nhwc: bool = False) -> GeneratorAdapter:
    """``adapter``, or one copy of it with its BatchNorms folded (``fold_bn``) and/or its weights
    in channels-last memory format (``nhwc``); the original is left as it is."""
    out = fold_batchnorm(adapter, copy=True) if fold_bn else adapter
    return channels_last(out, copy=out is adapter) if nhwc else out
