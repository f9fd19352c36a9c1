"""When should a polished row stop? Per-row loss trajectories of the matrix-free polish, and
plateau rules replayed on them.

The polish's rows are independent (each has its own damping and conjugate-gradient solve), so
stopping a row at step ``k`` leaves it exactly at its step-``k`` loss: a stopping rule can be
judged on recorded trajectories without running the polish again. This tool inverts ``--n``
images the model generated and ``--n`` held-out real images with the family's default Adam
phase (no polish), polishes every row for ``--steps`` steps of ``--cg-iters`` inner
iterations (conjugate gradients, or GMRES alone with ``--method gmres``: the phase that
``polish_gmres_iters`` puts before the CG polish; or, with ``--method dense``, the GAN family's
Levenberg-Marquardt steps on Jacobians built by forward-mode AD), records each row's MSE after every step,
and replays the plateau rule "stop once the loss fell by less than DROP over the last W steps"
(``polish_patience=W``, ``polish_min_drop=DROP``) for each ``--rules W:DROP`` pair and step cap
in ``--caps``. For each it reports the generated
images' median, 90th percentile and worst loss, the real images' lowest and median, the worst
own over the lowest real, and the mean polish steps a generated and a real image take.

Run: ``python -m bench.polish_plateau [--generator onestep-fmnist] [--n 32] [--steps 100]
[--save-trajectories T.json] [--trajectories T.json] [--out FILE.md]``.
``--trajectories`` replays saved trajectories (JSON written by ``--save-trajectories``)
instead of computing them.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time

import torch

from bench import generators as G
from bench.report import finish
from ronan_fast.evaluation.store import write_text
from ronan_fast.inversion import _polish, _polish_cg, _polish_gmres, invert, resolve_settings

DEFAULT_RULES = "5:0.3,5:0.5,8:0.3,10:0.2,10:0.3,10:0.4,15:0.3,15:0.4"


def trajectories(generator: str, n: int, steps: int, cg_iters: int, seed: int, method: str = "cg") -> dict:
    """``{"own": [steps + 1, n], "real": [steps + 1, n], ...}``: row 0 is the Adam phase's loss."""
    bg = G.get(generator)
    ad = bg.adapter
    adam = resolve_settings(ad, "default", polish_steps=0)
    scale = (ad.output_range[1] - ad.output_range[0]) ** 2  # raw residual -> [0, 1] MSE
    out = {"generator": generator, "data": bg.data, "settings": str(adam.to_dict()), "cg_iters": cg_iters,
           "method": method}
    for part, images, inv_seed in (("own", G.generated(bg, n, seed=10_000 + seed), seed),
                                   ("real", bg.real(n), seed + 1)):
        t0 = time.perf_counter()
        res = invert(ad, images, settings=adam, seed=inv_seed)
        start = res.inputs
        traj = torch.full((steps + 1, n), float("nan"), dtype=torch.float64)
        traj[0] = res.loss.double()
        if method == "gmres-cg":
            # the family default's GMRES phase first (its step cap and leaving rule), then CG from
            # where it left each row: the trajectories of the polish that decides the rows GMRES
            # leaves unsolved; row 0 is the GMRES phase's loss
            full = resolve_settings(ad, "default")
            start, _ = _polish_gmres(ad, start, None, ad.from_unit(images), "mse", full.polish_steps,
                                     krylov=full.polish_gmres_iters, patience=full.polish_patience,
                                     min_drop=full.polish_min_drop)
            with torch.no_grad():
                traj[0] = (ad.to_unit(ad.decode_raw(start, None).float()) - images).square().flatten(1).mean(1).double()

        def report(k, mse, traj=traj):
            traj[k] = (mse / scale).double()

        if method in ("cg", "gmres-cg"):
            _polish_cg(ad, start, None, ad.from_unit(images), "mse", steps, cg_iters=cg_iters, report=report)
        elif method == "dense":
            _polish(ad, start, None, ad.from_unit(images), "mse", steps, report=report)
        else:
            _polish_gmres(ad, start, None, ad.from_unit(images), "mse", steps, krylov=cg_iters, report=report)
        # a row that the polish solved or gave up on keeps its last value; so does every row after
        # an early end of the whole loop
        for k in range(1, steps + 1):
            traj[k] = torch.where(torch.isnan(traj[k]), traj[k - 1], traj[k])
        out[part] = traj
        out[f"{part}_seconds"] = time.perf_counter() - t0
        print(f"{part}: {n} images, {out[f'{part}_seconds']:.0f} s", file=sys.stderr, flush=True)
    return out


def replay(traj: torch.Tensor, cap: int, patience: int, min_drop: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's loss and polish steps under the rule (as ``inversion._Leaving`` applies it)."""
    n = traj.shape[1]
    cap = min(cap, traj.shape[0] - 1)
    final = traj[cap].clone()
    used = torch.full((n,), cap, dtype=torch.float64)
    for i in range(n):
        for k in range(patience, cap):
            if traj[k, i] > (1 - min_drop) * traj[k - patience, i]:
                final[i], used[i] = traj[k, i], k
                break
    return final, used


def replay_settle(traj: torch.Tensor, cap: int, line: float, patience: int, min_drop: float,
                  above: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's loss and polish steps when attributing against threshold ``line`` (as
    ``inversion._Leaving`` applies it with ``stop_raw`` and ``settle``): a row stops once under
    the line (its verdict: belonging), or once over ``above`` times it with its loss fallen by
    less than ``min_drop`` over the last ``patience`` steps (settled: not belonging)."""
    n = traj.shape[1]
    cap = min(cap, traj.shape[0] - 1)
    final = traj[cap].clone()
    used = torch.full((n,), cap, dtype=torch.float64)
    for i in range(n):
        for k in range(cap):
            t = traj[k, i]
            if t < line or (k >= patience and t > above * line and t > (1 - min_drop) * traj[k - patience, i]):
                final[i], used[i] = t, k
                break
    return final, used


def _settle_rules(text: str) -> list[tuple[int, float, float]]:
    out = []
    for part in text.split(","):
        w, d, m = part.split(":")
        out.append((int(w), float(d), float(m)))
        if out[-1][0] < 1 or not 0 < out[-1][1] < 1 or not out[-1][2] > 1:
            raise ValueError(part)
    return out


def _rules(text: str) -> list[tuple[int, float]]:
    out = []
    for part in text.split(","):
        w, _, d = part.partition(":")
        out.append((int(w), float(d)))
        if out[-1][0] < 1 or not 0 < out[-1][1] < 1:
            raise ValueError(part)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--generator", default="onestep-fmnist", help="a zoo name or 'default' (default: %(default)s)")
    p.add_argument("--n", type=int, default=32, help="generated and real images each (default: %(default)s)")
    p.add_argument("--steps", type=int, default=100, help="polish steps recorded (default: %(default)s)")
    p.add_argument("--method", choices=("cg", "gmres", "gmres-cg", "dense"), default="cg",
                   help="the polish: CG or GMRES steps; 'gmres-cg': CG steps after the family default's GMRES "
                        "phase, as the one-step default runs them; or the GAN family's Levenberg-Marquardt steps "
                        "on Jacobians built by forward-mode AD ('dense') (default: %(default)s)")
    p.add_argument("--cg-iters", type=int, default=100,
                   help="inner iterations (CG or GMRES) per polish step; not used by 'dense' (default: %(default)s)")
    p.add_argument("--caps", default="60,80,100", help="comma-separated step caps replayed (default: %(default)s)")
    p.add_argument("--rules", default=DEFAULT_RULES, help="comma-separated W:DROP plateau rules (default: %(default)s)")
    p.add_argument("--settle", default="",
                   help="comma-separated W:DROP:ABOVE settle rules (settle_patience, settle_min_drop, settle_above) "
                        "replayed against a threshold: 1%% of the real images' median at the largest cap, the "
                        "convergence line (default: none)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save-trajectories", metavar="FILE", help="also save the trajectories (JSON)")
    p.add_argument("--trajectories", metavar="FILE", help="replay saved trajectories instead of computing them")
    p.add_argument("--out", help="also write the report (Markdown) here")
    a = p.parse_args(argv)
    if a.n < 1 or a.steps < 1 or a.cg_iters < 1:
        p.error("--n, --steps and --cg-iters must be at least 1")
    try:
        rules = _rules(a.rules)
        settle = _settle_rules(a.settle) if a.settle else []
        caps = [int(c) for c in a.caps.split(",")]
    except ValueError as e:
        p.error(f"--rules must be W:DROP pairs (W >= 1, 0 < DROP < 1), --settle W:DROP:ABOVE triples (ABOVE > 1) "
                f"and --caps integers ({e})")
    if a.trajectories:
        with open(a.trajectories, encoding="utf-8") as f:
            data = json.load(f)
        for part in ("own", "real"):
            data[part] = torch.tensor(data[part], dtype=torch.float64)
        source = f"trajectories from `{a.trajectories}`"
    else:
        data = trajectories(a.generator, a.n, a.steps, a.cg_iters, a.seed, a.method)
        source = f"trajectories computed in this run ({data['own_seconds']:.0f} s + {data['real_seconds']:.0f} s)"
        if a.save_trajectories:
            write_text(a.save_trajectories, json.dumps(
                {k: v.tolist() if isinstance(v, torch.Tensor) else v for k, v in data.items()}) + "\n")
    own, real = data["own"], data["real"]
    lines = [
        f"Polish plateau rules ({data['generator']}; {platform.machine()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, Python {platform.python_version()}); {own.shape[1]} generated + "
        f"{real.shape[1]} real images ({data['data']}); {source}.",
        "",
        f"Adam phase: the family default without its polish ({data['settings']}); then up to "
        + (f"{own.shape[0] - 1} Levenberg-Marquardt steps (dense Jacobians by forward-mode AD). "
           if data.get("method") == "dense" else
           "the family default's GMRES phase, then up to "
           f"{own.shape[0] - 1} polish steps of {data['cg_iters']} CG iterations (row 0: the GMRES phase's loss). "
           if data.get("method") == "gmres-cg" else
           f"{own.shape[0] - 1} polish steps of {data['cg_iters']} {data.get('method', 'cg').upper()} iterations. ")
        + "MSE in [0, 1] units.",
        "",
        "| cap | rule (W steps, drop) | own median | own p90 | own worst | real lowest | real median "
        "| worst own / lowest real | own steps | real steps |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for cap in caps:
        for w, d in [(0, 0.0)] + rules:
            if w == 0:
                fo, uo = replay(own, cap, cap + 1, 0.5)
                fr, ur = replay(real, cap, cap + 1, 0.5)
                name = "none"
            else:
                fo, uo = replay(own, cap, w, d)
                fr, ur = replay(real, cap, w, d)
                name = f"{w}, {d:g}"
            lines.append(f"| {cap} | {name} | {fo.median():.1e} | {torch.quantile(fo, 0.9):.1e} | {fo.max():.1e} | "
                         f"{fr.min():.1e} | {fr.median():.1e} | {fo.max() / fr.min():.2f} | {uo.mean():.0f} | "
                         f"{ur.mean():.0f} |")
    lines += ["", "A row's steps: polish steps before it stops (the cap when the rule never fires)."]
    if settle:
        cap = max(caps)
        line = 0.01 * float(real[min(cap, real.shape[0] - 1)].median())
        lines += [
            "",
            f"Settle rules against a threshold (attributing with early stop): the line is {line:.3g}, 1% of the "
            f"real images' median after {cap} steps. A row stops once under the line, or once over ABOVE times "
            "it with its loss fallen by less than DROP over the last W steps. 'own over the line' counts the "
            "generated images that end over it (verdicts the rule would flip against polishing to the cap); "
            "'own closest' is the highest loss ratio over W steps of a generated image while over ABOVE times "
            "the line (the rule fires above 1 - DROP), 'real lowest' the lowest such ratio of a real image at "
            "step W.",
            "",
            "| rule (W, drop, above) | own over the line | own steps | real steps | own closest | real lowest |",
            "|---|---|---|---|---|---|",
        ]
        base_o, base_uo = replay_settle(own, cap, line, cap + 1, 0.5, 2.0)  # patience past the cap: never fires
        lines.append(f"| none | {int((base_o >= line).sum())} | {base_uo.mean():.1f} | "
                     f"{replay_settle(real, cap, line, cap + 1, 0.5, 2.0)[1].mean():.1f} | - | - |")
        for w, d, m in settle:
            fo, uo = replay_settle(own, cap, line, w, d, m)
            fr, ur = replay_settle(real, cap, line, w, d, m)
            closest = None  # no generated image over ABOVE times the line after W steps
            for i in range(own.shape[1]):
                for k in range(w, cap + 1):
                    if own[k, i] < line or own[k - 1, i] < line:
                        break
                    if own[k, i] > m * line:
                        closest = max(closest or 0.0, float(own[k, i] / own[k - w, i]))
            lowest = float((real[min(w, real.shape[0] - 1)] / real[0]).min())
            lines.append(f"| {w}, {d:g}, {m:g} | {int((fo >= line).sum())} | {uo.mean():.1f} | {ur.mean():.1f} | "
                         f"{'none over' if closest is None else f'{closest:.2f}'} | {lowest:.2f} |")
    finish(lines, "bench.polish_plateau", argv, a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
