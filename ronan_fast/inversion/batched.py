"""Batched inversion of many images: chunks of images, each one batch of rows.

Every image gets ``rows_per_image`` rows (its restarts; for a class-conditional generator with
the class unknown, ``restarts`` rows per candidate class). A chunk's images enter one batch of
at most ``max_rows`` rows as room frees up; each chunk runs the Adam phase
(:mod:`~ronan_fast.inversion.adam`), then the polish and the final score
(:mod:`~ronan_fast.inversion.finish`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
from torch import Tensor

from ronan_fast import _heap, ops
from ronan_fast.adapters import GeneratorAdapter
from ronan_fast.inversion.adam import AdamPhase
from ronan_fast.inversion.budget import ADMITTED_BATCHES, default_max_rows
from ronan_fast.inversion.calls import FixedShapeCalls, call_rows_for
from ronan_fast.inversion.finish import Winners, finish
from ronan_fast.inversion.problem import Loss, Problem
from ronan_fast.inversion.result import InversionResult
from ronan_fast.inversion.rows import RowBatch
from ronan_fast.inversion.runtime import compiled_decode, flush_denormals
from ronan_fast.inversion.settings import InversionSettings
from ronan_fast.inversion.starts import starts_and_settled

__all__ = ["invert_batched", "invert_chunk"]


def invert_batched(generator: GeneratorAdapter, images: Tensor, s: InversionSettings, loss: Loss, *, seed: int,
                   conditions: Tensor | None, stop_below: Tensor | float | None, max_rows: int | None,
                   impl: ops.Impl, cuda_graph: bool, progress: Callable[[int], None] | None,
                   compile_generator: bool, call_rows: int | None = None) -> InversionResult:
    """Invert checked ``images`` (float32 in [0, 1] on the generator's device) end to end, every
    generator call in blocks of ``call_rows`` rows (:mod:`~ronan_fast.inversion.calls`)."""
    device = generator.device
    b_total = images.shape[0]
    if conditions is not None:
        conditions = torch.as_tensor(conditions)
        if conditions.shape[0] != b_total:
            raise ValueError(f"conditions must have one entry per image ({b_total}), got {conditions.shape[0]}")
    _, rows_per_image = generator.row_conditions(None if conditions is None else conditions[:1], 1, s.restarts)
    if max_rows is None:
        max_rows = default_max_rows(generator, rows_per_image, s, b_total * rows_per_image)
    if max_rows < rows_per_image:
        raise ValueError(f"max_rows={max_rows} is below one image's rows ({rows_per_image})")
    if stop_below is not None:
        stop_below = torch.as_tensor(stop_below, dtype=torch.float32, device=device).expand(b_total).contiguous()
    out = _Outputs(images, generator.latent_dim)
    calls = FixedShapeCalls(generator, call_rows_for(device, call_rows, generator, s.precision),
                            compiled_decode(generator) if compile_generator else None)
    # each chunk holds ADMITTED_BATCHES batches' worth of images; they enter its batch of at most
    # max_rows rows as rows stop
    per_chunk = max(1, max_rows // rows_per_image) * ADMITTED_BATCHES
    heap = _heap.keep_freed_memory() if device.type == "cpu" else contextlib.nullcontext()
    with flush_denormals(), heap:
        for start in range(0, b_total, per_chunk):
            stop = min(b_total, start + per_chunk)
            cond = None if conditions is None else conditions[start:stop]
            problem = Problem.build(calls, images[start:stop], cond, s, loss,
                                    None if stop_below is None else stop_below[start:stop], impl)
            done = None if progress is None else (lambda f, start=start: progress(start + f))
            winners, row_steps = invert_chunk(problem, seed, max_rows, cuda_graph, done)
            out.put(start, stop, winners, row_steps)
            if progress is not None:
                progress(stop)
    return InversionResult(loss=out.loss, inputs=out.inputs, reconstruction=out.recon,
                           conditions=torch.cat(out.cond) if out.cond else None, row_steps=out.steps, settings=s,
                           metric=loss.name, settled=out.settled)


def invert_chunk(problem: Problem, seed: int, max_rows: int, cuda_graph: bool = False,
                 progress: Callable[[float], None] | None = None) -> tuple[Winners, Tensor]:
    """Invert one chunk's images with at most ``max_rows`` rows in the batch at once; returns
    the winners and each image's row-steps. ``progress(images)``, if given, is called as images
    get done: those whose search has ended count half while a polish is to come, and whole once
    polished.

    An image that the warm start settled above its threshold while finding its guess
    (:func:`~ronan_fast.inversion.starts.starts_and_settled`), and whose guess's own loss is above
    the threshold too, has no search: its guess is its result (no row-steps)."""
    z, claimed = starts_and_settled(problem, seed)
    z = z.to(problem.device)
    confirmed = _confirmed(problem, z, claimed)
    if confirmed is None:
        return _search(problem, z, max_rows, cuda_graph, progress)
    settled, recon, loss = confirmed
    b, rpi = problem.b, problem.rows_per_image
    guess_rows = torch.arange(b, device=problem.device)[settled] * rpi
    n_settled = int(guess_rows.numel())
    if progress is not None:
        progress(float(n_settled))
    loss_all = torch.empty(b, dtype=torch.float32, device=problem.device)
    inputs = torch.empty(b, z.shape[1], dtype=torch.float32, device=problem.device)
    recon_all = torch.empty_like(problem.images)
    steps = torch.zeros(b, dtype=torch.int64, device=problem.device)
    loss_all[settled], inputs[settled], recon_all[settled] = loss, z[guess_rows].float(), recon.clamp(0, 1)
    rest = ~settled
    if bool(rest.any()):
        sub = Problem.build(problem.generator, problem.images[rest], None, problem.settings, problem.loss,
                            problem.stop_below[rest], problem.impl)
        done = None if progress is None else (lambda f: progress(n_settled + f))
        won, row_steps = _search(sub, z.view(b, rpi, -1)[rest].reshape(-1, z.shape[1]), max_rows, cuda_graph, done)
        loss_all[rest], inputs[rest], recon_all[rest] = won.loss, won.inputs, won.reconstruction
        steps[rest] = row_steps
    return Winners(loss_all, inputs, recon_all, None, settled), steps


def _confirmed(problem: Problem, z: Tensor, claimed: Tensor | None) -> tuple[Tensor, Tensor, Tensor] | None:
    """The images of ``claimed`` (the warm start's mask, or None) whose guess (each image's
    first row) scores above its threshold: their mask and their guesses' reconstructions and
    losses (in image order). None where there are none, or where the problem has no threshold
    or searches over classes (a warm start that settles images makes neither)."""
    if claimed is None or problem.stop_below is None or problem.row_cond is not None or not bool(claimed.any()):
        return None
    claimed = claimed.to(problem.device)
    img = claimed.nonzero().squeeze(1)
    recon, loss = problem.score(z[img * problem.rows_per_image], None, img)
    above = torch.isfinite(loss) & (loss >= problem.stop_below[img])
    if not bool(above.any()):
        return None
    settled = torch.zeros_like(claimed)
    settled[img[above]] = True
    return settled, recon[above], loss[above]


def _search(problem: Problem, z: Tensor, max_rows: int, cuda_graph: bool,
            progress: Callable[[float], None] | None) -> tuple[Winners, Tensor]:
    """:func:`invert_chunk`'s search from starting rows ``z``: the Adam phase, then the polish."""
    s, generator = problem.settings, problem.generator
    radius = generator.prior_radius
    if s.typical_set == "project" and radius is not None:
        z = z * (radius / z.norm(dim=1, keepdim=True).clamp_min(1e-12))
    capacity = max(problem.rows_per_image, max_rows)
    batch = RowBatch(problem, z, capacity)
    share = 0.5 if s.polish_steps and problem.loss.polishable else 1.0  # of an image's work, in its search
    on_done = None if progress is None else (lambda n: progress(share * n))
    on_polished = None if progress is None else (lambda n: progress(share * problem.b + (1 - share) * n))
    row_steps = AdamPhase(problem, batch, cuda_graph, on_done).run()
    # the polish holds more per row than an Adam step: it runs in pieces of as many images as the
    # batch holds at once (an image's rows stay together)
    winners = finish(problem, batch.final_loss, batch.final_latent, max(1, capacity // problem.rows_per_image),
                     on_polished)
    return winners, row_steps


class _Outputs:
    """The per-image results of all chunks, filled chunk by chunk."""

    def __init__(self, images: Tensor, latent_dim: int):
        b, device = images.shape[0], images.device
        self.loss = torch.empty(b, dtype=torch.float32, device=device)
        self.inputs = torch.empty(b, latent_dim, dtype=torch.float32, device=device)
        self.recon = torch.empty_like(images)
        self.cond: list[Tensor] = []
        self.steps = torch.zeros(b, dtype=torch.int64, device=device)
        self.settled = torch.zeros(b, dtype=torch.bool, device=device)

    def put(self, start: int, stop: int, winners: Winners, row_steps: Tensor) -> None:
        self.loss[start:stop], self.inputs[start:stop] = winners.loss, winners.inputs
        self.recon[start:stop] = winners.reconstruction
        if winners.conditions is not None:
            self.cond.append(winners.conditions)
        self.steps[start:stop] = row_steps
        if winners.settled is not None:
            self.settled[start:stop] = winners.settled
