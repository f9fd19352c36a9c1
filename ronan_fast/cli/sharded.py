"""``inspect`` and ``profile`` run as one of several workers that torchrun started (docs/scaling.md).

Under ``torchrun --nproc-per-node=N ronan-fast ...`` (``WORLD_SIZE`` > 1) each process is one
worker of one job (:mod:`ronan_fast.distributed`): ``--device cuda`` gives each its own GPU,
``cuda:LOCAL_RANK``; otherwise each computes on the CPU. Rank 0 alone shows a progress bar (of
the whole job's images), prints the table and the summary, and reports an error that stops the
job; the other workers stay quiet.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import time
from pathlib import Path

from ronan_fast import distributed
from ronan_fast.cli.common import EXIT_LOCKED, EXIT_MISMATCH, EXIT_OK, EXIT_USAGE, UsageError, err


def join(args, command: str, output: Path | None) -> distributed.Worker | None:
    """This process's worker when torchrun started several (``--device`` becomes its own
    device), else None. ``inspect`` needs ``-o`` then: a usage error before joining."""
    try:
        if not distributed.launched():
            return None
        if output is None:
            raise UsageError(f"{command} under torchrun ({os.environ.get('WORLD_SIZE')} workers) writes its report "
                             "with -o: give -o REPORT (.jsonl, .json or .csv)")
        worker = distributed.init(args.device)
    except distributed.DistributedError as e:
        raise UsageError(str(e)) from None
    if args.device is not None:
        args.device = str(worker.device)
    atexit.register(distributed.shutdown)
    return worker


def _code(error: BaseException) -> int:
    """The exit code of an error rank 0 reported (as the command's own error handling gives it)."""
    from ronan_fast.profile import ProfileMismatchError
    from ronan_fast.reports.files import ReportLocked

    if isinstance(error, ProfileMismatchError):
        return EXIT_MISMATCH
    if isinstance(error, ReportLocked):
        return EXIT_LOCKED
    return EXIT_USAGE


# ---------------------------------------------------------------------------- inspect


def inspect(worker: distributed.Worker, att, header: dict, args, output: Path, html: Path | None,
            grid: Path | None) -> int:
    """``ronan-fast inspect`` as one worker: the report, the HTML page and the grid from rank 0.
    Exit code 0 once the report is written, some images unreadable or not: torchrun takes any
    other code for a failed worker (and restarts the job with --max-restarts)."""
    from ronan_fast.cli.report_files import print_summary, print_table

    grid_before = _mtime(grid)
    try:
        records = distributed.attribute_files(
            att, args.images, output, batch=args.batch, recursive=args.recursive, wait=args.wait, html=html,
            html_max=args.html_max, grid=grid, grid_max=args.grid_max, progress=False if args.quiet else None)
    except KeyboardInterrupt:
        if worker.is_main:
            err(f"interrupted; the finished records are in the report's logs beside {output}; run the same command "
                "again (with any number of workers) to resume")
        raise
    except Exception as e:
        if distributed.raised_on_rank0(e):
            return _code(e)
        raise
    if records is None:
        return EXIT_OK
    print_table(records, header)
    print_summary(records, header, output=output, html=html,
                  grid=grid if grid is not None and _mtime(grid) != grid_before else None)
    return EXIT_OK


def _mtime(path: Path | None) -> int | None:
    try:
        return None if path is None else path.stat().st_mtime_ns
    except OSError:
        return None


# ---------------------------------------------------------------------------- profile


def profile(worker: distributed.Worker, att, args, out: Path) -> int:
    """``ronan-fast profile`` as one worker: rank 0 holds the profile's lock, saves it and
    removes the parts."""
    from ronan_fast.reports.files import ReportLock

    t0 = time.perf_counter()
    try:
        lock = distributed.on_rank0(lambda: ReportLock(out, wait=args.wait))
        try:
            prof = fit(att, args, out, worker)
            distributed.on_rank0(lambda: (prof.save(out), remove_parts(out)))
        finally:
            if lock is not None:
                lock.release()
    except Exception as e:
        if distributed.raised_on_rank0(e):
            return _code(e)
        raise
    if worker.is_main:
        print(prof.describe())
        print(f"saved {out} ({time.perf_counter() - t0:.1f} s, {worker.world_size} workers)")
    return EXIT_OK


def fit(att, args, out: Path, worker: distributed.Worker | None = None):
    """The profile from ``OUT.parts/`` (and a single process's ``OUT.partial.json``), the parts
    missing from them inverted by the workers; parts of another job are removed with a note."""
    from ronan_fast.attributor import CheckpointError

    partial, folder = Path(f"{out}.partial.json"), distributed.parts_dir(out)
    main = worker is None or worker.is_main

    def go():
        return distributed.fit(att, args.n, args.seed, folder, part=args.part, edit=args.edit,
                               progress=False if args.quiet else None,
                               checkpoint=partial if partial.exists() else None)

    try:
        try:
            return go()
        except CheckpointError as e:
            note = f"note: {e}; starting afresh"

            def clear():
                err(note)
                remove_parts(out)

            distributed.on_rank0(clear)
            return go()
    except KeyboardInterrupt:
        if main and any(folder.glob(distributed.PART_GLOB)):
            err(f"interrupted; the finished parts are in {folder}; run the same command again (with any number "
                "of workers) to resume")
        raise
    except ValueError as e:  # what the model makes (its range, its outputs) is not usable
        if isinstance(e, CheckpointError) or distributed.raised_on_rank0(e):
            raise
        raise UsageError(str(e)) from None


def remove_parts(out: Path) -> None:
    """Remove a profile job's saved parts: ``OUT.parts/`` (its parts, and temporary files a killed
    worker left) and ``OUT.partial.json``."""
    Path(f"{out}.partial.json").unlink(missing_ok=True)
    folder = distributed.parts_dir(out)
    if not folder.is_dir():
        return
    for f in [*folder.glob(distributed.PART_GLOB), *folder.glob(".part-*.json.*.tmp")]:
        f.unlink(missing_ok=True)
    with contextlib.suppress(OSError):  # something else in it: left as it is
        folder.rmdir()
