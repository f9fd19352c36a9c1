"""Reports from finished cells: a tidy CSV, a Markdown summary and PNG figures."""

from __future__ import annotations

import csv
import io
import math
import os
import platform
from pathlib import Path

import numpy as np

from ronan_fast._atomic import atomic_path
from ronan_fast.evaluation.config import TABLES, Cell, EvalConfig
from ronan_fast.evaluation.runner import cell_path
from ronan_fast.evaluation.store import write_text
from ronan_fast.profile import RULES

__all__ = ["CSV_COLUMNS", "PAPER_OVERALL", "write_csv", "write_summary", "write_figures", "pooled"]

#: the paper's overall result (Wang et al., NeurIPS 2023); per-table figures are not reproduced here
PAPER_OVERALL = "95.7% TPR at about 5% FPR (overall, 8 generators)"

CSV_COLUMNS = [
    "config", "table", "cell", "model", "reference", "metric", "belonging_images", "other_images",
    "n_profile", "n_belonging", "n_other", "rule", "tp", "fp", "fn", "tn", "accuracy", "tpr", "fpr",
    "auc", "settings", "critical_value", "threshold", "profile_mu", "profile_sigma", "seconds", "compute_seconds",
    "steps", "restarts", "lr", "threads", "finished", "paper",
]

_RULE_NOTE = {"grubbs": "the one-sided Grubbs test on A'", "grubbs-log": "the same test on log A'"}
#: the paper column of the per-table rows (the overall figure; see PAPER_OVERALL)
PAPER_CELL = "overall 95.7% TPR, ~5% FPR"


def _rows(records: list[dict]) -> list[dict]:
    rows = []
    for rec in records:
        c = rec["cell"]
        for rule in RULES:
            r = rec["rules"][rule]
            rows.append({
                "config": rec["config"], "table": c["table"], "cell": c["id"], "model": c["model"],
                "reference": c["reference"] or "none", "metric": c["metric"],
                "belonging_images": rec["belonging"]["images"], "other_images": rec["other"]["images"],
                "n_profile": r["n"], "n_belonging": rec["belonging"]["n"], "n_other": rec["other"]["n"],
                "rule": rule, "tp": r["tp"], "fp": r["fp"], "fn": r["fn"], "tn": r["tn"],
                "accuracy": round(r["accuracy"], 6), "tpr": round(r["tpr"], 6), "fpr": round(r["fpr"], 6),
                "auc": round(rec["auc"], 6), "settings": c.get("settings") or rec["config_identity"]["settings"],
                "critical_value": round(r["critical_value"], 6),
                "threshold": f"{r['threshold']:.6g}", "profile_mu": f"{r['mu']:.6g}",
                "profile_sigma": f"{r['sigma']:.6g}", "seconds": round(rec["seconds"], 2),
                "compute_seconds": round(rec["compute_seconds"], 2), "steps": rec["settings"]["steps"],
                "restarts": rec["settings"]["restarts"], "lr": rec["settings"]["lr"], "threads": rec["threads"],
                "finished": rec["finished"], "paper": PAPER_OVERALL,
            })
    return rows


def write_csv(path: str | os.PathLike, records: list[dict]) -> Path:
    """``cells.csv``: one row per cell and rule (atomically written)."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, lineterminator="\n")
    w.writeheader()
    for row in _rows(records):
        w.writerow(row)
    return write_text(path, buf.getvalue())


def pooled(records: list[dict], tables=("2", "3", "4", "7")) -> dict[str, dict]:
    """Per rule, confusion counts summed over the cells of ``tables`` and the rates they give."""
    out = {}
    for rule in RULES:
        t = {"tp": 0, "fp": 0, "fn": 0, "tn": 0, "cells": 0}
        for rec in records:
            if rec["cell"]["table"] in tables:
                r = rec["rules"][rule]
                for k in ("tp", "fp", "fn", "tn"):
                    t[k] += r[k]
                t["cells"] += 1
        pos, neg = t["tp"] + t["fn"], t["fp"] + t["tn"]
        t["tpr"] = t["tp"] / pos if pos else float("nan")
        t["fpr"] = t["fp"] / neg if neg else float("nan")
        t["accuracy"] = (t["tp"] + t["tn"]) / (pos + neg) if pos + neg else float("nan")
        out[rule] = t
    return out


def _pct(x: float) -> str:
    return "-" if x is None or not math.isfinite(x) else f"{100 * x:.1f}%"


def write_summary(path: str | os.PathLike, config: EvalConfig, cells: list[Cell], records: list[dict],
                  omitted: list[tuple[str, str]], not_run: dict[str, str], command: str,
                  reference_candidates: tuple[str, ...] = (), models=None,
                  computed_by: list[str] | None = None) -> Path:
    """``summary.md``: settings, how to read the numbers, every table, and what is not finished.

    ``command`` wrote the report; ``computed_by`` lists the commands that computed cells.
    ``models`` (a :class:`~ronan_fast.evaluation.models.ModelSource`) words the image sets of
    cells that are not finished."""
    import torch

    import ronan_fast

    by_id = {r["cell"]["id"]: r for r in records}
    done = [c for c in cells if c.id in by_id]
    partial = len(done) < len(cells)
    plain = [r for r in records if not r["cell"].get("settings")]
    settings = plain[0]["settings"] if plain else None
    lines = [
        f"# RONAN evaluation, `{config.name}` configuration"
        + (f" -- PARTIAL: {len(done)} of {len(cells)} cells finished" if partial else f" ({len(done)} cells)"),
        "",
        "Commands that computed cells in this folder, in order (`commands.txt`):",
        "",
        *[f"    {c}" for c in (computed_by or ["(none recorded)"])],
        "",
        f"This report was written by `{command}`.",
        "",
        f"ronan_fast {ronan_fast.__version__}, torch {torch.__version__}, Python {platform.python_version()}, "
        f"CPU threads per run: {sorted({r['threads'] for r in records}) if records else '-'}.",
        "",
        "## Settings",
        "",
        f"- Belonging profile: n = {config.n_profile} images generated by the model (seed stream "
        f"`profile`, seed {config.profile_seed}); alpha = {config.alpha}.",
        f"- Per cell: {config.n_belonging} belonging images (generated by the model, seed stream `test`, seed "
        f"{config.test_seed}) and {config.n_other} other images: one image moves a cell's TPR by "
        f"{100 / config.n_belonging:.0f} and its FPR by {100 / config.n_other:.0f} percentage points.",
        f"- Inversion: preset `{config.settings}` with overrides {dict(config.overrides) or 'none'}, inversion "
        f"seed {config.inversion_seed}"
        + (f"; resolved: steps={settings['steps']}, lr={settings['lr']}, restarts={settings['restarts']}, "
           f"schedule={settings['schedule']}, precision={settings['precision']}." if settings else "."),
        "- Every image is quantised to 8 bits before inversion (`round(x*255)/255`, as if saved to PNG), the "
        "profile's images included, as `Attributor.fit` does (`image_bits=8`). The harness builds each profile "
        "with `BelongingProfile.from_losses` from cached inversions (same settings, seeds and reference model as "
        "`Attributor.fit`; its own seed stream for the generated images) so that cells share them. Inversions run "
        "their full length (no early stop), as `Attributor.attribute(early_stop=False)` would.",
        f"- Reference model: the first of {', '.join(reference_candidates) or '(none named)'} that is trained on other data "
        "than the model under test and did not make the cell's other images (substitutions are listed under "
        "Notes). Table 6 `uncalibrated` cells use none (A' = A).",
        "",
        "## How to read the tables",
        "",
        "- Belonging images are the positives: TP = belonging images judged belonging, FN = belonging images "
        "judged not, FP = other images judged belonging, TN = other images judged not. TPR = TP/(TP+FN), "
        "FPR = FP/(FP+TN), acc = (TP+TN)/all.",
        "- Two rules from the same losses: `grubbs` = " + _RULE_NOTE["grubbs"] + " (the paper's); `grubbs-log` = "
        + _RULE_NOTE["grubbs-log"] + ". Each profile is refitted on the rule's scale.",
        "- AUC: ROC AUC of the calibrated loss A' (lower = belonging), ties counted half. Both rules are "
        "monotone in A', so the AUC is the same for both.",
        "- `s`: wall seconds the cell took when it was computed (inversions already cached by earlier cells "
        "are not counted); `compute s`: the recorded inversion time of every loss set the cell rests on "
        "(profile, belonging and other images under the model and the reference model), wherever computed.",
        f"- Paper column: the paper reports an overall {PAPER_OVERALL}. Per-table figures are not reproduced "
        "here, so the column repeats that overall figure; our zoo (small 28x28 models) is not the paper's.",
        "",
    ]
    pool = pooled(records)
    lines += ["## Overall (attribution Tables 2, 3, 4 and 7, images pooled over finished cells)", "",
              "| rule | cells | TP | FP | FN | TN | TPR | FPR | acc | paper |", "|---|---|---|---|---|---|---|---|---|---|"]
    for rule in RULES:
        t = pool[rule]
        lines.append(f"| {rule} | {t['cells']} | {t['tp']} | {t['fp']} | {t['fn']} | {t['tn']} | {_pct(t['tpr'])} | "
                     f"{_pct(t['fpr'])} | {_pct(t['accuracy'])} | {PAPER_OVERALL} |")
    lines.append("")
    notes = []
    for table in TABLES:
        tcells = [c for c in cells if c.table == table]
        if not tcells:
            continue
        lines += [f"## Table {table}: {TABLES[table]}", "",
                  "| cell | other images | reference | metric | grubbs TP/FP/FN/TN | grubbs acc | "
                  "grubbs-log TP/FP/FN/TN | grubbs-log acc | AUC | s | compute s | paper (overall) |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for c in tcells:
            rec = by_id.get(c.id)
            if c.note:
                notes.append(f"- `{c.id}`: {c.note}")
            if rec is None:
                why = not_run.get(c.id, "not run yet")
                lines.append(f"| {c.id} | {c.other.describe(models)} | {c.reference or 'none'} | {c.metric} | "
                             f"not finished: {why} | | | | | | | |")
                continue
            g, gl = rec["rules"]["grubbs"], rec["rules"]["grubbs-log"]
            bel = "" if c.belonging.edit is None else f" (belonging: {rec['belonging_description']})"
            metric = c.metric
            if c.settings:
                st = rec["settings"]
                metric += (f"; settings `{c.settings}`: {st['restarts']} restarts, {st['steps']} steps, "
                           f"{st['schedule']} lr {st['lr']}, halving every {st['halving_every']}, "
                           f"patience {st['patience']}")
            lines.append(
                f"| {c.id} | {rec['other_description']}{bel} | {c.reference or 'none'} | {metric} | "
                f"{g['tp']}/{g['fp']}/{g['fn']}/{g['tn']} | {_pct(g['accuracy'])} | "
                f"{gl['tp']}/{gl['fp']}/{gl['fn']}/{gl['tn']} | {_pct(gl['accuracy'])} | {rec['auc']:.3f} | "
                f"{rec['seconds']:.1f} | {rec['compute_seconds']:.1f} | {PAPER_CELL} |")
        lines.append("")
    if omitted:
        lines += ["## Cells left out of this configuration", ""]
        lines += [f"- `{cid}`: {why}" for cid, why in omitted]
        lines.append("")
    if notes:
        lines += ["## Notes", ""] + notes + [""]
    lines += ["## Files", "",
              "- `commands.txt`: every command that computed cells in this folder (the runs may be parts, "
              "each with its own `--cells`).",
              "- `cells.csv`: one row per cell and rule.",
              "- `cells/*.json`: per cell, every image's loss, reference loss, calibrated loss, statistic, "
              "p-value and verdict under both rules.",
              "- `profiles/*.json`: the belonging profiles (`BelongingProfile.save`).",
              "- `figures/hist-*.png`: calibrated losses (log x) of belonging and other images, with the profile's "
              "and both rules' thresholds (like the paper's Fig. 2); `figures/grid-*.png`: images beside their "
              "reconstructions by the model and the reference model (like Figs. 3-5).",
              ""]
    return write_text(path, "\n".join(lines))


# ---------------------------------------------------------------------- figures


def _save_fig(fig, path: Path) -> None:
    from PIL import Image

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    buf.seek(0)
    # a 64-colour palette keeps the figures a few times smaller in the repository
    im = Image.open(buf).convert("RGB").quantize(colors=64)
    with atomic_path(path) as tmp:
        im.save(tmp, format="PNG", optimize=True)


def _hist(rec: dict, path: Path) -> None:
    import matplotlib.pyplot as plt

    bel = np.asarray(rec["belonging"]["calibrated_loss"], dtype=np.float64)
    oth = np.asarray(rec["other"]["calibrated_loss"], dtype=np.float64)
    prof = np.asarray(rec["profile_calibrated_loss"], dtype=np.float64)
    allv = np.concatenate([bel, oth, prof])
    pos = allv[allv > 0]
    floor = pos.min() / 2 if pos.size else 1e-12
    clip = lambda a: np.maximum(a, floor)  # noqa: E731 - a loss of 0 is drawn at the left edge
    lo, hi = clip(allv).min(), clip(allv).max()
    bins = np.geomspace(lo, hi * 1.0001 if hi > lo else lo * 10, 31)
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    ax.hist(clip(bel), bins=bins, alpha=0.6, label=f"belonging ({bel.size})", color="tab:blue")
    ax.hist(clip(oth), bins=bins, alpha=0.6, label=f"other ({oth.size})", color="tab:orange")
    ax.hist(clip(prof), bins=bins, histtype="step", linestyle="--", color="grey", label=f"profile ({prof.size})")
    for rule, style in (("grubbs", "-"), ("grubbs-log", ":")):
        th = rec["rules"][rule]["threshold"]
        if th > 0:
            ax.axvline(th, color="k", linestyle=style, label=f"{rule} threshold")
    ax.set_xscale("log")
    ax.set_xlabel("calibrated reconstruction loss A'" if rec["cell"]["reference"] else "reconstruction loss A")
    ax.set_ylabel("images")
    c = rec["cell"]
    ax.set_title(f"{c['id']}: AUC {rec['auc']:.3f}", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    _save_fig(fig, path)
    plt.close(fig)


def shown_reconstruction(metric: str, recon, images):
    """What a grid shows as an image's reconstruction: the generator's output, or for
    "mse-tone" its tone-fitted image (what that loss compares with the image), clipped to [0, 1]."""
    if metric != "mse-tone":
        return recon
    from ronan_fast.metrics import ToneMSE

    k = min(recon.shape[0], images.shape[0])
    return ToneMSE().fit(recon[:k].float(), images[:k].float()).clamp(0, 1).float()


def _grid(rec: dict, previews: dict, path: Path) -> bool:
    import matplotlib.pyplot as plt

    rows = []
    metric = rec["cell"].get("metric", "mse")
    note = "\n(tone-fitted)" if metric == "mse-tone" else ""
    for side in ("belonging", "other"):
        if side not in previews:
            return False
        imgs, rec_m = previews[side]
        rows.append((f"{side}", imgs))
        rows.append((f"{rec['cell']['model']} recon.{note}", shown_reconstruction(metric, rec_m, imgs)))
        ref = previews.get(f"{side}_ref")
        if ref is not None:
            rows.append((f"{rec['cell']['reference']} recon.{note}", shown_reconstruction(metric, ref[1], imgs)))
    k = min(r[1].shape[0] for r in rows)
    if k == 0:
        return False
    fig, axes = plt.subplots(len(rows), k, figsize=(1.0 * k + 1.2, 1.0 * len(rows) + 0.4), squeeze=False)
    cal = {s: rec[s]["calibrated_loss"] for s in ("belonging", "other")}
    for i, (label, imgs) in enumerate(rows):
        for j in range(k):
            ax = axes[i][j]
            img = imgs[j].numpy()
            ax.imshow(img[0] if img.shape[0] == 1 else np.transpose(img, (1, 2, 0)), cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if label in ("belonging", "other"):
                ax.set_title(f"A'={cal[label][j]:.2g}", fontsize=6)
            if j == 0:
                ax.set_ylabel(label, fontsize=6)
    fig.suptitle(f"{rec['cell']['id']}: images and their reconstructions", fontsize=8)
    fig.tight_layout()
    _save_fig(fig, path)
    plt.close(fig)
    return True


def write_figures(out_dir: str | os.PathLike, records: list[dict], previews) -> list[Path]:
    """Per finished cell, ``figures/hist-<cell>.png`` and (when the loss cache holds the previews)
    ``figures/grid-<cell>.png``; a figure newer than its cell file is kept. Returns the paths written."""
    import matplotlib

    matplotlib.use("Agg")
    out_dir = Path(out_dir)
    written = []
    for rec in records:
        cid = rec["cell"]["id"]
        src = cell_path(out_dir, cid)
        stamp = src.stat().st_mtime if src.exists() else float("inf")
        h = out_dir / "figures" / f"hist-{cid}.png"
        if not h.exists() or h.stat().st_mtime < stamp:
            _hist(rec, h)
            written.append(h)
        g = out_dir / "figures" / f"grid-{cid}.png"
        if not g.exists() or g.stat().st_mtime < stamp:
            if _grid(rec, previews(rec), g):
                written.append(g)
    return written
