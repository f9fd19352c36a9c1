"""The profile's histogram of calibrated losses, with the inspected images marked, as inline SVG."""

from __future__ import annotations

import html
import math

import numpy as np

from ronan_fast.reports.text import _data_value, _fmt, _plain

def _nice_step(span: float, target: int = 6) -> float:
    raw = span / max(target, 1)
    mag = 10 ** math.floor(math.log10(raw))
    for m in (1, 2, 2.5, 5, 10):
        if raw <= m * mag:
            return m * mag
    return 10 * mag


def _linear_ticks(lo: float, hi: float) -> list[float]:
    step = _nice_step(hi - lo)
    first = math.ceil(lo / step)
    ticks = []
    k = first
    while k * step <= hi + step * 1e-9:
        ticks.append(float(f"{k * step:.12g}"))  # without float noise such as 0.30000000000000004
        k += 1
    return ticks


def _log_ticks(lo: float, hi: float) -> list[float]:
    """Tick values (not logs) for an axis from 10**lo to 10**hi."""
    decades = [10.0 ** k for k in range(math.ceil(lo - 1e-9), math.floor(hi + 1e-9) + 1)]
    if len(decades) > 8:
        every = math.ceil(len(decades) / 8)
        decades = [d for j, d in enumerate(decades) if j % every == 0]
    if len(decades) >= 3:
        return decades
    ticks = [m * 10.0 ** k for k in range(math.floor(lo) - 1, math.ceil(hi) + 1) for m in (1, 2, 5)]
    ticks = [t for t in ticks if lo - 1e-9 <= math.log10(t) <= hi + 1e-9]
    if len(ticks) >= 3:
        return ticks
    return [t for t in _linear_ticks(10 ** lo, 10 ** hi) if t > 0]


def _histogram_svg(profile: dict, records: list[dict]) -> tuple[str, list[str]]:
    """The profile's histogram of calibrated losses as inline SVG, and notes on what it leaves out."""
    log = profile["rule"] == "grubbs-log"
    notes: list[str] = []

    def scaled(v: float | None) -> float | None:
        if v is None or not math.isfinite(v):
            return None
        if log:
            return math.log10(v) if v > 0 else None
        return v

    prof = [scaled(v) for v in profile["calibrated_losses"]]
    if log and any(p is None for p in prof):
        notes.append(f"{sum(p is None for p in prof)} profile image(s) with A′ = 0 lie off the log axis")
    prof = [p for p in prof if p is not None]
    marks = [(i, r) for i, r in enumerate(records) if r["verdict"] != "error" and r["calibrated_loss"] is not None]
    unmarked = sum(1 for r in records if r["verdict"] != "error" and r["calibrated_loss"] is None)
    if unmarked:
        notes.append(f"{unmarked} image(s) without a calibrated loss are not marked")
    threshold = scaled(profile["threshold"])
    if threshold is None:
        notes.append("the threshold is not a finite number" + (" > 0" if log else "") + ": no threshold line")
    centre = None
    if profile["mu"] is not None:
        centre = profile["mu"] / math.log(10) if log else profile["mu"]
    values = prof + [t for t in (scaled(r["calibrated_loss"]) for _, r in marks) if t is not None]
    values += [v for v in (threshold, centre) if v is not None and math.isfinite(v)]
    if values:
        lo, hi = min(values), max(values)
    else:
        lo, hi = (-1.0, 0.0) if log else (0.0, 1.0)
    if hi - lo <= 1e-9 * max(abs(hi), abs(lo)):  # one value: widen around it
        half = 0.5 if log else (abs(hi) * 0.1 or 1.0)
        lo, hi = lo - half, hi + half
    pad = (hi - lo) * 0.04
    lo, hi = lo - pad, hi + pad

    # Layout (pixels): bars above the axis, the inspected images' markers in rows under it,
    # tick labels under the markers.
    width, left, right, top, bar_h = 820, 56, 20, 30, 150
    plot_w = width - left - right
    base = top + bar_h

    def x_of(t: float) -> float:
        return left + (t - lo) / (hi - lo) * plot_w

    # markers: greedy rows so that markers closer than 9 px go to different rows
    level_last: list[float] = []
    placed = []
    for i, r in marks:
        t = scaled(r["calibrated_loss"])
        x = left - 4.0 if t is None else x_of(t)
        level = next((k for k, last in enumerate(level_last) if x - last >= 9), None)
        if level is None:
            if len(level_last) < 6:
                level_last.append(x)
                level = len(level_last) - 1
            else:
                level = min(range(len(level_last)), key=lambda k: level_last[k])
        level_last[level] = x
        placed.append((i, r, x, t is None, level))
    n_levels = max(1, len(level_last))
    strip_top = base + 6
    strip_h = n_levels * 12 + 4
    tick_y = strip_top + strip_h + 14
    height = tick_y + 28

    parts = [f'<svg id="histogram" class="histogram" viewBox="0 0 {width} {height}" '
             f'width="{width}" height="{height}" role="img" aria-labelledby="histogram-title">',
             f'<title id="histogram-title">Calibrated losses A′ of the {len(profile["calibrated_losses"])} profile '
             f'images ({"log" if log else "linear"} axis), the threshold, and {len(marks)} inspected image(s)</title>']
    # the side of the axis where images do not belong
    if threshold is not None:
        xt = x_of(threshold)
        parts.append(f'<rect class="reject-zone" x="{xt:.2f}" y="{top}" width="{max(0.0, left + plot_w - xt):.2f}" '
                     f'height="{strip_top + strip_h - top}" fill="#fdecea"/>')

    # bars
    counts: list[int] = []
    if prof:
        pmin, pmax = min(prof), max(prof)
        k = min(40, max(5, math.ceil(math.sqrt(len(prof))) + 2))
        if pmax - pmin <= 1e-9 * max(abs(pmax), abs(pmin)):
            edges = [pmin - (hi - lo) / 80, pmin + (hi - lo) / 80]
            counts = [len(prof)]
        else:
            edges = list(np.linspace(pmin, pmax, k + 1))
            counts = np.histogram(prof, bins=edges)[0].tolist()
        top_count = max(counts)
        parts.append('<g class="bars">')
        for j, c in enumerate(counts):
            if c == 0:
                continue
            x0, x1 = x_of(edges[j]), x_of(edges[j + 1])
            h = c / top_count * (bar_h - 8)
            lo_v, hi_v = (10 ** edges[j], 10 ** edges[j + 1]) if log else (edges[j], edges[j + 1])
            parts.append(f'<rect class="bar" x="{x0:.2f}" y="{base - h:.2f}" width="{max(0.5, x1 - x0 - 1):.2f}" '
                         f'height="{h:.2f}" fill="#8fa3b8"><title>{c} profile image(s) with A′ in '
                         f'[{_fmt(lo_v)}, {_fmt(hi_v)}]</title></rect>')
        parts.append("</g>")
        parts.append(f'<text class="y-label" x="{left - 6}" y="{base - (bar_h - 8) + 4:.2f}" text-anchor="end">'
                     f'{top_count}</text>')
        parts.append(f'<text class="y-label" x="{left - 6}" y="{base + 4}" text-anchor="end">0</text>')
        parts.append(f'<text class="axis-title" x="{left - 40}" y="{top + bar_h / 2:.0f}" text-anchor="middle" '
                     f'transform="rotate(-90 {left - 40} {top + bar_h / 2:.0f})">profile images</text>')
    else:
        notes.append("the profile's own losses are not available: no histogram bars")

    # axis and ticks
    parts.append(f'<line class="axis" x1="{left}" y1="{base}" x2="{left + plot_w}" y2="{base}" stroke="#333"/>')
    ticks = _log_ticks(lo, hi) if log else _linear_ticks(lo, hi)
    parts.append('<g class="ticks">')
    for v in ticks:
        x = x_of(math.log10(v) if log else v)
        if not left - 0.5 <= x <= left + plot_w + 0.5:
            continue
        parts.append(f'<line x1="{x:.2f}" y1="{base}" x2="{x:.2f}" y2="{strip_top + strip_h}" stroke="#ccc"/>')
        parts.append(f'<text x="{x:.2f}" y="{tick_y}" text-anchor="middle">{_fmt(v, ".3g")}</text>')
    parts.append("</g>")
    axis_name = "calibrated loss A′ = A / A_r" + (" (log scale)" if log else "")
    parts.append(f'<text class="axis-title" x="{left + plot_w / 2:.0f}" y="{tick_y + 20}" text-anchor="middle">'
                 f'{axis_name}</text>')
    parts.append(f'<text class="strip-label" x="{left - 6}" y="{strip_top + 10}" text-anchor="end">images</text>')

    # profile mean (the geometric mean for grubbs-log)
    if centre is not None and math.isfinite(centre):
        xc = x_of(centre)
        what = "exp(μ), μ the mean of ln A′" if log else "μ, the mean of A′"
        parts.append(f'<line class="mean" x1="{xc:.2f}" y1="{top}" x2="{xc:.2f}" y2="{base}" stroke="#555" '
                     f'stroke-dasharray="4 3"><title>profile centre {what}: {_fmt(10 ** centre if log else centre)}'
                     f'</title></line>')
    # threshold
    if threshold is not None:
        xt = x_of(threshold)
        parts.append(f'<line class="threshold" data-value="{_data_value(profile["threshold"])}" x1="{xt:.2f}" '
                     f'y1="{top - 6}" x2="{xt:.2f}" y2="{strip_top + strip_h}" stroke="#b42318" stroke-width="2">'
                     f'<title>threshold A′ = {_fmt(profile["threshold"], ".6g")}: images left of it belong'
                     '</title></line>')
        anchor = "end" if xt > left + plot_w * 0.7 else "start"
        dx = -5 if anchor == "end" else 5
        parts.append(f'<text class="threshold-label" x="{xt + dx:.2f}" y="{top + 4}" text-anchor="{anchor}">'
                     f'threshold {_fmt(profile["threshold"], ".4g")}</text>')

    # inspected images
    parts.append('<g class="markers">')
    for i, r, x, off_axis, level in placed:
        y = strip_top + 3 + level * 12
        cls = "belongs" if r["verdict"] == "belongs" else "not-belongs"
        if r["verdict"] == "belongs":
            shape = f'<circle cx="{x:.2f}" cy="{y + 5}" r="4.5"'
        else:
            shape = f'<path d="M{x:.2f},{y}l5,5l-5,5l-5,-5z"'
        label = r["path"] if r["path"] is not None else "(no path)"
        where = "A′ = 0, off the log axis" if off_axis else f"A′ = {_fmt(r['calibrated_loss'])}"
        tip = f"#{i + 1} {_plain(label)}: {where}, G = {_fmt(r['statistic'])}, {r['verdict']}"
        parts.append(f'{shape} class="marker {cls}{" off-axis" if off_axis else ""}" data-index="{i}" '
                     f'data-verdict="{r["verdict"]}"><title>{html.escape(tip, quote=False)}</title>'
                     f'{"</circle>" if r["verdict"] == "belongs" else "</path>"}')
    parts.append("</g></svg>")
    return "\n".join(parts), notes
