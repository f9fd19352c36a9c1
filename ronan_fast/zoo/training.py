"""What every zoo recipe's training shares: the recipe record, the log, the seed and step count
a run takes from the command line, the training record's common fields, and the step loop with
its moving average of the losses and its wall-clock cap.

The recipe modules (:mod:`~ronan_fast.zoo.train`, :mod:`~ronan_fast.zoo.train64`,
:mod:`~ronan_fast.zoo.train_aekl`, :mod:`~ronan_fast.zoo.train_diffusion`) import it; it imports
none of them.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, nn

__all__ = ["Recipe", "log", "seed_steps", "base_info", "train_steps", "n_params"]


def log(msg: str) -> None:
    print(msg, flush=True)


@dataclass
class Recipe:
    name: str
    description: str
    run: Callable[["Recipe", argparse.Namespace], dict[str, Any]]
    steps: int
    seed: int
    out: Path
    grid: list[Path] = field(default_factory=list)
    params: dict[str, Any] = field(default_factory=dict)


def seed_steps(recipe: Recipe, args: argparse.Namespace) -> tuple[int, int, float | None]:
    seed = args.seed if args.seed is not None else recipe.seed
    steps = args.steps if args.steps is not None else recipe.steps
    return seed, steps, (args.minutes * 60 if args.minutes else None)


def base_info(recipe: Recipe, seed: int, steps: int, x: Tensor) -> dict[str, Any]:
    return {"recipe": recipe.name, "description": recipe.description, "seed": seed, "steps": steps,
            "threads": torch.get_num_threads(), "torch": torch.__version__, "train_images": int(x.shape[0])}


def train_steps(steps: int, cap: float | None, step: Callable[[], tuple[float, ...]],
                report: Callable[[int, tuple[float, ...], float], None],
                every: int = 250) -> tuple[tuple[float, ...], int, float]:
    """Call ``step()`` (one optimiser step; returns its losses as floats) for steps 1 to ``steps``.

    Keeps an exponential moving average of the losses (0.02 on the newest), calls
    ``report(step, average, seconds so far)`` every ``every`` steps and after the last, and
    stops early, saying so, once ``cap`` seconds (the ``--minutes`` cap) have passed. Returns
    the average, the number of steps done and the seconds they took.
    """
    t0 = time.perf_counter()
    ema: tuple[float, ...] | None = None
    done = 0
    for i in range(1, steps + 1):
        cur = step()
        ema = cur if ema is None else tuple(0.98 * a + 0.02 * b for a, b in zip(ema, cur))
        done = i
        el = time.perf_counter() - t0
        if i % every == 0 or i == steps:
            report(i, ema, el)
        if cap is not None and el > cap:
            log(f"stopping at step {i}: wall-clock cap reached")
            break
    return ema, done, time.perf_counter() - t0


def n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())
