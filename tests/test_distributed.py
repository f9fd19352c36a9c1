"""One job spread over processes with torchrun: same verdicts, losses and profile as one process;
a worker killed mid-job loses at most its batch; the job resumes with any number of workers.

The sharded runs start ``torch.distributed.run`` (torchrun's module) with this interpreter, CPU
workers of one thread each (gloo), as CI can; the single-process runs use the same threads and
rows per generator call, so every loss must be equal bit for bit.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ronan_fast import cli, distributed
from ronan_fast.reports.files import ReportError, read_report

TESTS = Path(__file__).resolve().parent
sys.path.insert(0, str(TESTS))

import tiny_models  # noqa: E402

CLI_ONE_THREAD = ["--threads", "1", "--call-rows", "8", "-q"]
DEFAULT_FAST = ["--settings", "authors", "--steps", "100"]
TINY = ["--model", "tiny_models:generator", "--latent-shape", "3", "--reference", "tiny_models:reference"]
TIMEOUT_S = 240


#: one torch thread for this module's tests (tests/conftest.py): tiny batches run as fast on one
#: thread, and much faster on shared cores
ONE_THREAD = True


def torchrun(workers: int, argv, cwd: Path, max_restarts: int = 0, wait: bool = True):
    """``ronan-fast ARGV`` as ``workers`` CPU workers of one thread (gloo) under torchrun."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={workers}",
           f"--max-restarts={max_restarts}", "-m", "ronan_fast.cli", *[str(a) for a in argv]]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(
        [str(TESTS), *filter(None, [os.environ.get("PYTHONPATH")])])}
    if not wait:
        return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)


def one_process(argv, capsys) -> tuple[int, str, str]:
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(autouse=True)
def importable_tests(monkeypatch):
    monkeypatch.syspath_prepend(str(TESTS))


def _without_created(d: dict) -> dict:
    return {k: v for k, v in d.items() if k != "created"}


# ---------------------------------------------------------------------------- the bundled model


@pytest.fixture(scope="module")
def default_job(tmp_path_factory):
    """A profile of the bundled model (short settings), and a folder of its own images, real
    Fashion-MNIST test images and a file that is not an image."""
    from ronan_fast import Attributor
    from ronan_fast.calibration import default_generator
    from ronan_fast.default import default_sample_paths
    from ronan_fast.imageio import save_image

    root = tmp_path_factory.mktemp("default_job")
    images = root / "images"
    images.mkdir()
    own = Attributor(default_generator(), None).sample(5, seed=7)
    for i in range(5):
        save_image(own[i], images / f"own{i}.png")
    for p in default_sample_paths()[:5]:
        shutil.copy(p, images / p.name)
    (images / "broken.png").write_text("not an image")
    code = cli.main(["profile", "--model", "default", *DEFAULT_FAST, "-n", "6", "--part", "2", *CLI_ONE_THREAD,
                     "-o", str(root / "profile.json")])
    assert code == 0
    return root


def test_sharded_inspect_gives_the_single_process_report(default_job, tmp_path, capsys):
    args = ["inspect", "--profile", default_job / "profile.json", "--model", "default", default_job / "images",
            "missing.png", "--batch", "2", *CLI_ONE_THREAD]
    code, out, _ = one_process([*args, "-o", tmp_path / "one.json", "--html", tmp_path / "one.html",
                                "--grid", tmp_path / "one.png", "--grid-max", "4", "--html-max", "7"], capsys)
    assert code == 1  # the broken file and the missing path
    p = torchrun(2, [*args, "-o", "two.json", "--html", "two.html", "--grid", "two.png", "--grid-max", "4",
                     "--html-max", "7"], cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    header1, records1 = read_report(tmp_path / "one.json")
    header2, records2 = read_report(tmp_path / "two.json")
    assert len(records1) == 12 and sum(r["verdict"] == "error" for r in records1) == 2
    assert {r["verdict"] for r in records1} == {"belongs", "does not belong", "error"}
    # paths are as given: relative to each run's folder for the missing one
    strip = lambda rs: [{**r, "path": Path(r["path"]).name} for r in rs]  # noqa: E731
    assert strip(records2) == strip(records1)  # every verdict, loss and statistic, bit for bit, in input order
    assert _without_created(header2) == _without_created(header1)
    assert (tmp_path / "two.png").read_bytes() == (tmp_path / "one.png").read_bytes()
    page1 = (tmp_path / "one.html").read_text().replace(header1["created"], "")
    page2 = (tmp_path / "two.html").read_text().replace(header2["created"], "")
    assert page2.count("data:image/png") == page1.count("data:image/png") > 0
    assert page2.replace(str(tmp_path) + os.sep, "") == page1.replace(str(tmp_path) + os.sep, "")
    assert not list(tmp_path.glob("two.json.*.jsonl"))  # the logs are merged and removed
    # rank 0 alone prints the table and the summary
    assert p.stdout.count("images judged") == 1 and "10 images judged" in p.stdout


def test_sharded_profile_is_the_single_process_profile(default_job, tmp_path, capsys):
    args = ["profile", "--model", "default", *DEFAULT_FAST, "-n", "7", "--part", "2", "--seed", "3", *CLI_ONE_THREAD]
    code, _, _ = one_process([*args, "-o", tmp_path / "one.json"], capsys)
    assert code == 0
    p = torchrun(2, [*args, "-o", "two.json"], cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    one = json.loads((tmp_path / "one.json").read_text())
    two = json.loads((tmp_path / "two.json").read_text())
    assert _without_created(two) == _without_created(one)
    assert not (tmp_path / "two.json.parts").exists() and not (tmp_path / "two.json.partial.json").exists()
    assert p.stdout.count("saved two.json") == 1 and p.stderr.count("warning: a belonging profile of 7") == 1


@pytest.mark.skipif(__import__("importlib").util.find_spec("diffusers") is None, reason="needs diffusers")
def test_a_warm_started_latent_diffusion_job_spread_over_workers_is_the_single_process_one(tmp_path, capsys,
                                                                                           monkeypatch):
    """The zoo's AutoencoderKL (a diffusers folder) with its own encoder as the warm start: the
    profile and the verdicts of two workers are those of one process, bit for bit."""
    from ronan_fast.imageio import save_image
    from ronan_fast.zoo import ZOO, zoo_adapter

    model = ["--model", f"diffusers:{ZOO['aekl64-photos'].path}", "--reference", "none"]
    args = ["profile", *model, "-n", "4", "--part", "2", "--steps", "20", "--retries", "0", "--warm-start",
            *CLI_ONE_THREAD]
    code, _, err = one_process([*args, "-o", tmp_path / "one.json"], capsys)
    assert code == 0, err
    p = torchrun(2, [*args, "-o", "two.json"], cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    one = json.loads((tmp_path / "one.json").read_text())
    assert one["warm_start"]["recipe"] == {"kind": "autoencoder"}
    assert _without_created(json.loads((tmp_path / "two.json").read_text())) == _without_created(one)
    own = zoo_adapter("aekl64-photos").generate(2, torch.Generator().manual_seed(5)).images
    for k in range(2):
        save_image(own[k], tmp_path / f"own{k}.png")
    inspect = ["inspect", "--profile", "one.json", *model, "own0.png", "own1.png", *CLI_ONE_THREAD]
    monkeypatch.chdir(tmp_path)
    code, _, err = one_process([*inspect, "-o", "one.jsonl"], capsys)
    assert code == 0, err
    p = torchrun(2, [*inspect, "-o", "two.jsonl"], cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    assert read_report(tmp_path / "two.jsonl")[1] == read_report(tmp_path / "one.jsonl")[1]


# ---------------------------------------------------------------------------- faults and resume


@pytest.fixture(scope="module")
def tiny_job(tmp_path_factory):
    """A profile of the tiny model, 40 images (half its own) and the single-process report of them."""
    from ronan_fast import Attributor, LatentGenerator
    from ronan_fast.imageio import save_image

    root = tmp_path_factory.mktemp("tiny_job")
    images = root / "images"
    images.mkdir()
    own = Attributor(LatentGenerator(tiny_models.generator(), 3), None).sample(20, seed=5)
    for i in range(20):
        save_image(own[i], images / f"own{i:02d}.png")
        save_image(torch.rand(*tiny_models.SHAPE, generator=torch.Generator().manual_seed(i)),
                   images / f"noise{i:02d}.png")
    assert cli.main(["profile", *TINY, "--steps", "100", "--restarts", "2", "-n", "10", *CLI_ONE_THREAD,
                     "-o", str(root / "profile.json")]) == 0
    assert cli.main(["inspect", "--profile", str(root / "profile.json"), *TINY, str(images), "--batch", "1",
                     *CLI_ONE_THREAD, "-o", str(root / "one.json")]) == 0
    return root


def _inspect_tiny(job: Path) -> list:
    return ["inspect", "--profile", job / "profile.json", *TINY, job / "images", "--batch", "1", *CLI_ONE_THREAD]


def _records_in(paths) -> list[dict]:
    return [r for p in paths for r in read_report(p)[1]]


def _kill_worker_once_it_logged(proc, report: Path, rank: int = 1, timeout_s: float = 120) -> list[dict]:
    """SIGKILL worker ``rank`` once its log holds a batch; the records its log held then."""
    log = report.with_name(f"{report.name}.worker-{rank}.jsonl")
    lock = report.with_name(f".{log.name}.lock")
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the job ended before its worker could be killed:\n" + proc.stderr.read()[-3000:]
        try:  # a line being written is not a record yet
            logged = _records_in([log]) if log.exists() else []
        except ReportError:  # its header is being written
            logged = []
        if logged:
            os.kill(int(lock.read_text()), signal.SIGKILL)  # the lock file holds its writer's pid
            return logged
        time.sleep(0.02)
    proc.kill()
    pytest.fail("worker 1 logged no batch in time")


def test_a_killed_worker_loses_at_most_its_batch_and_a_rerun_with_other_workers_finishes(tiny_job, tmp_path):
    proc = torchrun(2, [*_inspect_tiny(tiny_job), "-o", "report.csv"], cwd=tmp_path, wait=False)
    logged = _kill_worker_once_it_logged(proc, tmp_path / "report.csv")
    _, err = proc.communicate(timeout=TIMEOUT_S)
    assert proc.returncode != 0 and "exitcode: -9" in err
    assert not (tmp_path / "report.csv").exists()  # not finished: the records are in the logs
    on_disk = _records_in(sorted(tmp_path.glob("report.csv.worker-*.jsonl")))
    assert 1 <= len(logged) <= len(on_disk) < 40

    p = torchrun(3, [*_inspect_tiny(tiny_job), "-o", "report.csv"], cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    assert f"resuming: {len(on_disk)} of 40 images already in the report" in p.stderr
    _, records = read_report(tmp_path / "report.csv")
    _, single = read_report(tiny_job / "one.json")
    assert [r["path"] for r in records] == [r["path"] for r in single]  # each image once, in input order
    assert [(r["verdict"], r["loss"], r["reference_loss"], r["statistic"], r["row_steps"]) for r in records] == \
        [(r["verdict"], r["loss"], r["reference_loss"], r["statistic"], r["row_steps"]) for r in single]
    assert not list(tmp_path.glob("report.csv.*.jsonl"))


def test_torchrun_restarts_resume_from_the_logs(tiny_job, tmp_path):
    proc = torchrun(2, [*_inspect_tiny(tiny_job), "-o", "report.jsonl"], cwd=tmp_path, max_restarts=1, wait=False)
    _kill_worker_once_it_logged(proc, tmp_path / "report.jsonl")
    out, err = proc.communicate(timeout=TIMEOUT_S)
    assert proc.returncode == 0, err[-3000:]
    assert "resuming:" in err and "40 images judged" in out
    _, records = read_report(tmp_path / "report.jsonl")
    _, single = read_report(tiny_job / "one.json")
    assert [(r["path"], r["verdict"], r["loss"]) for r in records] == [(r["path"], r["verdict"], r["loss"])
                                                                       for r in single]


@pytest.mark.filterwarnings("ignore:a belonging profile of")
def test_a_single_process_resumes_a_sharded_profile_from_its_parts(tmp_path, capsys):
    args = ["profile", *TINY, "--steps", "60", "--restarts", "2", "-n", "9", "--part", "2", *CLI_ONE_THREAD]
    assert one_process([*args, "-o", tmp_path / "whole.json"], capsys)[0] == 0
    # parts as a job spread over workers leaves them (here written by a job of one), one of them marked
    from ronan_fast import Attributor, LatentGenerator

    att = Attributor(LatentGenerator(tiny_models.generator(), 3, name="generator"),
                     LatentGenerator(tiny_models.reference(), 3, name="reference"), steps=60, restarts=2,
                     call_rows=8)
    parts = distributed.parts_dir(tmp_path / "resumed.json")
    distributed.fit(att, 9, 0, parts, part=2, progress=False)
    assert sorted(p.name for p in parts.glob("part-*.json")) == [f"part-{a}.json" for a in (0, 2, 4, 6, 8)]
    (parts / "part-4.json").unlink()
    marked = json.loads((parts / "part-2.json").read_text())
    marked["model"] = [v * 2 for v in marked["model"]]
    (parts / "part-2.json").write_text(json.dumps(marked))
    assert one_process([*args, "-o", tmp_path / "resumed.json"], capsys)[0] == 0
    whole = json.loads((tmp_path / "whole.json").read_text())
    resumed = json.loads((tmp_path / "resumed.json").read_text())
    # part 2 was read, not inverted again; part 4 was inverted; the others are the same
    assert resumed["raw_losses"][2:4] == [2 * v for v in whole["raw_losses"][2:4]]
    assert resumed["raw_losses"][:2] + resumed["raw_losses"][4:] == whole["raw_losses"][:2] + whole["raw_losses"][4:]
    assert not parts.exists()


@pytest.mark.filterwarnings("ignore:a belonging profile of")
def test_parts_of_another_job_are_refused(tmp_path):
    from ronan_fast import Attributor, LatentGenerator
    from ronan_fast.attributor import CheckpointError

    att = Attributor(LatentGenerator(tiny_models.generator(), 3), None, steps=20, restarts=1, profile_retries=0)
    parts = tmp_path / "parts"
    distributed.fit(att, 4, 0, parts, part=2, progress=False)
    with pytest.raises(CheckpointError, match="another profile job"):
        distributed.fit(att, 4, 1, parts, part=2, progress=False)  # another seed: other images
    saved = json.loads((parts / "part-2.json").read_text())
    (parts / "part-2.json").write_text(json.dumps({**saved, "model": saved["model"][:1]}))
    with pytest.raises(CheckpointError, match="damaged"):
        distributed.fit(att, 4, 0, parts, part=2, progress=False)
    (parts / "part-0.json").write_text("{")
    with pytest.raises(CheckpointError, match="not readable"):
        distributed.fit(att, 4, 0, parts, part=2, progress=False)


# ---------------------------------------------------------------------------- the API in one process


def test_attribute_files_in_one_process_merges_every_log(tiny_job, tmp_path):
    from ronan_fast import Attributor, LatentGenerator
    from ronan_fast.reports.files import ReportLog
    from ronan_fast.reports.session import worker_log_path

    att = Attributor.from_profile(tiny_job / "profile.json", LatentGenerator(tiny_models.generator(), 3),
                                  LatentGenerator(tiny_models.reference(), 3), call_rows=8)
    images = sorted((tiny_job / "images").glob("*.png"))[:6]
    out = tmp_path / "r.jsonl"
    header = att.report_header()
    # worker 3 of a run judged image 0 and could not read image 1; worker 1 of a later run judged it
    first = att.attribute([images[0]]).to_records(profile_id=header["profile"]["id"])
    second = att.attribute([images[1]]).to_records(profile_id=header["profile"]["id"])
    with ReportLog(worker_log_path(out, 1), header) as log:
        log.append(second)
    with ReportLog(worker_log_path(out, 3), header) as log:
        log.append(first + [{"path": str(images[1]), "verdict": "error", "belongs": None, "error": "gone"}])
    records = distributed.attribute_files(att, images, out, batch=2, progress=False)
    assert [r["path"] for r in records] == [str(p) for p in images]
    assert records[0] == first[0] and records[1] == second[0]  # a verdict is not replaced by an older error
    assert read_report(out)[1] == records and not list(tmp_path.glob("r.jsonl.worker-*"))


def test_inspect_under_torchrun_needs_an_output(tiny_job, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    code, _, err = one_process(["inspect", "--profile", tiny_job / "profile.json", *TINY, tiny_job / "images"],
                               capsys)
    assert code == 2 and "inspect under torchrun (2 workers) writes its report with -o" in err
    monkeypatch.setenv("WORLD_SIZE", "two")
    code, _, err = one_process(["inspect", "--profile", tiny_job / "profile.json", *TINY, tiny_job / "images",
                                "-o", "r.jsonl"], capsys)
    assert code == 2 and "WORLD_SIZE='two'" in err
