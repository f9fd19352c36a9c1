"""Inversion settings: everything that shapes an inversion's result.

:class:`InversionSettings` is part of a belonging profile's identity: a profile is only valid
for the settings that made it. Named settings and the per-family defaults are in
:mod:`ronan_fast.inversion.presets`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

__all__ = ["InversionSettings", "FIRST_SETTLE_PATIENCE", "SCHEDULES", "PRECISIONS", "POLISH_PRECISIONS",
           "TYPICAL_SET", "POLISH_METHODS", "THRESHOLD_FIELDS", "LATER_FIELDS"]

SCHEDULES = ("constant", "cosine", "warm_restarts")
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
TYPICAL_SET = ("none", "project", "penalty")
POLISH_METHODS = ("dense", "cg", "dense-rev")
#: the precisions the dense polishes build their Jacobians in (fp16's narrow range overflows in
#: the tangents of a deep generator, and a small one's Jacobian came out 6% off against 0.7% in bf16)
POLISH_PRECISIONS = ("fp32", "bf16")
#: fields added after the first settings format: :meth:`InversionSettings.to_dict` writes them only
#: when they differ from these defaults, so earlier profiles and caches keep their identity
LATER_FIELDS = {"polish_method": "dense", "polish_cg_iters": 20, "polish_patience": 0, "polish_min_drop": 0.3,
                "polish_gmres_iters": 0, "polish_reuse": 0, "polish_precision": "fp32", "polish_candidates": 1,
                "stagewise": False, "polish_escalate": 0,
                "escalate_within": 4.0, "settle_patience": 0, "settle_min_drop": 0.2, "settle_above": 4.0,
                "screen": 0, "clip_aware": False, "first_steps": 0, "rest_steps": 0, "adam_settle_window": 0,
                "adam_settle_min_drop": 0.05, "adam_settle_above": 30.0}
#: the settle rule's patience in the first search from a guess alone (``first_steps``), where it is
#: shorter than ``settle_patience``: a row let go there costs its image the full search, not its
#: verdict. Chosen on the tuning half's DCGANs (32 and 48 own, 4 real images each): against the
#: settings' own 6, real images 0.1-0.5 s faster each, one own image in 32 sent on to the full
#: search; a patience of 2 sent 25 of 32 on
FIRST_SETTLE_PATIENCE = 3
#: the settings that act only when a belonging threshold is given (``invert(stop_below=...)``)
THRESHOLD_FIELDS = ("polish_escalate", "escalate_within", "settle_patience", "settle_min_drop", "settle_above",
                    "first_steps", "rest_steps", "adam_settle_window", "adam_settle_min_drop", "adam_settle_above")


@dataclass(frozen=True)
class InversionSettings:
    """Everything that shapes an inversion's result. Part of a belonging profile's identity.

    ``InversionSettings()`` is the package's default, the GAN family's (24 starts halved down to
    2 over 600 cosine Adam steps, then a Levenberg-Marquardt polish; see
    :mod:`~ronan_fast.inversion.presets` for what it was chosen on); the paper's loop (one start,
    1500 constant-rate Adam steps) is ``PRESETS["authors"]``, ``settings="authors"``.
    """

    steps: int = 600
    lr: float = 0.1
    restarts: int = 24
    schedule: str = "cosine"
    #: linear warm-up steps at the start of the schedule
    warmup: int = 0
    #: for "cosine"/"warm_restarts": the lowest learning rate, as a fraction of ``lr``
    min_lr_frac: float = 0.01
    #: for "warm_restarts": number of cosine cycles over ``steps``
    cycles: int = 3
    metric: str = "mse"
    #: the generator's precision in the Adam phase: "bf16"/"fp16" run it under autocast; the
    #: latents, the polish and the scores stay float32, and a row stops under ``stop_below`` only
    #: once its input measured in float32 is under it
    precision: str = "fp32"
    #: successive halving: every ``halving_every`` steps keep the best ``halving_keep`` fraction
    #: of each image's live rows (never fewer than ``min_rows``); 0 turns it off. It acts at the
    #: stopping checks (every ``check_every`` steps): at the first check at or after each multiple
    halving_every: int = 25
    halving_keep: float = 0.5
    min_rows: int = 2
    #: a row stops once its best loss has not improved by ``rel_tol`` (relative) for ``patience`` steps; 0: off
    patience: int = 300
    rel_tol: float = 1e-3
    #: > 0, when a belonging threshold is known: the Adam phase's settle rule. In the second half
    #: of a row's schedule (from step ``steps / 2``), at each multiple of this many steps (a
    #: multiple of ``check_every``), a row whose best loss is above ``adam_settle_above`` times
    #: its image's threshold and fell by less than ``adam_settle_min_drop`` (a fraction) over
    #: that window stops: it has levelled off far above the line, where the polish's settle rule
    #: would let it go after a few steps. A row in its image's basin is a few times above the line by
    #: then and still falling; a real image's rows are tens to hundreds of times above it and
    #: fall by a few percent. The row keeps its best input and the image goes on to the
    #: polish as before. Without a threshold: ignored
    adam_settle_window: int = 0
    adam_settle_min_drop: float = 0.05
    adam_settle_above: float = 30.0
    #: "project": keep latents on the prior's typical-set shell; "penalty": pull them towards it
    typical_set: str = "none"
    penalty: float = 0.0
    #: Levenberg-Marquardt iterations polishing each image's best input at the end (MSE and
    #: "mse-tone"; the "cg" method and the GMRES phase MSE only; images
    #: already under ``stop_below`` are left as they are: their verdict is settled)
    polish_steps: int = 25
    #: how a polish step solves its normal equations: "dense" builds each row's Jacobian by
    #: forward-mode AD (one pass per latent dimension: for latents up to a few hundred wide);
    #: "cg" never forms it and runs ``polish_cg_iters`` conjugate-gradient iterations of
    #: Jacobian-vector and vector-Jacobian products (for latents as wide as the image);
    #: "dense-rev" builds it row by row in reverse mode (vector-Jacobian products, 128 at a time:
    #: memory bounded for wide latents) and solves the damped normal equations exactly
    polish_method: str = "dense"
    polish_cg_iters: int = 20
    #: a polished row stops once its loss fell by less than ``polish_min_drop`` (a fraction) over
    #: the last ``polish_patience`` polish steps (it has levelled off: real images do, a model's
    #: own images keep falling); 0: off. A row also stops once under ``stop_below``.
    polish_patience: int = 0
    polish_min_drop: float = 0.3
    #: > 0: before that polish, Gauss-Newton steps solved by this many GMRES iterations (``J v``
    #: products only, far cheaper than a CG step) for generators whose latent is exactly as
    #: wide as the image (one-step models; ignored for others), under the same leaving rule; only
    #: the rows it leaves unsolved (levelled off, stuck, out of steps) go on to ``polish_method``
    polish_gmres_iters: int = 0
    #: > 0, for the dense polishes: after each step a row takes, up to this many chord steps
    #: reuse that step's Jacobian with the residual at the row's new input (one forward and one
    #: backward pass each, against one forward-mode pass per latent dimension for a Jacobian),
    #: while each takes the row's loss under 0.9 of what it was. ``polish_steps`` and the
    #: leaving rules count the Jacobians built. For the plain and clip-aware MSE (not "mse-tone")
    polish_reuse: int = 0
    #: the precision the dense polishes build their Jacobians in (:data:`POLISH_PRECISIONS`;
    #: "bf16": through a copy of the generator's module cast to it, or under autocast where the
    #: adapter has none: :func:`~ronan_fast.inversion.runtime.low_precision_decode`). Only
    #: ``J^T J`` and ``J^T r`` are approximate: the residuals, the losses and the test that keeps
    #: a step only where it lowers the row's loss stay float32, so a coarser Jacobian can cost
    #: steps, never a wrong loss
    polish_precision: str = "fp32"
    #: how many of each image's best Adam rows (its lowest-loss starts) are polished; the lowest
    #: loss after the polish wins. A start whose Adam loss is lowest can still lie in a basin the
    #: polish cannot leave; a second one costs a second polish per image
    polish_candidates: int = 1
    #: > 0, when a belonging threshold is known (``invert(stop_below=...)``, as when attributing
    #: with early stop): an image whose polished rows all ended above its threshold but within
    #: ``escalate_within`` times it (its verdict in doubt) has this many more of its best Adam
    #: rows polished (the next ones by Adam loss), and the lowest loss wins. Images far above
    #: their threshold (real images) or under it cost nothing more. Without a threshold: ignored
    polish_escalate: int = 2
    escalate_within: float = 4.0
    #: > 0, when a belonging threshold is known: a polished row whose loss is above
    #: ``settle_above`` times its threshold and fell by less than ``settle_min_drop`` (a fraction)
    #: over the last ``settle_patience`` polish steps leaves the polish: it has levelled off far
    #: above the line, its verdict (not belonging) is settled. A model's own images start the
    #: polish a few times above the line and keep falling; real images level off at once, tens
    #: to hundreds of times above it. Only in the last polish (``polish_method``'s), not in the
    #: GMRES phase, where a stall is the method's (restarted GMRES stagnates on some of a
    #: model's own images) and the CG polish takes the row up. Without a threshold: ignored
    settle_patience: int = 6
    settle_min_drop: float = 0.2
    settle_above: float = 4.0
    #: > 1: each start is the best of this many candidates by the loss of one forward pass (run in
    #: blocks of one shape), drawn from the image's own stream before the Adam phase: each block
    #: of ``restarts`` starts (one per class searched) is the ``restarts`` lowest of its
    #: ``restarts * screen`` candidates. A guided first start (an encoder's guess,
    #: :class:`~ronan_fast.warmstart.WarmStarted`) is kept as it is; the others are screened. 0, 1: off
    screen: int = 0
    #: > 0, when a belonging threshold is known and each image's first start is a learned guess
    #: (``generator.guided_starts``): a first search from the guess alone (one start, this many
    #: Adam steps, then the polish, whose settle rule lets a row go after
    #: :data:`FIRST_SETTLE_PATIENCE` steps if ``settle_patience`` is longer), each image stopping
    #: under its threshold. Only the images it leaves at or above their threshold go on to the
    #: full search (these settings), and each
    #: keeps the lower of its two losses; its row-steps are both searches'. A model's own image
    #: whose guess lies in its basin is settled for a fraction of the full search; an image the
    #: guess misses (a real image, or an own image the encoder got wrong) pays both. Not for a
    #: start whose guess is itself a search given the threshold (``guess_searches``: the mapping
    #: start's own first search over ``w``), nor for step-by-step (stagewise) inversions.
    #: Without a threshold: ignored
    first_steps: int = 0
    #: > 0, with ``first_steps``: the Adam steps of the full search for the images the first
    #: search leaves above their threshold (the rest), its halving interval shortened in
    #: proportion (``halving_every * rest_steps / steps``, at least 1); 0: ``steps``. Those images
    #: are real ones or own images whose guess missed, and only the latter need the search.
    #: Without a first search, and without a threshold: ignored
    rest_steps: int = 0
    #: for a multi-step sampler that exposes its steps (``adapter.stage_chain()``, e.g. the zoo's
    #: DDIM sampler): invert its last step as a one-step generator with these settings, then
    #: solve each earlier step for its input by Gauss-Newton (:mod:`ronan_fast.inversion.stagewise`); the
    #: loss reported is the whole sampler's from the recovered initial noise. Ignored for
    #: generators without a stage decomposition
    stagewise: bool = False
    #: for "mse" and "mae": a pixel the image holds at exactly 0 or 1 (an image is saved
    #: clipped) is matched by any output at or beyond that end, its residual counted on
    #: the inner side only (:mod:`ronan_fast.inversion.clipped`). Changes nothing for generators
    #: whose output stays in range (tanh GANs); a decoder that overshoots gets its own images'
    #: inputs back at the 8-bit rounding's loss. False: the plain loss, as the paper's code
    clip_aware: bool = True
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    #: how often (in steps) stopping rules are checked and the batch compacted
    check_every: int = 25

    def __post_init__(self) -> None:
        _positive_int("steps", self.steps)
        _positive_int("restarts", self.restarts)
        _positive_int("check_every", self.check_every)
        _positive_int("min_rows", self.min_rows)
        for name in ("warmup", "halving_every", "patience", "polish_steps", "polish_patience", "polish_gmres_iters",
                     "polish_reuse", "polish_escalate", "settle_patience", "screen", "first_steps", "rest_steps",
                     "adam_settle_window"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {v!r}")
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a finite number > 0, got {self.lr!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {tuple(PRECISIONS)}, got {self.precision!r}")
        if self.polish_precision not in POLISH_PRECISIONS:
            raise ValueError(f"polish_precision must be one of {POLISH_PRECISIONS}, got {self.polish_precision!r}")
        if self.typical_set not in TYPICAL_SET:
            raise ValueError(f"typical_set must be one of {TYPICAL_SET}, got {self.typical_set!r}")
        if not 0 < self.halving_keep < 1:
            raise ValueError(f"halving_keep must lie in (0, 1), got {self.halving_keep}")
        if not 0 <= self.min_lr_frac <= 1:
            raise ValueError(f"min_lr_frac must lie in [0, 1], got {self.min_lr_frac}")
        _positive_int("cycles", self.cycles)
        _positive_int("polish_cg_iters", self.polish_cg_iters)
        _positive_int("polish_candidates", self.polish_candidates)
        if self.polish_method not in POLISH_METHODS:
            raise ValueError(f"polish_method must be one of {POLISH_METHODS}, got {self.polish_method!r}")
        if self.adam_settle_window % self.check_every:
            raise ValueError(f"adam_settle_window must be a multiple of check_every ({self.check_every}): the rule "
                             f"acts at the stopping checks, got {self.adam_settle_window}")
        for name in ("polish_min_drop", "settle_min_drop", "adam_settle_min_drop"):
            v = getattr(self, name)
            if isinstance(v, bool) or not (isinstance(v, (int, float)) and 0 < v < 1):
                raise ValueError(f"{name} must lie in (0, 1), got {v!r}")
        for name in ("escalate_within", "settle_above", "adam_settle_above"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 1 < v < float("inf"):
                raise ValueError(f"{name} must be a finite number > 1, got {v!r}")
        if self.rel_tol < 0 or self.penalty < 0:
            raise ValueError("rel_tol and penalty must be >= 0")
        for name in ("stagewise", "clip_aware"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if not isinstance(self.metric, str):
            raise ValueError("settings.metric must be a metric name; pass metric objects to invert(metric=...)")

    def replace(self, **changes) -> "InversionSettings":
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise TypeError(f"unknown inversion setting(s): {sorted(unknown)}")
        return dataclasses.replace(self, **changes)

    def without_threshold_rules(self) -> "InversionSettings":
        """These settings with the fields that act only given a threshold (``THRESHOLD_FIELDS``)
        at their defaults: the same inversion wherever none is given, under the identity an
        inversion without those fields had (:meth:`to_dict` leaves them out)."""
        return self.replace(**{k: LATER_FIELDS[k] for k in THRESHOLD_FIELDS})

    @classmethod
    def from_dict(cls, d: dict) -> "InversionSettings":
        """The settings :meth:`to_dict` wrote: fields it left out are at their values in
        :data:`LATER_FIELDS` (those of settings made before the field existed), not the class's
        defaults."""
        return cls(**{**LATER_FIELDS, **d})

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        for k, default in LATER_FIELDS.items():
            if d[k] == default:
                del d[k]
        return d


def _positive_int(name: str, v: object) -> None:
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
