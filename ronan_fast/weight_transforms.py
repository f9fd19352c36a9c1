"""What makes a generator's inversion steps cheaper without changing the function it computes.

* :func:`channels_last`: 4-D weights and buffers in channels-last (NHWC) memory format.
* :func:`fold_batchnorm`: eval-mode BatchNorm layers folded into the convolutions before them.

Both keep the adapter's fingerprint (the one a belonging profile records): a profile fitted on
the original serves the converted model and the other way round. Both are importable from
:mod:`ronan_fast.adapters` and :mod:`ronan_fast`.
"""

from __future__ import annotations

import copy as _copy
import hashlib
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from ronan_fast.adapters import GeneratorAdapter

__all__ = ["channels_last", "fold_batchnorm"]


def _check_adapter(adapter) -> None:
    from ronan_fast.adapters import GeneratorAdapter

    if not isinstance(adapter, GeneratorAdapter):
        raise TypeError(f"adapter must be a GeneratorAdapter, got {type(adapter).__name__}")


class _UnfoldedWeights:
    """The hash of a generator's weights before :func:`fold_batchnorm`, and the digest of its
    folded weights that it stands for. Copies of an adapter share it (it is never changed)."""

    def __init__(self, unfolded: "hashlib._Hash", folded_digest: str) -> None:
        self.unfolded = unfolded
        self.folded_digest = folded_digest

    def __copy__(self) -> "_UnfoldedWeights":
        return self

    def __deepcopy__(self, memo: dict) -> "_UnfoldedWeights":
        return self


def channels_last(adapter: "GeneratorAdapter", copy: bool = False) -> "GeneratorAdapter":
    """Hold the generator's 4-D weights and buffers in channels-last (NHWC) memory format.

    Its convolutions then run in NHWC, which is often faster: on CPU (oneDNN) it cut the time
    per inversion step of the zoo's 64x64 DCGAN by 15% (README, ``speed_cpu_channels_last.md``),
    and NHWC is what tensor-core convolutions prefer on a GPU. Only the layout changes, not the
    values: outputs agree up to the convolutions' rounding, and the generator's fingerprint (the
    one a belonging profile records) is the same, so a profile fitted either way serves both.
    Other tensors (linear layers' 2-D weights, 5-D ones) are left as they are.

    Args:
        adapter: the generator.
        copy: convert a deep copy and leave ``adapter`` untouched (default: convert in place).
    Returns:
        The converted adapter (``adapter`` itself unless ``copy``).
    """
    _check_adapter(adapter)
    out = _copy.deepcopy(adapter) if copy else adapter
    for module in out.modules():
        module._apply(lambda t: t.contiguous(memory_format=torch.channels_last) if t.dim() == 4 else t)
    return out


_FOLDABLE = {
    nn.Conv1d: nn.BatchNorm1d, nn.Conv2d: nn.BatchNorm2d, nn.Conv3d: nn.BatchNorm3d,
    nn.ConvTranspose1d: nn.BatchNorm1d, nn.ConvTranspose2d: nn.BatchNorm2d, nn.ConvTranspose3d: nn.BatchNorm3d,
}


def _hooked(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or getattr(module, "_backward_pre_hooks", None))


def _foldable(conv: nn.Module, bn: nn.Module) -> bool:
    """``bn`` (exactly a BatchNorm of ``conv``'s dimension, eval mode, running statistics) only
    scales and shifts ``conv``'s output channels, and neither module has hooks or a subclass's
    own forward that folding would bypass."""
    want = _FOLDABLE.get(type(conv))
    return (want is not None and type(bn) is want and not conv.training and not bn.training
            and bn.track_running_stats and bn.running_mean is not None and bn.running_var is not None
            and bn.num_features == conv.out_channels and not _hooked(conv) and not _hooked(bn))


def _fold(conv: nn.Module, bn: nn.Module) -> nn.Module:
    """A copy of ``conv`` whose output is ``bn(conv(x))``: weights and bias computed in float64."""
    f64 = dict(dtype=torch.float64)
    scale = bn.running_var.to(**f64).add(bn.eps).rsqrt()
    if bn.weight is not None:
        scale = scale * bn.weight.detach().to(**f64)
    shift = -bn.running_mean.to(**f64) * scale
    if bn.bias is not None:
        shift = shift + bn.bias.detach().to(**f64)
    w = conv.weight.detach().to(**f64)
    extra = [1] * (w.dim() - 2)
    if isinstance(conv, nn.modules.conv._ConvTransposeNd):
        # weight [in, out / groups, *k]: input channel i feeds output channels of group i // (in / groups)
        g = conv.groups
        per_group = scale.view(g, -1)  # [groups, out / groups]
        w = w * per_group.repeat_interleave(w.shape[0] // g, dim=0).view(w.shape[0], w.shape[1], *extra)
    else:
        w = w * scale.view(-1, 1, *extra)  # weight [out, in / groups, *k]
    bias = shift if conv.bias is None else conv.bias.detach().to(**f64) * scale + shift
    out = _copy.deepcopy(conv)
    dtype = conv.weight.dtype
    out.weight = nn.Parameter(w.to(dtype), requires_grad=conv.weight.requires_grad)
    out.bias = nn.Parameter(bias.to(dtype), requires_grad=conv.weight.requires_grad)
    return out


def fold_batchnorm(adapter: "GeneratorAdapter", copy: bool = False) -> "GeneratorAdapter":
    """Fold eval-mode BatchNorm layers into the convolutions before them.

    In a frozen generator a BatchNorm on running statistics is a per-channel scale and shift;
    folded into the weights and bias of the convolution (or transposed convolution) that feeds
    it, it costs nothing in the forward and backward passes. On the zoo's 64x64 DCGAN, together
    with :func:`channels_last`, it made the GAN default's inversion 1.13-1.28x faster on a
    2-core CPU (alone 1.02-1.04x; ``bench/results/speed_cpu_dcgan64_fold.md``). A pair is
    folded where a convolution is followed directly by a BatchNorm of its dimension in an
    ``nn.Sequential`` (so nothing else reads the convolution's output), both in eval mode, the
    BatchNorm on running statistics, neither with hooks nor of a subclass; the BatchNorm
    becomes an ``nn.Identity``. The folded weights are computed in float64: outputs agree with
    the original up to the convolutions' float32 rounding.

    The adapter's fingerprint stays the unfolded generator's (it is the same function), so a
    belonging profile fitted on one serves the other; once the folded weights are changed, the
    fingerprint is theirs again. Adapters made from the folded one afterwards (``with_class``,
    copies) keep it too; folding in place changes the module itself, so an adapter made
    *before* that shares the module sees folded weights under a fingerprint of their own: fold
    first, or fold a copy.

    Args:
        adapter: the generator.
        copy: fold a deep copy and leave ``adapter`` untouched (default: fold in place).
    Returns:
        The folded adapter (``adapter`` itself unless ``copy``). ``folded_batchnorms`` on it
        says how many BatchNorm layers were folded in all.
    """
    from ronan_fast.adapters import _weights_hash

    _check_adapter(adapter)
    before = adapter._unfolded_weights_hash()
    out = _copy.deepcopy(adapter) if copy else adapter
    folded = 0
    for root in out.modules():
        for seq in [m for m in root.modules() if type(m) is nn.Sequential]:
            names = list(seq._modules)
            for a, b in zip(names, names[1:]):
                conv, bn = seq._modules[a], seq._modules[b]
                if conv is not None and bn is not None and _foldable(conv, bn):
                    seq._modules[a] = _fold(conv, bn)
                    seq._modules[b] = nn.Identity()
                    folded += 1
    out.folded_batchnorms = getattr(out, "folded_batchnorms", 0) + folded
    if folded:
        out._unfolded_weights = _UnfoldedWeights(before, _weights_hash(out.modules()).hexdigest())
    return out
