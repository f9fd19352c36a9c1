"""The README's Python programs run as written.

Every fenced block whose info string is exactly ``python`` is a complete program: it is run in a
fresh temporary folder, in a fresh interpreter, and must exit cleanly within the time limit.
Fragments that are not meant to run are fenced as ``python no-run``; any other ``python...``
info string is refused, so that a block cannot drop out of the test by a typo.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
RUN, NO_RUN = "python", "python no-run"
TIMEOUT_S = 600

_FENCE = re.compile(r"^```([^\n`]*)\n(.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)


def fenced_blocks(text: str) -> list[tuple[str, str, int]]:
    """``(info string, body, line number)`` of each fenced code block."""
    return [(m.group(1).strip(), m.group(2), text.count("\n", 0, m.start()) + 1) for m in _FENCE.finditer(text)]


def runnable_blocks() -> list[tuple[str, int]]:
    return [(body, line) for info, body, line in fenced_blocks(README.read_text(encoding="utf-8")) if info == RUN]


def test_fence_parser_tells_programs_from_fragments():
    text = "intro\n```python\nprint(1)\n```\n```python no-run\nx(\n```\n```\nbash run.sh\n```\n"
    assert [(i, b) for i, b, _ in fenced_blocks(text)] == [
        ("python", "print(1)\n"), ("python no-run", "x(\n"), ("", "bash run.sh\n")]


def test_every_python_block_is_a_program_or_marked_as_a_fragment():
    infos = [(info, line) for info, _, line in fenced_blocks(README.read_text(encoding="utf-8"))]
    odd = [(info, line) for info, line in infos if info.startswith("py") and info not in (RUN, NO_RUN)]
    assert not odd, f"README blocks with an unknown Python fence (use {RUN!r} or {NO_RUN!r}): {odd}"
    assert len(runnable_blocks()) >= 2  # the quickstart and the own-generator example


@pytest.mark.parametrize("body,line", [pytest.param(b, n, id=f"line{n}") for b, n in runnable_blocks()])
def test_readme_program_runs(body, line, tmp_path):
    script = tmp_path / "readme_block.py"
    script.write_text(body, encoding="utf-8")
    env = {**os.environ, "PYTHONSAFEPATH": "1"}  # the installed package, not the source tree
    env.setdefault("OMP_NUM_THREADS", "1")  # a shared CI machine: no thread pool spinning on busy cores
    try:
        proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True,
                              text=True, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"README block at line {line} ran past {TIMEOUT_S} s")
    assert proc.returncode == 0, (f"README block at line {line} failed (exit {proc.returncode}):\n"
                                  f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
