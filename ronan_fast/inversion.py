"""Input reverse-engineering (Eq. 1): i* = argmin_i L(M(i), x), batched over images and restarts.

Every image gets ``rows_per_image`` latent rows (its restarts; for a class-conditional
generator with the class unknown, ``restarts`` rows per candidate class). All rows of a chunk
of images run as one batch: generator forward, the fused loss-and-gradient kernel, the
generator's backward, and the fused Adam step with best-row tracking. An image's score is the
lowest loss seen over all its steps and rows, re-measured in float32 at the winning input.

Rows cost nothing once stopped: a row stops when its image's loss is already under
``stop_below`` (its verdict can no longer change), when it has stopped improving, or when
successive halving drops it as a clearly losing restart; stopped rows are compacted out of the
batch at the next check.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ronan_fast import _heap, ops
from ronan_fast.adapters import GeneratorAdapter, GeneratorOutputError
from ronan_fast.metrics import ToneMSE

__all__ = ["InversionSettings", "InversionResult", "invert", "resolve_settings", "PRESETS"]

SCHEDULES = ("constant", "cosine", "warm_restarts")
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
TYPICAL_SET = ("none", "project", "penalty")
POLISH_METHODS = ("dense", "cg", "dense-rev")
#: fields added after the first settings format: :meth:`InversionSettings.to_dict` writes them only
#: when they differ from these defaults, so earlier profiles and caches keep their identity
_LATER_FIELDS = {"polish_method": "dense", "polish_cg_iters": 20, "polish_patience": 0, "polish_min_drop": 0.3,
                 "polish_gmres_iters": 0, "polish_candidates": 1, "stagewise": False, "polish_escalate": 0,
                 "escalate_within": 4.0, "settle_patience": 0, "settle_min_drop": 0.2, "settle_above": 4.0}
#: the settings that act only when a belonging threshold is given (``invert(stop_below=...)``)
THRESHOLD_FIELDS = ("polish_escalate", "escalate_within", "settle_patience", "settle_min_drop", "settle_above")


@dataclass(frozen=True)
class InversionSettings:
    """Everything that shapes an inversion's result. Part of a belonging profile's identity."""

    steps: int = 1500
    lr: float = 0.1
    restarts: int = 1
    schedule: str = "constant"
    #: linear warm-up steps at the start of the schedule
    warmup: int = 0
    #: for "cosine"/"warm_restarts": the lowest learning rate, as a fraction of ``lr``
    min_lr_frac: float = 0.0
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
    halving_every: int = 0
    halving_keep: float = 0.5
    min_rows: int = 1
    #: a row stops once its best loss has not improved by ``rel_tol`` (relative) for ``patience`` steps; 0: off
    patience: int = 0
    rel_tol: float = 1e-3
    #: "project": keep latents on the prior's typical-set shell; "penalty": pull them towards it
    typical_set: str = "none"
    penalty: float = 0.0
    #: Levenberg-Marquardt iterations polishing each image's best input at the end (MSE and
    #: "mse-tone"; the "cg" method and the GMRES phase MSE only; images
    #: already under ``stop_below`` are left as they are: their verdict is settled)
    polish_steps: int = 0
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
    #: how many of each image's best Adam rows (its lowest-loss starts) are polished; the lowest
    #: loss after the polish wins. A start whose Adam loss is lowest can still lie in a basin the
    #: polish cannot leave; a second one costs a second polish per image
    polish_candidates: int = 1
    #: > 0, when a belonging threshold is known (``invert(stop_below=...)``, as when attributing
    #: with early stop): an image whose polished rows all ended above its threshold but within
    #: ``escalate_within`` times it (its verdict in doubt) has this many more of its best Adam
    #: rows polished (the next ones by Adam loss), and the lowest loss wins. Images far above
    #: their threshold (real images) or under it cost nothing more. Without a threshold: ignored
    polish_escalate: int = 0
    escalate_within: float = 4.0
    #: > 0, when a belonging threshold is known: a polished row whose loss is above
    #: ``settle_above`` times its threshold and fell by less than ``settle_min_drop`` (a fraction)
    #: over the last ``settle_patience`` polish steps leaves the polish: it has levelled off far
    #: above the line, its verdict (not belonging) is settled. A model's own images start the
    #: polish a few times above the line and keep falling; real images level off at once, tens
    #: to hundreds of times above it. Only in the last polish (``polish_method``'s), not in the
    #: GMRES phase, where a stall is the method's (restarted GMRES stagnates on some of a
    #: model's own images) and the CG polish takes the row up. Without a threshold: ignored
    settle_patience: int = 0
    settle_min_drop: float = 0.2
    settle_above: float = 4.0
    #: for a multi-step sampler that exposes its steps (``adapter.stage_chain()``, e.g. the zoo's
    #: DDIM sampler): invert its last step as a one-step generator with these settings, then
    #: solve each earlier step for its input by Gauss-Newton (:mod:`ronan_fast.stagewise`); the
    #: loss reported is the whole sampler's from the recovered initial noise. Ignored for
    #: generators without a stage decomposition
    stagewise: bool = False
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
                     "polish_escalate", "settle_patience"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {v!r}")
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a finite number > 0, got {self.lr!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {tuple(PRECISIONS)}, got {self.precision!r}")
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
        for name in ("polish_min_drop", "settle_min_drop"):
            v = getattr(self, name)
            if isinstance(v, bool) or not (isinstance(v, (int, float)) and 0 < v < 1):
                raise ValueError(f"{name} must lie in (0, 1), got {v!r}")
        for name in ("escalate_within", "settle_above"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 1 < v < float("inf"):
                raise ValueError(f"{name} must be a finite number > 1, got {v!r}")
        if self.rel_tol < 0 or self.penalty < 0:
            raise ValueError("rel_tol and penalty must be >= 0")
        if not isinstance(self.stagewise, bool):
            raise ValueError(f"stagewise must be True or False, got {self.stagewise!r}")
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
        return self.replace(**{k: _LATER_FIELDS[k] for k in THRESHOLD_FIELDS})

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        for k, default in _LATER_FIELDS.items():
            if d[k] == default:
                del d[k]
        return d


def _positive_int(name: str, v: object) -> None:
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {v!r}")


#: Named settings. "authors" is the paper's code: one start, 1500 Adam steps at lr 0.1.
#: "stagewise" inverts a multi-step sampler step by step (:mod:`ronan_fast.stagewise`; others
#: get these settings end to end): its last step from two starts at the forward process
#: (one Adam step), each polished by Gauss-Newton (GMRES, then CG) for up to 80 steps; the
#: earlier steps solved exactly. On the zoo's 6-step DDIM sampler it takes the model's own
#: images from a median of 1.8e-4 (end to end) to 1.8e-7 (1.9e-9 to 2.6e-5), and held-out
#: real images as low or lower, half of them to 1e-14
#: (bench/results/convergence_cpu_ddim_stagewise.md).
PRESETS: dict[str, InversionSettings] = {
    "authors": InversionSettings(steps=1500, lr=0.1, restarts=1, schedule="constant"),
}
#: Default settings per generator family (see the README for the benchmark behind them).
#: "gan": chosen on bench/results/convergence_cpu.md. On the 64x64, nz=100 DCGAN
#: (dcgan64-photos) the paper's single start converges on 56% of the model's own images; 8
#: starts halved every 100 steps over 600 cosine steps, then 25 Levenberg-Marquardt steps on
#: each image's best input, converge on all of them in less wall time per image than the
#: authors' one-image loop. Attributing with a threshold, a polished row still over 4x it whose
#: loss fell by less than 20% over 6 steps leaves the polish (``settle_patience``): on that
#: DCGAN's per-step polish trajectories (bench/results/polish_plateau_dcgan64_cpu.md) its own
#: images over 4x the line had fallen to at most 0.48x their loss 6 steps before, real images
#: to no less than 0.91x, so real images stop after 6 polish steps instead of 25.
#: 8 starts halved every 100 steps converged 200 of one draw of 200 of its images but 195 and 197
#: of two others (6 of the 8 misses as high as real images: every start the halving kept was in
#: another basin). Per-start trajectories of such images (bench/results/start_selection_dcgan64_cpu.md)
#: show the start that ends lowest among the best few by step 25 for all but one, so the GAN
#: default starts 24 and halves every 25 steps (2104 row-steps per image against 1985): 200 of
#: 200 on that draw and 199 of 200 on the third, held out from the choice, in about the same time
#: (bench/results/convergence_cpu_dcgan64_r24_n200.md). Attributing with a
#: threshold, an image whose polished start ends above it but within 4x of it has two more
#: polished (``polish_escalate``, as for one-step models). The earlier default is the preset
#: "gan-8-starts".
FAMILY_DEFAULTS: dict[str, InversionSettings] = {
    "gan": InversionSettings(
        steps=600, lr=0.1, restarts=24, schedule="cosine", min_lr_frac=0.01, halving_every=25,
        halving_keep=0.5, min_rows=2, patience=300, rel_tol=1e-3, polish_steps=25, settle_patience=6,
        polish_escalate=2,
    ),
    # "consistency": one-step generators whose latent is as wide as the image (a consistency
    # model's f(x_T, T), a distilled one-step sampler). Chosen on the zoo's one-step student
    # (bench/results/convergence_cpu_onestep*.md): Adam leaves the model's own images near 1e-4,
    # where real images also end; nearly exact Gauss-Newton steps (100 CG iterations each) take
    # its own images on to 1e-7 and below while real ones level off above 1e-6. At equal
    # generator passes, 10 CG iterations per step separated far less than 40 or 100
    # (polish_probe_onestep_cpu.md). 20 polish steps left 2 of 32 own images above every real
    # one: they were slow, not stuck, so the polish runs up to 80 steps, and a row stops once its
    # loss fell by less than 20% over 10 steps (real images level off after about 20 steps; own
    # images keep falling), or once under the belonging threshold when attributing. 20% rather
    # than 30%: 96.0% against 95.0% of 200 own images converged, real losses unchanged
    # (convergence_cpu_onestep_drop20*.md), for about a tenth more time. Before it, a
    # GMRES phase (30 Jacobian-vector products a step, about a quarter of a CG step's time) solves
    # about a third of the own images outright and takes most of the rest further; only the rows
    # it leaves unsolved go on to CG (bench/results/polish_plateau_onestep_gmres_cpu.md,
    # convergence_cpu_onestep_gmres.md: 90.6% converged and worst own 2.6e-7, against 84.4% and
    # 1.2e-6 for the CG polish alone on the same 32 + 32 images). The images still left
    # unconverged are unlucky in their starts, not unreachable (each converged from another
    # seed), so each image's two best Adam rows are polished and the lower result kept: 98.5%
    # against 96.0% of 200 own images converged, worst own 1.4e-7 against 2.5e-6, now below the
    # lowest real image (convergence_cpu_onestep_c2_n200.md), for 1.2x to 1.7x the time.
    # Attributing with a threshold (early stop), an image whose two polished starts end above it
    # but within 4x of it has two more polished: 100% of the 200 converged against 98.5%, own
    # images in 0.98x the authors' loop's time and 1.29x with real ones, against 1.46x
    # (convergence_cpu_onestep_esc2_n200.md, convergence_cpu_onestep_verdict_n200.md).
    "consistency": InversionSettings(
        steps=600, lr=0.1, restarts=8, schedule="cosine", min_lr_frac=0.01, halving_every=100,
        halving_keep=0.5, min_rows=2, patience=300, rel_tol=1e-3, polish_steps=80, polish_method="cg",
        polish_cg_iters=100, polish_patience=10, polish_min_drop=0.2, polish_gmres_iters=30,
        polish_candidates=2, polish_escalate=2,
    ),
}
#: the GAN family default until 24 starts replaced it: 8 starts halved every 100 steps, no escalation
PRESETS["gan-8-starts"] = FAMILY_DEFAULTS["gan"].replace(restarts=8, halving_every=100, polish_escalate=0)
PRESETS["stagewise"] = FAMILY_DEFAULTS["consistency"].replace(
    steps=1, restarts=2, halving_every=0, patience=0, polish_patience=0, stagewise=True)
_FALLBACK_DEFAULT = InversionSettings(
    steps=1500, lr=0.1, restarts=8, schedule="cosine", min_lr_frac=0.01, halving_every=150,
    halving_keep=0.5, min_rows=2, patience=300, rel_tol=1e-3,
)


def resolve_settings(
    generator: GeneratorAdapter | None, settings: InversionSettings | str | None = None, **overrides
) -> InversionSettings:
    """The settings an inversion will use: a preset name, an object, or the family default, plus overrides."""
    if settings is None or settings == "default":
        family = getattr(generator, "family", "gan")
        base = FAMILY_DEFAULTS.get(family, _FALLBACK_DEFAULT)
    elif isinstance(settings, str):
        if settings not in PRESETS:
            raise ValueError(f"settings must be one of {sorted(PRESETS) + ['default']} or InversionSettings, got {settings!r}")
        base = PRESETS[settings]
    elif isinstance(settings, InversionSettings):
        base = settings
    else:
        raise TypeError(f"settings must be a preset name or InversionSettings, got {type(settings).__name__}")
    overrides = {k: v for k, v in overrides.items() if v is not None}
    return base.replace(**overrides) if overrides else base


@dataclass
class InversionResult:
    """Per image: the reconstruction loss (lowest over steps and restarts), the best input, its image."""

    loss: Tensor  # [B] float32, in [0, 1] image space
    inputs: Tensor  # [B, D] float32
    reconstruction: Tensor  # [B, C, H, W] in [0, 1]
    conditions: Tensor | None  # [B] (the winning class) or [B, E], or None
    row_steps: Tensor  # [B] int64: generator row-steps spent on each image (cost)
    settings: InversionSettings
    metric: str
    extra: dict = field(default_factory=dict)


# --------------------------------------------------------------------------- helpers


@contextlib.contextmanager
def _flush_denormals():
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


def _lr_factor(s: InversionSettings, t: int) -> float:
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


def _row_latents(
    generator: GeneratorAdapter, image_ids: Tensor, rows_per_image: int, seed: int, images: Tensor | None = None
) -> Tensor:
    """Starting latents, drawn per image from its own seeded stream so chunking never changes them.

    An adapter with an ``initial_latents(images, rows_per_image, generator)`` hook (for example a
    latent-diffusion decoder starting from its encoder's latent) chooses its own starts.
    """
    init = getattr(generator, "initial_latents", None)
    out = []
    for k, b in enumerate(image_ids.tolist()):
        g = torch.Generator(device="cpu").manual_seed((seed * 1_000_003 + b) % (2**63 - 1))
        if init is not None and images is not None:
            out.append(init(images[k : k + 1], rows_per_image, g))
        else:
            out.append(generator.sample_latents(rows_per_image, g))
    return torch.cat(out)


def _check_images(generator: GeneratorAdapter, images: Tensor) -> Tensor:
    if not isinstance(images, Tensor):
        raise TypeError(f"images must be a float tensor [B, C, H, W], got {type(images).__name__}")
    if images.dim() == 3:
        images = images.unsqueeze(0)
    if images.dim() != 4:
        raise ValueError(f"images must be [B, C, H, W], got shape {tuple(images.shape)}")
    if not images.is_floating_point():
        raise ValueError(f"images must be a float tensor in [0, 1], got {images.dtype}")
    if tuple(images.shape[1:]) != tuple(generator.image_shape):
        raise ValueError(
            f"images have shape {tuple(images.shape[1:])} but {generator.name} makes {tuple(generator.image_shape)}; "
            "resize/convert them first (ronan_fast.imageio.to_model_shape)"
        )
    if images.shape[0] == 0:
        raise ValueError("images is empty")
    bad = ~torch.isfinite(images).flatten(1).all(1)
    if bool(bad.any()):
        raise ValueError(f"images contain NaN or Inf (images {bad.nonzero().flatten().tolist()[:10]})")
    lo, hi = float(images.min()), float(images.max())
    if lo < -1e-3 or hi > 1 + 1e-3:
        raise ValueError(f"images must lie in [0, 1], got values in [{lo:.4g}, {hi:.4g}]")
    return images.float()


def _halvings_due(done: Tensor, s: InversionSettings) -> Tensor:
    """How many successive-halving points (multiples of ``halving_every``) fall in the steps since
    each row's previous stopping check, ``done`` its steps done.
    Halving acts at the checks (every ``check_every`` steps), so one that falls between two
    checks acts at the next one; when several fall there (``halving_every < check_every``) the
    next check keeps ``halving_keep`` to their number."""
    if not s.halving_every:
        return torch.zeros_like(done)
    return done // s.halving_every - (done - s.check_every).clamp_min(0) // s.halving_every


def _halve(best_loss: Tensor, index: Tensor, keep: float | Tensor, min_rows: int) -> Tensor:
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


# --------------------------------------------------------------------------- the loop


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
    first_id: int = 0,
    compile_generator: bool = False,
) -> InversionResult:
    """Reverse-engineer each image's input: all images times restarts as one batch (in chunks).

    Args:
        generator: the model, wrapped in a :class:`~ronan_fast.adapters.GeneratorAdapter`.
        images: ``[B, C, H, W]`` float in [0, 1] at the generator's native shape.
        settings: a preset name ("authors", "default") or :class:`InversionSettings`; the
            keyword arguments ``steps``, ``lr``, ``restarts``, ``precision`` and a metric name override it.
        metric: "mse" (default), "mae", "ssim", "mse-tone" (:class:`~ronan_fast.metrics.ToneMSE`), or a
            metric object (e.g. ``metrics.LPIPS(backbone)``).
        seed: starting latents are drawn per image from ``seed``; same seed, same device, same result.
        first_id: the number of the first image in the seed streams (images are numbered from
            it): inverting ``images[a:b]`` with ``first_id=a`` draws the same starts as inverting
            all of ``images`` would for them (a job split into parts, e.g. to save each part).
        conditions: per-image known conditions for a conditional generator (class unknown if omitted).
        stop_below: per-image loss (``[B]`` or a scalar) under which an image's rows stop: its
            verdict can no longer change. The reported loss is then the loss at stopping.
        max_rows: rows in the batch at once (memory budget); by default on CPU as many as keep the
            generator's saved activations under 96 MiB (64 to 4096 rows: faster per row than larger
            batches), on CUDA sized to free memory. Images are taken in chunks of
            :data:`ADMITTED_BATCHES` times as many as fit at once; within a chunk, an image enters the
            batch as soon as rows stopping (halving, early stop) leave room for all of its rows, so
            the batch stays full. Each image's result does not depend on what runs beside it.
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
    """
    metric_obj = None
    if metric is not None and not isinstance(metric, str):
        metric_obj = metric
        metric_name = getattr(metric, "name", type(metric).__name__)
        s = resolve_settings(generator, settings, steps=steps, lr=lr, restarts=restarts, precision=precision,
                             metric=metric_name)
    else:
        s = resolve_settings(generator, settings, steps=steps, lr=lr, restarts=restarts, precision=precision,
                             metric=metric)
        metric_name = s.metric
        if metric_name not in ops.METRICS:
            from ronan_fast.metrics import get_metric

            metric_obj = get_metric(metric_name)
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ValueError(f"seed must be an integer, got {seed!r}")
    if not isinstance(first_id, int) or isinstance(first_id, bool) or first_id < 0:
        raise ValueError(f"first_id must be an integer >= 0, got {first_id!r}")
    device = generator.device
    if not isinstance(cuda_graph, bool):
        raise ValueError(f"cuda_graph must be True or False, got {cuda_graph!r}")
    if not isinstance(compile_generator, bool):
        raise ValueError(f"compile_generator must be True or False, got {compile_generator!r}")
    if compile_generator and cuda_graph:
        raise ValueError("compile_generator=True and cuda_graph=True: choose one (a compiled generator brings its own "
                         "kernels; torch.compile(mode='reduce-overhead') captures CUDA graphs itself)")
    if cuda_graph and device.type != "cuda":
        raise ValueError(f"cuda_graph=True needs a generator on a CUDA device, got {generator.name} on {device}")
    images = _check_images(generator, images).to(device)
    b_total = images.shape[0]
    chain = generator.stage_chain() if s.stagewise else None
    if chain is not None:
        from ronan_fast.stagewise import invert_stagewise

        return invert_stagewise(generator, chain, images, s, metric_name, metric_obj, seed=seed, conditions=conditions, stop_below=stop_below, max_rows=max_rows,
                                impl=impl, cuda_graph=cuda_graph, progress=progress, first_id=first_id,
                                compile_generator=compile_generator)

    if conditions is not None:
        conditions = torch.as_tensor(conditions)
        if conditions.shape[0] != b_total:
            raise ValueError(f"conditions must have one entry per image ({b_total}), got {conditions.shape[0]}")
    _, rows_per_image = generator.row_conditions(None if conditions is None else conditions[:1], 1, s.restarts)
    if max_rows is None:
        max_rows = _default_max_rows(generator, rows_per_image, s, b_total * rows_per_image)
    if max_rows < rows_per_image:
        raise ValueError(f"max_rows={max_rows} is below one image's rows ({rows_per_image})")
    if stop_below is not None:
        stop_below = torch.as_tensor(stop_below, dtype=torch.float32, device=device).expand(b_total).contiguous()

    out_loss = torch.empty(b_total, dtype=torch.float32, device=device)
    out_inputs = torch.empty(b_total, generator.latent_dim, dtype=torch.float32, device=device)
    out_recon = torch.empty_like(images)
    out_cond: list[Tensor] = []
    out_steps = torch.zeros(b_total, dtype=torch.int64, device=device)
    # each chunk holds ADMITTED_BATCHES batches' worth of images; they enter its batch of at
    # most max_rows rows as rows stop (see _invert_chunk)
    per_chunk = max(1, max_rows // rows_per_image) * ADMITTED_BATCHES
    heap = _heap.keep_freed_memory() if device.type == "cpu" else contextlib.nullcontext()
    with _flush_denormals(), heap:
        for start in range(0, b_total, per_chunk):
            _run_chunk(generator, images, conditions, stop_below, start, min(b_total, start + per_chunk), s,
                       metric_name, metric_obj, seed, impl, (out_loss, out_inputs, out_recon, out_cond, out_steps),
                       cuda_graph, first_id, compile_generator, max_rows)
            if progress is not None:
                progress(min(b_total, start + per_chunk))
    return InversionResult(
        loss=out_loss,
        inputs=out_inputs,
        reconstruction=out_recon,
        conditions=torch.cat(out_cond) if out_cond else None,
        row_steps=out_steps,
        settings=s,
        metric=metric_name,
    )


def _run_chunk(generator, images, conditions, stop_below, start, stop, s, metric_name, metric_obj, seed, impl, outs,
               cuda_graph=False, first_id=0, compile_generator=False, live_rows=None):
    """Invert images ``start:stop`` (numbered from ``first_id``) and write their results into
    ``outs``, with at most ``live_rows`` rows in the batch at once."""
    out_loss, out_inputs, out_recon, out_cond, out_steps = outs
    res = _invert_chunk(
        generator, images[start:stop], torch.arange(start, stop) + first_id,
        None if conditions is None else conditions[start:stop], s, metric_name, metric_obj, seed,
        None if stop_below is None else stop_below[start:stop], impl, cuda_graph, compile_generator, live_rows,
    )
    out_loss[start:stop], out_inputs[start:stop], out_recon[start:stop] = res[0], res[1], res[2]
    if res[3] is not None:
        out_cond.append(res[3])
    out_steps[start:stop] = res[4]


#: images per chunk, in batches: a chunk holds this many times as many images as its batch of
#: ``max_rows`` rows takes at once, and the rest enter the batch as rows stop (successive
#: halving, early stopping) instead of the batch shrinking towards a few rows per image. On
#: CPU a step costs more per row in small batches (the zoo's 64x64 DCGAN, two threads: 1.8 ms
#: per row at 10 rows, 1.3 ms at 120), and the GAN default ends with 2 rows of its 24 per image
ADMITTED_BATCHES = 8

#: on CPU, a chunk's rows are chosen so that the activations the generator saves for its
#: backward pass stay under this many bytes: past it, steps cost more per row (bench/results/cpu_heap.md)
CPU_CHUNK_SAVED_BYTES = 96 << 20
#: rows per chunk on CPU: at least (or one image's rows), at most
CPU_CHUNK_ROWS = (64, 4096)


def _default_max_rows(generator: GeneratorAdapter, rows_per_image: int, s: InversionSettings,
                      rows_needed: int) -> int:
    if generator.device.type != "cuda":
        smallest = max(rows_per_image, CPU_CHUNK_ROWS[0])
        if rows_needed <= smallest:  # one chunk whatever the probe says: no need to probe
            return smallest
        return max(rows_per_image, _cpu_chunk_rows(generator, s))
    free, _ = torch.cuda.mem_get_info(generator.device)
    # Measure one row's activation memory with a small forward/backward, then fill half of what is free.
    probe = 8
    torch.cuda.reset_peak_memory_stats(generator.device)
    before = torch.cuda.memory_allocated(generator.device)
    z = generator.sample_latents(probe).requires_grad_(True)
    with _autocast(generator.device, s.precision):
        out = generator.decode_raw(z, generator.sample_conditions(probe))
    out.float().sum().backward()
    per_row = max(1, (torch.cuda.max_memory_allocated(generator.device) - before) // probe)
    del z, out
    return max(rows_per_image, int(0.5 * free // (per_row * 2)))


def _cpu_chunk_rows(generator: GeneratorAdapter, s: InversionSettings) -> int:
    """Rows per chunk on CPU: as many as keep the activations saved for the backward pass under
    :data:`CPU_CHUNK_SAVED_BYTES`, within :data:`CPU_CHUNK_ROWS`.

    Larger batches amortise nothing more on CPU once the activations outgrow the caches: on the
    zoo's 64x64 DCGAN a step costs 1.5x more per row at 512 rows than at 64 to 192, on its
    one-step generator 1.3x more at 1024 rows than at 128 to 256. Measured per row as the
    difference between two forward passes of 8 and 16 rows (parameters saved once per pass
    cancel out).
    """
    rng = torch.Generator().manual_seed(0)  # the caller's random stream stays untouched

    def saved(n: int) -> int:
        total = 0

        def pack(t: Tensor) -> Tensor:
            nonlocal total
            total += t.numel() * t.element_size()
            return t

        z = generator.sample_latents(n, rng).requires_grad_(True)
        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            with _autocast(generator.device, s.precision):
                generator.decode_raw(z, generator.sample_conditions(n, rng))
        return total

    per_row = max(1, (saved(16) - saved(8)) // 8)
    lo, hi = CPU_CHUNK_ROWS
    return int(min(hi, max(lo, CPU_CHUNK_SAVED_BYTES // per_row)))


def _autocast(device: torch.device, precision: str):
    dtype = PRECISIONS[precision]
    if dtype is None:
        return torch.autocast(device.type, enabled=False)
    # no cast cache: each step runs one forward, and a CUDA graph capture cannot use one
    return torch.autocast(device.type, dtype=dtype, cache_enabled=False)


def _invert_chunk(generator, images, image_ids, conditions, s, metric_name, metric_obj, seed, stop_below, impl,
                  cuda_graph=False, compile_generator=False, live_rows=None):
    device = images.device
    decode = _compiled_decode(generator) if compile_generator else generator.decode_raw
    b = images.shape[0]
    row_cond, rpi = generator.row_conditions(conditions, b, s.restarts)
    m = b * rpi
    index = torch.arange(b, device=device).repeat_interleave(rpi)
    z = _row_latents(generator, image_ids, rpi, seed, images).to(device)
    radius = generator.prior_radius
    if s.typical_set == "project" and radius is not None:
        z = z * (radius / z.norm(dim=1, keepdim=True).clamp_min(1e-12))
    fused = metric_obj is None
    lo, hi = generator.output_range
    scale = 1.0 / (hi - lo) ** 2 if metric_name in ("mse", "mse-tone") else 1.0 / (hi - lo)
    tone = metric_obj if isinstance(metric_obj, ToneMSE) else None
    polishable = fused or tone is not None  # the polish solves least squares: MSE, plain or tone-fitted
    target = generator.from_unit(images) if fused else images

    # Row state, live rows only (compacted as rows stop, extended as images are admitted);
    # `rows` maps live rows back to their original row. With ``live_rows``, images enter the
    # batch as room frees up (rows stopping, halving) instead of all at once, so the batch stays
    # near the size that is cheapest per row while each image runs its own schedule: every row
    # counts its own steps (`row_t`), and the stopping rules act on a row at its own checks.
    z_start = z
    cap = m if live_rows is None else max(rpi, live_rows)
    admitted = 0  # images admitted so far (in order)
    rows = torch.empty(0, dtype=torch.int64, device=device)
    z = z_start[:0].clone()
    exp_avg = torch.zeros_like(z)
    exp_avg_sq = torch.zeros_like(z)
    step = torch.zeros(0, dtype=torch.int64, device=device)
    row_t = torch.zeros(0, dtype=torch.int64, device=device)
    best_loss = torch.full((0,), float("inf"), dtype=torch.float32, device=device)
    best_latent = z.clone()
    weight = torch.ones(0, dtype=torch.float32, device=device)
    # Finished rows' results, by original row.
    final_loss = torch.full((m,), float("inf"), dtype=torch.float32, device=device)
    final_latent = z_start.clone()
    row_steps = torch.zeros(b, dtype=torch.int64, device=device)
    last_best = best_loss.clone()
    stale = torch.zeros(0, dtype=torch.int64, device=device)
    checked_output = False
    mixed = PRECISIONS[s.precision] is not None  # the Adam phase's losses are not the float32 score
    # each live row's threshold on its Adam-phase loss: stop_below, lowered for a row whose loss
    # under autocast read under it while its float32 score did not (see the stopping rules)
    row_stop = None if stop_below is None else stop_below[:0].clone()
    lr_table = torch.tensor([s.lr * _lr_factor(s, t) for t in range(s.steps)], dtype=torch.float32, device=device)

    def admit() -> bool:
        """Bring the next images' rows into the batch while there is room (at least one image
        when the batch is empty); returns whether any were admitted."""
        nonlocal admitted, rows, z, exp_avg, exp_avg_sq, step, row_t, best_loss, best_latent, weight
        nonlocal last_best, stale, row_stop
        room = (cap - rows.shape[0]) // rpi
        n_new = min(b - admitted, room if rows.numel() else max(1, room))
        if n_new <= 0:
            return False
        new = torch.arange(admitted * rpi, (admitted + n_new) * rpi, device=device)
        admitted += n_new
        k = new.shape[0]
        z_new = z_start[new]
        rows = torch.cat([rows, new])
        z = torch.cat([z, z_new])
        exp_avg = torch.cat([exp_avg, torch.zeros_like(z_new)])
        exp_avg_sq = torch.cat([exp_avg_sq, torch.zeros_like(z_new)])
        step = torch.cat([step, step.new_zeros(k)])
        row_t = torch.cat([row_t, row_t.new_zeros(k)])
        best_loss = torch.cat([best_loss, best_loss.new_full((k,), float("inf"))])
        best_latent = torch.cat([best_latent, z_new])
        weight = torch.cat([weight, weight.new_ones(k)])
        last_best = torch.cat([last_best, last_best.new_full((k,), float("inf"))])
        stale = torch.cat([stale, stale.new_zeros(k)])
        if row_stop is not None:
            row_stop = torch.cat([row_stop, stop_below[index[new]]])
        return True

    admit()
    live_index = index[rows]
    live_cond = None if row_cond is None else row_cond[rows]
    lr_t = torch.empty(rows.shape[0], dtype=torch.float32, device=device)

    def score(inputs: Tensor, cond: Tensor | None, img: Tensor) -> tuple[Tensor, Tensor]:
        """Float32 reconstructions of ``inputs`` and their losses against images ``img``: the final score."""
        with torch.no_grad():
            recon = generator.to_unit(generator.decode_raw(inputs, cond).float())
            return recon, _final_loss(recon, images[img], metric_name, metric_obj)

    def adam_step() -> None:
        """One Adam step of every live row: reads and writes the row state in place."""
        nonlocal checked_output
        active = torch.ones_like(step, dtype=torch.bool)
        if row_stop is not None:
            active = best_loss >= row_stop
        zl = z.detach().requires_grad_(True)
        with torch.enable_grad():
            with _autocast(device, s.precision):
                raw = decode(zl, live_cond)
            if not checked_output:
                generator.check_output(raw, zl.shape[0], check_finite=False)
                if not raw.requires_grad:
                    raise GeneratorOutputError(
                        f"{generator.name}'s output does not depend on its input (no gradient): nothing to invert")
            if fused:
                with torch.no_grad():
                    loss_raw, gpred = ops.recon_loss_grad(raw, target, live_index, weight, metric_name, impl=impl)
                loss, objective = loss_raw * scale, (raw, gpred)
            else:
                per_row = metric_obj(generator.to_unit(raw.float()), images[live_index])
                loss, objective = per_row.detach().float(), (per_row.sum(), None)
            if not checked_output:
                if not bool(torch.isfinite(loss).all()):
                    raise GeneratorOutputError(f"{generator.name} gave a NaN/Inf reconstruction loss at the first step")
                checked_output = True
            (gz,) = torch.autograd.grad(objective[0], zl, objective[1], allow_unused=True)
        if gz is None:
            raise GeneratorOutputError(f"{generator.name}'s output does not depend on its input: nothing to invert")
        if s.typical_set == "penalty" and radius is not None and s.penalty > 0:
            norm = z.norm(dim=1, keepdim=True).clamp_min(1e-12)
            gz = gz + s.penalty * 2 * (norm - radius) * z / norm / z.shape[1]
        ops.latent_adam_step_(
            z, gz.float().contiguous(), exp_avg, exp_avg_sq, step, lr_t, active, loss, best_loss, best_latent,
            s.beta1, s.beta2, s.eps, impl=impl,
        )
        if s.typical_set == "project" and radius is not None:
            z.mul_(radius / z.norm(dim=1, keepdim=True).clamp_min(1e-12))
        row_steps.index_add_(0, live_index, active.long())

    # CUDA graph: the step at the current batch shape, captured after one eager step at that
    # shape (on a side stream, as capture requires) and dropped when the batch changes.
    graph: torch.cuda.CUDAGraph | None = None
    warmed = False
    cohorts = [0]  # the step count of each group of images admitted together
    while True:
        torch.index_select(lr_table, 0, row_t, out=lr_t)  # outside the graph: the values change every step
        if not cuda_graph or not checked_output:
            adam_step()
        elif not warmed:
            side = torch.cuda.Stream(device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):
                adam_step()
            torch.cuda.current_stream(device).wait_stream(side)
            warmed = True
        else:
            if graph is None:
                graph = _capture(adam_step, generator)
            graph.replay()
        row_t += 1
        # a row's checks come every check_every of its steps and at its last step. The rows
        # admitted together share their step count, kept here on the host too, so that steps
        # between checks need no host sync
        cohorts = [t + 1 for t in cohorts if t + 1 <= s.steps]
        if not any(t % s.check_every == 0 or t == s.steps for t in cohorts):
            continue
        due_check = (row_t % s.check_every == 0) | (row_t == s.steps)
        # ---- stopping rules (one host sync per check), for the rows at a check
        keep = torch.isfinite(z).all(1)  # a row that diverged to NaN/Inf can only waste steps
        if row_stop is not None:
            under = (best_loss < row_stop) & due_check
            if mixed:
                # a loss measured under autocast settles nothing by itself: each row it puts under
                # its threshold is measured again in float32 (the final score's precision) and
                # stops only if under stop_below there too; otherwise it goes on, its threshold
                # lowered by the gap seen between the two precisions and by a tenth more at each
                # miss, so that it is not measured again at every check
                claim = under.nonzero().squeeze(1)
                if claim.numel():
                    _, f32 = score(best_latent[claim], None if live_cond is None else live_cond[claim],
                                   live_index[claim])
                    goal = stop_below[live_index[claim]]
                    ok = f32 < goal
                    under[claim] = ok
                    ratio = (best_loss[claim] / f32).nan_to_num(0.0).clamp(0.0, 1.0)
                    lower = torch.minimum(row_stop[claim], goal * ratio) * 0.9
                    row_stop[claim] = torch.where(ok, row_stop[claim], lower)
            settled_img = torch.zeros(b, dtype=torch.bool, device=device).scatter_reduce(
                0, live_index, under, "amax", include_self=True)
            keep &= ~settled_img[live_index]
        if s.patience:
            improved = best_loss < last_best * (1 - s.rel_tol)
            stale = torch.where(due_check, torch.where(improved, torch.zeros_like(stale), stale + s.check_every), stale)
            last_best = torch.where(due_check & improved, best_loss, last_best)
            keep &= stale < s.patience
        if s.halving_every:
            due = torch.where(due_check & (row_t < s.steps), _halvings_due(row_t, s), 0)
            if bool(due.any()):
                frac = torch.full(due.shape, s.halving_keep, dtype=torch.float32, device=device).pow(due)
                keep &= _halve(best_loss, live_index, frac, s.min_rows)
        keep &= row_t < s.steps  # out of steps
        keep |= ~due_check  # rows between their checks go on whatever the rules say
        changed = not bool(keep.all())
        if changed:
            gone = ~keep
            final_loss[rows[gone]] = best_loss[gone]
            final_latent[rows[gone]] = best_latent[gone]
            rows, z = rows[keep], z[keep].contiguous()
            exp_avg, exp_avg_sq = exp_avg[keep].contiguous(), exp_avg_sq[keep].contiguous()
            step, row_t = step[keep].contiguous(), row_t[keep].contiguous()
            best_loss, best_latent = best_loss[keep].contiguous(), best_latent[keep].contiguous()
            last_best, stale, weight = last_best[keep], stale[keep], weight[keep].contiguous()
            row_stop = None if row_stop is None else row_stop[keep].contiguous()
            graph, warmed = None, False
        if admitted < b and admit():
            cohorts.append(0)
            graph, warmed, changed = None, False, True
        if not rows.numel():
            break
        if changed:  # the batch is another: so are the step's index, conditions and rates
            live_index = index[rows]
            live_cond = None if row_cond is None else row_cond[rows]
            lr_t = torch.empty(rows.shape[0], dtype=torch.float32, device=device)

    graph = None  # its memory pool is not needed by the polish
    loss_b, row_b = ops.best_over_restarts(final_loss, index, b, impl=impl)
    row_b = torch.where(row_b < 0, torch.arange(b, device=device) * rpi, row_b)  # all-NaN image: keep its first row
    k = min(s.polish_candidates, rpi) if s.polish_steps and polishable else 1
    ranked = torch.where(torch.isfinite(final_loss), final_loss, torch.full_like(final_loss, float("inf"))).view(b, rpi)
    if k == 1:
        cand = row_b  # [b * k]: the rows whose inputs are polished and scored, image-major
    else:
        cand = (ranked.topk(k, dim=1, largest=False).indices
                + torch.arange(b, device=device).unsqueeze(1) * rpi).flatten()
    target_raw = (target if fused else generator.from_unit(images)) if s.polish_steps and polishable else None

    settled = loss_b  # each image's loss that decides whether its verdict is settled before the polish
    if target_raw is not None and stop_below is not None and mixed:
        # the Adam phase measured its losses under autocast: an image whose rows ended there (out
        # of steps, levelled off) with a loss under its threshold may lie just over it in float32,
        # the precision of its final score (an image stopped by its threshold was confirmed in
        # float32 already); measured again, such an image is polished, not left with a flipped verdict
        _, settled = score(final_latent[row_b], None if row_cond is None else row_cond[row_b],
                           torch.arange(b, device=device))
        settled = torch.where(torch.isfinite(settled), settled, loss_b)

    # with a threshold: rows levelled off far above it leave the polish (their verdict is settled)
    settle = (s.settle_patience, s.settle_min_drop, s.settle_above) if stop_below is not None else None

    def polish_piece(inputs: Tensor, cond_c: Tensor | None, img: Tensor, idx: Tensor, done_groups) -> None:
        """Polish rows ``idx`` of ``inputs`` (row ``j`` belongs to image ``img[j]``) in place."""
        stop_raw = None if stop_below is None else stop_below[img[idx]] / scale  # [0, 1] MSE -> raw MSE
        if s.polish_gmres_iters and inputs.shape[1] == target[0].numel() and metric_name == "mse":
            z, open_ = _polish_gmres(generator, inputs[idx], None if cond_c is None else cond_c[idx],
                                     target_raw[img[idx]], metric_name, s.polish_steps,
                                     krylov=s.polish_gmres_iters, patience=s.polish_patience,
                                     min_drop=s.polish_min_drop, stop_raw=stop_raw, group=img[idx],
                                     done_groups=done_groups)
            inputs[idx] = z
            idx = idx[open_]
            stop_raw = None if stop_raw is None else stop_raw[open_]
        if idx.numel():
            if s.polish_method == "cg":
                polish = functools.partial(_polish_cg, cg_iters=s.polish_cg_iters)
            else:
                polish = functools.partial(_polish, reverse=s.polish_method == "dense-rev", tone=tone)
            inputs[idx] = polish(generator, inputs[idx], None if cond_c is None else cond_c[idx],
                                 target_raw[img[idx]], metric_name, s.polish_steps, patience=s.polish_patience,
                                 min_drop=s.polish_min_drop, stop_raw=stop_raw, group=img[idx],
                                 done_groups=done_groups, settle=settle)

    def polish_rows(cand: Tensor, img: Tensor, per: int):
        """Polish the inputs of rows ``cand`` (row ``j`` belongs to image ``img[j]``, ``per`` rows
        per image); returns their inputs, conditions, reconstructions and losses."""
        inputs = final_latent[cand]
        cond_c = None if row_cond is None else row_cond[cand]
        if target_raw is not None:
            # images already under stop_below have a settled verdict: polishing them would only cost
            idx = (torch.arange(cand.numel(), device=device) if stop_below is None
                   else (settled[img] >= stop_below[img]).nonzero().squeeze(1))
            # with several rows per image, once one of an image's rows is under stop_below the others stop too
            done_groups = None if stop_below is None or per == 1 else torch.zeros(b, dtype=torch.bool, device=device)
            # in pieces of as many images as the batch holds at its start (an image's rows stay
            # together): the polish holds more per row than an Adam step
            piece = max(1, cap // rpi) * per
            for p0 in range(0, idx.numel(), piece):
                polish_piece(inputs, cond_c, img, idx[p0:p0 + piece], done_groups)
        recon, final = score(inputs, cond_c, img)
        return inputs, cond_c, recon, final

    def lowest(final: Tensor, per: int) -> Tensor:
        """Index of each group of ``per`` consecutive rows' lowest finite loss (the first on ties)."""
        pick = torch.where(torch.isfinite(final), final, torch.full_like(final, float("inf"))).view(-1, per).argmin(1)
        return torch.arange(pick.numel(), device=device) * per + pick

    img = torch.arange(b, device=device).repeat_interleave(k)  # each candidate's image
    inputs, cond_b, recon, final = polish_rows(cand, img, k)
    if k > 1:  # each image's best candidate after the polish
        pick = lowest(final, k)
        inputs, recon, final = inputs[pick], recon[pick], final[pick]
        cond_b = None if cond_b is None else cond_b[pick]
    # The score is the lowest loss seen; re-measuring in float32 at the winning input makes it
    # consistent with the reconstruction across precisions (identical in float32 up to rounding).
    final = torch.where(torch.isfinite(final), final, loss_b)
    extra = min(s.polish_escalate, rpi - k) if target_raw is not None and stop_below is not None else 0
    if extra > 0:
        # verdicts in doubt: above the threshold, but within escalate_within times it
        doubt = ((final >= stop_below) & (final < s.escalate_within * stop_below)).nonzero().squeeze(1)
        if doubt.numel():
            more = _next_ranked(ranked, cand, doubt, extra)
            in2, cond2, recon2, final2 = polish_rows(more, doubt.repeat_interleave(extra), extra)
            pick = lowest(final2, extra)
            better = final2[pick] < final[doubt]  # NaN compares False
            to, src = doubt[better], pick[better]
            inputs[to], recon[to], final[to] = in2[src], recon2[src], final2[src]
            if cond_b is not None:
                cond_b[to] = cond2[src]
    return final, inputs, recon.clamp(0, 1), cond_b, row_steps


def _next_ranked(ranked: Tensor, polished: Tensor, images: Tensor, extra: int) -> Tensor:
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


#: each adapter's torch.compile'd decode_raw, kept while the adapter lives
_COMPILED: "weakref.WeakKeyDictionary[GeneratorAdapter, Callable]" = weakref.WeakKeyDictionary()


def _compiled_decode(generator: GeneratorAdapter) -> Callable:
    """``generator.decode_raw`` through ``torch.compile`` (dynamic shapes), made once per adapter.

    What is kept is the compiled class function, called with the adapter: a compiled bound
    method would hold the adapter and keep its weak-keyed entry, and the adapter, alive."""
    fn = _COMPILED.get(generator)
    if fn is None:
        fn = _COMPILED[generator] = torch.compile(type(generator).decode_raw, dynamic=True)
    return functools.partial(fn, generator)


def _final_loss(recon: Tensor, images: Tensor, metric_name: str, metric_obj) -> Tensor:
    """Per-image loss of reconstructions in [0, 1], float32: ``metric_obj`` when given, else the
    fused metric ``metric_name`` ("mse" or "mae") written out."""
    if metric_obj is not None:
        return metric_obj(recon, images).float()
    diff = (recon - images).flatten(1)
    return diff.square().mean(1) if metric_name == "mse" else diff.abs().mean(1)


def _capture(step: Callable[[], None], generator: GeneratorAdapter) -> "torch.cuda.CUDAGraph":
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


def _polish(generator, inputs, cond, target_raw, metric_name, iters, patience=0, min_drop=0.3, stop_raw=None,
            group=None, done_groups=None, reverse=False, tone=None, report=None, settle=None):
    """Levenberg-Marquardt on each image's best input (Jacobian by forward-mode AD, or with
    ``reverse`` by reverse mode, one row at a time in chunks of 128 products), float32.

    With ``tone`` (a :class:`~ronan_fast.metrics.ToneMSE`, metric "mse-tone") the residual is the
    tone-fitted one, in raw units, and its Jacobian is the generator's mapped through each row's
    current colour map with the map held fixed (the usual Gauss-Newton treatment of such a fit).

    A row leaves the loop once it is solved (mean squared residual under 1e-14, float32's floor),
    stuck (damping at its cap), levelled off (``patience``, ``min_drop``) or under its
    ``stop_raw`` (raw-unit MSE, ``[n]``), or levelled off far above it (``settle``, see
    :class:`_Leaving`): the Jacobian, the costly part, is only built for live rows.
    ``report(k, mse)``, if given, is called after step ``k`` with every row's mean squared
    residual (rows that left keep their last value).
    """
    if metric_name != ("mse-tone" if tone is not None else "mse"):
        return inputs

    def one(zrow, crow):
        c = None if crow is None else crow.unsqueeze(0)
        return generator.decode_raw(zrow.unsqueeze(0), c).flatten().float()

    if tone is None:
        jac_map = None  # the residual is the generator's output minus the target: its Jacobian as is

        def residual(z, c, rows):
            return (generator.decode_raw(z, c).float() - target_raw[rows]).flatten(1)
    else:
        lo, hi = generator.output_range
        target_unit = generator.to_unit(target_raw)

        def tone_state(z, c, rows):
            return tone.residual(generator.to_unit(generator.decode_raw(z, c).float()), target_unit[rows])

        def residual(z, c, rows):
            return (tone_state(z, c, rows)[0] * (hi - lo)).flatten(1).float()

        def jac_map(jac, z, c, rows):
            _, beta, active = tone_state(z, c, rows)
            return _tone_jacobian(jac, beta, active)

    leaving = _Leaving(inputs.shape[0], patience, min_drop, stop_raw, group, done_groups, settle)
    if reverse:
        return _polish_dense(inputs, cond, one, residual, iters, leaving, reverse=True, jac_map=jac_map, report=report)
    with _forward_ad_attention():
        return _polish_dense(inputs, cond, one, residual, iters, leaving, jac_map=jac_map, report=report)


class _Leaving:
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

    def __init__(self, n, patience, min_drop, stop_raw, group=None, done_groups=None, settle=None):
        self.patience, self.keep_frac, self.stop_raw = patience, 1.0 - min_drop, stop_raw
        self.settle = settle if settle is not None and settle[0] and stop_raw is not None else None
        # every row's cost at the last `span` steps (a ring: step k at k % span)
        span = 1 + max(patience, self.settle[0] if self.settle else 0)
        self.hist = None if span == 1 else [None] * span
        self.n = n
        self.group = group if stop_raw is not None and done_groups is not None else None
        self.done_groups = done_groups

    def settled(self, mse, live):
        """Rows ``live`` whose mean squared residual ``mse`` is solved (under 1e-14) or under
        ``stop_raw``, or (grouped) whose image has such a row."""
        done = mse < 1e-14
        if self.stop_raw is not None:
            done |= mse < self.stop_raw[live]
            if self.group is not None:
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


def _tone_jacobian(jac: Tensor, beta: Tensor, active: Tensor) -> Tensor:
    """The Jacobian of the tone-fitted residual with each row's colour map held fixed.

    ``jac`` ``[n, C * P, d]``: the generator's raw output by the input; ``beta`` ``[n, C, C + 1]``
    and ``active`` ``[n, C, P]`` as :meth:`~ronan_fast.metrics.ToneMSE.residual` gives them.
    Row n, channel c, pixel p: ``active * sum_k beta[c, k] * jac[k, p]`` (a clipped pixel the fit
    lands on the right side of does not move the loss).
    """
    n, ch, p = active.shape
    jk = jac.view(n, ch, p, -1)
    mapped = torch.einsum("nck,nkpd->ncpd", beta[:, :, :ch].to(jk.dtype), jk)
    return (mapped * active.unsqueeze(-1).to(jk.dtype)).reshape(n, ch * p, -1)


#: the dense polish builds its Jacobians in chunks of at most this many elements (rows x latent
#: width x image size; 128 MiB in float32): on the 64x64 DCGAN (12,288 outputs, 100 inputs) 27
#: rows, about 1.2 GB with the passes that build them (one thread, measured at 44 MB per row)
_DENSE_CHUNK_ELEMENTS = 1 << 25
#: on CPU, also at most this many forward-mode passes (rows x latent width) at once: a chunk
#: runs the generator on rows x width tangents together, and past about a hundred rows a CPU
#: step costs more per row (bench/results/cpu_heap.md). On the 64x64 DCGAN (width 100) one row
#: per chunk took 75 ms per row and step against 166 ms for 27 rows (cpu_heap_dense_polish.md).
_DENSE_CPU_PASSES = 128


def _dense_rows(latent_dim: int, out_numel: int, cpu: bool = False) -> int:
    """Rows per chunk of the dense polish's Jacobians (:data:`_DENSE_CHUNK_ELEMENTS`, and on CPU
    :data:`_DENSE_CPU_PASSES`)."""
    rows = _DENSE_CHUNK_ELEMENTS // (latent_dim * out_numel)
    if cpu:
        rows = min(rows, _DENSE_CPU_PASSES // latent_dim)
    return max(1, rows)


def _polish_dense(inputs, cond, one, residual, iters, leaving, reverse=False, jac_map=None, report=None):
    from torch.func import jacfwd, jacrev, vmap

    z = inputs.clone()
    n = z.shape[0]
    lam = torch.full((n, 1, 1), 1e-3, device=z.device)
    live = torch.arange(n, device=z.device)
    with torch.no_grad():
        r = residual(z, cond, live)
        cost = r.square().sum(1)
    eye = torch.eye(z.shape[1], device=z.device)
    per_elem = r.shape[1]
    cost_all = cost.clone()
    d = z.shape[1]
    # each row's J^T J and J^T r at its current input, by original row: a row whose step was
    # refused has not moved, so they are reused instead of building its Jacobian again
    jtj_all = z.new_empty(n, d, d)
    jtr_all = z.new_empty(n, d)
    known = torch.zeros(n, dtype=torch.bool, device=z.device)
    for k in range(iters):
        kept = leaving.keep(k, cost, per_elem, lam[:, 0, 0] >= 1e9, live, r, lam)
        if kept is None:
            break
        live, cost, r, lam = kept
        zl = z[live]
        cl = None if cond is None else cond[live]
        with torch.no_grad():
            # J^T J and J^T r, the Jacobians built a few rows at a time: a row's Jacobian and the
            # passes that build it take about as much memory as a forward pass of as many rows as
            # the latent is wide, so a chunk of 512 images would not fit in memory at once
            fresh = (~known[live]).nonzero().squeeze(1)  # live rows (by position) whose Jacobian is built
            zf, cf = zl[fresh], None if cl is None else cl[fresh]
            m = fresh.numel()
            rows = _dense_rows(d, per_elem, cpu=zl.device.type == "cpu")
            for lo in range(0, m, rows):
                sl = slice(lo, lo + rows)
                at = live[fresh[sl]]  # their original rows
                zc, cc = zf[sl], None if cf is None else cf[sl]
                if reverse:  # row by row: memory for one row's forward and 128 of its backward passes
                    jac = torch.stack([jacrev(lambda q, cr=(None if cc is None else cc[i]): one(q, cr),
                                              chunk_size=128)(zc[i]) for i in range(zc.shape[0])])
                elif cc is None:
                    jac = vmap(lambda zr: jacfwd(lambda q: one(q, None))(zr))(zc)
                else:
                    jac = vmap(lambda zr, cr: jacfwd(lambda q: one(q, cr))(zr))(zc, cc)
                if jac_map is not None:  # the residual's Jacobian from the generator's
                    jac = jac_map(jac, zc, cc, at)
                jtj_all[at] = jac.transpose(1, 2) @ jac
                jtr_all[at] = (jac.transpose(1, 2) @ r[fresh[sl]].unsqueeze(2)).squeeze(2)
                del jac
            jtj, jtr = jtj_all[live], jtr_all[live]
            diag = torch.diagonal(jtj, dim1=1, dim2=2).unsqueeze(2)
            a = jtj + lam * (diag * eye + 1e-6 * eye)
            delta = torch.linalg.solve(a, -jtr)
            z_new = zl + delta
            r_new = residual(z_new, cl, live)
            cost_new = r_new.square().sum(1)
            better = cost_new < cost
            z[live] = torch.where(better[:, None], z_new, zl)
            r = torch.where(better[:, None], r_new, r)
            cost = torch.where(better, cost_new, cost)
            lam = torch.where(better[:, None, None], lam * 0.3, lam * 10).clamp(1e-9, 1e9)
            known[live] = ~better
            if report is not None:
                cost_all[live] = cost
                report(k + 1, cost_all / per_elem)
    return z


class _JacobianProducts:
    """Products with the Jacobian ``J`` of ``f`` (rows independent) at one point, for many vectors.

    ``jv(v) = J v`` and ``jtw(w) = J^T w``. By default both come from reverse mode: one forward
    pass, then one backward pass with ``create_graph`` that records ``g(u) = J^T u`` for a dummy
    ``u``; ``J v`` is then ``d(v . g(u))/du``, one backward pass through that recorded graph, and
    ``J^T w`` one backward pass through the forward's. On the one-step zoo model (CPU, 16 rows,
    one thread) that took 32 ms per ``J v`` against 97 ms for forward-mode ``torch.func.jvp``
    (one forward pass: 15-19 ms), so the Krylov polishes, which are all such products, run two
    to three times faster.

    ``mode`` is ``"reverse"``, ``"forward"`` (``torch.func.jvp`` / ``vjp``) or None: decide here,
    once per polish. A generator whose backward is not itself differentiable (a custom autograd
    Function marked once-differentiable, or one whose backward detaches) cannot give ``J v``
    this way; so on first use one random direction is computed both ways and reverse mode is
    kept only when it raises nothing and agrees with forward mode to 1e-3 (float32 rounding is
    about 1e-6). A generator without forward-mode AD (an old-style custom Function with no
    ``jvp`` rule) gets reverse mode checked against a central difference instead (to 1e-2); one
    that fails that too, or has neither rule, is refused with a ValueError that says so.
    """

    def __init__(self, f, z: Tensor, mode: str | None = None):
        self.f, self.z = f, z
        self._drop_recording()
        self._vjp = None  # forward mode's J^T w, made on first use
        self.mode = self._choose() if mode is None else mode
        if self.mode == "reverse" and self._g is None:
            self._record()
        self.jv = self._rev_jv if self.mode == "reverse" else self._fwd_jv

    def _drop_recording(self) -> None:
        """Forget reverse mode's recording (and the graphs it holds)."""
        self._zz = self._out = self._u = self._g = None

    def _record(self) -> None:
        """Record ``g = J^T u`` (reverse mode): ``_zz`` the point, ``_out`` the output, ``_u`` the dummy."""
        zz = self.z.detach().requires_grad_(True)
        with torch.enable_grad():
            out = self.f(zz)
            u = torch.zeros_like(out, requires_grad=True)
            (g,) = torch.autograd.grad(out, zz, u, create_graph=True)
        self._zz, self._out, self._u, self._g = zz, out, u, g

    def _fwd_jv(self, v: Tensor) -> Tensor:
        from torch.func import jvp

        return jvp(self.f, (self.z,), (v,))[1]

    def _rev_jv(self, v: Tensor) -> Tensor:
        (jv,) = torch.autograd.grad(self._g, self._u, v, retain_graph=True, allow_unused=True)
        if jv is None:
            raise RuntimeError("the generator's backward does not depend on its output gradient")
        return jv

    def jtw(self, w: Tensor) -> Tensor:
        if self.mode == "forward":
            if self._vjp is None:
                from torch.func import vjp

                self._vjp = vjp(self.f, self.z)[1]
            return self._vjp(w)[0]
        return torch.autograd.grad(self._out, self._zz, w, retain_graph=True)[0]

    def _choose(self) -> str:
        """The mode for this generator; a "reverse" answer leaves its recording in place."""
        v = torch.randn(self.z.shape, generator=torch.Generator().manual_seed(0)).to(self.z)
        try:
            self._record()
            if not self._g.requires_grad:
                raise RuntimeError("the generator's backward was recorded without a graph")
            rev = self._rev_jv(v)
        except RuntimeError as e:
            self._drop_recording()
            rev, rev_error = None, e
        try:
            fwd, tol = self._fwd_jv(v), 1e-3
        except (RuntimeError, NotImplementedError) as e:
            if rev is None:
                raise ValueError(
                    "the polish needs Jacobian-vector products, but the generator supports neither a "
                    f"differentiable backward ({rev_error}) nor forward-mode AD ({e}); invert with "
                    "polish_steps=0 (Adam only)") from e
            fwd, tol, fwd_error = self._central_difference(v), 1e-2, e
        else:
            fwd_error = None
            if rev is None:
                return "forward"
        with torch.no_grad():
            err = (rev - fwd).norm() / fwd.norm().clamp_min(1e-30)
        if bool(torch.isfinite(err)) and float(err) < tol:
            return "reverse"
        self._drop_recording()
        if fwd_error is not None:
            raise ValueError(
                "the polish needs Jacobian-vector products, but the generator's second-order backward "
                f"disagrees with a finite difference (relative error {float(err):.2g}) and it has no "
                f"forward-mode AD ({fwd_error}); invert with polish_steps=0 (Adam only)") from fwd_error
        return "forward"

    def _central_difference(self, v: Tensor) -> Tensor:
        """``J v`` by a central difference, per row with a step of 1e-3 of the row's scale
        (float32: accurate to about 1e-4 relative on a smooth generator)."""
        with torch.no_grad():
            h = 1e-3 * (self.z.norm(dim=1, keepdim=True) + 1) / v.norm(dim=1, keepdim=True).clamp_min(1e-30)
            return (self.f(self.z + h * v) - self.f(self.z - h * v)) / (2 * h)


def _forward_ad_attention():
    """Attention through its math kernel: the fused CPU/flash kernels have neither forward-mode
    AD nor a differentiable backward, one of which the polish's Jacobian-vector products need
    (e.g. a diffusers UNet's attention)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.MATH])


def _polish_cg(generator, inputs, cond, target_raw, metric_name, iters, cg_iters=20, report=None, patience=0,
               min_drop=0.3, stop_raw=None, group=None, done_groups=None, settle=None):
    """Matrix-free Levenberg-Marquardt on each image's best input, float32.

    Each step solves ``(J^T J + lam I) d = -J^T r`` per row by ``cg_iters`` conjugate-gradient
    iterations whose products with ``J`` and ``J^T`` are taken for all live rows at once
    (:class:`_JacobianProducts`: two backward passes through graphs recorded once per step); the
    Jacobian is never formed, so a step's cost grows with ``cg_iters``, not with the latent's
    width. A step is kept
    only where it lowers the row's loss (then ``lam`` shrinks; else it grows). Rows leave the
    loop once solved (mean squared residual under 1e-14), stuck (damping at its cap), levelled
    off (``patience``, ``min_drop``) or under their ``stop_raw`` (raw-unit MSE, ``[n]``), or
    once another row of their ``group`` is, or levelled off far above ``stop_raw`` (``settle``;
    :class:`_Leaving`). ``report(k, mse)``, if given, is
    called after step ``k`` with every row's mean squared residual (rows that left keep their
    last value).
    """
    if metric_name != "mse":
        return inputs
    with _forward_ad_attention():
        return _polish_cg_loop(generator, inputs, cond, target_raw, iters, cg_iters, report,
                               _Leaving(inputs.shape[0], patience, min_drop, stop_raw, group, done_groups, settle))


def _residual_fn(generator, target_raw):
    """``residual(z, c, rows)``: the float32 raw-unit residual of rows ``rows``, flattened ``[n, C*H*W]``."""

    def residual(z, c, rows):
        out = generator.decode_raw(z, c)
        if out.dtype in (torch.float16, torch.bfloat16):
            out = out.float()
        return (out - target_raw[rows]).flatten(1)

    return residual


def _polish_cg_loop(generator, inputs, cond, target_raw, iters, cg_iters, report, leaving):
    residual = _residual_fn(generator, target_raw)
    mode = None  # how Jacobian products are taken: decided at the first step (_JacobianProducts)

    z = inputs.clone()
    n = z.shape[0]
    lam = torch.full((n,), 1e-2, device=z.device)
    live = torch.arange(n, device=z.device)
    with torch.no_grad():
        r = residual(z, cond, live)
    cost = r.square().sum(1)
    per_elem = r.shape[1]
    cost_all = cost.clone()
    for k in range(iters):
        kept = leaving.keep(k, cost, per_elem, lam >= 1e8, live, r, lam)
        if kept is None:
            break
        live, cost, r, lam = kept
        zl = z[live]
        cl = None if cond is None else cond[live]

        def f(q, cl=cl, live=live):
            return residual(q, cl, live)

        prod = _JacobianProducts(f, zl, mode)
        mode = prod.mode
        b = -prod.jtw(r)
        x = torch.zeros_like(zl)
        res, p = b.clone(), b.clone()
        rs = res.square().sum(1)
        for _ in range(cg_iters):
            ap = prod.jtw(prod.jv(p)) + lam[:, None] * p
            alpha = rs / (p * ap).sum(1).clamp_min(1e-30)
            x = x + alpha[:, None] * p
            res = res - alpha[:, None] * ap
            rs_new = res.square().sum(1)
            p = res + (rs_new / rs.clamp_min(1e-30))[:, None] * p
            rs = rs_new
        with torch.no_grad():
            z_new = zl + x
            r_new = residual(z_new, cl, live)
            cost_new = r_new.square().sum(1)
            better = cost_new < cost  # NaN compares False: a step that breaks a row is refused
            z[live] = torch.where(better[:, None], z_new, zl)
            r = torch.where(better[:, None], r_new, r)
            cost = torch.where(better, cost_new, cost)
            lam = torch.where(better, lam * 0.3, lam * 10).clamp(1e-8, 1e8)
            if report is not None:
                cost_all[live] = cost
                report(k + 1, cost_all / per_elem)
    return z.detach()


def _polish_gmres(generator, inputs, cond, target_raw, metric_name, iters, krylov=30, report=None, patience=0,
                  min_drop=0.3, stop_raw=None, group=None, done_groups=None):
    """Gauss-Newton steps for square Jacobians, each solved in a Krylov subspace, float32.

    For a generator whose latent is exactly as wide as its image (a one-step consistency model
    or distilled sampler maps noise shaped like the image to the image), ``J`` is square and
    ``krylov`` GMRES iterations give the ``d`` in the Krylov space of ``(J, r)`` that minimises
    ``|r + J d|``: the Gauss-Newton model restricted to that space. Each iteration is one
    ``J v`` product for all live rows (:class:`_JacobianProducts`), no ``J^T w``: a step of 30
    iterations takes about a quarter of the time of a 100-iteration CG step of
    :func:`_polish_cg` (one-step zoo model, CPU). ``d`` descends
    ``|r|^2`` (``r^T J d <= -|J d|^2 / 2``), so a backtracking line search (step 1, 1/4, ...
    1/4^5) lowers the loss unless the subspace holds no useful direction; a row where none of
    the six steps does is stuck. GMRES with a short subspace can stall on a row (restarted
    GMRES stagnates on some matrices); the row then levels off or sticks and leaves, and the
    caller hands it to the CG polish. Rows leave as in :func:`_polish_cg`: solved, stuck,
    levelled off (``patience``, ``min_drop``), under ``stop_raw`` or settled by another row of
    their ``group``. ``report(k, mse)`` as in :func:`_polish_cg`.

    Returns ``(inputs, open)``: ``open`` marks the rows that ended neither solved (mean squared
    residual under 1e-14) nor under their ``stop_raw`` nor settled by their group.
    """
    if metric_name != "mse":
        return inputs, torch.ones(inputs.shape[0], dtype=torch.bool, device=inputs.device)
    with _forward_ad_attention():
        return _polish_gmres_loop(generator, inputs, cond, target_raw, iters, krylov, report,
                                  _Leaving(inputs.shape[0], patience, min_drop, stop_raw, group, done_groups))


def _gmres(jv, r: Tensor, krylov: int) -> Tensor:
    """Per row, ``argmin |r + J d|`` over ``d`` in span(r, J r, ... J^(k-1) r); ``jv(v) = J v``.

    Arnoldi with modified Gram-Schmidt, batched over rows; the small ``(k+1) x k`` least-squares
    problems are solved by pseudo-inverse, which also covers an early breakdown (the subspace is
    exhausted: the exact solution lies in it).
    """
    m = r.shape[0]
    beta = r.norm(dim=1)
    basis = [-r / beta.clamp_min(1e-30)[:, None]]
    h = r.new_zeros(m, krylov + 1, krylov)
    for j in range(krylov):
        w = jv(basis[j])
        for i in range(j + 1):
            hij = (w * basis[i]).sum(1)
            h[:, i, j] = hij
            w = w - hij[:, None] * basis[i]
        hn = w.norm(dim=1)
        h[:, j + 1, j] = hn
        basis.append(w / hn.clamp_min(1e-30)[:, None])
    e1 = r.new_zeros(m, krylov + 1, 1)
    e1[:, 0, 0] = beta
    y = torch.linalg.pinv(h, rtol=1e-6) @ e1  # [m, k, 1]
    return (torch.stack(basis[:krylov], 2) @ y).squeeze(2)


def _polish_gmres_loop(generator, inputs, cond, target_raw, iters, krylov, report, leaving):
    residual = _residual_fn(generator, target_raw)
    mode = None  # how Jacobian products are taken: decided at the first step (_JacobianProducts)

    z = inputs.clone()
    n = z.shape[0]
    live = torch.arange(n, device=z.device)
    with torch.no_grad():
        r = residual(z, cond, live)
    if r.shape[1] != z.shape[1]:
        raise ValueError(
            f"the GMRES polish needs a latent exactly as wide as the image (a square Jacobian); "
            f"{generator.name} maps {z.shape[1]} latent values to {r.shape[1]} pixels")
    cost = r.square().sum(1)
    per_elem = r.shape[1]
    stuck = torch.zeros(n, dtype=torch.bool, device=z.device)
    cost_all = cost.clone()
    for k in range(iters):
        kept = leaving.keep(k, cost, per_elem, stuck, live, r, stuck)
        if kept is None:
            break
        live, cost, r, stuck = kept
        zl = z[live]
        cl = None if cond is None else cond[live]

        prod = _JacobianProducts(lambda q, cl=cl, live=live: residual(q, cl, live), zl, mode)
        mode = prod.mode
        with torch.no_grad():
            d = _gmres(prod.jv, r, krylov)
            alpha = torch.ones(zl.shape[0], 1, device=z.device)
            pending = torch.ones(zl.shape[0], dtype=torch.bool, device=z.device)
            z_new, r_new, cost_new = zl.clone(), r.clone(), cost.clone()
            for _ in range(6):  # backtracking: only the rows still without a lower loss are evaluated
                idx = pending.nonzero().squeeze(1)
                zt = zl[idx] + alpha[idx] * d[idx]
                rt = residual(zt, None if cl is None else cl[idx], live[idx])
                ct = rt.square().sum(1)
                ok = ct < cost[idx]  # NaN compares False: a step that breaks a row is refused
                z_new[idx[ok]], r_new[idx[ok]], cost_new[idx[ok]] = zt[ok], rt[ok], ct[ok]
                pending[idx[ok]] = False
                alpha[idx[~ok]] *= 0.25
                if not bool(pending.any()):
                    break
            stuck = pending
            z[live] = z_new
            r, cost = r_new, cost_new
            cost_all[live] = cost
            if report is not None:
                report(k + 1, cost_all / per_elem)
    return z.detach(), ~leaving.settled(cost_all / per_elem, torch.arange(n, device=z.device))
