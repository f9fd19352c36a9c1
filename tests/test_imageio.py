"""Image files: every odd kind of file made on the fly, fitting to a model's shape, atomic writes."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from ronan_fast import imageio as io
from ronan_fast._atomic import plain_file_mode


def _rgb_array(h=12, w=10, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _save(arr_or_img, path, **kw):
    img = arr_or_img if isinstance(arr_or_img, Image.Image) else Image.fromarray(arr_or_img)
    img.save(path, **kw)
    return path


# --------------------------------------------------------------------------- load_image: modes


def test_rgb_and_grey_png_exact(tmp_path):
    a = _rgb_array()
    x = io.load_image(_save(a, tmp_path / "rgb.png"))
    assert x.shape == (3, 12, 10) and x.dtype == torch.float32
    torch.testing.assert_close(x, torch.from_numpy(a).permute(2, 0, 1).float() / 255)
    g = a[..., 0]
    y = io.load_image(_save(g, tmp_path / "grey.png"))
    assert y.shape == (1, 12, 10)
    torch.testing.assert_close(y[0], torch.from_numpy(g).float() / 255)


def test_rgba_and_la_composited_on_white(tmp_path):
    a = np.zeros((2, 2, 4), dtype=np.uint8)
    a[..., 0] = 200  # red channel
    a[..., 3] = [[0, 255], [128, 255]]
    x, note = io.load_image_with_note(_save(a, tmp_path / "rgba.png"))
    assert x.shape == (3, 2, 2) and "alpha composited on white" in note
    torch.testing.assert_close(x[:, 0, 0], torch.ones(3))  # fully transparent -> white
    torch.testing.assert_close(x[:, 0, 1], torch.tensor([200 / 255, 0, 0]))  # opaque -> its colour
    alpha = 128 / 255
    torch.testing.assert_close(x[:, 1, 0], torch.tensor([200 / 255 * alpha + 1 - alpha, 1 - alpha, 1 - alpha]))
    la = Image.fromarray(a[..., [0, 3]], mode="LA")
    y = io.load_image(_save(la, tmp_path / "la.png"))
    assert y.shape == (1, 2, 2)
    torch.testing.assert_close(y[0, 0], torch.tensor([1.0, 200 / 255]))


def test_palette_with_and_without_transparency(tmp_path):
    rgb = Image.fromarray(_rgb_array(8, 8))
    pal = rgb.quantize(colors=8)
    x = io.load_image(_save(pal, tmp_path / "pal.png"))
    assert x.shape == (3, 8, 8)
    want = torch.from_numpy(np.array(pal.convert("RGB"))).permute(2, 0, 1).float() / 255
    torch.testing.assert_close(x, want)
    idx = np.asarray(pal)[0, 0]
    y, note = io.load_image_with_note(_save(pal, tmp_path / "pal_t.png", transparency=int(idx)))
    assert "alpha composited on white" in note
    torch.testing.assert_close(y[:, 0, 0], torch.ones(3))
    opaque = torch.from_numpy(np.array(pal)) != int(idx)
    torch.testing.assert_close(y[:, opaque], want[:, opaque])


def test_sixteen_bit_grey_scaled_by_65535(tmp_path):
    a = np.array([[0, 1, 65535], [32768, 4000, 65534]], dtype=np.uint16)
    path = _save(a, tmp_path / "g16.png")
    assert Image.open(path).mode.startswith("I")
    x = io.load_image(path)
    assert x.shape == (1, 2, 3)
    torch.testing.assert_close(x[0], torch.from_numpy(a.astype(np.float32)) / 65535)


def test_thirty_two_bit_integer_outside_16_bit_range_is_refused(tmp_path):
    ok = _save(Image.fromarray(np.array([[0, 65535]], dtype=np.int32), mode="I"), tmp_path / "i32.tif")
    torch.testing.assert_close(io.load_image(ok)[0], torch.tensor([[0.0, 1.0]]))
    bad = _save(Image.fromarray(np.array([[0, 70000]], dtype=np.int32), mode="I"), tmp_path / "i32bad.tif")
    with pytest.raises(io.ImageLoadError, match=r"i32bad\.tif.*\[0, 70000\], outside the 16-bit range"):
        io.load_image(bad)


def test_one_bit_and_cmyk_jpeg(tmp_path):
    bits = Image.fromarray(np.array([[0, 255], [255, 0]], dtype=np.uint8)).convert("1")
    x = io.load_image(_save(bits, tmp_path / "b.png"))
    torch.testing.assert_close(x, torch.tensor([[[0.0, 1.0], [1.0, 0.0]]]))
    cmyk = Image.fromarray(_rgb_array(16, 16)).convert("CMYK")
    path = _save(cmyk, tmp_path / "cmyk.jpg", quality=95)
    with Image.open(path) as im:
        assert im.mode == "CMYK"
        want = torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1).float() / 255
    y, note = io.load_image_with_note(path)
    assert y.shape == (3, 16, 16) and note == "CMYK->RGB"
    torch.testing.assert_close(y, want)


def test_rgb_jpeg(tmp_path):
    a = np.full((9, 7, 3), 128, dtype=np.uint8)
    x = io.load_image(_save(a, tmp_path / "flat.JPEG"))
    assert x.shape == (3, 9, 7)
    assert float((x - 128 / 255).abs().max()) < 3 / 255  # a flat image survives JPEG almost exactly


def test_first_frame_of_animation_noted(tmp_path):
    frames = [Image.fromarray(np.full((4, 4), v, dtype=np.uint8)) for v in (10, 200)]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:])
    x, note = io.load_image_with_note(path)
    assert "first of 2 frames" in note
    assert abs(float(x.mean()) - 10 / 255) < 1e-6


# --------------------------------------------------------------------------- load_image: bad files


def test_truncated_png(tmp_path):
    good = _save(_rgb_array(32, 32), tmp_path / "good.png").read_bytes()
    path = tmp_path / "cut.png"
    path.write_bytes(good[: len(good) // 2])
    with pytest.raises(io.ImageLoadError, match=r"cut\.png: truncated or corrupt") as e:
        io.load_image(path)
    assert e.value.path == path and isinstance(e.value, ValueError)


def test_corrupt_image_data(tmp_path):
    data = bytearray(_save(_rgb_array(32, 32), tmp_path / "good.png").read_bytes())
    i = data.find(b"IDAT")
    data[i + 8 : i + 60] = bytes(52)
    path = tmp_path / "broken.png"
    path.write_bytes(bytes(data))
    with pytest.raises(io.ImageLoadError, match="truncated or corrupt"):
        io.load_image(path)


def test_text_file_named_png_missing_file_and_folder(tmp_path):
    txt = tmp_path / "notes.png"
    txt.write_text("not an image at all")
    with pytest.raises(io.ImageLoadError, match=r"notes\.png: not a recognised image file"):
        io.load_image(txt)
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    with pytest.raises(io.ImageLoadError, match="not a recognised image"):
        io.load_image(empty)
    with pytest.raises(io.ImageLoadError, match=r"nope\.png: file not found"):
        io.load_image(tmp_path / "nope.png")
    with pytest.raises(io.ImageLoadError, match="is a folder"):
        io.load_image(tmp_path)


def test_pixel_limit_guard(tmp_path, monkeypatch):
    path = _save(_rgb_array(20, 20), tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    with pytest.raises(io.ImageLoadError, match=r"big\.png: too many pixels.*MAX_IMAGE_PIXELS=100"):
        io.load_image(path)


# --------------------------------------------------------------------------- list_images


def test_list_images_folder_sorted_filtered_and_recursive(tmp_path):
    for name in ("b.png", "a.JPG", "c.tiff", ".hidden.png", "readme.txt"):
        _save(_rgb_array(4, 4), tmp_path / name) if name != "readme.txt" else (tmp_path / name).write_text("x")
    (tmp_path / "sub").mkdir()
    _save(_rgb_array(4, 4), tmp_path / "sub" / "d.png")
    flat = io.list_images(tmp_path)
    assert [p.name for p in flat] == ["a.JPG", "b.png", "c.tiff"]
    deep = io.list_images(str(tmp_path), recursive=True)
    assert [p.name for p in deep] == ["a.JPG", "b.png", "c.tiff", "d.png"]
    # Files named directly are kept whatever their suffix; duplicates dropped.
    mixed = io.list_images([tmp_path / "readme.txt", tmp_path, tmp_path / "b.png"])
    assert [p.name for p in mixed] == ["readme.txt", "a.JPG", "b.png", "c.tiff"]


def test_list_images_errors_are_reported_not_raised(tmp_path):
    """An empty folder or a missing path is an error in the result; the other inputs are still listed."""
    (tmp_path / "empty").mkdir()
    _save(_rgb_array(4, 4), tmp_path / "a.png")
    found = io.list_images([tmp_path / "empty", tmp_path / "missing", tmp_path / "a.png"])
    assert found == [tmp_path / "a.png"] and isinstance(found, list)
    assert [(e.path.name, e.reason.split(" with ")[0]) for e in found.errors] == [
        ("empty", "folder holds no image files"), ("missing", "file not found")]
    assert "recursive=True" in found.errors[0].reason
    assert str(found.errors[1]) == f"{tmp_path / 'missing'}: file not found"
    with pytest.raises(ValueError, match="no image paths"):
        io.list_images([])


# --------------------------------------------------------------------------- to_model_shape


def test_grey_rgb_conversions():
    g = torch.rand(1, 5, 5)
    out, notes = io.to_model_shape(g, (3, 5, 5))
    torch.testing.assert_close(out[0], g.repeat(3, 1, 1))
    assert notes == ["grey->RGB"]
    rgb = torch.rand(2, 3, 4, 4)
    out, notes = io.to_model_shape(rgb, (1, 4, 4))
    want = 0.299 * rgb[:, 0] + 0.587 * rgb[:, 1] + 0.114 * rgb[:, 2]
    torch.testing.assert_close(out[:, 0], want)
    assert notes == ["RGB->grey", "RGB->grey"]
    same, notes = io.to_model_shape(rgb, (3, 4, 4))
    torch.testing.assert_close(same, rgb)
    assert notes == ["unchanged", "unchanged"]


def test_centre_crop_then_resize_and_notes():
    # 30 wide, 10 high: the centre 10x10 is white, the sides black.
    x = torch.zeros(3, 10, 30)
    x[:, :, 10:20] = 1
    out, notes = io.to_model_shape(x, (1, 10, 10))
    torch.testing.assert_close(out, torch.ones(1, 1, 10, 10))
    assert notes == ["RGB->grey, 30x10->10x10 (centre crop to 10x10)"]
    squashed, notes = io.to_model_shape(x, (1, 10, 10), crop=False)
    assert float(squashed.min()) < 0.5 and notes == ["RGB->grey, 30x10->10x10"]
    # Tall image: crop along height.
    y = torch.rand(3, 48, 64)
    out, notes = io.to_model_shape(y, (1, 28, 28))
    assert out.shape == (1, 1, 28, 28)
    assert notes == ["RGB->grey, 64x48->28x28 (centre crop to 48x48)"]
    want = F.interpolate(io.to_model_shape(y[:, :, 8:56], (1, 48, 48))[0], size=(28, 28), mode="bilinear",
                         align_corners=False, antialias=True)
    torch.testing.assert_close(out, want)


def test_resize_is_antialiased():
    checker = (torch.arange(16).view(1, 16) + torch.arange(16).view(16, 1)) % 2
    out, _ = io.to_model_shape(checker.float().unsqueeze(0), (1, 4, 4))
    # Antialiased downsampling averages the checkerboard to grey; plain bilinear would alias.
    assert float((out - 0.5).abs().max()) < 0.05


def test_list_of_sizes_huge_aspect_ratio_and_clamping():
    items = [torch.rand(1, 1, 1000), torch.rand(3, 700, 2), torch.full((1, 9, 9), 1.2)]
    out, notes = io.to_model_shape(items, (3, 28, 28))
    assert out.shape == (3, 3, 28, 28) and bool(torch.isfinite(out).all())
    assert float(out.min()) >= 0 and float(out.max()) <= 1
    assert notes[0] == "grey->RGB, 1000x1->28x28 (centre crop to 1x1)"
    assert notes[1] == "2x700->28x28 (centre crop to 2x2)"
    torch.testing.assert_close(out[2], torch.ones(3, 28, 28))


def test_to_model_shape_bad_input():
    with pytest.raises(ValueError, match=r"images\[1\] has 4 channels"):
        io.to_model_shape([torch.rand(1, 4, 4), torch.rand(4, 4, 4)], (1, 4, 4))
    with pytest.raises(ValueError, match=r"images\[0\] must be float.*uint8"):
        io.to_model_shape(torch.zeros(1, 1, 4, 4, dtype=torch.uint8), (1, 4, 4))
    with pytest.raises(ValueError, match=r"images\[0\] contains NaN"):
        io.to_model_shape(torch.full((1, 4, 4), float("nan")), (1, 4, 4))
    with pytest.raises(ValueError, match=r"shape must be \(C, H, W\) with C in \(1, 3\)"):
        io.to_model_shape(torch.rand(1, 4, 4), (2, 4, 4))
    with pytest.raises(ValueError, match=r"shape must be \(C, H, W\)"):
        io.to_model_shape(torch.rand(1, 4, 4), (4, 4))
    with pytest.raises(ValueError, match="images is empty"):
        io.to_model_shape([], (1, 4, 4))
    with pytest.raises(ValueError, match=r"images must be \[B, C, H, W\]"):
        io.to_model_shape(torch.rand(4, 4), (1, 4, 4))


# --------------------------------------------------------------------------- load_images


def test_load_images_keeps_going_past_bad_files(tmp_path):
    _save(_rgb_array(20, 30), tmp_path / "a.png")
    (tmp_path / "b.png").write_text("junk")
    a = np.zeros((8, 8, 4), dtype=np.uint8)
    _save(a, tmp_path / "c.png")  # fully transparent -> white
    images, kept, errors = io.load_images(tmp_path, (1, 8, 8))
    assert images.shape == (2, 1, 8, 8)
    assert [p.name for p in kept] == ["a.png", "c.png"]
    assert len(errors) == 1 and errors[0].path.name == "b.png"
    torch.testing.assert_close(images[1], torch.ones(1, 8, 8))
    *_, notes = io.load_images(tmp_path, (1, 8, 8), with_notes=True)
    assert notes == ["RGB->grey, 30x20->8x8 (centre crop to 20x20)", "alpha composited on white, RGB->grey"]


def test_load_images_none_readable(tmp_path):
    (tmp_path / "x.png").write_text("junk")
    images, kept, errors = io.load_images([tmp_path / "x.png"], (3, 5, 5))
    assert images.shape == (0, 3, 5, 5) and kept == [] and len(errors) == 1


# --------------------------------------------------------------------------- writing


def test_save_image_roundtrip_and_atomic(tmp_path):
    x = torch.randint(0, 256, (3, 6, 5)).float() / 255
    path = io.save_image(x, tmp_path / "out" / "x.png")
    torch.testing.assert_close(io.load_image(path), x)
    g = torch.randint(0, 256, (7, 4)).float() / 255
    io.save_image(g, path)  # overwrite, grey [H, W]
    torch.testing.assert_close(io.load_image(path), g.unsqueeze(0))
    assert sorted(os.listdir(tmp_path / "out")) == ["x.png"]  # no temporary files left
    assert path.stat().st_mode & 0o777 == plain_file_mode()  # what open(..., "w") would give


def test_save_image_failure_leaves_old_file_and_no_temp(tmp_path, monkeypatch):
    path = io.save_image(torch.zeros(1, 3, 3), tmp_path / "keep.png")
    before = path.read_bytes()

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(Image.Image, "save", boom)
    with pytest.raises(OSError, match="disk full"):
        io.save_image(torch.ones(1, 3, 3), path)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["keep.png"]


def test_save_image_bad_input(tmp_path):
    with pytest.raises(ValueError, match="must end in .png"):
        io.save_image(torch.zeros(1, 3, 3), tmp_path / "x.jpg")
    with pytest.raises(ValueError, match="image contains NaN"):
        io.save_image(torch.full((1, 3, 3), float("nan")), tmp_path / "x.png")
    with pytest.raises(ValueError, match=r"image must be \[C, H, W\]"):
        io.save_image(torch.zeros(2, 3, 3), tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


def test_save_grid_layout(tmp_path):
    a = torch.zeros(1, 4, 4)  # grey, black
    b = torch.zeros(3, 4, 6)
    b[0] = 1  # RGB, red, wider
    path = io.save_grid([[a, b], [b]], tmp_path / "grid.png", pad=2)
    g = io.load_image(path)
    # both columns 6 wide (column 0 holds a 4- and a 6-wide image), rows 4 high, 2 px padding
    assert g.shape == (3, 2 + 4 + 2 + 4 + 2, 2 + 6 + 2 + 6 + 2)
    torch.testing.assert_close(g[:, 2:6, 2:6], torch.zeros(3, 4, 4))  # grey cell repeated to RGB
    torch.testing.assert_close(g[:, 2:6, 6:8], torch.ones(3, 4, 2))  # rest of its cell: padding
    torch.testing.assert_close(g[:, 2:6, 10:16], b)
    torch.testing.assert_close(g[:, 8:12, 2:8], b)  # second row's first cell
    torch.testing.assert_close(g[:, 8:12, 10:16], torch.ones(3, 4, 6))  # missing cell: padding (white)
    torch.testing.assert_close(g[:, 0:2, :], torch.ones(3, 2, g.shape[2]))


def test_save_grid_from_batches_and_bad_input(tmp_path):
    imgs, recon = torch.rand(2, 1, 5, 5), torch.rand(2, 1, 5, 5)
    path = io.save_grid([list(pair) for pair in zip(imgs, recon)], tmp_path / "pairs.png", pad=0)
    g = io.load_image(path)
    assert g.shape == (1, 10, 10)
    torch.testing.assert_close(g[:, 5:, 5:], (recon[1] * 255).round() / 255)
    with pytest.raises(ValueError, match="rows holds no images"):
        io.save_grid([], tmp_path / "e.png")
    with pytest.raises(ValueError, match="pad must be"):
        io.save_grid([[imgs[0]]], tmp_path / "e.png", pad=-1)
    with pytest.raises(ValueError, match=r"rows\[0\]\[1\] must be \[C, H, W\]"):
        io.save_grid([[imgs[0], torch.rand(2, 5, 5)]], tmp_path / "e.png")
    assert not (tmp_path / "e.png").exists()
