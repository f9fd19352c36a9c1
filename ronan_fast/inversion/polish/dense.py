"""Levenberg-Marquardt with dense Jacobians: for latents up to a few hundred wide.

Each step builds every live row's Jacobian, by forward-mode AD (one pass per latent dimension)
or, with ``reverse``, by reverse mode row by row (vector-Jacobian products, 128 at a time:
memory bounded for wide latents), and solves the damped normal equations
``(J^T J + lam (diag(J^T J) + 1e-6) I) d = -J^T r`` exactly (by Cholesky:
:func:`~ronan_fast.inversion.linalg.solve_damped`). A step is kept only where it lowers
the row's loss (then ``lam`` shrinks; else it grows, and the row's ``J^T J`` and ``J^T r`` are
reused instead of built again: it has not moved).
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from ronan_fast.inversion.calls import FixedShapeCalls, in_blocks, padded
from ronan_fast.inversion.linalg import solve_damped
from ronan_fast.inversion.polish.base import PolishResult
from ronan_fast.inversion.runtime import forward_ad_attention, low_precision_decode
from ronan_fast.inversion.settings import POLISH_PRECISIONS
from ronan_fast.metrics import ToneMSE

__all__ = ["DenseLM", "dense_rows", "dense_columns", "forward_jacobian", "tone_jacobian", "DENSE_CHUNK_ELEMENTS",
           "DENSE_CPU_PASSES", "DENSE_CPU_COLUMNS"]


class DenseLM:
    """The dense Levenberg-Marquardt polish (``polish_method="dense"``, or "dense-rev" with
    ``reverse``), float32.

    With ``tone`` (a :class:`~ronan_fast.metrics.ToneMSE`, metric "mse-tone") the residual is the
    tone-fitted one, in raw units, and its Jacobian is the generator's mapped through each row's
    current colour map with the map held fixed (the usual Gauss-Newton treatment of such a fit).
    A row leaves once solved, stuck (damping at its cap) or as ``leaving`` says: the Jacobian,
    the costly part, is only built for live rows. ``precision`` "bf16": the Jacobians
    are built in it (:func:`~ronan_fast.inversion.runtime.low_precision_decode`); the residuals,
    losses and the test each step passes stay float32.
    """

    def __init__(self, reverse: bool = False, tone: ToneMSE | None = None, reuse: int = 0, precision: str = "fp32"):
        if isinstance(reuse, bool) or not isinstance(reuse, int) or reuse < 0:
            raise ValueError(f"reuse must be an integer >= 0, got {reuse!r}")
        if precision not in POLISH_PRECISIONS:
            raise ValueError(f"precision must be one of {POLISH_PRECISIONS}, got {precision!r}")
        self.reverse, self.tone, self.precision = reverse, tone, precision
        # the tone-fitted residual's Jacobian holds each row's colour map fixed, while the reuse
        # steps' J^T r comes through the residual's graph, which differentiates the fit too: they
        # would not solve that Jacobian's equations, so they are for the plain residual only
        self.reuse = reuse if tone is None else 0

    def accepts(self, metric: str) -> bool:
        return metric == ("mse-tone" if self.tone is not None else "mse")

    def __call__(self, generator, inputs, cond, target_raw, steps, leaving, report=None, clip=None) -> PolishResult:
        # one row at a time, under vmap: the chunks of rows are padded to one shape instead
        plain = generator.base if isinstance(generator, FixedShapeCalls) else generator
        # the Jacobians' generator: in self.precision (a cast twin or autocast; float32 where that
        # fails its check); the residuals and losses below stay float32
        decode = low_precision_decode(plain, self.precision)[0]

        def one(zrow, crow):
            c = None if crow is None else crow.unsqueeze(0)
            return decode(zrow.unsqueeze(0), c).flatten().float()

        residual, jac_map = self._residual(generator, target_raw, clip)
        block = getattr(generator, "rows", None)
        if block is not None:  # per-row arithmetic in fixed-shape blocks, as the generator's calls
            residual = functools.partial(in_blocks, residual, block)
        if self.reverse:
            return _levenberg_marquardt(inputs, cond, one, residual, steps, leaving, reverse=True, jac_map=jac_map,
                                        report=report, reuse=self.reuse)
        with forward_ad_attention():
            return _levenberg_marquardt(inputs, cond, one, residual, steps, leaving, jac_map=jac_map, report=report,
                                        reuse=self.reuse)

    def _residual(self, generator, target_raw, clip=None):
        """``residual(z, c, rows)`` and the map from the generator's Jacobian to the residual's
        (None: the residual is the output minus the target, its Jacobian the generator's; with
        ``clip``, the residual is one-sided at clipped pixels and the Jacobian's rows of the
        pixels matched there are 0)."""
        tone = self.tone
        if tone is None:
            def diff(z, c, rows):
                return generator.decode_raw(z, c).float() - target_raw[rows]

            if clip is None:
                def residual(z, c, rows):
                    return diff(z, c, rows).flatten(1)

                return residual, None

            def clipped_residual(z, c, rows):
                return clip[rows].residual(diff(z, c, rows)).flatten(1)

            def clipped_jacobian(jac, z, c, rows):
                with torch.no_grad():
                    matched = clip[rows].beyond(diff(z, c, rows)).flatten(1)
                # untouched where nothing matches: the same products, bit for bit, as without clip
                return jac.masked_fill(matched.unsqueeze(-1), 0) if bool(matched.any()) else jac

            return clipped_residual, clipped_jacobian
        lo, hi = generator.output_range
        target_unit = generator.to_unit(target_raw)

        def tone_state(z, c, rows):
            return tone.residual(generator.to_unit(generator.decode_raw(z, c).float()), target_unit[rows])

        def residual(z, c, rows):  # noqa: F811 (the tone-fitted residual)
            return (tone_state(z, c, rows)[0] * (hi - lo)).flatten(1).float()

        def jac_map(jac, z, c, rows):
            _, beta, active = tone_state(z, c, rows)
            return tone_jacobian(jac, beta, active)

        return residual, jac_map


def tone_jacobian(jac: Tensor, beta: Tensor, active: Tensor) -> Tensor:
    """The Jacobian of the tone-fitted residual with each row's colour map held fixed.

    ``jac`` ``[n, C * P, d]``: the generator's raw output by the input; ``beta`` ``[n, C, C + 1]``
    and ``active`` ``[n, C, P]`` as :meth:`~ronan_fast.metrics.ToneMSE.residual` gives them.
    Row n, channel c, pixel p: ``active * sum_k beta[c, k] * jac[k, p]`` (a clipped pixel the fit
    lands on the right side of does not move the loss).
    """
    n, ch, p = active.shape
    jk = jac.view(n, ch, p, -1)
    mapped = torch.einsum("nck,nkpd->ncpd", beta[:, :, :ch].to(jk.dtype), jk)
    return (mapped * active.unsqueeze(-1).to(jk.dtype)).reshape(n, ch * p, -1)


#: the dense polish builds its Jacobians in chunks of at most this many elements (rows x latent
#: width x image size; 128 MiB in float32): on the 64x64 DCGAN (12,288 outputs, 100 inputs) 27
#: rows, about 1.2 GB with the passes that build them (one thread, measured at 44 MB per row)
DENSE_CHUNK_ELEMENTS = 1 << 25
#: on CPU, also at most this many forward-mode passes (rows x latent width) at once: a chunk
#: runs the generator on rows x width tangents together, and past about a hundred rows a CPU
#: step costs more per row (bench/results/cpu_heap.md). On the 64x64 DCGAN (width 100) one row
#: per chunk took 75 ms per row and step against 166 ms for 27 rows (cpu_heap_dense_polish.md).
DENSE_CPU_PASSES = 128
#: on CPU, a row's Jacobian is built at most this many columns (forward-mode passes) at a time
#: (:func:`forward_jacobian`): a wide latent's passes all at once cost more per pass. The same
#: Jacobian to float32 rounding (bit for bit on every zoo generator measured); one thread, one
#: row's Jacobian 1.6x faster than all columns at once on the 64x64 StyleGAN's 256-wide ``w``,
#: 1.9x on its 512-wide ``z``, 1.75x on the latent-diffusion decoder's 256-wide latent, and the
#: same on 64-wide and narrower GANs (one block); 32 columns made the 64-wide DCGAN's 1.2x
#: slower (bench/results/jacobian_blocks_cpu.md)
DENSE_CPU_COLUMNS = 64


def dense_rows(latent_dim: int, out_numel: int, cpu: bool = False) -> int:
    """Rows per chunk of the dense polish's Jacobians (:data:`DENSE_CHUNK_ELEMENTS`, and on CPU
    :data:`DENSE_CPU_PASSES`)."""
    rows = DENSE_CHUNK_ELEMENTS // (latent_dim * out_numel)
    if cpu:
        rows = min(rows, DENSE_CPU_PASSES // latent_dim)
    return max(1, rows)


def dense_columns(latent_dim: int, cpu: bool = False) -> int:
    """Columns of a row's Jacobian built at once: every one, but on CPU at most
    :data:`DENSE_CPU_COLUMNS`."""
    return min(latent_dim, DENSE_CPU_COLUMNS) if cpu else latent_dim


def forward_jacobian(f, z: Tensor, columns: int | None = None) -> Tensor:
    """``[*f(z).shape, d]``: the Jacobian of ``f`` at ``z`` (``[d]``, one row) by forward-mode
    AD, one pass per column, ``columns`` passes at a time (None: all ``d`` at once, as
    ``torch.func.jacfwd``): the same Jacobian to float32 rounding (a pass over fewer tangents at
    once may round differently); works under ``vmap`` over rows."""
    from torch.func import jacfwd, jvp, vmap

    d = z.shape[-1]
    if columns is None or columns >= d:
        return jacfwd(f)(z)
    eye = torch.eye(d, device=z.device, dtype=z.dtype)
    blocks = [vmap(lambda t: jvp(f, (z,), (t,))[1])(eye[lo:lo + columns]) for lo in range(0, d, columns)]
    return torch.cat(blocks).movedim(0, -1)


def _levenberg_marquardt(inputs, cond, one, residual, iters, leaving, reverse=False, jac_map=None, report=None,
                         reuse=0):
    """Levenberg-Marquardt steps on rows ``inputs``; returns the inputs and each row's final mean squared residual.

    ``reuse`` > 0: after a step a row takes, up to that many chord steps reuse its Jacobian (and
    its damping) with the residual at the row's new input, by one forward and one backward pass
    instead of a new Jacobian (:func:`_reuse_steps`). They count as part of the
    step: the leaving rules and ``iters`` see the Jacobians built, not the reuse steps."""
    z = inputs.clone()
    n = z.shape[0]
    lam = torch.full((n, 1, 1), 1e-3, device=z.device)
    live = torch.arange(n, device=z.device)
    with torch.no_grad():
        r = residual(z, cond, live)
        cost = r.square().sum(1)
    eye = torch.eye(z.shape[1], device=z.device)
    per_elem = r.shape[1]
    cost_all = cost.clone()
    d = z.shape[1]
    # each row's J^T J and J^T r at its current input, by original row: a row whose step was
    # refused has not moved, so they are reused instead of building its Jacobian again
    jtj_all = z.new_empty(n, d, d)
    jtr_all = z.new_empty(n, d)
    known = torch.zeros(n, dtype=torch.bool, device=z.device)
    for k in range(iters):
        kept = leaving.keep(k, cost, per_elem, lam[:, 0, 0] >= 1e9, live, r, lam)
        if kept is None:
            break
        live, cost, r, lam = kept
        zl = z[live]
        cl = None if cond is None else cond[live]
        with torch.no_grad():
            fresh = (~known[live]).nonzero().squeeze(1)  # live rows (by position) whose Jacobian is built
            _normal_equations(one, jac_map, zl, cl, live, fresh, r, jtj_all, jtr_all, reverse)
            jtj, jtr = jtj_all[live], jtr_all[live]
            diag = torch.diagonal(jtj, dim1=1, dim2=2).unsqueeze(2)
            a = jtj + lam * (diag * eye + 1e-6 * eye)
            delta = solve_damped(a, -jtr)  # NaN for a matrix Cholesky refuses: a refused step
            z_new = zl + delta
            r_new = residual(z_new, cl, live)
            cost_new = r_new.square().sum(1)
            better = cost_new < cost
            z[live] = torch.where(better[:, None], z_new, zl)
            r = torch.where(better[:, None], r_new, r)
            cost = torch.where(better, cost_new, cost)
            lam = torch.where(better[:, None, None], lam * 0.3, lam * 10).clamp(1e-9, 1e9)
            known[live] = ~better
        if reuse:
            z, r, cost = _reuse_steps(residual, z, zl, cond, live, better, jtj, lam, diag, eye, r, cost, reuse)
        with torch.no_grad():
            cost_all[live] = cost
            if report is not None:
                report(k + 1, cost_all / per_elem)
    return PolishResult(z, cost_all / per_elem)


#: a reuse step (``reuse``) is taken only where it lowers the row's loss; the row goes on reusing
#: the Jacobian only while each such step takes the loss under this fraction of what it was (a
#: chord step costs a forward and a backward pass, against one forward-mode pass per latent
#: dimension for a Jacobian, so slow progress is still cheap progress). Measured on the search
#: over ``w`` of a 64x64 StyleGAN's own images: 0.5 stopped most rows after one chord step
REUSE_MAX_RATIO = 0.9


def _reuse_steps(residual, z, zl, cond, live, better, jtj, lam, diag, eye, r, cost, reuse):
    """Up to ``reuse`` chord steps for the live rows that have just taken a step (``better``):
    each solves ``(J^T J + lam (diag + 1e-6) I) d = -J^T r`` with the ``J`` of that step (built at
    ``zl``, the rows' inputs before it) and ``r`` the residual at the row's current input.
    ``J^T r`` is a vector-Jacobian product through the residual's graph at ``zl``, kept for the
    purpose: a forward and a backward pass per step instead of a Jacobian. (The gradient at the
    current input would not do: a stale ``J^T J``'s near-null directions amplify its change.)
    A step is kept only where it lowers the row's loss; a row stops reusing once a step does not
    take its loss under :data:`REUSE_MAX_RATIO` of what it was. Returns ``z``, the live rows'
    residuals and summed squares."""
    pos = better.nonzero().squeeze(1)  # positions in live
    if pos.numel() == 0:
        return z, r, cost
    rows = live[pos]
    cq = None if cond is None else cond[rows]
    at = zl[pos].detach().requires_grad_(True)
    with torch.enable_grad():
        r_at = residual(at, cq, rows)  # its graph gives J^T v for any v
    go = torch.ones(pos.numel(), dtype=torch.bool, device=z.device)  # by position in pos
    a = jtj[pos] + lam[pos] * (diag[pos] * eye + 1e-6 * eye)
    for _ in range(reuse):
        v = torch.where(go[:, None], r[pos], torch.zeros_like(r[pos]))
        jtr = torch.autograd.grad(r_at, at, grad_outputs=v, retain_graph=True)[0]
        with torch.no_grad():
            k = go.nonzero().squeeze(1)
            z_new = z[rows[k]] + solve_damped(a[k], -jtr[k])
            r_new = residual(z_new, None if cq is None else cq[k], rows[k])
            cost_new = r_new.square().sum(1)
            was = cost[pos[k]]
            took = cost_new < was  # False for NaN
            z[rows[k[took]]] = z_new[took]
            r[pos[k[took]]] = r_new[took]
            cost[pos[k[took]]] = cost_new[took]
            go[k] = took & (cost_new < REUSE_MAX_RATIO * was)
        if not bool(go.any()):
            break
    return z, r, cost


def _normal_equations(one, jac_map, zl, cl, live, fresh, r, jtj_all, jtr_all, reverse):
    """Write ``J^T J`` and ``J^T r`` of live rows ``fresh`` (positions in ``live``) into
    ``jtj_all`` / ``jtr_all`` at their original rows.

    The Jacobians are built a few rows at a time: a row's Jacobian and the passes that build it
    take about as much memory as a forward pass of as many rows as the latent is wide, so a
    chunk of 512 images would not fit in memory at once. Every forward-mode chunk has the same
    number of rows (the last padded) and reverse mode goes row by row, so that a row's products
    do not depend on the rows beside it."""
    from torch.func import jacrev, vmap

    zf, cf, rf = zl[fresh], None if cl is None else cl[fresh], r[fresh]
    at_all = live[fresh]  # their original rows
    if reverse:  # row by row: memory for one row's forward and 128 of its backward passes
        for i in range(fresh.numel()):
            ci = None if cf is None else cf[i:i + 1]
            jac = jacrev(lambda q: one(q, None if ci is None else ci[0]), chunk_size=128)(zf[i]).unsqueeze(0)
            at = at_all[i:i + 1]
            jtj_all[at], jtr_all[at] = _products(jac_map, jac, zf[i:i + 1], ci, at, rf[i:i + 1])
        return
    cpu = zl.device.type == "cpu"
    rows, cols = dense_rows(zl.shape[1], r.shape[1], cpu=cpu), dense_columns(zl.shape[1], cpu=cpu)
    for lo in range(0, fresh.numel(), rows):
        at = at_all[lo:lo + rows]
        k = at.numel()
        zc, cc, rc, at_p = (None if t is None else padded(t[lo:lo + rows], rows) for t in (zf, cf, rf, at_all))
        if cc is None:
            jac = vmap(lambda zr: forward_jacobian(lambda q: one(q, None), zr, cols))(zc)
        else:
            jac = vmap(lambda zr, cr: forward_jacobian(lambda q: one(q, cr), zr, cols))(zc, cc)
        jtj, jtr = _products(jac_map, jac, zc, cc, at_p, rc)
        jtj_all[at], jtr_all[at] = jtj[:k], jtr[:k]
        del jac


def _products(jac_map, jac, z, c, at, r):
    """``J^T J`` and ``J^T r`` of rows whose generator Jacobian is ``jac`` (mapped to the
    residual's by ``jac_map``, if given)."""
    if jac_map is not None:  # the residual's Jacobian from the generator's
        jac = jac_map(jac, z, c, at)
    return jac.transpose(1, 2) @ jac, (jac.transpose(1, 2) @ r.unsqueeze(2)).squeeze(2)
