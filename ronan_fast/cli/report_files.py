"""What ``inspect`` shows on the terminal, and the image files it reads."""

from __future__ import annotations

import math
from pathlib import Path

from ronan_fast.imageio import display_path
from ronan_fast.reports.session import list_inputs as expand_inputs

__all__ = ["expand_inputs", "fmt", "fmt_p", "print_summary", "print_table"]  # expand_inputs: inspect's inputs


def fmt(v, spec: str = ".3g") -> str:
    if v is None or v == "":
        return "-"
    try:
        return format(float(v), spec)
    except (TypeError, ValueError):
        return str(v)


def fmt_p(p) -> str:
    """A p-value for people: never "0" (the test gives exactly 0 far out in the tail)."""
    if p is None:
        return "-"
    p = float(p)
    if p == 0.0 or (math.isfinite(p) and p < 1e-300):
        return "<1e-300"
    return f"{p:.2g}"


def print_table(records: list[dict], header: dict, limit: int = 50) -> None:
    """The records as a table on stdout (file names escaped), at most ``limit`` rows."""
    print(f"{'image':<32} {'loss A':>9} {'ref A_r':>9} {'A/A_r':>9} {'G':>8} {'p':>8}  verdict")
    for r in records[:limit]:
        name = display_path(r.get("path") or "-")
        if len(name) > 32:
            name = "..." + name[-29:]
        if r.get("error"):
            print(f"{name:<32} {'':>9} {'':>9} {'':>9} {'':>8} {'':>8}  error: {r['error']}")
            continue
        print(f"{name:<32} {fmt(r.get('loss')):>9} {fmt(r.get('reference_loss')):>9} "
              f"{fmt(r.get('calibrated_loss')):>9} {fmt(r.get('statistic')):>8} {fmt_p(r.get('p_value')):>8}  "
              f"{r.get('verdict')}")
    if len(records) > limit:
        print(f"... {len(records) - limit} more in the report")


def print_summary(records: list[dict], header: dict, output: Path | None = None, html: Path | None = None,
                  grid: Path | None = None) -> None:
    """One line of verdicts (the model by name, the test and its threshold), then the files written."""
    errors = [r for r in records if r.get("error")]
    judged = [r for r in records if not r.get("error")]
    yes = sum(1 for r in judged if r.get("belongs") is True)
    scale = "log A'" if header["rule"] == "grubbs-log" else "A'"
    edit = header["profile"].get("edit")
    print(f"{len(judged)} images judged: {yes} belong to {header['model']['name']}, {len(judged) - yes} do not "
          f"(one-sided Grubbs test on {scale}, rule {header['rule']}, alpha={header['alpha']}, "
          f"G_crit={header['critical_value']:.4f}, threshold A' < {header['threshold']:.4g}"
          + (f"; profile of images edited by {edit}" if edit else "") + ")"
          + (f"; {len(errors)} could not be processed" if errors else ""))
    for label, path in (("report", output), ("html", html), ("grid", grid)):
        if path is not None:
            print(f"{label}: {display_path(path)}")
