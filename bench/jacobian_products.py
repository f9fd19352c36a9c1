"""What a Jacobian product costs: forward mode against reverse mode, per generator and batch.

The Krylov polishes (``polish_gmres_iters``, ``polish_method="cg"``) are nothing but products
with the generator's Jacobian ``J`` at a fixed point: ``J v`` (GMRES, CG) and ``J^T w`` (CG).
``ronan_fast.inversion._JacobianProducts`` takes ``J v`` by reverse mode (the derivative of a
recorded ``J^T u``) where the generator allows, instead of forward-mode ``torch.func.jvp``. This
benchmark times, for ``--rows`` rows of each generator's latents (random latents; the product's
cost does not depend on the point): a forward pass, a forward and backward pass, ``J v`` by
forward mode, the one-off recording of ``J^T u`` with ``create_graph`` (once per polish step),
``J v`` by reverse mode on that recording, and ``J^T w`` on it; and checks that both ``J v``
agree. Each figure is the fastest of ``--repeats`` timings of ``--calls`` calls.

Run: ``python -m bench.jacobian_products [--generators onestep-fmnist] [--rows 16,64]
[--device cuda] [--out FILE.md]``.
"""

from __future__ import annotations

import argparse
import platform
import sys

import torch
from torch.func import jvp

from bench import generators as G
from bench.overhead import _timed
from bench.report import finish, int_list
from ronan_fast.inversion import _forward_ad_attention, _JacobianProducts


def _ms_per_call(fn, device: torch.device, calls: int, repeats: int) -> float:
    """Fastest of ``repeats`` timings of ``calls`` calls of ``fn``, per call, in milliseconds."""
    fn()  # warm-up
    return min(_timed(lambda: [fn() for _ in range(calls)], device) for _ in range(repeats)) / calls * 1e3


def measure(bg: G.BenchGenerator, rows: int, calls: int, repeats: int) -> dict:
    ad = bg.adapter
    device = ad.device
    z = ad.sample_latents(rows, torch.Generator().manual_seed(0)).to(device)
    v = torch.randn(z.shape, generator=torch.Generator().manual_seed(1)).to(device)

    def f(q):
        return ad.decode_raw(q, None).float().flatten(1)

    w = torch.randn(rows, f(z[:1]).shape[1], generator=torch.Generator().manual_seed(2)).to(device)

    def fwd_bwd():
        zl = z.detach().requires_grad_(True)
        with torch.enable_grad():
            torch.autograd.grad(f(zl), zl, w)

    with _forward_ad_attention():
        with torch.no_grad():
            forward_ms = _ms_per_call(lambda: f(z), device, calls, repeats)
        fwd_bwd_ms = _ms_per_call(fwd_bwd, device, calls, repeats)
        jvp_ms = _ms_per_call(lambda: jvp(f, (z,), (v,)), device, calls, repeats)
        record_ms = _ms_per_call(lambda: _JacobianProducts(f, z, "reverse"), device, calls, repeats)
        prod = _JacobianProducts(f, z, "reverse")
        rev_ms = _ms_per_call(lambda: prod.jv(v), device, calls, repeats)
        jtw_ms = _ms_per_call(lambda: prod.jtw(w), device, calls, repeats)
        chosen = _JacobianProducts(f, z).mode
        a, b = jvp(f, (z,), (v,))[1], prod.jv(v)
    err = float((a - b).norm() / b.norm().clamp_min(1e-30))
    return {"generator": bg.name, "rows": rows, "forward_ms": forward_ms, "fwd_bwd_ms": fwd_bwd_ms,
            "jvp_ms": jvp_ms, "record_ms": record_ms, "rev_jv_ms": rev_ms, "jtw_ms": jtw_ms,
            "speedup": jvp_ms / rev_ms, "rel_diff": err, "chosen": chosen}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--generators", default="onestep-fmnist", help="comma-separated zoo names, 'default' or 'large'")
    p.add_argument("--rows", default="16,64", help="comma-separated batch sizes (rows)")
    p.add_argument("--calls", type=int, default=5, help="calls per timing")
    p.add_argument("--repeats", type=int, default=3, help="timings per figure; the fastest counts")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", help="also write the table (Markdown) here")
    a = p.parse_args(argv)
    rows = int_list(p, "--rows", a.rows)
    for name, val in (("--rows", min(rows)), ("--calls", a.calls), ("--repeats", a.repeats)):
        if val < 1:
            p.error(f"{name} must be at least 1, got {val}")
    dev = torch.device(a.device)
    gpu = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "no GPU"
    lines = [
        f"Jacobian products on {dev.type.upper()} ({gpu}; {platform.machine()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, Python {platform.python_version()}). Milliseconds per call, "
        f"fastest of {a.repeats} timings of {a.calls} calls, float32.",
        "",
        "| generator | rows | forward | forward + backward | J v, forward mode | record J^T u | J v, reverse mode "
        "| J^T w | forward / reverse J v | relative difference | polish uses |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    print("\n".join(lines), flush=True)
    for gname in a.generators.split(","):
        bg = G.get(gname, a.device)
        for r in rows:
            m = measure(bg, r, a.calls, a.repeats)
            lines.append(f"| {m['generator']} | {r} | {m['forward_ms']:.2f} | {m['fwd_bwd_ms']:.2f} | {m['jvp_ms']:.2f} | "
                         f"{m['record_ms']:.2f} | {m['rev_jv_ms']:.2f} | {m['jtw_ms']:.2f} | {m['speedup']:.2f} | "
                         f"{m['rel_diff']:.1e} | {m['chosen']} |")
            print(lines[-1], flush=True)
    lines += ["", "A polish step records J^T u once and then takes its GMRES or CG iterations' products on it."]
    finish(lines, "bench.jacobian_products", argv, a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
