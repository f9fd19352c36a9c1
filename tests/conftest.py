"""Shared test setup: say in the report header which ronan_fast and which kernels are under test;
run a module's tests on one torch thread where it sets ``ONE_THREAD = True``."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module", autouse=True)
def one_thread(request):
    """One torch thread while a module with ``ONE_THREAD = True`` runs (before its own fixtures)."""
    if getattr(request.module, "ONE_THREAD", False) is not True:
        yield
        return
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def pytest_report_header(config) -> list[str]:
    try:
        import ronan_fast
        from ronan_fast import _ext
    except ImportError as exc:  # a mismatched build: the tests that import it will say more
        return [f"ronan_fast: import failed: {exc}"]
    import torch

    where = ronan_fast.__file__.rsplit("/", 2)[0]
    if _ext._C is None:
        kernels = f"no compiled kernels ({_ext.why_unavailable(torch.device('cpu'))})"
    else:
        kernels = f"_C built for torch {_ext._C.TORCH_VERSION}, CUDA kernels: {_ext._C.WITH_CUDA}"
    return [f"ronan_fast from {where}: {kernels}; torch {torch.__version__}, cuda available: "
            f"{torch.cuda.is_available()}"]
