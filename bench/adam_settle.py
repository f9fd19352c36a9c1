"""Per-row Adam trajectories behind the Adam phase's settle rule (``InversionSettings.adam_settle_window``).

For each generator (the tuning half's encoder-started GANs by default), ``--n-own`` of its own
8-bit images and ``--n-real`` real ones are inverted with its warm-start default, but with no
first search and no settle rule in the Adam phase (``first_steps=0``, ``adam_settle_window=0``),
so that every image runs the full 4-start search; each row's best loss is recorded at every
stopping check (every ``check_every`` steps), as a ratio to the convergence line (1% of the
authors' loop's median loss over ``--n-line`` real images, as in :mod:`bench.heldout`).

Then each candidate rule (a row at a multiple of ``window`` of its steps, from ``from`` on, over
``above`` times the line, whose best loss fell by less than ``min_drop`` over the window, stops)
is applied to the recorded trajectories:

* own rows that would have ended under 20x the line but the rule stops (rows in their image's
  basin: the risk; a stopped row keeps its best input, and the image's polish starts from its
  best row, so a stopped row only matters where it would have become that best row);
* own images whose best row at the end of the Adam phase the rule stops short: at a loss over
  1% above the one it ends the Adam phase with (the image's polish would start from a worse
  input; a row stopped where it ends anyway changes nothing);
* the real images' Adam row-steps the rule saves (the gain).

Usage::

    python -m bench.adam_settle --n-own 96 --n-real 32 --encoders runs/enc --threads 1 \\
        --out bench/results/adam_settle_trajectories_cpu.md
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

from bench.heldout import authors_run, candidate_adapter, own_images, real_images, round8
from bench.machine import machine, machine_line
from ronan_fast.evaluation.store import write_text

#: (above, min_drop, from) candidates; the window is --window. "from" is a step count, or
#: "half": the second half of the schedule, as the rule in the package
RULES = [(a, d, f) for f in (100, "half") for a in (10.0, 20.0, 30.0) for d in (0.05, 0.1)]
#: a row ending under this many times the line is counted as in its image's basin
NEAR = 20.0


def recording_settings(inv):
    """``inv``'s warm-start default without the first search and without the Adam phase's settle rule."""
    from bench.convergence import settings_for

    return settings_for(inv, {"settings": "default", "first_steps": 0, "adam_settle_window": 0})


def record(inv, images: torch.Tensor, line: float, s, seed: int, chunk: int = 16) -> list[dict]:
    """Each image's rows' trajectories ``{row: [(step, best loss / line), ...]}`` (row 0 its
    guess's) and its final loss / line, inverted with settings ``s`` to the verdict (``line``)."""
    import ronan_fast.inversion.adam as adam
    from ronan_fast.inversion import invert

    seen: dict = {}
    rule = adam.rows_to_keep

    def spy(batch, st, mixed):  # the rule as it is, each row's best loss read at its checks
        due = (batch.t % st.check_every == 0) | (batch.t == st.steps)
        for r, t, v, d in zip(batch.rows.tolist(), batch.t.tolist(), batch.best_loss.tolist(), due.tolist()):
            if d:
                seen.setdefault(r, []).append((t, v / line))
        return rule(batch, st, mixed)

    out = []
    adam.rows_to_keep = spy
    try:
        for k in range(0, images.shape[0], chunk):
            seen.clear()
            res = invert(inv, images[k : k + chunk], settings=s, seed=seed, stop_below=line)
            per = s.restarts
            for i, f in enumerate((res.loss.double() / line).tolist()):
                rows = {r % per: seen[r] for r in range(i * per, (i + 1) * per) if r in seen}
                if len(rows) != per:  # rows are numbered per chunk of the batch: one chunk expected
                    raise RuntimeError(f"image {k + i}: {len(rows)} of its {per} rows recorded; use a smaller --chunk")
                out.append({"final": f, "rows": rows})
            print(f"  {k + res.loss.shape[0]}/{images.shape[0]}", file=sys.stderr, flush=True)
    finally:
        adam.rows_to_keep = rule
    return out


def best_row(rows: dict) -> int:
    """The row of an image's ``{row: trajectory}`` whose best loss is lowest at its last check."""
    return min(rows, key=lambda r: rows[r][-1][1])


def stops_at(traj: list, above: float, min_drop: float, window: int, start: int) -> int | None:
    """The step at which the rule stops a row with this trajectory, or None."""
    at = dict(traj)
    for t, v in traj:
        if t >= start and t % window == 0 and t - window in at and v > above and v > (1 - min_drop) * at[t - window]:
            return t
    return None


def evaluate(rec: dict, window: int, steps: int) -> list[dict]:
    rows = []
    for above, d, f in RULES:
        start = max(window, (steps + 1) // 2) if f == "half" else f
        risky, best_stopped, saved, total = 0, 0, 0, 0
        for img in rec["own"]:
            trs = img["rows"]
            best = best_row(trs)
            for r, tr in trs.items():
                if tr[-1][1] < NEAR and stops_at(tr, above, d, window, start) is not None:
                    risky += 1
            t = stops_at(trs[best], above, d, window, start)
            best_stopped += t is not None and dict(trs[best])[t] > 1.01 * trs[best][-1][1]
        for img in rec["real"]:
            for tr in img["rows"].values():
                end = tr[-1][0]
                total += end
                t = stops_at(tr, above, d, window, start)
                saved += 0 if t is None else end - t
        rows.append({"above": above, "min_drop": d, "from": f, "own_rows_near_stopped": risky,
                     "own_best_rows_stopped": best_stopped, "real_saved": saved, "real_total": total})
    return rows


def render(raw: dict) -> str:
    m = raw["machine"]
    lines = [
        "# The Adam phase's settle rule: per-row trajectories",
        "",
        machine_line(m, raw["command"]),
        "",
        f"Each image inverted with its generator's warm-start default without the first search and without the rule "
        f"(every image runs the full 4-start, {raw['steps']}-step search), each row's best loss read every 25 steps. A rule "
        f"stops a row at a multiple of {raw['window']} steps, from `from` on, over `above` times the line, whose "
        f"best loss fell by less than `min_drop` over the last {raw['window']} steps. \"own rows near\": own rows "
        f"ending under {NEAR:g}x the line that the rule stops; \"own best rows\": own images whose best row at the "
        "end of the Adam phase the rule stops short (at a loss over 1% above the one the row ends the Adam phase "
        "with); \"real saved\": the real images' Adam row-steps it saves.",
        "",
    ]
    for name, g in raw["generators"].items():
        own_final = [i["final"] for i in g["own"]]
        lines += [f"## {name}", "",
                  f"Line {g['line']:.3g}; {len(g['own'])} own images (seed {raw['seed']}), {len(g['real'])} real; own "
                  f"images converged without the rule: {sum(v < 1 for v in own_final)}/{len(own_final)}; own images "
                  f"whose best row is not the guess's: {g['best_not_guess']}; real images' median final loss "
                  f"{statistics.median(i['final'] for i in g['real']):.3g}x the line.", "",
                  "| above | min_drop | from | own rows near, stopped | own best rows stopped short | real row-steps saved |",
                  "|---|---|---|---|---|---|"]
        for r in g["rules"]:
            lines.append(f"| {r['above']:g} | {r['min_drop']:g} | {r['from']} | {r['own_rows_near_stopped']} | "
                         f"{r['own_best_rows_stopped']} | {r['real_saved']}/{r['real_total']} "
                         f"({r['real_saved'] / max(r['real_total'], 1):.0%}) |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--generators", default="dcgan64-photos,dcgan64n-opencv",
                   help="comma-separated zoo generators with a learned warm start (default: the tuning half's DCGANs)")
    p.add_argument("--n-own", type=int, default=96)
    p.add_argument("--n-real", type=int, default=32)
    p.add_argument("--n-line", type=int, default=4, help="real images the authors' loop inverts for the line")
    p.add_argument("--window", type=int, default=50)
    p.add_argument("--seed", type=int, default=20_000, help="own images' seed (bench.heldout's are 10000 + its seed)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--chunk", type=int, default=16, help="images per inversion call")
    p.add_argument("--encoders", type=Path, default=None, help="folder to keep and reuse trained encoders in")
    p.add_argument("--out", type=Path, required=True, help="Markdown table; the .json beside it has every trajectory")
    p.add_argument("--render", action="store_true", help="only write --out again from the .json beside it")
    a = p.parse_args(argv)
    for name in ("n_own", "n_real", "n_line", "window", "threads", "chunk"):
        if getattr(a, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(a, name)}")
    if a.window % 25:
        p.error(f"--window must be a multiple of 25 (the stopping checks), got {a.window}")
    json_out = a.out.with_suffix(".json")
    if a.render:  # the rules evaluated again on the recorded trajectories
        raw = json.loads(json_out.read_text())
        raw.setdefault("steps", 300)  # a record written before the field: the GAN warm default's
        for g in raw["generators"].values():
            for img in g["own"] + g["real"]:
                img["rows"] = {int(r): [tuple(p) for p in tr] for r, tr in img["rows"].items()}
            g["rules"] = evaluate(g, raw["window"], raw["steps"])
        write_text(json_out, json.dumps(raw, indent=1))
        write_text(a.out, render(raw))
        return 0
    torch.set_num_threads(a.threads)
    from ronan_fast.zoo import zoo_adapter

    raw = {"machine": machine(), "command": "python -m bench.adam_settle " + " ".join(sys.argv[1:] if argv is None
                                                                                     else argv),
           "window": a.window, "seed": a.seed, "generators": {}}
    for name in [g for g in a.generators.split(",") if g]:
        adapter = zoo_adapter(name)
        inv, _ = candidate_adapter(name, adapter, {"warm": "encoder"}, {}, a.encoders)
        real = round8(real_images(name, max(a.n_real, a.n_line)))
        print(f"[{name}] authors' loop on {a.n_line} real images (the line)", file=sys.stderr, flush=True)
        line = 0.01 * statistics.median(authors_run(adapter, real[: a.n_line], 0)["losses"])
        own, _ = own_images(adapter, a.n_own, a.seed)
        g = {"line": line}
        s = recording_settings(inv)
        for label, x in (("real", real[: a.n_real]), ("own", own)):
            print(f"[{name}] {label} images", file=sys.stderr, flush=True)
            g[label] = record(inv, x, line, s, seed=1, chunk=a.chunk)
        g["best_not_guess"] = sum(best_row(i["rows"]) != 0 for i in g["own"])
        raw["steps"] = s.steps
        g["rules"] = evaluate(g, a.window, s.steps)
        raw["generators"][name] = g
        write_text(json_out, json.dumps(raw, indent=1))
        write_text(a.out, render(raw))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
