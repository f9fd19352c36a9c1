"""The report of one inspect job: its lock, its logs, earlier results, and the final merge.

A job writes its records as it goes to a log (the report itself when it is ``.jsonl``, else
``REPORT.partial.jsonl``); workers of a job spread over processes each write their own log,
``REPORT.worker-RANK.jsonl``. Whatever wrote them, a job that runs again with the same report
reads every log and the finished report, skips the images already judged (an unreadable image
is tried again), and at the end merges all of it once into the finished report, one record per
image (the latest), in input order. Nothing is lost on the way: logs are removed only after the
finished report is written, and a report or log that is not ours (no header, or another
profile) is refused, never overwritten.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

from ronan_fast.reports.files import ReportLock, ReportLog, check_header, read_report, record_key, write_report

__all__ = ["ReportSession", "list_inputs", "log_path", "worker_log_path"]


def log_path(output: Path) -> Path:
    """The log a single-process job writes as it goes: the report itself for ``.jsonl``."""
    return output if output.suffix.lower() == ".jsonl" else output.with_name(output.name + ".partial.jsonl")


def worker_log_path(output: Path, rank: int) -> Path:
    """The log worker ``rank`` of a job spread over processes writes as it goes."""
    return output.with_name(f"{output.name}.worker-{rank}.jsonl")


def _worker_logs(output: Path) -> list[Path]:
    return sorted(output.parent.glob(f"{glob.escape(output.name)}.worker-*.jsonl"))


class ReportSession:
    """The report ``output`` of a job with ``header``, seen by one writer.

    ``log``: where this writer appends its records (default: :func:`log_path`). With ``lock``
    it holds :class:`~ronan_fast.reports.files.ReportLock` on ``output`` from the start, as a
    single process does; workers of a spread job lock their own logs instead and the one that
    merges locks ``output`` for the merge (:meth:`merge`). :attr:`earlier` holds the records
    found at the start in the finished report and in every log.
    """

    def __init__(self, output: Path, header: dict, *, log: Path | None = None, lock: bool = True,
                 wait: bool = False):
        self.output, self.header = Path(output), header
        self.log_path = log_path(self.output) if log is None else Path(log)
        self._lock = ReportLock(self.output if lock else self.log_path, wait=wait)
        try:
            self.earlier = self._read_earlier()
            self.log = ReportLog(self.log_path, header)
        except BaseException:
            self._lock.release()
            raise

    def _read_earlier(self) -> list[dict]:
        records: list[dict] = []
        sources = [self.output] if self.output.exists() and self.output != log_path(self.output) else []
        sources += [p for p in [log_path(self.output), *_worker_logs(self.output)] if p.exists()]
        for source in dict.fromkeys(sources):
            found, recs = read_report(source)
            check_header(found, str(source), self.header)
            records.extend(recs)
        return records

    def judged(self) -> set[str]:
        """Keys (:func:`record_key`) of the images judged so far (records without an error)."""
        return {record_key(r["path"]) for r in self.earlier + self.log.records if not r.get("error")}

    def append(self, records: Iterable[dict]) -> None:
        self.log.append(records)

    def merged(self, order: Sequence[str | os.PathLike]) -> list[dict]:
        """Every record found or written, one per image, images of ``order`` first in that
        order, then the others as they came. An image's record is the latest that judged it, or
        if none did its latest error: logs of several workers hold no common time order, and an
        image once judged is never judged again (:meth:`judged`)."""
        latest: dict[str, dict] = {}
        for r in self.earlier + self.log.records:
            k = record_key(r["path"])
            if r.get("error") and k in latest and not latest[k].get("error"):
                continue  # an error does not replace a verdict
            latest.pop(k, None)  # re-inserted: the latest keeps its place last
            latest[k] = r
        first = [k for k in dict.fromkeys(record_key(p) for p in order) if k in latest]
        rest = [k for k in latest if k not in set(first)]
        return [latest[k] for k in first + rest]

    def merge(self, order: Sequence[str | os.PathLike], wait: bool = False, reread: bool = False) -> list[dict]:
        """Write the finished report (all records, :meth:`merged`) atomically, then remove the
        logs it holds. Returns the records written. On a failed write the logs stay, and the
        error says where the finished results are. ``reread``: read every log again first, as
        the writer that merges a job spread over processes does while it holds the lock."""
        lock = None if self._locks_output else ReportLock(self.output, wait=wait)
        try:
            if lock is not None or reread:  # other workers have logged since the start: read everything again
                self.earlier = self._read_earlier()
            records = self.merged(order)
            try:
                write_report(self.output, self.header, records)
            except OSError as e:
                raise OSError(e.errno, f"could not write {self.output} ({e.strerror or e}); the finished results "
                                       f"are kept in {self.log_path}") from None
            for p in [log_path(self.output), *_worker_logs(self.output)]:
                if p != self.output and p.exists():
                    p.unlink()
        finally:
            if lock is not None:
                lock.release()
        return records

    @property
    def _locks_output(self) -> bool:
        return self._lock.path.name == f".{self.output.name}.lock"

    def close(self) -> None:
        self.log.close()
        self._lock.release()

    def __enter__(self) -> "ReportSession":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def list_inputs(items: Sequence[str | os.PathLike], recursive: bool) -> tuple[list[Path], list[dict]]:
    """The image files ``items`` name (files, folders), each once, in order, and an error record
    for each item that gives none (a missing path, an empty or unreadable folder, a FIFO...):
    the inputs of one ``inspect`` job, in one process or spread over workers."""
    from ronan_fast.imageio import list_images

    files: list[Path] = []
    errors: list[dict] = []
    seen: set[str] = set()
    for item in items:
        found = list_images([item], recursive=recursive)  # a missing path, an empty folder...: in .errors
        errors.extend({"path": str(e.path), "belongs": None, "verdict": "error", "error": e.reason}
                      for e in found.errors)
        for f in found:
            k = record_key(f)
            if k not in seen:
                seen.add(k)
                files.append(f)
    return files, errors
