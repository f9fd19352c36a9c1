"""What a benchmark's figures were measured on: the CPU by name, so that tables from different
machines are never read as one."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import torch


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict:
    """The machine a CPU benchmark ran on, for its JSON record and its table's header."""
    return {
        "machine": f"{cpu_name()} ({platform.machine()})",
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": "cpu",
    }


def machine_line(m: dict, command: str) -> str:
    """A CPU table's header line: ``m`` (:func:`machine`'s record) and the command that made it."""
    return (f"Machine: {m['machine']}, {m['cpu_count']} cores, {m['threads']} torch thread(s), torch {m['torch']}, "
            f"Python {m['python']}, CPU only. Command: `{command}`.")
