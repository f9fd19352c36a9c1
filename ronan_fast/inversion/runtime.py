"""How the inversion runs on its device: denormals, autocast, a compiled generator, CUDA graphs.

None of these change what is computed beyond rounding; each is a context or a wrapper that the
Adam phase and the polish use.
"""

from __future__ import annotations

import contextlib
import functools
import weakref
from collections.abc import Callable

import torch

from ronan_fast.adapters import GeneratorAdapter
from ronan_fast.inversion.settings import PRECISIONS

__all__ = ["flush_denormals", "autocast", "compiled_decode", "capture_graph", "forward_ad_attention"]


@contextlib.contextmanager
def flush_denormals():
    """Flush float32 denormals to zero while inverting (CPU).

    A generator's own images reconstruct almost exactly; the Adam moments of their inputs then
    decay into the denormal range, where CPU arithmetic is several times slower. Values under
    1e-38 change nothing a verdict depends on. Torch has no getter for the flag, so it is
    switched back off afterwards (its default).
    """
    changed = torch.set_flush_denormal(True)
    try:
        yield
    finally:
        if changed:
            torch.set_flush_denormal(False)


def autocast(device: torch.device, precision: str):
    """The Adam phase's autocast context for ``precision`` ("fp32": autocast off)."""
    dtype = PRECISIONS[precision]
    if dtype is None:
        return torch.autocast(device.type, enabled=False)
    # no cast cache: each step runs one forward, and a CUDA graph capture cannot use one
    return torch.autocast(device.type, dtype=dtype, cache_enabled=False)


#: each adapter's torch.compile'd decode_raw, kept while the adapter lives
_COMPILED: "weakref.WeakKeyDictionary[GeneratorAdapter, Callable]" = weakref.WeakKeyDictionary()


def compiled_decode(generator: GeneratorAdapter) -> Callable:
    """``generator.decode_raw`` through ``torch.compile`` (dynamic shapes), made once per adapter.

    What is kept is the compiled class function, called with the adapter: a compiled bound
    method would hold the adapter and keep its weak-keyed entry, and the adapter, alive."""
    fn = _COMPILED.get(generator)
    if fn is None:
        fn = _COMPILED[generator] = torch.compile(type(generator).decode_raw, dynamic=True)
    return functools.partial(fn, generator)


def capture_graph(step: Callable[[], None], generator: GeneratorAdapter) -> "torch.cuda.CUDAGraph":
    """``step`` captured in a CUDA graph (recorded, not run: replay the graph to run it)."""
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            step()
    except RuntimeError as e:
        raise RuntimeError(
            f"cuda_graph=True: capturing the inversion step of {generator.name} in a CUDA graph failed "
            f"({e}); a captured generator must not synchronise with the host (.item(), .cpu(), "
            "data-dependent shapes). Invert with cuda_graph=False."
        ) from e
    return graph


def forward_ad_attention():
    """Attention through its math kernel: the fused CPU/flash kernels have neither forward-mode
    AD nor a differentiable backward, one of which the polish's Jacobian-vector products need
    (e.g. a diffusers UNet's attention)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.MATH])
