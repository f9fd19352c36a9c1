"""Recorded inversions that pin the inversion's arithmetic, bit for bit, on CPU.

Each case inverts a fixed draw of images (the model's own, rounded to 8 bits, and real ones)
with fixed settings on one CPU thread, and records every image's loss (as ``float.hex``), its
row-steps and a hash of its best input and reconstruction. ``tests/test_inversion_pins.py``
runs the cases again and asks for the same bits. The cases touch every path of the inversion:
the family defaults with and without a belonging threshold (early stop, escalation, the
settle rule), bf16 autocast and its float32 confirmation, admission under a small row budget,
each polish method (dense forward and reverse mode, CG, GMRES, tone-fitted), the non-fused
metrics, a class-conditional model with its class searched, and stagewise inversion.

Rounding depends on torch's version and on the CPU: its instruction set, and which kernels
oneDNN and MKL pick on it (two CPUs that torch both calls "AVX512", an AMD EPYC and an Intel
Xeon with AMX, round differently). The pins file holds one record per environment
(:func:`environment`); the test runs the record of the machine it is on, and skips where there
is none. Record deliberately: for a new environment when the inversion's arithmetic is known
unchanged since the last recording (the same code passing its pins elsewhere), or everywhere
when the arithmetic is meant to change:

    python tests/inversion_pins.py            # (re)writes this environment's record, every case
    python tests/inversion_pins.py NAME ...   # only these cases of it
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Callable
from pathlib import Path

import torch

PINS = Path(__file__).resolve().parent / "data" / "inversion_pins.json"


#: CPU features that change which kernels oneDNN and MKL run, hence the rounding
_CPU_FEATURES = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16", "avx_vnni", "amx_tile", "amx_bf16",
                 "amx_int8")


def _cpu() -> str:
    """The CPU's vendor and the features of :data:`_CPU_FEATURES` it has (from /proc/cpuinfo;
    the platform's processor string elsewhere)."""
    import platform

    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    first = info.split("\n\n", 1)[0]  # the first processor's block
    fields = {k.strip(): v.strip() for k, v in (line.split(":", 1) for line in first.splitlines() if ":" in line)}
    flags = set(fields.get("flags", "").split())
    return " ".join([fields.get("vendor_id", platform.machine())] + [f for f in _CPU_FEATURES if f in flags])


def environment() -> dict:
    """What the bits depend on besides the code."""
    return {"torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability(), "cpu": _cpu(),
            "threads": 1}


def records() -> list[dict]:
    """The pins file's records, each ``{"environment": ..., "cases": ...}`` (none if it does not exist)."""
    return json.loads(PINS.read_text())["records"] if PINS.exists() else []


def recorded(env: dict, in_records: list[dict]) -> dict | None:
    """The pinned cases ``in_records`` holds for ``env``, or None."""
    return next((rec["cases"] for rec in in_records if rec["environment"] == env), None)


def _own(adapter, n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    images = adapter.generate(n, generator=g).images.detach().cpu()
    return torch.round(images * 255) / 255


def _fmnist_real(n: int) -> torch.Tensor:
    from ronan_fast.default import default_sample_paths
    from ronan_fast.imageio import load_images

    x, _, _ = load_images(default_sample_paths()[:n], (1, 28, 28))
    return x


def _photo_real(n: int) -> torch.Tensor:
    """Colour 64x64 crops of the photos scikit-learn ships (china.jpg, flower.jpg)."""
    from sklearn.datasets import load_sample_images

    out = []
    for k, im in enumerate(load_sample_images().images[:n]):
        x = torch.from_numpy(im.copy()).permute(2, 0, 1).float() / 255
        crop = x[:, 100 + 40 * k: 228 + 40 * k, 200: 328]
        out.append(torch.nn.functional.avg_pool2d(crop.unsqueeze(0), 2))
    return torch.round(torch.cat(out) * 255) / 255


def _bundled():
    from ronan_fast.calibration import default_generator

    return default_generator()


def _zoo(name: str):
    from ronan_fast.zoo import zoo_adapter

    return zoo_adapter(name)


def _case(model: Callable, images: Callable, settings, **kwargs) -> dict:
    return {"model": model, "images": images, "settings": settings, "kwargs": kwargs}


def cases() -> dict[str, dict]:
    from ronan_fast.inversion import FAMILY_DEFAULTS, PRESETS

    onestep = FAMILY_DEFAULTS["consistency"].replace(steps=150, polish_steps=12)
    small = dict(steps=120, lr=0.1, restarts=6, schedule="cosine", min_lr_frac=0.01, halving_every=30,
                 halving_keep=0.5, min_rows=2, patience=60, rel_tol=1e-3, check_every=10)
    bundled = lambda: torch.cat([_own(_bundled(), 3, 11), _fmnist_real(2)])  # noqa: E731
    return {
        "bundled-default": _case(_bundled, bundled, "default"),
        "bundled-default-threshold": _case(_bundled, bundled, "default", stop_below=2e-4),
        "bundled-authors-short": _case(_bundled, bundled, "authors", steps=150),
        "bundled-bf16-threshold": _case(_bundled, bundled, "default", precision="bf16", stop_below=2e-4),
        "bundled-admission": _case(_bundled, bundled, PRESETS["authors"].replace(**small, polish_steps=4), max_rows=12),
        "bundled-features": _case(_bundled, bundled, PRESETS["authors"].replace(
            **{**small, "schedule": "warm_restarts", "cycles": 2, "warmup": 5}, typical_set="penalty",
            penalty=0.1, polish_steps=3, polish_method="dense-rev", polish_candidates=2)),
        "bundled-project-cg": _case(_bundled, bundled, PRESETS["authors"].replace(
            **small, typical_set="project", polish_steps=3, polish_method="cg", polish_cg_iters=5)),
        "bundled-mae": _case(_bundled, bundled, PRESETS["authors"].replace(**small), metric="mae"),
        "bundled-ssim": _case(_bundled, bundled, PRESETS["authors"].replace(**{**small, "steps": 40}), metric="ssim"),
        "bundled-tone": _case(_bundled, bundled, PRESETS["authors"].replace(**small, polish_steps=3), metric="mse-tone"),
        "dcgan64-default-threshold": _case(
            lambda: _zoo("dcgan64-photos"),
            lambda: torch.cat([_own(_zoo("dcgan64-photos"), 2, 5), _photo_real(1)]), "default", stop_below=1e-4),
        "onestep-default": _case(
            lambda: _zoo("onestep-fmnist"), lambda: torch.cat([_own(_zoo("onestep-fmnist"), 2, 7), _fmnist_real(1)]),
            onestep),
        "onestep-default-threshold": _case(
            lambda: _zoo("onestep-fmnist"), lambda: torch.cat([_own(_zoo("onestep-fmnist"), 2, 7), _fmnist_real(1)]),
            onestep, stop_below=3e-6),
        "condgan-search": _case(
            lambda: _zoo("condgan-fmnist"), lambda: torch.cat([_own(_zoo("condgan-fmnist"), 2, 3), _fmnist_real(1)]),
            PRESETS["authors"].replace(**{**small, "restarts": 2}, polish_steps=2, polish_method="dense-rev")),
        "ddim-stagewise": _case(
            lambda: _zoo("ddim-fmnist"), lambda: _own(_zoo("ddim-fmnist"), 1, 2),
            PRESETS["stagewise"].replace(polish_steps=10)),
    }


def _digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().cpu().float().contiguous().numpy().tobytes()).hexdigest()[:16]


def run_case(case: dict) -> dict:
    """Invert one case on one CPU thread and return what is pinned."""
    from ronan_fast.inversion import invert

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model, images = case["model"](), case["images"]()
        res = invert(model, images, settings=case["settings"], seed=0, **case["kwargs"])
    finally:
        torch.set_num_threads(threads)
    return {
        "loss": [float(v).hex() for v in res.loss.tolist()],
        "row_steps": [int(v) for v in res.row_steps.tolist()],
        "inputs": [_digest(v) for v in res.inputs],
        "reconstruction": [_digest(v) for v in res.reconstruction],
    }


def record(names: list[str] | None = None) -> None:
    """(Re)record this environment's cases: all of them, or ``names`` in its existing record."""
    table, env = cases(), environment()
    unknown = sorted(set(names or ()) - set(table))
    if unknown:
        raise SystemExit(f"no such case: {', '.join(unknown)} (cases: {', '.join(sorted(table))})")
    saved = records()
    mine = recorded(env, saved) if names else {}
    if mine is None:
        raise SystemExit(f"{PINS} holds no record of {env}: record all cases")
    for name in names or list(table):
        print(f"recording {name} ...", flush=True)
        mine[name] = run_case(table[name])
    saved = [rec for rec in saved if rec["environment"] != env] + [{"environment": env, "cases": mine}]
    PINS.parent.mkdir(parents=True, exist_ok=True)
    tmp = PINS.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"records": saved}, indent=1) + "\n")
    tmp.replace(PINS)
    print(f"wrote {PINS} ({len(saved)} environment(s))")


if __name__ == "__main__":
    record(sys.argv[1:] or None)
