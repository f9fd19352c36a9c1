"""The C heap setting held while inverting on CPU, and the CPU chunk size."""

from __future__ import annotations

import platform
import threading

import pytest
import torch
from torch import nn

from ronan_fast import _heap
from ronan_fast.adapters import LatentGenerator
from ronan_fast.inversion import CPU_CHUNK_ROWS, CPU_CHUNK_SAVED_BYTES, budget, invert, resolve_settings
from ronan_fast.inversion.budget import cpu_chunk_rows


class FakeLibc:
    """Records the allocator calls instead of making them."""

    def __init__(self):
        self.calls = []

    def mallopt(self, param, value):
        self.calls.append(("mallopt", param, value))
        return 1

    def malloc_trim(self, pad):
        self.calls.append(("malloc_trim", pad))
        return 1


@pytest.fixture
def fake(monkeypatch):
    lib = FakeLibc()
    monkeypatch.setattr(_heap, "_libc", lib)
    monkeypatch.setattr(_heap, "_users", 0)
    return lib


def test_held_while_active_and_given_back_after_the_last_user(fake):
    with _heap.keep_freed_memory() as held:
        assert held and _heap.active()
        assert fake.calls == [("mallopt", -3, _heap.MMAP_THRESHOLD), ("mallopt", -1, _heap.TRIM_WHILE_ACTIVE)]
        with _heap.keep_freed_memory():  # nested: nothing set again, nothing given back early
            pass
        assert len(fake.calls) == 2 and _heap.active()
    assert not _heap.active()
    assert fake.calls[2:] == [("mallopt", -1, _heap.TRIM_AFTER), ("malloc_trim", 0)]


def test_given_back_when_the_block_raises(fake):
    with pytest.raises(RuntimeError):
        with _heap.keep_freed_memory():
            raise RuntimeError("boom")
    assert not _heap.active() and fake.calls[-1] == ("malloc_trim", 0)


def test_concurrent_users_share_one_setting(fake):
    inside, release = threading.Barrier(3), threading.Event()

    def use():
        with _heap.keep_freed_memory():
            inside.wait()
            release.wait()

    threads = [threading.Thread(target=use) for _ in range(2)]
    for t in threads:
        t.start()
    inside.wait()
    assert _heap.active() and sum(c[0] == "malloc_trim" for c in fake.calls) == 0
    release.set()
    for t in threads:
        t.join()
    assert sum(c[0] == "malloc_trim" for c in fake.calls) == 1
    assert sum(c == ("mallopt", -3, _heap.MMAP_THRESHOLD) for c in fake.calls) == 1


def test_switched_off_by_the_environment(monkeypatch):
    monkeypatch.setattr(_heap, "_libc", False)
    monkeypatch.setenv("RONAN_FAST_CPU_HEAP", "0")
    with _heap.keep_freed_memory() as held:
        assert not held and not _heap.active()


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_real_glibc_setting_is_taken_and_an_inversion_runs_under_it(monkeypatch):
    monkeypatch.setattr(_heap, "_libc", False)
    monkeypatch.delenv("RONAN_FAST_CPU_HEAP", raising=False)
    seen = []
    net = nn.Sequential(nn.Linear(4, 64), nn.Tanh(), nn.Linear(64, 16), nn.Unflatten(1, (1, 4, 4)))
    gen = LatentGenerator(net, 4, (-1, 1))
    from ronan_fast.inversion import batched

    real_invert_chunk = batched.invert_chunk

    def spy(*args, **kw):
        seen.append(_heap.active())
        return real_invert_chunk(*args, **kw)

    monkeypatch.setattr(batched, "invert_chunk", spy)
    res = invert(gen, gen.generate(3, torch.Generator().manual_seed(0)).images,
                 settings=resolve_settings(gen, "authors", steps=20), seed=0)
    assert seen == [True] and not _heap.active()
    assert torch.isfinite(res.loss).all()


def _mlp_generator(width: int, size: int) -> LatentGenerator:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, width), nn.ReLU(), nn.Linear(width, size * size), nn.Unflatten(1, (1, size, size)))
    return LatentGenerator(net, 8, (-1, 1))


def test_cpu_chunk_rows_follow_the_saved_activations_per_row():
    s = resolve_settings(_mlp_generator(16, 4), "authors")
    lo, hi = CPU_CHUNK_ROWS
    assert cpu_chunk_rows(_mlp_generator(16, 4), s) == hi  # tiny rows: the upper bound
    # the adapter freezes the parameters, so only what the gradient to the input needs is saved:
    # the ReLU's output (width floats per row) and the weights, saved once per pass (not per row)
    width = 1 << 16
    per_row = 4 * width
    rows = cpu_chunk_rows(_mlp_generator(width, 4), s)
    assert rows == max(lo, min(hi, CPU_CHUNK_SAVED_BYTES // per_row))
    assert lo <= rows < hi
    assert cpu_chunk_rows(_mlp_generator(1 << 20, 2), s) == lo  # huge rows: the lower bound


def test_cpu_chunk_probe_leaves_the_global_random_stream_alone():
    gen = _mlp_generator(16, 4)
    state = torch.random.get_rng_state()
    cpu_chunk_rows(gen, resolve_settings(gen, "authors"))
    assert torch.equal(state, torch.random.get_rng_state())


def test_cpu_chunk_probe_is_skipped_when_the_whole_job_fits_the_smallest_chunk(monkeypatch):
    gen = _mlp_generator(16, 4)
    s = resolve_settings(gen, "authors")
    probed = []
    monkeypatch.setattr(budget, "cpu_chunk_rows", lambda g, st: probed.append(1) or 1000)
    lo = CPU_CHUNK_ROWS[0]
    assert budget.default_max_rows(gen, 8, s, lo) == lo and not probed  # one chunk either way
    assert budget.default_max_rows(gen, 2 * lo, s, 2 * lo) == 2 * lo and not probed  # one image's rows
    assert budget.default_max_rows(gen, 8, s, lo + 1) == 1000 and probed == [1]
