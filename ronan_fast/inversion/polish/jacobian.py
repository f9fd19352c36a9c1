"""Products with the generator's Jacobian, and the residual the polishes reduce."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["JacobianProducts", "raw_residual"]


class JacobianProducts:
    """Products with the Jacobian ``J`` of ``f`` (rows independent) at one point, for many vectors.

    ``jv(v) = J v`` and ``jtw(w) = J^T w``. By default both come from reverse mode: one forward
    pass, then one backward pass with ``create_graph`` that records ``g(u) = J^T u`` for a dummy
    ``u``; ``J v`` is then ``d(v . g(u))/du``, one backward pass through that recorded graph, and
    ``J^T w`` one backward pass through the forward's. On the one-step zoo model (CPU, 16 rows,
    one thread) that took 32 ms per ``J v`` against 97 ms for forward-mode ``torch.func.jvp``
    (one forward pass: 15-19 ms), so the Krylov polishes, which are all such products, run two
    to three times faster.

    ``mode`` is ``"reverse"``, ``"forward"`` (``torch.func.jvp`` / ``vjp``) or None: decide here,
    once per polish. A generator whose backward is not itself differentiable (a custom autograd
    Function marked once-differentiable, or one whose backward detaches) cannot give ``J v``
    this way; so on first use one random direction is computed both ways and reverse mode is
    kept only when it raises nothing and agrees with forward mode to 1e-3 (float32 rounding is
    about 1e-6). A generator without forward-mode AD (an old-style custom Function with no
    ``jvp`` rule) gets reverse mode checked against a central difference instead (to 1e-2); one
    that fails that too, or has neither rule, is refused with a ValueError that says so.
    """

    def __init__(self, f, z: Tensor, mode: str | None = None):
        self.f, self.z = f, z
        self._drop_recording()
        self._vjp = None  # forward mode's J^T w, made on first use
        self.mode = self._choose() if mode is None else mode
        if self.mode == "reverse" and self._g is None:
            self._record()
        self.jv = self._rev_jv if self.mode == "reverse" else self._fwd_jv

    def _drop_recording(self) -> None:
        """Forget reverse mode's recording (and the graphs it holds)."""
        self._zz = self._out = self._u = self._g = None

    def _record(self) -> None:
        """Record ``g = J^T u`` (reverse mode): ``_zz`` the point, ``_out`` the output, ``_u`` the dummy."""
        zz = self.z.detach().requires_grad_(True)
        with torch.enable_grad():
            out = self.f(zz)
            u = torch.zeros_like(out, requires_grad=True)
            (g,) = torch.autograd.grad(out, zz, u, create_graph=True)
        self._zz, self._out, self._u, self._g = zz, out, u, g

    def _fwd_jv(self, v: Tensor) -> Tensor:
        from torch.func import jvp

        return jvp(self.f, (self.z,), (v,))[1]

    def _rev_jv(self, v: Tensor) -> Tensor:
        (jv,) = torch.autograd.grad(self._g, self._u, v, retain_graph=True, allow_unused=True)
        if jv is None:
            raise RuntimeError("the generator's backward does not depend on its output gradient")
        return jv

    def jtw(self, w: Tensor) -> Tensor:
        if self.mode == "forward":
            if self._vjp is None:
                from torch.func import vjp

                self._vjp = vjp(self.f, self.z)[1]
            return self._vjp(w)[0]
        return torch.autograd.grad(self._out, self._zz, w, retain_graph=True)[0]

    def _choose(self) -> str:
        """The mode for this generator; a "reverse" answer leaves its recording in place."""
        v = torch.randn(self.z.shape, generator=torch.Generator().manual_seed(0)).to(self.z)
        try:
            self._record()
            if not self._g.requires_grad:
                raise RuntimeError("the generator's backward was recorded without a graph")
            rev = self._rev_jv(v)
        except RuntimeError as e:
            self._drop_recording()
            rev, rev_error = None, e
        try:
            fwd, tol = self._fwd_jv(v), 1e-3
        except (RuntimeError, NotImplementedError) as e:
            if rev is None:
                raise ValueError(
                    "the polish needs Jacobian-vector products, but the generator supports neither a "
                    f"differentiable backward ({rev_error}) nor forward-mode AD ({e}); invert with "
                    "polish_steps=0 (Adam only)") from e
            fwd, tol, fwd_error = self._central_difference(v), 1e-2, e
        else:
            fwd_error = None
            if rev is None:
                return "forward"
        with torch.no_grad():
            err = (rev - fwd).norm() / fwd.norm().clamp_min(1e-30)
        if bool(torch.isfinite(err)) and float(err) < tol:
            return "reverse"
        self._drop_recording()
        if fwd_error is not None:
            raise ValueError(
                "the polish needs Jacobian-vector products, but the generator's second-order backward "
                f"disagrees with a finite difference (relative error {float(err):.2g}) and it has no "
                f"forward-mode AD ({fwd_error}); invert with polish_steps=0 (Adam only)") from fwd_error
        return "forward"

    def _central_difference(self, v: Tensor) -> Tensor:
        """``J v`` by a central difference, per row with a step of 1e-3 of the row's scale
        (float32: accurate to about 1e-4 relative on a smooth generator)."""
        with torch.no_grad():
            h = 1e-3 * (self.z.norm(dim=1, keepdim=True) + 1) / v.norm(dim=1, keepdim=True).clamp_min(1e-30)
            return (self.f(self.z + h * v) - self.f(self.z - h * v)) / (2 * h)


def raw_residual(generator, target_raw, clip=None):
    """``residual(z, c, rows)``: the float32 raw-unit residual of rows ``rows``, flattened
    ``[n, C*H*W]``; one-sided at the clipped pixels of ``clip`` (a ``ClippedPixels`` aligned
    with ``target_raw``) when given."""

    def residual(z, c, rows):
        out = generator.decode_raw(z, c)
        if out.dtype in (torch.float16, torch.bfloat16):
            out = out.float()
        diff = out - target_raw[rows]
        return (diff if clip is None else clip[rows].residual(diff)).flatten(1)

    return residual
