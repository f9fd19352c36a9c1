"""Atomic writes: a failed write keeps the old file and leaves no temporary file behind."""

from __future__ import annotations

import os

import pytest

from ronan_fast import _atomic


def test_write_text_replaces_and_takes_the_plain_file_mode(tmp_path):
    p = tmp_path / "sub" / "out.txt"
    _atomic.write_text(p, "one\n")
    _atomic.write_text(p, "two\r\n", newline="")
    assert p.read_bytes() == b"two\r\n"
    mask = os.umask(0)
    os.umask(mask)
    assert p.stat().st_mode & 0o777 == 0o666 & ~mask
    assert sorted(f.name for f in p.parent.iterdir()) == ["out.txt"]


def test_a_failed_write_keeps_the_old_file(tmp_path):
    p = tmp_path / "out.bin"
    p.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="interrupted"):
        with _atomic.atomic_path(p) as tmp:
            with open(tmp, "wb") as f:
                f.write(b"half")
            raise RuntimeError("interrupted")
    assert p.read_bytes() == b"old"
    assert sorted(f.name for f in tmp_path.iterdir()) == ["out.bin"]
