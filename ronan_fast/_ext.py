"""Loading of the compiled extension ``ronan_fast._C`` and what it was built for.

The build writes ``ronan_fast/_build_info.py`` beside ``_C`` with the torch and CUDA versions the
module was compiled against. They are compared with the running torch *before* ``_C`` is
imported: a module built for another torch fails with an undefined-symbol trace at best and
misbehaves at worst. A mismatch raises :class:`ExtensionMismatchError` (an ``ImportError``)
saying which versions were built for and which are running, and which wheel to install or build
for the running torch (its local version label and the ``scripts/build_wheel.sh`` command line).

Without ``_build_info`` (the source tree, never built) the package works on the plain PyTorch
references and :func:`why_unavailable` says why.
"""

from __future__ import annotations

import os
import re
from types import ModuleType

import torch

_C: ModuleType | None = None
_error: str | None = None
build_info: dict[str, object] | None = None


class ExtensionMismatchError(ImportError):
    """``ronan_fast._C`` was built for another torch or CUDA than the running one."""


def _describe(torch_version: object, cuda_version: object) -> str:
    return f"torch {torch_version} (CUDA {cuda_version or 'none'})"


def _what_to_build(running: tuple[str, str | None]) -> str:
    """What to install or build for the running torch: its wheel's label and the build_wheel.sh command."""
    from ronan_fast import __version__
    from ronan_fast._version import build_command, local_label, public_version, wheel_version

    rebuild_here = ("From a source checkout, in this environment: "
                    "pip install --no-build-isolation --no-deps --force-reinstall .")
    try:
        wanted = wheel_version(__version__, *running)
        label = local_label(*running)
    except ValueError:  # a torch version the labels do not cover: only the source build applies
        return "Rebuild it against the running torch. " + rebuild_here
    local = running[0].partition("+")[2]
    index = f" --index-url https://download.pytorch.org/whl/{local}" if re.fullmatch(r"cu[0-9]+|cpu", local) else ""
    advice = (
        f"Install the ronan_fast wheel labelled {label}, built for the running torch: "
        f'pip install --no-deps --force-reinstall "ronan-fast=={wanted}" --find-links DIST/ '
        f"(DIST/ the folder or index that holds it). Build that wheel from a ronan_fast source checkout with: "
        f"{build_command(running[0], running[1])}{index}. "
    )
    if __version__ == wanted:
        advice += (f"The installed ronan_fast {__version__} carries that label but was built against another torch "
                   f"release; the wheel must be built against torch {running[0]} itself. ")
    if public_version(__version__) != __version__:
        return advice + "See docs/install.md."
    return advice + rebuild_here + " See docs/install.md."


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
            + _what_to_build(running)
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
