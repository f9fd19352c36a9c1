"""Traces of a StyleGAN-style generator's search over ``w`` alone, and of the solve for ``z`` after it.

The mapping start (:mod:`ronan_fast.mapping_start`) finds each image's first start in two steps:
the search over ``w`` (``MappingStart.search_w``), then the solve for ``z`` with ``mapping(z)``
at that ``w`` (``MappingStart.solve_z``). ``python -m bench.heldout`` measures the whole inversion
to the verdict; this benchmark measures the two steps apart, on more images for the time, so that
a change to the search over ``w`` can be judged where it acts:

1. ``--n`` of the generator's own images (from seed ``10000 + --seed``, as ``bench.heldout``
   draws them), rounded to 8 bits;
2. the convergence line of ``bench.heldout``: 1% of the authors' loop's median loss over
   ``--n-real`` real images (run here, one image at a time);
3. each candidate's search over ``w`` on all the own images at once, then the solve for ``z`` of
   each, and the loss of ``z``'s image.

Reported per candidate: images whose search over ``w`` ended at the 8-bit floor (loss under
:data:`FLOOR`: the rounding alone leaves about 1.3e-6), the ``z`` solved at the floor and under
the line, the worst image over ``w`` and over ``z``, and seconds per image of each step (one
process, ``--threads`` threads). Every loss is in the ``.json`` beside the table.

Usage::

    python -m bench.wsearch --generator stylegan64-opencv --seed 10000 --n 32 \\
        --candidates enc-w24,enc-white,plain-w24,plain-white --encoders runs/enc --threads 1 \\
        --out bench/results/wsearch_stylegan64-opencv.md
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from bench.heldout import ENCODER_RECIPE, authors_run, cached_encoder, own_images, real_images, round8
from bench.machine import machine
from ronan_fast.evaluation.store import write_text

#: the 8-bit floor, as ``bench.heldout``'s tables count it: an own image's rounding to 8 bits
#: alone leaves about 1.3e-6 (``1 / (12 * 255^2)`` per pixel, less at clipped pixels)
FLOOR = 2e-6

#: candidates: ``w_encoder`` starts the search at the encoder of ``w``'s guess (``ENCODER_RECIPE``
#: of ``bench.heldout``, kept in ``--encoders``); ``w_space`` is ``MappingStart``'s (the search in
#: ``w`` itself, or in whitened coordinates); the other keys replace fields of ``W_SETTINGS``
#: (``polish_reuse`` is 0 unless a candidate names it: these were measured before it existed)
CANDIDATES: dict[str, dict] = {
    "enc-w24": {"w_encoder": True, "w_space": "w"},
    "enc-w48": {"w_encoder": True, "w_space": "w", "restarts": 48},
    "enc-w24-screen8": {"w_encoder": True, "w_space": "w", "screen": 8},
    "enc-white": {"w_encoder": True, "w_space": "whitened"},
    "enc-white-w12": {"w_encoder": True, "w_space": "whitened", "restarts": 12},
    "plain-w24": {"w_encoder": False, "w_space": "w"},
    "plain-w48": {"w_encoder": False, "w_space": "w", "restarts": 48},
    "plain-w24-screen8": {"w_encoder": False, "w_space": "w", "screen": 8},
    "plain-white": {"w_encoder": False, "w_space": "whitened"},
    "plain-white-w12": {"w_encoder": False, "w_space": "whitened", "restarts": 12},
}
#: the candidates' keys that are not fields of ``W_SETTINGS``
_START_KEYS = ("w_encoder", "w_space")


def run_candidate(adapter, name: str, spec: dict, own: torch.Tensor, enc_dir: Path | None, encoders: dict) -> dict:
    """One candidate's search over ``w`` and solve for ``z`` on ``own``: every loss and both steps' times."""
    from ronan_fast.mapping_start import W_SETTINGS, mapping_start, train_w_encoder

    spec = dict(spec)
    use_encoder = spec.pop("w_encoder", False)
    w_space = spec.pop("w_space", "whitened")
    settings = W_SETTINGS.replace(**{"polish_reuse": 0, **spec})  # no chord steps unless named, as first measured
    start = mapping_start(adapter, w_settings=settings, w_space=w_space)
    if use_encoder:
        enc = cached_encoder(f"{name}.w", start.w_generator, encoders, enc_dir,
                              lambda: train_w_encoder(start, **ENCODER_RECIPE))
        start = start.with_w_encoder(enc)
    t = time.perf_counter()
    found = start.search_w(own)
    w_s = time.perf_counter() - t
    t = time.perf_counter()
    z = start.solve_z(found.inputs, own)
    z_s = time.perf_counter() - t
    with torch.no_grad():
        zl = (adapter.decode(z.view(z.shape[0], *adapter.latent_shape)) - own).square().flatten(1).mean(1)
    return {"w_settings": settings.to_dict(), "w_encoder": bool(use_encoder), "w_space": w_space,
            "w_losses": found.loss.double().tolist(), "z_losses": zl.double().tolist(),
            "w_s": w_s, "z_s": z_s}


def render(raw: dict) -> str:
    a, m = raw["args"], raw["machine"]
    line = raw["line"]
    n = int(a["n"])
    out = [
        f"# The search over `w` alone: {a['generator']}",
        "",
        f"Machine: {m['machine']}, {m['cpu_count']} cores (shared), {m['threads']} torch thread(s), torch "
        f"{m['torch']}, Python {m['python']}, CPU only. Command: `{raw['command']}`.",
        "",
        f"{n} own images (generated from seed {10_000 + int(a['seed'])}, rounded to 8 bits). Each candidate's "
        "search over `w` (`MappingStart.search_w`, `W_SETTINGS` with the candidate's changes, from the encoder "
        "of `w`'s guess where it has one) on all of them at once, then the solve for `z` "
        f"(`MappingStart.solve_z`) of each. **At the floor**: loss under {FLOOR:.0e} (8-bit rounding alone leaves "
        f"about 1.3e-6). **Line** = {line:.2e}, 1% of the authors' loop's median loss over {a['n_real']} real "
        "images (as `bench.heldout` draws it). Seconds per image of each step, wall clock.",
        "",
        "| candidate | changes to W_SETTINGS; starts; coordinates | w at the floor | worst w | z at the floor | z under the line "
        "| worst z (x line) | s/img over w | s/img solve for z |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for cname, r in raw["candidates"].items():
        spec = {k: v for k, v in raw["specs"][cname].items() if k not in _START_KEYS}
        change = ", ".join(f"{k}={v}" for k, v in spec.items()) or "none"
        start = ("encoder of w" if r["w_encoder"] else "mapping draws") + f"; in {r['w_space']}"
        wl, zl = r["w_losses"], r["z_losses"]
        out.append(
            f"| {cname} | {change}; {start} | {sum(v < FLOOR for v in wl)}/{n} | {max(wl):.2e} "
            f"| {sum(v < FLOOR for v in zl)}/{n} | {sum(v < line for v in zl)}/{n} "
            f"| {max(zl):.2e} ({max(zl) / line:.3g}x) | {r['w_s'] / n:.2f} | {r['z_s'] / n:.2f} |")
    names = list(raw["candidates"])
    if len(names) > 1:
        out += ["", "Images whose search over `w` ended above the floor (index: loss over `w`):", ""]
        for cname in names:
            wl = raw["candidates"][cname]["w_losses"]
            miss = [f"{k}: {v:.1e}" for k, v in enumerate(wl) if v >= FLOOR]
            out.append(f"* {cname}: {', '.join(miss) if miss else 'none'}")
    return "\n".join(out) + "\n"


#: arguments a resumed run must share with the run it continues
_SAME = ("generator", "n", "n_real", "seed")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--generator", required=True, help="a zoo generator with a mapping network (e.g. stylegan64-opencv)")
    p.add_argument("--candidates", default="enc-w24", help=f"comma-separated from {sorted(CANDIDATES)}")
    p.add_argument("--n", type=int, default=32, help="own images")
    p.add_argument("--n-real", type=int, default=4, help="real images for the convergence line")
    p.add_argument("--seed", type=int, default=10000, help="own images from seed 10000 + SEED (bench.heldout's draw)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--encoders", type=Path, default=None, help="folder to keep and reuse trained encoders of w in")
    p.add_argument("--out", type=Path, required=True, help="Markdown table; the .json beside it has every loss")
    p.add_argument("--resume", action="store_true", help="keep the candidates --out's .json holds and run the rest")
    p.add_argument("--render", action="store_true", help="only write --out again from the .json beside it")
    a = p.parse_args(argv)
    json_out = a.out.with_suffix(".json")
    if a.render:
        write_text(a.out, render(json.loads(json_out.read_text())))
        return 0
    for flag, v in (("--n", a.n), ("--n-real", a.n_real), ("--threads", a.threads)):
        if v < 1:
            p.error(f"{flag} must be at least 1, got {v}")
    names = [c for c in a.candidates.split(",") if c]
    bad = [c for c in names if c not in CANDIDATES]
    if bad or not names:
        p.error(f"--candidates: unknown {bad or a.candidates!r}; choose from {sorted(CANDIDATES)}")
    from ronan_fast.mapping_start import has_mapping_network
    from ronan_fast.zoo import ZOO, zoo_adapter

    if a.generator not in ZOO:
        p.error(f"--generator: unknown zoo model {a.generator!r}")
    adapter = zoo_adapter(a.generator)
    if not has_mapping_network(adapter):
        p.error(f"--generator: {a.generator} has no mapping network (mapping_net, synthesis, w_dim)")
    torch.set_num_threads(a.threads)
    args = {k: str(v) for k, v in vars(a).items() if k not in ("resume", "render", "out", "candidates")}
    raw = {"machine": machine(), "platform": platform.platform(), "args": args,
           "command": "python -m bench.wsearch " + " ".join(sys.argv[1:] if argv is None else argv),
           "specs": {}, "candidates": {}}
    if a.resume and json_out.is_file():
        old = json.loads(json_out.read_text())
        if {k: old["args"].get(k) for k in _SAME} != {k: args[k] for k in _SAME}:
            p.error(f"--resume: {json_out} was written with other {'/'.join(_SAME)}: {old['args']}")
        raw.update(specs=old["specs"], candidates=old["candidates"], authors_real=old["authors_real"],
                   line=old["line"], command=old["command"] + " ; --resume: " + raw["command"])

    def save() -> None:
        write_text(json_out, json.dumps(raw, indent=1))

    own, _ = own_images(adapter, a.n, 10_000 + a.seed)
    if "authors_real" not in raw:
        real = round8(real_images(a.generator, a.n_real))
        print(f"[{a.generator}] authors' loop on {a.n_real} real images", file=sys.stderr, flush=True)
        raw["authors_real"] = authors_run(adapter, real, 0)
        raw["line"] = 0.01 * statistics.median(raw["authors_real"]["losses"])
        save()
    encoders: dict = {}
    for cname in names:
        if cname in raw["candidates"]:
            continue
        print(f"[{a.generator}] {cname}: {CANDIDATES[cname]}", file=sys.stderr, flush=True)
        raw["specs"][cname] = CANDIDATES[cname]
        raw["candidates"][cname] = run_candidate(adapter, a.generator, CANDIDATES[cname], own, a.encoders, encoders)
        save()
        write_text(a.out, render(raw))
    print(render(raw))
    return 0


if __name__ == "__main__":
    sys.exit(main())
