"""Held-out convergence benchmark: do the inversion's settings converge on generators they were never tuned on?

For each generator of the 64x64 generator benchmark (``ronan_fast.zoo.benchmark_models``; ``--suite
tuning``, ``held-out`` or ``all``):

1. ``--n`` of its own images, generated and rounded to 8 bits (as a saved PNG holds them), and
   ``--n-real`` real images at the model's shape, rounded the same way (:func:`real_images`
   says which, images the model never saw where any exist);
2. the authors' loop (``bench.baselines.authors_loop``: one start, 1500 Adam steps at lr 0.1,
   one image at a time) on every real image, **before** the candidates, and on the first
   ``--authors-own`` own images, **after** them (so that a change of the machine's load over
   the run falls on both sides); its time per image is the baseline of every ratio;
3. the convergence line: 1% of the authors' loop's median loss over the real images (one line
   per generator, the same for every candidate and every run of the same images and seed);
4. each candidate inverts the real images, then the own images, to the verdict: every image
   with the line as its belonging threshold (``invert(stop_below=line)``), as attribution
   inverts every image it is given (early stop, the settle rule and escalation act).

Reported per generator and candidate: own images converged (loss under the line), the worst own
image (its loss and its ratio to the line), the real images' median and lowest loss and how many
fell under the line, and the time to the verdict per image against the authors' loop (own images,
real images, and the mean of the two, each as the authors' time per image over the candidate's:
"5.0" is five times shorter). Wall-clock and process CPU-time ratios are both given: one thread
on a shared machine; CPU time is what another process's load moves least.

Candidates with ``"warm": "encoder"`` start each image's first row (of each class, for a
class-searching conditional generator) at a learned encoder's guess
(:mod:`ronan_fast.warmstart`); the encoder is trained on the model's own samples once per
generator (or read from ``--encoders DIR`` when one for this generator and training recipe is
there), and its training cost is reported apart. For a latent-diffusion decoder the model's own
encoder is the warm start (``LatentDiffusionDecoder(init="encoder")``). Candidates with
``"warm": "mapping"`` start a StyleGAN-style generator's images through its mapping network
(:mod:`ronan_fast.mapping_start`; nothing trained, its cost inside the time to the verdict).
Candidates with ``"channels_last": True`` invert a copy of the generator in channels-last memory
format (:func:`ronan_fast.channels_last`); ``--authors-channels-last`` also runs the authors'
loop on such a copy (after the rest, on the same images) and adds a table of each candidate's
ratio against both loops. Candidates with ``"jacobian_columns"`` run with the dense polish's
Jacobians built that many columns at a time on CPU ("all": every column in one pass).

Usage::

    python -m bench.heldout --suite held-out --n 16 --n-real 8 --authors-own 8 --candidates default \\
        --threads 1 --out bench/results/heldout_baseline_heldout.md
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from bench.baselines import authors_loop
from bench.convergence import CANDIDATES as CONVERGENCE_CANDIDATES
from bench.convergence import settings_for
from bench.machine import machine
from ronan_fast.evaluation.store import write_text
from ronan_fast.inversion import invert
from ronan_fast.mapping_start import W_FIRST_DONE
from ronan_fast.weight_transforms import channels_last

#: a lean search behind a learned encoder: 4 starts (its guess and the 3 best of 24 screened
#: draws), 300 Adam steps halved every 50, then the family's polish; no first search from the
#: guess alone, no settle rule in the Adam phase, and 2 more polished starts for an image left within
#: 4x of its threshold (as measured before the GAN warm default had 4; a no-op where the family
#: has no polish): the base of the "warm-lean" candidates
_WARM_LEAN = {"settings": "default", "warm": "encoder", "restarts": 4, "screen": 8, "steps": 300, "halving_every": 50,
              "first_steps": 0, "adam_settle_window": 0, "polish_escalate": 2}

#: candidates of this benchmark: bench.convergence's, and those with a learned warm start
#: ("warm": "encoder"), screened starts (``screen``) or other escalation settings
CANDIDATES: dict[str, dict] = {
    **CONVERGENCE_CANDIDATES,
    # the package default with the first start of each image at a learned encoder's guess (every
    # learned-start candidate below, measured before the first search from the guess alone was a
    # default, is pinned to first_steps=0 unless it names it)
    "warm": {"settings": "default", "warm": "encoder", "first_steps": 0},
    # the package default, each start the best of 8 candidates by one forward pass
    "screen8": {"settings": "default", "screen": 8},
    # both
    "warm-screen8": {"settings": "default", "warm": "encoder", "screen": 8, "first_steps": 0},
    # the package default without escalation (no second polished start for an image left within 4x of
    # its threshold): what escalation costs and what it rescues
    "noesc": {"settings": "default", "polish_escalate": 0},
    # the family default with the GAN family's polish (25 dense Levenberg-Marquardt steps, the
    # settle rule and escalation with a threshold): for the families without a polish of their own
    "polish25": {"settings": "default", "polish_steps": 25, "polish_method": "dense", "settle_patience": 6,
                 "polish_escalate": 2},
    # a lean search behind the encoder (_WARM_LEAN)
    "warm-lean": _WARM_LEAN,
    # ... with the generator's Adam steps in bfloat16 (autocast; a row stops under its threshold
    # only once float32 confirms it, and the polish and scores stay float32)
    "warm-lean-bf16": {**_WARM_LEAN, "precision": "bf16"},
    # ... inverting a channels-last copy of the generator (ronan_fast.channels_last)
    "warm-lean-cl": {**_WARM_LEAN, "channels_last": True},
    # ... with a first search from the encoder's guess alone (InversionSettings.first_steps: one
    # start, 50 Adam steps, the polish; only the images it leaves above their threshold get the
    # full search): what it saves the model's own images against what real images pay for it
    "warm-lean-first50": {**_WARM_LEAN, "first_steps": 50},
    # ... inverting a channels-last copy of the generator
    "warm-lean-first50-cl": {**_WARM_LEAN, "first_steps": 50, "channels_last": True},
    # ... and the full search for the images the first search leaves above their threshold 150
    # steps long, halved every 25 (InversionSettings.rest_steps): real images and the own images
    # the guess missed; what real images save against whether the misses are still rescued
    "warm-lean-first50-rest150": {**_WARM_LEAN, "first_steps": 50, "rest_steps": 150},
    # ... and the Adam phase's settle rule (InversionSettings.adam_settle_window: in the second half
    # of the schedule, a row over 30x its threshold whose loss fell by under 5% over the last 50
    # steps stops): what real images save against whether every own image still converges
    "warm-lean-first50-asettle": {**_WARM_LEAN, "first_steps": 50, "adam_settle_window": 50},
    # ... with 4 more polished starts instead of 2 for an image left above its threshold but within
    # 4x of it (polish_escalate=4; with 4 starts, every row): the GAN warm-start default now
    "warm-lean-first50-asettle-esc4": {**_WARM_LEAN, "first_steps": 50, "adam_settle_window": 50,
                                       "polish_escalate": 4},
    # on a class-conditional generator, warm-lean-first50 with 8 more polished starts instead of 2 for an
    # image left within 4x of its threshold: the class-conditional warm-start default now
    "warm-lean-first50-esc8": {**_WARM_LEAN, "first_steps": 50, "polish_escalate": 8},
    # warm-lean with the GAN family's polish, for the families without one
    "warm-lean-p25": {**_WARM_LEAN, "polish_steps": 25, "polish_method": "dense", "settle_patience": 6,
                      "polish_escalate": 2},
}

#: the mapping start with the encoder of w and the search over w in whitened coordinates, then
#: the family's warm-start default over z: the base of the "mapped-wenc-first" candidates
_WENC_FIRST = {"settings": "default", "warm": "mapping", "w_space": "whitened", "w_encoder": True, "restarts": 4,
               "screen": 8, "steps": 300, "halving_every": 50}

#: "mapped-wenc-first-settle4-stops" with W_ENCODER_RECIPE's encoder of w: the base of the
#: "-wrecipe" candidates, whose break-even is measured against the encoder they replace
_WRECIPE = {**_WENC_FIRST, "w_settle_above": 4.0, "w_full_stops": True, "w_encoder_recipe": "w",
            "against": "mapped-wenc-first-settle4-stops"}

CANDIDATES.update({
    # a StyleGAN-style generator's first start found through its mapping network
    # (ronan_fast.mapping_start: synthesis inverted over w, then mapping(z) = w solved), then the
    # family's warm-start default over z (WARM_DEFAULTS["gan"]: 4 screened starts, 300 steps halved every 50);
    # the search over w in w itself (w_space="w"), as these candidates were first measured
    "mapped": {"settings": "default", "warm": "mapping", "w_space": "w", "restarts": 4, "screen": 8, "steps": 300,
               "halving_every": 50},
    # ... with the search over w's starts screened (each the best of 16 mapping draws by one forward pass)
    "mapped-wscreen16": {"settings": "default", "warm": "mapping", "w_space": "w", "w_screen": 16, "restarts": 4,
                         "screen": 8, "steps": 300, "halving_every": 50},
    # ... with a learned encoder's guess of w (ENCODER_RECIPE, trained on mapping(z) and the images
    # it makes) as the first start of the search over w (these candidates, measured before the
    # first search from the guess alone existed, are pinned to w_first_steps=0: the full search
    # for every image)
    "mapped-wenc": {"settings": "default", "warm": "mapping", "w_space": "w", "w_encoder": True, "w_first_steps": 0,
                    "restarts": 4, "screen": 8, "steps": 300, "halving_every": 50},
    # ... with the solve for z Euclidean in w to the end (MappingStart(solve_metric="w"), the start's
    # first recipe) instead of in the image's metric
    "mapped-wenc-wsolve": {"settings": "default", "warm": "mapping", "w_space": "w", "w_encoder": True,
                           "w_first_steps": 0, "solve_metric": "w", "restarts": 4, "screen": 8, "steps": 300,
                           "halving_every": 50},
    # ... with 48 starts in the search over w instead of W_SETTINGS' 24
    "mapped-wenc-w48": {"settings": "default", "warm": "mapping", "w_space": "w", "w_encoder": True,
                        "w_first_steps": 0, "w_restarts": 48, "restarts": 4, "screen": 8, "steps": 300,
                        "halving_every": 50},
    # "mapped" and "mapped-wenc" with the search over w in coordinates whitened by the mapping's
    # mean and covariance (MappingStart(w_space="whitened"))
    "mapped-white": {"settings": "default", "warm": "mapping", "w_space": "whitened", "restarts": 4, "screen": 8,
                     "steps": 300, "halving_every": 50},
    "mapped-wenc-white": {"settings": "default", "warm": "mapping", "w_space": "whitened", "w_encoder": True,
                          "w_first_steps": 0, "restarts": 4, "screen": 8, "steps": 300, "halving_every": 50},
    # ... with a first search over w from the encoder's guess alone (MappingStart's w_first_steps,
    # given each image's threshold): only the images it leaves above get the full search
    "mapped-wenc-first": _WENC_FIRST,
    # ... with the full search only for the images the first search leaves within 4x of their
    # threshold (MappingStart(w_full_within=4)): what the full search rescues against what real
    # images, far above, pay for it
    "mapped-wenc-first-within4": {**_WENC_FIRST, "w_full_within": 4.0},
    # ... and the search over z from z* alone (no screened random starts): what the random
    # starts over z cost real images, and whether any own image needs them
    "mapped-wenc-first-z1": {**_WENC_FIRST, "restarts": 1, "screen": 1},
    "mapped-wenc-first-within4-z1": {**_WENC_FIRST, "w_full_within": 4.0, "restarts": 1, "screen": 1},
    # ... with the images whose search over w ends above 4x their threshold settled there, their
    # search over z skipped (MappingStart(w_settle_above=4)): what the search over z costs real
    # images, and whether any own image comes under its threshold only over z
    "mapped-wenc-first-settle4": {**_WENC_FIRST, "w_settle_above": 4.0},
    "mapped-wenc-first-within4-settle4": {**_WENC_FIRST, "w_full_within": 4.0, "w_settle_above": 4.0},
    # ... with the full search over w given each image's first-search stop (MappingStart(w_full_stops=True)):
    # an image stops there, and the polish lets go of rows levelled off far above it
    "mapped-wenc-first-settle4-stops": {**_WENC_FIRST, "w_settle_above": 4.0, "w_full_stops": True},
    # ... and each dense polish step over w followed by up to 8 chord steps reusing its Jacobian
    # (InversionSettings.polish_reuse): a forward and a backward pass each instead of a Jacobian,
    # while each takes the loss under 0.9 of what it was
    "mapped-wenc-first-settle4-stops-reuse8": {**_WENC_FIRST, "w_settle_above": 4.0, "w_full_stops": True,
                                               "w_polish_reuse": 8},
    "mapped-wenc-first-settle4-reuse8": {**_WENC_FIRST, "w_settle_above": 4.0, "w_polish_reuse": 8},
    # ... with the encoder of w trained longer on more samples, wider (W_ENCODER_RECIPE instead of
    # ENCODER_RECIPE): its training cost against the search over w it saves, per image
    "mapped-wenc-first-settle4-stops-wrecipe": _WRECIPE,
    # ... and the full search over w only for images the first search leaves within 4x of their threshold
    "mapped-wenc-first-within4-settle4-stops-wrecipe": {**_WRECIPE, "w_full_within": 4.0},
    # ... with the polish over w building its Jacobians (and the solve for z its image metric) in bf16
    "mapped-wenc-first-settle4-stops-wrecipe-jbf16": {**_WRECIPE, "w_polish_precision": "bf16"},
    # ... z* the solve's draw whose image is closest to the image (instead of the lowest error in its metric)
    "mapped-wenc-first-settle4-stops-wrecipe-pick": {**_WRECIPE, "solve_choice": "loss"},
    "mapped-wenc-first-settle4-stops-wrecipe-jbf16-pick": {**_WRECIPE, "w_polish_precision": "bf16",
                                                           "solve_choice": "loss"},
    # ... and 48 starts in the full search over w (--w-set restarts=48)
    "mapped-wenc-first-settle4-stops-wrecipe-jbf16-pick-w48": {**_WRECIPE, "w_polish_precision": "bf16",
                                                               "solve_choice": "loss", "w_restarts": 48},
    # ... and the polish over z building its Jacobians in bf16 too
    "mapped-wenc-first-settle4-stops-wrecipe-allbf16": {**_WRECIPE, "w_polish_precision": "bf16",
                                                        "polish_precision": "bf16"},
    # ... with a row of the polishes over w let go once its loss, above 4x its stop, fell by less than
    # 20% over 3 Jacobians instead of 6 (--w-set settle_patience=3): what real images, which level off at
    # once, save of the two searches' polishes, and whether an own image is let go too soon
    "mapped-wenc-first-settle4-stops-wrecipe-sp3": {**_WRECIPE, "w_settle_patience": 3},
    # ... with the first search over w settling an image once under 0.1x (-fd10) or 0.25x (-fd25) its
    # threshold instead of 0.05x: the polish's last Jacobians against what the solve for z then adds
    "mapped-wenc-first-settle4-stops-wrecipe-fd10": {**_WRECIPE, "w_first_done": 0.1},
    "mapped-wenc-first-settle4-stops-wrecipe-fd25": {**_WRECIPE, "w_first_done": 0.25},
    # ... with no full search over w (w_full_within = w_first_done): the first search alone. Against
    # the default in the same run, what the full search (the StyleGAN's escalation) costs and rescues
    "mapped-wenc-first-settle4-stops-wrecipe-nofull": {**_WRECIPE, "w_full_within": W_FIRST_DONE},
    # ... inverting a copy of the generator with its 4-D weights in channels-last memory format
    # (ronan_fast.channels_last: the same function and fingerprint, NHWC convolutions); with
    # --authors-channels-last the authors' loop runs on such a copy too, for the like-for-like ratio
    "mapped-wenc-first-settle4-stops-wrecipe-cl": {**_WRECIPE, "channels_last": True},
    # ... with the dense polish (and the solve for z's image metric) building each row's Jacobian
    # with all its columns in one pass, as before DENSE_CPU_COLUMNS: what the blocks save, same run
    "mapped-wenc-first-settle4-stops-wrecipe-jall": {**_WRECIPE, "jacobian_columns": "all"},
    # ... with the polishes over w matrix-free (conjugate-gradient Levenberg-Marquardt, 20 products
    # with J and J^T per step) instead of dense: a step's cost no longer grows with w's width,
    # against the steps an inexact solve adds
    "mapped-wenc-first-settle4-stops-wrecipe-wcg": {**_WRECIPE, "w_polish_method": "cg"},
})


@contextlib.contextmanager
def jacobian_columns(columns):
    """The dense polish's ``DENSE_CPU_COLUMNS`` set to ``columns`` ("all": every column in one pass;
    None: left as it is) while the block runs."""
    from ronan_fast.inversion.polish import dense

    if columns is None:
        yield
        return
    if columns != "all" and (isinstance(columns, bool) or not isinstance(columns, int) or columns < 1):
        raise ValueError(f"jacobian_columns must be 'all', a positive int or None, got {columns!r}")
    was = dense.DENSE_CPU_COLUMNS
    dense.DENSE_CPU_COLUMNS = 1 << 30 if columns == "all" else columns
    try:
        yield
    finally:
        dense.DENSE_CPU_COLUMNS = was


#: the encoder recipe of the "warm" candidates (ronan_fast.warmstart.train_encoder's arguments)
#: (every argument named: train_w_encoder puts what is not named on W_ENCODER_RECIPE's)
ENCODER_RECIPE: dict = {"samples": 8192, "steps": 1000, "batch": 64, "lr": 1e-3, "width": 16, "hidden": 512,
                        "image_steps": 200, "seed": 0}


def round8(x: torch.Tensor) -> torch.Tensor:
    """Images in [0, 1] as an 8-bit file holds them."""
    return (x.clamp(0, 1) * 255).round() / 255


def _fmnist_held_out(n: int, size: int) -> torch.Tensor:
    from ronan_fast.evaluation.models import _FMNIST_HELD_OUT, _fmnist, _subset

    lo, hi = _FMNIST_HELD_OUT
    x = _fmnist("test")[lo + _subset(hi - lo, n, 12345, "fmnist-test-held-out")]
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False).clamp(0, 1)


def _digits(n: int, size: int) -> torch.Tensor:
    from ronan_fast.evaluation.models import _digits as digits
    from ronan_fast.evaluation.models import _subset

    pool = digits()
    x = pool[_subset(pool.shape[0], n, 12345, "digits")]
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False).clamp(0, 1)


#: where each benchmark model's real images come from, in words (the model's training data -> real images)
REAL_SOURCES = {
    "photo-patches-64rgb": "other 64x64 crops (seed 999) of the photos it trained on (no unseen photo ships)",
    "opencv-patches-64rgb": "64x64 crops (seed 999) of the scikit-image and scikit-learn photos, which it never saw",
    "fashion-mnist-train": "Fashion-MNIST test[16:5000] (never trained on), bilinear to 64x64 as in training",
    "digits": "the zoo's digits, bilinear to 64x64 (all of them are in its training set: none unseen ships)",
}


def real_images(name: str, n: int) -> torch.Tensor:
    """``n`` real images at zoo model ``name``'s shape, in [0, 1] (rounded by the caller)."""
    from ronan_fast.data import photo_patches
    from ronan_fast.zoo import ZOO

    entry = ZOO[name]
    c, h, w = entry.image_shape
    data = entry.training_data
    if data == "photo-patches-64rgb":
        x = photo_patches(size=h, n=n, grey=c == 1, seed=999)
    elif data == "opencv-patches-64rgb":
        x = photo_patches(size=h, n=n, grey=c == 1, seed=999, sources=("skimage", "sklearn"))
    elif data == "fashion-mnist-train":
        x = _fmnist_held_out(n, h)
    elif data == "digits":
        x = _digits(n, h)
    else:
        raise ValueError(f"no real images known for {name}'s data {data!r}")
    return x


def own_images(adapter, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``n`` images ``adapter`` generates (latents from ``seed``), rounded to 8 bits, and their conditions."""
    with torch.no_grad():
        out = adapter.generate(n, torch.Generator().manual_seed(seed))
    return round8(out.images), out.conditions


def _timed(fn):
    w, c = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - w, time.process_time() - c


def authors_run(adapter, images: torch.Tensor, seed: int, steps: int = 1500) -> dict:
    """The authors' loop on ``images``, one at a time: losses and per-image wall and CPU seconds."""
    losses, wall, cpu = [], [], []
    for k in range(images.shape[0]):
        loss, w, c = _timed(lambda: authors_loop(adapter, images[k : k + 1], steps=steps, lr=0.1, restarts=1,
                                                 seed=seed))
        losses.append(float(loss[0]))
        wall.append(w)
        cpu.append(c)
    return {"losses": losses, "wall": wall, "cpu": cpu}


def candidate_adapter(name: str, adapter, spec: dict, encoders: dict, enc_dir: Path | None) -> tuple[object, dict | None]:
    """The adapter a candidate inverts with (a warm-started one for ``"warm"``) and the encoder's cost."""
    warm = spec.get("warm")
    if not warm:
        return adapter, None
    if warm == "mapping":  # a StyleGAN-style generator's starts found through w (nothing trained)
        from ronan_fast.mapping_start import W_ENCODER_RECIPE, W_SETTINGS, mapping_start, train_w_encoder
        from ronan_fast.warmstart import WarmStarted

        # without w_polish_reuse, none: the search over w as every candidate measured before it existed
        w_change = {"polish_reuse": 0}
        w_change.update({k: spec.pop(f"w_{k}") for k in ("screen", "restarts", "polish_reuse", "polish_precision",
                                                         "settle_patience", "polish_method")
                         if f"w_{k}" in spec})
        kw = {"w_settings": W_SETTINGS.replace(**w_change)}
        # a candidate names the bound, the settling and the full search's stop it was measured with;
        # without them, none (as every candidate measured before MappingStart's defaults had them)
        kw.update(w_full_within=math.inf, w_settle_above=math.inf, w_full_stops=False)
        for k in ("solve_metric", "solve_choice", "w_space", "w_first_steps", "w_first_done", "w_full_within",
                  "w_settle_above", "w_full_stops"):
            if k in spec:
                kw[k] = spec.pop(k)
        # the encoder of w's recipe: ENCODER_RECIPE, as every candidate measured before
        # W_ENCODER_RECIPE existed, unless the candidate names "w" (W_ENCODER_RECIPE)
        recipe = W_ENCODER_RECIPE if spec.pop("w_encoder_recipe", None) == "w" else ENCODER_RECIPE
        if not spec.pop("w_encoder", False):
            return WarmStarted(adapter, mapping_start(adapter, **kw)), {
                "encoder": "through the mapping network (none trained)", "train_s": 0.0, "samples": 0}
        start = mapping_start(adapter, **kw)
        enc = cached_encoder(f"{name}.w", start.w_generator, encoders, enc_dir,
                              lambda: train_w_encoder(start, **recipe), recipe)
        return WarmStarted(adapter, start.with_w_encoder(enc)), dict(enc.cost, encoder="of w, through the mapping network")
    if warm != "encoder":
        raise ValueError(f"unknown warm start {warm!r}")
    from ronan_fast import warmstart
    from ronan_fast.autoencoder_start import autoencoder_start, has_own_encoder

    if has_own_encoder(adapter):  # its own encoder, as LatentTracer starts
        return warmstart.WarmStarted(adapter, autoencoder_start(adapter)), {
            "encoder": "the autoencoder's own (posterior mean)", "train_s": 0.0, "samples": 0}

    enc = cached_encoder(name, adapter, encoders, enc_dir, lambda: warmstart.train_encoder(adapter, **ENCODER_RECIPE))
    return warmstart.WarmStarted(adapter, enc), dict(enc.cost)


def cached_encoder(name: str, adapter, encoders: dict, enc_dir: Path | None, train, recipe: dict | None = None):
    """The encoder of ``recipe`` (default ``ENCODER_RECIPE``) for ``adapter``: from this run,
    from ``enc_dir`` (its recipe checked; another recipe's file is named by its digest), or
    ``train()``ed (and saved there)."""
    import hashlib

    from ronan_fast import warmstart

    recipe = ENCODER_RECIPE if recipe is None else recipe
    text = json.dumps(recipe, sort_keys=True)
    key = (name, text)
    if key not in encoders:
        tag = "" if recipe == ENCODER_RECIPE else "." + hashlib.sha256(text.encode()).hexdigest()[:8]
        path = None if enc_dir is None else enc_dir / f"{name}{tag}.encoder.safetensors"
        enc = None
        if path is not None and path.is_file():
            enc = warmstart.load_encoder(path, adapter)
            if {k: enc.recipe.get(k) for k in recipe} != recipe:
                enc = None
        if enc is None:
            print(f"[{name}] training an encoder: {recipe}", file=sys.stderr, flush=True)
            enc = train()
            if path is not None:
                path.parent.mkdir(parents=True, exist_ok=True)
                enc.save(path)
        encoders[key] = enc
    return encoders[key]


def summarise(own: list[float], real: list[float], line: float) -> dict:
    worst = max(own)
    return {
        "own_converged": sum(v < line for v in own),
        "own_n": len(own),
        "own_worst": worst,
        "own_worst_ratio": worst / line,
        "own_median": statistics.median(own),
        "real_median": statistics.median(real),
        "real_min": min(real),
        "real_under_line": sum(v < line for v in real),
    }


def run_generator(name: str, a, names: list[str], done: dict, save) -> None:
    from ronan_fast.zoo import ZOO, zoo_adapter

    rec = done.setdefault(name, {"generator": name, "split": ZOO[name].split, "candidates": {}})
    adapter = zoo_adapter(name)
    own, _ = own_images(adapter, a.n, 10_000 + a.seed)
    real = round8(real_images(name, a.n_real))
    rec["real_source"] = REAL_SOURCES[ZOO[name].training_data]
    if "authors_real" not in rec:
        print(f"[{name}] authors' loop on {a.n_real} real images", file=sys.stderr, flush=True)
        rec["authors_real"] = authors_run(adapter, real, a.seed, a.authors_steps)
        save()
    line = 0.01 * statistics.median(rec["authors_real"]["losses"])
    rec["line"] = line
    encoders: dict = {}
    for cname in names:
        if cname in rec["candidates"]:
            continue
        spec = dict(CANDIDATES[cname])
        gen = channels_last(adapter, copy=True) if spec.pop("channels_last", False) else adapter
        inv_adapter, enc_cost = candidate_adapter(name, gen, spec, encoders, a.encoders)
        spec.pop("warm", None)
        spec.pop("against", None)
        columns = spec.pop("jacobian_columns", None)
        s = settings_for(gen, spec)
        print(f"[{name}] {cname}: {s}", file=sys.stderr, flush=True)
        with jacobian_columns(columns):
            res_r, wr, cr = _timed(lambda: invert(inv_adapter, real, settings=s, seed=a.seed + 1, stop_below=line))
            res_o, wo, co = _timed(lambda: invert(inv_adapter, own, settings=s, seed=a.seed, stop_below=line))
        own_l, real_l = res_o.loss.double().tolist(), res_r.loss.double().tolist()
        rec["candidates"][cname] = {
            "settings": s.to_dict(), "encoder": enc_cost, "own_losses": own_l, "real_losses": real_l,
            "own_wall": wo, "own_cpu": co, "real_wall": wr, "real_cpu": cr,
            "own_row_steps": float(res_o.row_steps.double().mean()),
            "real_row_steps": float(res_r.row_steps.double().mean()),
            **summarise(own_l, real_l, line),
        }
        save()
        r = rec["candidates"][cname]
        print(f"[{name}] {cname}: own {r['own_converged']}/{r['own_n']}, worst {r['own_worst']:.2e} "
              f"({r['own_worst_ratio']:.2g}x line {line:.2e}), real median {r['real_median']:.2e}, "
              f"{wo / a.n:.2f} s/own, {wr / a.n_real:.2f} s/real", file=sys.stderr, flush=True)
    if "authors_own" not in rec and a.authors_own:
        print(f"[{name}] authors' loop on {a.authors_own} own images", file=sys.stderr, flush=True)
        rec["authors_own"] = authors_run(adapter, own[: a.authors_own], a.seed, a.authors_steps)
        save()
    if a.authors_channels_last and "authors_cl" not in rec:
        print(f"[{name}] authors' loop on a channels-last copy: {a.n_real} real, {a.authors_own} own images",
              file=sys.stderr, flush=True)
        cl = channels_last(adapter, copy=True)
        rec["authors_cl"] = {"real": authors_run(cl, real, a.seed, a.authors_steps),
                             "own": authors_run(cl, own[: a.authors_own], a.seed, a.authors_steps)}
        save()


def ratios(rec: dict, r: dict, a_n: int, a_real: int, channels_last: bool = False) -> dict:
    """Authors' seconds per image over the candidate's (own, real, their mean), wall and CPU;
    ``channels_last``: the authors' loop on the channels-last copy (``--authors-channels-last``)."""
    out = {}
    runs = (rec["authors_cl"]["real"], rec["authors_cl"]["own"]) if channels_last else (
        rec["authors_real"], rec.get("authors_own", {}))
    for clock in ("wall", "cpu"):
        auth = runs[0][clock] + runs[1].get(clock, [])
        per = sum(auth) / len(auth)
        own, real = r[f"own_{clock}"] / a_n, r[f"real_{clock}"] / a_real
        out[clock] = {"authors": per, "own": per / own, "real": per / real, "mean": per / ((own + real) / 2),
                      "own_s": own, "real_s": real}
    return out


def _trains_encoder(cname: str) -> bool:
    """Whether candidate ``cname`` trains an encoder (a learned warm start, or an encoder of ``w``)."""
    spec = CANDIDATES.get(cname, {})
    return spec.get("warm") == "encoder" or bool(spec.get("w_encoder"))


def render(raw: dict) -> str:
    a = raw["args"]
    m = raw["machine"]
    n, n_real = int(a["n"]), int(a["n_real"])
    head = [
        f"# Held-out convergence benchmark: {a['suite']}",
        "",
        f"Machine: {m['machine']}, {m['cpu_count']} cores (shared), {m['threads']} torch thread(s), torch "
        f"{m['torch']}, Python {m['python']}, CPU only, under `nice -n 5`. Command: `{raw['command']}`.",
        "",
        f"{n} own images per generator (generated from seed {10_000 + int(a['seed'])}, rounded to 8 bits) and "
        f"{n_real} real images (rounded to 8 bits), inverted to the verdict: every image with the line as its "
        "threshold. **Line** = 1% of the authors' loop's median loss over the real images. Own converged = "
        "own images under the line. The authors' loop (one start, 1500 Adam steps, lr 0.1, one image at a time) "
        f"ran on the {n_real} real images before the candidates and on the first {a['authors_own']} own images "
        "after them; **x authors** = the authors' loop's seconds per image over the candidate's (own images, "
        "real images, and the mean of the two per-image times), wall clock (CPU time in brackets). "
        f"{raw.get('load_note', '')}",
        "",
    ]
    lines = []
    for split in ("tuning", "held-out"):
        recs = [r for r in raw["results"].values() if r["split"] == split]
        if not recs:
            continue
        lines += [f"## {split}", "",
                  "| generator | candidate | own converged | worst own (x line) | line | real median | real lowest "
                  "| real under line | s/own | s/real | authors s/img | x authors own | x authors real "
                  "| x authors mean | row-steps own / real |",
                  "|" + "---|" * 15]
        for rec in recs:
            for cname, r in rec["candidates"].items():
                q = ratios(rec, r, r["own_n"], len(r["real_losses"]))
                w, c = q["wall"], q["cpu"]
                lines.append(
                    f"| {rec['generator']} | {cname} | {r['own_converged']}/{r['own_n']} "
                    f"| {r['own_worst']:.2e} ({r['own_worst_ratio']:.3g}x) | {rec['line']:.2e} "
                    f"| {r['real_median']:.2e} | {r['real_min']:.2e} | {r['real_under_line']}/{len(r['real_losses'])} "
                    f"| {w['own_s']:.2f} | {w['real_s']:.2f} | {w['authors']:.2f} "
                    f"| {w['own']:.2f} ({c['own']:.2f}) | {w['real']:.2f} ({c['real']:.2f}) "
                    f"| **{w['mean']:.2f}** ({c['mean']:.2f}) | {r['own_row_steps']:.0f} / {r['real_row_steps']:.0f} |")
        lines.append("")
        lines += ["| generator | real images | authors' loop: own converged, worst own (x line) | real median, lowest |",
                  "|---|---|---|---|"]
        for rec in recs:
            ar = rec["authors_real"]["losses"]
            ao = rec.get("authors_own", {}).get("losses", [])
            own_txt = (f"{sum(v < rec['line'] for v in ao)}/{len(ao)}, {max(ao):.2e} ({max(ao) / rec['line']:.3g}x)"
                       if ao else "not run")
            lines.append(f"| {rec['generator']} | {rec['real_source']} | {own_txt} "
                         f"| {statistics.median(ar):.2e}, {min(ar):.2e} |")
        lines.append("")
        lines += _channels_last_table(recs)
    enc = [(rec, cname, r) for rec in raw["results"].values() for cname, r in rec["candidates"].items()
           if r.get("encoder") and _trains_encoder(cname)]  # not trained: no row
    if enc:
        lines += ["## Encoders", "",
                  "Training cost of each warm start's encoder (samples generated and the encoder trained on one "
                  "thread, wall clock), and the images after which it has paid for itself: its training time over "
                  "the time the candidate saves per image against the candidate it adds to (the `against` "
                  "column: `default`, `mapped` for an encoder of `w`, or the one the candidate names), where that "
                  "ran too (the mean of the own and real images' seconds per image; \"never\" where it saves "
                  "none, \"none\" where it converges fewer own images).", "",
                  "| generator | candidate | encoder | samples | training s (wall) | against | s/img saved "
                  "| break-even images |", "|---|---|---|---|---|---|---|---|"]
        for rec, cname, r in enc:
            e = r["encoder"]
            base_name = CANDIDATES[cname].get("against") or ("mapped" if CANDIDATES[cname].get("w_encoder")
                                                             else "default")
            base = rec["candidates"].get(base_name)
            saved, even = "-", f"- ({base_name} not in this run)"
            if base is not None:
                per = lambda c: (c["own_wall"] / c["own_n"] + c["real_wall"] / len(c["real_losses"])) / 2  # noqa: E731
                d = per(base) - per(r)
                saved = f"{d:.2f}"
                even = f"{math.ceil(e.get('train_s', 0.0) / d)}" if d > 0 else "never"
                if r["own_converged"] < base["own_converged"]:
                    even = "none: fewer own images converged"
            lines.append(f"| {rec['generator']} | {cname} | {e.get('encoder', 'learned')} | {e.get('samples', 0)} "
                         f"| {e.get('train_s', 0.0):.0f} | {base_name} | {saved} "
                         f"| {even} |")
        lines.append("")
    return "\n".join(head + lines)


def _channels_last_table(recs: list[dict]) -> list[str]:
    """Where the authors' loop also ran on a channels-last copy: its time per image beside the
    model as given, and each candidate's mean ratio against both (wall clock, CPU in brackets)."""
    recs = [rec for rec in recs if "authors_cl" in rec]
    if not recs:
        return []
    lines = ["The authors' loop on the model as given and on a channels-last copy (`--authors-channels-last`: "
             "its 4-D weights in NHWC memory format, the same function; the same real and own images, after "
             "the candidates): seconds per image, and each candidate's **x authors mean** against each "
             "(a `-cl` candidate inverts a channels-last copy itself).", "",
             "| generator | candidate | authors s/img, as given | authors s/img, channels-last "
             "| authors' loop on the copy: own converged | x authors mean, as given "
             "| x authors mean, channels-last |", "|" + "---|" * 7]
    for rec in recs:
        ao = rec["authors_cl"]["own"]["losses"]
        own_txt = f"{sum(v < rec['line'] for v in ao)}/{len(ao)}" if ao else "not run"
        for cname, r in rec["candidates"].items():
            n, n_real = r["own_n"], len(r["real_losses"])
            given, cl = ratios(rec, r, n, n_real), ratios(rec, r, n, n_real, channels_last=True)
            lines.append(f"| {rec['generator']} | {cname} | {given['wall']['authors']:.2f} "
                         f"| {cl['wall']['authors']:.2f} | {own_txt} "
                         f"| {given['wall']['mean']:.2f} ({given['cpu']['mean']:.2f}) "
                         f"| **{cl['wall']['mean']:.2f}** ({cl['cpu']['mean']:.2f}) |")
    return lines + [""]


#: arguments a resumed run must share with the run it continues
_SAME = ("n", "n_real", "seed", "authors_own", "authors_steps")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--suite", choices=("tuning", "held-out", "all"), default="tuning")
    p.add_argument("--generators", default="", help="comma-separated subset of the suite's generators")
    p.add_argument("--candidates", default="default", help=f"comma-separated from {sorted(CANDIDATES)}")
    p.add_argument("--n", type=int, default=16, help="own images per generator")
    p.add_argument("--n-real", type=int, default=8, help="real images per generator")
    p.add_argument("--authors-own", type=int, default=8, help="own images the authors' loop also inverts (after the candidates)")
    p.add_argument("--authors-steps", type=int, default=1500, help="the authors' loop's steps (1500, the paper's; "
                   "fewer only to try the benchmark out: its ratios and line then mean nothing)")
    p.add_argument("--authors-channels-last", action="store_true",
                   help="also run the authors' loop on a channels-last copy of each generator (after the candidates)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--encoders", type=Path, default=None, help="folder to keep and reuse trained encoders in")
    p.add_argument("--out", type=Path, required=True, help="Markdown table; the .json beside it has every loss")
    p.add_argument("--resume", action="store_true", help="keep what --out's .json holds and run the rest")
    p.add_argument("--render", action="store_true", help="only write --out again from the .json beside it")
    p.add_argument("--load-note", default=None, help="a sentence on the machine's load during the run, kept in the .json")
    a = p.parse_args(argv)
    if a.render:
        raw = json.loads(a.out.with_suffix(".json").read_text())
        if a.load_note is not None:
            raw["load_note"] = a.load_note
            write_text(a.out.with_suffix(".json"), json.dumps(raw, indent=1))
        write_text(a.out, render(raw))
        return 0
    from ronan_fast.zoo import benchmark_models

    torch.set_num_threads(a.threads)
    names = [c for c in a.candidates.split(",") if c]
    for c in names:
        if c not in CANDIDATES:
            p.error(f"--candidates: unknown {c!r}; choose from {sorted(CANDIDATES)}")
    gens = benchmark_models(None if a.suite == "all" else a.suite)
    if a.generators:
        want = [g for g in a.generators.split(",") if g]
        bad = [g for g in want if g not in gens]
        if bad:
            p.error(f"--generators: {bad} not in the {a.suite} suite {gens}")
        gens = want
    json_out = a.out.with_suffix(".json")
    args = {k: str(v) for k, v in vars(a).items() if k not in ("resume", "out", "candidates", "generators")}
    raw = {"machine": machine(), "args": args, "command": "python -m bench.heldout " + " ".join(sys.argv[1:] if argv is None else argv),
           "platform": platform.platform(), "results": {}}
    if a.resume and json_out.is_file():
        old = json.loads(json_out.read_text())
        if {k: old["args"].get(k) for k in _SAME} != {k: args[k] for k in _SAME}:
            p.error(f"--resume: {json_out} was written with other n/n_real/seed/authors_own: {old['args']}")
        raw["results"] = old["results"]
        raw["command"] = old.get("command", "") + " ; --resume: " + raw["command"]

    def save() -> None:
        write_text(json_out, json.dumps(raw, indent=1))

    for g in gens:
        run_generator(g, a, names, raw["results"], save)
        write_text(a.out, render(raw))
    print(render(raw))
    return 0


if __name__ == "__main__":
    sys.exit(main())
