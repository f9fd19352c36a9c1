"""The inversion step's own work, outside the generator: fused kernels and their reference twins.

Each op has a short plain-PyTorch reference (``*_ref``) that is its specification, and a
dispatcher taking ``impl="auto" | "ext" | "ref"``. ``auto`` runs the compiled extension where
it was built for the tensor's device and the reference elsewhere, warning once.

The ops know nothing of generators or statistics:

* :func:`recon_loss_grad` -- per-row reconstruction loss and the gradient of the weighted loss
  with respect to the prediction, in one pass. Rows map to targets through ``index`` so that
  R restarts of one image share its target without copies.
* :func:`latent_adam_step_` -- in-place Adam over latent rows with per-row step, learning rate
  and active mask, tracking each row's best loss and best latent in the same pass.
* :func:`best_over_restarts` -- for each target, the lowest best-loss among its rows and the row.
"""

from __future__ import annotations

import warnings
import weakref
from typing import Literal

import torch
from torch import Tensor

from ronan_fast import _ext

Impl = Literal["auto", "ext", "ref"]
METRICS = ("mse", "mae")
_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_warned: set[str] = set()


# --------------------------------------------------------------------------- checks


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


def _check_recon_args(pred: Tensor, target: Tensor, index: Tensor, weight: Tensor, metric: str) -> None:
    _check(metric in METRICS, f"metric must be one of {METRICS}, got {metric!r}")
    _check(pred.dim() == 4, f"pred must be [M, C, H, W], got shape {tuple(pred.shape)}")
    _check(target.dim() == 4, f"target must be [B, C, H, W], got shape {tuple(target.shape)}")
    _check(pred.dtype in _FLOAT_DTYPES, f"pred must be float32, bfloat16 or float16, got {pred.dtype}")
    _check(target.dtype in _FLOAT_DTYPES, f"target must be float32, bfloat16 or float16, got {target.dtype}")
    _check(
        pred.shape[1:] == target.shape[1:],
        f"pred {tuple(pred.shape)} and target {tuple(target.shape)} differ in [C, H, W]",
    )
    _check(pred.shape[1:].numel() > 0, f"pred must have C*H*W > 0, got shape {tuple(pred.shape)}")
    m = pred.shape[0]
    _check(index.dim() == 1 and index.shape[0] == m, f"index must be [M]=[{m}], got shape {tuple(index.shape)}")
    _check(index.dtype == torch.int64, f"index must be int64, got {index.dtype}")
    _check(weight.dim() == 1 and weight.shape[0] == m, f"weight must be [M]=[{m}], got shape {tuple(weight.shape)}")
    _check(weight.dtype == torch.float32, f"weight must be float32, got {weight.dtype}")
    for name, t in (("target", target), ("index", index), ("weight", weight)):
        _check(t.device == pred.device, f"{name} is on {t.device} but pred is on {pred.device}")
    _check_index_range("recon_loss_grad", index, target.shape[0])


# The last index tensor each op found in range: (weak reference, version counter, bound).
_index_seen: dict[str, tuple[weakref.ref, int, int]] = {}


def _check_index_range(op: str, index: Tensor, bound: int) -> None:
    """Every value of ``index`` lies in ``[0, bound)``.

    Reading the range of a CUDA tensor waits for the device, and an inversion passes the same
    index tensor at every step: a tensor found in range is not read again while it is the same
    object with the same version counter (any in-place write bumps it). The CUDA kernels guard
    each row as well, so a value changed behind autograd's back cannot read out of bounds.
    """
    if not index.numel():
        return
    try:
        version = index._version
    except RuntimeError:  # inference tensors have no version counter
        version = None
    seen = _index_seen.get(op)
    if version is not None and seen is not None and seen[0]() is index and seen[1:] == (version, bound):
        return
    lo, hi = torch.stack(torch.aminmax(index)).tolist()
    _check(lo >= 0 and hi < bound, f"index values must lie in [0, {bound}), got range [{lo}, {hi}]")
    if version is not None:
        _index_seen[op] = (weakref.ref(index), version, bound)


def _check_adam_args(
    latent: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    step: Tensor,
    lr: Tensor,
    active: Tensor,
    loss: Tensor,
    best_loss: Tensor,
    best_latent: Tensor,
    beta1: float,
    beta2: float,
    eps: float,
) -> None:
    _check(latent.dim() == 2, f"latent must be [M, D], got shape {tuple(latent.shape)}")
    m = latent.shape[0]
    for name, t in (("latent", latent), ("grad", grad), ("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq),
                    ("best_latent", best_latent)):
        _check(t.shape == latent.shape, f"{name} must have latent's shape {tuple(latent.shape)}, got {tuple(t.shape)}")
        _check(t.dtype == torch.float32, f"{name} must be float32, got {t.dtype}")
        _check(t.is_contiguous(), f"{name} must be contiguous")
        _check(t.device == latent.device, f"{name} is on {t.device} but latent is on {latent.device}")
    for name, t, dt in (("step", step, torch.int64), ("lr", lr, torch.float32), ("active", active, torch.bool),
                        ("loss", loss, torch.float32), ("best_loss", best_loss, torch.float32)):
        _check(t.dim() == 1 and t.shape[0] == m, f"{name} must be [M]=[{m}], got shape {tuple(t.shape)}")
        _check(t.dtype == dt, f"{name} must be {dt}, got {t.dtype}")
        _check(t.is_contiguous(), f"{name} must be contiguous")
        _check(t.device == latent.device, f"{name} is on {t.device} but latent is on {latent.device}")
    _check(0.0 <= beta1 < 1.0, f"beta1 must lie in [0, 1), got {beta1}")
    _check(0.0 <= beta2 < 1.0, f"beta2 must lie in [0, 1), got {beta2}")
    _check(eps > 0.0, f"eps must be > 0, got {eps}")


# --------------------------------------------------------------------------- references


def recon_loss_grad_ref(
    pred: Tensor, target: Tensor, index: Tensor, weight: Tensor, metric: str = "mse"
) -> tuple[Tensor, Tensor]:
    """Reference: ``loss[m] = mean((pred[m] - target[index[m]])**p)`` and ``grad = d(sum_m weight[m] * loss[m]) / d pred``.

    ``p`` is 2 for ``mse`` and the absolute value for ``mae`` (whose gradient at 0 is 0). The
    loss is float32 (float64 if ``pred`` is float64, used by the tests); ``grad`` has ``pred``'s dtype
    and is exactly 0 on rows whose weight is 0.
    """
    acc = torch.float64 if pred.dtype == torch.float64 else torch.float32
    diff = pred.to(acc) - target.to(acc)[index]
    n = diff[0].numel() if diff.shape[0] else 1
    w = weight.to(acc).view(-1, *([1] * (pred.dim() - 1)))
    if metric == "mse":
        loss = diff.square().flatten(1).mean(1)
        grad = diff * (2.0 / n) * w
    elif metric == "mae":
        loss = diff.abs().flatten(1).mean(1)
        grad = diff.sign() * (1.0 / n) * w
    else:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    # A frozen row's gradient is 0 even where its difference is not finite (0 * inf is NaN).
    grad = torch.where(w == 0, torch.zeros_like(grad), grad)
    return loss, grad.to(pred.dtype)


def latent_adam_step_ref_(
    latent: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    step: Tensor,
    lr: Tensor,
    active: Tensor,
    loss: Tensor,
    best_loss: Tensor,
    best_latent: Tensor,
    beta1: float = 0.9,
    beta2: float = 0.999,
    eps: float = 1e-8,
) -> None:
    """Reference: one ``torch.optim.Adam`` step on each active row, in place.

    ``loss[m]`` is the loss of ``latent[m]`` as it is before this step (the one ``grad`` was
    taken at). For an active row whose ``loss`` is below ``best_loss``, ``best_loss`` takes it and
    ``best_latent`` takes the row before the update. Then, for active rows only::

        step += 1
        m = beta1 * m + (1 - beta1) * g
        v = beta2 * v + (1 - beta2) * g * g
        latent -= lr / (1 - beta1**step) * m / (sqrt(v) / sqrt(1 - beta2**step) + eps)

    Frozen rows (``active`` false) are left untouched, moments and step included. A NaN loss
    never counts as an improvement.
    """
    act = active.view(-1, 1)
    better = active & (loss < best_loss)
    best_loss.copy_(torch.where(better, loss, best_loss))
    best_latent.copy_(torch.where(better.view(-1, 1), latent, best_latent))

    new_step = step + active.to(step.dtype)
    m = beta1 * exp_avg + (1 - beta1) * grad
    v = beta2 * exp_avg_sq + (1 - beta2) * grad * grad
    # Bias corrections in float64, as torch.optim.Adam computes them from Python floats: in
    # float32, 1 - beta2**t loses ~1e-5 of its value at small t.
    t = new_step.to(torch.float64).clamp_min(1).view(-1, 1)
    step_size = (lr.to(torch.float64).view(-1, 1) / (1 - beta1**t)).to(latent.dtype)
    bc2_sqrt = (1 - beta2**t).sqrt().to(latent.dtype)
    denom = v.sqrt() / bc2_sqrt + eps
    upd = latent - step_size * (m / denom)
    latent.copy_(torch.where(act, upd, latent))
    exp_avg.copy_(torch.where(act, m, exp_avg))
    exp_avg_sq.copy_(torch.where(act, v, exp_avg_sq))
    step.copy_(new_step)


def best_over_restarts_ref(best_loss: Tensor, index: Tensor, num_targets: int) -> tuple[Tensor, Tensor]:
    """Reference: for each target ``b``, ``min`` of ``best_loss[m]`` over rows with ``index[m] == b`` and the row.

    Ties go to the lowest row; NaN losses never win; a target with no finite row gets ``inf``
    and row ``-1``.
    """
    m = best_loss.shape[0]
    finite = torch.where(torch.isfinite(best_loss), best_loss, torch.full_like(best_loss, float("inf")))
    out_loss = torch.full((num_targets,), float("inf"), dtype=best_loss.dtype, device=best_loss.device)
    out_loss = out_loss.scatter_reduce(0, index, finite, "amin", include_self=True)
    wins = torch.isfinite(finite) & (finite == out_loss[index])
    rows = torch.where(wins, torch.arange(m, device=index.device), torch.full_like(index, m))
    out_row = torch.full((num_targets,), m, dtype=torch.int64, device=index.device)
    out_row = out_row.scatter_reduce(0, index, rows, "amin", include_self=True)
    return out_loss, torch.where(out_row == m, torch.full_like(out_row, -1), out_row)


# --------------------------------------------------------------------------- dispatch


def _use_ext(impl: Impl, device: torch.device, op: str) -> bool:
    if impl == "ref":
        return False
    available = _ext.has_device(device)
    if impl == "ext":
        if not available:
            raise RuntimeError(
                f"impl='ext' asked for {op} on {device}, but ronan_fast._C was not built for it: "
                f"{_ext.why_unavailable(device)}"
            )
        return True
    if impl != "auto":
        raise ValueError(f"impl must be 'auto', 'ext' or 'ref', got {impl!r}")
    if not available:
        key = f"{op}:{device.type}"
        if key not in _warned:
            _warned.add(key)
            warnings.warn(
                f"ronan_fast: {op} runs the plain PyTorch reference on {device.type} "
                f"({_ext.why_unavailable(device)})",
                RuntimeWarning,
                stacklevel=3,
            )
    return available


def recon_loss_grad(
    pred: Tensor, target: Tensor, index: Tensor, weight: Tensor, metric: str = "mse", impl: Impl = "auto"
) -> tuple[Tensor, Tensor]:
    """Per-row loss ``[M]`` (float32) and gradient of the weighted loss w.r.t. ``pred`` (``pred``'s dtype).

    ``pred`` ``[M, C, H, W]`` float32/bfloat16/float16; ``target`` ``[B, C, H, W]``; ``index``
    ``[M]`` int64 row-to-target; ``weight`` ``[M]`` float32 (0 freezes a row: its gradient is 0).
    See :func:`recon_loss_grad_ref` for the exact definition.
    """
    _check_recon_args(pred, target, index, weight, metric)
    if _use_ext(impl, pred.device, "recon_loss_grad"):
        return torch.ops.ronan_fast.recon_loss_grad(
            pred.contiguous(), target.contiguous(), index.contiguous(), weight.contiguous(), metric
        )
    return recon_loss_grad_ref(pred, target, index, weight, metric)


def latent_adam_step_(
    latent: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    step: Tensor,
    lr: Tensor,
    active: Tensor,
    loss: Tensor,
    best_loss: Tensor,
    best_latent: Tensor,
    beta1: float = 0.9,
    beta2: float = 0.999,
    eps: float = 1e-8,
    impl: Impl = "auto",
) -> None:
    """In-place Adam on active latent rows with best-row tracking; see :func:`latent_adam_step_ref_`."""
    args = (latent, grad, exp_avg, exp_avg_sq, step, lr, active, loss, best_loss, best_latent)
    _check_adam_args(*args, beta1, beta2, eps)
    if _use_ext(impl, latent.device, "latent_adam_step_"):
        torch.ops.ronan_fast.latent_adam_step_(*args, float(beta1), float(beta2), float(eps))
    else:
        latent_adam_step_ref_(*args, beta1, beta2, eps)


def best_over_restarts(
    best_loss: Tensor, index: Tensor, num_targets: int, impl: Impl = "auto"
) -> tuple[Tensor, Tensor]:
    """``(loss [B], row [B])``: each target's lowest row loss and that row; see :func:`best_over_restarts_ref`."""
    _check(best_loss.dim() == 1, f"best_loss must be [M], got shape {tuple(best_loss.shape)}")
    _check(best_loss.dtype == torch.float32, f"best_loss must be float32, got {best_loss.dtype}")
    _check(index.shape == best_loss.shape, f"index must be [M]=[{best_loss.shape[0]}], got {tuple(index.shape)}")
    _check(index.dtype == torch.int64, f"index must be int64, got {index.dtype}")
    _check(index.device == best_loss.device, f"index is on {index.device} but best_loss is on {best_loss.device}")
    _check(num_targets >= 0, f"num_targets must be >= 0, got {num_targets}")
    _check_index_range("best_over_restarts", index, num_targets)
    if _use_ext(impl, best_loss.device, "best_over_restarts"):
        return torch.ops.ronan_fast.best_over_restarts(best_loss.contiguous(), index.contiguous(), int(num_targets))
    return best_over_restarts_ref(best_loss, index, num_targets)


# --------------------------------------------------------------------------- fake kernels

# Shapes and dtypes of the outputs without computing them, for torch.compile and opcheck. The
# schemas are defined by ronan_fast._C, which names this module as the place of these kernels.
if _ext._C is not None:

    @torch.library.register_fake("ronan_fast::recon_loss_grad")
    def _recon_loss_grad_fake(pred: Tensor, target: Tensor, index: Tensor, weight: Tensor, metric: str):
        loss = pred.new_empty((pred.shape[0],), dtype=torch.float32)
        return loss, torch.empty_like(pred, memory_format=torch.contiguous_format)

    @torch.library.register_fake("ronan_fast::latent_adam_step_")
    def _latent_adam_step_fake(*args) -> None:
        return None

    @torch.library.register_fake("ronan_fast::best_over_restarts")
    def _best_over_restarts_fake(best_loss: Tensor, index: Tensor, num_targets: int):
        return best_loss.new_empty((num_targets,)), index.new_empty((num_targets,))
