"""Generators the benchmarks run on, each with held-out real images of its own data."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from ronan_fast.adapters import GeneratorAdapter, LatentGenerator


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


def get(name: str, device: str = "cpu") -> BenchGenerator:
    if name == "default":
        return default(device)
    return zoo(name, device)


@torch.no_grad()
def generated(bg: BenchGenerator, n: int, seed: int) -> Tensor:
    return bg.adapter.generate(n, torch.Generator().manual_seed(seed)).images
