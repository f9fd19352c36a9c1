"""When a row leaves the polish: solved, stuck, levelled off, under its threshold, or settled."""

from __future__ import annotations

import torch

__all__ = ["Leaving", "SOLVED_MSE"]

#: a row whose mean squared residual is under this is solved (float32's floor)
SOLVED_MSE = 1e-14


class Leaving:
    """Which live rows leave the polish before a step: solved (mean squared residual under
    1e-14), stuck (damping at its cap), under ``stop_raw``, or levelled off: their loss fell by
    less than ``min_drop`` over the last ``patience`` steps.

    With ``stop_raw``, rows may be grouped (``group``: each row's image, ``[n]``; ``done_groups``:
    a boolean per image, shared between the polishes of one inversion and updated here): once one
    row of an image is solved or under its ``stop_raw`` the image's verdict is settled and its
    other rows (the other polished starts) leave too.

    ``settle`` ``(patience, min_drop, above)``, with ``stop_raw``: a row whose mean squared
    residual is over ``above`` times its ``stop_raw`` and fell by less than ``min_drop`` over the
    last ``patience`` steps leaves too (settled as not belonging)."""

    def __init__(self, n, patience=0, min_drop=0.3, stop_raw=None, group=None, done_groups=None, settle=None):
        self.patience, self.min_drop, self.keep_frac, self.stop_raw = patience, min_drop, 1.0 - min_drop, stop_raw
        self.settle = settle if settle is not None and settle[0] and stop_raw is not None else None
        # every row's cost at the last `span` steps (a ring: step k at k % span)
        span = 1 + max(patience, self.settle[0] if self.settle else 0)
        self.hist = None if span == 1 else [None] * span
        self.n = n
        self.group, self.done_groups = group, done_groups
        # rows settle together only where there is a threshold to settle them
        self.grouped = group is not None and stop_raw is not None and done_groups is not None

    def settled(self, mse, live):
        """Rows ``live`` whose mean squared residual ``mse`` is solved (under 1e-14) or under
        ``stop_raw``, or (grouped) whose image has such a row."""
        done = mse < SOLVED_MSE
        if self.stop_raw is not None:
            done |= mse < self.stop_raw[live]
            if self.grouped:
                g = self.group[live]
                self.done_groups[g[done]] = True
                done |= self.done_groups[g]
        return done

    def __call__(self, k, cost, per_elem, stuck, live):
        """Before step ``k + 1`` (``k`` steps done); ``cost`` holds the live rows' summed squares."""
        mse = cost / per_elem
        done = self.settled(mse, live) | stuck
        if self.hist is not None:
            full = torch.full((self.n,), float("nan"), dtype=cost.dtype, device=cost.device)
            full[live] = cost
            ring = len(self.hist)
            self.hist[k % ring] = full
            # NaN never compares true: a row live now was live at every earlier step (rows only leave)
            if self.patience and k >= self.patience:
                done |= cost > self.keep_frac * self.hist[(k - self.patience) % ring][live]
            if self.settle is not None and k >= self.settle[0]:
                w, drop, above = self.settle
                done |= (mse > above * self.stop_raw[live]) & (cost > (1.0 - drop) * self.hist[(k - w) % ring][live])
        return done

    def keep(self, k, cost, per_elem, stuck, live, *state):
        """Apply the rule before step ``k + 1``: None once every row has left, else ``(live,
        cost, *state)`` cut down to the rows that stay (``state``: per-live-row tensors)."""
        done = self(k, cost, per_elem, stuck, live)
        if bool(done.all()):
            return None
        if not bool(done.any()):
            return (live, cost, *state)
        stay = ~done
        return (live[stay], cost[stay], *(x[stay] for x in state))
