"""Profile retries on finished evaluation cells: what re-inverting the profile's outliers changes.

For each selected cell of an evaluation folder (``python -m ronan_fast.evaluation``), take its
belonging profile, invert again (``ronan_fast.attributor.retry_profile_outliers``, the code
``Attributor(profile_retries=k)`` runs) the profile images that fail the belonging test against
the rest of the profile, and judge the cell's recorded belonging and other images against the
profile before and after, under each rule. Only the profile's outliers are inverted (with the
cell's own settings, from other starts); the test images' losses are the cell's.

Usage::

    python -m bench.profile_retry --eval-dir results/eval/full-default \\
        --cells 't2-onestep-fmnist-*,t3-onestep-fmnist-vs-dcgan-fmnist' --retries 2 \\
        --out bench/results/profile_retry_onestep_cpu.md
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from ronan_fast.attributor import retry_profile_outliers
from ronan_fast.evaluation.config import CONFIGS, build_cells
from ronan_fast.evaluation.models import ZooModels
from ronan_fast.evaluation.runner import Evaluation
from ronan_fast.evaluation.store import write_text
from ronan_fast.inversion import InversionSettings, invert
from ronan_fast.profile import RULES, BelongingProfile


def counts(profile: BelongingProfile, belonging, other) -> dict:
    b, o = profile.belongs(belonging), profile.belongs(other)
    tp, fn, fp, tn = int(b.sum()), int((~b).sum()), int(o.sum()), int((~o).sum())
    return {"TP": tp, "FN": fn, "FP": fp, "TN": tn, "acc": (tp + tn) / (tp + fn + fp + tn),
            "threshold": profile.threshold, "sigma": profile.sigma}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--eval-dir", type=Path, required=True, help="an evaluation folder, e.g. results/eval/full-default")
    p.add_argument("--cells", required=True, help="comma-separated globs of cell ids")
    p.add_argument("--retries", type=int, default=2, help="rounds of re-inverting outliers (default: 2)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, help="Markdown table (a .json beside it)")
    a = p.parse_args(argv)
    if a.retries < 1:
        p.error(f"--retries must be >= 1, got {a.retries}")
    torch.set_num_threads(a.threads)
    config = CONFIGS.get(a.eval_dir.name)
    if config is None:
        p.error(f"--eval-dir: its folder name must be a configuration ({sorted(CONFIGS)}), got {a.eval_dir.name!r}")
    models = ZooModels()
    ev = Evaluation(config, a.eval_dir, models, progress=False)
    cells = {c.id: c for c in build_cells(config, models).cells}
    pats = [x for x in a.cells.split(",") if x]
    ids = sorted(f.stem for f in (a.eval_dir / "cells").glob("*.json")
                 if any(fnmatch.fnmatch(f.stem, pat) for pat in pats))
    if not ids:
        p.error(f"--cells: no finished cell in {a.eval_dir / 'cells'} matches {a.cells!r}")
    done: dict[tuple[str, str], tuple[BelongingProfile, BelongingProfile, float]] = {}
    rows = []
    for cid in ids:
        rec = json.loads((a.eval_dir / "cells" / f"{cid}.json").read_text())
        cell = cells[cid]
        settings = InversionSettings(**rec["settings"])
        adapter = models.adapter(cell.model)
        bel = np.asarray(rec["belonging"]["calibrated_loss"])
        oth = np.asarray(rec["other"]["calibrated_loss"])
        for rule in RULES:
            path = a.eval_dir / rec["rules"][rule]["profile"]
            if (str(path), rule) not in done:
                before = BelongingProfile.load(path)
                images = ev.images(cell.profile_spec(config))
                ref = None if before.reference_losses is None else torch.tensor(before.reference_losses)
                t0 = time.perf_counter()
                raw, retried = retry_profile_outliers(
                    torch.tensor(before.raw_losses), ref, rule, before.alpha, a.retries,
                    lambda idx, seed: invert(adapter, images[idx], settings=settings, seed=seed).loss,
                    before.inversion_seed)
                seconds = time.perf_counter() - t0
                after = BelongingProfile.from_losses(
                    raw, ref, alpha=before.alpha, rule=rule, metric=before.metric, settings=settings,
                    generator=adapter, reference=None if ref is None else models.adapter(cell.reference),
                    seed=before.seed, inversion_seed=before.inversion_seed, image_bits=before.image_bits,
                    edit=before.edit, retries=a.retries, retried=retried)
                done[(str(path), rule)] = (before, after, seconds)
                print(f"[{cid}] {rule}: retried {retried} in {seconds:.0f} s", file=sys.stderr, flush=True)
            before, after, seconds = done[(str(path), rule)]
            rows.append({"cell": cid, "rule": rule, "retried": after.retried, "seconds": seconds,
                         "before": counts(before, bel, oth), "after": counts(after, bel, oth),
                         "raw_before": [before.raw_losses[i] for i in sorted(set(after.retried))],
                         "raw_after": [after.raw_losses[i] for i in sorted(set(after.retried))]})
    machine = (f"{platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
               f"Python {platform.python_version()}")
    lines = [f"Profile retries on finished evaluation cells ({a.eval_dir}, {machine}); up to {a.retries} "
             "rounds; the test images' losses are the cells' own.", "",
             "| cell | rule | retried | s | sigma before | after | threshold before | after "
             "| TP/FN/FP/TN before | after | acc before | after |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        b, f = r["before"], r["after"]
        lines.append(
            f"| {r['cell']} | {r['rule']} | {r['retried']} | {r['seconds']:.0f} | {b['sigma']:.2e} | {f['sigma']:.2e} "
            f"| {b['threshold']:.2e} | {f['threshold']:.2e} | {b['TP']}/{b['FN']}/{b['FP']}/{b['TN']} "
            f"| {f['TP']}/{f['FN']}/{f['FP']}/{f['TN']} | {b['acc']:.3f} | {f['acc']:.3f} |")
    table = "\n".join(lines) + "\n"
    print(table)
    if a.out:
        write_text(a.out, table)
        write_text(a.out.with_suffix(".json"), json.dumps({"machine": machine, "args": {k: str(v) for k, v in vars(a).items()},
                                                           "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
