"""Generator calls of one fixed shape, so that an image's arithmetic does not depend on its company.

A CPU or GPU kernel picks its algorithm, and so its rounding, by the shape it is given: the same
input row run through a convolution in a batch of 3 and in a batch of 64 gives different low
bits. Inverting an image beside others would then give it another loss than inverting it alone,
and its verdict could change with the batch. So every call of the generator (and of a metric
module) during inversion is cut into blocks of exactly ``rows`` rows, the last block padded
with copies of its first row: a row's result depends only on its own input and the block
shape, not on which rows share its block or how many there are.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from ronan_fast.adapters import DelegatingAdapter, GeneratorAdapter

__all__ = ["CPU_CALL_ROWS_SMALL", "CPU_CALL_SAVED_BYTES", "DEFAULT_CALL_ROWS", "FixedShapeCalls", "call_rows_for", "check_call_rows", "in_blocks", "padded"]

#: rows per generator call on CPU. A block pads up to ``rows - 1`` rows when few are left (an
#: image alone at the end of its search, a polish of a few rows), and a small block costs more
#: per row when many are: measured on the zoo's generators (GAN default, one thread), the 64x64
#: DCGAN took 3.3 s per image in a batch of 32 and 5.2 s alone at 8 rows, against 3.6 s and 5.6 s
#: at 16; the bundled 28x28 DCGAN 0.28 s and 0.57 s at 8 rows, against 0.17 s and 0.46 s at 16
#: (and 0.23 s and 0.93 s at 32; measured again on a quiet core: 16 of its images in 5.0 s at 16
#: rows against 6.3 s at 8, one image alone in 1.69 s against 1.44 s, the same losses). So a
#: generator whose activations saved for the backward pass take at most
#: :data:`CPU_CALL_SAVED_BYTES` for 16 rows gets 16 rows a call, any other 8.
DEFAULT_CALL_ROWS = 8
CPU_CALL_ROWS_SMALL = 16
CPU_CALL_SAVED_BYTES = 1 << 20
#: on a GPU, as many rows per call (a power of two, at most :data:`CUDA_MAX_CALL_ROWS`) as keep the
#: activations one call saves for its backward pass under this many bytes: a small generator's
#: calls fill the device, a large one's pad little for a lone image
CUDA_CALL_SAVED_BYTES = 2 << 30
CUDA_MAX_CALL_ROWS = 256


def call_rows_for(device: torch.device, call_rows: int | None = None, generator: GeneratorAdapter | None = None,
                  precision: str = "fp32") -> int:
    """Rows per generator call on ``device``: ``call_rows`` when given, else the device's default,
    set by ``generator``'s activations per row (on CPU 16 for a small generator, else 8; on a GPU
    up to 256). The same generator, precision and device always get the same number."""
    if call_rows is not None:
        check_call_rows(call_rows)
        return call_rows
    if generator is None:
        return DEFAULT_CALL_ROWS
    from ronan_fast.inversion.budget import saved_bytes_per_row

    per_row = saved_bytes_per_row(generator, precision)
    if device.type != "cuda":
        return CPU_CALL_ROWS_SMALL if CPU_CALL_ROWS_SMALL * per_row <= CPU_CALL_SAVED_BYTES else DEFAULT_CALL_ROWS
    rows = max(1, CUDA_CALL_SAVED_BYTES // per_row)
    return int(min(CUDA_MAX_CALL_ROWS, 1 << (rows.bit_length() - 1)))


def check_call_rows(call_rows: object) -> None:
    if isinstance(call_rows, bool) or not isinstance(call_rows, int) or call_rows < 1:
        raise ValueError(f"call_rows must be an integer >= 1, got {call_rows!r}")


def in_blocks(fn: Callable[..., Tensor], rows: int, *tensors: Tensor | None) -> Tensor:
    """``fn(*tensors)`` computed in blocks of exactly ``rows`` rows along the first dimension.

    The last block is padded with copies of its first row and the padding's results are dropped;
    ``None`` arguments are passed as they are. Differentiable (forward and reverse mode)."""
    n = next(t for t in tensors if t is not None).shape[0]
    out = []
    for a in range(0, n, rows):
        k = min(rows, n - a)
        block = [None if t is None else padded(t[a:a + k], rows) for t in tensors]
        res = fn(*block)
        out.append(res if k == rows else res[:k])
    return out[0] if len(out) == 1 else torch.cat(out)


def padded(t: Tensor, rows: int) -> Tensor:
    """``t`` with copies of its first row appended up to ``rows`` rows."""
    k = t.shape[0]
    if k == rows:
        return t
    return torch.cat([t, t[:1].expand(rows - k, *t.shape[1:])])


class FixedShapeCalls(DelegatingAdapter):
    """``generator`` with every :meth:`decode_raw` call run in blocks of ``rows`` rows.

    Everything else is the wrapped adapter's (:attr:`base`). ``step_decode``, if given, computes
    a block in :meth:`step_decode_raw`, the Adam phase's calls, in place of
    ``generator.decode_raw`` (e.g. its ``torch.compile``'d twin; the polish differentiates
    twice, which compiled graphs do not support, so it keeps the plain one).
    """

    def __init__(self, generator: GeneratorAdapter, rows: int, step_decode: Callable | None = None):
        super().__init__(generator)
        self.rows = rows
        self._step_decode = generator.decode_raw if step_decode is None else step_decode

    def decode_raw(self, latents: Tensor, conditions: Tensor | None = None) -> Tensor:
        return in_blocks(self.base.decode_raw, self.rows, latents, conditions)

    def step_decode_raw(self, latents: Tensor, conditions: Tensor | None = None) -> Tensor:
        """The Adam phase's forward: :meth:`decode_raw` through ``step_decode``."""
        return in_blocks(self._step_decode, self.rows, latents, conditions)
