"""CPU: what the heap setting and the chunk size do to an inversion step and to a whole inversion.

Two measurements, each in fresh processes (the C heap's settings are per process), with the heap
setting off (``RONAN_FAST_CPU_HEAP=0``) and on (:mod:`ronan_fast._heap`):

* ``steps``: one Adam-phase step (generator forward, fused loss and gradient, backward) at each
  batch size, microseconds per row and minor page faults per row;
* ``polish``: the dense polish's time per row and step by rows per Jacobian chunk;
* ``invert``: generated and held-out real images inverted to their verdict with the family
  default against a given line, with the old fixed chunk (4096 rows) and with the chunk sized
  by :func:`ronan_fast.inversion._cpu_chunk_rows`; seconds per image, convergence, and how many
  verdicts (loss under the line or not) differ from the old setting's.

Usage::

    OMP_NUM_THREADS=1 python -m bench.cpu_heap --generators default,onestep-fmnist,dcgan64-photos \\
        --invert dcgan64-photos --n 48 --n-real 24 --line 1.07e-4 --out bench/results/cpu_heap.md
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch


def _faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def worker_steps(name: str, batches: list[int], rows_per_measure: int) -> dict:
    from bench import generators as G
    from ronan_fast import _heap, ops

    bg = G.get(name)
    g = bg.adapter
    shape = G.generated(bg, 1, 0).shape[1:]
    out = {}
    with _heap.keep_freed_memory() as held:
        for b in batches:
            rng = torch.Generator().manual_seed(b)
            z = g.sample_latents(b, rng)
            cond = g.sample_conditions(b, rng)
            target = g.from_unit(torch.rand(b, *shape, generator=rng))
            index, weight = torch.arange(b), torch.ones(b)

            def step():
                zl = z.detach().requires_grad_(True)
                raw = g.decode_raw(zl, cond)
                with torch.no_grad():
                    _, grad = ops.recon_loss_grad(raw, target, index, weight, "mse")
                torch.autograd.grad(raw, zl, grad)

            step()
            step()
            reps = max(3, rows_per_measure // b)
            f0, t0 = _faults(), time.perf_counter()
            for _ in range(reps):
                step()
            dt, df = time.perf_counter() - t0, _faults() - f0
            out[str(b)] = {"us_per_row": dt / reps / b * 1e6, "faults_per_row": df / reps / b}
    return {"held": held, "steps": out}


def worker_invert(name: str, n: int, n_real: int, line: float, max_rows: int | None, seed: int) -> dict:
    from bench import generators as G
    from ronan_fast.inversion import _cpu_chunk_rows, invert, resolve_settings

    bg = G.get(name)
    gen = G.generated(bg, n, seed)
    real = bg.real(n_real)
    s = resolve_settings(bg.adapter, None)
    rows = max_rows or _cpu_chunk_rows(bg.adapter, s)
    t0 = time.perf_counter()
    res_r = invert(bg.adapter, real, seed=seed + 1, stop_below=line, max_rows=max_rows)
    t_real = time.perf_counter() - t0
    t0 = time.perf_counter()
    res_g = invert(bg.adapter, gen, seed=seed, stop_below=line, max_rows=max_rows)
    t_gen = time.perf_counter() - t0
    return {
        "chunk_rows": rows,
        "s_own": t_gen / n,
        "s_real": t_real / n_real,
        "s_all": (t_gen + t_real) / (n + n_real),
        "gen_losses": res_g.loss.tolist(),
        "real_losses": res_r.loss.tolist(),
    }


def worker_polish(name: str, rows_list: list[int], n: int, steps: int, seed: int) -> dict:
    """The dense polish's time per row and step with its Jacobians built ``rows`` rows at a time."""
    from bench import generators as G
    from ronan_fast import _heap
    from ronan_fast import inversion as inv

    bg = G.get(name)
    g = bg.adapter
    target = g.from_unit(G.generated(bg, n, seed))
    start = 0.3 * g.sample_latents(n, torch.Generator().manual_seed(seed + 1))  # far from the images' inputs
    chosen = inv._dense_rows
    out = {}
    try:
        with _heap.keep_freed_memory():
            for rows in rows_list:
                inv._dense_rows = lambda d, p, cpu=False, rows=rows: rows
                t0 = time.perf_counter()
                inv._polish(g, start.clone(), None, target, "mse", steps)
                out[str(rows)] = (time.perf_counter() - t0) / steps / n * 1e3
    finally:
        inv._dense_rows = chosen
    return {"ms_per_row_step": out, "default_rows": chosen(g.latent_dim, target[0].numel(), cpu=True)}


def _spawn(args: list[str], heap: bool) -> dict:
    root = str(Path(__file__).resolve().parents[1])
    path = os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))
    env = dict(os.environ, RONAN_FAST_CPU_HEAP="1" if heap else "0", PYTHONPATH=path)
    p = subprocess.run([sys.executable, "-m", "bench.cpu_heap", *args], env=env, cwd=root, capture_output=True,
                       text=True)
    if p.returncode != 0:
        raise RuntimeError(f"worker {args} failed:\n{p.stderr[-4000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--generators", default="default,dcgan64-photos", help="comma-separated, for the step table")
    p.add_argument("--batches", default="16,32,64,128,256,512,1024,2048")
    p.add_argument("--rows-per-measure", type=int, default=2048, help="row-steps timed per batch size")
    p.add_argument("--invert", default="", help="generator for the whole-inversion table (empty: skip)")
    p.add_argument("--n", type=int, default=48, help="generated images inverted")
    p.add_argument("--n-real", type=int, default=24, help="held-out real images inverted")
    p.add_argument("--line", type=float, default=None, help="belonging line every image is inverted against")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=None, help="write the tables here (and a .json beside it)")
    p.add_argument("--configs", default="off:4096,off:0,on:4096,on:0",
                   help="whole-inversion settings, heap:rows (rows 0: the sized chunk); the first is the baseline")
    p.add_argument("--polish", default="", help="generator for the dense polish's chunk table (empty: skip)")
    p.add_argument("--polish-rows", default="1,4,27", help="rows per Jacobian chunk to time")
    p.add_argument("--worker", choices=("steps", "invert", "polish"), help=argparse.SUPPRESS)
    p.add_argument("--max-rows", type=int, default=0, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    if a.worker == "steps":
        print(json.dumps(worker_steps(a.generators, [int(b) for b in a.batches.split(",")], a.rows_per_measure)))
        return 0
    if a.worker == "invert":
        print(json.dumps(worker_invert(a.invert, a.n, a.n_real, a.line, a.max_rows or None, a.seed)))
        return 0
    if a.worker == "polish":
        print(json.dumps(worker_polish(a.polish, [int(r) for r in a.polish_rows.split(",")], 16, 3, a.seed)))
        return 0
    if a.invert and a.line is None:
        p.error("--invert needs --line")

    common = ["--threads", str(a.threads), "--seed", str(a.seed)]
    report = {"machine": {"cpu_count": os.cpu_count(), "threads": a.threads, "torch": torch.__version__,
                          "python": platform.python_version(), "libc": "-".join(platform.libc_ver())},
              "steps": {}, "invert": {}}
    lines = [f"CPU heap and chunk size (cpu, {os.cpu_count()} cores, {a.threads} threads, torch {torch.__version__}, "
             f"Python {platform.python_version()}, {'-'.join(platform.libc_ver())}).", ""]
    batches = a.batches
    for name in filter(None, a.generators.split(",")):
        res = {label: _spawn(["--worker", "steps", "--generators", name, "--batches", batches,
                              "--rows-per-measure", str(a.rows_per_measure), *common], label == "on")
               for label in ("off", "on")}
        report["steps"][name] = res
        print(name, json.dumps(res), flush=True)
    if report["steps"]:
        bs = batches.split(",")
        lines += ["Adam-phase step (forward, fused loss and gradient, backward), microseconds per row "
                  "(minor page faults per row), heap setting off / on:", "",
                  "| generator | heap | " + " | ".join(f"{b} rows" for b in bs) + " |",
                  "|---|---|" + "---|" * len(bs)]
        for name, res in report["steps"].items():
            for label in ("off", "on"):
                st = res[label]["steps"]
                cells = [f"{st[b]['us_per_row']:.0f} ({st[b]['faults_per_row']:.0f})" for b in bs]
                lines.append(f"| {name} | {label} | " + " | ".join(cells) + " |")
        lines.append("")
    if a.invert:
        inv_args = ["--worker", "invert", "--invert", a.invert, "--n", str(a.n), "--n-real", str(a.n_real),
                    "--line", repr(a.line), *common]
        configs = [(c.split(":")[0], int(c.split(":")[1])) for c in a.configs.split(",")]
        res = {}
        for label, rows in configs:
            heap = label == "on"
            key = f"heap {label}, {'4096 rows' if rows else 'sized chunk'}"
            res[key] = _spawn([*inv_args, "--max-rows", str(rows)], heap)
            print(key, {k: v for k, v in res[key].items() if not k.endswith("losses")}, flush=True)
        report["invert"] = {"generator": a.invert, "n": a.n, "n_real": a.n_real, "line": a.line, "runs": res}
        base = next(iter(res.values()))
        lines += [f"Whole inversion to the verdict, {a.invert}, family default, {a.n} generated + {a.n_real} real "
                  f"images, every image against the line {a.line:g}:", "",
                  "| setting | chunk rows | s/img own | s/img real | s/img all | speed-up | own converged "
                  "| verdicts differing from the first row |", "|---|---|---|---|---|---|---|---|"]
        for key, r in res.items():
            conv = sum(x < a.line for x in r["gen_losses"])
            diff = sum((x < a.line) != (y < a.line) for x, y in zip(r["gen_losses"] + r["real_losses"],
                                                                   base["gen_losses"] + base["real_losses"]))
            lines.append(f"| {key} | {r['chunk_rows']} | {r['s_own']:.3f} | {r['s_real']:.3f} | {r['s_all']:.3f} | "
                         f"{base['s_all'] / r['s_all']:.2f}x | {conv}/{a.n} | {diff} |")
        lines.append("")
    if a.polish:
        res = _spawn(["--worker", "polish", "--polish", a.polish, "--polish-rows", a.polish_rows, *common], True)
        report["polish"] = {"generator": a.polish, **res}
        lines += [f"Dense polish (Levenberg-Marquardt, forward-mode Jacobians), {a.polish}, 16 rows, 3 steps, heap "
                  f"held: ms per row and step by rows per Jacobian chunk (the CPU default now: "
                  f"{res['default_rows']}):", "", "| rows per chunk | ms per row-step |", "|---|---|"]
        lines += [f"| {r} | {v:.1f} |" for r, v in res["ms_per_row_step"].items()]
        lines.append("")
    text = "\n".join(lines)
    print(text)
    if a.out is not None:
        from ronan_fast.evaluation.store import write_text

        write_text(a.out, text)
        write_text(a.out.with_suffix(".json"), json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
