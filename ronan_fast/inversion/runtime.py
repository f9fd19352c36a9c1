"""How the inversion runs on its device: denormals, autocast, a compiled generator, CUDA graphs,
a low-precision twin for the polish's Jacobians.

None of these change what is computed beyond rounding; each is a context or a wrapper that the
Adam phase and the polish use.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import weakref
from collections.abc import Callable

import torch

from ronan_fast.adapters import GeneratorAdapter
from ronan_fast.inversion.settings import PRECISIONS

__all__ = ["flush_denormals", "autocast", "compiled_decode", "capture_graph", "forward_ad_attention",
           "low_precision_decode", "fast_low_precision", "LOW_PRECISION_TOLERANCE"]


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


#: a low-precision twin whose output on the first rows it is given differs from the float32
#: generator's by more than this (relative, in norm) or holds NaN/Inf is not used: the Jacobians
#: are built in float32 (bf16 keeps about 3 significant digits; a 64x64 StyleGAN-style generator
#: cast to bf16 is 1.5e-2 off in norm, its Jacobian about 0.1)
LOW_PRECISION_TOLERANCE = 0.1


def fast_low_precision(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether ``device`` computes in ``dtype`` natively: a CUDA device that supports it
    (``torch.cuda.is_bf16_supported()`` for bf16), a CPU whose oneDNN reports bf16 (fp16) support
    (AVX-512 and up). Elsewhere it would be emulated, and the polish keeps float32."""
    device = torch.device(device)
    if device.type == "cuda":
        return dtype != torch.bfloat16 or torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        probe = torch.ops.mkldnn._is_mkldnn_bf16_supported if dtype == torch.bfloat16 \
            else torch.ops.mkldnn._is_mkldnn_fp16_supported
        try:
            return bool(probe())
        except (AttributeError, RuntimeError):
            return False
    return False


def low_precision_decode(generator: GeneratorAdapter, precision: str) -> tuple[Callable, str]:
    """``(decode, how)``: ``decode(latents, conditions)`` computing ``generator.decode_raw`` in
    ``precision`` (a key of :data:`~ronan_fast.inversion.settings.PRECISIONS`; "fp32" gives
    ``decode_raw`` itself), its output float32, for the dense polish's Jacobians
    (``InversionSettings.polish_precision``); ``how`` says which route:

    * "twin": through delegating adapters that do not change ``decode_raw``, an adapter with a
      ``module`` (:class:`~ronan_fast.adapters.LatentGenerator`,
      :class:`~ronan_fast.adapters.ConditionalGenerator`) gets a copy of it whose module is cast
      to the precision, fed latents (and floating conditions) in it. On a 64x64 StyleGAN-style
      generator on CPU (one thread, bf16 on AVX512-BF16) its 256-column Jacobian took 0.48 s
      against 1.04 s in float32;
    * "autocast": any other adapter (a diffusers pipeline, a custom one) runs under autocast
      (0.65 s on that generator: autocast converts activations back and forth);
    * "fp32": ``precision`` is "fp32", the device has no native arithmetic in it
      (:func:`fast_low_precision`), or the twin failed the check below.

    The twin is checked once, here, on two prior draws: an output off the float32 one by more
    than :data:`LOW_PRECISION_TOLERANCE`, or not finite, and ``decode_raw`` in float32 is used.
    The copy is made per call: a polish holds it while it runs (half the module's float32
    memory for bf16)."""
    from ronan_fast.adapters import ConditionalGenerator, DelegatingAdapter, LatentGenerator

    dtype = PRECISIONS[precision]
    if dtype is None or not fast_low_precision(generator.device, dtype):
        return generator.decode_raw, "fp32"
    base = generator
    while isinstance(base, DelegatingAdapter) and type(base).decode_raw is DelegatingAdapter.decode_raw:
        base = base.base
    if not isinstance(base, (LatentGenerator, ConditionalGenerator)):
        device = generator.device

        def under_autocast(latents, conditions=None):
            with torch.autocast(device.type, dtype=dtype, cache_enabled=False):
                return generator.decode_raw(latents, conditions).float()

        return under_autocast, "autocast"
    twin = copy.copy(base)
    twin.module = copy.deepcopy(base.module).to(dtype)

    def cast(t):
        return t if t is None or not t.is_floating_point() else t.to(dtype)

    def decode(latents, conditions=None):
        return twin.decode_raw(cast(latents), cast(conditions)).float()

    with torch.no_grad():
        z = generator.sample_latents(2, torch.Generator().manual_seed(0)).to(generator.device)
        c = generator.sample_conditions(2, torch.Generator().manual_seed(0)) \
            if isinstance(base, ConditionalGenerator) else None
        c = None if c is None else c.to(generator.device)
        ref = generator.decode_raw(z, c).float()
        low = decode(z, c)
        err = (low - ref).norm() / ref.norm().clamp_min(1e-30)
    if not bool(torch.isfinite(low).all()) or not float(err) <= LOW_PRECISION_TOLERANCE:
        return generator.decode_raw, "fp32"
    return decode, "twin"
