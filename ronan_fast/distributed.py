"""One job spread over processes, GPUs and machines with torch.distributed, as ``torchrun`` starts it.

Each worker is one process: one GPU (``cuda:LOCAL_RANK``, backend NCCL) or one CPU slot (gloo).
Work is handed out as it goes through the job's torch.distributed store, a shared counter of
batches (of profile parts) that each worker increments to take the next one, so a fast worker
takes more and none waits on a fixed slice. What to do is decided once, on rank 0, and
broadcast; what a worker finishes is on disk before it takes more, so a worker that dies loses
at most the batch it was working on, and the same job run again (with any number of workers, or
in one process) reads everything that was written and does only what is left.

* :func:`attribute_files` -- judge image files into a report: every worker appends its records
  to its own log (``REPORT.worker-RANK.jsonl``), then rank 0 merges all of them once into the
  finished report, in input order, with the HTML page and the grid.
* :func:`fit` -- a belonging profile, its images inverted in parts spread over the workers, each
  finished part in a file of its own; rank 0 gathers them, runs the retries and every worker
  gets the profile.
* :func:`launched`, :func:`init`, :func:`on_rank0`, :func:`shutdown` -- joining the job
  (defined in :mod:`ronan_fast.workers`, with the store channel the jobs share work through).

Every worker calls these functions, with the same arguments, in the same order. Outside a
process group (or in a group of one) they run in the calling process alone, resuming from the
same files. Verdicts and losses are those of one process: an image's inversion depends only on
its pixels, the seed, the settings, the device and the generator calls' fixed shape
(:mod:`ronan_fast.inversion.starts`, :mod:`ronan_fast.inversion.calls`). See docs/scaling.md.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

from ronan_fast.workers import (LEAVE_TIMEOUT_S, DistributedError, Worker, _Channel, init,  # noqa: F401
                                launched, on_rank0, raised_on_rank0, shutdown)

__all__ = ["Worker", "DistributedError", "launched", "init", "shutdown", "on_rank0", "raised_on_rank0",
           "attribute_files", "fit", "parts_dir", "PART_GLOB"]

#: profile parts in a parts folder: ``part-START.json``, START the index of the part's first image
PART_GLOB = "part-*.json"
#: how often rank 0's progress bar reads the job's count of finished images (seconds)
_BAR_POLL_S = 0.5


# ---------------------------------------------------------------------------- progress


class _JobBar:
    """Rank 0's bar of the whole job's images: every worker's finished batches (the store's
    count) plus rank 0's batch in flight. The other workers show none."""

    def __init__(self, channel: _Channel, total: int, desc: str, stages: tuple[str, ...], enabled: bool | None):
        from ronan_fast.progress import ImageProgress

        self.channel, self.stages = channel, stages
        self.bar = ImageProgress(total, desc, enabled) if channel.rank == 0 else None
        self._finished, self._read_at, self._inflight = 0, -math.inf, {}

    def _finished_now(self) -> int:
        if time.monotonic() - self._read_at > _BAR_POLL_S:
            self._finished, self._read_at = self.channel.add("images", 0), time.monotonic()
        return self._finished

    def _show(self, n: float, stage: str) -> None:
        # a one-stage part at offset n shows n with the stage's name
        self.bar.part(n, (stage,))(stage, 0, 0)

    def batch(self, offset: int = 0) -> Callable[[str, float, int], None] | None:
        """The ``progress`` callback for one batch (its images counted from ``offset``)."""
        if self.bar is None or not self.bar.enabled:
            return None
        self._inflight = {}

        def report(stage: str, done: float, total: int) -> None:
            if stage in self.stages:
                self._inflight[stage] = done - offset
            own = sum(self._inflight.get(s, 0.0) for s in self.stages) / len(self.stages)
            self._show(self._finished_now() + own, stage)

        return report

    def finished(self, n: int) -> None:
        """A batch of ``n`` images is done and on disk."""
        self.channel.add("images", n)
        self._read_at = -math.inf

    def tick(self) -> None:
        """Rank 0 waits for the others: show their progress."""
        if self.bar is not None and self.bar.enabled:
            self._show(self._finished_now(), "other workers")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# ---------------------------------------------------------------------------- inspect


class _Kept:
    """What one worker keeps of its images for the HTML page and the grid: the first
    ``html_max`` (``grid_max``) it judged, each with its position in the job's list. The first
    ``html_max`` of the whole job are among them, whatever worker judged each."""

    def __init__(self, html_max: int, grid_max: int):
        self.html_max, self.grid_max = html_max, grid_max
        self.items: list[tuple[int, str, dict | None, list | None, str | None]] = []
        self._thumbs = self._rows = 0

    def add(self, res, records: list[dict], positions: dict[str, int]) -> None:
        from ronan_fast.reports.files import record_key
        from ronan_fast.reports.html import png_bytes

        for i in range(len(res)):
            r = records[i]
            thumbs = row = label = None
            if self._thumbs < self.html_max:
                ref = res.reference_reconstruction
                thumbs = {"image": png_bytes(res.images[i]), "model": png_bytes(res.reconstruction[i]),
                          "reference": None if ref is None else png_bytes(ref[i])}
                self._thumbs += 1
            if self._rows < self.grid_max:
                row = [res.images[i].clone(), res.reconstruction[i].clone()]  # not views of the batch
                if res.reference_reconstruction is not None:
                    row.append(res.reference_reconstruction[i].clone())
                label = f"{Path(r['path']).name}  {r['verdict']}  G={float(res.statistic[i]):.3g}"
                self._rows += 1
            if thumbs is not None or row is not None:
                key = record_key(r["path"])
                self.items.append((positions[key], key, thumbs, row, label))


def attribute_files(
    attributor,
    paths: Sequence[str | os.PathLike],
    output: str | os.PathLike,
    *,
    batch: int = 64,
    recursive: bool = False,
    wait: bool = False,
    html: str | os.PathLike | None = None,
    html_max: int = 500,
    grid: str | os.PathLike | None = None,
    grid_max: int = 32,
    progress: bool | None = None,
) -> list[dict] | None:
    """Judge the image files ``paths`` (files and folders, ``recursive`` searches sub-folders)
    with every worker of the job into the report ``output`` (.jsonl, .json or .csv); every
    worker calls it with the same arguments. Returns the report's records on rank 0, None on
    the other workers.

    Rank 0 reads the report and every log of it once (:class:`~ronan_fast.reports.session.ReportSession`;
    it holds the report's lock until the end, ``wait``: wait for another writer instead of
    raising :class:`~ronan_fast.reports.files.ReportLocked`), lists the files and broadcasts
    those still to judge. Workers take ``batch`` images at a time from a shared counter, append
    each batch's records to their own log (``REPORT.worker-RANK.jsonl``, flushed and synced) and
    keep the first ``html_max`` (``grid_max``) images' thumbnails. Once every worker is done,
    rank 0 writes the finished report (every log merged, one record per image, in input order),
    the HTML page ``html`` with the run's first ``html_max`` images and the grid ``grid`` of its
    first ``grid_max``, and removes the logs. ``progress``: rank 0's bar of the whole job's
    images (None: when stderr is a terminal).
    """
    from ronan_fast.reports.files import SUFFIXES, ReportLock, ReportLog, record_key
    from ronan_fast.reports.session import ReportSession, list_inputs, worker_log_path

    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch must be an integer >= 1, got {batch!r}")
    for name, value in (("html_max", html_max), ("grid_max", grid_max)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
    output = Path(output)
    if output.suffix.lower() not in SUFFIXES:
        raise ValueError(f"output {output}: a report ends in {', '.join(SUFFIXES)}")
    if isinstance(paths, (str, bytes, os.PathLike)):
        paths = [paths]
    paths = list(paths)
    if not paths:
        raise ValueError("no images given: pass image files or folders")
    channel = _Channel("inspect")

    def plan():
        header = attributor.report_header()
        files, unreadable = list_inputs(paths, recursive)
        for r in unreadable:
            r["profile_id"] = header["profile"]["id"]
        session = ReportSession(output, header, log=worker_log_path(output, 0), wait=wait)
        try:
            done = session.judged()
            todo = [str(f) for f in files if record_key(f) not in done]
            if len(todo) < len(files):
                print(f"resuming: {len(files) - len(todo)} of {len(files)} images already in the report; skipping "
                      "them", file=sys.stderr)
            session.append(unreadable)
        except BaseException:
            session.close()
            raise
        order = [r["path"] for r in unreadable] + [str(f) for f in files]
        return (session, order), {"header": header, "todo": todo}

    local, shared = channel.rank0(plan)
    session, order = local if local is not None else (None, None)
    header, todo = shared["header"], shared["todo"]
    pid = header["profile"]["id"]
    lock = log = None
    bar = _JobBar(channel, len(todo), "images", attributor.stages(), progress)
    try:
        if session is not None:
            append = session.append
        else:
            own = worker_log_path(output, channel.rank)
            lock = ReportLock(own)
            log = ReportLog(own, header)
            append = log.append
        kept = _Kept(html_max if html is not None else 0, grid_max if grid is not None else 0)
        for i in channel.claims(math.ceil(len(todo) / batch)):
            files = todo[i * batch:(i + 1) * batch]
            res = attributor.attribute(files, progress=bar.batch())
            records = res.to_records(profile_id=pid)
            append(records)
            bar.finished(len(files))
            kept.add(res, records, {record_key(f): i * batch + j for j, f in enumerate(files)})
        if log is not None:
            log.close()
            lock.release()
            log = lock = None
        channel.wait_all("finished", bar.tick)
        bar.close()
        gathered = channel.gather(kept.items)

        def finish():
            records = session.merge(order, wait=wait, reread=True)
            items = sorted((it for part in gathered for it in part), key=lambda it: it[0])
            if html is not None:
                from ronan_fast.reports.html import write_html

                shown = dict(itertools.islice(((k, t) for _, k, t, _, _ in items if t is not None), html_max))
                thumbs = {i: shown[k] for i, r in enumerate(records) if (k := record_key(r["path"])) in shown}
                write_html(html, header, records, {**header["profile"], "threshold": header["threshold"]}, thumbs)
            rows = [(row, label) for _, _, _, row, label in items if row is not None][:grid_max]
            if grid is not None and rows:
                from ronan_fast.imageio import save_grid

                titles = ["image", "model"] + (["reference"] if len(rows[0][0]) > 2 else [])
                save_grid([r for r, _ in rows], grid, labels=[lb for _, lb in rows], column_titles=titles)
            return records, None

        records, _ = channel.rank0(finish)
        return records
    finally:
        bar.close()
        if log is not None:
            log.close()
        if lock is not None:
            lock.release()
        if session is not None:
            session.close()


# ---------------------------------------------------------------------------- profile


def parts_dir(output: str | os.PathLike) -> Path:
    """The folder of a profile job's parts for the profile ``output``: ``OUTPUT.parts``."""
    output = Path(output)
    return output.with_name(output.name + ".parts")


def fit(
    attributor,
    n: int = 100,
    seed: int = 0,
    parts: str | os.PathLike | None = None,
    *,
    part: int = 50,
    edit: str | None = None,
    progress: bool | None = None,
    checkpoint: str | os.PathLike | None = None,
):
    """The belonging profile of ``attributor``'s model, fitted by every worker of the job
    (:meth:`~ronan_fast.attributor.Attributor.fit`'s ``n``, ``seed`` and ``edit``); every worker
    calls it with the same arguments and gets the profile, which it keeps as
    ``attributor.profile``.

    Rank 0 generates the ``n`` profile images and broadcasts them. Workers take parts of
    ``part`` images from a shared counter, invert them with the reference model and the model,
    and save each part's losses atomically to ``parts/part-START.json``; parts already in that
    folder for the same job (and in ``checkpoint``, a file of ``Attributor.fit(checkpoint=...)``
    with the same part size) are not inverted again, so a job stopped anywhere resumes with any
    number of workers. Rank 0 then runs the retries and computes the profile: the one
    ``Attributor.fit`` gives (losses bit for bit on CPU with the same threads per process and
    ``call_rows``). ``parts``: default ``PROFILE.parts`` is the caller's to choose; the folder is
    left in place. A part of another job or a damaged one raises
    :class:`~ronan_fast.profile_fitting.CheckpointError`. ``progress``: rank 0's bar.
    """
    from ronan_fast.profile_fitting import profile_job, read_checkpoint, read_part_files

    if parts is None:
        raise ValueError("parts: the folder where each finished part of the profile is saved")
    folder = Path(parts)
    channel = _Channel("profile")
    with warnings.catch_warnings():
        if channel.rank != 0:  # rank 0 says it once
            warnings.simplefilter("ignore")
        attributor._check_fit(n, seed, edit, part, "part")
    bar = _JobBar(channel, n, "profile", attributor.stages(), progress)
    try:
        def plan():
            images = attributor._profile_images(n, seed, edit, None)
            key, job = profile_job(attributor, images, seed, edit, part)
            done = read_part_files(folder, key, n, part, attributor.reference is not None)
            if checkpoint is not None:
                saved = read_checkpoint(Path(checkpoint), key, n, part, attributor.reference is not None)
                done.update({int(a): p for a, p in saved.items() if int(a) not in done})
            folder.mkdir(parents=True, exist_ok=True)
            todo = [a for a in range(0, n, part) if a not in done]
            return done, {"images": images, "key": key, "job": job, "todo": todo}

        done, shared = channel.rank0(plan)
        images, key, job, todo = shared["images"], shared["key"], shared["job"], shared["todo"]
        from ronan_fast._atomic import write_text

        for i in channel.claims(len(todo)):
            a = todo[i]
            b = min(n, a + part)
            cb = bar.batch(a)
            losses = attributor._part_losses(images, a, b, cb)
            write_text(folder / f"part-{a}.json",
                       json.dumps({"key": key, "job": job, "start": a, "stop": b, **losses}))
            bar.finished(b - a)
        channel.wait_all("finished", bar.tick)
        bar.close()

        def finish():
            import torch

            found = {**done, **read_part_files(folder, key, n, part, attributor.reference is not None)}
            missing = [a for a in range(0, n, part) if a not in found]
            if missing:
                raise RuntimeError(f"profile parts starting at {missing} are missing from {folder} after every "
                                   "worker finished; run the job again")
            raw = torch.tensor([v for a in sorted(found) for v in found[a]["model"]], dtype=torch.float64)
            ref = None
            if attributor.reference is not None:
                ref = torch.tensor([v for a in sorted(found) for v in found[a]["reference"]], dtype=torch.float64)
            on = None
            if progress is not False:
                from ronan_fast.progress import ImageProgress

                retry_bar = ImageProgress(n, "profile", progress)
                on = retry_bar.part(0, ())
            try:
                profile = attributor._profile_from_losses(images, raw, ref, seed, edit, on)
            finally:
                if on is not None:
                    retry_bar.close()
            return None, profile

        _, profile = channel.rank0(finish)
        attributor.profile = profile
        return profile
    finally:
        bar.close()
