"""Joining a torchrun job, and what one collective call shares between its workers.

* :func:`launched`, :func:`init`, :func:`shutdown`: this process as a :class:`Worker` of the job
  (one GPU or one CPU slot each), and leaving it together.
* :class:`_Channel`: one call's counters in the job's store (batches handed out as they are
  claimed, waits that poll the store instead of timing out in a collective), a broadcast from
  rank 0 and a gather; in a job of one, the same done locally.
* :func:`on_rank0`, :func:`raised_on_rank0`: work done once, its error raised on every worker.

The jobs themselves (:func:`ronan_fast.distributed.attribute_files`,
:func:`ronan_fast.distributed.fit`) and the public names of this module live in
:mod:`ronan_fast.distributed`.
"""

from __future__ import annotations

import itertools
import os
import pickle
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    import torch

__all__ = ["Worker", "DistributedError", "launched", "init", "shutdown", "on_rank0", "raised_on_rank0",
           "LEAVE_TIMEOUT_S"]

T = TypeVar("T")

#: how often a waiting worker looks at the store (seconds)
_POLL_S = 0.1


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
