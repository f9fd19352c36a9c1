"""Loading of the compiled extension ``ronan_fast._C`` and what it was built for."""

from __future__ import annotations

import torch

_C = None
_error: str | None = None

try:  # the import registers the torch.ops.ronan_fast.* ops
    from ronan_fast import _C  # type: ignore[attr-defined,no-redef]
except ImportError as exc:  # pragma: no cover - depends on the build
    _error = f"ronan_fast._C could not be imported: {exc}"


def has_device(device: torch.device) -> bool:
    """True when the extension has kernels for ``device``'s type."""
    if _C is None:
        return False
    if device.type == "cpu":
        return True
    if device.type == "cuda":
        return bool(getattr(_C, "WITH_CUDA", False))
    return False


def why_unavailable(device: torch.device) -> str:
    if _C is None:
        return _error or "ronan_fast._C is not built"
    if device.type == "cuda" and not getattr(_C, "WITH_CUDA", False):
        return "ronan_fast._C was built without CUDA kernels"
    return f"ronan_fast._C has no kernels for device type {device.type!r}"
