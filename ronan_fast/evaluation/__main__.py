"""``python -m ronan_fast.evaluation --config quick|full``: reproduce the paper's tables on the zoo.

Writes ``OUT/CONFIG/``: ``cells.csv``, ``summary.md``, ``figures/``, and the caches ``cells/``,
``profiles/``, ``cache/``. A folder that already holds finished cells is only continued with
``--jobs-resume`` (finished cells are skipped, the rest computed) or recomputed with ``--fresh``.
Several runs may work on one folder at once with disjoint ``--cells``; each rewrites the reports
from every finished cell when it ends (``--report-only`` does just that).
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from ronan_fast.evaluation.config import CONFIGS, TABLES, build_cells, select_cells


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m ronan_fast.evaluation",
        description="Reproduce the RONAN paper's tables (2-8) on the model zoo, offline.",
        epilog="Tables: " + "; ".join(f"{k}: {v}" for k, v in TABLES.items()),
    )
    p.add_argument("--config", required=True, choices=sorted(CONFIGS),
                   help="quick: every table with few images and short inversions (minutes); "
                        "full: the paper's counts (100 profile, 100 + 100 per cell, 1500 steps); "
                        "full-default: the same counts with the package's default inversion settings")
    p.add_argument("--cells", metavar="PATTERN", default=None,
                   help="only cells whose id matches one of these comma-separated globs, e.g. 't2-*,t7-*' (--list)")
    p.add_argument("--out", default="results/eval", help="output root; results go to OUT/CONFIG (default: %(default)s)")
    p.add_argument("--jobs-resume", action="store_true",
                   help="continue a folder that already holds finished cells: reuse valid finished cells, "
                        "profiles and inversions, compute the rest")
    p.add_argument("--fresh", action="store_true", help="ignore every cache file and recompute (overwrites them)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default: %(default)s)")
    p.add_argument("--list", action="store_true", help="list the selected cells and whether they are finished")
    p.add_argument("--report-only", action="store_true",
                   help="compute nothing: rewrite cells.csv, summary.md and figures from the finished cells")
    p.add_argument("--no-figures", action="store_true", help="skip the PNG figures")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    return p


def _finished(out_dir: Path, cells, config) -> list[dict]:
    from ronan_fast.evaluation.runner import cell_path, load_cell

    out = []
    for c in cells:
        path = cell_path(out_dir, c.id)
        if path.exists():
            rec = load_cell(path)
            if rec is not None and rec.get("config_identity") == config.identity() and rec["cell"] == c.to_dict():
                out.append(rec)
    return out


def _commands(out_dir: Path) -> list[str]:
    log = out_dir / "commands.txt"
    return [ln for ln in log.read_text(encoding="utf-8").splitlines() if ln.strip()] if log.exists() else []


def main(argv: list[str] | None = None, models=None) -> int:
    """Run the command line ``argv``; ``models`` replaces the zoo (a :class:`ModelSource`)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    if args.threads < 1:
        print(f"error: --threads must be >= 1, got {args.threads}", file=sys.stderr)
        return 2
    if args.jobs_resume and args.fresh:
        print("error: --jobs-resume and --fresh contradict each other; give one", file=sys.stderr)
        return 2
    import torch

    torch.set_num_threads(args.threads)
    from ronan_fast.evaluation import report
    from ronan_fast.evaluation.models import ZooModels
    from ronan_fast.evaluation.runner import Evaluation, cell_path
    from ronan_fast.evaluation.store import write_text

    config = CONFIGS[args.config]
    out_dir = Path(args.out) / config.name
    if out_dir.exists() and not out_dir.is_dir():
        print(f"error: --out {args.out}: {out_dir} exists and is not a folder", file=sys.stderr)
        return 2
    models = ZooModels() if models is None else models
    plan = build_cells(config, models)
    try:
        cells = select_cells(plan.cells, args.cells)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    if args.list:
        for c in cells:
            state = "finished" if cell_path(out_dir, c.id).exists() else "to do"
            print(f"{c.id:44s} table {c.table}  ref {c.reference or 'none':14s} {c.metric:5s} "
                  f"{c.settings or config.settings:9s} other: {c.other.key():40s} {state}")
        for cid, why in plan.omitted:
            print(f"{cid:44s} left out: {why}")
        return 0

    command = "python -m ronan_fast.evaluation " + " ".join(shlex.quote(a) for a in argv)
    ev = Evaluation(config, out_dir, models, reuse=not args.fresh, progress=not args.no_progress)
    not_run: dict[str, str] = {}
    if not args.report_only:
        already = [c.id for c in cells if cell_path(out_dir, c.id).exists()]
        if already and not (args.jobs_resume or args.fresh):
            print(f"error: {out_dir} already holds {len(already)} finished cell(s) of this selection "
                  f"(e.g. {already[0]}); pass --jobs-resume to continue them or --fresh to recompute",
                  file=sys.stderr)
            return 2
        log = out_dir / "commands.txt"
        previous = log.read_text(encoding="utf-8") if log.exists() else ""
        write_text(log, previous + command + "\n")
        ev.run(cells)
        s = ev.stats
        not_run.update({cid: f"skipped, {why}" for cid, why in s.cells_skipped})
        not_run.update({cid: f"failed, {why}" for cid, why in s.cells_failed})
        print(f"cells: {len(s.cells_computed)} computed, {len(s.cells_reused)} reused, {len(s.cells_skipped)} "
              f"skipped, {len(s.cells_failed)} failed; {s.inversions} inversions ({s.inverted_images} images)",
              file=sys.stderr)
        for cid, why in s.cells_skipped:
            print(f"  skipped {cid}: {why}", file=sys.stderr)
        for cid, why in s.cells_failed:
            print(f"  failed {cid}: {why}", file=sys.stderr)

    records = _finished(out_dir, plan.cells, config)
    report.write_csv(out_dir / "cells.csv", records)
    report.write_summary(out_dir / "summary.md", config, plan.cells, records, plan.omitted, not_run, command,
                          tuple(models.reference_candidates), models, _commands(out_dir))
    if not args.no_figures and records:
        report.write_figures(out_dir, records, ev.previews)
    print(f"{len(records)} of {len(plan.cells)} cells finished; reports in {out_dir}", file=sys.stderr)
    return 1 if not_run and any(v.startswith("failed") for v in not_run.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
