"""Remake docs/images/html_report.png: a screenshot of a realistic HTML report in headless Chromium.

Fits a belonging profile of the bundled model (Fashion-MNIST DCGAN, 20 images, 300 steps), then
attributes 20 images (10 of the model's own, 10 real Fashion-MNIST test images from
ronan_fast/assets/samples) and an unreadable file, writes the HTML report with reconstructions
and photographs it. A few minutes on two CPU cores.

    .venv/bin/python scripts/make_report_screenshot.py [--out docs/images/html_report.png] [--html report.html]

Needs Chromium (apt-get install chromium; or set RONAN_FAST_CHROMIUM).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

import torch

import ronan_fast
from ronan_fast import Attributor
from ronan_fast.calibration import default_generator
from ronan_fast.imageio import save_image
from ronan_fast.reports import png_bytes, write_html

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "ronan_fast" / "assets" / "samples"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--hide-scrollbars"]


def find_chromium() -> str:
    for candidate in (os.environ.get("RONAN_FAST_CHROMIUM"), shutil.which("chromium"),
                      shutil.which("chromium-browser"), shutil.which("google-chrome")):
        if candidate:
            return candidate
    sys.exit("no Chromium found: apt-get install chromium, or set RONAN_FAST_CHROMIUM")


def report_header(att: Attributor) -> dict:
    prof = att.profile
    ref = att.reference
    return {
        "format": "ronan-fast report", "format_version": 1, "tool": "ronan-fast", "version": ronan_fast.__version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model": {"name": att.generator.name, "fingerprint": att.generator.fingerprint()},
        "reference": None if ref is None else {"name": ref.name, "fingerprint": ref.fingerprint()},
        "profile": {"id": prof.identity(), "n": prof.n, "mu": prof.mu, "sigma": prof.sigma, "rule": prof.rule,
                    "edit": prof.edit, "generator_name": prof.generator_name},
        "rule": prof.rule, "alpha": prof.alpha, "critical_value": prof.critical_value, "threshold": prof.threshold,
        "settings": att.settings.to_dict(), "seed": att.seed, "early_stop": att.early_stop, "device": "cpu",
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "images" / "html_report.png")
    ap.add_argument("--html", type=Path, help="also keep the HTML report here")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--window", default="1400,1600", help="browser window WIDTH,HEIGHT in pixels")
    args = ap.parse_args()
    chromium = find_chromium()
    torch.manual_seed(0)

    att = Attributor(default_generator(), "default", steps=args.steps)
    print(f"fitting the profile ({args.steps} steps) ...", flush=True)
    att.fit(n=20)
    with tempfile.TemporaryDirectory(prefix="ronan-report-") as tmp:
        tmp = Path(tmp)
        own = att.sample(10, seed=7)
        for i, x in enumerate(own):
            save_image(x, tmp / "generated" / f"default_{i:02d}.png")
        (tmp / "downloads").mkdir()
        (tmp / "downloads" / "truncated.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(20))
        own_files, real_files = sorted((tmp / "generated").glob("*.png")), sorted(SAMPLES.glob("*.png"))[:10]
        files = [f for pair in zip(own_files, real_files) for f in pair]  # alternate, so the top rows show both
        files.insert(4, tmp / "downloads" / "truncated.png")
        print(f"attributing {len(files)} files ...", flush=True)
        res = att.attribute(files)

    records = res.to_records()
    base = {str(tmp): "", str(SAMPLES): "samples"}
    for r in records:  # show short paths: generated/…, samples/…, downloads/…
        for prefix, short in base.items():
            if r["path"] and r["path"].startswith(prefix + os.sep):
                r["path"] = os.path.join(short, r["path"][len(prefix) + 1:]) if short else r["path"][len(prefix) + 1:]
        r["profile_id"] = att.profile.identity()
    thumbs = {}
    for i in range(len(res)):
        thumbs[i] = {"image": png_bytes(res.images[i]), "model": png_bytes(res.reconstruction[i]),
                     "reference": None if res.reference_reconstruction is None
                     else png_bytes(res.reference_reconstruction[i])}
    header = report_header(att)
    try:
        import jsonschema

        from ronan_fast.reports import load_schema

        jsonschema.Draft202012Validator(load_schema()).validate({"header": header, "records": records})
    except ImportError:
        print("jsonschema is not installed: the report was not validated", file=sys.stderr)
    print(res.summary())

    with tempfile.TemporaryDirectory(prefix="ronan-shot-") as tmp:
        page = write_html(args.html or Path(tmp) / "report.html", header, records, att.profile, thumbs)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        shot = Path(tmp) / "shot.png"
        subprocess.run([chromium, *CHROMIUM_FLAGS, f"--user-data-dir={Path(tmp) / 'profile'}",
                        f"--screenshot={shot}", f"--window-size={args.window}", page.resolve().as_uri()],
                       check=True, capture_output=True, timeout=120)
        from PIL import Image

        with Image.open(shot) as im:  # a palette PNG: a third of the size, the same to the eye
            im.convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(args.out, optimize=True)
    print(f"wrote {args.out}" + (f" and {args.html}" if args.html else ""))


if __name__ == "__main__":
    main()
