"""Same image, same verdict: an image's loss does not depend on the company it keeps.

Each image's starts are drawn from its pixels and the seed, and every generator call runs in
blocks of one shape (:mod:`ronan_fast.inversion.calls`), so on CPU an image's loss is the same,
bit for bit, alone or in a batch, at any position, under any row budget, in any split of a job.
The cases cover the paths whose arithmetic could see the batch: the GAN default with a
threshold (halving, early stop, the dense polish, escalation, the settle rule), the one-step
default (GMRES and CG polishes over two candidates), a conditional model's class search with
the reverse-mode polish, and metric modules (the tone-fitted MSE with its polish, SSIM).
"""

from __future__ import annotations

import pytest
import torch

from ronan_fast.inversion import FAMILY_DEFAULTS, PRESETS, invert

SMALL = dict(steps=80, lr=0.1, restarts=6, schedule="cosine", min_lr_frac=0.01, halving_every=20, halving_keep=0.5,
             min_rows=2, patience=40, rel_tol=1e-3, check_every=10)


def _real(n: int) -> torch.Tensor:
    from ronan_fast.default import default_sample_paths
    from ronan_fast.imageio import load_images

    x, _, _ = load_images(default_sample_paths()[:n], (1, 28, 28))
    return x


def _images(adapter, n_own: int, n_real: int) -> torch.Tensor:
    own = adapter.generate(n_own, torch.Generator().manual_seed(3)).images
    return torch.cat([torch.round(own * 255) / 255, _real(n_real)])


def _zoo(name):
    from ronan_fast.zoo import zoo_adapter

    return zoo_adapter(name)


def _bundled():
    from ronan_fast.calibration import default_generator

    return default_generator()


CASES = {
    "gan-default-threshold": (_bundled, lambda: FAMILY_DEFAULTS["gan"].replace(steps=200), dict(stop_below=2e-4)),
    "one-step-default-threshold": (lambda: _zoo("onestep-fmnist"), lambda: FAMILY_DEFAULTS["consistency"].replace(
        steps=40, restarts=4, halving_every=10, polish_steps=4, polish_cg_iters=10, polish_gmres_iters=8,
        polish_escalate=1), dict(stop_below=3e-6)),
    "conditional-search-reverse-polish": (lambda: _zoo("condgan-fmnist"), lambda: PRESETS["authors"].replace(
        **{**SMALL, "restarts": 2}, polish_steps=2, polish_method="dense-rev"), {}),
    "tone-polish": (lambda: _zoo("vae-fmnist"), lambda: PRESETS["authors"].replace(**SMALL, polish_steps=3),
                    dict(metric="mse-tone")),
    "ssim": (lambda: _zoo("vae-fmnist"), lambda: PRESETS["authors"].replace(**{**SMALL, "steps": 30}), dict(metric="ssim")),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request):
    make, settings, kw = CASES[request.param]
    adapter = make()
    images = _images(adapter, 3, 2)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        whole = invert(adapter, images, settings=settings(), seed=5, **kw)
        yield adapter, images, settings(), kw, whole
    finally:
        torch.set_num_threads(threads)


def _same(res, whole, idx) -> None:
    assert torch.equal(res.loss, whole.loss[idx]), (res.loss, whole.loss[idx])
    assert torch.equal(res.inputs, whole.inputs[idx])
    assert torch.equal(res.row_steps, whole.row_steps[idx])


def test_a_permutation_gives_each_image_its_bits(case):
    adapter, images, s, kw, whole = case
    perm = torch.tensor([4, 2, 0, 3, 1])
    _same(invert(adapter, images[perm], settings=s, seed=5, **_stop(kw, perm)), whole, perm)


def test_each_image_alone_gives_its_bits(case):
    adapter, images, s, kw, whole = case
    for i in range(images.shape[0]):
        idx = torch.tensor([i])
        _same(invert(adapter, images[idx], settings=s, seed=5, **_stop(kw, idx)), whole, idx)


def test_a_split_job_and_a_small_row_budget_give_the_same_bits(case):
    adapter, images, s, kw, whole = case
    first, rest = torch.arange(0, 2), torch.arange(2, 5)
    _same(invert(adapter, images[first], settings=s, seed=5, **_stop(kw, first)), whole, first)
    _same(invert(adapter, images[rest], settings=s, seed=5, **_stop(kw, rest)), whole, rest)
    every = torch.arange(5)
    per_image = adapter.row_conditions(None, 1, s.restarts)[1]  # a class search has rows per class
    rows = invert(adapter, images, settings=s, seed=5, max_rows=2 * per_image, **kw)  # 2 images at a time
    _same(rows, whole, every)


def test_the_same_image_twice_gets_the_same_bits(case):
    adapter, images, s, kw, whole = case
    idx = torch.tensor([1, 1, 3])
    _same(invert(adapter, images[idx], settings=s, seed=5, **_stop(kw, idx)), whole, idx)


def _stop(kw: dict, idx: torch.Tensor) -> dict:
    """``kw`` with a per-image ``stop_below`` taken at ``idx`` (a scalar one is the same for all)."""
    stop = kw.get("stop_below")
    if isinstance(stop, torch.Tensor) and stop.dim():
        return {**kw, "stop_below": stop[idx]}
    return kw
