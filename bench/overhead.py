"""Overhead profile: the share of an inversion step spent outside the generator's forward and backward.

For each batch size (images x restarts rows, all live: no early stop, no halving), it measures

* ``step``: the marginal time of one step of :func:`ronan_fast.invert`, as the difference between
  runs of ``--steps`` and ``2 * --steps`` steps divided by ``--steps`` (set-up, the final decode and
  the result copy cancel out);
* ``generator``: one forward and one backward of the generator on the same rows, through
  autograd with the same output gradient shape, nothing else (under the same conditions as
  invert: denormals flushed to zero, and on CPU freed memory kept for reuse);
* ``overhead = 1 - generator / step``: everything else (the fused loss-and-gradient kernel, the
  latent Adam with best-row tracking, the stopping checks, Python), as a share of the step;
  the three timings are interleaved in rounds (``--repeats``), and step, generator and share
  are each the median over the rounds (the share from each round's own pair);
* from a ``torch.profiler`` trace of one more ``--steps`` run, the share of self time in the
  package's own operators (``ronan_fast::*``).

Usage::

    python -m bench.overhead --generator default --batch 256,1024 --out bench/results/overhead_cpu.md
"""

from __future__ import annotations

import argparse
import contextlib
import platform
import statistics
import sys
import time

import torch

from bench import generators as G
from bench.machine import cpu_name
from bench.report import finish, int_list
from bench.speed import _sync
from ronan_fast import _heap
from ronan_fast.inversion import invert
from ronan_fast.inversion.runtime import flush_denormals


def _timed(fn, device: torch.device) -> float:
    _sync(device.type)
    t0 = time.perf_counter()
    fn()
    _sync(device.type)
    return time.perf_counter() - t0


def measure(bg: G.BenchGenerator, rows: int, steps: int, restarts: int, repeats: int) -> dict:
    ad = bg.adapter
    device = ad.device
    n_img = max(1, rows // restarts)
    images = G.generated(bg, n_img, seed=31_000).to(device)

    def run(k):
        # the paper's preset: constant lr, no halving, no plateau stop, so every row runs every step
        invert(ad, images, settings="authors", steps=k, restarts=restarts, seed=0, max_rows=n_img * restarts)

    z = ad.sample_latents(n_img * restarts, torch.Generator().manual_seed(1)).to(device)
    gout = None

    def gen_steps(k: int = steps):
        nonlocal gout
        for _ in range(k):
            zl = z.detach().requires_grad_(True)
            raw = ad.decode_raw(zl)
            if gout is None:
                gout = torch.randn_like(raw)
            torch.autograd.grad(raw, zl, gout)

    def gen_timed() -> float:
        # the generator alone runs as invert runs it: denormals flushed and, on CPU, freed memory
        # kept for reuse (without either it can be slower than a whole step of invert); one
        # untimed step first, as the difference of two runs leaves out invert's first steps
        heap = _heap.keep_freed_memory() if device.type == "cpu" else contextlib.nullcontext()
        with flush_denormals(), heap:
            gen_steps(1)
            return _timed(gen_steps, device)

    run(2)  # warm-up
    gen_timed()
    # Rounds interleave the three timings, so that a machine whose speed drifts between minutes
    # moves all three alike; each round gives its own share, and the median round counts. The
    # step time is the difference of two runs: on a tiny model timing noise can swamp it, so a
    # round with a non-positive difference is measured again, up to three times as many rounds
    # as asked, and none left is an error, not a figure.
    rounds: list[tuple[float, float]] = []
    for _ in range(3 * repeats):
        short = _timed(lambda: run(steps), device)
        long = _timed(lambda: run(2 * steps), device)
        if long - short <= 0:
            continue
        rounds.append(((long - short) / steps, gen_timed() / steps))
        if len(rounds) == repeats:
            break
    if not rounds:
        raise RuntimeError(f"{bg.name}: {steps} steps are too few to time a step against the timing noise "
                           f"({2 * steps} steps took {long:.4f} s, {steps} took {short:.4f} s); use more steps")
    step_s = statistics.median(r[0] for r in rounds)
    gen_s = statistics.median(r[1] for r in rounds)
    share = statistics.median(1 - g / st for st, g in rounds)

    acts = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        acts.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=acts) as prof:
        run(steps)
    events = prof.key_averages()
    attr = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    total = sum(getattr(e, attr, 0) for e in events) or float("nan")
    ours = {e.key: getattr(e, attr, 0) / total for e in events if e.key.startswith("ronan_fast::")}
    return {"rows": n_img * restarts, "images": n_img, "restarts": restarts, "step_ms": step_s * 1e3,
            "generator_ms": gen_s * 1e3, "overhead": share, "rounds": len(rounds), "ops_share": ours}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--generator", default="default", help="default or a zoo model name")
    p.add_argument("--batch", default="256,1024", help="comma-separated row counts (images x restarts)")
    p.add_argument("--restarts", type=int, default=8)
    p.add_argument("--steps", type=int, default=50, help="steps of the short run (the long one runs twice as many)")
    p.add_argument("--repeats", type=int, default=3,
                   help="rounds of the three timings (short run, long run, generator alone); the medians count")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", help="also write the table (Markdown) here")
    a = p.parse_args(argv)
    batches = int_list(p, "--batch", a.batch)
    for name, v in (("--restarts", a.restarts), ("--steps", a.steps), ("--repeats", a.repeats)):
        if v < 1:
            p.error(f"{name} must be at least 1, got {v}")
    if any(b < a.restarts for b in batches):
        p.error(f"every --batch must be at least --restarts ({a.restarts}), got {a.batch}")
    bg = G.get(a.generator, a.device)
    dev = torch.device(a.device)
    where = (torch.cuda.get_device_name(dev) if dev.type == "cuda" else
             f"{cpu_name()}, {torch.get_num_threads()} threads")
    lines = [f"Overhead profile ({'GPU' if dev.type == 'cuda' else 'CPU'}: {where}; torch {torch.__version__}, "
             f"Python {platform.python_version()}); generator {a.generator}, float32, every row live, "
             f"step = marginal time of {a.steps} more steps of invert; medians of {a.repeats} interleaved "
             f"rounds, the share from each round's own pair; the generator alone with denormals flushed "
             f"(and on CPU freed memory kept), as invert runs it.", "",
             "| rows | images x restarts | step (ms) | generator fwd+bwd (ms) | outside the generator | "
             "ronan_fast ops (profiler self time) |", "|---|---|---|---|---|---|"]
    for b in batches:
        r = measure(bg, b, a.steps, a.restarts, a.repeats)
        ops = ", ".join(f"{k.split('::')[1]} {v:.1%}" for k, v in sorted(r["ops_share"].items()))
        lines.append(f"| {r['rows']} | {r['images']} x {r['restarts']} | {r['step_ms']:.2f} | {r['generator_ms']:.2f} | "
                     f"{r['overhead']:.1%} | {ops or 'none recorded'} |")
        print(lines[-1], flush=True)
    finish(lines, "bench.overhead", argv, a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
