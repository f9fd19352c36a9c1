"""Speed benchmark: ronan_fast's inversion against the two baselines, measured in one run.

For each generator, the same generated and real images are inverted by

* ``authors``: the paper's loop, one image at a time, 1500 Adam steps, one start
  (``--authors-restarts`` starts run one after another);
* ``plain``: all images times restarts in one batch with ``torch.optim.Adam`` and autograd;
* ``ours`` variants, each switching one part of the fast path on or off: the reference ops
  instead of the compiled kernels, early stopping, successive halving, bf16 autocast, the
  generator's weights in channels-last memory format (a copy of it; its convolutions then run
  NHWC), its eval-mode BatchNorms folded into its convolutions (a copy), and on CUDA the Adam
  step captured in a CUDA graph; and
  ``ours (family default)``, the package's default settings for the generator's family (their
  own steps and starts, e.g. 600 steps x 8 starts and a Levenberg-Marquardt finish for GANs),
  also with the CUDA graph on CUDA.

Reported per row: images per second to verdict, single-image latency (the same method run on the
first generated image alone, timed separately), time per image-step
(generator row-steps actually run), peak memory, the speed ratio to each baseline, and quality
parity: the median loss of the generated (belonging) images and the accuracy of a
leave-one-out Grubbs test on the uncalibrated loss over the same generated and real images.

Usage::

    python -m bench.speed --generators default --n 16 --out bench/results/speed_cpu.md
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import sys
import time
from pathlib import Path

import torch

from bench import generators as G
from bench.baselines import authors_loop, plain_batched
from ronan_fast.evaluation.store import write_text
from ronan_fast.inversion import PRESETS, invert, resolve_settings

try:
    from ronan_fast.grubbs import grubbs_critical_value
except ImportError:  # pragma: no cover - the statistics module ships with the package
    grubbs_critical_value = None


def _reset_peak() -> None:
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    try:  # Linux: reset the resident-set high-water mark
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def _peak_mib(device: str) -> float:
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def loo_grubbs_accuracy(gen_loss: torch.Tensor, real_loss: torch.Tensor, alpha: float = 0.05) -> float:
    """Accuracy of the Grubbs rule on the uncalibrated loss: each generated image is tested
    against a profile of the other generated images, each real image against all of them."""
    if grubbs_critical_value is None or gen_loss.numel() < 4:
        return float("nan")
    g = gen_loss.double()
    correct = 0
    for i in range(g.numel()):
        rest = torch.cat([g[:i], g[i + 1 :]])
        crit = grubbs_critical_value(rest.numel(), alpha)
        correct += bool((g[i] - rest.mean()) / rest.std() < crit)
    crit = grubbs_critical_value(g.numel(), alpha)
    correct += int(((real_loss.double() - g.mean()) / g.std() >= crit).sum())
    return correct / (g.numel() + real_loss.numel())


def variants(steps: int, restarts: int) -> dict[str, dict]:
    """Our configurations, each differing from the full fast path in one part."""
    full = dict(steps=steps, lr=0.1, restarts=restarts, schedule="cosine", halving_every=max(1, steps // 10),
                min_rows=2, patience=max(1, steps // 5))
    return {
        "ours (full)": dict(settings=full, impl="auto", early=True),
        "ours, no early stop": dict(settings={**full, "patience": 0}, impl="auto", early=False),
        "ours, no halving": dict(settings={**full, "halving_every": 0}, impl="auto", early=True),
        "ours, reference ops": dict(settings=full, impl="ref", early=True),
        "ours, bf16 autocast": dict(settings={**full, "precision": "bf16"}, impl="auto", early=True),
        "ours, channels-last": dict(settings=full, impl="auto", early=True, channels_last=True),
        # CUDA only: the Adam step captured in a CUDA graph and replayed
        "ours, CUDA graph": dict(settings=full, impl="auto", early=True, cuda_graph=True),
        # the package's own default for the generator's family (its steps and starts, not --steps/--restarts)
        "ours (family default)": dict(settings=None, impl="auto", early=True),
        # the generator's forward and backward through torch.compile (the warm-up call compiles)
        "ours, compiled": dict(settings=full, impl="auto", early=True, compile=True),
        "ours (family default), compiled": dict(settings=None, impl="auto", early=True, compile=True),
        # ... without the settle rule (the GAN default's: a polished row levelled off far above
        # the threshold leaves the polish)
        "ours (family default), no settle": dict(settings=None, overrides={"settle_patience": 0}, impl="auto",
                                                 early=True),
        # ... its Adam phase alone (no polish): where the time goes, not a configuration to use
        # (the polish is what converges a GAN's own images; compare the accuracy)
        "ours (family default), Adam phase only": dict(settings=None, overrides={"polish_steps": 0}, impl="auto",
                                                       early=True),
        # ... without escalating doubtful verdicts to more polished starts (the one-step default's)
        "ours (family default), no escalation": dict(settings=None, overrides={"polish_escalate": 0}, impl="auto",
                                                     early=True),
        "ours (family default), CUDA graph": dict(settings=None, impl="auto", early=True, cuda_graph=True),
        # for GANs: the GAN default before 24 starts (the preset "gan-8-starts"), for side-by-side runs
        "ours (family default), 8 starts": dict(settings=None, preset="gan-8-starts", impl="auto", early=True),
        # ... with the Adam phase's generator under bf16 autocast (polish and final score in float32)
        "ours (family default), bf16 autocast": dict(settings=None, overrides={"precision": "bf16"}, impl="auto",
                                                     early=True),
        "ours (family default), compiled, bf16 autocast": dict(settings=None, overrides={"precision": "bf16"},
                                                               impl="auto", early=True, compile=True),
        # ... and the generator's weights in channels-last memory format: every CPU lever at once
        "ours (family default), compiled, bf16, channels-last": dict(
            settings=None, overrides={"precision": "bf16"}, impl="auto", early=True, compile=True, channels_last=True),
        # ... with the generator's eval-mode BatchNorms folded into its convolutions (a copy of it)
        "ours (family default), channels-last": dict(settings=None, impl="auto", early=True, channels_last=True),
        "ours (family default), folded BN": dict(settings=None, impl="auto", early=True, fold_bn=True),
        "ours (family default), folded BN, channels-last": dict(settings=None, impl="auto", early=True,
                                                                fold_bn=True, channels_last=True),
        "ours (family default), compiled, folded BN, channels-last": dict(
            settings=None, impl="auto", early=True, compile=True, fold_bn=True, channels_last=True),
        "ours (family default), compiled, bf16, folded BN, channels-last": dict(
            settings=None, overrides={"precision": "bf16"}, impl="auto", early=True, compile=True, fold_bn=True,
            channels_last=True),
        "ours, plain schedule": dict(
            settings=dict(steps=steps, lr=0.1, restarts=restarts, schedule="constant"), impl="auto", early=False
        ),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--generators", default="default")
    p.add_argument("--n", type=int, default=16, help="generated images and as many real images")
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--restarts", type=int, default=8, help="restarts for ours and the plain batch")
    p.add_argument("--authors-restarts", type=int, default=1)
    p.add_argument("--authors-images", type=int, default=0,
                   help="images run through the authors' loop (0: all 2n); its time per image is extrapolated")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--only", default="", help="comma-separated subset of rows to run, e.g. "
                   "'authors,ours, bf16 autocast' (a comma followed by a space belongs to a name)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threshold", type=float, default=None,
                   help="the belonging threshold early stopping uses (a loss on the images' [0, 1] scale, as a "
                   "profile would supply it); default: 1%% of the real images' median loss under the plain batch. "
                   "Without the plain batch (--only) and without this, no row stops early")
    p.add_argument("--out", type=Path)
    p.add_argument("--from-json", type=Path, help="only re-render the table of an earlier run's JSON")
    p.add_argument("--resume", action="store_true",
                   help="keep the rows already in --out's JSON (written after every row) and run only the rest")
    a = p.parse_args(argv)
    if a.threshold is not None and not (math.isfinite(a.threshold) and a.threshold > 0):
        p.error(f"--threshold must be a positive finite loss, got {a.threshold}")
    if a.from_json:
        print(render(json.loads(a.from_json.read_text()), a))
        return 0
    rows = []
    # names hold ", " ("ours, no halving"); the list's own commas have no space after them
    only = set(re.split(r",(?! )", a.only)) if a.only else set()
    json_out = a.out.with_suffix(".json") if a.out else None
    if a.resume:
        if not (json_out and json_out.is_file()):
            p.error("--resume needs --out whose .json exists")
        rows = json.loads(json_out.read_text())
        other = [x for x in rows if x.get("run") != _run_key(a)]
        if other:
            p.error(f"--resume: {json_out} holds rows of another run ({other[0].get('run')}), not {_run_key(a)}")
    for gname in a.generators.split(","):
        bg = G.get(gname, a.device)
        gen = G.generated(bg, a.n, seed=20_000 + a.seed)
        real = bg.real(a.n)
        images = torch.cat([gen, real]).to(a.device)
        n_img = images.shape[0]

        def record(name, method, batch):
            """Time ``method(images)`` on ``batch``, then on the first generated image alone (latency)."""
            if a.only and name not in only:
                return None
            done = [x for x in rows if x["generator"] == gname and x["name"] == name]
            if done:
                return done[0]
            tw = time.perf_counter()
            method(batch[:1])  # warm-up: first-call costs (kernel loading, allocator, compiling) count in neither figure
            _sync(a.device)
            warmup = time.perf_counter() - tw
            _reset_peak()
            t0 = time.perf_counter()
            loss, extra = method(batch)
            _sync(a.device)
            dt = time.perf_counter() - t0
            t1 = time.perf_counter()
            method(batch[:1])
            _sync(a.device)
            latency = time.perf_counter() - t1
            loss = loss.double().cpu()
            r = dict(run=_run_key(a), generator=gname, name=name, seconds=dt, images=extra.get("images", n_img),
                     peak_mib=_peak_mib(a.device), row_steps=extra.get("row_steps", float("nan")),
                     stop_below=extra.get("stop_below"))
            r["latency_s"] = latency
            r["warmup_s"] = warmup  # the first call on one image, compilation included (in the JSON only)
            r["s_per_image"] = dt / r["images"]
            r["img_per_s"] = r["images"] / dt
            r["s_per_row_step"] = dt / r["row_steps"] if r["row_steps"] == r["row_steps"] else float("nan")
            gl, rl = loss[: extra.get("n_gen", a.n)], loss[extra.get("n_gen", a.n):]
            r["gen_median"] = float(gl.median())
            r["real_median"] = float(rl.median()) if rl.numel() else float("nan")
            r["accuracy"] = loo_grubbs_accuracy(gl, rl) if rl.numel() else float("nan")
            rows.append(r)
            if json_out:  # after every row: an interrupted run keeps what it finished
                write_text(json_out, json.dumps(rows, indent=1))
            print(f"[{gname}] {name}: {r['s_per_image']:.3f} s/img, acc {r['accuracy']:.3f}, "
                  f"gen median {r['gen_median']:.2e}", file=sys.stderr, flush=True)
            return r

        # authors' loop: optionally on a subset, in the same generated/real proportion
        k = a.authors_images or n_img
        kg = min(a.n, math.ceil(k / 2))
        sub = torch.cat([gen[:kg], real[: k - kg]]).to(a.device)
        record("authors", lambda x: (authors_loop(bg.adapter, x, a.steps, 0.1, a.authors_restarts, a.seed),
                                     {"images": x.shape[0], "n_gen": min(kg, x.shape[0]),
                                      "row_steps": x.shape[0] * a.steps * a.authors_restarts}), sub)
        plain = record("plain batched",
                       lambda x: (plain_batched(bg.adapter, x, a.steps, 0.1, a.restarts, a.seed),
                                  {"row_steps": x.shape[0] * a.steps * a.restarts}), images)
        # The verdict threshold early stopping uses: a profile would supply it; here it is given
        # (--threshold) or fixed to 1% of the real images' median loss under the plain batch, the
        # same for every variant.
        stop_thr = a.threshold if a.threshold is not None else 0.01 * plain["real_median"] if plain else None
        for name, v in variants(a.steps, a.restarts).items():
            if v.get("cuda_graph") and a.device != "cuda":
                continue
            s = (resolve_settings(bg.adapter, v.get("preset"), **v.get("overrides", {}))
                 if "overrides" in v or "preset" in v
                 else None if v["settings"] is None else PRESETS["authors"].replace(**v["settings"]))
            adapter = G.transformed(bg.adapter, v.get("fold_bn", False), v.get("channels_last", False))

            def run(x, s=s, v=v, adapter=adapter):
                stop = stop_thr if v["early"] else None
                res = invert(adapter, x, settings=s, seed=a.seed, stop_below=stop, impl=v["impl"],
                             cuda_graph=v.get("cuda_graph", False), compile_generator=v.get("compile", False))
                return res.loss, {"row_steps": float(res.row_steps.sum()), "stop_below": stop}

            try:
                record(name, run, images)
            except RuntimeError as e:
                if not v.get("cuda_graph"):
                    raise
                # a generator that cannot be captured: the other rows still count
                print(f"[{gname}] {name}: not measured: {e}", file=sys.stderr, flush=True)
    table = render(rows, a)
    print(table)
    if a.out:
        write_text(a.out, table)  # the JSON was written after every row
    return 0


def _run_key(a) -> dict:
    """What a row's figures depend on besides the generator and the method: rows of one table share it."""
    key = dict(n=a.n, steps=a.steps, restarts=a.restarts, authors_restarts=a.authors_restarts,
               authors_images=a.authors_images, device=a.device, seed=a.seed, threads=torch.get_num_threads())
    if a.threshold is not None:  # absent otherwise: earlier runs' JSON (no such option then) still match
        key["threshold"] = a.threshold
    return key


def render(rows, a) -> str:
    dev = a.device
    gpu = torch.cuda.get_device_name() if dev == "cuda" else "no GPU"
    head = (f"Speed benchmark on {dev.upper()} ({gpu}; {os.cpu_count()} cores, {torch.get_num_threads()} threads; "
            f"torch {torch.__version__}; Python {platform.python_version()}). {a.n} generated + {a.n} real images, "
            f"{a.steps} steps, {a.restarts} restarts for batched rows, authors' loop with {a.authors_restarts} "
            f"start(s). Accuracy: leave-one-out Grubbs test (alpha 0.05) on the uncalibrated loss.\n\n")
    stops = {}
    for r in rows:
        if r.get("stop_below") is not None:
            stops.setdefault(r["generator"], set()).add(r["stop_below"])
    if stops:
        how = ("given (--threshold)" if getattr(a, "threshold", None) is not None
               else "1% of the real images' median loss under the plain batch")
        head += ("Early stopping's belonging threshold, " + how + ": "
                 + "; ".join(f"{g} {', '.join(f'{x:.3g}' for x in sorted(v))}" for g, v in stops.items())
                 + ". Rows without early stopping ignore it.\n\n")
    cols = ["generator", "method", "img/s", "s/img", "latency s", "row-steps/img", "s per row-step", "peak MiB",
            "x authors", "x plain", "x authors latency", "gen median loss", "accuracy"]
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        base = {x["name"]: x for x in rows if x["generator"] == r["generator"]}
        xa = base["authors"]["s_per_image"] / r["s_per_image"] if "authors" in base else float("nan")
        xp = base["plain batched"]["s_per_image"] / r["s_per_image"] if "plain batched" in base else float("nan")
        lat = r.get("latency_s", float("nan"))  # rows of runs before latency was measured have none
        xl = base["authors"].get("latency_s", float("nan")) / lat if "authors" in base else float("nan")
        out.append(f"| {r['generator']} | {r['name']} | {r['img_per_s']:.2f} | {r['s_per_image']:.3f} | {lat:.3f} | "
                   f"{r['row_steps'] / r['images']:.0f} | "
                   f"{r['s_per_row_step'] * 1e6:.1f} us | {r['peak_mib']:.0f} | {xa:.1f} | {xp:.2f} | {xl:.1f} | "
                   f"{r['gen_median']:.2e} | {r['accuracy']:.3f} |")
    return head + "\n".join(out) + "\n"


if __name__ == "__main__":
    sys.exit(main())
