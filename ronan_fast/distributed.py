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
* :func:`launched`, :func:`init`, :func:`on_rank0`, :func:`shutdown` -- joining the job.

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
import pickle
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    import torch
__all__ = ["Worker", "DistributedError", "launched", "init", "shutdown", "on_rank0", "raised_on_rank0",
           "attribute_files", "fit", "parts_dir", "PART_GLOB"]

T = TypeVar("T")

#: profile parts in a parts folder: ``part-START.json``, START the index of the part's first image
PART_GLOB = "part-*.json"
#: how often a waiting worker looks at the store (seconds)
_POLL_S = 0.1
#: how often rank 0's progress bar reads the job's count of finished images (seconds)
_BAR_POLL_S = 0.5


class DistributedError(ValueError):
    """The job cannot be joined as started: a bad torchrun environment, more workers than GPUs."""


@dataclass(frozen=True)
class Worker:
    """This process in the job: its ``rank`` of ``world_size``, its ``local_rank`` on its
    machine, and the ``device`` it computes on."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


# ---------------------------------------------------------------------------- joining


def _env_int(name: str, default: int) -> int:
    text = os.environ.get(name)
    if text is None or text == "":
        return default
    try:
        value = int(text)
    except ValueError:
        raise DistributedError(f"{name}={text!r} in the environment: expected a whole number (torchrun sets it)") \
            from None
    if value < 0:
        raise DistributedError(f"{name}={value} in the environment: expected a number >= 0")
    return value


def launched() -> bool:
    """Whether this process is one of several workers that torchrun started (``WORLD_SIZE`` > 1)."""
    return _env_int("WORLD_SIZE", 1) > 1


def _dist_ready() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def init(device: str | torch.device | None = None, *, backend: str | None = None,
         timeout_s: float | None = None) -> Worker:
    """Join the job: this process's :class:`Worker`.

    Under torchrun (``WORLD_SIZE`` > 1) it starts the default process group if it is not
    started yet: backend NCCL when ``device`` is a CUDA device, else gloo (``backend``
    overrides). ``device`` ``"cuda"`` becomes ``cuda:LOCAL_RANK``, one GPU per worker, made the
    current device; a CUDA device with an index is refused with several workers. Without
    torchrun (and no process group) it returns a worker of a job of one.
    """
    import torch

    dev = torch.device("cpu") if device is None else torch.device(device)
    if _dist_ready():
        import torch.distributed as dist

        rank, world = dist.get_rank(), dist.get_world_size()
    else:
        rank, world = _env_int("RANK", 0), _env_int("WORLD_SIZE", 1)
    local = _env_int("LOCAL_RANK", rank if world > 1 else 0)
    if world > 1 and rank >= world:
        raise DistributedError(f"RANK={rank} but WORLD_SIZE={world}: not a torchrun environment")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise DistributedError(f"device {dev}: CUDA is not available here")
        if world > 1:
            if dev.index is not None:
                raise DistributedError(f"device {dev}: with several workers give the device type, cuda; worker "
                                       "LOCAL_RANK uses cuda:LOCAL_RANK")
            count = torch.cuda.device_count()
            if local >= count:
                raise DistributedError(f"worker LOCAL_RANK={local} has no GPU of its own: this machine has {count}; "
                                       f"start at most {count} workers per machine (--nproc-per-node)")
            dev = torch.device("cuda", local)
        elif dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(dev)
    if world > 1 and not _dist_ready():
        import datetime

        import torch.distributed as dist
        from torch.distributed.constants import default_pg_timeout

        timeout = default_pg_timeout if timeout_s is None else datetime.timedelta(seconds=timeout_s)
        backend = backend or ("nccl" if dev.type == "cuda" else "gloo")
        store = _attempt_store(world, timeout)
        if store is None:  # env://, as torch.distributed starts a group by default
            dist.init_process_group(backend, timeout=timeout)
        else:
            dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=timeout)
    return Worker(rank=rank, world_size=world, local_rank=local, device=dev)


def _attempt_store(world: int, timeout):
    """Under torchrun's agent store: a client of it, its keys under this attempt's own prefix.

    torchrun keeps one store for every attempt of a job (the c10d rendezvous shares its server
    across rounds) while the default process group's keys are not told apart by attempt: after
    a restart a worker can read a dead worker's address and fail to connect. None elsewhere."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    import torch.distributed as dist

    host, port = os.environ.get("MASTER_ADDR"), _env_int("MASTER_PORT", -1)
    if not host or port < 0:
        return None
    base = dist.TCPStore(host, port, world, is_master=False, timeout=timeout)
    return dist.PrefixStore(f"ronan_fast/attempt-{_env_int('TORCHELASTIC_RESTART_COUNT', 0)}", base)


#: at most this long a worker leaving the job waits for the others to leave too (seconds)
LEAVE_TIMEOUT_S = 30.0


def shutdown() -> None:
    """Leave the job: wait (through the store, at most :data:`LEAVE_TIMEOUT_S`) until every
    worker has got here, then destroy the default process group if there is one.

    A worker that tore down its gloo connections while a peer was still finishing the last
    collective with it could abort the peer (``terminate called without an active exception``),
    and torchrun would then fail a finished job; leaving together leaves no collective in flight."""
    if _dist_ready():
        import torch.distributed as dist

        _leave_together(LEAVE_TIMEOUT_S)
        dist.destroy_process_group()
        _OBJECT_GROUPS.clear()


def _leave_together(timeout_s: float) -> None:
    """Count this worker out in the store and wait until every worker has, or ``timeout_s``
    passed; best effort (a store gone with its host ends the wait)."""
    import torch.distributed as dist
    from torch.distributed import distributed_c10d

    world = dist.get_world_size()
    if world < 2:
        return
    key = (f"ronan_fast/{os.environ.get('TORCHELASTIC_RUN_ID', 'job')}/"
           f"restart-{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/leaving")
    try:
        store = distributed_c10d._get_default_store()
        store.add(key, 1)
        deadline = time.monotonic() + timeout_s
        while store.add(key, 0) < world and time.monotonic() < deadline:
            time.sleep(_POLL_S)
    except Exception:  # the store's host (rank 0 without torchrun's agent store) may be gone
        pass


# ---------------------------------------------------------------------------- one call's channel

#: calls of this module's collective functions in this process: every worker makes the same calls
#: in the same order, so the n-th call's store keys are the same on every worker and new on each call
_CALLS = itertools.count()
#: a gloo group for Python objects beside an NCCL default group, per default group
_OBJECT_GROUPS: dict[int, Any] = {}


def _object_group():
    import torch.distributed as dist

    if dist.get_backend() == "gloo":
        return None
    world = dist.group.WORLD
    if id(world) not in _OBJECT_GROUPS:  # collective: every worker gets here at the same call
        _OBJECT_GROUPS[id(world)] = dist.new_group(backend="gloo")
    return _OBJECT_GROUPS[id(world)]


class _Channel:
    """What one collective call shares between the workers: counters in the job's store under
    keys of its own (torchrun's run id and restart count, the call's number), broadcasts and a
    gather. In a job of one, the same done locally."""

    def __init__(self, what: str):
        self.spread = _dist_ready()
        if self.spread:
            import torch.distributed as dist
            from torch.distributed import distributed_c10d

            self.rank, self.world = dist.get_rank(), dist.get_world_size()
            self.spread = self.world > 1
        if not self.spread:
            self.rank, self.world = 0, 1
        call = next(_CALLS)
        self.prefix = (f"ronan_fast/{os.environ.get('TORCHELASTIC_RUN_ID', 'job')}/"
                       f"restart-{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/{call}-{what}/")
        self._counts: dict[str, int] = {}
        self._steps = itertools.count()
        if self.spread:
            self.store = distributed_c10d._get_default_store()
            self.group = _object_group()

    def add(self, name: str, n: int) -> int:
        """Add ``n`` to the shared counter ``name``; its new value."""
        if self.spread:
            return int(self.store.add(self.prefix + name, n))
        self._counts[name] = self._counts.get(name, 0) + n
        return self._counts[name]

    def claims(self, count: int) -> Iterator[int]:
        """The indices in ``range(count)`` this worker takes, one at a time, each taken by one worker."""
        while True:
            i = self.add("claims", 1) - 1
            if i >= count:
                return
            yield i

    def wait_all(self, name: str, tick: Callable[[], None] | None = None) -> None:
        """Wait until every worker got here (polling the store, so no collective times out while a
        worker finishes a long batch)."""
        self.add(name, 1)
        while self.spread and self.add(name, 0) < self.world:
            if tick is not None:
                tick()
            time.sleep(_POLL_S)

    def rank0(self, fn: Callable[[], tuple[T, Any]]) -> tuple[T | None, Any]:
        """Run ``fn`` on rank 0: ``(local, shared) = fn()``; returns ``(local, shared)`` there and
        ``(None, shared)`` on the others. An exception of ``fn`` is raised on every worker."""
        step = f"rank0-{next(self._steps)}"
        local, box, error = None, None, None
        if self.rank == 0:
            try:
                local, shared = fn()
                box = ("ok", shared)
            except Exception as e:
                error, box = e, ("error", _portable(e))
            if self.spread:
                self.add(step, 1)
        else:
            while self.add(step, 0) < 1:  # rank 0 may work for long: wait on the store, not in a collective
                time.sleep(_POLL_S)
        if self.spread:
            import torch.distributed as dist

            holder = [box]
            dist.broadcast_object_list(holder, src=0, group=self.group)
            box = holder[0]
        if error is not None:
            raise error
        if box[0] == "error":
            box[1].ronan_fast_rank0 = True
            raise box[1]
        return local, box[1]

    def gather(self, obj: Any) -> list | None:
        """Every worker's ``obj`` on rank 0 (in rank order); None on the others."""
        if not self.spread:
            return [obj]
        import torch.distributed as dist

        out = [None] * self.world if self.rank == 0 else None
        dist.gather_object(obj, out, dst=0, group=self.group)
        return out


def _portable(e: Exception) -> Exception:
    """``e`` if it survives pickling with its message, else a RuntimeError that says it."""
    try:
        copy = pickle.loads(pickle.dumps(e))
        if type(copy) is type(e) and str(copy) == str(e):
            return e
    except Exception:
        pass
    return RuntimeError(f"{type(e).__name__}: {e}")


def raised_on_rank0(error: BaseException) -> bool:
    """Whether ``error`` was raised on rank 0 and handed to this worker (which can then stay
    quiet: rank 0 reports it)."""
    return bool(getattr(error, "ronan_fast_rank0", False))


def on_rank0(fn: Callable[[], T]) -> T | None:
    """``fn()`` on rank 0 only (saving a file, taking a lock); None on the other workers, which
    wait for it. An exception of ``fn`` is raised on every worker (on the others, with
    :func:`raised_on_rank0` true). Every worker calls it."""
    local, _ = _Channel("on-rank0").rank0(lambda: (fn(), None))
    return local


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
