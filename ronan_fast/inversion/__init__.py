"""Input reverse-engineering (Eq. 1): i* = argmin_i L(M(i), x), batched over images and restarts.

Every image gets several starts (rows); all rows of a chunk of images run as one batch: the
generator's forward, the fused loss-and-gradient kernel, the generator's backward, and the
fused Adam step with best-row tracking. Rows stop once their image is under its belonging
threshold, once they stop improving, or when successive halving drops them; the best input of
each image is then polished by second-order steps and scored in float32.

The modules follow the algorithm:

* :mod:`~ronan_fast.inversion.settings` and :mod:`~ronan_fast.inversion.presets` -- what
  shapes an inversion, and the named and per-family settings;
* :mod:`~ronan_fast.inversion.api` -- :func:`invert`, the entry point;
* :mod:`~ronan_fast.inversion.batched` -- chunks of images, each one batch of rows;
* :mod:`~ronan_fast.inversion.starts` -- each image's starting latents;
* :mod:`~ronan_fast.inversion.problem` -- a chunk's images, rows and reconstruction loss;
* :mod:`~ronan_fast.inversion.rows` -- the batch's row state (admit, compact);
* :mod:`~ronan_fast.inversion.adam` and :mod:`~ronan_fast.inversion.stopping` -- the Adam
  phase (schedule, steps) and its stopping rules (threshold, patience, halving);
* :mod:`~ronan_fast.inversion.finish` -- best starts, the polish, escalation, the final score;
* :mod:`~ronan_fast.inversion.polish` -- the polish methods (dense Levenberg-Marquardt, CG, GMRES);
* :mod:`~ronan_fast.inversion.stagewise` -- multi-step samplers inverted step by step;
* :mod:`~ronan_fast.inversion.budget` and :mod:`~ronan_fast.inversion.runtime` -- rows in
  flight, and how it runs on its device (denormals, autocast, compile, CUDA graphs).
"""

from __future__ import annotations

from ronan_fast.inversion.api import invert
from ronan_fast.inversion.budget import ADMITTED_BATCHES, CPU_CHUNK_ROWS, CPU_CHUNK_SAVED_BYTES
from ronan_fast.inversion.presets import FALLBACK_DEFAULT, FAMILY_DEFAULTS, PRESETS, resolve_settings
from ronan_fast.inversion.result import InversionResult
from ronan_fast.inversion.settings import (
    POLISH_METHODS,
    PRECISIONS,
    SCHEDULES,
    THRESHOLD_FIELDS,
    TYPICAL_SET,
    InversionSettings,
)

__all__ = [
    "InversionSettings", "InversionResult", "invert", "resolve_settings", "PRESETS", "FAMILY_DEFAULTS",
    "FALLBACK_DEFAULT", "THRESHOLD_FIELDS", "PRECISIONS", "SCHEDULES", "TYPICAL_SET", "POLISH_METHODS",
    "ADMITTED_BATCHES", "CPU_CHUNK_ROWS", "CPU_CHUNK_SAVED_BYTES",
]
