"""The dense polish's forward-mode Jacobians on CPU: all columns at once, or a block at a time.

The dense Levenberg-Marquardt polish (``polish_method="dense"``) builds each row's Jacobian by
forward-mode AD, one pass per latent dimension; on CPU at most ``DENSE_CPU_COLUMNS`` passes at
once (``ronan_fast.inversion.polish.dense.forward_jacobian``), which this benchmark chose. It
times one row's Jacobian of zoo generators with every column in one pass (``all``, as
``torch.func.jacfwd`` builds it) and in blocks of 128, 64, 32 and 16 columns, repetitions
interleaved so that a change of the machine's load falls on every block size, and gives each
block size's largest difference from ``all`` (relative to the Jacobian's largest entry).

Inputs: the StyleGAN-style generators' ``z`` (their plain adapter) and ``w`` (the synthesis over
whitened ``w``, as the mapping start's search over ``w`` polishes it), the latent-diffusion
autoencoder's decoder, and two narrow GANs; each at ``--points`` prior draws.

Usage::

    python -m bench.jacobian_blocks --threads 1 --reps 5 --out bench/results/jacobian_blocks_cpu.md
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

from bench.machine import machine, machine_line
from ronan_fast.evaluation.store import write_text

#: (zoo generator, input): the wide inputs of the generator benchmark, and two narrow GANs
TARGETS = [("stylegan64-photos", "w"), ("stylegan64-photos", "z"), ("stylegan64-opencv", "w"),
           ("aekl64-photos", "z"), ("dcgan64n-opencv", "z"), ("upgan64-fmnist", "z")]
#: columns per block; None: every column in one pass
BLOCKS = [None, 128, 64, 32, 16]


def _function(name: str, what: str):
    """The generator whose per-row output the dense polish differentiates: the zoo model itself
    (``z``), or its synthesis over whitened ``w`` (``w``)."""
    from ronan_fast.mapping_start import mapping_start
    from ronan_fast.zoo import zoo_adapter

    adapter = zoo_adapter(name)
    if what == "w":
        start = mapping_start(adapter)
        return start._u if start._u is not None else start._w  # the search over w's generator
    return adapter


def measure(name: str, what: str, points: int, reps: int) -> dict:
    from ronan_fast.inversion.runtime import forward_ad_attention

    gen = _function(name, what)
    with forward_ad_attention():  # as the dense polish runs (attention layers' forward-mode rule)
        return _measure(gen, name, what, points, reps)


def _measure(gen, name: str, what: str, points: int, reps: int) -> dict:
    from ronan_fast.inversion.polish.dense import forward_jacobian

    def one(q):
        return gen.decode_raw(q.unsqueeze(0), None).flatten().float()

    with torch.no_grad():
        z = gen.sample_latents(points, torch.Generator().manual_seed(0)).reshape(points, -1).float()
    d = z.shape[1]  # the whitened generator's draws are in its coordinates already
    times = {str(b): [] for b in BLOCKS}
    ref = [forward_jacobian(one, z[k]) for k in range(points)]
    rels = {str(b): [] for b in BLOCKS}  # each Jacobian's difference from all at once; NaN if not finite
    identical = {str(b): 0 for b in BLOCKS}
    for _ in range(reps):
        for b in BLOCKS:
            for k in range(points):
                t = time.perf_counter()
                jac = forward_jacobian(one, z[k], b)
                times[str(b)].append(time.perf_counter() - t)
                finite = bool(torch.isfinite(jac).all())
                rels[str(b)].append(float((jac - ref[k]).abs().max() / ref[k].abs().max()) if finite else math.nan)
                identical[str(b)] += int(torch.equal(jac, ref[k]))
    return {"generator": name, "input": what, "width": d, "points": points, "reps": reps,
            "outputs": int(ref[0].shape[0]),
            "blocks": {b: {"ms": [1000 * t for t in times[b]],
                           "max_rel_diff": math.nan if any(map(math.isnan, rels[b])) else max(rels[b]),
                           "identical": identical[b], "of": reps * points} for b in times}}


def render(raw: dict) -> str:
    m = raw["machine"]
    lines = [
        "# The dense polish's Jacobians on CPU: all columns at once or in blocks",
        "",
        machine_line(m, raw["command"]),
        "",
        "One row's Jacobian by forward-mode AD (``forward_jacobian``), at prior draws of the input; "
        "every block size timed on every point in each repetition, in turn. **ms** = the median "
        "(and the lowest) time of one Jacobian over the points and repetitions; **x all** = the "
        "median of `all` over the block size's; **max rel diff** = the largest entry of the "
        "difference from `all` over the largest entry of the Jacobian; **identical** = Jacobians "
        "equal to `all` bit for bit.",
        "",
        "| generator | input | width | outputs | columns per block | ms (median) | ms (lowest) | x all | "
        "max rel diff | identical |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in raw["results"]:
        base = statistics.median(r["blocks"]["None"]["ms"])
        for b, v in r["blocks"].items():
            med = statistics.median(v["ms"])
            lines.append(
                f"| {r['generator']} | {r['input']} | {r['width']} | {r['outputs']} | "
                f"{'all' if b == 'None' else b} | {med:.0f} | {min(v['ms']):.0f} | {base / med:.2f} | "
                f"{v['max_rel_diff']:.1e} | {v['identical']}/{v['of']} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--points", type=int, default=3, help="prior draws per input (default 3)")
    p.add_argument("--reps", type=int, default=5, help="repetitions of every block size (default 5)")
    p.add_argument("--targets", default=",".join(f"{g}:{w}" for g, w in TARGETS),
                   help="generator:input pairs (input z, or w through the mapping network; default: TARGETS)")
    p.add_argument("--out", type=Path, required=True, help="the table (.md); its .json beside it")
    a = p.parse_args(argv)
    if a.threads < 1 or a.points < 1 or a.reps < 1:
        p.error("--threads, --points and --reps must be positive")
    targets = []
    for t in a.targets.split(","):
        g, _, w = t.partition(":")
        if w not in ("z", "w"):
            p.error(f"--targets: {t!r} is not generator:z or generator:w")
        targets.append((g, w))
    torch.set_num_threads(a.threads)
    raw = {"machine": machine(), "threads": a.threads,
           "command": "python -m bench.jacobian_blocks " + " ".join(argv if argv is not None else sys.argv[1:]),
           "results": []}
    for g, w in targets:
        print(f"[{g}:{w}]", file=sys.stderr, flush=True)
        raw["results"].append(measure(g, w, a.points, a.reps))
        write_text(a.out.with_suffix(".json"), json.dumps(raw, indent=1))  # what is done, kept
        write_text(a.out, render(raw))
    print(render(raw))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
