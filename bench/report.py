"""Finishing a benchmark's Markdown report: the command that made it, then the file or stdout."""

from __future__ import annotations

import argparse
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


def int_list(p: argparse.ArgumentParser, flag: str, text: str) -> list[int]:
    """``text`` ("16,64") as integers, or exit through ``p.error`` naming ``flag``."""
    try:
        return [int(x) for x in text.split(",")]
    except ValueError:
        p.error(f"{flag} must be comma-separated integers, got {text!r}")
