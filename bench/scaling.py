"""Throughput of ``ronan-fast inspect`` against the number of workers on one machine (torchrun).

On the same images (the bundled model's own, generated and saved as 8-bit PNGs, mixed with the
16 bundled real Fashion-MNIST test images) and the same profile, it runs the command

* in one process of one thread (the baseline), with ``--batch B`` as every run below;
* in one process of one thread with ``--batch 64`` (what batching alone changes);
* in one process of ``--threads-max`` threads (default: every core);
* under ``torchrun --nproc-per-node=K`` for each K of ``--workers`` (default 1,2): K CPU workers
  of one thread each (gloo). One worker is the one-process path started by torchrun;
* with ``--gpu`` (default: where CUDA is available): one process on one GPU, and one worker per
  GPU under torchrun (``--device cuda``).

Images per second are the images over the command's wall time, start-up, model loading and
the final merge included; each command is then run again on its finished report (nothing left
to judge) to show that fixed cost. Speed-up is against the baseline; efficiency is the speed-up
per core (or GPU) used. Every run's verdicts and losses are compared with the baseline's: the
one-thread runs must agree bit for bit. ``--repeats`` runs the whole cycle again, interleaved,
and reports the median.

Usage::

    python -m bench.scaling --out bench/results/scaling_cpu.md
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench.machine import cpu_name
from bench.report import finish, int_list

ROOT = Path(__file__).resolve().parents[1]


def _load() -> float:
    try:
        return float(Path("/proc/loadavg").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return float("nan")


def _commit() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True).stdout.strip()
        return head + (" with uncommitted changes" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def make_images(folder: Path, n_own: int, seed: int) -> int:
    """``n_own`` images of the bundled model and the 16 real test images, interleaved by name."""
    from ronan_fast import Attributor
    from ronan_fast.calibration import default_generator
    from ronan_fast.default import default_sample_paths
    from ronan_fast.imageio import save_image

    folder.mkdir(parents=True, exist_ok=True)
    own = Attributor(default_generator(), None).sample(n_own, seed=seed)
    real = default_sample_paths()
    n = n_own + len(real)
    slots = list(range(n))
    real_slots = set(slots[:: max(1, n // len(real))][: len(real)])
    it_own, it_real = iter(range(n_own)), iter(real)
    for i in slots:
        if i in real_slots:
            shutil.copy(next(it_real), folder / f"img{i:03d}_real.png")
        else:
            save_image(own[next(it_own)], folder / f"img{i:03d}_own.png")
    return n


def run(cmd: list[str], cwd: Path, threads: int) -> tuple[float, float, float]:
    """Run ``cmd``; (wall seconds, load before, load after). Fails loudly."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    load0 = _load()
    t0 = time.perf_counter()
    p = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        sys.exit(f"bench.scaling: {' '.join(cmd)} failed ({p.returncode}):\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}")
    return wall, load0, _load()


def records(path: Path) -> dict[str, dict]:
    from ronan_fast.reports.files import read_report

    return {Path(r["path"]).name: r for r in read_report(path)[1]}


def compare(base: dict[str, dict], other: dict[str, dict]) -> tuple[bool, bool, float]:
    """(same verdicts, same losses bit for bit, largest relative difference of a loss)."""
    same_v = base.keys() == other.keys() and all(base[k]["verdict"] == other[k]["verdict"] for k in base)
    fields = ("loss", "reference_loss", "calibrated_loss")
    same_l = same_v and all(base[k][f] == other[k][f] for k in base for f in fields)
    diff = 0.0
    for k in base.keys() & other.keys():
        for f in fields:
            a, b = base[k][f], other[k][f]
            if a is not None and b is not None and a != b:
                diff = max(diff, abs(a - b) / max(abs(a), 1e-300))
    return same_v, same_l, diff


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.scaling", description=__doc__.split("\n\n")[0])
    p.add_argument("--n-own", type=int, default=48, help="the bundled model's own images (default 48; +16 real)")
    p.add_argument("--n-profile", type=int, default=30, help="profile images (default 30)")
    p.add_argument("--workers", default="1,2", help="CPU worker counts under torchrun (default 1,2)")
    p.add_argument("--threads-max", type=int, default=os.cpu_count() or 1,
                   help="threads of the multi-threaded one-process run (default: the CPU count)")
    p.add_argument("--batch", type=int, default=4, help="images per batch in every run (default 4)")
    p.add_argument("--settings", default="default", help="inversion preset of the profile (default: default)")
    p.add_argument("--steps", type=int, help="Adam steps per start (default: the preset's)")
    p.add_argument("--repeats", type=int, default=1, help="cycles of all runs; the median is reported (default 1)")
    p.add_argument("--gpu", action=argparse.BooleanOptionalAction, default=None,
                   help="also 1 GPU against every GPU (default: when CUDA is available)")
    p.add_argument("--work", help="folder for images, profile and reports (default: a temporary one, removed)")
    p.add_argument("--out", help="Markdown report (default: stdout)")
    p.add_argument("--json", help="the figures as JSON")
    args = p.parse_args(argv)
    workers = int_list(p, "--workers", args.workers)
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    use_gpu = gpus > 0 if args.gpu is None else args.gpu
    if use_gpu and gpus == 0:
        p.error("--gpu: no CUDA device here")

    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="ronan-scaling-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        lines, figures = _bench(args, workers, use_gpu, gpus, work)
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=1) + "\n")
    finish(lines, "bench.scaling", argv, args.out)


def _bench(args, workers: list[int], use_gpu: bool, gpus: int, work: Path) -> tuple[list[str], dict]:
    import ronan_fast

    py = sys.executable
    cli = [py, "-m", "ronan_fast.cli"]
    trun = [py, "-m", "torch.distributed.run", "--standalone"]
    n = make_images(work / "images", args.n_own, seed=11)
    inv = ["--settings", args.settings] + ([] if args.steps is None else ["--steps", str(args.steps)])
    t_profile, _, _ = run([*cli, "profile", "--model", "default", *inv, "-n", str(args.n_profile), "--threads",
                           str(args.threads_max), "--call-rows", "8", "-q", "-o", "profile.json"], work,
                          args.threads_max)
    common = ["inspect", "--profile", "profile.json", "--model", "default", "images", "-q", "--call-rows", "8"]

    # (name, command before "-o REPORT", threads for OMP, cores or GPUs used, kind)
    configs = [("one process, 1 thread (baseline)", [*cli, *common, "--threads", "1", "--batch", str(args.batch)],
                1, 1, "cpu")]
    configs.append(("one process, 1 thread, --batch 64", [*cli, *common, "--threads", "1", "--batch", "64"],
                    1, 1, "cpu"))
    if args.threads_max > 1:
        configs.append((f"one process, {args.threads_max} threads",
                        [*cli, *common, "--threads", str(args.threads_max), "--batch", str(args.batch)],
                        args.threads_max, args.threads_max, "cpu"))
    for k in workers:
        configs.append((f"torchrun, {k} CPU worker{'s' if k > 1 else ''} x 1 thread",
                        [*trun, f"--nproc-per-node={k}", "-m", "ronan_fast.cli", *common, "--threads", "1",
                         "--batch", str(args.batch)], 1, k, "cpu"))
    if use_gpu:
        configs.append(("one process, 1 GPU", [*cli, *common, "--device", "cuda", "--batch", str(args.batch)],
                        1, 1, "gpu"))
        if gpus > 1:
            configs.append((f"torchrun, {gpus} GPU workers", [*trun, f"--nproc-per-node={gpus}", "-m",
                                                             "ronan_fast.cli", *common, "--device", "cuda",
                                                             "--batch", str(args.batch)], 1, gpus, "gpu"))

    results: dict[str, dict] = {name: {"walls": [], "fixed": [], "loads": []} for name, *_ in configs}
    for rep in range(args.repeats):
        for i, (name, cmd, threads, _, _) in enumerate(configs):
            report = work / f"r{rep}_{i}.jsonl"
            wall, l0, l1 = run([*cmd, "-o", report.name], work, threads)
            fixed, _, _ = run([*cmd, "-o", report.name], work, threads)  # all judged: start-up and merge only
            res = results[name]
            res["walls"].append(wall)
            res["fixed"].append(fixed)
            res["loads"].append((l0, l1))
            res["records"] = records(report)
            print(f"{name}: {wall:.1f} s ({n / wall:.2f} img/s), again on the finished report {fixed:.1f} s, "
                  f"load {l0:.2f} -> {l1:.2f}", file=sys.stderr)

    base_name = configs[0][0]
    base = results[base_name]
    base_ips = n / statistics.median(base["walls"])
    base_net = n / (statistics.median(base["walls"]) - statistics.median(base["fixed"]))
    rows, figures = [], {"images": n, "configs": []}
    for name, _, _, used, kind in configs:
        res = results[name]
        wall = statistics.median(res["walls"])
        ips = n / wall
        net = n / max(wall - statistics.median(res["fixed"]), 1e-9)  # the rate once started, before the merge
        same_v, same_l, diff = compare(base["records"], res["records"])
        verdicts = sum(r["verdict"] == "belongs" for r in res["records"].values())
        loads = ", ".join(f"{a:.1f}->{b:.1f}" for a, b in res["loads"])
        rows.append(f"| {name} | {used} | {wall:.1f} | {statistics.median(res['fixed']):.1f} | {ips:.3f} | "
                    f"{ips / base_ips:.2f}x | {ips / base_ips / used:.0%} | {net / base_net:.2f}x | "
                    f"{'same' if same_v else 'DIFFERENT'} ({verdicts} belong) | "
                    f"{'bit for bit' if same_l else f'max rel. diff {diff:.1e}'} | {loads} |")
        figures["configs"].append({"name": name, "kind": kind, "used": used, "walls": res["walls"],
                                   "fixed": res["fixed"], "loads": res["loads"], "images_per_s": ips,
                                   "speedup": ips / base_ips,
                                   "speedup_net_of_fixed": net / base_net, "same_verdicts": same_v, "same_losses": same_l,
                                   "max_rel_loss_diff": diff})

    settings = json.loads((work / "profile.json").read_text())["settings"]
    belongs = sum(r["verdict"] == "belongs" for r in base["records"].values())
    lines = [
        "# Scaling `ronan-fast inspect` over workers (torchrun) on CPU",
        "",
        f"Machine: {os.cpu_count()} CPU cores ({cpu_name()}, {platform.machine()}), "
        + (f"{gpus} CUDA GPU(s): {torch.cuda.get_device_name(0)}" if gpus else "no GPU") + "; "
        f"Python {platform.python_version()}, torch {torch.__version__}, ronan_fast {ronan_fast.__version__} "
        f"(commit {_commit()}).",
        "",
        f"Images: {n} ({args.n_own} made by the bundled model, saved as 8-bit PNGs, and the 16 bundled real "
        f"Fashion-MNIST test images, interleaved); model `default`, its bundled reference model; a profile of "
        f"{args.n_profile} images (`--settings {args.settings}`"
        + ("" if args.steps is None else f" `--steps {args.steps}`") + f", fitted once, not timed: "
        f"{t_profile:.0f} s). Inversion: steps {settings['steps']}, restarts {settings['restarts']}, "
        f"schedule {settings['schedule']}; `--call-rows 8`; early stop on. Every run: `--batch {args.batch}` "
        "(but the one row that says otherwise); each torchrun worker and each one-thread process runs one torch "
        f"thread (`--threads 1`, `OMP_NUM_THREADS=1`). Baseline: {base_name}, {base_ips:.3f} images/s; its "
        f"verdicts: {belongs} of {n} belong.",
        "",
        "| run | cores used | wall s | again on the finished report, s | images/s | speed-up | efficiency "
        "(speed-up per core) | speed-up net of fixed cost | verdicts vs baseline | losses vs baseline "
        "| load average before->after |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
        *rows,
        "",
        f"Wall time is the whole command: start-up, model loading, the final merge included (median of "
        f"{args.repeats} run{'s' if args.repeats > 1 else ''}); \"again on the finished report\" is the same "
        "command once more with nothing left to judge, its fixed cost; \"net of fixed cost\" compares wall "
        "time less that fixed cost (the rate while judging, which a long job approaches). Load average: the "
        "machine's 1-minute load before and after each run (other jobs share the cores).",
    ]
    if not use_gpu:
        lines += ["", "GPU: not measured here (this machine has no GPU). `python -m bench.scaling --gpu` on a "
                      "machine with GPUs adds one process on one GPU and one torchrun worker per GPU "
                      "(`--device cuda`)."]
    return lines, figures


if __name__ == "__main__":
    main()
