"""pytest-benchmark: one inversion step, ours against the plain PyTorch step, same rows.

Run with ``python -m pytest bench/test_bench_step.py --benchmark-only``; compare the groups'
means (the ratio is the figure, never an assert). Each step: generator forward, reconstruction
loss, gradient, generator backward, Adam update with per-row best tracking.
"""

from __future__ import annotations

import pytest
import torch

from ronan_fast import ops

ROWS = (64, 512)


@pytest.fixture(scope="module")
def adapter():
    from bench.generators import default

    return default().adapter


def _state(adapter, rows):
    g = torch.Generator().manual_seed(0)
    target = adapter.generate(rows, g).images
    z = adapter.sample_latents(rows, g)
    return target, z


@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.benchmark(group="inversion step")
def test_step_plain_pytorch(benchmark, adapter, rows):
    target, z0 = _state(adapter, rows)
    z = z0.clone().requires_grad_(True)
    opt = torch.optim.Adam([z], lr=0.1, foreach=True)
    best = torch.full((rows,), float("inf"))

    def step():
        nonlocal best
        opt.zero_grad(set_to_none=True)
        loss = (adapter.to_unit(adapter.decode_raw(z)) - target).square().flatten(1).mean(1)
        loss.sum().backward()
        opt.step()
        best = torch.minimum(best, loss.detach())

    benchmark(step)
    assert torch.isfinite(best).all()


@pytest.mark.parametrize("impl", ["ext", "ref"])
@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.benchmark(group="inversion step")
def test_step_ronan_fast(benchmark, adapter, rows, impl):
    from ronan_fast import _ext

    if impl == "ext" and not _ext.has_device(torch.device("cpu")):
        pytest.skip(_ext.why_unavailable(torch.device("cpu")))
    target, z0 = _state(adapter, rows)
    raw_target = adapter.from_unit(target)
    z = z0.clone()
    m, v = torch.zeros_like(z), torch.zeros_like(z)
    step_n = torch.zeros(rows, dtype=torch.int64)
    lr = torch.full((rows,), 0.1)
    active = torch.ones(rows, dtype=torch.bool)
    best, best_z = torch.full((rows,), float("inf")), z.clone()
    index, weight = torch.arange(rows), torch.ones(rows)

    def step():
        zl = z.detach().requires_grad_(True)
        raw = adapter.decode_raw(zl)
        with torch.no_grad():
            loss, gpred = ops.recon_loss_grad(raw, raw_target, index, weight, "mse", impl=impl)
        (gz,) = torch.autograd.grad(raw, zl, gpred)
        ops.latent_adam_step_(z, gz, m, v, step_n, lr, active, loss, best, best_z, impl=impl)

    benchmark(step)
    assert torch.isfinite(best).all()
