"""Reconstruction metrics for inversion: per-row losses between a generator's output and its target.

Every metric takes ``pred`` and ``target`` as ``[M, C, H, W]`` float tensors in [0, 1] (row ``m``
of ``target`` is row ``m``'s own target) and returns a differentiable ``[M]`` loss, lower meaning
a closer reconstruction. :func:`get_metric` maps a name to a metric object;
:func:`ronan_fast.inversion.invert` calls it for any name its fused kernels do not cover.

* :class:`MSE`, :class:`MAE` -- mean squared / absolute pixel error.
* :class:`ToneMSE` -- MSE after the best affine colour map of the prediction onto the target
  (fitted per row in closed form, clipped pixels handled): an image whose tones or colours were
  changed by an affine-looking filter (brightness, contrast, a tinted screen blend, saturation)
  still reconstructs to near zero.
* :class:`SSIMLoss` -- ``1 - SSIM`` (Wang et al. 2004) with an 11-tap Gaussian window, sigma 1.5.
* :class:`LPIPS` -- the LPIPS distance (Zhang et al. 2018) over a backbone the caller supplies;
  no backbone weights are bundled or downloaded.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["Metric", "MSE", "MAE", "ToneMSE", "SSIMLoss", "LPIPS", "get_metric", "METRIC_NAMES"]

#: the names :func:`get_metric` accepts
METRIC_NAMES = ("mse", "mae", "ssim", "mse-tone")


def check_pair(pred: object, target: object) -> None:
    """Raise a clear error unless ``pred`` and ``target`` are float ``[M, C, H, W]`` tensors of one shape and device."""
    for arg, t in (("pred", pred), ("target", target)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{arg} must be a float tensor [M, C, H, W], got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{arg} must be [M, C, H, W], got shape {tuple(t.shape)}")
        if not t.is_floating_point():
            raise ValueError(f"{arg} must be a float tensor in [0, 1], got {t.dtype}")
    assert isinstance(pred, Tensor) and isinstance(target, Tensor)
    if pred.shape != target.shape:
        raise ValueError(
            f"pred and target must have the same shape, got pred {tuple(pred.shape)} and target {tuple(target.shape)}"
        )
    if pred.device != target.device:
        raise ValueError(f"pred is on {pred.device} but target is on {target.device}")


class Metric(abc.ABC):
    """A per-row reconstruction loss: ``metric(pred, target) -> [M]``, differentiable in ``pred``.

    Subclasses implement :meth:`compute`; ``__call__`` checks the arguments first.
    """

    #: the name reports and inversion results use
    name: str = "metric"

    def __call__(self, pred: Tensor, target: Tensor) -> Tensor:
        check_pair(pred, target)
        return self.compute(pred, target)

    @abc.abstractmethod
    def compute(self, pred: Tensor, target: Tensor) -> Tensor:
        """The ``[M]`` loss for checked ``[M, C, H, W]`` inputs."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class MSE(Metric):
    """Mean squared error over C, H and W (as the fused "mse" kernel computes it in [0, 1] space)."""

    name = "mse"

    def compute(self, pred: Tensor, target: Tensor) -> Tensor:
        return (pred - target).flatten(1).square().mean(1)


class MAE(Metric):
    """Mean absolute error over C, H and W."""

    name = "mae"

    def compute(self, pred: Tensor, target: Tensor) -> Tensor:
        return (pred - target).flatten(1).abs().mean(1)


class ToneMSE(Metric):
    """MSE after the best affine colour map of ``pred`` onto ``target``, per row.

    For each row, each target channel c is modelled as an affine function of all C predicted
    channels at the same pixel, ``fit_c = sum_k A_ck pred_k + b_c`` (C = 1: one gain and one
    offset; C = 3: a 3 x 3 colour matrix and a bias), with ``A`` and ``b`` chosen in closed form
    to minimise the squared error: the loss is what no such map can explain. An edit made of
    per-pixel affine tone and colour changes (brightness, contrast, a screen blend with a
    constant colour, saturation, greyscale conversion of those) costs nothing beyond 8-bit
    rounding, so a model's own images, edited so, still reconstruct to near zero without the
    edit being known. A real image gains only ``C * (C + 1)`` free numbers against ``C * H * W``
    pixels.

    Edits clip at the ends of the range (a brightened white stays 1). Target pixels within half
    an 8-bit step of 0 or 1 are therefore treated as clipped: they are left out of the fit and
    cost only if the fitted value is on the wrong side (below 1 where the target is 1, above 0
    where it is 0). The fit is ridge-regularised towards the identity map (``ridge`` times the
    number of pixels), which keeps it defined for flat or fully clipped images and moves an
    exact affine fit by a relative ``ridge / var(pred)`` (with the default, a gain of 1.25 on a
    28 x 28 image leaves about 2e-16, far under 8-bit rounding's 1e-6). The map is
    differentiable in ``pred`` (the solve of a ``(C + 1) x (C + 1)`` system per row and channel
    runs in float64).

    Args:
        ridge: pull towards the identity map per pixel (default 1e-8); 0 disables it, and
            then a flat prediction has no unique fit (the solve then fails).
    """

    name = "mse-tone"

    def __init__(self, ridge: float = 1e-8) -> None:
        if isinstance(ridge, bool) or not isinstance(ridge, (int, float)) or not 0 <= ridge < float("inf"):
            raise ValueError(f"ridge must be a finite number >= 0, got {ridge!r}")
        self.ridge = float(ridge)

    def __repr__(self) -> str:
        return f"ToneMSE(ridge={self.ridge})"

    def fit(self, pred: Tensor, target: Tensor) -> Tensor:
        """The fitted image ``A pred + b`` per row (``[M, C, H, W]``, float64), unclipped."""
        check_pair(pred, target)
        return self._fit(pred, target)[0].view(pred.shape)

    def _fit(self, pred: Tensor, target: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        c = pred.shape[1]
        y = pred.double().flatten(2)  # [M, C, P]
        x = target.double().flatten(2)
        p = y.shape[2]
        half_step = 0.5 / 255.0
        low, high = x <= half_step, x >= 1.0 - half_step
        inside = ~(low | high)  # [M, C, P]: the pixels each target channel's map is fitted on
        feats = torch.cat([y, torch.ones_like(y[:, :1])], dim=1)  # [M, C + 1, P]
        w = inside.double()
        # normal equations per row and target channel: (F W_c F^T + lam I) beta_c = F W_c x_c + lam e_c
        fw = feats.unsqueeze(1) * w.unsqueeze(2)  # [M, C, C + 1, P]
        gram = fw @ feats.transpose(1, 2).unsqueeze(1)  # [M, C, C + 1, C + 1]
        rhs = (fw * x.unsqueeze(2)).sum(-1)  # [M, C, C + 1]
        lam = self.ridge * p
        eye = torch.eye(c + 1, dtype=torch.float64, device=pred.device)
        identity = eye[:c]  # channel c's identity map: coefficient 1 on pred_c, 0 elsewhere, no offset
        beta = torch.linalg.solve(gram + lam * eye, rhs + lam * identity)  # [M, C, C + 1]
        fitted = torch.einsum("mck,mkp->mcp", beta, feats)  # [M, C, P]
        return fitted, x, low, high, beta

    def residual(self, pred: Tensor, target: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(r, beta, active)`` for checked inputs: the per-pixel residual whose mean square is the
        loss (``[M, C, P]``, float64), the fitted map (``[M, C, C + 1]``: channel c's coefficients
        on the C predicted channels, then its offset) and where the residual depends on the fit
        (``[M, C, P]``: unclipped target pixels, and clipped ones the fit lands on the wrong side of)."""
        fitted, x, low, high, beta = self._fit(pred, target)
        diff = fitted - x
        wrong_side = (high & (diff < 0)) | (low & (diff > 0))
        active = ~(low | high) | wrong_side
        return torch.where(active, diff, torch.zeros_like(diff)), beta, active

    def compute(self, pred: Tensor, target: Tensor) -> Tensor:
        r = self.residual(pred, target)[0]
        return r.square().flatten(1).mean(1).to(pred.dtype)


def gaussian_window(size: int, sigma: float, dtype: torch.dtype = torch.float32, device=None) -> Tensor:
    """A normalised 1-D Gaussian of ``size`` taps centred on the middle tap."""
    coords = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    return (g / g.sum()).to(device=device, dtype=dtype)


class SSIMLoss(Metric):
    """``1 - SSIM`` per row: SSIM per channel averaged over the valid window positions, then over channels.

    The statistics are Gaussian-weighted local means, variances and covariance (population
    form) over ``win_size`` taps; windows are not padded, so an H x W image contributes
    ``(H - win_size + 1) x (W - win_size + 1)`` positions. This is the convention of
    ``pytorch_msssim.ssim`` and of ``skimage.metrics.structural_similarity`` with
    ``gaussian_weights=True, sigma=1.5, use_sample_covariance=False``.

    Args:
        win_size: odd window width (default 11); images must be at least this large.
        sigma: standard deviation of the Gaussian window in pixels.
        k1, k2: the stabilising constants; ``C1 = (k1 * data_range)**2``, ``C2 = (k2 * data_range)**2``.
        data_range: the span of pixel values (1 for images in [0, 1]).
    """

    name = "ssim"

    def __init__(
        self, win_size: int = 11, sigma: float = 1.5, k1: float = 0.01, k2: float = 0.03, data_range: float = 1.0
    ) -> None:
        if not isinstance(win_size, int) or isinstance(win_size, bool) or win_size < 1 or win_size % 2 == 0:
            raise ValueError(f"win_size must be an odd integer >= 1, got {win_size!r}")
        for arg, v in (("sigma", sigma), ("k1", k1), ("k2", k2), ("data_range", data_range)):
            if not isinstance(v, (int, float)) or not v > 0 or v == float("inf"):
                raise ValueError(f"{arg} must be a finite number > 0, got {v!r}")
        self.win_size = win_size
        self.sigma = float(sigma)
        self.c1 = (k1 * data_range) ** 2
        self.c2 = (k2 * data_range) ** 2
        self.k1, self.k2, self.data_range = float(k1), float(k2), float(data_range)

    def __repr__(self) -> str:
        return (f"SSIMLoss(win_size={self.win_size}, sigma={self.sigma}, k1={self.k1}, k2={self.k2}, "
                f"data_range={self.data_range})")

    def ssim(self, pred: Tensor, target: Tensor) -> Tensor:
        """The SSIM index per row, ``[M]`` (1 for identical images)."""
        check_pair(pred, target)
        m, c, h, w = pred.shape
        if h < self.win_size or w < self.win_size:
            raise ValueError(f"SSIM with win_size={self.win_size} needs images at least {self.win_size}x{self.win_size}, "
                             f"got {h}x{w} (H x W)")
        # Local second moments lose precision to cancellation in half precision.
        dtype = torch.float64 if pred.dtype == torch.float64 else torch.float32
        x, y = pred.to(dtype), target.to(dtype)
        stack = torch.cat([x, y, x * x, y * y, x * y], dim=1)  # [M, 5C, H, W]
        g = gaussian_window(self.win_size, self.sigma, dtype, x.device)
        groups = stack.shape[1]
        stack = F.conv2d(stack, g.view(1, 1, 1, -1).expand(groups, 1, 1, -1), groups=groups)
        stack = F.conv2d(stack, g.view(1, 1, -1, 1).expand(groups, 1, -1, 1), groups=groups)
        mu_x, mu_y, exx, eyy, exy = stack.split(c, dim=1)
        mu_xx, mu_yy, mu_xy = mu_x * mu_x, mu_y * mu_y, mu_x * mu_y
        var_x, var_y, cov = exx - mu_xx, eyy - mu_yy, exy - mu_xy
        luminance = (2 * mu_xy + self.c1) / (mu_xx + mu_yy + self.c1)
        contrast_structure = (2 * cov + self.c2) / (var_x + var_y + self.c2)
        per_channel = (luminance * contrast_structure).flatten(2).mean(2)  # [M, C]
        return per_channel.mean(1)

    def compute(self, pred: Tensor, target: Tensor) -> Tensor:
        return 1.0 - self.ssim(pred, target)


class LPIPS(Metric):
    """The LPIPS distance over a caller-supplied feature backbone.

    For each used layer l with features ``f_l`` (``[M, C_l, H_l, W_l]``): unit-normalise the
    features along channels, take the squared difference between pred and target, weight
    channels by ``w_l`` (all ones when no weights are given, i.e. a channel sum), average over
    space; the distance is the sum over layers. Inputs are mapped from [0, 1] to [-1, 1] before
    the backbone, as LPIPS does; an ImageNet-style input normalisation, if the backbone needs
    one, belongs inside the backbone.

    Args:
        backbone: a module mapping ``[N, C, H, W]`` images in [-1, 1] to a list/tuple of feature
            maps, a dict of them, or a single feature map. It is put in eval mode and its
            parameters are frozen (in place); it is moved to the inputs' device when needed.
        layers: which outputs to use: indices into a list/tuple or keys of a dict. Default: all.
        weights: per used layer, non-negative channel weights (a tensor with ``C_l`` elements,
            e.g. LPIPS's ``lin`` 1x1 conv weights of shape ``[1, C_l, 1, 1]``); a dict keyed by
            layer for dict outputs. Default: unweighted.
        in_channels: channels the backbone takes; found from its first ``Conv2d`` when omitted.
        repeat_grey: repeat single-channel images to 3 channels when the backbone takes 3.
        eps: added to the feature norm before dividing (LPIPS uses 1e-10).
    """

    name = "lpips"

    def __init__(
        self,
        backbone: nn.Module,
        layers: Sequence[int | str] | None = None,
        weights: Sequence[Tensor] | Mapping[str, Tensor] | None = None,
        *,
        in_channels: int | None = None,
        repeat_grey: bool = True,
        eps: float = 1e-10,
    ) -> None:
        if not isinstance(backbone, nn.Module):
            raise TypeError(f"backbone must be a torch.nn.Module, got {type(backbone).__name__}")
        backbone.eval()
        for p in backbone.parameters():
            p.requires_grad_(False)
        self.backbone = backbone
        self.layers = None if layers is None else list(layers)
        if self.layers is not None and not self.layers:
            raise ValueError("layers must name at least one layer (or be None for all)")
        self.weights: list[Tensor] | dict[str, Tensor] | None = None
        if weights is not None:
            if isinstance(weights, Mapping):
                self.weights = {k: self._check_weight(f"weights[{k!r}]", v) for k, v in weights.items()}
            else:
                self.weights = [self._check_weight(f"weights[{i}]", v) for i, v in enumerate(weights)]
                if self.layers is not None and len(self.weights) != len(self.layers):
                    raise ValueError(f"weights has {len(self.weights)} entries but layers names {len(self.layers)}")
        if in_channels is None:
            first_conv = next((mod for mod in backbone.modules() if isinstance(mod, nn.Conv2d)), None)
            in_channels = None if first_conv is None else first_conv.in_channels
        self.in_channels = in_channels
        self.repeat_grey = bool(repeat_grey)
        self.eps = float(eps)

    @staticmethod
    def _check_weight(arg: str, w: object) -> Tensor:
        t = torch.as_tensor(w).detach().flatten().float()
        if t.numel() == 0 or not bool(torch.isfinite(t).all()):
            raise ValueError(f"{arg} must be non-empty finite channel weights")
        if bool((t < 0).any()):
            raise ValueError(f"{arg} must be non-negative (LPIPS channel weights), got a minimum of {float(t.min()):.4g}")
        return t

    def __repr__(self) -> str:
        return f"LPIPS(backbone={type(self.backbone).__name__}, layers={self.layers}, weighted={self.weights is not None})"

    def _features(self, x: Tensor) -> list[tuple[object, Tensor]]:
        out = self.backbone(x)
        if isinstance(out, Tensor):
            items: list[tuple[object, Tensor]] = [(0, out)]
        elif isinstance(out, Mapping):
            items = list(out.items())
        elif isinstance(out, (list, tuple)):
            items = list(enumerate(out))
        else:
            raise TypeError(f"backbone must return a tensor, a list/tuple or a dict of feature maps, got {type(out).__name__}")
        if self.layers is not None:
            found = dict(items)
            missing = [k for k in self.layers if k not in found]
            if missing:
                raise ValueError(f"layers {missing} not among the backbone's outputs {list(found)}")
            items = [(k, found[k]) for k in self.layers]
        return items

    def _weight_for(self, i: int, key: object, channels: int, device, dtype) -> Tensor | None:
        if self.weights is None:
            return None
        if isinstance(self.weights, dict):
            if key not in self.weights:
                raise ValueError(f"no weights for layer {key!r}; weights has keys {list(self.weights)}")
            w = self.weights[key]  # type: ignore[index]
        else:
            if i >= len(self.weights):
                raise ValueError(f"weights has {len(self.weights)} entries but the backbone gave more layers")
            w = self.weights[i]
        if w.numel() != channels:
            raise ValueError(f"weights for layer {key!r} have {w.numel()} entries but the layer has {channels} channels")
        return w.to(device=device, dtype=dtype).view(1, -1, 1, 1)

    def compute(self, pred: Tensor, target: Tensor) -> Tensor:
        m, c = pred.shape[:2]
        if c == 1 and self.in_channels == 3 and self.repeat_grey:
            pred, target = pred.expand(-1, 3, -1, -1), target.expand(-1, 3, -1, -1)
            c = 3
        if self.in_channels is not None and c != self.in_channels:
            raise ValueError(f"the backbone takes {self.in_channels}-channel images, got {c} channels"
                             + ("" if c != 1 else " (repeat_grey=False)"))
        param = next(iter(self.backbone.parameters()), None)
        if param is not None and param.device != pred.device:
            self.backbone.to(pred.device)
        # One forward over pred and target together; eval mode keeps rows independent.
        both = torch.cat([pred, target]) * 2 - 1
        if param is not None and both.dtype != param.dtype:
            both = both.to(param.dtype)
        items = self._features(both)
        if self.weights is not None and not isinstance(self.weights, dict) and len(self.weights) != len(items):
            raise ValueError(f"weights has {len(self.weights)} entries but {len(items)} layers are used")
        total = pred.new_zeros(m, dtype=torch.float32)
        for i, (key, f) in enumerate(items):
            if not isinstance(f, Tensor) or f.dim() != 4 or f.shape[0] != 2 * m:
                got = tuple(f.shape) if isinstance(f, Tensor) else type(f).__name__
                raise ValueError(f"backbone layer {key!r} must be a [N, C, H, W] feature map for N={2 * m}, got {got}")
            f = f.float()
            # vector_norm's backward is defined (zero) where a feature vector is all zero.
            f = f / (torch.linalg.vector_norm(f, dim=1, keepdim=True) + self.eps)
            diff = (f[:m] - f[m:]).square()
            w = self._weight_for(i, key, f.shape[1], f.device, f.dtype)
            if w is not None:
                diff = diff * w
            total = total + diff.sum(1).flatten(1).mean(1)
        return total


_BY_NAME = {"mse": MSE, "mae": MAE, "ssim": SSIMLoss, "mse-tone": ToneMSE}


def get_metric(spec: str | Metric) -> Metric:
    """A metric object for a name ("mse", "mae", "ssim", "mse-tone") or a :class:`Metric` instance (returned as is)."""
    if isinstance(spec, Metric):
        return spec
    if isinstance(spec, str):
        key = spec.strip().lower()
        if key in _BY_NAME:
            return _BY_NAME[key]()
        if key == "lpips":
            raise ValueError(
                "metric 'lpips' needs a feature backbone, which cannot be fetched here: build one and pass "
                "metrics.LPIPS(backbone) as the metric object"
            )
    raise ValueError(
        f"metric must be one of {METRIC_NAMES} or a Metric instance (e.g. metrics.LPIPS(backbone)), got {spec!r}"
    )
