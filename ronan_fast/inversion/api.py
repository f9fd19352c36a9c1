"""The public entry point: :func:`invert`, Eq. 1 for a batch of images."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import torch
from torch import Tensor

from ronan_fast import ops
from ronan_fast.adapters import GeneratorAdapter
from ronan_fast.inversion.batched import invert_batched
from ronan_fast.inversion.calls import check_call_rows
from ronan_fast.inversion.presets import resolve_settings
from ronan_fast.inversion.problem import Loss, check_images
from ronan_fast.inversion.result import InversionResult, after_second_search
from ronan_fast.inversion.settings import FIRST_SETTLE_PATIENCE, InversionSettings
from ronan_fast.inversion.stagewise import invert_stagewise

__all__ = ["invert"]


def invert(
    generator: GeneratorAdapter,
    images: Tensor,
    *,
    settings: InversionSettings | str | None = None,
    steps: int | None = None,
    lr: float | None = None,
    restarts: int | None = None,
    metric=None,
    precision: str | None = None,
    seed: int = 0,
    conditions: Tensor | None = None,
    stop_below: Tensor | float | None = None,
    max_rows: int | None = None,
    impl: ops.Impl = "auto",
    cuda_graph: bool = False,
    progress: Callable[[int], None] | None = None,
    compile_generator: bool = False,
    call_rows: int | None = None,
) -> InversionResult:
    """Reverse-engineer each image's input: all images times restarts as one batch (in chunks).

    Args:
        generator: the model, wrapped in a :class:`~ronan_fast.adapters.GeneratorAdapter`.
        images: ``[B, C, H, W]`` float in [0, 1] at the generator's native shape.
        settings: a preset name ("authors", "default") or :class:`InversionSettings`; the
            keyword arguments ``steps``, ``lr``, ``restarts``, ``precision`` and a metric name override it.
        metric: "mse" (default), "mae", "ssim", "mse-tone" (:class:`~ronan_fast.metrics.ToneMSE`), or a
            metric object (e.g. ``metrics.LPIPS(backbone)``).
        seed: each image's starting latents are drawn from a hash of its pixels and ``seed``
            (:mod:`~ronan_fast.inversion.starts`): same image, seed, settings, device and
            ``call_rows``, same result, whatever else is in the batch, wherever the image stands
            in it and however the job is split.
        conditions: per-image known conditions for a conditional generator (class unknown if omitted).
        stop_below: per-image loss (``[B]`` or a scalar) under which an image's rows stop: its
            verdict can no longer change. The reported loss is then the loss at stopping.
        max_rows: rows in the batch at once (memory budget); by default on CPU as many as keep the
            generator's saved activations under 96 MiB (64 to 4096 rows: faster per row than larger
            batches), on CUDA sized to free memory. Images are taken in chunks of
            :data:`~ronan_fast.inversion.budget.ADMITTED_BATCHES` times as many as fit at once; within
            a chunk, an image enters the batch as soon as rows stopping (halving, early stop) leave
            room for all of its rows, so the batch stays full. Each image's result does not depend
            on what runs beside it, nor on ``max_rows``.
        impl: kernel implementation, see :mod:`ronan_fast.ops`.
        cuda_graph: on CUDA, capture the Adam step (generator forward and backward, fused loss and
            gradient, latent Adam) in a CUDA graph and replay it, instead of launching every
            kernel from Python at every step. A graph is captured for each batch shape (after
            one eager step at that shape) and captured again after each compaction. Same
            arithmetic, fewer launches: it pays where steps are launch-bound (small batches,
            single images). The generator must run without host synchronisation (no ``.item()``,
            no data-dependent shapes); the polish phases are not captured. Needs a CUDA generator.
        progress: called with the number of images finished after each chunk.
        compile_generator: run the Adam phase's generator forward and backward through
            ``torch.compile`` (dynamic shapes: one compilation serves every batch size as rows
            stop; kept per adapter for later calls). The first call compiles (seconds to a minute);
            then each step is faster where the generator's layers fuse (CPU, one thread: the zoo's
            DCGANs' forward and backward 1.4-1.7x faster at 64-256 rows, whole inversions 1.1-1.3x;
            bench/results/speed_cpu_compiled.md). Same arithmetic
            up to rounding. The polish phases run the generator as it is (they differentiate twice,
            which compiled graphs do not support). Not with ``cuda_graph``.
        call_rows: rows per generator call: every call of the generator (and of a metric module)
            runs in blocks of exactly this many rows, the last padded, so that an image's
            arithmetic does not depend on how many rows share its call (kernels choose their
            algorithm, and rounding, by shape). Default: set by the generator's activations per row
            (:mod:`~ronan_fast.inversion.calls`): on CPU 16 for a small generator (the bundled
            DCGAN), else 8; on CUDA a power of two up to 256.
            Part of what makes a result reproducible, with the device and the number of threads.
    """
    if metric is not None and not isinstance(metric, str):
        loss = Loss(getattr(metric, "name", type(metric).__name__), metric)
        s = resolve_settings(generator, settings, steps=steps, lr=lr, restarts=restarts, precision=precision,
                             metric=loss.name)
    else:
        s = resolve_settings(generator, settings, steps=steps, lr=lr, restarts=restarts, precision=precision,
                             metric=metric)
        loss = Loss.named(s.metric)
    _check_flags(generator, seed, cuda_graph, compile_generator)
    if call_rows is not None:
        check_call_rows(call_rows)
    images = check_images(generator, images).to(generator.device)
    chain = generator.stage_chain() if s.stagewise else None
    run = invert_batched if chain is None else functools.partial(invert_stagewise, chain=chain)
    if chain is None and s.first_steps and stop_below is not None and getattr(generator, "guided_starts", False) \
            and not getattr(generator, "guess_searches", False):
        return _first_search_then_full(generator, images, s, loss, seed=seed, conditions=conditions,
                                       stop_below=stop_below, max_rows=max_rows, impl=impl, cuda_graph=cuda_graph,
                                       progress=progress, compile_generator=compile_generator, call_rows=call_rows)
    return run(generator, images, s, loss, seed=seed, conditions=conditions, stop_below=stop_below, max_rows=max_rows,
               impl=impl, cuda_graph=cuda_graph, progress=progress, compile_generator=compile_generator,
               call_rows=call_rows)


def _first_search_then_full(generator: GeneratorAdapter, images: Tensor, s: InversionSettings, loss: Loss, *,
                            stop_below: Tensor | float, conditions: Tensor | None,
                            progress: Callable[[int], None] | None, **kw) -> InversionResult:
    """``s.first_steps``' first search from each image's guess alone, then the full search (``s``,
    ``s.rest_steps`` long where set) for the images it leaves at or above their threshold; each
    keeps the lower of its losses (:attr:`InversionSettings.first_steps`). Each image's result
    depends on it alone, as the searches' do."""
    b = images.shape[0]
    sb = torch.as_tensor(stop_below, dtype=torch.float32, device=images.device).expand(b).contiguous()
    full = s.replace(first_steps=0, rest_steps=0)
    # the first search lets a row levelled off far above its threshold go sooner: it costs the
    # image the full search, not its verdict
    patience = min(s.settle_patience, FIRST_SETTLE_PATIENCE)
    first = invert_batched(generator, images, full.replace(restarts=1, screen=0, steps=s.first_steps, halving_every=0,
                                                           polish_candidates=1, settle_patience=patience),
                           loss, stop_below=sb, conditions=conditions, progress=None, **kw)
    ended = first.loss.detach().cpu()
    # NaN compares False: an image whose first search broke goes on
    go_on = ~(ended < sb.cpu())
    if first.settled is not None:
        go_on &= ~first.settled.cpu()
    rest = go_on.nonzero().squeeze(1)
    done = b - rest.numel()
    if progress is not None and done:
        progress(done)
    if rest.numel() == 0:
        return dataclasses.replace(first, settings=s)
    if conditions is not None:
        conditions = torch.as_tensor(conditions)
        conditions = conditions[rest.to(conditions.device)]
    if s.rest_steps:
        halving = 0 if not s.halving_every else max(1, round(s.halving_every * s.rest_steps / s.steps))
        full = full.replace(steps=s.rest_steps, halving_every=halving)
    second = invert_batched(generator, images[rest.to(images.device)], full, loss, stop_below=sb[rest.to(sb.device)],
                            conditions=conditions,
                            progress=None if progress is None else (lambda f: progress(done + f)), **kw)
    before = first.loss[rest.to(first.loss.device)]
    lower = (second.loss < before) | (torch.isnan(before) & ~torch.isnan(second.loss))
    return dataclasses.replace(after_second_search(first, rest, second, lower), settings=s)


def _check_flags(generator: GeneratorAdapter, seed, cuda_graph, compile_generator) -> None:
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ValueError(f"seed must be an integer, got {seed!r}")
    if not isinstance(cuda_graph, bool):
        raise ValueError(f"cuda_graph must be True or False, got {cuda_graph!r}")
    if not isinstance(compile_generator, bool):
        raise ValueError(f"compile_generator must be True or False, got {compile_generator!r}")
    if compile_generator and cuda_graph:
        raise ValueError("compile_generator=True and cuda_graph=True: choose one (a compiled generator brings its own "
                         "kernels; torch.compile(mode='reduce-overhead') captures CUDA graphs itself)")
    if cuda_graph and generator.device.type != "cuda":
        raise ValueError(f"cuda_graph=True needs a generator on a CUDA device, got {generator.name} on "
                         f"{generator.device}")
