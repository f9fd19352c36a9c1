"""Generators the benchmarks run on, each with held-out real images of its own data."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from ronan_fast.adapters import ConditionalGenerator, GeneratorAdapter, LatentGenerator


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


def _digits_heldout(n: int) -> Tensor:
    from ronan_fast.data import fashion_mnist  # noqa: F401  (same package, keeps imports lazy)
    from ronan_fast import data as D

    x, _ = D.mnist_digits()
    return x[-n:]


def default(device: str = "cpu") -> BenchGenerator:
    from ronan_fast import default as d

    adapter = LatentGenerator(d.default_generator_module(device), d.LATENT_SHAPE, d.OUTPUT_RANGE,
                              family=d.FAMILY, name="default")
    return BenchGenerator("default", adapter, _fmnist_test, "fashion-mnist test")


def zoo(name: str, device: str = "cpu") -> BenchGenerator:
    from ronan_fast import zoo as z

    entry = z.ZOO[name]
    module = z.load_zoo_module(name).to(device)
    latent_shape = tuple(entry.latent_shape)
    if entry.family == "conditional":
        adapter: GeneratorAdapter = ConditionalGenerator(
            module, latent_shape, num_classes=getattr(module, "num_classes", 10),
            output_range=tuple(entry.output_range), name=name,
        )
    else:
        adapter = LatentGenerator(module, latent_shape, tuple(entry.output_range), family=entry.family, name=name)
    data = str(getattr(entry, "data", ""))
    real = _digits_heldout if "digit" in data.lower() else _fmnist_test
    if "photo" in data.lower():
        from ronan_fast import data as D

        def real(n: int) -> Tensor:  # noqa: F811
            return D.photo_patches(size=28, n=n, grey=True, seed=12345)

    return BenchGenerator(name, adapter, real, data)


def get(name: str, device: str = "cpu") -> BenchGenerator:
    if name == "default":
        return default(device)
    return zoo(name, device)


@torch.no_grad()
def generated(bg: BenchGenerator, n: int, seed: int) -> Tensor:
    return bg.adapter.generate(n, torch.Generator().manual_seed(seed)).images
