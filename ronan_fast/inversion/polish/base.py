"""The interface every polish method implements.

A polish takes each image's best inputs from the Adam phase further by second-order steps on
the least-squares problem ``min_z |G(z) - x|^2`` (raw output units). A method is a small object:
``method(generator, inputs, cond, target_raw, steps, leaving, report=None, clip=None)``
polishes rows ``inputs [n, D]`` (conditions ``cond`` or None) towards ``target_raw [n, ...]``
for at most ``steps`` steps, rows leaving as :class:`~ronan_fast.inversion.polish.leaving.Leaving`
says, and returns a :class:`PolishResult`; with ``clip`` (a
:class:`~ronan_fast.inversion.clipped.ClippedPixels` of the ``n`` rows' images) the residual at
a clipped pixel counts one-sided. ``report(k, mse)``, if given, is called after step ``k``
with every row's mean squared residual (rows that left keep their last value).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple, Protocol

from torch import Tensor

from ronan_fast.adapters import GeneratorAdapter
from ronan_fast.inversion.clipped import ClippedPixels
from ronan_fast.inversion.polish.leaving import Leaving

__all__ = ["PolishMethod", "PolishResult", "Report"]

#: ``report(k, mse)``: after polish step ``k``, every row's mean squared residual
Report = Callable[[int, Tensor], None]


class PolishResult(NamedTuple):
    inputs: Tensor  # [n, D] the polished inputs
    mse: Tensor  # [n] each row's mean squared residual at them (raw units)


class PolishMethod(Protocol):
    #: the loss names the method solves (least squares: "mse", or the tone-fitted "mse-tone")
    def accepts(self, metric: str) -> bool: ...

    def __call__(self, generator: GeneratorAdapter, inputs: Tensor, cond: Tensor | None, target_raw: Tensor,
                 steps: int, leaving: Leaving, report: Report | None = None,
                 clip: ClippedPixels | None = None) -> PolishResult: ...
