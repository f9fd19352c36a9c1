"""The Adam phase's batch: every live row's state, as one object with a few verbs.

A row is one start of one image. While it is in the batch it has a latent ``z``, Adam moments,
its Adam step count (steps it was active), its own position in the schedule ``t``, the lowest
loss it has seen and the input that gave it, and the state of its stopping rules. Images are
*admitted* (all their rows at once) while there is room; rows that stop are *compacted* out,
their best loss and input kept in :attr:`RowBatch.final_loss` / :attr:`RowBatch.final_latent`
by original row. The lowest loss is kept by the fused Adam kernel itself
(:func:`ronan_fast.ops.latent_adam_step_`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ronan_fast.inversion.problem import Problem

__all__ = ["RowBatch"]


class RowBatch:
    """The live rows of a chunk (at most ``capacity`` at once) and the results of those that left.

    ``starts`` are the ``m`` rows' starting latents, image-major (``problem.index[r]`` is row
    ``r``'s image). ``rows`` maps each live row to its original row; ``index``, ``cond`` and
    ``lr`` are the live rows' images, conditions and learning-rate buffer, refreshed whenever
    the batch changes.
    """

    def __init__(self, problem: Problem, starts: Tensor, capacity: int):
        self.problem, self.starts, self.capacity = problem, starts, capacity
        device = starts.device
        self.admitted = 0  # images admitted so far (in order)
        self.rows = torch.empty(0, dtype=torch.int64, device=device)
        self.z = starts[:0].clone()
        self.exp_avg = torch.zeros_like(self.z)
        self.exp_avg_sq = torch.zeros_like(self.z)
        self.step = torch.zeros(0, dtype=torch.int64, device=device)
        self.t = torch.zeros(0, dtype=torch.int64, device=device)
        self.best_loss = torch.full((0,), float("inf"), dtype=torch.float32, device=device)
        self.best_latent = self.z.clone()
        self.weight = torch.ones(0, dtype=torch.float32, device=device)
        self.last_best = self.best_loss.clone()  # patience: the best loss at the last improvement
        self.stale = torch.zeros(0, dtype=torch.int64, device=device)  # patience: steps since then
        # the Adam phase's settle rule: the best loss at the row's last multiple of adam_settle_window
        self.settle_ref = self.best_loss.clone()
        # each live row's threshold on its Adam-phase loss: the image's stop_below, lowered for a
        # row whose loss under autocast read under it while its float32 score did not
        stop_below = problem.stop_below
        self.stop = None if stop_below is None else stop_below[:0].clone()
        self.final_loss = torch.full((problem.m,), float("inf"), dtype=torch.float32, device=device)
        self.final_latent = starts.clone()
        self.admit()
        self.refresh()

    @property
    def size(self) -> int:
        return self.rows.shape[0]

    @property
    def all_admitted(self) -> bool:
        return self.admitted >= self.problem.b

    def admit(self) -> bool:
        """Bring the next images' rows into the batch while there is room (at least one image
        when the batch is empty); returns whether any were admitted."""
        rpi = self.problem.rows_per_image
        room = (self.capacity - self.size) // rpi
        n_new = min(self.problem.b - self.admitted, room if self.rows.numel() else max(1, room))
        if n_new <= 0:
            return False
        new = torch.arange(self.admitted * rpi, (self.admitted + n_new) * rpi, device=self.rows.device)
        self.admitted += n_new
        k = new.shape[0]
        z_new = self.starts[new]
        self.rows = torch.cat([self.rows, new])
        self.z = torch.cat([self.z, z_new])
        self.exp_avg = torch.cat([self.exp_avg, torch.zeros_like(z_new)])
        self.exp_avg_sq = torch.cat([self.exp_avg_sq, torch.zeros_like(z_new)])
        self.step = torch.cat([self.step, self.step.new_zeros(k)])
        self.t = torch.cat([self.t, self.t.new_zeros(k)])
        self.best_loss = torch.cat([self.best_loss, self.best_loss.new_full((k,), float("inf"))])
        self.best_latent = torch.cat([self.best_latent, z_new])
        self.weight = torch.cat([self.weight, self.weight.new_ones(k)])
        self.last_best = torch.cat([self.last_best, self.last_best.new_full((k,), float("inf"))])
        self.stale = torch.cat([self.stale, self.stale.new_zeros(k)])
        self.settle_ref = torch.cat([self.settle_ref, self.settle_ref.new_full((k,), float("inf"))])
        if self.stop is not None:
            self.stop = torch.cat([self.stop, self.problem.stop_below[self.problem.index[new]]])
        return True

    def compact(self, keep: Tensor) -> None:
        """Keep rows ``keep`` (a mask over live rows); the others' best loss and input become final."""
        gone = ~keep
        self.final_loss[self.rows[gone]] = self.best_loss[gone]
        self.final_latent[self.rows[gone]] = self.best_latent[gone]
        self.rows, self.z = self.rows[keep], self.z[keep].contiguous()
        self.exp_avg, self.exp_avg_sq = self.exp_avg[keep].contiguous(), self.exp_avg_sq[keep].contiguous()
        self.step, self.t = self.step[keep].contiguous(), self.t[keep].contiguous()
        self.best_loss, self.best_latent = self.best_loss[keep].contiguous(), self.best_latent[keep].contiguous()
        self.last_best, self.stale, self.weight = self.last_best[keep], self.stale[keep], self.weight[keep].contiguous()
        self.settle_ref = self.settle_ref[keep]
        self.stop = None if self.stop is None else self.stop[keep].contiguous()

    def refresh(self) -> None:
        """The live rows' images, conditions and learning-rate buffer, after the batch changed."""
        self.index = self.problem.index[self.rows]
        self.cond = self.problem.cond_of(self.rows)
        self.lr = torch.empty(self.size, dtype=torch.float32, device=self.rows.device)
