"""The Adam phase of Eq. 1: every row of a chunk descends its loss at once.

Each step runs the generator on every live row, the fused loss-and-gradient kernel, the
generator's backward, and the fused latent Adam step that also keeps each row's lowest loss and
its input. Each row follows its own learning-rate schedule (rows enter the batch at different
times) and is checked against the stopping rules (:mod:`ronan_fast.inversion.stopping`) every
``check_every`` of its steps; stopped rows are compacted out and waiting images admitted.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from ronan_fast import ops
from ronan_fast.adapters import GeneratorOutputError
from ronan_fast.inversion.calls import in_blocks
from ronan_fast.inversion.problem import Problem
from ronan_fast.inversion.rows import RowBatch
from ronan_fast.inversion.runtime import autocast, capture_graph
from ronan_fast.inversion.settings import PRECISIONS, InversionSettings
from ronan_fast.inversion.stopping import rows_to_keep

__all__ = ["AdamPhase", "lr_factor"]


def lr_factor(s: InversionSettings, t: int) -> float:
    """The learning rate at step ``t`` of the schedule, as a fraction of ``s.lr``."""
    if s.warmup and t < s.warmup:
        return (t + 1) / s.warmup
    if s.schedule == "constant":
        return 1.0
    if s.schedule == "cosine":
        span = max(1, s.steps - s.warmup)
        frac = (t - s.warmup) / span
    else:
        cycle = max(1, math.ceil((s.steps - s.warmup) / s.cycles))
        frac = ((t - s.warmup) % cycle) / cycle
    return s.min_lr_frac + (1 - s.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * frac))


class AdamPhase:
    """Adam on ``batch``'s rows until every row of ``problem`` has stopped.

    With ``cuda_graph`` each step at a given batch shape is captured in a CUDA graph (after one eager
    step at that shape, on a side stream) and replayed, and captured again whenever the batch
    changes. :attr:`row_steps` counts each image's active row-steps (its cost). ``on_done(n)``,
    if given, is called whenever the number ``n`` of images whose rows have all stopped grows.
    """

    def __init__(self, problem: Problem, batch: RowBatch, cuda_graph: bool = False,
                 on_done: Callable[[int], None] | None = None):
        self.problem, self.batch, self.cuda_graph, self.on_done = problem, batch, cuda_graph, on_done
        s = problem.settings
        device = problem.device
        self.lr_table = torch.tensor([s.lr * lr_factor(s, t) for t in range(s.steps)], dtype=torch.float32,
                                     device=device)
        self.row_steps = torch.zeros(problem.b, dtype=torch.int64, device=device)
        self.mixed = PRECISIONS[s.precision] is not None  # its losses are not the float32 score
        self.checked_output = False
        self.radius = problem.generator.prior_radius

    def run(self) -> Tensor:
        """Step until no row is left; returns :attr:`row_steps`."""
        s, batch = self.problem.settings, self.batch
        graph: torch.cuda.CUDAGraph | None = None
        warmed = False
        cohorts = [0]  # the step count of each group of images admitted together
        while True:
            torch.index_select(self.lr_table, 0, batch.t, out=batch.lr)  # outside a graph: it changes every step
            if not self.cuda_graph or not self.checked_output:
                self.step()
            elif not warmed:
                self._step_on_side_stream()
                warmed = True
            else:
                if graph is None:
                    graph = capture_graph(self.step, self.problem.generator)
                graph.replay()
            batch.t += 1
            # a row's checks come every check_every of its steps and at its last step. The rows
            # admitted together share their step count, kept here on the host too, so that steps
            # between checks need no host sync
            cohorts = [t + 1 for t in cohorts if t + 1 <= s.steps]
            if not any(t % s.check_every == 0 or t == s.steps for t in cohorts):
                continue
            keep = rows_to_keep(batch, s, self.mixed)
            changed = not bool(keep.all())
            if changed:
                batch.compact(keep)
                graph, warmed = None, False
                if self.on_done is not None:  # images with no row left: their search has ended
                    self.on_done(batch.admitted - int(torch.unique(self.problem.index[batch.rows]).numel()))
            if not batch.all_admitted and batch.admit():
                cohorts.append(0)
                graph, warmed, changed = None, False, True
            if not batch.size:
                return self.row_steps
            if changed:  # the batch is another: so are the step's images, conditions and rates
                batch.refresh()

    def step(self) -> None:
        """One Adam step of every live row: reads and writes the batch's state in place."""
        problem, batch, s = self.problem, self.batch, self.problem.settings
        active = torch.ones_like(batch.step, dtype=torch.bool)
        if batch.stop is not None:
            active = batch.best_loss >= batch.stop
        loss, gz = self._loss_and_gradient()
        z = batch.z
        if s.typical_set == "penalty" and self.radius is not None and s.penalty > 0:
            norm = z.norm(dim=1, keepdim=True).clamp_min(1e-12)
            gz = gz + s.penalty * 2 * (norm - self.radius) * z / norm / z.shape[1]
        ops.latent_adam_step_(
            z, gz.float().contiguous(), batch.exp_avg, batch.exp_avg_sq, batch.step, batch.lr, active, loss,
            batch.best_loss, batch.best_latent, s.beta1, s.beta2, s.eps, impl=problem.impl,
        )
        if s.typical_set == "project" and self.radius is not None:
            z.mul_(self.radius / z.norm(dim=1, keepdim=True).clamp_min(1e-12))
        self.row_steps.index_add_(0, batch.index, active.long())

    def _loss_and_gradient(self) -> tuple[Tensor, Tensor]:
        """Each live row's loss (on [0, 1] images) and its gradient by the row's latent."""
        problem, batch = self.problem, self.batch
        generator, loss_fn = problem.generator, problem.loss
        zl = batch.z.detach().requires_grad_(True)
        with torch.enable_grad():
            with autocast(problem.device, problem.settings.precision):
                raw = generator.step_decode_raw(zl, batch.cond)
            if not self.checked_output:
                generator.check_output(raw, zl.shape[0], check_finite=False)
                if not raw.requires_grad:
                    raise GeneratorOutputError(
                        f"{generator.name}'s output does not depend on its input (no gradient): nothing to invert")
            if loss_fn.fused:
                with torch.no_grad():
                    # matched clipped pixels (clip_aware) compare equal: their loss and gradient are 0
                    loss_raw, gpred = ops.recon_loss_grad(problem.raw_for_loss(raw, batch.index), problem.target,
                                                          batch.index, batch.weight, loss_fn.name, impl=problem.impl)
                loss, objective = loss_raw * problem.scale, (raw, gpred)
            else:
                per_row = in_blocks(loss_fn.module, generator.rows, generator.to_unit(raw.float()),
                                    problem.images[batch.index])
                loss, objective = per_row.detach().float(), (per_row.sum(), None)
            if not self.checked_output:
                if not bool(torch.isfinite(loss).all()):
                    raise GeneratorOutputError(f"{generator.name} gave a NaN/Inf reconstruction loss at the first step")
                self.checked_output = True
            (gz,) = torch.autograd.grad(objective[0], zl, objective[1], allow_unused=True)
        if gz is None:
            raise GeneratorOutputError(f"{generator.name}'s output does not depend on its input: nothing to invert")
        return loss, gz

    def _step_on_side_stream(self) -> None:
        """One eager step on a side stream, as a CUDA graph capture at this shape requires first."""
        device = self.problem.device
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            self.step()
        torch.cuda.current_stream(device).wait_stream(side)
