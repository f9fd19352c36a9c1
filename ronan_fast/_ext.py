"""Loading of the compiled extension ``ronan_fast._C`` and what it was built for.

The build writes ``ronan_fast/_build_info.py`` beside ``_C`` with the torch and CUDA versions the
module was compiled against. They are compared with the running torch *before* ``_C`` is
imported: a module built for another torch fails with an undefined-symbol trace at best and
misbehaves at worst. A mismatch raises :class:`ExtensionMismatchError` (an ``ImportError``)
saying which versions were built for and which are running.

Without ``_build_info`` (the source tree, never built) the package works on the plain PyTorch
references and :func:`why_unavailable` says why.
"""

from __future__ import annotations

import os
from types import ModuleType

import torch

_C: ModuleType | None = None
_error: str | None = None
build_info: dict[str, object] | None = None


class ExtensionMismatchError(ImportError):
    """``ronan_fast._C`` was built for another torch or CUDA than the running one."""


def _describe(torch_version: object, cuda_version: object) -> str:
    return f"torch {torch_version} (CUDA {cuda_version or 'none'})"


def _load() -> None:
    global _C, _error, build_info
    try:
        from ronan_fast import _build_info as info  # written by CMakeLists.txt at build time
    except ImportError:
        _error = (
            f"ronan_fast._C is not built: ronan_fast was imported from {os.path.dirname(__file__)}, which has no "
            "compiled module. Install the package (pip install --no-build-isolation .) and run from outside the "
            "source tree, or with PYTHONSAFEPATH=1 so that the source tree does not shadow the installed package"
        )
        return
    built = (str(info.TORCH_VERSION), info.CUDA_VERSION or None)
    running = (str(torch.__version__), torch.version.cuda or None)
    build_info = {"torch_version": built[0], "cuda_version": built[1], "with_cuda": bool(info.WITH_CUDA)}
    if built != running:
        raise ExtensionMismatchError(
            f"ronan_fast._C was built for {_describe(*built)} but {_describe(*running)} is running. "
            "Rebuild it against the running torch: pip install --no-build-isolation --no-deps --force-reinstall "
            "<ronan_fast source>"
        )
    try:
        from ronan_fast import _C as module  # registers the torch.ops.ronan_fast.* ops
    except ImportError as exc:
        raise ImportError(
            f"ronan_fast._C (built for {_describe(*built)}, running {_describe(*running)}) failed to import: {exc}"
        ) from exc
    if (module.TORCH_VERSION, module.CUDA_VERSION) != built:
        raise ExtensionMismatchError(
            f"ronan_fast._C reports {_describe(module.TORCH_VERSION, module.CUDA_VERSION)} but _build_info says "
            f"{_describe(*built)}: the installation is inconsistent, reinstall ronan_fast"
        )
    _C = module


_load()


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
