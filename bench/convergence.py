"""Convergence benchmark: does every image a model generated invert back to (almost) zero loss?

For each generator: draw ``--n`` images with it, invert them with each candidate setting, and
invert ``--n-real`` held-out real images of the model's data with the same setting. Report

* the convergence rate: the share of generated images whose best MSE is under 1% of the
  median MSE of the real images;
* the generated images' loss quantiles (50, 90, 99, max) and the real images' median;
* sigma/mu of the generated losses (the belonging profile's spread) on the linear and log scale;
* the overlap: the share of real images whose loss is below the worst generated image's;
* wall time per image, and the authors' single-start loop's time per image on the same
  machine (measured on ``--authors-images`` images in the same run).

With ``--to-verdict`` each generated image stops once under the convergence line, as
attribution stops an image once under the belonging threshold (``invert(stop_below=...)``): the
convergence rate is the same, the time is the time to a settled verdict.

Usage::

    python -m bench.convergence --generators default --n 200 --n-real 100 \
        --candidates authors,default --out bench/results/convergence_cpu.md
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from pathlib import Path

import torch

from bench import generators as G
from bench.baselines import authors_loop
from bench.machine import machine
from ronan_fast.evaluation.store import write_text
from ronan_fast.inversion import FALLBACK_DEFAULT, PRESETS, InversionSettings, invert, resolve_settings

#: Candidate settings compared by the benchmark. "authors" is the paper's loop, batched.
CANDIDATES: dict[str, dict] = {
    "authors": {"settings": "authors"},
    "default": {"settings": "default"},
    # the GAN family default before 24 starts (8 starts halved every 100 steps, no escalation)
    "gan-8-starts": {"settings": "gan-8-starts"},
    # multi-step samplers inverted step by step (ronan_fast.inversion.stagewise); others end to end
    "stagewise": {"settings": "stagewise"},
    "r4-cos": dict(steps=1500, lr=0.1, restarts=4, schedule="cosine"),
    "r16-halve": dict(steps=1500, lr=0.1, restarts=16, schedule="cosine", halving_every=100, halving_keep=0.5,
                      min_rows=2),
    "r16-halve-proj": dict(steps=1500, lr=0.1, restarts=16, schedule="cosine", halving_every=100,
                           halving_keep=0.5, min_rows=2, typical_set="project"),
    "r8-halve-lm": dict(steps=1000, lr=0.1, restarts=8, schedule="cosine", halving_every=100, halving_keep=0.5,
                        min_rows=2, polish_steps=10),
    # = FAMILY_DEFAULTS["gan"] less its plateau stop
    "r8-halve-lm25": dict(steps=600, lr=0.1, restarts=8, schedule="cosine", halving_every=100, halving_keep=0.5,
                          min_rows=2, polish_steps=25),
    "r8-halve-lm40": dict(steps=400, lr=0.1, restarts=8, schedule="cosine", halving_every=80, halving_keep=0.5,
                          min_rows=2, polish_steps=40),
    # the default of families without one of their own (vae, conditional, diffusion)
    "fallback": dataclasses.asdict(FALLBACK_DEFAULT),
    # ... with the matrix-free polish (for latents as wide as the image)
    "fallback-cg60": {**dataclasses.asdict(FALLBACK_DEFAULT), "polish_steps": 60, "polish_method": "cg",
                      "polish_cg_iters": 20},
    # 300 Adam steps, then 20 nearly exact polish steps (100 CG iterations each)
    "adam300-cg20x100": dict(steps=300, lr=0.1, restarts=8, schedule="cosine", min_lr_frac=0.01, halving_every=50,
                             halving_keep=0.5, min_rows=2, patience=300, polish_steps=20, polish_method="cg",
                             polish_cg_iters=100),
    # the second "consistency" default: 20 nearly exact polish steps, no plateau rule
    "cg20x100": dict(steps=600, lr=0.1, restarts=8, schedule="cosine", min_lr_frac=0.01, halving_every=100,
                     halving_keep=0.5, min_rows=2, patience=300, polish_steps=20, polish_method="cg",
                     polish_cg_iters=100),
    # the third "consistency" default: the plateau-stopped CG polish (a row leaves once its loss
    # fell by less than 30% over 10 steps) without the GMRES phase before it
    "cg80-plateau": {"settings": "default", "polish_gmres_iters": 0, "polish_min_drop": 0.3,
                     "polish_candidates": 1},
    # ... and with it (30 GMRES iterations a step; square Jacobians only): the fourth default
    "gmres30-cg": {"settings": "default", "polish_gmres_iters": 30, "polish_min_drop": 0.3,
                   "polish_candidates": 1},
    # ... with twice the polish steps (a row still falling by 30% per 10 steps may run to 160)
    "gmres30-cg160": {"settings": "default", "polish_steps": 160, "polish_min_drop": 0.3,
                      "polish_candidates": 1},
    # ... with a looser plateau rule: a row leaves once its loss fell by less than 20% over 10
    # steps; the fifth default
    "gmres30-cg-drop20": {"settings": "default", "polish_gmres_iters": 30, "polish_min_drop": 0.2,
                          "polish_candidates": 1},
    # ... polishing each image's two best Adam rows (starts), the lower result winning; the
    # sixth, now the default
    "gmres30-cg-drop20-c2": {"settings": "default", "polish_gmres_iters": 30, "polish_min_drop": 0.2,
                             "polish_candidates": 2},
    # ... and, run to a verdict (--to-verdict), two more starts polished for each image whose
    # polished starts ended above the line but within 4x of it (its verdict in doubt)
    "default-esc2": {"settings": "default", "polish_escalate": 2},
    # ... one polished start per image, three more for those in doubt
    "c1-esc3": {"settings": "default", "polish_candidates": 1, "polish_escalate": 3},
    # the family default with the Adam phase's generator under bfloat16 autocast (the polish
    # and the final score stay float32): CPUs with AVX512-BF16 run convolutions about 2x faster
    "default-bf16": {"settings": "default", "precision": "bf16"},
    # the GAN default with a shorter Adam phase and a longer polish: with a threshold, the settle
    # rule stops real images' polish early, so the polish can carry more of the convergence
    "gan-adam400-lm40": {"settings": "default", "steps": 400, "halving_every": 80, "patience": 200,
                         "polish_steps": 40},
    "gan-adam300-lm40": {"settings": "default", "steps": 300, "halving_every": 50, "patience": 150,
                         "polish_steps": 40},
    # the GAN default with the matrix-free polish (CG on J^T J, no Jacobian formed) in place of
    # the dense one (100 forward-mode tangents a step for a 100-wide latent)
    "gan-cg20": {"settings": "default", "polish_method": "cg", "polish_cg_iters": 20},
    "gan-cg40": {"settings": "default", "polish_method": "cg", "polish_cg_iters": 40},
    # ... 20 CG iterations, and two more polished starts for an image whose verdict is in doubt
    "gan-cg20-esc2": {"settings": "default", "polish_method": "cg", "polish_cg_iters": 20, "polish_escalate": 2},
    # half the GAN default's Adam phase (300 steps halved every 50), a polish of up to 40 steps
    # carrying the rest, and two more polished starts for an image whose verdict is in doubt:
    # with the dense (Levenberg-Marquardt) polish and with the matrix-free one
    "gan-adam300-esc2": {"settings": "default", "steps": 300, "halving_every": 50, "patience": 150,
                         "polish_steps": 40, "polish_escalate": 2},
    "gan-adam300-cg20-esc2": {"settings": "default", "steps": 300, "halving_every": 50, "patience": 150,
                              "polish_steps": 40, "polish_method": "cg", "polish_cg_iters": 20,
                              "polish_escalate": 2},
    # ... a quarter of it (150 Adam steps halved every 25)
    "gan-adam150-cg20-esc2": {"settings": "default", "steps": 150, "halving_every": 25, "patience": 75,
                              "polish_steps": 40, "polish_method": "cg", "polish_cg_iters": 20,
                              "polish_escalate": 2},
    # the 8-start GAN default with three times the starts, halved every 25 steps instead of every
    # 100 (2125 row-steps per image against 2000), and two more polished starts for an image whose
    # verdict is in doubt: on per-start trajectories of the 64x64 DCGAN's hard images
    # (bench/results/start_selection_dcgan64_cpu.md), the start that ends lowest is among the best
    # few by step 25 for all but one. Now the GAN default itself.
    "gan-r24-h25-esc2": {"settings": "default", "restarts": 24, "halving_every": 25, "polish_escalate": 2},
    # ... with a shorter Adam phase (300 or 150 cosine steps; the halving to 2 starts by step 125
    # unchanged) and a polish of up to 40 steps carrying the rest: the shorter phases that lost
    # 6-7 of 200 own images with 8 starts lost them to starts in other basins, which 24 starts
    # halved every 25 steps avoid
    "gan-r24-adam300": {"settings": "default", "restarts": 24, "halving_every": 25, "polish_escalate": 2,
                        "steps": 300, "patience": 150, "polish_steps": 40},
    "gan-r24-adam150": {"settings": "default", "restarts": 24, "halving_every": 25, "polish_escalate": 2,
                        "steps": 150, "patience": 75, "polish_steps": 40},
    # ... over 200 Adam steps, one polished start (seed 1's image 124: 1.0e-5)
    "gan-r24-adam200": {"settings": "default", "restarts": 24, "halving_every": 25, "polish_escalate": 2,
                        "steps": 200, "patience": 100, "polish_steps": 40},
    # ... over 150 steps with each image's two best Adam rows polished, the lower result kept (the
    # one-step default's polish_candidates=2): after 150 steps the start that ends in the right
    # basin is sometimes second by Adam loss (seed 1's image 124: 2.2e-2 with one polished, 2.2e-5 with two)
    "gan-r24-adam150-c2": {"settings": "default", "restarts": 24, "halving_every": 25, "polish_escalate": 2,
                           "steps": 150, "patience": 75, "polish_steps": 40, "polish_candidates": 2},
    # the family default with the settle rule (for families that do not set it: the one-step default)
    "default-settle6": {"settings": "default", "settle_patience": 6},
    # the family default without the settle rule (with a threshold, a polished row levelled off
    # far above it leaves the polish; the GAN default's settle_patience)
    "default-nosettle": {"settings": "default", "settle_patience": 0},
    # ... after half the Adam steps (300, halving every 50): does the polish need 600?
    "adam300-c2": {"settings": "default", "steps": 300, "halving_every": 50, "patience": 150,
                   "polish_gmres_iters": 30, "polish_min_drop": 0.2, "polish_candidates": 2},
    # ... with the exact LM step after GMRES: each open row's Jacobian built in reverse mode
    # (784 vector-Jacobian products, 128 at a time) in place of CG's 100 products per step
    "gmres30-denserev-c2": {"settings": "default", "polish_gmres_iters": 30, "polish_min_drop": 0.2,
                            "polish_candidates": 2, "polish_method": "dense-rev"},
    # the first "consistency" default: many cheap polish steps (60 x 20 CG iterations)
    "cg60x20": dict(steps=600, lr=0.1, restarts=8, schedule="cosine", min_lr_frac=0.01, halving_every=100,
                    halving_keep=0.5, min_rows=2, patience=300, polish_steps=60, polish_method="cg",
                    polish_cg_iters=20),
}


def settings_for(adapter, spec: dict) -> InversionSettings:
    spec = dict(spec)
    base = spec.pop("settings", None)
    if base is None:  # a spec of its own: the paper's loop with the fields it names changed
        return PRESETS["authors"].replace(**spec)
    return resolve_settings(adapter, base, **spec)


def quantiles(x: torch.Tensor) -> dict[str, float]:
    q = torch.quantile(x.double(), torch.tensor([0.5, 0.9, 0.99], dtype=torch.float64))
    return {"p50": float(q[0]), "p90": float(q[1]), "p99": float(q[2]), "max": float(x.max())}


def run_one(bg, settings: InversionSettings, gen_images, real_images, seed: int, to_verdict: bool = False,
            line: float | None = None) -> dict:
    """Invert the generated and the real images with ``settings``; with ``to_verdict`` the real
    images go first and each generated image stops once under the convergence line (1% of their
    median), as an image stops once under the belonging threshold when attributing. With
    ``line`` (and ``to_verdict``) the convergence line is given, and every image, real ones
    too, is inverted with it as its threshold, as attribution inverts every image it is given."""
    t0 = time.perf_counter()
    res_r = invert(bg.adapter, real_images, settings=settings, seed=seed + 1,
                   stop_below=line if to_verdict else None)
    t_real = time.perf_counter() - t0
    r = res_r.loss.double().cpu()
    real_median = float(r.median())
    thr = 0.01 * real_median if line is None else line
    t0 = time.perf_counter()
    res_g = invert(bg.adapter, gen_images, settings=settings, seed=seed, stop_below=thr if to_verdict else None)
    t_gen = time.perf_counter() - t0
    g = res_g.loss.double().cpu()
    logg = torch.log(g.clamp_min(1e-30))
    return {
        "converged": float((g < thr).double().mean()),
        "n_failed": int((g >= thr).sum()),
        **{f"gen_{k}": v for k, v in quantiles(g).items()},
        "real_median": real_median,
        "real_min": float(r.min()),
        "sigma_over_mu": float(g.std() / g.mean()),
        "log_sigma": float(logg.std()),
        "overlap": float((r <= g.max()).double().mean()),
        "s_per_image": (t_gen + t_real) / (g.numel() + r.numel()),
        "s_per_gen_image": t_gen / g.numel(),
        "s_per_real_image": t_real / r.numel(),
        "to_verdict": to_verdict,
        "line": thr,
        "row_steps_per_image": float(torch.cat([res_g.row_steps, res_r.row_steps]).double().mean()),
        "gen_losses": g.tolist(),
        "real_losses": r.tolist(),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--generators", default="default", help="comma-separated: default and/or zoo names")
    p.add_argument("--candidates", default="authors,default", help=f"comma-separated from {sorted(CANDIDATES)}")
    p.add_argument("--n", type=int, default=200, help="generated images per generator")
    p.add_argument("--n-real", type=int, default=100, help="held-out real images per generator")
    p.add_argument("--authors-images", type=int, default=4, help="images timed with the authors' loop (0: skip)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    p.add_argument("--out", type=Path, default=None,
                   help="Markdown table; a .json with all losses is written beside it after every row, and "
                        "a loss histogram per generator (OUT_STEM-GENERATOR.png: generated vs real, one panel per candidate)")
    p.add_argument("--resume", action="store_true", help="keep the rows already in --out's .json and run only the rest")
    p.add_argument("--to-verdict", action="store_true",
                   help="invert the real images first and stop each generated image once its loss is under the "
                        "convergence line (1%% of the real images' median), as attribution stops an image once "
                        "under the belonging threshold: the same convergence, the time to a settled verdict; the "
                        "generated images' quantiles then stop at the line")
    p.add_argument("--line", type=float, default=None,
                   help="with --to-verdict: the convergence line itself (a belonging profile's threshold, say) "
                        "instead of 1%% of the real images' median; every image, real ones too, is then inverted "
                        "with it as its threshold, as attribution inverts every image it is given")
    p.add_argument("--fold-bn", action="store_true",
                   help="invert with a copy of each generator whose eval-mode BatchNorms are folded into its "
                        "convolutions (ronan_fast.fold_batchnorm); the authors' loop keeps the generator as it is")
    p.add_argument("--channels-last", action="store_true",
                   help="invert with a copy of each generator in channels-last memory format (ronan_fast.channels_last)")
    a = p.parse_args(argv)
    if a.line is not None and not (a.to_verdict and math.isfinite(a.line) and a.line > 0):
        p.error(f"--line must be a finite number > 0 and needs --to-verdict, got {a.line} "
                f"{'with' if a.to_verdict else 'without'} --to-verdict")
    if a.threads:
        torch.set_num_threads(a.threads)
    names = [c for c in a.candidates.split(",") if c]
    for c in names:
        if c not in CANDIDATES:
            p.error(f"--candidates: unknown {c!r}; choose from {sorted(CANDIDATES)}")
    rows: list[dict] = []
    raw = {"machine": machine(), "args": {k: str(v) for k, v in vars(a).items()}, "results": rows}
    json_out = a.out.with_suffix(".json") if a.out else None
    if a.resume:
        if not (json_out and json_out.is_file()):
            p.error("--resume needs --out whose .json exists")
        old = json.loads(json_out.read_text())
        keep = ("n", "n_real", "seed", "authors_images", "to_verdict", "line", "fold_bn", "channels_last")
        was = {k: str(v) for k, v in {"to_verdict": False, "line": None, "fold_bn": False,
                                      "channels_last": False}.items()}  # written before these options existed
        if any(old["args"].get(k, was.get(k)) != raw["args"][k] for k in keep):
            p.error(f"--resume: {json_out} was written with other {keep}: {old['args']}")
        raw["results"] = rows = old["results"]
    for gname in [g for g in a.generators.split(",") if g]:
        bg = G.get(gname)
        gen = G.generated(bg, a.n, seed=10_000 + a.seed)
        real = bg.real(a.n_real)
        authors_s = float("nan")
        if a.authors_images:
            t0 = time.perf_counter()
            authors_loop(bg.adapter, gen[: a.authors_images], steps=1500, lr=0.1, restarts=1, seed=a.seed)
            authors_s = (time.perf_counter() - t0) / a.authors_images
        for cname in names:
            if any(r["generator"] == gname and r["candidate"] == cname for r in rows):
                continue
            s = settings_for(bg.adapter, CANDIDATES[cname])
            print(f"[{gname}] {cname}: {s}", file=sys.stderr, flush=True)
            inverted = dataclasses.replace(bg, adapter=G.transformed(bg.adapter, a.fold_bn, a.channels_last))
            r = run_one(inverted, s, gen, real, a.seed, to_verdict=a.to_verdict, line=a.line)
            r.update(generator=gname, candidate=cname, settings=s.to_dict(), authors_s_per_image=authors_s)
            rows.append(r)  # raw["results"] is rows
            if json_out:  # after every row: an interrupted run keeps what it finished
                write_text(json_out, json.dumps(raw, indent=1))
            print(
                f"[{gname}] {cname}: converged {r['converged']:.1%}, gen p50 {r['gen_p50']:.2e} max "
                f"{r['gen_max']:.2e}, real median {r['real_median']:.2e}, {r['s_per_image']:.3f} s/img "
                f"(authors {authors_s:.3f})",
                file=sys.stderr, flush=True,
            )
    table = render(rows, raw["machine"], a)
    print(table)
    if a.out:
        write_text(a.out, table)  # the JSON was written after every row
        for gname in dict.fromkeys(r["generator"] for r in rows):
            path = a.out.with_name(f"{a.out.stem}-{gname}.png")
            histograms([r for r in rows if r["generator"] == gname], path)
            print(f"wrote {path}", file=sys.stderr)
    return 0


def histograms(rows: list[dict], path: Path) -> None:
    """Loss histograms of generated against real images, one panel per candidate (log x axis)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from ronan_fast.evaluation.report import _save_fig

    allv = np.concatenate([np.asarray(r["gen_losses"] + r["real_losses"], dtype=np.float64) for r in rows])
    pos = allv[allv > 0]
    floor = pos.min() / 2 if pos.size else 1e-12
    bins = np.geomspace(floor, max(allv.max(), floor * 10) * 1.0001, 41)
    fig, axes = plt.subplots(len(rows), 1, figsize=(6.4, 1.9 * len(rows) + 0.6), sharex=True, squeeze=False)
    for ax, r in zip(axes[:, 0], rows):
        g = np.maximum(np.asarray(r["gen_losses"]), floor)
        q = np.maximum(np.asarray(r["real_losses"]), floor)
        ax.hist(g, bins=bins, alpha=0.6, color="tab:blue", label=f"generated ({g.size})")
        ax.hist(q, bins=bins, alpha=0.6, color="tab:orange", label=f"real ({q.size})")
        ax.axvline(0.01 * r["real_median"], color="k", linestyle=":", label="1% of real median")
        ax.set_title(f"{r['generator']} / {r['candidate']}: converged {r['converged']:.1%}", fontsize=9)
        ax.set_ylabel("images")
        ax.legend(fontsize=7)
    axes[-1, 0].set_xscale("log")
    axes[-1, 0].set_xlabel("reconstruction MSE (loss 0 drawn at the left edge)")
    fig.tight_layout()
    _save_fig(fig, path)
    plt.close(fig)


def render(rows: list[dict], mach: dict, a) -> str:
    head = (
        f"Convergence benchmark ({mach['device']}, {mach['cpu_count']} cores, {mach['threads']} threads, "
        f"torch {mach['torch']}, Python {mach['python']}); {a.n} generated + {a.n_real} real images per "
        f"generator, seed {a.seed}. "
        + ("Converged: best MSE < 1% of the real images' median MSE.\n" if a.line is None else
           f"Converged: best MSE < {a.line:.3g}, the line given (`--line`).\n")
    )
    if a.to_verdict and a.line is not None:
        head += ("To verdict (`--to-verdict --line`): every image, generated or real, stopped once under the "
                 "line, as attribution stops an image once under its belonging threshold (the settle rule and "
                 "escalation act with it); s/img is over generated and real images together, own and real "
                 "each alone.\n")
    elif a.to_verdict:
        head += ("To verdict (`--to-verdict`): the real images were inverted first, and each generated image "
                 "stopped once under the convergence line, so the generated images' quantiles stop there; "
                 "s/img is over generated and real images together, own and real each alone.\n")
    ways = [w for w, on in (("BatchNorms folded", getattr(a, "fold_bn", False)),
                            ("channels-last", getattr(a, "channels_last", False))) if on]
    if ways:
        head += f"Inverted with a copy of each generator: {', '.join(ways)} (the authors' loop: as it is).\n"
    head += "\n"
    cols = ["generator", "candidate", "converged", "gen p50", "gen p90", "gen p99", "gen max", "real median",
            "overlap", "sigma/mu", "log sigma", "s/img", "own s/img", "real s/img", "authors s/img", "time ratio"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        ratio = r["s_per_image"] / r["authors_s_per_image"] if math.isfinite(r["authors_s_per_image"]) else float("nan")
        lines.append(
            f"| {r['generator']} | {r['candidate']} | {r['converged']:.1%} | {r['gen_p50']:.2e} | {r['gen_p90']:.2e} "
            f"| {r['gen_p99']:.2e} | {r['gen_max']:.2e} | {r['real_median']:.2e} | {r['overlap']:.1%} "
            f"| {r['sigma_over_mu']:.2f} | {r['log_sigma']:.2f} | {r['s_per_image']:.3f} "
            f"| {r.get('s_per_gen_image', float('nan')):.3f} | {r.get('s_per_real_image', float('nan')):.3f} "
            f"| {r['authors_s_per_image']:.3f} | {ratio:.2f} |"
        )
    return head + "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
