"""Fault injection into the profile fit's checkpoint (``Attributor.fit(checkpoint=...)``).

A writer that fails in the middle of a run (the disk full while writing, a failed fsync, a failed
rename) and a process killed with SIGKILL at random moments, then resumed: every finished part
survives exactly once -- saved once, never lost, never inverted again, never changed -- and the
final profile equals an uninterrupted fit's.
"""

from __future__ import annotations

import errno
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ronan_fast import Attributor, LatentGenerator
from ronan_fast import _atomic

TESTS = Path(__file__).resolve().parent
sys.path.insert(0, str(TESTS))
import tiny_models  # noqa: E402

N, EVERY, SEED = 10, 3, 5  # four parts: images 0-2, 3-5, 6-8, 9
PARTS = ["0", "3", "6", "9"]
KILL_EVERY = 2  # the killed fit: five parts of two images
FAST = dict(steps=60, restarts=2)
#: SIGKILLs at most, at random moments of the fit, before it is let finish
KILLS = 6


#: one torch thread for this module's tests (tests/conftest.py): tiny batches run as fast on one
#: thread, and much faster on shared cores
ONE_THREAD = True


@pytest.fixture(scope="module")
def models():
    g = LatentGenerator(tiny_models.generator(), tiny_models.LATENT, name="tiny")
    r = LatentGenerator(tiny_models.reference(), tiny_models.LATENT, name="tiny ref")
    return g, r


def comparable(profile) -> dict:
    d = profile.to_dict()
    d.pop("created")
    return d


@pytest.fixture(scope="module")
def whole(models):
    """The profile of an uninterrupted fit without a checkpoint, and a clean checkpoint's parts."""
    g, r = models
    plain = Attributor(g, r, **FAST).fit(n=N, seed=SEED)
    return comparable(plain)


# ---------------------------------------------------------------------------- a writer that fails


class Injected(OSError):
    pass


def inject(monkeypatch, how: str, at: int) -> list[int]:
    """Make the ``at``-th atomic write of the run fail ``how``: "write" (the disk fills up half
    way through the temporary file), "fsync" (the flush to disk fails) or "replace" (the rename
    over the old file fails). Returns the count of writes seen so far (a one-item list)."""
    seen = [0]
    real_open, real_fsync, real_replace = open, os.fsync, os.replace

    class HalfFull:
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, text):
            self.f.write(text[: len(text) // 2])
            self.f.flush()
            raise Injected(errno.ENOSPC, "No space left on device (injected)")

    def opened(file, mode="r", *args, **kwargs):
        f = real_open(file, mode, *args, **kwargs)
        if "w" in mode:
            seen[0] += 1
            if how == "write" and seen[0] == at:
                return HalfFull(f)
        return f

    def fsync(fd):
        if how == "fsync" and seen[0] == at:
            raise Injected(errno.EIO, "Input/output error (injected)")
        return real_fsync(fd)

    def replace(src, dst):
        if how == "replace" and seen[0] == at:
            raise Injected(errno.EXDEV, "rename failed (injected)")
        return real_replace(src, dst)

    monkeypatch.setattr(_atomic, "open", opened, raising=False)
    monkeypatch.setattr(_atomic.os, "fsync", fsync)
    monkeypatch.setattr(_atomic.os, "replace", replace)
    return seen


@pytest.mark.parametrize("how", ["write", "fsync", "replace"])
def test_a_checkpoint_write_that_fails_loses_nothing_already_saved(models, whole, tmp_path, monkeypatch, how):
    g, r = models
    clean = tmp_path / "clean.json"
    Attributor(g, r, **FAST).fit(n=N, seed=SEED, checkpoint=clean, checkpoint_every=EVERY)
    clean_parts = json.loads(clean.read_text())["parts"]
    assert list(clean_parts) == PARTS
    for at in range(1, len(PARTS) + 1):  # the write after part at - 1 fails
        folder = tmp_path / f"{how}{at}"
        folder.mkdir()
        path = folder / "checkpoint.json"
        att = Attributor(g, r, **FAST)
        inject(monkeypatch, how, at)
        with pytest.raises(Injected):
            att.fit(n=N, seed=SEED, checkpoint=path, checkpoint_every=EVERY)
        monkeypatch.undo()
        assert [f.name for f in folder.iterdir()] == (["checkpoint.json"] if at > 1 else [])  # no temporary file
        saved = json.loads(path.read_text())["parts"] if at > 1 else {}
        assert saved == {k: clean_parts[k] for k in PARTS[: at - 1]}  # the parts before, as written

        inverted = []
        real = Attributor._invert

        def counting(self, model, images, stop, progress, stage, *args, **kwargs):
            inverted.append((stage, images.shape[0]))
            return real(self, model, images, stop, progress, stage, *args, **kwargs)

        monkeypatch.setattr(Attributor, "_invert", counting)
        resumed = att.fit(n=N, seed=SEED, checkpoint=path, checkpoint_every=EVERY)
        monkeypatch.undo()
        sizes = [min(EVERY, N - int(k)) for k in PARTS[at - 1:]]  # only the parts not saved
        assert [n for stage, n in inverted if stage == "model"] == sizes
        assert [n for stage, n in inverted if stage == "reference"] == sizes
        assert json.loads(path.read_text())["parts"] == clean_parts  # each part once, the same numbers
        assert comparable(resumed) == whole


def test_a_damaged_checkpoint_is_refused_not_trusted(models, tmp_path):
    from ronan_fast.attributor import CheckpointError

    g, r = models
    path = tmp_path / "c.json"
    Attributor(g, r, **FAST).fit(n=N, seed=SEED, checkpoint=path, checkpoint_every=EVERY)
    text = path.read_bytes()
    for damaged in [text[: len(text) // 2], b"", b"[]", b'{"parts": []}', b"\xff\xfe{", text.replace(b'"key": "', b'"key": "0')]:
        path.write_bytes(damaged)
        with pytest.raises(CheckpointError, match="checkpoint"):
            Attributor(g, r, **FAST).fit(n=N, seed=SEED, checkpoint=path, checkpoint_every=EVERY)


# ---------------------------------------------------------------------------- a process killed at random


CHILD = r"""
import hashlib, os, sys, time
sys.path.insert(0, sys.argv[5])
import torch
import tiny_models
from ronan_fast import Attributor, LatentGenerator

torch.set_num_threads(1)
checkpoint, out, log = sys.argv[1:4]
n, every, seed = (int(v) for v in sys.argv[4].split(","))
fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
say = lambda text: os.write(fd, (text + "\n").encode())
g = LatentGenerator(tiny_models.generator(), tiny_models.LATENT, name="tiny")
r = LatentGenerator(tiny_models.reference(), tiny_models.LATENT, name="tiny ref")
att = Attributor(g, r, steps=60, restarts=2)
images = att.sample(n, seed, purpose="profile")
digest = lambda x: hashlib.sha256(x.detach().cpu().float().numpy().tobytes()).hexdigest()
part_of = {digest(images[a:a + every]): a for a in range(0, n, every)}
real = Attributor._invert

def logged(self, model, x, stop, progress, stage, *args, **kwargs):
    a = part_of.get(digest(x))
    if a is not None and stage in ("model", "reference"):
        say(f"start {stage} {a} {time.monotonic():.4f}")
    return real(self, model, x, stop, progress, stage, *args, **kwargs)

Attributor._invert = logged
say("ready")
say(f"clock {time.monotonic():.4f}")
profile = att.fit(n=n, seed=seed, checkpoint=checkpoint, checkpoint_every=every)
profile.save(out)
say("done")
"""


def _run_child(tmp_path: Path, name: str, kill_after: float | None) -> tuple[bool, float]:
    """Run the fit in a child; with ``kill_after``, SIGKILL it that many seconds after it is
    ready (if it has not finished). Returns (killed, seconds from ready to the end)."""
    log = tmp_path / "log.txt"
    before = log.read_text().count("ready") if log.exists() else 0
    args = [str(tmp_path / f"{name}.checkpoint.json"), str(tmp_path / f"{name}.profile.json"), str(log),
            f"{N},{KILL_EVERY},{SEED}", str(TESTS)]
    proc = subprocess.Popen([sys.executable, "-c", CHILD, *args], stderr=subprocess.PIPE,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.monotonic() + 180
    while not (log.exists() and log.read_text().count("ready") > before):
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.monotonic() < deadline, "the child never got ready"
        time.sleep(0.02)
    ready = time.monotonic()
    try:
        proc.wait(timeout=180 if kill_after is None else kill_after)
    except subprocess.TimeoutExpired:
        if kill_after is None:
            proc.kill()
            raise
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stderr.close()
        return True, time.monotonic() - ready
    err = proc.stderr.read().decode()
    proc.stderr.close()
    assert proc.returncode == 0, err
    return False, time.monotonic() - ready


def _parts(path: Path) -> dict:
    if not path.exists():
        return {}
    return json.loads(path.read_text())["parts"]  # always whole: written atomically


def _runs(log: Path) -> list[list[str]]:
    """The log's lines, one list per run (each run starts with "ready")."""
    runs: list[list[str]] = []
    for line in log.read_text().splitlines():
        if line == "ready":
            runs.append([])
        elif runs:
            runs[-1].append(line)
    return runs


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
def test_a_fit_killed_at_random_moments_resumes_to_the_same_profile(tmp_path, whole):
    rng = random.Random(int(os.environ.get("RONAN_FAST_KILL_SEED", "20240607")))
    killed, took = _run_child(tmp_path, "reference", None)  # uninterrupted, to time the fit
    assert not killed
    reference = json.loads((tmp_path / "reference.profile.json").read_text())
    reference_parts = _parts(tmp_path / "reference.checkpoint.json")
    kill_parts = [str(a) for a in range(0, N, KILL_EVERY)]
    assert list(reference_parts) == kill_parts
    reference.pop("created")
    assert reference == whole  # a checkpointed fit in another process: the uninterrupted in-process one

    checkpoint = tmp_path / "victim.checkpoint.json"
    log = tmp_path / "log.txt"
    snapshots = [{}]
    kills = 0
    for attempt in range(KILLS + 1):
        kill_after = rng.uniform(0.0, took) if attempt < KILLS else None  # any moment of a whole fit's time
        was_killed, _ = _run_child(tmp_path, "victim", kill_after)
        parts = _parts(checkpoint)
        previous = snapshots[-1]
        assert {k: parts[k] for k in previous} == previous  # nothing saved is lost or changed
        assert all(parts[k] == reference_parts[k] for k in parts)
        starts = {line.split()[2] for line in _runs(log)[-1] if line.startswith("start")}
        assert not starts & set(previous), (starts, list(previous))  # a saved part is never inverted again
        snapshots.append(parts)
        kills += was_killed
        if not was_killed:
            break
    else:
        pytest.fail("the fit never finished")
    assert kills >= 1, "no kill landed before the fit finished; rerun with another RONAN_FAST_KILL_SEED"
    assert list(_parts(checkpoint)) == kill_parts  # every part, once
    final = json.loads((tmp_path / "victim.profile.json").read_text())
    final.pop("created")
    assert final == reference
    # every part was inverted, in the runs together, at most once after the run that saved it ended
    started = [line for run in _runs(log)[1:] for line in run if line.startswith("start model")]
    assert {s.split()[2] for s in started} == set(kill_parts)
