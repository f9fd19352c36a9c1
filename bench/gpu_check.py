"""Accuracy and speed of the compiled kernels against their references, as one table.

    python bench/gpu_check.py            # on the GPU (needs ronan_fast installed with CUDA kernels)
    python bench/gpu_check.py --cpu      # the same on the CPU kernels
    python bench/gpu_check.py --out FILE # also write the table there ($OUT/gpu_check.md by default)

Accuracy: each op against its reference evaluated in float64 on a few shapes and dtypes; fails
beyond 1e-5 relative in float32 and 1e-2 in bfloat16/float16, and on any NaN. Speed: the op
through torch.ops against the plain PyTorch reference at a realistic size (2048 rows of
3x64x64, latents of 512), median of timed repeats after a warm-up, CUDA events on the GPU.
Exits with status 1 when any check fails.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ronan_fast import _atomic, _ext, ops


@dataclass
class Row:
    op: str
    case: str
    abs_err: float
    rel_err: float
    limit: float
    ok: bool


def _errors(got: torch.Tensor, ref: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[float, float, bool]:
    """Max absolute error, max error relative to the reference's largest magnitude, and NaN-freeness."""
    got = got.detach().double().cpu()
    ref = ref.detach().double().cpu()
    if mask is not None:
        got, ref = got[mask.cpu()], ref[mask.cpu()]
    if not got.numel():
        return 0.0, 0.0, True
    finite = torch.isfinite(ref)
    same_nonfinite = bool((got[~finite] == ref[~finite]).all()) if (~finite).any() else True
    no_nan = not torch.isnan(got[finite]).any() and same_nonfinite
    diff = (got[finite] - ref[finite]).abs()
    scale = ref[finite].abs().max().item() if finite.any() else 0.0
    abs_err = diff.max().item() if diff.numel() else 0.0
    rel_err = abs_err / scale if scale > 0 else abs_err
    return abs_err, rel_err, no_nan


def _limit(dtype: torch.dtype) -> float:
    return 1e-5 if dtype == torch.float32 else 1e-2


def _row(op: str, case: str, pairs: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]], limit: float) -> Row:
    abs_err = rel_err = 0.0
    ok = True
    for got, ref, mask in pairs:
        a, r, no_nan = _errors(got, ref, mask)
        abs_err, rel_err = max(abs_err, a), max(rel_err, r)
        ok = ok and no_nan
    return Row(op, case, abs_err, rel_err, limit, ok and rel_err <= limit)


def accuracy(device: torch.device, g: torch.Generator) -> list[Row]:
    rows = []
    recon_cases = [  # (M, B, C, H, W), pred dtype, target dtype
        ((7, 3, 3, 17, 19), torch.float32, torch.float32),
        ((64, 16, 3, 64, 64), torch.float32, torch.float32),
        ((1, 1, 3, 256, 256), torch.float32, torch.float32),
        ((64, 16, 3, 64, 64), torch.bfloat16, torch.float32),
        ((64, 16, 3, 64, 64), torch.float16, torch.float32),
        ((33, 5, 3, 31, 33), torch.bfloat16, torch.float16),
    ]
    for (m, b, c, h, w), pdt, tdt in recon_cases:
        pred = torch.randn(m, c, h, w, generator=g).to(device, pdt)
        target = torch.randn(b, c, h, w, generator=g).to(device, tdt)
        index = torch.randint(0, b, (m,), generator=g).to(device)
        weight = torch.rand(m, generator=g).to(device)
        weight[::5] = 0.0
        for metric in ("mse", "mae"):
            loss, grad = torch.ops.ronan_fast.recon_loss_grad(pred, target, index, weight, metric)
            ref_loss, ref_grad = ops.recon_loss_grad_ref(pred.double(), target.double(), index, weight, metric)
            frozen_zero = bool((grad[weight == 0] == 0).all())
            row = _row("recon_loss_grad", f"{metric} {m}x{c}x{h}x{w} {_name(pdt)}/{_name(tdt)}",
                       [(loss, ref_loss, None), (grad, ref_grad, None)], _limit(pdt))
            row.ok = row.ok and frozen_zero
            rows.append(row)

    for m, d, betas in [(1, 512, (0.9, 0.999, 1e-8)), (2048, 512, (0.9, 0.999, 1e-8)), (7, 13, (0.5, 0.99, 1e-6)),
                        (3, 18 * 512 + 1, (0.9, 0.999, 1e-8))]:
        state = {
            "latent": torch.randn(m, d, generator=g),
            "exp_avg": torch.zeros(m, d),
            "exp_avg_sq": torch.zeros(m, d),
            "step": torch.zeros(m, dtype=torch.int64),
            "lr": torch.rand(m, generator=g) * 0.1 + 1e-3,
            "active": torch.rand(m, generator=g) < 0.8,
            "best_loss": torch.full((m,), float("inf")),
            "best_latent": torch.zeros(m, d),
        }
        state = {k: v.to(device) for k, v in state.items()}
        ref = {k: v.double() if v.is_floating_point() else v.clone() for k, v in state.items()}
        pairs = []
        for _ in range(5):
            grad = torch.randn(m, d, generator=g).to(device)
            loss = torch.rand(m, generator=g).to(device)
            order = ("latent", "grad", "exp_avg", "exp_avg_sq", "step", "lr", "active", "loss", "best_loss",
                     "best_latent")
            args = [dict(state, grad=grad, loss=loss)[k] for k in order]
            ref_args = [dict(ref, grad=grad.double(), loss=loss.double())[k] for k in order]
            torch.ops.ronan_fast.latent_adam_step_(*args, *betas)
            ops.latent_adam_step_ref_(*ref_args, *betas)
        for k in ("latent", "exp_avg", "exp_avg_sq", "best_latent", "best_loss"):
            pairs.append((state[k], ref[k], None))
        row = _row("latent_adam_step_", f"5 steps {m}x{d} betas={betas[:2]}", pairs, 1e-5)
        row.ok = row.ok and torch.equal(state["step"], ref["step"])
        rows.append(row)

    for m, b in [(10, 3), (2048, 256), (100_000, 1000)]:
        loss = (torch.randint(0, 50, (m,), generator=g).float() / 7).to(device)  # many ties
        special = torch.rand(m, generator=g).to(device)
        loss[special < 0.05] = float("nan")
        loss[(special >= 0.05) & (special < 0.08)] = float("inf")
        index = torch.randint(0, b, (m,), generator=g).to(device)
        out_loss, out_row = torch.ops.ronan_fast.best_over_restarts(loss, index, b)
        ref_loss, ref_row = ops.best_over_restarts_ref(loss.double(), index, b)
        row = _row("best_over_restarts", f"{m} rows -> {b} targets", [(out_loss, ref_loss, None)], 0.0)
        row.ok = row.ok and torch.equal(out_row.cpu(), ref_row.cpu())
        rows.append(row)
    return rows


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def time_ms(fn: Callable[[], object], device: torch.device, warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
    else:
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def speed(device: torch.device, g: torch.Generator, repeats: int) -> list[tuple[str, str, float, float, float]]:
    """(op, case, ext ms, reference ms, GB/s moved by the kernel)."""
    out = []
    m, b, c, h, w = 2048, 256, 3, 64, 64
    n = c * h * w
    index = (torch.arange(m) % b).to(device)
    weight = torch.ones(m, device=device)
    for pdt in (torch.float32, torch.bfloat16):
        pred = torch.randn(m, c, h, w, generator=g).to(device, pdt)
        target = torch.randn(b, c, h, w, generator=g).to(device, pdt)
        ext = time_ms(lambda: torch.ops.ronan_fast.recon_loss_grad(pred, target, index, weight, "mse"), device, 5,
                      repeats)
        ref = time_ms(lambda: ops.recon_loss_grad_ref(pred, target, index, weight, "mse"), device, 3, repeats)
        size = pred.element_size()
        gbs = m * n * (3 * size) / (ext * 1e-3) / 1e9  # read pred and target rows, write grad
        out.append(("recon_loss_grad", f"mse {m}x{c}x{h}x{w} {_name(pdt)}", ext, ref, gbs))

    d = 512
    state = [torch.randn(m, d, generator=g).to(device), torch.randn(m, d, generator=g).to(device),
             torch.zeros(m, d, device=device), torch.zeros(m, d, device=device),
             torch.zeros(m, dtype=torch.int64, device=device), torch.full((m,), 0.01, device=device),
             torch.ones(m, dtype=torch.bool, device=device), torch.rand(m, generator=g).to(device),
             torch.full((m,), -1.0, device=device), torch.zeros(m, d, device=device)]  # best never improves
    ext = time_ms(lambda: torch.ops.ronan_fast.latent_adam_step_(*state, 0.9, 0.999, 1e-8), device, 5, repeats)
    ref = time_ms(lambda: ops.latent_adam_step_ref_(*state), device, 3, repeats)
    gbs = m * d * 4 * 7 / (ext * 1e-3) / 1e9  # read latent, grad, m, v; write latent, m, v
    out.append(("latent_adam_step_", f"{m}x{d} float32", ext, ref, gbs))

    best = torch.rand(m, generator=g).to(device)
    ext = time_ms(lambda: torch.ops.ronan_fast.best_over_restarts(best, index, b), device, 5, repeats)
    ref = time_ms(lambda: ops.best_over_restarts_ref(best, index, b), device, 3, repeats)
    out.append(("best_over_restarts", f"{m} rows -> {b} targets", ext, ref, m * 12 / (ext * 1e-3) / 1e9))
    return out


def table(device: torch.device, acc: list[Row], spd: list[tuple[str, str, float, float, float]]) -> str:
    lines = [f"# ronan_fast kernels on {_device_name(device)}", "",
             f"torch {torch.__version__}, CUDA {torch.version.cuda}, _C built for torch {_ext._C.TORCH_VERSION} "
             f"(CUDA kernels: {_ext._C.WITH_CUDA})", "",
             "## Accuracy against the float64 reference", "",
             "| op | case | max abs err | max rel err | limit | |", "| --- | --- | ---: | ---: | ---: | --- |"]
    for r in acc:
        lines.append(f"| {r.op} | {r.case} | {r.abs_err:.2e} | {r.rel_err:.2e} | {r.limit:.0e} | "
                     f"{'ok' if r.ok else '**FAIL**'} |")
    lines += ["", "## Time (median)", "", "| op | case | kernel ms | reference ms | speed-up | kernel GB/s |",
              "| --- | --- | ---: | ---: | ---: | ---: |"]
    for op, case, ext, ref, gbs in spd:
        lines.append(f"| {op} | {case} | {ext:.4f} | {ref:.4f} | {ref / ext:.1f}x | {gbs:.1f} |")
    return "\n".join(lines) + "\n"


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (sm {'.'.join(map(str, torch.cuda.get_device_capability()))})"
    return f"CPU ({torch.get_num_threads()} threads)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cpu", action="store_true", help="check the CPU kernels instead of the CUDA ones")
    parser.add_argument("--out", help="also write the table here (default: $OUT/gpu_check.md when OUT is set)")
    parser.add_argument("--repeats", type=int, default=50, help="timed repeats per measurement")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    device = torch.device("cpu" if args.cpu else "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        print("gpu_check: no CUDA device is available (use --cpu to check the CPU kernels)", file=sys.stderr)
        return 1
    if not _ext.has_device(device):
        print(f"gpu_check: FAIL: no compiled kernels for {device.type}: {_ext.why_unavailable(device)}",
              file=sys.stderr)
        return 1
    g = torch.Generator().manual_seed(args.seed)
    acc = accuracy(device, g)
    spd = speed(device, g, args.repeats)
    text = table(device, acc, spd)
    failed = [r for r in acc if not r.ok]
    text += f"\n{len(acc) - len(failed)} passed, {len(failed)} failed\n"
    print(text)
    out = args.out or (os.path.join(os.environ["OUT"], "gpu_check.md") if os.environ.get("OUT") else None)
    if out:
        _atomic.write_text(out, text)
    if failed:
        print(f"gpu_check: FAIL: {len(failed)} accuracy checks failed: " + "; ".join(f"{r.op} {r.case}" for r in failed),
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
