"""Finishing a benchmark's Markdown report: the command that made it, then the file or stdout."""

from __future__ import annotations

import shlex
import sys

from ronan_fast.evaluation.store import write_text


def finish(lines: list[str], module: str, argv: list[str] | None, out: str | None) -> None:
    """Append the command (``python -m MODULE ARGS``) to ``lines``; write them to ``out`` atomically, or print them."""
    command = shlex.join(["python", "-m", module, *(sys.argv[1:] if argv is None else argv)])
    text = "\n".join([*lines, "", f"Command: `{command}`"]) + "\n"
    if out:
        write_text(out, text)
    else:
        print(text)
