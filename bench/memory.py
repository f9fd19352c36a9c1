"""Peak memory of attributing camera-size photos: does it grow with the files' resolution?

Camera photos are made in a temporary folder: scikit-image's photos (astronaut, coffee, chelsea,
rocket, immunohistochemistry, retina, hubble_deep_field, camera) upscaled to ``--size`` (4000x3000)
and saved as JPEG (quality 90) and as PNG (which has no reduced decode: its 8-bit pixels are
decoded whole, one file at a time). For each count of ``--counts`` (``--png-counts``), a
fresh child process builds the bundled model and its reference model with a tiny profile, then
attributes that many photos in one call of :meth:`ronan_fast.Attributor.attribute` (one batch, as
``ronan-fast inspect --batch N`` does) and reports

* ``peak``: the child's peak resident memory over its whole life (``VmHWM``, which unlike
  ``ru_maxrss`` does not carry over the parent's peak through fork and exec): Python, torch and
  the models included;
* ``growth``: how far the peak rose during the attribution above the memory in use just before
  it (Linux: ``VmHWM`` after resetting it through ``/proc/self/clear_refs``);
* the attribution's time.

A second table compares, on the distinct photos, what :func:`ronan_fast.imageio.load_at_shapes`
gives with ``to_model_shape(load_image(path), shape)`` (the whole file decoded, then fitted):
the mean and the largest difference of a pixel, in 255ths.

``--loader before`` measures the loader the package had until it read files at the model's shape:
each file decoded whole to float (about 12 bytes a pixel for a colour photo, plus copies while it
is made), all kept until the batch was fitted, reproduced here as it was. The inversion is
deliberately tiny (``--steps 2``, one start, no polish): memory, not time, is measured, and the
inversion's own memory depends on the batch and the model's 28x28 shape only.

Usage::

    python -m bench.memory --counts 1,16,64 --out bench/results/memory_cpu.md
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.machine import cpu_name
from bench.report import finish, int_list

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "retina", "hubble_deep_field", "camera")

CHILD = r"""
import json, os, sys, time
import torch
from ronan_fast import Attributor
from ronan_fast.calibration import default_generator, default_reference

folder, count, loader, steps = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
torch.set_num_threads(1)
if loader == "before":
    from bench.memory import legacy_load_files
    Attributor._load_files = legacy_load_files
att = Attributor(default_generator(), default_reference(), settings="authors", steps=steps, restarts=1,
                 profile_retries=0)
att.fit(n=4, seed=0)
files = sorted(os.path.join(folder, f) for f in os.listdir(folder))[:count]
att.attribute(files[:1])  # warm up: first-call allocations are not the photos'

def status(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))

peak = status("VmHWM")  # so far: Python, torch, the models, the profile, one photo
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # the peak (VmHWM) starts again from the memory in use now
before = status("VmRSS")
t0 = time.perf_counter()
res = att.attribute(files)
took = time.perf_counter() - t0
assert len(res) == count and not res.errors, res.errors
print(json.dumps({"peak": max(peak, status("VmHWM")) / 1024, "growth": (status("VmHWM") - before) / 1024,
                  "seconds": took}))
"""


def legacy_load_files(self, items):
    """``Attributor._load_files`` as it was before files were read at the model's shape: every
    file decoded whole to float and kept until the batch is fitted (for the "before" column)."""

    from ronan_fast.attribution_inputs import _join
    from ronan_fast.imageio import list_images, load_image_with_note, to_model_shape

    natives, paths, load_notes = [], [], []
    for f in list_images(list(items)):
        x, note = load_image_with_note(f)
        natives.append(x)
        paths.append(str(f))
        load_notes.append(note)
    x, fit_notes = to_model_shape(natives, self.generator.image_shape)
    ref_x = x if tuple(self.reference.image_shape) == tuple(self.generator.image_shape) else \
        to_model_shape(natives, self.reference.image_shape)[0]
    return x, ref_x, paths, [_join(a, b) for a, b in zip(load_notes, fit_notes)], []


def make_photos(folder: Path, count: int, size: tuple[int, int], fmt: str) -> None:
    """``count`` photos of ``size`` (width, height): the distinct ones made once, then copied."""
    import numpy as np
    from PIL import Image
    from skimage import data

    made = []
    for i in range(min(count, len(PHOTOS))):
        a = getattr(data, PHOTOS[i])()
        img = Image.fromarray(a if a.ndim == 3 else np.stack([a] * 3, -1)).convert("RGB")
        path = folder / f"photo{i:03d}.{fmt}"
        big = img.resize(size, Image.BICUBIC)
        big.save(path, quality=90) if fmt == "jpg" else big.save(path, compress_level=1)
        made.append(path)
    for i in range(len(made), count):
        shutil.copyfile(made[i % len(made)], folder / f"photo{i:03d}.{fmt}")


#: the shapes of the second table: the bundled model's, a small and a larger colour model's
ACCURACY_SHAPES = ((1, 28, 28), (3, 64, 64), (3, 256, 256))


def accuracy(folder: Path) -> dict[tuple[int, int, int], tuple[float, float]]:
    """Per shape: the mean and the largest |load_at_shapes - to_model_shape(load_image)| over
    the distinct photos in ``folder``, in 255ths."""
    import torch

    from ronan_fast import imageio

    torch.set_num_threads(1)
    files = sorted(folder.iterdir())[: len(PHOTOS)]
    diffs: dict = {shape: [] for shape in ACCURACY_SHAPES}
    for f in files:
        full = imageio.load_image(f)
        for shape in ACCURACY_SHAPES:  # one shape at a time: each its own reduced decode
            x = imageio.load_at_shapes(f, [shape]).images[0]
            diffs[shape].append((x - imageio.to_model_shape(full, shape)[0][0]).abs().flatten())
        del full
    return {shape: (float(torch.cat(d).mean()) * 255, float(torch.cat(d).max()) * 255) for shape, d in diffs.items()}


def measure(folder: Path, count: int, loader: str, steps: int) -> dict:
    root = str(Path(__file__).resolve().parent.parent)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get(
        "PYTHONPATH")]))}
    out = subprocess.run([sys.executable, "-c", CHILD, str(folder), str(count), loader, str(steps)],
                         capture_output=True, text=True, env=env, timeout=3600)
    if out.returncode != 0:
        raise SystemExit(f"the child attributing {count} photos ({loader}) failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def notes(rows: list, pixels: int) -> list[str]:
    """A paragraph reading the first table: how the peak moves with the count, per loader."""
    out = []
    for fmt in ("jpg", "png"):
        now = sorted((c, r) for f, loader, c, r in rows if f == fmt and loader == "after")
        old = sorted((c, r) for f, loader, c, r in rows if f == fmt and loader == "before")
        if len(now) >= 2:
            (c0, r0), (c1, r1) = now[0], now[-1]
            out.append(f"{fmt.upper()}: from {c0} to {c1} photos the process's peak moves from {r0['peak']:.0f} to "
                       f"{r1['peak']:.0f} MB and the growth during attribute stays at {r1['growth']:.0f} MB or less: "
                       "each file is read to the model's shape before the next is opened"
                       + (" (a JPEG decoded at 1/8 of its size)" if fmt == "jpg" else
                          f" (a PNG's 8-bit pixels, {pixels * 3 / 2**20:.0f} MB for a colour photo, decoded whole, "
                          "one file at a time)") + ".")
        if len(old) >= 2:
            (c0, r0), (c1, r1) = old[0], old[-1]
            each = (r1["growth"] - r0["growth"]) / (c1 - c0)
            out.append(f"The loader before kept a float copy of every photo until the batch was fitted: "
                       f"{each:.0f} MB more a photo, {r1['growth'] / 1024:.1f} GB for {c1}; a batch of 64 would "
                       f"take about {(r0['growth'] + 63 * each) / 1024:.0f} GB (not run).")
    return [" ".join(out)] if out else []


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.memory", description=__doc__.split("\n\n")[0])
    p.add_argument("--counts", default="1,16,64", help="numbers of photos, each in one batch (default: 1,16,64)")
    p.add_argument("--before-counts", default="1,16",
                   help="the same with the loader before (default 1,16: it holds about 150 MB a 12-megapixel "
                        "photo, 64 of them would take 10 GB); '' for none")
    p.add_argument("--size", default="4000x3000", help="photo size WIDTHxHEIGHT (default 4000x3000, 12 megapixels)")
    p.add_argument("--png-counts", default="1,16", help="numbers of PNG photos (default 1,16: 36 MB a file); '' for none")
    p.add_argument("--png-before-counts", default="1", help="the same with the loader before (default 1)")
    p.add_argument("--steps", type=int, default=2, help="Adam steps of the (single-start) inversion (default 2)")
    p.add_argument("--out", help="Markdown report (default: print it)")
    args = p.parse_args(argv)
    if not os.path.exists("/proc/self/clear_refs"):
        p.error("the growth is measured through Linux's /proc/self/clear_refs, which this system lacks")
    plan = {}  # format -> loader -> counts
    for fmt, flag, after, before in [("jpg", "--counts", args.counts, args.before_counts),
                                     ("png", "--png-counts", args.png_counts, args.png_before_counts)]:
        plan[fmt] = {"after": int_list(p, flag, after) if after else [],
                     "before": int_list(p, flag.replace("counts", "before-counts"), before) if before else []}
    try:
        width, height = (int(v) for v in args.size.lower().split("x"))
    except ValueError:
        p.error(f"--size must be WIDTHxHEIGHT, e.g. 4000x3000, got {args.size!r}")
    import numpy
    import PIL
    import torch

    rows, sizes, accurate = [], {}, {}
    for fmt, loaders in plan.items():
        wanted = loaders["after"] + loaders["before"]
        if not wanted:
            continue
        with tempfile.TemporaryDirectory(prefix="ronan-memory-") as tmp:
            folder = Path(tmp)
            make_photos(folder, max(wanted), (width, height), fmt)
            sizes[fmt] = sum(f.stat().st_size for f in folder.iterdir()) / len(list(folder.iterdir())) / 2**20
            for loader in ("after", "before"):
                for count in loaders[loader]:
                    r = measure(folder, count, loader, args.steps)
                    rows.append((fmt, loader, count, r))
                    print(f"{fmt} {loader:6} {count:3d} photos: peak {r['peak']:.0f} MB, growth {r['growth']:.0f} MB, "
                          f"{r['seconds']:.1f} s", file=sys.stderr)
            accurate[fmt] = accuracy(folder)  # after the children: it grows this process
    cpu = cpu_name()
    files = ", ".join(f"{fmt.upper()} {mb:.1f} MB" for fmt, mb in sizes.items())
    lines = [
        f"Peak memory of attributing {width}x{height} photos ({width * height / 1e6:.0f} megapixels; a file: "
        f"{files} on average) with the bundled model (DCGAN on Fashion-MNIST, 1x28x28) and its reference model, "
        f"each count in one call of Attributor.attribute, in a fresh process (CPU: {cpu}, {os.cpu_count()} cores, "
        f"1 torch thread; Linux {platform.release()}; torch {torch.__version__}, Pillow {PIL.__version__}, NumPy "
        f"{numpy.__version__}, Python {platform.python_version()}). Inversion: the 'authors' preset cut to "
        f"{args.steps} Adam steps, 1 start (memory, not time, is measured).",
        "",
        "| loader | files | photos | peak RSS of the process (MB) | growth during attribute (MB) | attribute (s) |",
        "|---|---|---|---|---|---|",
    ]
    for fmt, loader, count, r in rows:
        name = "files read at the model's shape (now)" if loader == "after" else "whole files decoded to float (before)"
        lines.append(f"| {name} | {fmt.upper()} | {count} | {r['peak']:.0f} | {r['growth']:.0f} | {r['seconds']:.1f} |")
    lines += [
        "",
        "What reading at the model's shape changes in the pixels, against the whole file decoded and then "
        f"fitted by to_model_shape, over the {min(len(PHOTOS), max(max(v) for v in plan['jpg'].values() if v))} "
        "distinct photos (|difference| of a pixel, in 255ths; a JPEG is decoded at 1/2 to 1/8 of its size "
        "while 8 decoded pixels remain per model pixel, any other file a strip at a time with the same "
        "resize):",
        "",
        "| files | model shape (C, H, W) | mean | largest |",
        "|---|---|---|---|",
    ]
    for fmt, table in accurate.items():
        for shape, (mean, largest) in table.items():
            lines.append(f"| {fmt.upper()} | {shape} | {mean:.2g} | {largest:.2g} |")
    lines += ["", *notes(rows, width * height)]
    finish(lines, "bench.memory", argv, args.out)


if __name__ == "__main__":
    main()
