"""How to spend the matrix-free polish's budget: many cheap steps or few nearly exact ones?

Each step of ``polish_method="cg"`` costs ``2 * cg_iters + 2`` generator passes. This probe
starts from one Adam inversion (the model family's default without its polish) of ``--n``
images the model generated and ``--n`` held-out real images, then runs the polish with each
``CG_ITERS:STEPS`` pair (pick pairs of equal total passes) and prints, at a quarter, half,
three quarters and the end of each run, the generated images' median and worst MSE against the
real images' lowest and median: the gap between "worst own image" and "best real image" is
what the belonging test needs. Run: ``python -m bench.polish_probe [--generator onestep-fmnist]
[--n 8] [--pairs 10:240,40:66,100:27,200:14] [--out FILE.md]``.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time

import torch

from bench import generators as G
from bench.report import finish
from ronan_fast.inversion import _polish_cg, invert, resolve_settings


def _pairs(text: str) -> list[tuple[int, int]]:
    out = []
    for part in text.split(","):
        cg, _, steps = part.partition(":")
        out.append((int(cg), int(steps)))
        if out[-1][0] < 1 or out[-1][1] < 1:
            raise ValueError(part)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--generator", default="onestep-fmnist", help="a zoo name or 'default' (default: %(default)s)")
    p.add_argument("--n", type=int, default=8, help="generated and real images each (default: %(default)s)")
    p.add_argument("--adam-steps", type=int, default=300, help="Adam steps before the polish (default: %(default)s)")
    p.add_argument("--pairs", default="10:240,40:66,100:27,200:14",
                   help="comma-separated CG_ITERS:STEPS runs of the polish (default: %(default)s)")
    p.add_argument("--seed", type=int, default=5)
    p.add_argument("--out", help="also write the report (Markdown) here")
    a = p.parse_args(argv)
    if a.n < 1 or a.adam_steps < 1:
        p.error("--n and --adam-steps must be at least 1")
    try:
        pairs = _pairs(a.pairs)
    except ValueError as e:
        p.error(f"--pairs must be CG_ITERS:STEPS pairs of positive integers, got {a.pairs!r} ({e})")
    bg = G.get(a.generator)
    ad = bg.adapter
    gen = G.generated(bg, a.n, seed=a.seed)
    real = bg.real(a.n + 40)[40:]  # not the convergence benchmark's first real images
    images = torch.cat([gen, real])
    adam = resolve_settings(ad, "default", polish_steps=0, steps=a.adam_steps,
                            halving_every=max(1, a.adam_steps // 6))
    t0 = time.perf_counter()
    res = invert(ad, images, settings=adam, seed=0)
    lines = [
        f"Polish budget probe ({bg.name}; {platform.machine()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, Python {platform.python_version()}); {a.n} generated + {a.n} "
        f"real images ({bg.data}), seed {a.seed}. MSE in [0, 1] units.",
        "",
        f"Start: {adam.restarts} starts x {adam.steps} Adam steps (cosine, halving every {adam.halving_every}): "
        f"generated median {res.loss[:a.n].median():.1e}, real median {res.loss[a.n:].median():.1e} "
        f"({time.perf_counter() - t0:.0f} s).",
        "",
        "| CG iterations | step | generator passes per image | generated median | generated worst | real lowest "
        "| real median | worst own / lowest real | s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    print("\n".join(lines), flush=True)
    target = ad.from_unit(images)
    scale = (ad.output_range[1] - ad.output_range[0]) ** 2  # raw residual -> [0, 1] MSE
    for cg, steps in pairs:
        t1 = time.perf_counter()
        marks = {max(1, round(steps * f)) for f in (0.25, 0.5, 0.75, 1.0)}

        def report(k, mse, cg=cg, marks=marks, t1=t1):
            if k in marks:
                m = mse / scale
                g, r = m[: a.n], m[a.n:]
                lines.append(f"| {cg} | {k} | {k * (2 * cg + 2)} | {g.median():.1e} | {g.max():.1e} | {r.min():.1e} | "
                             f"{r.median():.1e} | {g.max() / r.min():.2f} | {time.perf_counter() - t1:.0f} |")
                print(lines[-1], flush=True)

        _polish_cg(ad, res.inputs, None, target, "mse", steps, cg_iters=cg, report=report)
    lines += ["", "A row that the polish solves or gives up on stops early; its last value is kept."]
    finish(lines, "bench.polish_probe", argv, a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
