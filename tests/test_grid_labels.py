"""save_grid's row labels and column titles: sizes, pixels, ellipses, and text the bitmap font cannot draw."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from ronan_fast.imageio import save_grid
from ronan_fast.imageio.writing import _drawable, _fit_text, _label_font

PAD = 2
TEXT_H = 11  # PIL's bitmap font: 6 x 11 pixels a character
CHAR_W = 6
GAP = 4  # between text and the images or the next title


def rows(n: int = 3, size: int = 28, channels: int = 1) -> list[list[torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [[torch.rand(channels, size, size, generator=g) * 0.5 + 0.25 for _ in range(3)] for _ in range(n)]


def read(path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im)


def test_font_is_the_builtin_bitmap_font():
    font = _label_font()
    assert font.getbbox("Ag")[3] == TEXT_H and font.getlength("abcd") == 4 * CHAR_W


def test_labelled_grid_has_the_expected_size_and_draws_text_in_the_strip(tmp_path):
    grid = rows()
    plain = read(save_grid(grid, tmp_path / "plain.png", pad=PAD))
    labels = ["cat.png  belongs  G=-1.23", "dog.png  does not belong  G=4.56", ""]
    out = read(save_grid(grid, tmp_path / "labelled.png", pad=PAD, labels=labels))
    widest = max(len(t) for t in labels) * CHAR_W
    assert plain.shape == (3 * 28 + 4 * PAD, 3 * 28 + 4 * PAD)
    assert out.shape == (plain.shape[0], plain.shape[1] + GAP + widest + PAD)
    np.testing.assert_array_equal(out[:, :plain.shape[1]], plain)  # the images are where they were
    assert (out[:, plain.shape[1]:plain.shape[1] + GAP] == 255).all()
    strip = out[:, plain.shape[1] + GAP:]
    row_band = lambda r: strip[PAD + r * (28 + PAD):PAD + r * (28 + PAD) + 28]  # noqa: E731
    assert (row_band(0) < 128).sum() > 50 and (row_band(1) < 128).sum() > 50  # dark text on white
    assert (row_band(2) == 255).all()  # the empty label draws nothing
    inked = np.nonzero((row_band(0) < 128).any(axis=0))[0]
    assert inked.max() < len(labels[0]) * CHAR_W  # the first label is as long as its text


def test_column_titles_add_a_strip_above_and_widen_narrow_columns(tmp_path):
    grid = rows(2, size=8)
    titles = ["image", "model reconstruction", "ref"]
    out = read(save_grid(grid, tmp_path / "t.png", pad=PAD, column_titles=titles))
    col_w = [max(8, len(t) * CHAR_W + GAP) for t in titles]
    assert out.shape == (TEXT_H + PAD + 2 * 8 + 3 * PAD, sum(col_w) + 4 * PAD)
    assert (out[PAD:PAD + TEXT_H] < 128).sum() > 100
    # the second column's image sits at the left of its widened cell, under its title
    x1 = PAD + col_w[0] + PAD
    y0 = TEXT_H + 2 * PAD
    expected = (grid[0][1][0] * 255).round().to(torch.uint8).numpy()
    np.testing.assert_array_equal(out[y0:y0 + 8, x1:x1 + 8], expected)


def test_a_long_label_is_cut_with_an_ellipsis(tmp_path):
    font = _label_font()
    long = "a_very_long_file_name_" * 10 + ".png  belongs  G=-1.23"
    cut = _fit_text(long, font, 120)
    assert cut.endswith("...") and long.startswith(cut[:-3])
    assert font.getlength(cut) <= 120 < font.getlength(cut[:-3] + long[len(cut) - 3] + "...")
    assert _fit_text("short", font, 120) == "short"
    assert _fit_text("abcdef", font, 10) == ""  # not even "..." fits

    grid = rows(2)
    out = read(save_grid(grid, tmp_path / "long.png", pad=PAD, labels=[long, "x"], label_width=120))
    plain_w = 3 * 28 + 4 * PAD
    assert out.shape[1] == plain_w + GAP + 120 + PAD  # the strip did not grow
    band = out[PAD:PAD + 28, plain_w + GAP:plain_w + GAP + 120]
    inked = np.nonzero((band < 128).any(axis=0))[0]
    assert inked.max() >= 120 - 2 * CHAR_W  # the text runs to the end of the strip...
    assert (out[:, plain_w + GAP + 120:] == 255).all()  # ...and not past it
    # the default strip stops at 360 pixels
    out = read(save_grid(grid, tmp_path / "long2.png", pad=PAD, labels=[long, "x"]))
    assert out.shape[1] == plain_w + GAP + 360 + PAD


def test_text_the_font_cannot_draw_is_escaped(tmp_path):
    assert _drawable("café.png") == "café.png"  # Latin-1 is drawn as it is
    assert _drawable("猫.png") == "\\u732b.png"
    assert _drawable("bad\udcff.png") == "bad\\xff.png"  # a byte that is not UTF-8
    assert _drawable("tab\tnew\nline") == "tab\\x09new\\x0aline"
    assert _drawable("\U0001f600") == "\\U0001f600"
    labels = ["猫 cat.png", "bad\udcff\udc80.png", "emoji \U0001f600 \u202e"]
    grid = rows(3, channels=3)
    out = read(save_grid(grid, tmp_path / "u.png", labels=labels, column_titles=["画像", None, "ref"]))
    assert out.ndim == 3 and out.shape[2] == 3
    plain = read(save_grid(grid, tmp_path / "p.png", labels=[_drawable(t) for t in labels],
                           column_titles=["\\u753b\\u50cf", None, "ref"]))
    np.testing.assert_array_equal(out, plain)  # drawn as their escapes


def test_text_is_white_on_a_dark_background(tmp_path):
    out = read(save_grid(rows(1), tmp_path / "d.png", pad=PAD, pad_value=0.0, labels=["belongs"]))
    strip = out[PAD:PAD + 28, 3 * 28 + 4 * PAD + GAP:]
    assert strip.max() == 255 and strip.min() == 0


def test_bad_labels_are_named(tmp_path):
    grid = rows(2)
    with pytest.raises(ValueError, match="labels has 1 entries for 2 rows"):
        save_grid(grid, tmp_path / "x.png", labels=["a"])
    with pytest.raises(ValueError, match="labels must be a list of strings"):
        save_grid(grid, tmp_path / "x.png", labels="ab")
    with pytest.raises(ValueError, match=r"labels\[1\] must be a string"):
        save_grid(grid, tmp_path / "x.png", labels=["a", 3])
    with pytest.raises(ValueError, match="column_titles has 4 entries for 3 columns"):
        save_grid(grid, tmp_path / "x.png", column_titles=["a", "b", "c", "d"])
    with pytest.raises(ValueError, match="label_width must be an integer >= 1"):
        save_grid(grid, tmp_path / "x.png", labels=["a", "b"], label_width=0)
    with pytest.raises(ValueError, match="label_width is given but labels is None"):
        save_grid(grid, tmp_path / "x.png", label_width=50)
    assert not list(tmp_path.iterdir())
