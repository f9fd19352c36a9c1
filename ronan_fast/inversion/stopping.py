"""The Adam phase's stopping rules, applied at each row's checks (every ``check_every`` of its steps).

A row stops when it diverged (NaN/Inf), when its image is under its belonging threshold (its
verdict can no longer change; under autocast only once confirmed in float32), when it has
stopped improving (``patience``), when it has levelled off far above its image's threshold in
the second half of its schedule (``adam_settle_window``), when successive halving drops it as a
clearly losing start, or when it is out of steps. Rows between their checks go on whatever the rules say.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ronan_fast.inversion.rows import RowBatch
from ronan_fast.inversion.settings import InversionSettings

__all__ = ["rows_to_keep", "halve", "halvings_due"]


def rows_to_keep(batch: RowBatch, s: InversionSettings, mixed: bool) -> Tensor:
    """Mask of the live rows that go on after this step (one host sync per check).

    ``mixed``: the Adam phase's losses were measured under autocast, so a threshold crossing is
    confirmed in float32 before it stops a row.
    """
    due_check = (batch.t % s.check_every == 0) | (batch.t == s.steps)
    keep = torch.isfinite(batch.z).all(1)  # a row that diverged to NaN/Inf can only waste steps
    if batch.stop is not None:
        keep &= ~_under_threshold(batch, due_check, mixed)
    if s.patience:
        keep &= _patient(batch, s, due_check)
    if s.adam_settle_window and batch.stop is not None:
        keep &= ~_levelled_off(batch, s, due_check)
    if s.halving_every:
        due = torch.where(due_check & (batch.t < s.steps), halvings_due(batch.t, s), 0)
        if bool(due.any()):
            frac = torch.full(due.shape, s.halving_keep, dtype=torch.float32, device=due.device).pow(due)
            keep &= halve(batch.best_loss, batch.index, frac, s.min_rows)
    keep &= batch.t < s.steps  # out of steps
    keep |= ~due_check  # rows between their checks go on whatever the rules say
    return keep


def _under_threshold(batch: RowBatch, due_check: Tensor, mixed: bool) -> Tensor:
    """Rows (at a check) whose image has a row under its threshold: its verdict is settled."""
    under = (batch.best_loss < batch.stop) & due_check
    if mixed:
        _confirm_in_float32(batch, under)
    b = batch.problem.b
    settled_img = torch.zeros(b, dtype=torch.bool, device=under.device).scatter_reduce(
        0, batch.index, under, "amax", include_self=True)
    return settled_img[batch.index]


def _confirm_in_float32(batch: RowBatch, under: Tensor) -> None:
    """A loss measured under autocast settles nothing by itself: each row it puts under its
    threshold is measured again in float32 (the final score's precision) and stays in ``under``
    only if under ``stop_below`` there too; otherwise it goes on, its threshold lowered by the
    gap seen between the two precisions and by a tenth more at each miss, so that it is not
    measured again at every check."""
    claim = under.nonzero().squeeze(1)
    if not claim.numel():
        return
    problem = batch.problem
    _, f32 = problem.score(batch.best_latent[claim], None if batch.cond is None else batch.cond[claim],
                           batch.index[claim])
    goal = problem.stop_below[batch.index[claim]]
    ok = f32 < goal
    under[claim] = ok
    ratio = (batch.best_loss[claim] / f32).nan_to_num(0.0).clamp(0.0, 1.0)
    lower = torch.minimum(batch.stop[claim], goal * ratio) * 0.9
    batch.stop[claim] = torch.where(ok, batch.stop[claim], lower)


def _patient(batch: RowBatch, s: InversionSettings, due_check: Tensor) -> Tensor:
    """Rows whose best loss improved by ``rel_tol`` (relative) within the last ``patience`` steps."""
    improved = batch.best_loss < batch.last_best * (1 - s.rel_tol)
    stale = batch.stale
    batch.stale = torch.where(due_check, torch.where(improved, torch.zeros_like(stale), stale + s.check_every), stale)
    batch.last_best = torch.where(due_check & improved, batch.best_loss, batch.last_best)
    return batch.stale < s.patience


def _levelled_off(batch: RowBatch, s: InversionSettings, due_check: Tensor) -> Tensor:
    """Rows (at a check on a multiple of ``adam_settle_window`` of their steps, in the second half
    of their schedule) whose best loss is over ``adam_settle_above`` times their image's threshold
    and fell by less than ``adam_settle_min_drop`` since the previous multiple. Each such check
    also records the row's best loss there for the next one."""
    w = s.adam_settle_window
    boundary = due_check & (batch.t % w == 0)
    threshold = batch.problem.stop_below[batch.index]  # the image's own, not a row's lowered one
    flat = batch.best_loss > (1 - s.adam_settle_min_drop) * batch.settle_ref
    levelled = boundary & (2 * batch.t >= s.steps) & (batch.best_loss > s.adam_settle_above * threshold) & flat
    batch.settle_ref = torch.where(boundary, batch.best_loss, batch.settle_ref)
    return levelled


def halvings_due(done: Tensor, s: InversionSettings) -> Tensor:
    """How many successive-halving points (multiples of ``halving_every``) fall in the steps since
    each row's previous stopping check, ``done`` its steps done.
    Halving acts at the checks (every ``check_every`` steps), so one that falls between two
    checks acts at the next one; when several fall there (``halving_every < check_every``) the
    next check keeps ``halving_keep`` to their number."""
    if not s.halving_every:
        return torch.zeros_like(done)
    return done // s.halving_every - (done - s.check_every).clamp_min(0) // s.halving_every


def halve(best_loss: Tensor, index: Tensor, keep: float | Tensor, min_rows: int) -> Tensor:
    """Mask of rows to keep: per image, the best ceil(keep * live) rows (at least min_rows).

    ``keep`` is one fraction for every image, or a per-row float32 tensor (the same value on all
    of an image's rows; 1 keeps them all)."""
    m = best_loss.shape[0]
    order = torch.argsort(torch.nan_to_num(best_loss, nan=float("inf")), stable=True)
    order = order[torch.argsort(index[order], stable=True)]  # grouped by image, best first
    grouped = index[order]
    counts = torch.bincount(grouped, minlength=int(index.max()) + 1 if m else 0)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(m, device=index.device) - starts[grouped]
    if isinstance(keep, Tensor):  # each image's fraction, from its rows
        keep = torch.ones(counts.shape[0], dtype=torch.float32, device=index.device).scatter_reduce(
            0, index, keep.float(), "amin", include_self=False)
    quota = torch.clamp(torch.ceil(counts.float() * keep).long(), min=min_rows)
    keep_sorted = rank < quota[grouped]
    mask = torch.empty_like(keep_sorted)
    mask[order] = keep_sorted
    return mask
