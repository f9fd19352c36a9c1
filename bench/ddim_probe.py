"""Two ways to invert the DDIM sampler that Adam alone does not solve, measured on generated and real images.

The zoo's 6-step DDIM sampler (``ddim-fmnist``) is the one generator on which no inversion
setting converges (``bench/results/convergence_cpu_ddim.md``). This probe measures the two
remedies usually proposed, on the model's own images (whose true noise is known) and on held-out
real images:

1. **DDIM inversion as a start**: run the deterministic sampler backwards, solving each step
   for its input by fixed-point iteration (``k`` iterations per step), and decode the result.
2. **Matrix-free Gauss-Newton polish**: after the package's default inversion, Levenberg-Marquardt
   steps whose normal equations ``(J^T J + lam I) d = -J^T r`` are solved by conjugate gradients
   with Jacobian-vector and vector-Jacobian products (no 784 x 784 Jacobian is formed).

It prints the reconstruction MSE (in [0, 1] units) of generated and real images after each, so
the question "does the remedy make the model's own images converge, and only them?" is answered
by measurement. Run: ``python -m bench.ddim_probe [--n 4] [--out FILE.md]``.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time

import torch

from bench import generators as G
from bench.report import finish, int_list
from ronan_fast.inversion import _polish_cg, invert


def fixed_point_inversion(sampler, x0: torch.Tensor, iters: int) -> torch.Tensor:
    """x_T whose DDIM sampling gives x0, each step's input found by ``iters`` fixed-point iterations."""
    x = x0
    with torch.no_grad():
        for i in reversed(range(sampler.steps)):
            a, ap = sampler.alpha_t[i], sampler.alpha_prev[i]
            t = sampler.timesteps[i].expand(x.shape[0])
            xt = (a / ap).sqrt() * x
            for _ in range(iters):
                eps = sampler.unet(xt, t)
                # the step maps x_t to sqrt(ap) x0(x_t) + sqrt(1 - ap) eps(x_t) = x: solve for x_t
                xt = (a / ap).sqrt() * (x - (1 - ap).sqrt() * eps) + (1 - a).sqrt() * eps
            x = xt
    return x


class _Decoder:
    """A decode function seen as a generator (``decode_raw(z, cond)``) by the package's polish."""

    def __init__(self, fn):
        self.fn = fn

    def decode_raw(self, z, cond=None):
        return self.fn(z)


def gauss_newton_cg(decode, z: torch.Tensor, target: torch.Tensor, iters: int, cg_iters: int, report):
    """The package's matrix-free Levenberg-Marquardt polish (``polish_method="cg"``) on ``decode``;
    calls ``report(k, mse_per_row)`` after each step it runs."""
    return _polish_cg(_Decoder(decode), z, None, target, "mse", iters, cg_iters=cg_iters, report=report)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=4, help="generated and real images each (default 4)")
    p.add_argument("--fp-iters", default="1,5,20,50", help="fixed-point iterations per step to try")
    p.add_argument("--gn-iters", type=int, default=30, help="Gauss-Newton steps after the default inversion")
    p.add_argument("--cg-iters", type=int, default=20, help="conjugate-gradient iterations per Gauss-Newton step")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--out", help="also write the report (Markdown) here")
    a = p.parse_args(argv)
    if a.n < 1:
        p.error(f"--n must be at least 1, got {a.n}")
    fp_iters = int_list(p, "--fp-iters", a.fp_iters)
    bg = G.get("ddim-fmnist")
    ad = bg.adapter
    sampler = ad.modules()[0]
    z_true = ad.sample_latents(a.n, torch.Generator().manual_seed(a.seed))
    with torch.no_grad():
        gen = ad.to_unit(ad.decode_raw(z_true))
    real = bg.real(a.n)
    d = z_true.shape[1]
    lines = [
        f"DDIM inversion probe (ddim-fmnist; {platform.machine()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, Python {platform.python_version()}); {a.n} generated + {a.n} "
        f"real images (held-out {bg.data}), seed {a.seed}. MSE in [0, 1] units, median (max) over images.",
        "",
        "1. Fixed-point DDIM inversion as the answer (no optimisation after it):",
        "",
        "| iterations per step | generated MSE | real MSE | generated: distance to true noise / sqrt(d) | s |",
        "|---|---|---|---|---|",
    ]

    def mse(x_raw, images):
        return (ad.to_unit(x_raw) - images).square().flatten(1).mean(1)

    def fmt(v):
        return f"{v.median():.2e} ({v.max():.2e})"

    for k in fp_iters:
        t0 = time.perf_counter()
        zg = fixed_point_inversion(sampler, ad.from_unit(gen), k).flatten(1)
        zr = fixed_point_inversion(sampler, ad.from_unit(real), k).flatten(1)
        with torch.no_grad():
            mg, mr = mse(ad.decode_raw(zg), gen), mse(ad.decode_raw(zr), real)
        dist = (zg - z_true).norm(dim=1) / d**0.5
        lines.append(f"| {k} | {fmt(mg)} | {fmt(mr)} | {dist.median():.3f} | {time.perf_counter() - t0:.1f} |")
        print(lines[-1], flush=True)

    lines += ["", "2. The package's default inversion, then matrix-free Gauss-Newton "
              f"({a.cg_iters} CG iterations per step):", "",
              "| after | generated MSE | real MSE | s (all images) |", "|---|---|---|---|"]
    images = torch.cat([gen, real])
    t0 = time.perf_counter()
    res = invert(ad, images, seed=0)
    lines.append(f"| default inversion ({res.settings.restarts} starts, {res.settings.steps} steps) | "
                 f"{fmt(res.loss[:a.n])} | {fmt(res.loss[a.n:])} | {time.perf_counter() - t0:.0f} |")
    print(lines[-1], flush=True)

    def report(k, per_row):
        if k % 10 == 0 or k == a.gn_iters:
            lines.append(f"| + {k} Gauss-Newton steps | {fmt(per_row[:a.n] / 4)} | {fmt(per_row[a.n:] / 4)} | "
                         f"{time.perf_counter() - t0:.0f} |")
            print(lines[-1], flush=True)

    # raw outputs are in [-1, 1]: squared raw error / 4 is the [0, 1] MSE
    gauss_newton_cg(ad.decode_raw, res.inputs.clone(), ad.from_unit(images), a.gn_iters, a.cg_iters, report)
    finish(lines, "bench.ddim_probe", argv, a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
