"""Hostile report files: whatever a file named as a report holds, reading it ends in its header and
records or in a one-line error naming the file -- never another exception, never a hang.

The reader under test is :data:`READER` (``read_report(path) -> (header, records)``, raising
:data:`ERROR`); point them at another reader with the same contract to test that one.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import textwrap
from functools import lru_cache
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.control import currently_in_test_context, event

READER = "ronan_fast.reports.files:read_report"
ERROR = "ronan_fast.reports.files:ReportError"
WRITER = "ronan_fast.reports.files:write_report"  # makes the valid reports that are cut and mutated
HEADER = {"format": "ronan-fast report", "format_version": 1, "profile": {"id": "0123456789abcdef"}, "alpha": 0.05,
          "model": {"fingerprint": "m" * 64, "name": "tiny"}, "reference": {"fingerprint": "r" * 64}}

HYP = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
SUFFIXES = (".jsonl", ".json", ".csv")


def _resolve(spec: str):
    module, _, name = spec.partition(":")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        pytest.skip(f"{spec} is not there to test")


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    return tmp_path_factory.mktemp("reports")


def one_line(message: str) -> None:
    assert message and "\n" not in message and "\r" not in message, repr(message)


def outcome(path: Path) -> str:
    """Read ``path`` as a report: the header and records, or the reader's own error in one line."""
    read, error = _resolve(READER), _resolve(ERROR)
    try:
        header, records = read(path)
    except error as e:
        one_line(str(e))
        if currently_in_test_context():
            event("report: error")
        return "error"
    assert isinstance(header, dict) and isinstance(records, list)
    assert all(isinstance(r, dict) and isinstance(r.get("path"), str) for r in records)
    if currently_in_test_context():
        event("report: header and records")
    return "report"


@lru_cache(maxsize=None)
def valid_reports() -> dict[str, bytes]:
    """A report in each format, written by the package's writer, to cut and mutate."""
    import tempfile

    write = _resolve(WRITER)
    records = [
        {"path": "a.png", "verdict": "belongs", "belongs": True, "loss": 1e-3, "reference_loss": 0.1,
         "calibrated_loss": 0.01, "statistic": -1.0, "p_value": 0.5, "error": None},
        {"path": os.fsdecode(b"b-\xff.png"), "verdict": "does not belong", "belongs": False, "loss": 0.2},
        {"path": "gone.png", "verdict": "error", "belongs": None, "error": "file not found"},
    ]
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for suffix in SUFFIXES:
            path = Path(tmp) / f"r{suffix}"
            write(path, HEADER, records)
            out[suffix] = path.read_bytes()
    return out


@settings(max_examples=200, **HYP)
@given(suffix=st.sampled_from(SUFFIXES), data=st.binary(max_size=2048))
def test_random_bytes(scratch, suffix, data):
    path = scratch / f"random{suffix}"
    path.write_bytes(data)
    outcome(path)


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=10), inner, max_size=5),
    max_leaves=20,
)


@settings(max_examples=200, **HYP)
@given(suffix=st.sampled_from(SUFFIXES), lines=st.lists(JSON_VALUES, max_size=5), with_header=st.booleans())
def test_random_json(scratch, suffix, lines, with_header):
    if with_header:
        lines = [{"header": HEADER}, *lines] if suffix != ".json" else [{"header": HEADER, "records": lines}]
    path = scratch / f"json{suffix}"
    if suffix == ".csv":
        text = "# ronan-fast report " + json.dumps(HEADER) + "\n" + "\n".join(json.dumps(v) for v in lines[1:])
    elif suffix == ".json":
        text = json.dumps(lines[0] if lines else None)
    else:
        text = "".join(json.dumps(v) + "\n" for v in lines)
    path.write_text(text)
    outcome(path)


@settings(max_examples=300, **HYP)
@given(suffix=st.sampled_from(SUFFIXES), cut=st.floats(0, 1), edits=st.lists(st.tuples(
    st.floats(0, 1, exclude_max=True), st.integers(0, 255)), max_size=4))
def test_truncated_and_mutated(scratch, suffix, cut, edits):
    data = bytearray(valid_reports()[suffix])
    for where, value in edits:
        data[int(where * len(data))] = value
    path = scratch / f"cut{suffix}"
    path.write_bytes(bytes(data[: int(cut * len(data))]))
    before = path.read_bytes()
    outcome(path)
    assert path.read_bytes() == before  # reading never changes the file


def test_valid_reports_read_back(scratch):
    for suffix, data in valid_reports().items():
        path = scratch / f"valid{suffix}"
        path.write_bytes(data)
        header, records = _resolve(READER)(path)
        assert header["format"] == HEADER["format"] and [r["path"] for r in records] == [
            "a.png", os.fsdecode(b"b-\xff.png"), "gone.png"]


def _hostile(folder: Path) -> dict[str, Path]:
    files = {}

    def put(name, data: bytes):
        files[name] = folder / name
        files[name].write_bytes(data)

    header = json.dumps({"header": HEADER}).encode()
    put("deep.jsonl", b"[" * 200_000 + b"]" * 200_000)
    put("deep_record.jsonl", header + b"\n" + b'{"a":' * 50_000 + b"1" + b"}" * 50_000 + b"\n")
    put("long_int.jsonl", header + b'\n{"path": "a", "verdict": "x", "loss": ' + b"9" * 100_000 + b"}\n")
    put("long_int.json", b'{"header": ' + json.dumps(HEADER).encode() + b', "records": [' + b"9" * 100_000 + b"]}")
    put("nul.jsonl", header + b"\n\x00\x00\x00\n")
    put("not_utf8.json", b'{"header": "\xff\xfe"}')
    put("bom.jsonl", b"\xef\xbb\xbf" + header + b"\n")
    put("nan.jsonl", header + b'\n{"path": "a", "verdict": "belongs", "loss": NaN}\n')
    put("csv_quote.csv", b"# ronan-fast report " + json.dumps(HEADER).encode() + b'\npath,verdict\n"a,\n')
    put("csv_huge_field.csv", b"# ronan-fast report " + json.dumps(HEADER).encode() + b"\npath\n" + b"x" * 200_000)
    put(os.fsdecode(b"name\xff\nline.jsonl"), b"not json\n")
    files["missing.jsonl"] = folder / "missing.jsonl"
    os.symlink(folder / "nowhere.jsonl", folder / "dangling.jsonl")
    files["dangling.jsonl"] = folder / "dangling.jsonl"
    (folder / "dir.jsonl").mkdir()
    files["dir.jsonl"] = folder / "dir.jsonl"
    return files


@pytest.mark.parametrize("name", ["deep.jsonl", "deep_record.jsonl", "long_int.jsonl", "long_int.json", "nul.jsonl",
                                  "not_utf8.json", "bom.jsonl", "nan.jsonl", "csv_quote.csv", "csv_huge_field.csv",
                                  "name\\xff\\x0aline.jsonl", "missing.jsonl", "dangling.jsonl", "dir.jsonl"])
def test_hostile_files(tmp_path, name):
    files = _hostile(tmp_path)
    path = files[os.fsdecode(b"name\xff\nline.jsonl") if name.startswith("name") else name]
    outcome(path)


_CHILD = textwrap.dedent("""
    import importlib, sys
    module, _, name = sys.argv[2].partition(":")
    read = getattr(importlib.import_module(module), name)
    try:
        read(sys.argv[1])
    except Exception as e:
        print(type(e).__name__, e)
""")


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="FIFOs are a POSIX thing")
@pytest.mark.parametrize("kind", ["fifo", "big"])
def test_a_fifo_or_a_huge_file_never_hangs(tmp_path, kind):
    """A FIFO named as a report would block a reader forever, a 2 GB file would fill memory: each
    must end, in a separate process so that a hang fails this test alone."""
    _resolve(READER)
    path = tmp_path / "report.jsonl"
    if kind == "fifo":
        os.mkfifo(path)
    else:
        with open(path, "wb") as f:
            f.truncate(2 * 2**30)  # sparse
    try:
        out = subprocess.run([sys.executable, "-c", _CHILD, str(path), READER], capture_output=True, text=True,
                             timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail(f"reading a {kind} as a report did not end within 60 s")
    error = ERROR.partition(":")[2]
    assert out.returncode == 0 and out.stdout.startswith(error), out.stdout + out.stderr
