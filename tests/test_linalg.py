"""The damped normal equations' solver, and the wide-latent polish on several CPU threads."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from ronan_fast.inversion.linalg import solve_damped


def _damped(batch: int, n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch of ``J^T J + lam (diag(J^T J) + 1e-6) I`` in float64, as the polish builds them."""
    jac = torch.randn(batch, 3 * n, n, generator=g, dtype=torch.float64)
    jtj = jac.transpose(1, 2) @ jac
    lam = torch.rand(batch, 1, 1, generator=g, dtype=torch.float64) * 0.1 + 1e-3
    eye = torch.eye(n, dtype=torch.float64)
    diag = torch.diagonal(jtj, dim1=1, dim2=2).unsqueeze(2)
    return jtj + lam * (diag * eye + 1e-6 * eye), torch.randn(batch, n, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("n", [5, 64, 200])
def test_solve_damped_matches_float64(n):
    g = torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))  # fresh inputs each run; global RNG untouched
    a, b = _damped(4, n, g)
    ref = torch.stack([torch.linalg.solve(a[i], b[i]) for i in range(4)])  # one matrix at a time
    x = solve_damped(a.float(), b.float())
    assert x.shape == b.shape and x.dtype == torch.float32
    assert torch.isfinite(x).all()
    rel = float((x.double() - ref).norm() / ref.norm())
    assert rel < 1e-5, rel
    # several right-hand sides at once
    xm = solve_damped(a, torch.stack([b, 2 * b], -1))
    assert torch.allclose(xm[..., 0], ref, rtol=1e-10, atol=1e-12)
    assert torch.allclose(xm[..., 1], 2 * ref, rtol=1e-10, atol=1e-12)


def test_solve_damped_gives_nan_where_the_matrix_is_not_positive_definite():
    g = torch.Generator().manual_seed(3)
    a, b = _damped(3, 8, g)
    a[1] = -torch.eye(8, dtype=torch.float64)  # negative definite
    a[2, 0, 0] = float("nan")
    x = solve_damped(a, b)
    assert torch.isfinite(x[0]).all()
    assert torch.allclose(x[0], torch.linalg.solve(a[0], b[0]))
    assert torch.isnan(x[1]).all() and torch.isnan(x[2]).all()


_WIDE_POLISH = textwrap.dedent("""
    import torch
    from torch import nn
    from ronan_fast.adapters import LatentGenerator
    from ronan_fast.inversion import FAMILY_DEFAULTS, invert

    torch.set_num_threads(2)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(200, 64), nn.Tanh(), nn.Linear(64, 3 * 8 * 8), nn.Tanh(), nn.Unflatten(1, (3, 8, 8)))
    g = LatentGenerator(net, (200,), output_range=(-1, 1))
    x = g.generate(2, torch.Generator().manual_seed(1)).images
    r = invert(g, x, settings=FAMILY_DEFAULTS["gan"].replace(steps=20, restarts=4, polish_steps=3), seed=0)
    assert torch.isfinite(r.loss).all(), r.loss
    print("polished", r.loss.tolist())
""")


def test_wide_latent_dense_polish_finishes_on_two_threads():
    """A batch of 200-wide damped systems on two CPU threads: batched LU (``torch.linalg.solve``)
    never returned there (MKL's SLASWP error, pytorch/pytorch#142815); the polish must finish.
    Run in a child process so that a hang fails the test instead of stopping the suite."""
    try:
        out = subprocess.run([sys.executable, "-c", _WIDE_POLISH], capture_output=True, text=True, timeout=240)
    except subprocess.TimeoutExpired:
        pytest.fail("the dense polish of a 200-wide latent on two threads did not finish in 240 s")
    assert out.returncode == 0, out.stderr[-2000:]
    assert "polished" in out.stdout
    assert "oneMKL ERROR" not in out.stderr, out.stderr[-2000:]
