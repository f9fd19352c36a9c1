"""Damped normal equations, solved by Cholesky.

The second-order steps (the dense Levenberg-Marquardt polish, the solve for ``z`` of a mapping
start) solve ``(A + damping) x = b`` for a batch of rows, where ``A`` is ``J^T J`` or ``J J^T``
and the damping is a positive diagonal: symmetric positive definite. Cholesky is the solver for
that (half the work of an LU factorisation), and it also avoids batched LU on CPU: with more
than one thread, ``torch.linalg.solve`` on a batch of matrices about 151 wide or wider prints
``Intel oneMKL ERROR: Parameter 6 was incorrect on entry to SLASWP`` and never returns
(torch 2.13 with MKL; pytorch/pytorch#142815), so a wide-latent polish on a multi-core CPU hung.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["solve_damped"]


def solve_damped(a: Tensor, b: Tensor) -> Tensor:
    """``x`` with ``a x = b`` for each matrix of ``a`` ``[..., n, n]`` (symmetric positive
    definite) and ``b`` ``[..., n]`` or ``[..., n, k]``.

    A matrix whose Cholesky factorisation fails (not positive definite in its precision: damping
    too small for a singular ``J^T J``, or a NaN) gets a NaN solution, which a damped step
    treats as a refused step (its loss is not lower), so its damping grows.
    """
    vector = b.dim() == a.dim() - 1
    rhs = b.unsqueeze(-1) if vector else b
    factor, info = torch.linalg.cholesky_ex(a)
    x = torch.cholesky_solve(rhs, factor)
    failed = info != 0
    if bool(failed.any()):
        x = x.masked_fill(failed.view(*failed.shape, 1, 1), float("nan"))
    return x.squeeze(-1) if vector else x
