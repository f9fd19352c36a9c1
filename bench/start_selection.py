"""Which starts to keep: per-start Adam trajectories of a GAN's own images, and halving policies
replayed on them.

``collect``: draw ``--n`` images with the zoo's 64x64 DCGAN (the draw of
``bench.convergence --seed S``: generator seed 10000 + S), take the images listed in ``--hard``
(those a setting left unconverged) and the first others up to ``--images`` in all, and run
``--starts`` independent Adam starts for each (600 steps at lr 0.1, cosine to 1%: the GAN
default's Adam phase, with torch.optim.Adam), recording each start's best loss so far at the
checkpoints. Rows are independent, so any successive-halving policy over a subset of these
starts can be replayed without inverting again.

``simulate``: for each policy (starts, then (step, rows kept) pairs), draw random subsets of
each image's starts, apply the policy (keep the rows with the lowest best loss at each
checkpoint) and count how often the start it ends with finished the Adam phase under
``--good`` (a start there is in the basin the polish finishes from). Prints each policy's
row-steps per image, the success rate of each hard image, and the expected number of failures
among all ``--n`` images (hard images as measured, the others scaled from the easy ones).

Usage::

    python -m bench.start_selection collect --seed 1 --hard 25,39,42,66,77,119,120,123,124 --out traj.pt
    python -m bench.start_selection simulate traj.pt --good 1e-3
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from bench import generators as G
from ronan_fast.inversion import InversionSettings, _lr_factor

CHECKPOINTS = [0, 5, 10, 25, 50, 75, 100, 150, 200, 300, 400, 500, 600]

#: name -> (starts, [(checkpoint step, rows kept after it), ...])
POLICIES: dict[str, tuple[int, list[tuple[int, int]]]] = {
    "8 starts, halved at 100, 200 (the earlier GAN default)": (8, [(100, 4), (200, 2)]),
    "16 starts, halved at 25, 50, 75": (16, [(25, 8), (50, 4), (75, 2)]),
    "24 starts, halved at 25, 50, 75, 100": (24, [(25, 12), (50, 6), (75, 3), (100, 2)]),
    "32 starts, halved at 25, 50, 75, 100": (32, [(25, 16), (50, 8), (75, 4), (100, 2)]),
    "16 starts, halved at 5, 10, 25": (16, [(5, 8), (10, 4), (25, 2)]),
    "24 starts, halved at 5, 10, 25, 50": (24, [(5, 12), (10, 6), (25, 3), (50, 2)]),
    "32 starts, halved at 5, 10, 25, 50": (32, [(5, 16), (10, 8), (25, 4), (50, 2)]),
    "24 starts, halved at 10, 25, 50, 100": (24, [(10, 12), (25, 6), (50, 3), (100, 2)]),
    "32 starts, best 16 at 0, halved at 25, 50, 75": (32, [(0, 16), (25, 8), (50, 4), (75, 2)]),
}


def collect(a) -> None:
    torch.set_num_threads(1)
    bg = G.get("dcgan64-photos")
    adapter = bg.adapter
    batch = adapter.generate(a.n, torch.Generator().manual_seed(10_000 + a.seed))
    hard = [int(i) for i in a.hard.split(",") if i]
    idx = hard + [i for i in range(a.n) if i not in hard][: a.images - len(hard)]
    R, T = a.starts, CHECKPOINTS[-1]
    schedule = InversionSettings(steps=T, schedule="cosine", min_lr_frac=0.01)  # the GAN default's
    target = adapter.from_unit(batch.images[idx])  # raw range
    n = len(idx)
    z0 = torch.randn(n * R, batch.latents.shape[1], generator=torch.Generator().manual_seed(123))
    img_of = torch.arange(n).repeat_interleave(R)
    traj = torch.full((len(CHECKPOINTS), n * R), float("nan"))
    t0 = time.perf_counter()
    for c0 in range(0, n * R, a.chunk):
        sl = slice(c0, min(c0 + a.chunk, n * R))
        z = z0[sl].clone().requires_grad_(True)
        opt = torch.optim.Adam([z], lr=0.1)
        tg = target[img_of[sl]]
        best = torch.full((z.shape[0],), float("inf"))
        for t in range(T + 1):
            out = adapter.decode_raw(z, None)
            per = (out - tg).square().flatten(1).mean(1) / 4  # MSE of images in [0, 1]
            with torch.no_grad():
                best = torch.minimum(best, per.detach())
            if t in CHECKPOINTS:
                traj[CHECKPOINTS.index(t), sl] = best
            if t == T:
                break
            for group in opt.param_groups:
                group["lr"] = 0.1 * _lr_factor(schedule, t)
            opt.zero_grad(set_to_none=True)
            per.sum().backward()
            opt.step()
        print(f"rows {c0}..{sl.stop}: {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    torch.save({"idx": idx, "hard": hard, "checkpoints": CHECKPOINTS, "traj": traj, "R": R, "n": a.n,
                "seed": a.seed}, a.out)


def replay(traj: torch.Tensor, fin: torch.Tensor, checkpoints: list[int], starts: int,
           sched: list[tuple[int, int]], good: float, trials: int, seed: int = 0) -> torch.Tensor:
    """Per image, the share of ``trials`` random subsets of ``starts`` starts for which the
    policy ends with a start whose final Adam loss is under ``good``."""
    n, R = fin.shape
    g = torch.Generator().manual_seed(seed)
    succ = torch.zeros(n)
    for _ in range(trials):
        for j in range(n):
            live = torch.randperm(R, generator=g)[:starts]
            for step, keep in sched:
                live = live[traj[checkpoints.index(step), j, live].argsort()[:keep]]
            succ[j] += float(fin[j, live[fin[j, live].argmin()]] < good)
    return succ / trials


def row_steps(starts: int, sched: list[tuple[int, int]], total: int) -> int:
    rows, last, out = starts, 0, 0
    for step, keep in sched:
        out, rows, last = out + rows * (step - last), keep, step
    return out + rows * (total - last)


def simulate(a) -> None:
    d = torch.load(a.traj, weights_only=True)
    cp, R, idx, hard = d["checkpoints"], d["R"], d["idx"], d["hard"]
    n = len(idx)
    traj = d["traj"].view(len(cp), n, R)
    fin = traj[-1]
    nh = [j for j in range(n) if idx[j] in hard]
    ne = [j for j in range(n) if idx[j] not in hard]
    print(f"{R} starts per image, {len(nh)} hard images (draw seed {d['seed']}) and {len(ne)} others; a start "
          f"counts as good when its Adam loss after {cp[-1]} steps is under {a.good:g}.\n")
    print("| image | hard | lowest final loss | good starts | rank at " + ", ".join(map(str, cp))
          + " of the start that ends lowest |")
    print("|---|---|---|---|---|")
    for j in range(n):
        w = int(fin[j].argmin())
        ranks = [int((traj[c, j] < traj[c, j, w]).sum()) for c in range(len(cp))]
        print(f"| {idx[j]} | {'yes' if j in nh else ''} | {float(fin[j].min()):.1e} | {int((fin[j] < a.good).sum())}/{R} "
              f"| {' '.join(map(str, ranks))} |")
    print(f"\n| policy | row-steps per image | P(good) of each hard image | lowest P(good), others | "
          f"expected failures of {d['n']} |")
    print("|---|---|---|---|---|")
    for name, (starts, sched) in POLICIES.items():
        if starts > R:
            continue
        p = replay(traj, fin, cp, starts, sched, a.good, a.trials)
        efail = float((1 - p[nh]).sum() + (d["n"] - len(nh)) / len(ne) * (1 - p[ne]).sum())
        print(f"| {name} | {row_steps(starts, sched, cp[-1])} | {' '.join(f'{float(v):.2f}' for v in p[nh])} "
              f"| {float(p[ne].min()):.2f} | {efail:.2f} |")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("collect", help="run the starts and save their trajectories")
    c.add_argument("--seed", type=int, default=1, help="the draw of bench.convergence --seed")
    c.add_argument("--n", type=int, default=200, help="images in the draw")
    c.add_argument("--hard", default="", help="comma-separated indices of the draw's hard images")
    c.add_argument("--images", type=int, default=32, help="images in all (hard ones first)")
    c.add_argument("--starts", type=int, default=32)
    c.add_argument("--chunk", type=int, default=128, help="rows per batch")
    c.add_argument("--out", type=Path, required=True)
    s = sub.add_parser("simulate", help="replay halving policies on saved trajectories")
    s.add_argument("traj", type=Path)
    s.add_argument("--good", type=float, default=1e-3)
    s.add_argument("--trials", type=int, default=400)
    a = p.parse_args(argv)
    if a.cmd == "collect":
        if a.images < len([i for i in a.hard.split(",") if i]):
            p.error("--images must be at least the number of --hard images")
        collect(a)
    else:
        simulate(a)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
