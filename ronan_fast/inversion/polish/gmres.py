"""Gauss-Newton by GMRES for square Jacobians: one-step generators whose latent is the image's size."""

from __future__ import annotations

import torch
from torch import Tensor

from ronan_fast.inversion.polish.base import PolishResult
from ronan_fast.inversion.polish.jacobian import JacobianProducts, raw_residual
from ronan_fast.inversion.polish.leaving import Leaving
from ronan_fast.inversion.runtime import forward_ad_attention

__all__ = ["GMRESGaussNewton", "gmres", "unsettled"]


class GMRESGaussNewton:
    """Gauss-Newton steps for square Jacobians, each solved in a Krylov subspace, float32.

    For a generator whose latent is exactly as wide as its image (a one-step consistency model
    or distilled sampler maps noise shaped like the image to the image), ``J`` is square and
    ``krylov`` GMRES iterations give the ``d`` in the Krylov space of ``(J, r)`` that minimises
    ``|r + J d|``: the Gauss-Newton model restricted to that space. Each iteration is one
    ``J v`` product for all live rows
    (:class:`~ronan_fast.inversion.polish.jacobian.JacobianProducts`), no ``J^T w``: a step of
    30 iterations takes about a quarter of the time of a 100-iteration CG step of
    :class:`~ronan_fast.inversion.polish.cg.ConjugateGradientLM` (one-step zoo model, CPU). ``d`` descends
    ``|r|^2`` (``r^T J d <= -|J d|^2 / 2``), so a backtracking line search (step 1, 1/4, ...
    1/4^5) lowers the loss unless the subspace holds no useful direction; a row where none of
    the six steps does is stuck. GMRES with a short subspace can stall on a row (restarted
    GMRES stagnates on some matrices); the row then levels off or sticks and leaves, and the
    caller hands it to the CG polish. Rows leave as in
    :class:`~ronan_fast.inversion.polish.cg.ConjugateGradientLM`: solved, stuck, levelled off
    (``patience``, ``min_drop``), under ``stop_raw`` or settled by another row of their
    ``group``. ``report(k, mse)`` as there.

    The rows it leaves open (neither solved nor under their ``stop_raw`` nor settled by their
    group) are :func:`unsettled`.
    """

    def __init__(self, krylov: int = 30):
        self.krylov = krylov

    def accepts(self, metric: str) -> bool:
        return metric == "mse"

    def __call__(self, generator, inputs, cond, target_raw, steps, leaving, report=None, clip=None) -> PolishResult:
        with forward_ad_attention():
            return _gmres_gauss_newton(generator, inputs, cond, target_raw, steps, self.krylov, report, leaving, clip)


def unsettled(result: PolishResult, leaving: Leaving) -> Tensor:
    """The rows a polish left open: neither solved nor under their ``stop_raw`` nor settled by
    their group (``leaving``'s groups are updated)."""
    return ~leaving.settled(result.mse, torch.arange(result.mse.shape[0], device=result.mse.device))


def gmres(jv, r: Tensor, krylov: int) -> Tensor:
    """Per row, ``argmin |r + J d|`` over ``d`` in span(r, J r, ... J^(k-1) r); ``jv(v) = J v``.

    Arnoldi with modified Gram-Schmidt, batched over rows; the small ``(k+1) x k`` least-squares
    problems are solved by pseudo-inverse, which also covers an early breakdown (the subspace is
    exhausted: the exact solution lies in it).
    """
    m = r.shape[0]
    beta = r.norm(dim=1)
    basis = [-r / beta.clamp_min(1e-30)[:, None]]
    h = r.new_zeros(m, krylov + 1, krylov)
    for j in range(krylov):
        w = jv(basis[j])
        for i in range(j + 1):
            hij = (w * basis[i]).sum(1)
            h[:, i, j] = hij
            w = w - hij[:, None] * basis[i]
        hn = w.norm(dim=1)
        h[:, j + 1, j] = hn
        basis.append(w / hn.clamp_min(1e-30)[:, None])
    # y = pinv(h) (beta e_1), and the step = basis y, row by row without batched matrix products
    # (whose rounding varies with the number of rows)
    y = torch.linalg.pinv(h, rtol=1e-6)[:, :, 0] * beta[:, None]  # [m, k]
    return (torch.stack(basis[:krylov], 2) * y[:, None, :]).sum(2)


def _gmres_gauss_newton(generator, inputs, cond, target_raw, iters, krylov, report, leaving, clip=None):
    residual = raw_residual(generator, target_raw, clip)
    mode = None  # how Jacobian products are taken: decided at the first step (JacobianProducts)

    z = inputs.clone()
    n = z.shape[0]
    live = torch.arange(n, device=z.device)
    with torch.no_grad():
        r = residual(z, cond, live)
    if r.shape[1] != z.shape[1]:
        raise ValueError(
            f"the GMRES polish needs a latent exactly as wide as the image (a square Jacobian); "
            f"{generator.name} maps {z.shape[1]} latent values to {r.shape[1]} pixels")
    cost = r.square().sum(1)
    per_elem = r.shape[1]
    stuck = torch.zeros(n, dtype=torch.bool, device=z.device)
    cost_all = cost.clone()
    for k in range(iters):
        kept = leaving.keep(k, cost, per_elem, stuck, live, r, stuck)
        if kept is None:
            break
        live, cost, r, stuck = kept
        zl = z[live]
        cl = None if cond is None else cond[live]

        prod = JacobianProducts(lambda q, cl=cl, live=live: residual(q, cl, live), zl, mode)
        mode = prod.mode
        with torch.no_grad():
            d = gmres(prod.jv, r, krylov)
            alpha = torch.ones(zl.shape[0], 1, device=z.device)
            pending = torch.ones(zl.shape[0], dtype=torch.bool, device=z.device)
            z_new, r_new, cost_new = zl.clone(), r.clone(), cost.clone()
            for _ in range(6):  # backtracking: only the rows still without a lower loss are evaluated
                idx = pending.nonzero().squeeze(1)
                zt = zl[idx] + alpha[idx] * d[idx]
                rt = residual(zt, None if cl is None else cl[idx], live[idx])
                ct = rt.square().sum(1)
                ok = ct < cost[idx]  # NaN compares False: a step that breaks a row is refused
                z_new[idx[ok]], r_new[idx[ok]], cost_new[idx[ok]] = zt[ok], rt[ok], ct[ok]
                pending[idx[ok]] = False
                alpha[idx[~ok]] *= 0.25
                if not bool(pending.any()):
                    break
            stuck = pending
            z[live] = z_new
            r, cost = r_new, cost_new
            cost_all[live] = cost
            if report is not None:
                report(k + 1, cost_all / per_elem)
    return PolishResult(z.detach(), cost_all / per_elem)
