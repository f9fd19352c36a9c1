"""Second-order polishes of the Adam phase's best inputs, one module per method.

* :class:`~ronan_fast.inversion.polish.dense.DenseLM` -- Levenberg-Marquardt with dense
  Jacobians (``polish_method="dense"``, reverse mode ``"dense-rev"``); MSE and the tone-fitted MSE.
* :class:`~ronan_fast.inversion.polish.cg.ConjugateGradientLM` -- matrix-free
  Levenberg-Marquardt by conjugate gradients (``"cg"``), for latents as wide as the image.
* :class:`~ronan_fast.inversion.polish.gmres.GMRESGaussNewton` -- Gauss-Newton steps solved by
  GMRES (``polish_gmres_iters``), for square Jacobians; it runs before the last polish.

All follow :class:`~ronan_fast.inversion.polish.base.PolishMethod`; rows leave by the rules of
:class:`~ronan_fast.inversion.polish.leaving.Leaving`.
"""

from __future__ import annotations

from torch import Tensor

from ronan_fast.inversion.clipped import ClippedPixels
from ronan_fast.inversion.polish.base import PolishMethod, PolishResult, Report
from ronan_fast.inversion.polish.cg import ConjugateGradientLM
from ronan_fast.inversion.polish.dense import DenseLM
from ronan_fast.inversion.polish.gmres import GMRESGaussNewton, unsettled
from ronan_fast.inversion.polish.leaving import Leaving
from ronan_fast.inversion.settings import InversionSettings
from ronan_fast.metrics import ToneMSE

__all__ = ["PolishMethod", "PolishResult", "Leaving", "DenseLM", "ConjugateGradientLM", "GMRESGaussNewton",
           "last_polish", "polish", "unsettled"]


def last_polish(s: InversionSettings, tone: ToneMSE | None = None) -> PolishMethod:
    """The polish ``s.polish_method`` names ("dense", "dense-rev" or "cg")."""
    if s.polish_method == "cg":
        return ConjugateGradientLM(cg_iters=s.polish_cg_iters)
    return DenseLM(reverse=s.polish_method == "dense-rev", tone=tone, reuse=s.polish_reuse,
                   precision=s.polish_precision)


def polish(method: PolishMethod, generator, inputs: Tensor, cond: Tensor | None, target_raw: Tensor, steps: int,
           *, metric: str = "mse", patience: int = 0, min_drop: float = 0.3, stop_raw: Tensor | None = None,
           group: Tensor | None = None, done_groups: Tensor | None = None, settle=None,
           report: Report | None = None, clip: ClippedPixels | None = None) -> Tensor:
    """Polish ``inputs`` with ``method`` under the leaving rules given (see
    :class:`~ronan_fast.inversion.polish.leaving.Leaving`); the inputs as they are when the
    method does not solve ``metric``; with ``clip`` (the rows' images' pixels at 0 or 1) the
    residual counts one-sided there."""
    if not method.accepts(metric):
        return inputs
    leaving = Leaving(inputs.shape[0], patience, min_drop, stop_raw, group, done_groups, settle)
    return method(generator, inputs, cond, target_raw, steps, leaving, report, clip=clip).inputs
