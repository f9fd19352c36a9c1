"""After the Adam phase: each image's best starts, their polish, escalation, and the final score.

1. Each image's lowest Adam loss picks its best row; with ``polish_candidates`` > 1 its best
   few rows are polished and the lowest result kept.
2. The polish (:mod:`ronan_fast.inversion.polish`) runs on MSE-like losses, in pieces (it holds
   more memory per row than an Adam step): first the GMRES Gauss-Newton phase where the latent
   is as wide as the image, then the last polish for the rows it left open. Images already under
   their threshold are left as they are: their verdict is settled.
3. With a threshold, an image whose polished rows all ended above it but within
   ``escalate_within`` times it (its verdict in doubt) has ``polish_escalate`` more rows polished.
4. The score is measured again in float32 at the winning input.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from ronan_fast import ops
from ronan_fast.inversion.polish import GMRESGaussNewton, Leaving, last_polish, unsettled
from ronan_fast.inversion.problem import Problem
from ronan_fast.inversion.settings import PRECISIONS

__all__ = ["Winners", "finish", "next_ranked"]


@dataclass
class Winners:
    """Each image's final loss, input, reconstruction (clamped to [0, 1]) and condition, and
    (``settled``, where any) the images a warm start settled above their threshold."""

    loss: Tensor
    inputs: Tensor
    reconstruction: Tensor
    conditions: Tensor | None
    settled: Tensor | None = None


def finish(problem: Problem, final_loss: Tensor, final_latent: Tensor, piece_images: int,
           on_polished: Callable[[int], None] | None = None) -> Winners:
    """Polish and score each image's best rows; ``final_loss`` / ``final_latent`` are every row's
    best Adam loss and input, ``piece_images`` the images per polish piece; ``on_polished(n)``
    is called after each piece of the polish with the images polished so far."""
    s, b, rpi = problem.settings, problem.b, problem.rows_per_image
    loss_b, row_b = ops.best_over_restarts(final_loss, problem.index, b, impl=problem.impl)
    row_b = torch.where(row_b < 0, torch.arange(b, device=problem.device) * rpi, row_b)  # all-NaN image: its first row
    polishing = bool(s.polish_steps) and problem.loss.polishable
    k = min(s.polish_candidates, rpi) if polishing else 1
    ranked = torch.where(torch.isfinite(final_loss), final_loss, torch.full_like(final_loss, float("inf"))).view(b, rpi)
    if k == 1:
        cand = row_b  # [b * k]: the rows whose inputs are polished and scored, image-major
    else:
        cand = (ranked.topk(k, dim=1, largest=False).indices
                + torch.arange(b, device=problem.device).unsqueeze(1) * rpi).flatten()
    polisher = _Polisher(problem, final_latent, piece_images, on_polished) if polishing else None
    if polisher is not None:
        polisher.settled = _settled_losses(problem, final_latent, row_b, loss_b)
    img = torch.arange(b, device=problem.device).repeat_interleave(k)  # each candidate's image
    inputs, cond_b, recon, final = _polish_and_score(problem, polisher, final_latent, cand, img, k)
    if k > 1:  # each image's best candidate after the polish
        pick = _lowest(final, k)
        inputs, recon, final = inputs[pick], recon[pick], final[pick]
        cond_b = None if cond_b is None else cond_b[pick]
    # The score is the lowest loss seen; re-measuring in float32 at the winning input makes it
    # consistent with the reconstruction across precisions (identical in float32 up to rounding).
    final = torch.where(torch.isfinite(final), final, loss_b)
    winners = Winners(final, inputs, recon, cond_b)
    extra = min(s.polish_escalate, rpi - k) if polisher is not None and problem.stop_below is not None else 0
    if extra > 0:
        polisher.on_polished = None  # its images are counted already
        _escalate(problem, polisher, final_latent, ranked, cand, winners, extra)
    winners.reconstruction = winners.reconstruction.clamp(0, 1)
    return winners


def _settled_losses(problem: Problem, final_latent: Tensor, row_b: Tensor, loss_b: Tensor) -> Tensor:
    """Each image's loss that decides whether its verdict is settled before the polish.

    The Adam phase measured its losses under autocast (bf16/fp16): an image whose rows ended
    there (out of steps, levelled off) with a loss under its threshold may lie just over it in
    float32, the precision of its final score (an image stopped by its threshold was confirmed
    in float32 already); measured again, such an image is polished, not left with a flipped verdict.
    """
    if problem.stop_below is None or PRECISIONS[problem.settings.precision] is None:
        return loss_b
    every = torch.arange(problem.b, device=problem.device)
    _, settled = problem.score(final_latent[row_b], problem.cond_of(row_b), every)
    return torch.where(torch.isfinite(settled), settled, loss_b)


def _polish_and_score(problem: Problem, polisher: "_Polisher | None", final_latent: Tensor, cand: Tensor,
                      img: Tensor, per: int):
    """The inputs of rows ``cand`` (row ``j`` belongs to image ``img[j]``, ``per`` rows per
    image), polished when ``polisher`` is given; returns their inputs, conditions,
    reconstructions and losses."""
    inputs = final_latent[cand]
    cond_c = problem.cond_of(cand)
    if polisher is not None:
        polisher.polish(inputs, cond_c, img, per)
    recon, final = problem.score(inputs, cond_c, img)
    return inputs, cond_c, recon, final


def _lowest(final: Tensor, per: int) -> Tensor:
    """Index of each group of ``per`` consecutive rows' lowest finite loss (the first on ties)."""
    pick = torch.where(torch.isfinite(final), final, torch.full_like(final, float("inf"))).view(-1, per).argmin(1)
    return torch.arange(pick.numel(), device=final.device) * per + pick


def _escalate(problem: Problem, polisher: "_Polisher", final_latent: Tensor, ranked: Tensor, cand: Tensor,
              winners: Winners, extra: int) -> None:
    """Verdicts in doubt (above the threshold, but within ``escalate_within`` times it): polish
    ``extra`` more of each such image's best Adam rows and keep any lower loss."""
    stop_below = problem.stop_below
    final = winners.loss
    doubt = ((final >= stop_below) & (final < problem.settings.escalate_within * stop_below)).nonzero().squeeze(1)
    if not doubt.numel():
        return
    more = next_ranked(ranked, cand, doubt, extra)
    in2, cond2, recon2, final2 = _polish_and_score(problem, polisher, final_latent, more,
                                                   doubt.repeat_interleave(extra), extra)
    pick = _lowest(final2, extra)
    better = final2[pick] < final[doubt]  # NaN compares False
    to, src = doubt[better], pick[better]
    winners.inputs[to], winners.reconstruction[to], final[to] = in2[src], recon2[src], final2[src]
    if winners.conditions is not None:
        winners.conditions[to] = cond2[src]


def next_ranked(ranked: Tensor, polished: Tensor, images: Tensor, extra: int) -> Tensor:
    """Rows (flat, image-major) of the ``extra`` lowest losses of each image in ``images`` among
    its rows not in ``polished``, lowest first.

    ``ranked`` is [b, rpi] (non-finite losses as inf); ``polished`` flat row indices already
    polished. Leaving them out, rather than taking ranks k.. of a longer ``topk``, never names a
    polished row again when Adam losses tie (``topk`` orders ties arbitrarily).
    """
    b, rpi = ranked.shape
    done = torch.zeros(b * rpi, dtype=torch.bool, device=ranked.device)
    done[polished] = True
    done = done.view(b, rpi)[images]
    if extra > rpi - int(done.sum(1).max()):
        raise ValueError(f"extra={extra} rows asked for, but some image has fewer rows left unpolished")
    # by loss, then (stably) unpolished rows first: polished rows last even behind non-finite losses
    by_loss = ranked[images].argsort(dim=1, stable=True)
    order = by_loss.gather(1, done.gather(1, by_loss).to(torch.uint8).argsort(dim=1, stable=True))
    return (order[:, :extra] + images.unsqueeze(1) * rpi).flatten()


class _Polisher:
    """The polish of one chunk: the methods its settings name, the raw target, and which images'
    verdicts are settled (:attr:`settled`, each image's loss before the polish)."""

    def __init__(self, problem: Problem, final_latent: Tensor, piece_images: int,
                 on_polished: Callable[[int], None] | None = None):
        self.problem, self.on_polished = problem, on_polished
        s, loss = problem.settings, problem.loss
        self.target_raw = problem.target if loss.fused else problem.generator.from_unit(problem.images)
        self.gmres = GMRESGaussNewton(krylov=s.polish_gmres_iters) if s.polish_gmres_iters else None
        self.last = last_polish(s, loss.tone)
        self.piece_images = piece_images
        # with a threshold: rows levelled off far above it leave the last polish (verdict settled)
        self.settle = (s.settle_patience, s.settle_min_drop, s.settle_above) if problem.stop_below is not None else None
        self.settled: Tensor | None = None

    def polish(self, inputs: Tensor, cond: Tensor | None, img: Tensor, per: int) -> None:
        """Polish ``inputs`` in place (row ``j`` belongs to image ``img[j]``, ``per`` rows per image)."""
        problem = self.problem
        stop_below = problem.stop_below
        # images already under stop_below have a settled verdict: polishing them would only cost
        idx = (torch.arange(inputs.shape[0], device=inputs.device) if stop_below is None
               else (self.settled[img] >= stop_below[img]).nonzero().squeeze(1))
        # with several rows per image, once one of an image's rows is under stop_below the others stop too
        done_groups = None if stop_below is None or per == 1 else torch.zeros(problem.b, dtype=torch.bool,
                                                                                 device=inputs.device)
        piece = self.piece_images * per
        for p0 in range(0, idx.numel(), piece):
            self._piece(inputs, cond, img, idx[p0:p0 + piece], done_groups)
            if self.on_polished is not None:  # images settled before the polish count as polished
                left = idx[p0 + piece:]
                self.on_polished(problem.b - int(torch.unique(img[left]).numel()))

    def _piece(self, inputs: Tensor, cond: Tensor | None, img: Tensor, idx: Tensor, done_groups) -> None:
        """Polish rows ``idx`` of ``inputs`` in place: the GMRES phase, then the last polish."""
        problem, s = self.problem, self.problem.settings
        name = problem.loss.name
        stop_raw = None if problem.stop_below is None else problem.stop_below[img[idx]] / problem.scale  # raw MSE
        clip = None if problem.clipped is None else problem.clipped[img[idx]]
        if self.gmres is not None and inputs.shape[1] == problem.target[0].numel() and name == "mse":
            leaving = Leaving(idx.numel(), s.polish_patience, s.polish_min_drop, stop_raw, img[idx], done_groups)
            res = self.gmres(problem.generator, inputs[idx], None if cond is None else cond[idx],
                             self.target_raw[img[idx]], s.polish_steps, leaving, clip=clip)
            open_ = unsettled(res, leaving)
            inputs[idx] = res.inputs
            idx = idx[open_]
            stop_raw = None if stop_raw is None else stop_raw[open_]
            clip = None if clip is None else clip[open_]
        if idx.numel() and self.last.accepts(name):
            leaving = Leaving(idx.numel(), s.polish_patience, s.polish_min_drop, stop_raw, img[idx], done_groups,
                              self.settle)
            inputs[idx] = self.last(problem.generator, inputs[idx], None if cond is None else cond[idx],
                                    self.target_raw[img[idx]], s.polish_steps, leaving, clip=clip).inputs
