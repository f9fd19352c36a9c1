"""Report files: a header that says what they are, an exclusive lock, and no silent loss.

A report is a header and records (docs/reports.md). Written as it goes, it is a JSON-lines log
whose first line is ``{"header": {...}}``: a file whose first line is not such a header is not
a report of ours and is never overwritten or trusted. Every writer of a report holds an
exclusive lock on it (:class:`ReportLock`, ``fcntl.flock`` on a hidden ``.NAME.lock`` file
beside it, released when the process ends, however it ends); a second writer stops with
:class:`ReportLocked` or waits. Finished reports are written atomically (a temporary file,
then a rename). A record is one image's outcome; a log's last line cut short by a crash is
dropped, any other damaged line is an error.
"""

from __future__ import annotations

import csv
import errno
import io
import json
import os
import stat
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

from ronan_fast._atomic import write_text

__all__ = [
    "FORMAT", "FORMAT_VERSION", "SUFFIXES", "CSV_FIELDS", "ReportError", "ReportLocked", "ReportLock", "ReportLog",
    "check_header", "read_report", "write_report", "record_key", "MAX_REPORT_BYTES",
]

FORMAT = "ronan-fast report"
FORMAT_VERSION = 1
#: report formats, by the suffix of the file name
SUFFIXES = (".jsonl", ".json", ".csv")
#: the CSV report's columns, in order
CSV_FIELDS = ["path", "verdict", "belongs", "loss", "reference_loss", "calibrated_loss", "statistic",
              "critical_value", "p_value", "threshold", "alpha", "rule", "stopped_early", "row_steps", "notes",
              "error", "profile_id"]
#: a report file larger than this is refused rather than read into memory
MAX_REPORT_BYTES = 1 << 30
#: what must be the same in two headers for their records to be one report's
_SAME = ("profile_id", "alpha", "model_fingerprint", "reference_fingerprint")
_CSV_PREFIX = "# " + FORMAT + " "


class ReportError(ValueError):
    """A file that is not a report of ours, is damaged, or holds another job's results."""


class ReportLocked(RuntimeError):
    """Another process is writing this report."""


def record_key(path: str | os.PathLike) -> str:
    """The key under which a file's record is kept: its absolute path (case-folded where the
    file system does)."""
    return os.path.normcase(os.path.abspath(os.fspath(path)))


def _identity(header: dict) -> dict:
    prof = header.get("profile") if isinstance(header.get("profile"), dict) else {}
    model = header.get("model") if isinstance(header.get("model"), dict) else {}
    ref = header.get("reference") if isinstance(header.get("reference"), dict) else {}
    return {"profile_id": prof.get("id"), "alpha": header.get("alpha"),
            "model_fingerprint": model.get("fingerprint"), "reference_fingerprint": ref.get("fingerprint")}


def check_header(header: object, source: str, expect: dict | None = None) -> dict:
    """``header`` if it is a report header of ours (and, given ``expect``, of the same job:
    profile, alpha, model and reference model), else :class:`ReportError` naming ``source``."""
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise ReportError(f"{source} is not a {FORMAT} (no report header); it is left as it is: choose another "
                          "output file or move it away")
    if header.get("format_version") != FORMAT_VERSION:
        raise ReportError(f"{source} is a report of format version {header.get('format_version')!r}; this version "
                          f"reads version {FORMAT_VERSION}: choose another output file or move it away")
    if expect is not None:
        have, want = _identity(header), _identity(expect)
        diff = [k for k in _SAME if have[k] != want[k]]
        if diff:
            raise ReportError(f"{source} holds results made with another {', '.join(diff)} "
                              f"({', '.join(f'{k}: {have[k]!r}' for k in diff)}); choose another output file or "
                              "move it away")
    return header


# ---------------------------------------------------------------------------- locking


class ReportLock:
    """An exclusive lock on report ``path`` (a hidden ``.NAME.lock`` file beside it).

    ``wait``: wait for another writer to finish instead of raising :class:`ReportLocked`. The
    lock file is left in place (removing it could let two writers lock two different files)."""

    def __init__(self, path: str | os.PathLike, wait: bool = False):
        import fcntl

        path = Path(path)
        self.path = path.with_name(f".{path.name}.lock")
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        flags = fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB
        try:
            fcntl.flock(self._fd, flags)
        except OSError as e:
            os.close(self._fd)
            self._fd = None
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise ReportLocked(f"another ronan-fast run is writing {_shown(path)} (it holds "
                                   f"{_shown(self.path)}); wait for it to finish, pass --wait, or choose another "
                                   "output file") from None
            raise
        os.ftruncate(self._fd, 0)
        os.write(self._fd, f"{os.getpid()}\n".encode())

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing releases the flock
            self._fd = None

    def __enter__(self) -> "ReportLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


# ---------------------------------------------------------------------------- the log


class ReportLog:
    """A JSON-lines report written as it goes: the header line, then one record per line.

    Opening an existing log checks its header against ``header`` (:func:`check_header`) and
    reads its records (:attr:`records`); a last line cut short by a crash is dropped from the
    file. A new log gets ``header`` as its first line. :meth:`append` writes, flushes and syncs
    each batch of records, so a killed process loses at most the batch it was working on. The
    caller holds the report's :class:`ReportLock`.
    """

    def __init__(self, path: str | os.PathLike, header: dict):
        self.path = Path(path)
        self.records: list[dict] = []
        if self.path.exists():
            found, self.records = _read_jsonl(self.path, repair=True)
            check_header(found, _shown(self.path), header)
            self._file = self.path.open("a", encoding="utf-8")
        else:
            self._file = self.path.open("x", encoding="utf-8")
            self._write([{"header": header}])

    def append(self, records: Iterable[dict]) -> None:
        records = list(records)
        self._write(records)
        self.records.extend(records)

    def _write(self, lines: Sequence[dict]) -> None:
        self._file.write("".join(_json_line(r) for r in lines))
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> "ReportLog":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _json_line(obj: dict) -> str:
    # ensure_ascii: a file name that is not UTF-8 (lone surrogates) is written as \udcXX escapes,
    # which read back to the same name
    return json.dumps(obj, ensure_ascii=True, allow_nan=False) + "\n"


# ---------------------------------------------------------------------------- reading


def _shown(path: Path) -> str:
    from ronan_fast.imageio import display_path

    return display_path(path)


def _text(path: Path) -> str:
    """The file's text, or :class:`ReportError`: only a regular file is read (a FIFO or a device
    is opened without blocking and refused), and at most :data:`MAX_REPORT_BYTES`."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as e:
        why = "not found" if isinstance(e, FileNotFoundError) else (e.strerror or type(e).__name__)
        raise ReportError(f"{_shown(path)}: cannot be read ({why})") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ReportError(f"{_shown(path)}: not a regular file (a FIFO, device or folder is not a report)")
        if st.st_size > MAX_REPORT_BYTES:
            raise ReportError(f"{_shown(path)} is {st.st_size} bytes, more than a report may be "
                              f"({MAX_REPORT_BYTES}); not read")
        with os.fdopen(os.dup(fd), "rb") as f:
            data = f.read(MAX_REPORT_BYTES + 1)
    except OSError as e:
        raise ReportError(f"{_shown(path)}: cannot be read ({e.strerror or type(e).__name__})") from None
    finally:
        os.close(fd)
    return data.decode("utf-8", errors="surrogateescape")


def _loads(text: str):
    """JSON, or None for text that is not (malformed, nested too deeply, numbers too long)."""
    try:
        return json.loads(text)
    except (ValueError, RecursionError):  # JSONDecodeError is a ValueError; so is a 100,000-digit integer
        return None


def _read_jsonl(path: Path, repair: bool = False) -> tuple[dict, list[dict]]:
    """The header and records of a JSON-lines report; with ``repair`` a last line cut short is
    dropped from the file."""
    text = _text(path)
    lines = text.split("\n")
    header, records, good = None, [], []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        obj = _loads(line)
        if obj is None:
            last = i == len(lines) - 1 or all(not x.strip() for x in lines[i + 1:])
            if last and header is not None and not text.endswith("\n"):  # cut short by a crash
                if repair:
                    write_text(path, "".join(g + "\n" for g in good))
                break
            raise ReportError(f"{_shown(path)}: line {i + 1} is not valid JSON" +
                              ("" if header is not None else f"; it is not a {FORMAT}"))
        if header is None:
            header = check_header(obj.get("header") if isinstance(obj, dict) else None, _shown(path))
        else:
            records.append(_check_record(obj, path, i + 1))
        good.append(line)
    if header is None:
        raise ReportError(f"{_shown(path)} is empty, not a {FORMAT}; it is left as it is: choose another output "
                          "file")
    return header, records


def _check_record(obj: object, path: Path, line: int) -> dict:
    if not isinstance(obj, dict) or not isinstance(obj.get("path"), str) or "verdict" not in obj:
        raise ReportError(f"{_shown(path)}: line {line} is not a report record (a JSON object with a path and a "
                          "verdict)")
    return obj


def read_report(path: str | os.PathLike) -> tuple[dict, list[dict]]:
    """The header and records of a report in any format (by suffix: .jsonl, .json, .csv);
    :class:`ReportError` for anything that is not a report of ours."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise ReportError(f"{_shown(path)}: a report ends in {', '.join(SUFFIXES)}")
    if suffix == ".jsonl":
        return _read_jsonl(path)
    text = _text(path)
    if suffix == ".json":
        data = _loads(text)
        if not isinstance(data, dict) or not isinstance(data.get("records"), list):
            raise ReportError(f"{_shown(path)} is not a {FORMAT} (expected a JSON object with a header and records)")
        header = check_header(data.get("header"), _shown(path))
        return header, [_check_record(r, path, i + 1) for i, r in enumerate(data["records"])]
    return _read_csv(path, text)


def _read_csv(path: Path, text: str) -> tuple[dict, list[dict]]:
    first, _, rest = text.partition("\n")
    if not first.startswith(_CSV_PREFIX):
        raise ReportError(f"{_shown(path)} is not a {FORMAT} (its first line is not "
                          f"'{_CSV_PREFIX.strip()} {{header}}')")
    header = check_header(_loads(first[len(_CSV_PREFIX):]), _shown(path))
    try:
        rows = list(csv.DictReader(io.StringIO(rest, newline="")))
    except csv.Error as e:
        raise ReportError(f"{_shown(path)}: not a readable CSV table ({' '.join(str(e).split())})") from None
    records = []
    for i, row in enumerate(rows):
        if None in row or set(row) != set(CSV_FIELDS) or any(v is None for v in row.values()):
            raise ReportError(f"{_shown(path)}: row {i + 1} does not have the report's columns")
        records.append(_check_record({k: _csv_value(k, v) for k, v in row.items()}, path, i + 2))
    return header, records


_CSV_NUMBERS = {"loss", "reference_loss", "calibrated_loss", "statistic", "critical_value", "p_value", "threshold",
                "alpha"}


def _csv_value(key: str, text: str):
    if text == "":
        return None
    if key in ("belongs", "stopped_early"):
        return {"true": True, "false": False}.get(text.lower(), text)
    if key == "row_steps":
        return int(text) if text.lstrip("-").isdigit() else text
    if key in _CSV_NUMBERS:
        try:
            return float(text)
        except ValueError:
            return text
    return text


# ---------------------------------------------------------------------------- writing


def write_report(path: str | os.PathLike, header: dict, records: Sequence[dict]) -> Path:
    """Write a finished report atomically, in the format its suffix names."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        text = _json_line({"header": header}) + "".join(_json_line(r) for r in records)
    elif suffix == ".json":
        text = json.dumps({"header": header, "records": list(records)}, indent=1, ensure_ascii=True,
                          allow_nan=False) + "\n"
    elif suffix == ".csv":
        buf = io.StringIO()
        buf.write(_CSV_PREFIX + json.dumps(header, ensure_ascii=True, allow_nan=False) + "\n")
        w = csv.DictWriter(buf, fieldnames=CSV_FIELDS, extrasaction="ignore", lineterminator="\n")
        w.writeheader()
        for r in records:
            w.writerow({k: _csv_cell(r.get(k)) for k in CSV_FIELDS})
        text = buf.getvalue()
    else:
        raise ReportError(f"{_shown(path)}: a report ends in {', '.join(SUFFIXES)}")
    # surrogateescape: a file name that is not UTF-8 is written with its own bytes (CSV)
    return _write_bytes(path, text.encode("utf-8", "surrogateescape"))


def _csv_cell(v):
    if v is None:
        return ""
    if isinstance(v, bool):
        return "true" if v else "false"
    return v


def _write_bytes(path: Path, data: bytes) -> Path:
    from ronan_fast._atomic import atomic_path

    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    return path


def wait_for_lock(path: str | os.PathLike, timeout: float) -> ReportLock:
    """:class:`ReportLock` on ``path``, retried until ``timeout`` seconds have passed."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return ReportLock(path)
        except ReportLocked:
            if time.monotonic() >= deadline:
                raise
            time.sleep(0.2)
