"""Hostile input: whatever files, file names and folders are given, reading ends in a result or in
an error naming the file and what was wrong -- never another exception, never a hang.

Property-based (hypothesis) for the image loader, the profile reader and the weights reader
(random bytes, truncations and byte mutations of valid files made here, huge declared sizes);
fixed cases for special files (FIFOs, devices, sockets, dangling links), folders that are empty
or cannot be listed, file names that are not UTF-8, and the memory bound of loading.
"""

from __future__ import annotations

import contextlib
import dataclasses
import faulthandler
import io as bytes_io
import json
import math
import os
import pickle
import socket
import struct
import subprocess
import sys
import zlib
from functools import lru_cache
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis.control import currently_in_test_context, event
from hypothesis import strategies as st
from PIL import Image

from ronan_fast import imageio as io
from ronan_fast.imageio import files as io_files
from ronan_fast.imageio import large as io_large
from ronan_fast.cli import main as cli_main
from ronan_fast.cli.common import UsageError
from ronan_fast.cli.models import load_state_dict_file
from ronan_fast.profile import MAX_PROFILE_BYTES, BelongingProfile, ProfileError

TESTS = Path(__file__).resolve().parent
sys.path.insert(0, str(TESTS))
import tiny_models  # noqa: E402

SHAPES = [(1, 8, 8), (3, 12, 10)]
#: hypothesis settings of the property tests: examples run in a scratch folder of the module
HYP = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


#: one torch thread for this module's tests (tests/conftest.py): tiny batches run as fast on one
#: thread, and much faster on shared cores
ONE_THREAD = True


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    return tmp_path_factory.mktemp("hostile")


@contextlib.contextmanager
def watchdog(seconds: float = 60):
    """A hang fails the run (every thread's stack printed, the process ended) instead of stalling it:
    faulthandler's own thread acts even while a decoder's C code never returns."""
    faulthandler.dump_traceback_later(seconds, exit=True, file=sys.__stderr__)
    try:
        yield
    finally:
        faulthandler.cancel_dump_traceback_later()


def outcome_event(text: str) -> None:
    """Count an outcome in hypothesis's statistics (``--hypothesis-show-statistics``)."""
    if currently_in_test_context():
        event(text)


def one_line(message: str) -> None:
    assert message and "\n" not in message and "\r" not in message, repr(message)


# ---------------------------------------------------------------------------- display_path


def test_display_path_escapes_what_a_terminal_should_not_get():
    name = os.fsdecode(b"dir/\xff\xfe photo.png")
    assert name == "dir/\udcff\udcfe photo.png"
    assert io.display_path(name) == "dir/\\xff\\xfe photo.png"
    assert io.display_path(b"a\xffb.png") == "a\\xffb.png"
    assert io.display_path(Path("x\ny\tz\x1b[31m.png")) == "x\\x0ay\\x09z\\x1b[31m.png"
    assert io.display_path("caf\u00e9 \u732b.png") == "caf\u00e9 \u732b.png"  # printable: kept
    assert io.display_path("evil\u202egnp.exe") == "evil\\u202egnp.exe"  # right-to-left override
    assert io.display_path("lone\ud800.png") == "lone\\ud800.png"
    assert io.display_path("zero\u200bwidth\U000e0001") == "zero\\u200bwidth\\U000e0001"
    for text in (name, "x\ny", "lone\ud800"):
        io.display_path(text).encode("ascii", "backslashreplace")  # never raises
        io.display_path(text).encode("utf-8")


def test_error_messages_print_whatever_the_name(tmp_path):
    bad = tmp_path / os.fsdecode(b"\xff\nline.png")
    bad.write_text("not an image")
    with pytest.raises(io.ImageLoadError) as e:
        io.load_image(bad)
    assert e.value.path == bad  # the name itself, to open the file
    one_line(str(e.value))
    assert "\\xff\\x0aline.png: not a recognised image file" in str(e.value)
    str(e.value).encode("utf-8")  # printable with a strict encoder


# ---------------------------------------------------------------------------- file names that are not UTF-8


def test_not_utf8_names_round_trip(tmp_path):
    """A name with bytes that are not UTF-8 is listed, read and reported as the same str, which
    opens the same file again."""
    raw = os.path.join(os.fsencode(tmp_path), b"\xff\xfe-\xe9t\xe9.png")
    Image.fromarray(np.full((6, 5, 3), 77, np.uint8)).save(raw)
    found = io.list_images(tmp_path)
    assert len(found) == 1 and not found.errors
    name = str(found[0])
    assert os.fsencode(name) == raw
    loaded = io.load_at_shapes(found[0], [(1, 4, 4)])
    assert loaded.images[0].shape == (1, 4, 4)
    x, kept, errors = io.load_images([os.fsencode(tmp_path)], (3, 6, 5))
    assert [os.fsencode(p) for p in kept] == [raw] and not errors
    assert abs(float(x.mean()) - 77 / 255) < 1e-6


# ---------------------------------------------------------------------------- special files


def _special_files(folder: Path) -> dict[str, Path]:
    """A FIFO, a socket, a character device (a link to /dev/null), a dangling link and a link loop."""
    made = {}
    fifo = folder / "fifo.png"
    os.mkfifo(fifo)
    made["FIFO"] = fifo
    sock = folder / "sock.png"
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(sock))
    made["socket"] = sock
    if os.path.exists("/dev/null"):
        os.symlink("/dev/null", folder / "null.png")
        made["character device"] = folder / "null.png"
    os.symlink(folder / "nowhere.png", folder / "dangling.png")
    made["symbolic link to a missing target"] = folder / "dangling.png"
    os.symlink(folder / "loop2.png", folder / "loop1.png")
    os.symlink(folder / "loop1.png", folder / "loop2.png")
    made["loop of symbolic links"] = folder / "loop1.png"
    return made


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="FIFOs are a POSIX thing")
def test_special_files_are_errors_never_opened(tmp_path):
    """A FIFO (which would block a reader forever), a device, a socket or a dangling link is an
    error naming what it is, named directly or found in a folder; the regular files are still read."""
    special = _special_files(tmp_path)
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / "good.png")
    with watchdog(30):
        for kind, path in special.items():
            for load in (io.load_image, lambda p: io.load_at_shapes(p, SHAPES)):
                with pytest.raises(io.ImageLoadError, match="not a regular file") as e:
                    load(path)
                assert kind in e.value.reason
            named = io.list_images([path])
            assert list(named) == [] and len(named.errors) == 1 and kind in named.errors[0].reason
        listed = io.list_images(tmp_path)
        assert [p.name for p in listed] == ["good.png"]
        in_folder = sorted([p.name for p in special.values()] + ["loop2.png"])
        assert sorted(e.path.name for e in listed.errors) == in_folder
        images, kept, errors = io.load_images([tmp_path, special["FIFO"]], (1, 4, 4))
        assert [p.name for p in kept] == ["good.png"] and len(errors) == len(in_folder) + 1


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="FIFOs are a POSIX thing")
def test_a_file_swapped_for_a_fifo_after_the_check_does_not_block(tmp_path, monkeypatch):
    """The file is checked again on the descriptor opened without blocking: a FIFO put in its
    place between the check and the open cannot make the read wait forever."""
    fifo = tmp_path / "swap.png"
    os.mkfifo(fifo)
    real_stat = io_files._stat_regular
    monkeypatch.setattr(io_files, "_stat_regular", lambda p: real_stat(TESTS / "tiny_models.py"))  # "looked regular"
    with watchdog(30), pytest.raises(io.ImageLoadError, match="not a regular file: a FIFO"):
        io.load_image(fifo)


def test_folders_that_are_empty_or_cannot_be_listed_are_errors_not_stops(tmp_path, monkeypatch):
    (tmp_path / "empty").mkdir()
    (tmp_path / "locked").mkdir()
    (tmp_path / "deep" / "locked").mkdir(parents=True)
    (tmp_path / "deep" / "a.png").write_bytes(b"")
    good = tmp_path / "good.png"
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(good)
    real_scandir = os.scandir

    def scandir(path="."):  # the tests run as any user, root included: refuse the way chmod 000 would
        if Path(os.fsdecode(path)).name == "locked":
            raise PermissionError(13, "Permission denied", os.fsdecode(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    found = io.list_images([tmp_path / "empty", tmp_path / "locked", good])
    assert found == [good]
    reasons = {e.path.name: e.reason for e in found.errors}
    assert reasons["empty"].startswith("folder holds no image files")
    assert reasons["locked"] == "cannot list the folder (permission denied)"
    blank = io.list_images(["", b""])  # not the current folder
    assert list(blank) == [] and [e.reason for e in blank.errors] == ["an empty path names no file"] * 2
    deep = io.list_images(tmp_path / "deep", recursive=True)
    assert [p.name for p in deep] == ["a.png"]
    assert [(e.path.name, e.reason) for e in deep.errors] == [("locked", "cannot list the folder (permission denied)")]


def test_attributor_judges_the_others(tmp_path, monkeypatch):
    """Through Attributor.attribute and the command line's expand_inputs: each bad input is an
    error record and the readable images are still judged."""
    from ronan_fast import Attributor, LatentGenerator
    from ronan_fast.cli.report_files import expand_inputs

    g = LatentGenerator(tiny_models.generator(), tiny_models.LATENT, name="tiny")
    att = Attributor(g, None, steps=20, restarts=1, profile_retries=0)
    att.fit(n=4, seed=0)
    (tmp_path / "empty").mkdir()
    good = tmp_path / os.fsdecode(b"good-\xff.png")
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(good)
    inputs = [tmp_path / "empty", tmp_path / "missing.png", good]
    if hasattr(os, "mkfifo"):
        os.mkfifo(tmp_path / "fifo.png")
        inputs.append(tmp_path / "fifo.png")
    with watchdog(60):
        res = att.attribute(inputs)
    assert res.paths == [str(good)] and len(res) == 1
    errors = dict((Path(p).name, m) for p, m in res.errors)
    assert errors["missing.png"] == "file not found" and errors["empty"].startswith("folder holds no image")
    assert errors.get("fifo.png", "not a regular file: a FIFO (named pipe)") == "not a regular file: a FIFO (named pipe)"
    json.dumps(res.to_records())  # a name that is not UTF-8 is written as escapes, no crash
    files, records = expand_inputs([str(p) for p in inputs], recursive=False)
    assert files == [good]
    assert {Path(r["path"]).name: r["error"] for r in records} == errors


# ---------------------------------------------------------------------------- the memory bound


def test_large_files_are_read_at_the_models_shape_as_to_model_shape_reads_them(tmp_path, monkeypatch):
    """The large-image path (a strip at a time) gives to_model_shape's result to float rounding,
    for every mode, crops, squashes and upscales; a large JPEG read at 1/2..1/8 of its size stays
    within a small distance of the full decode's."""
    rng = np.random.default_rng(0)
    smooth = np.kron(rng.integers(0, 256, (15, 20, 3)), np.ones((8, 8, 1))).astype(np.uint8)  # 120 x 160
    base = Image.fromarray(smooth)
    alpha = Image.fromarray(rng.integers(0, 256, (120, 160), dtype=np.uint8))
    rgba = base.copy()
    rgba.putalpha(alpha)
    files = {
        "rgb.png": base, "grey.png": base.convert("L"), "rgba.png": rgba, "la.png": rgba.convert("LA"),
        "pal.png": base.quantize(16), "bits.png": base.convert("1"), "cmyk.tif": base.convert("CMYK"),
        "g16.png": Image.fromarray((np.asarray(base.convert("L"), np.uint16) * 257)),
    }
    pal_t = base.quantize(16)
    pal_t.info["transparency"] = 3
    files["pal_t.png"] = pal_t
    for name, img in files.items():
        img.save(tmp_path / name, **({"transparency": 3} if name == "pal_t.png" else {}))
    shapes = [(1, 28, 28), (3, 64, 64), (3, 40, 90), (1, 200, 150), (3, 119, 161)]
    for crop in (True, False):
        monkeypatch.setattr(io_large, "PLAIN_PIXELS", 0)  # every file takes the large-image path
        for name in files:
            got = io.load_at_shapes(tmp_path / name, shapes, crop=crop)
            x, note = io.load_image_with_note(tmp_path / name)
            assert got.note == note
            for shape, image, fit in zip(shapes, got.images, got.fit_notes):
                want, want_notes = io.to_model_shape(x, shape, crop=crop)
                assert fit == want_notes[0]
                torch.testing.assert_close(image, want[0], atol=2e-5, rtol=0, msg=f"{name} {shape} crop={crop}")
        monkeypatch.undo()
        for name in files:  # a small file: exactly to_model_shape's result
            got = io.load_at_shapes(tmp_path / name, shapes, crop=crop)
            x = io.load_image(tmp_path / name)
            for shape, image in zip(shapes, got.images):
                assert torch.equal(image, io.to_model_shape(x, shape, crop=crop)[0][0])
    photo = Image.fromarray(np.kron(rng.integers(0, 256, (30, 40, 3)), np.ones((40, 40, 1))).astype(np.uint8))
    photo.save(tmp_path / "photo.jpg", quality=90)  # 1600 x 1200: over a megapixel
    got = io.load_at_shapes(tmp_path / "photo.jpg", [(3, 28, 28), (1, 64, 64)])
    x = io.load_image(tmp_path / "photo.jpg")
    for shape, image in zip([(3, 28, 28), (1, 64, 64)], got.images):
        diff = (image - io.to_model_shape(x, shape)[0][0]).abs()
        assert float(diff.mean()) < 0.5 / 255 and float(diff.max()) < 8 / 255, (shape, float(diff.max()) * 255)


def test_reading_is_deterministic(tmp_path, monkeypatch):
    """The same file gives the same bits at the model's shape, read again or with another number
    of threads: inversion draws an image's starts from these bits."""
    rng = np.random.default_rng(2)
    Image.fromarray(rng.integers(0, 256, (300, 410, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    Image.fromarray(rng.integers(0, 256, (300, 410, 3), dtype=np.uint8)).save(tmp_path / "a.jpg")
    monkeypatch.setattr(io_large, "PLAIN_PIXELS", 0)
    shapes = [(1, 28, 28), (3, 64, 64), (3, 250, 90)]
    for name in ("a.png", "a.jpg"):
        first = io.load_at_shapes(tmp_path / name, shapes).images
        torch.set_num_threads(2)
        try:
            again = io.load_at_shapes(tmp_path / name, shapes).images
        finally:
            torch.set_num_threads(1)
        assert all(torch.equal(a, b) for a, b in zip(first, again))


_MEMORY_CHILD = r"""
import sys, torch
from ronan_fast import imageio as io
torch.set_num_threads(1)
path, how = sys.argv[1], sys.argv[2]

def status(field):  # kB
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))

io.load_at_shapes(path, [(1, 4, 4)])  # warm up: first-call allocations are not the file's
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # the peak (VmHWM) starts again from the memory in use now
before = status("VmRSS")
if how == "full":
    io.to_model_shape(io.load_image(path), (3, 64, 64))
else:
    io.load_at_shapes(path, [(3, 64, 64), (1, 28, 28)])
print((status("VmHWM") - before) * 1024)
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="measures the peak with Linux's /proc")
def test_peak_memory_of_loading_does_not_grow_with_the_file(tmp_path):
    """A 24-megapixel JPEG and an 8-megapixel PNG, read to a 64x64 and a 28x28 model: the growth
    of the process's peak memory stays far under one float copy of the file."""
    rng = np.random.default_rng(1)
    small = Image.fromarray(rng.integers(0, 256, (60, 80, 3), dtype=np.uint8))
    small.resize((6000, 4000), Image.BILINEAR).save(tmp_path / "big.jpg", quality=85)
    small.resize((3264, 2448), Image.BILINEAR).save(tmp_path / "big.png", compress_level=1)

    def peak(path, how):
        out = subprocess.run([sys.executable, "-c", _MEMORY_CHILD, str(path), how], capture_output=True, text=True,
                             timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert out.returncode == 0, out.stderr
        return int(out.stdout.strip()) / 2**20

    jpeg, png = peak(tmp_path / "big.jpg", "at_shapes"), peak(tmp_path / "big.png", "at_shapes")
    full = peak(tmp_path / "big.png", "full")
    assert jpeg < 40, jpeg  # a float copy of the JPEG: 24e6 * 12 bytes = 275 MB
    assert png < 24e6 / 2**20 + 40, png  # its 8-bit pixels (23 MB) and a few strips; a float copy is 92 MB
    assert full > 2 * png, (full, png)  # the measure sees the difference


# ---------------------------------------------------------------------------- the image loader, property-based


def _noise(h, w, c, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, c) if c > 1 else (h, w), dtype=np.uint8)


@lru_cache(maxsize=None)
def valid_images() -> dict[str, bytes]:
    """Small valid files of every kind the loader meets, made here."""
    rgb = Image.fromarray(_noise(12, 16, 3))
    rgba = rgb.copy()
    rgba.putalpha(Image.fromarray(_noise(12, 16, 1, seed=1)))
    out = {}

    def save(name, img, fmt, **kw):
        buf = bytes_io.BytesIO()
        img.save(buf, format=fmt, **kw)
        out[name] = buf.getvalue()

    save("rgb.png", rgb, "PNG")
    save("rgba.png", rgba, "PNG")
    save("palette.png", rgb.quantize(8), "PNG", transparency=2)
    save("grey16.png", Image.fromarray(_noise(12, 16, 1).astype(np.uint16) * 257), "PNG")
    save("bits.png", rgb.convert("1"), "PNG")
    save("rgb.jpg", rgb, "JPEG", quality=90)
    save("progressive.jpg", rgb, "JPEG", progressive=True)
    save("cmyk.jpg", rgb.convert("CMYK"), "JPEG")
    save("lossy.webp", rgb, "WEBP", quality=80)
    save("lossless.webp", rgba, "WEBP", lossless=True)
    save("anim.gif", rgb.quantize(8), "GIF", save_all=True, append_images=[rgb.rotate(90).quantize(8)])
    save("rgb.bmp", rgb, "BMP")
    save("rgb.tif", rgb, "TIFF", compression="tiff_deflate")
    save("float.tif", Image.fromarray(_noise(12, 16, 1).astype(np.float32) / 255), "TIFF")
    save("rgb.ppm", rgb, "PPM")
    return out


MAGICS = [b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff\xe0", b"GIF89a", b"RIFF\x00\x00\x00\x00WEBPVP8 ", b"BM",
          b"II*\x00", b"MM\x00*", b"P6\n", b"%!PS-Adobe-3.0 EPSF-3.0\n", b"\x00\x00\x01\x00"]

def image_outcome(path: Path, shapes=SHAPES, large_path: bool = False) -> str:
    """Read ``path``; it must end as images of the asked shapes or as an ImageLoadError."""
    saved = io_large.PLAIN_PIXELS
    if large_path:
        io_large.PLAIN_PIXELS = 0
    try:
        with watchdog(120):
            try:
                got = io.load_at_shapes(path, shapes)
            except io.ImageLoadError as e:
                assert e.reason and e.path == path
                one_line(str(e))
                outcome_event("image: ImageLoadError")
                return "error"
    finally:
        io_large.PLAIN_PIXELS = saved
    assert len(got.images) == len(shapes) == len(got.fit_notes)
    for x, shape in zip(got.images, shapes):
        assert tuple(x.shape) == shape and x.dtype == torch.float32
        assert bool(torch.isfinite(x).all()) and float(x.min()) >= 0 and float(x.max()) <= 1
    outcome_event("image: read at the shapes")
    return "image"


def _write(folder: Path, name: str, data: bytes) -> Path:
    path = folder / name
    path.write_bytes(data)
    return path


@settings(max_examples=300, **HYP)
@given(magic=st.sampled_from([b""] + MAGICS), data=st.binary(max_size=2048), large=st.booleans())
def test_images_random_bytes(scratch, magic, data, large):
    image_outcome(_write(scratch, "random.img", magic + data), large_path=large)


@settings(max_examples=300, **HYP)
@given(name=st.sampled_from(sorted(valid_images())), cut=st.floats(0, 1, exclude_max=True), large=st.booleans())
def test_images_truncated(scratch, name, cut, large):
    data = valid_images()[name]
    image_outcome(_write(scratch, "cut" + Path(name).suffix, data[: int(cut * len(data))]), large_path=large)


@settings(max_examples=600, **HYP)
@given(name=st.sampled_from(sorted(valid_images())), edits=st.lists(st.tuples(st.floats(0, 1, exclude_max=True),
       st.integers(0, 255)), min_size=1, max_size=8), large=st.booleans())
def test_images_mutated(scratch, name, edits, large):
    data = bytearray(valid_images()[name])
    for where, value in edits:
        data[int(where * len(data))] = value
    path = _write(scratch, "mutated" + Path(name).suffix, bytes(data))
    outcome = image_outcome(path, large_path=large)
    if not large:  # the plain path decodes as load_image does: the same outcome, the same pixels
        try:
            x = io.load_image(path)
        except io.ImageLoadError:
            assert outcome == "error"
        else:
            assert outcome == "image"
            assert torch.equal(io.load_at_shapes(path, SHAPES[:1]).images[0], io.to_model_shape(x, SHAPES[0])[0][0])


def _png_with_size(width: int, height: int) -> bytes:
    """A PNG whose header declares ``width x height`` (CRC correct) but holds a few rows of data."""
    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" + b"\x80" * 3 * min(width, 64))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def _gif_with_size(width: int, height: int) -> bytes:
    data = bytearray(valid_images()["anim.gif"])
    data[6:10] = struct.pack("<HH", width, height)  # the logical screen
    at = data.index(b"\x2c")  # the first image descriptor
    data[at + 5:at + 9] = struct.pack("<HH", width, height)
    return bytes(data)


def _bmp_with_size(width: int, height: int) -> bytes:
    data = bytearray(valid_images()["rgb.bmp"])
    data[18:26] = struct.pack("<ii", width, height)
    return bytes(data)


def _jpeg_with_size(width: int, height: int) -> bytes:
    data = bytearray(valid_images()["rgb.jpg"])
    at = data.index(b"\xff\xc0")  # the baseline frame header: length, precision, height, width
    data[at + 5:at + 9] = struct.pack(">HH", height, width)
    return bytes(data)


@settings(max_examples=200, **HYP)
@given(kind=st.sampled_from(["png", "gif", "bmp", "jpg"]), width=st.integers(1, 65535), height=st.integers(1, 65535),
       large=st.booleans())
def test_images_huge_declared_sizes(scratch, kind, width, height, large):
    """Up to 65535 x 65535 declared (4.3 gigapixels): Pillow's pixel limit refuses the largest,
    the others fail on their missing data (or are read, when little is missing)."""
    make = {"png": _png_with_size, "gif": _gif_with_size, "bmp": _bmp_with_size, "jpg": _jpeg_with_size}[kind]
    outcome = image_outcome(_write(scratch, "huge." + kind, make(width, height)), large_path=large)
    if width * height > 2 * Image.MAX_IMAGE_PIXELS:
        assert outcome == "error"


def test_images_over_the_pixel_limit_are_refused_with_a_clear_reason(tmp_path):
    for width, height in [(2**31 - 1, 2**31 - 1), (100_000, 100_000), (20_000, 5_000)]:
        path = _write(tmp_path, "bomb.png", _png_with_size(width, height))
        with pytest.raises(io.ImageLoadError, match=r"too many pixels \(over PIL.Image.MAX_IMAGE_PIXELS="):
            io.load_at_shapes(path, SHAPES)


def test_eps_is_never_handed_to_ghostscript(tmp_path):
    path = _write(tmp_path, "a.png", b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n")
    with pytest.raises(io.ImageLoadError, match="not a recognised image file"):
        io.load_image(path)


# ---------------------------------------------------------------------------- profiles


@lru_cache(maxsize=None)
def valid_profile() -> dict:
    from ronan_fast.adapters import LatentGenerator
    from ronan_fast.inversion import PRESETS

    g = LatentGenerator(tiny_models.generator(), tiny_models.LATENT, name="tiny")
    r = LatentGenerator(tiny_models.reference(), tiny_models.LATENT, name="tiny ref")
    rng = np.random.default_rng(3)
    p = BelongingProfile.from_losses(rng.lognormal(-8, 1.0, 12), rng.uniform(0.05, 0.2, 12), rule="grubbs-log",
                                     settings=PRESETS["authors"].replace(steps=50, restarts=2), generator=g, reference=r,
                                     image_bits=8, retries=2, retried=[3])
    return json.loads(json.dumps(p.to_dict()))


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.integers(-(10**40), 10**40)
    | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=6) | st.dictionaries(st.text(max_size=12), inner, max_size=6),
    max_leaves=25,
)


def profile_outcome(path: Path) -> str:
    with watchdog(60):
        try:
            p = BelongingProfile.load(path)
        except ProfileError as e:
            one_line(str(e))
            outcome_event("profile: ProfileError")
            return "error"
    # a profile that loads can be used: its test gives numbers
    assert math.isfinite(p.threshold) and math.isfinite(p.critical_value)
    assert np.isfinite(p.statistic([1e-3, 1.0])).all()
    p.describe(), p.identity()
    outcome_event("profile: a valid profile")
    return "profile"


@settings(max_examples=300, **HYP)
@given(value=JSON_VALUES)
def test_profiles_random_json(scratch, value):
    path = scratch / "random.json"
    path.write_text(json.dumps(value, allow_nan=True))
    assert profile_outcome(path) == "error"


@settings(max_examples=600, **HYP)
@given(field=st.sampled_from(sorted(set(valid_profile()) | {f.name for f in dataclasses.fields(BelongingProfile)})),
       value=JSON_VALUES | st.just(...), extra=st.booleans())
def test_profiles_mutated_fields(scratch, field, value, extra):
    data = dict(valid_profile())
    if value is ...:
        data.pop(field, None)
    else:
        data[field] = value
    if extra:
        data["x" + field] = 0
    path = scratch / "mutated.json"
    path.write_text(json.dumps(data, allow_nan=True))
    profile_outcome(path)


@settings(max_examples=300, **HYP)
@given(cut=st.floats(0, 1, exclude_max=True), edits=st.lists(st.tuples(st.floats(0, 1, exclude_max=True),
       st.integers(0, 255)), max_size=4))
def test_profiles_truncated_and_mutated_bytes(scratch, cut, edits):
    data = bytearray(json.dumps(valid_profile(), indent=2).encode())
    for where, value in edits:
        data[int(where * len(data))] = value
    path = scratch / "cut.json"
    path.write_bytes(bytes(data[: int(cut * len(data))]))
    assert profile_outcome(path) == "error"


def _hostile_profiles(folder: Path) -> dict[str, Path]:
    files = {}

    def put(name, data: bytes):
        files[name] = folder / name
        files[name].write_bytes(data)

    put("deep.json", b"[" * 200_000 + b"]" * 200_000)
    put("deep_object.json", b'{"a":' * 50_000 + b"1" + b"}" * 50_000)
    put("long_int.json", b'{"format": "ronan-fast belonging profile", "n": ' + b"9" * 100_000 + b"}")
    put("not_utf8.json", b'{"format": "\xff\xfe"}')
    put("binary.json", os.urandom(4096))
    put("bom.json", b"\xef\xbb\xbf" + json.dumps(valid_profile()).encode())
    put("nan.json", json.dumps({**valid_profile(), "mu": float("nan")}).encode())
    put("huge_float.json", json.dumps({**valid_profile(), "raw_losses": [1e308] * 12}).encode())
    put("tiny_alpha.json", json.dumps({**valid_profile(), "alpha": 5e-324}).encode())
    put("bits.json", json.dumps({**valid_profile(), "image_bits": "8"}).encode())
    spread = [1e-300, 1e300] * 6  # consistent moments, but exp(mu + G_crit * sigma) overflows
    logs = np.log(spread)
    put("overflow.json", json.dumps({**valid_profile(), "reference_fingerprint": None, "reference_config": None,
                                     "reference_losses": None, "reference_name": None, "raw_losses": spread,
                                     "calibrated_losses": spread, "mu": float(logs.mean()),
                                     "sigma": float(logs.std(ddof=1))}).encode())
    big = folder / "big.json"  # 2 GB, sparse: refused by its size, nothing read
    with open(big, "wb") as f:
        f.truncate(2 * 2**30)
    files["big.json"] = big
    over = folder / "over.json"
    over.write_bytes(b" " * (MAX_PROFILE_BYTES + 1))
    files["over.json"] = over
    if hasattr(os, "mkfifo"):
        os.mkfifo(folder / "fifo.json")
        files["fifo.json"] = folder / "fifo.json"
    os.symlink(folder / "nowhere.json", folder / "dangling.json")
    files["dangling.json"] = folder / "dangling.json"
    files["folder"] = folder
    files[os.fsdecode(b"name\xff\n.json")] = folder / os.fsdecode(b"name\xff\n.json")
    files[os.fsdecode(b"name\xff\n.json")].write_bytes(b"{}")
    return files


#: what the message says, for some of the hostile profiles
PROFILE_REASONS = {
    "deep.json": "nested too deeply", "deep_object.json": "nested too deeply", "long_int.json": "cannot be read",
    "not_utf8.json": r"is not UTF-8 text \(byte 12 is 0xff\)", "binary.json": "is not UTF-8 text",
    "nan.json": "field 'mu' must be a finite number", "tiny_alpha.json": "gives no finite Grubbs critical value",
    "bits.json": "field 'image_bits'", "overflow.json": "threshold", "big.json": "is over 64 MB",
    "over.json": "is over 64 MB", "fifo.json": "FIFO", "dangling.json": "symbolic link to a missing file",
    "folder": "not a file but a folder",
}


def test_hostile_profile_files_end_in_one_line_and_exit_code_2(tmp_path, capsys, monkeypatch):
    monkeypatch.syspath_prepend(str(TESTS))
    for name, path in _hostile_profiles(tmp_path).items():
        assert profile_outcome(path) == "error", name
        if name in PROFILE_REASONS:
            with pytest.raises(ProfileError, match=PROFILE_REASONS[name]):
                BelongingProfile.load(path)
        with watchdog(60):
            code = cli_main(["inspect", "--profile", str(path), "--model", "tiny_models:generator",
                             "--latent-shape", "3", "-q", str(tmp_path)])
        out, err = capsys.readouterr()
        assert code == 2, (name, err)
        one_line(err.rstrip("\n"))
        assert err.startswith("ronan-fast: error: ") and not out
        err.encode("utf-8")


def test_an_unforeseen_check_failure_is_still_a_profile_error(tmp_path, monkeypatch):
    """The checks' own net: a check meeting a value of a kind no one foresaw (here made to raise
    TypeError) still ends as a ProfileError naming the file."""
    from ronan_fast import profile_checks

    path = tmp_path / "p.json"
    path.write_text(json.dumps(valid_profile()))

    def check(p):
        raise TypeError("'<' not supported between instances of 'dict' and 'int'")

    monkeypatch.setattr(profile_checks, "_validate_fields", check)
    with pytest.raises(ProfileError, match=r"p\.json: invalid field values \(TypeError: "):
        BelongingProfile.load(path)


# ---------------------------------------------------------------------------- weights


@lru_cache(maxsize=None)
def valid_weights() -> dict[str, bytes]:
    from safetensors.torch import save

    sd = tiny_models.generator().state_dict()
    out = {"st.safetensors": save(sd)}
    for name, kw in [("zip.pt", {}), ("legacy.pt", {"_use_new_zipfile_serialization": False})]:
        buf = bytes_io.BytesIO()
        torch.save({"state_dict": sd} if name == "zip.pt" else sd, buf, **kw)
        out[name] = buf.getvalue()
    return out




def weights_outcome(path: Path) -> str:
    with watchdog(60):
        try:
            sd = load_state_dict_file(path)
        except UsageError as e:
            message = str(e)
            one_line(message)
            assert "weights_only=False" not in message and "weights_only` set to `False" not in message
            assert message.startswith(f"--weights {io.display_path(path)}: ")
            outcome_event("weights: UsageError")
            return "error"
    assert isinstance(sd, dict) and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in sd.items())
    outcome_event("weights: a state dict")
    return "state dict"


@settings(max_examples=200, **HYP)
@given(suffix=st.sampled_from([".pt", ".safetensors", ".bin"]),
       head=st.sampled_from([b"", b"PK\x03\x04", b"\x80\x02", b"\x80\x04\x95", struct.pack("<Q", 2) + b"{}",
                             struct.pack("<Q", 2**62)]), data=st.binary(max_size=2048))
def test_weights_random_bytes(scratch, suffix, head, data):
    weights_outcome(_write(scratch, "random" + suffix, head + data))  # "{}" after its length is a valid empty one


@settings(max_examples=300, **HYP)
@given(name=st.sampled_from(sorted(valid_weights())), cut=st.floats(0, 1, exclude_max=True))
def test_weights_truncated(scratch, name, cut):
    data = valid_weights()[name]
    weights_outcome(_write(scratch, "cut" + Path(name).suffix, data[: int(cut * len(data))]))


@settings(max_examples=300, **HYP)
@given(name=st.sampled_from(sorted(valid_weights())), edits=st.lists(st.tuples(st.floats(0, 1, exclude_max=True),
       st.integers(0, 255)), min_size=1, max_size=6))
def test_weights_mutated(scratch, name, edits):
    data = bytearray(valid_weights()[name])
    for where, value in edits:
        data[int(where * len(data))] = value
    weights_outcome(_write(scratch, "mutated" + Path(name).suffix, bytes(data)))


class _Payload:
    """Pickles as a call that creates ``marker``: loading it unpickled would run that call."""

    def __init__(self, how: str, marker: Path):
        self.how, self.marker = how, str(marker)

    def __reduce__(self):
        if self.how == "system":
            return os.system, (f"touch '{self.marker}'",)
        if self.how == "open":
            return open, (self.marker, "w")
        if self.how == "exec":
            return exec, (f"open({self.marker!r}, 'w').close()",)
        return Path.touch, (Path(self.marker),)


@pytest.mark.parametrize("how", ["system", "open", "exec", "touch"])
@pytest.mark.parametrize("container", ["pickle0", "pickle2", "pickle5", "torch-zip", "torch-legacy", "in-tensor-dict"])
def test_malicious_pickles_never_run(tmp_path, how, container, capsys, monkeypatch):
    marker = tmp_path / "ran"
    payload = _Payload(how, marker)
    path = tmp_path / "evil.pt"
    if container.startswith("pickle"):
        path.write_bytes(pickle.dumps({"weight": payload}, protocol=int(container[-1])))
    elif container == "torch-zip":
        torch.save({"weight": payload}, path)
    elif container == "torch-legacy":
        torch.save({"weight": payload}, path, _use_new_zipfile_serialization=False)
    else:
        torch.save({"state_dict": {"fc1.weight": torch.zeros(1)}, "hook": payload}, path)
    assert not marker.exists()
    assert weights_outcome(path) == "error"
    assert not marker.exists()
    for suffix in (".safetensors", ".bin"):
        other = path.with_suffix(suffix)
        other.write_bytes(path.read_bytes())
        assert weights_outcome(other) == "error"
    monkeypatch.syspath_prepend(str(TESTS))
    code = cli_main(["profile", "--model", "tiny_models:generator", "--latent-shape", "3", "--weights", str(path),
                     "-q", "-o", str(tmp_path / "p.json")])
    _, err = capsys.readouterr()
    assert code == 2 and "nothing in it was run" in err and "weights_only=False" not in err
    one_line(err.rstrip("\n"))
    assert not marker.exists() and not (tmp_path / "p.json").exists()


def test_torchs_advice_is_never_passed_on():
    from ronan_fast.cli.models import _short

    advice = pickle.UnpicklingError("Weights only load failed. Re-running `torch.load` with `weights_only` set to "
                                    "`False` will likely succeed, but it can result in arbitrary code execution.")
    assert _short(advice) == "Weights only load failed"  # the first sentence only
    advice = pickle.UnpicklingError("Re-running `torch.load` with `weights_only` set to `False` will likely succeed.")
    assert _short(advice) == "UnpicklingError"
    assert _short(ValueError("could not unpickle the object. More.")) == "ValueError"
    assert _short(RuntimeError("PytorchStreamReader failed reading zip archive: failed finding central directory. "
                               "This is an internal miniz error.")) == (
        "PytorchStreamReader failed reading zip archive: failed finding central directory")


def test_weights_that_are_not_state_dicts(tmp_path):
    from safetensors.torch import save_file

    cases = {
        "list.pt": [torch.zeros(2)], "scalar.pt": torch.zeros(3), "int_value.pt": {"a": 3},
        "int_key.pt": {1: torch.zeros(1)}, "complex.pt": {"a": torch.zeros(2, dtype=torch.complex64)},
        "sparse.pt": {"a": torch.zeros(3, 3).to_sparse()},
        "quantized.pt": {"a": torch.quantize_per_tensor(torch.zeros(2), 0.1, 0, torch.qint8)},
    }
    want = {"list.pt": "not a state dict", "scalar.pt": "not a state dict", "int_value.pt": "holds a int, not a tensor",
            "int_key.pt": "a key is a int", "complex.pt": "torch.complex64 tensor",
            "sparse.pt": "torch.sparse_coo torch.float32 tensor", "quantized.pt": "quantized torch.qint8 tensor"}
    for name, obj in cases.items():
        torch.save(obj, tmp_path / name)
        with pytest.raises(UsageError, match=want[name]):
            load_state_dict_file(tmp_path / name)
    save_file({"a": torch.zeros(2, dtype=torch.complex64)}, str(tmp_path / "c.safetensors"))
    with pytest.raises(UsageError, match="complex64 tensor; weights must be floating point, integer or bool"):
        load_state_dict_file(tmp_path / "c.safetensors")
    torch.save({"a": torch.zeros(1)}, tmp_path / "zip.safetensors")
    with pytest.raises(UsageError, match="not a safetensors file.*it looks like a torch file: name it .pt"):
        load_state_dict_file(tmp_path / "zip.safetensors")
    (tmp_path / "st.pt").write_bytes(valid_weights()["st.safetensors"])
    with pytest.raises(UsageError, match="it looks like a safetensors file: name it .safetensors"):
        load_state_dict_file(tmp_path / "st.pt")
    if hasattr(os, "mkfifo"):
        (tmp_path / "special").mkdir()
        for special in _special_files(tmp_path / "special").values():
            with watchdog(30), pytest.raises(UsageError, match="not a regular file|missing file|cannot read"):
                load_state_dict_file(special)
