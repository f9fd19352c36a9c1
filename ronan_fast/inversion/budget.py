"""How many rows the inversion holds at once (its memory budget) and how images are chunked."""

from __future__ import annotations

import torch
from torch import Tensor

from ronan_fast.adapters import GeneratorAdapter
from ronan_fast.inversion.runtime import autocast
from ronan_fast.inversion.settings import InversionSettings

__all__ = ["ADMITTED_BATCHES", "CPU_CHUNK_SAVED_BYTES", "CPU_CHUNK_ROWS", "default_max_rows", "cpu_chunk_rows",
           "saved_bytes_per_row"]

#: images per chunk, in batches: a chunk holds this many times as many images as its batch of
#: ``max_rows`` rows takes at once, and the rest enter the batch as rows stop (successive
#: halving, early stopping) instead of the batch shrinking towards a few rows per image. On
#: CPU a step costs more per row in small batches (the zoo's 64x64 DCGAN, two threads: 1.8 ms
#: per row at 10 rows, 1.3 ms at 120), and the GAN default ends with 2 rows of its 24 per image
ADMITTED_BATCHES = 8

#: on CPU, a chunk's rows are chosen so that the activations the generator saves for its
#: backward pass stay under this many bytes: past it, steps cost more per row (docs/performance.md)
CPU_CHUNK_SAVED_BYTES = 96 << 20
#: rows per chunk on CPU: at least (or one image's rows), at most
CPU_CHUNK_ROWS = (64, 4096)


def default_max_rows(generator: GeneratorAdapter, rows_per_image: int, s: InversionSettings,
                     rows_needed: int) -> int:
    """Rows in the batch at once when the caller gives no ``max_rows``: on CPU
    :func:`cpu_chunk_rows`; on CUDA as many as fill half of the free memory."""
    if generator.device.type != "cuda":
        smallest = max(rows_per_image, CPU_CHUNK_ROWS[0])
        if rows_needed <= smallest:  # one chunk whatever the probe says: no need to probe
            return smallest
        return max(rows_per_image, cpu_chunk_rows(generator, s))
    free, _ = torch.cuda.mem_get_info(generator.device)
    # Measure one row's activation memory with a small forward/backward, then fill half of what is free.
    probe = 8
    torch.cuda.reset_peak_memory_stats(generator.device)
    before = torch.cuda.memory_allocated(generator.device)
    z = generator.sample_latents(probe).requires_grad_(True)
    with autocast(generator.device, s.precision):
        out = generator.decode_raw(z, generator.sample_conditions(probe))
    out.float().sum().backward()
    per_row = max(1, (torch.cuda.max_memory_allocated(generator.device) - before) // probe)
    del z, out
    return max(rows_per_image, int(0.5 * free // (per_row * 2)))


def cpu_chunk_rows(generator: GeneratorAdapter, s: InversionSettings) -> int:
    """Rows per chunk on CPU: as many as keep the activations saved for the backward pass under
    :data:`CPU_CHUNK_SAVED_BYTES`, within :data:`CPU_CHUNK_ROWS`.

    Larger batches amortise nothing more on CPU once the activations outgrow the caches: on the
    zoo's 64x64 DCGAN a step costs 1.5x more per row at 512 rows than at 64 to 192, on its
    one-step generator 1.3x more at 1024 rows than at 128 to 256. Measured per row as the
    difference between two forward passes of 8 and 16 rows (parameters saved once per pass
    cancel out).
    """
    lo, hi = CPU_CHUNK_ROWS
    return int(min(hi, max(lo, CPU_CHUNK_SAVED_BYTES // saved_bytes_per_row(generator, s.precision))))


def saved_bytes_per_row(generator: GeneratorAdapter, precision: str = "fp32") -> int:
    """Bytes of activations the generator saves for its backward pass, per row: the difference
    between forward passes of 8 and 16 rows (parameters saved once per pass cancel out).
    Counted, not timed: the same for the same generator and precision."""
    rng = torch.Generator().manual_seed(0)  # the caller's random stream stays untouched

    def saved(n: int) -> int:
        total = 0

        def pack(t: Tensor) -> Tensor:
            nonlocal total
            total += t.numel() * t.element_size()
            return t

        z = generator.sample_latents(n, rng).requires_grad_(True)
        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            with autocast(generator.device, precision):
                generator.decode_raw(z, generator.sample_conditions(n, rng))
        return total

    return max(1, (saved(16) - saved(8)) // 8)
