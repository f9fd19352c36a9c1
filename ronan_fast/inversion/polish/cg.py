"""Matrix-free Levenberg-Marquardt by conjugate gradients: for latents as wide as the image."""

from __future__ import annotations

import torch
from torch import Tensor

from ronan_fast.inversion.polish.base import PolishResult
from ronan_fast.inversion.polish.jacobian import JacobianProducts, raw_residual
from ronan_fast.inversion.runtime import forward_ad_attention

__all__ = ["ConjugateGradientLM"]


class ConjugateGradientLM:
    """Matrix-free Levenberg-Marquardt on each image's best input, float32.

    Each step solves ``(J^T J + lam I) d = -J^T r`` per row by ``cg_iters`` conjugate-gradient
    iterations whose products with ``J`` and ``J^T`` are taken for all live rows at once
    (:class:`~ronan_fast.inversion.polish.jacobian.JacobianProducts`: two backward passes
    through graphs recorded once per step); the Jacobian is never formed, so a step's cost grows
    with ``cg_iters``, not with the latent's width. A step is kept only where it lowers the
    row's loss (then ``lam`` shrinks; else it grows). Rows leave the loop once solved (mean
    squared residual under 1e-14), stuck (damping at its cap), levelled off (``patience``,
    ``min_drop``) or under their ``stop_raw`` (raw-unit MSE, ``[n]``), or once another row of
    their ``group`` is, or levelled off far above ``stop_raw`` (``settle``;
    :class:`~ronan_fast.inversion.polish.leaving.Leaving`).
    """

    def __init__(self, cg_iters: int = 20):
        self.cg_iters = cg_iters

    def accepts(self, metric: str) -> bool:
        return metric == "mse"

    def __call__(self, generator, inputs, cond, target_raw, steps, leaving, report=None, clip=None) -> PolishResult:
        with forward_ad_attention():
            return _cg_levenberg_marquardt(generator, inputs, cond, target_raw, steps, self.cg_iters, report, leaving,
                                           clip)


def _cg_levenberg_marquardt(generator, inputs, cond, target_raw, iters, cg_iters, report, leaving, clip=None):
    residual = raw_residual(generator, target_raw, clip)
    mode = None  # how Jacobian products are taken: decided at the first step (JacobianProducts)

    z = inputs.clone()
    n = z.shape[0]
    lam = torch.full((n,), 1e-2, device=z.device)
    live = torch.arange(n, device=z.device)
    with torch.no_grad():
        r = residual(z, cond, live)
    cost = r.square().sum(1)
    per_elem = r.shape[1]
    cost_all = cost.clone()
    for k in range(iters):
        kept = leaving.keep(k, cost, per_elem, lam >= 1e8, live, r, lam)
        if kept is None:
            break
        live, cost, r, lam = kept
        zl = z[live]
        cl = None if cond is None else cond[live]

        def f(q, cl=cl, live=live):
            return residual(q, cl, live)

        prod = JacobianProducts(f, zl, mode)
        mode = prod.mode
        x = _damped_normal_solve(prod, r, lam, cg_iters)
        with torch.no_grad():
            z_new = zl + x
            r_new = residual(z_new, cl, live)
            cost_new = r_new.square().sum(1)
            better = cost_new < cost  # NaN compares False: a step that breaks a row is refused
            z[live] = torch.where(better[:, None], z_new, zl)
            r = torch.where(better[:, None], r_new, r)
            cost = torch.where(better, cost_new, cost)
            lam = torch.where(better, lam * 0.3, lam * 10).clamp(1e-8, 1e8)
            cost_all[live] = cost
            if report is not None:
                report(k + 1, cost_all / per_elem)
    return PolishResult(z.detach(), cost_all / per_elem)


def _damped_normal_solve(prod: JacobianProducts, r: Tensor, lam: Tensor, cg_iters: int) -> Tensor:
    """Per row, ``cg_iters`` conjugate-gradient iterations on ``(J^T J + lam I) x = -J^T r``, from 0."""
    b = -prod.jtw(r)
    x = torch.zeros_like(b)
    res, p = b.clone(), b.clone()
    rs = res.square().sum(1)
    for _ in range(cg_iters):
        ap = prod.jtw(prod.jv(p)) + lam[:, None] * p
        alpha = rs / (p * ap).sum(1).clamp_min(1e-30)
        x = x + alpha[:, None] * p
        res = res - alpha[:, None] * ap
        rs_new = res.square().sum(1)
        p = res + (rs_new / rs.clamp_min(1e-30))[:, None] * p
        rs = rs_new
    return x
