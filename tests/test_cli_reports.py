"""inspect's reports: headers, one writer at a time, outputs checked before work, nothing lost,
any file name, the same verdicts after a resume; and profile's defaults that cannot mislead."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

import tiny_models
from ronan_fast import cli
from ronan_fast.adapters import LatentGenerator
from ronan_fast.attributor import Attributor
from ronan_fast.imageio import save_image
from ronan_fast.reports.files import ReportLock, read_report

TESTS = Path(__file__).resolve().parent
MODEL = ["--model", "tiny_models:generator", "--latent-shape", "3"]
REF = ["--reference", "tiny_models:reference"]
FAST = ["--steps", "100", "--restarts", "2", "-q"]


#: one torch thread for this module's tests (tests/conftest.py): tiny batches run as fast on one
#: thread, and much faster on shared cores
ONE_THREAD = True


@pytest.fixture(autouse=True)
def importable_tests(monkeypatch):
    monkeypatch.syspath_prepend(str(TESTS))


@pytest.fixture(scope="module")
def profile_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("profile") / "tiny.json"
    assert cli.main(["profile", *MODEL, *REF, "-n", "10", *FAST, "--name", "tiny GAN", "-o", str(path)]) == 0
    return path


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """3 generated and 3 noise PNGs."""
    folder = tmp_path_factory.mktemp("images")
    g = LatentGenerator(tiny_models.generator(), tiny_models.LATENT)
    gen = Attributor(g, None).sample(3, seed=9)
    noise = torch.rand(3, *tiny_models.SHAPE, generator=torch.Generator().manual_seed(1))
    for i in range(3):
        save_image(gen[i], folder / f"a_gen{i}.png")
        save_image(noise[i], folder / f"b_noise{i}.png")
    return folder


def run(argv, capsys):
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def inspect(profile_path, *args):
    return ["inspect", "--profile", profile_path, *MODEL, "-q", *args]


def test_the_reference_model_comes_from_the_profile(profile_path, images, tmp_path, capsys):
    """The profile records how to rebuild its reference model (a factory and its weights' hash):
    inspect needs only the profile and the model; changed weights are refused, naming the option."""
    saved = json.loads(profile_path.read_text())
    assert saved["reference_source"]["spec"] == "tiny_models:reference"
    assert saved["generator_name"] == "tiny GAN"
    code, out, _ = run(inspect(profile_path, images / "b_noise0.png"), capsys)
    assert code == 0 and "belong to tiny GAN" in out and "threshold A' <" in out
    # with weights recorded by hash
    weights = tmp_path / "ref.pt"
    torch.save(tiny_models.reference().state_dict(), weights)
    prof = tmp_path / "p.json"
    assert run(["profile", *MODEL, "--reference", "tiny_models:other_generator", "--reference-weights", weights,
                "-n", "5", *FAST, "--retries", "0", "-o", prof], capsys)[0] == 0
    assert json.loads(prof.read_text())["reference_source"]["weights_sha256"]
    assert run(inspect(prof, images / "b_noise0.png"), capsys)[0] == 0
    torch.save(tiny_models.other_generator().state_dict(), weights)
    code, _, err = run(inspect(prof, images / "b_noise0.png"), capsys)
    assert code == 2 and "changed since the profile was fitted" in err and "--reference-weights" in err


def test_the_bundled_reference_is_refused_where_it_does_not_fit(tmp_path, capsys):
    code, _, err = run(["profile", "--model", "tiny_models:rgb_generator", "--latent-shape", "3", "-n", "5", *FAST,
                        "-o", tmp_path / "p.json"], capsys)
    assert code == 2 and "does not fit" in err and "--reference" in err and "3x12x12" in err
    assert not (tmp_path / "p.json").exists()
    with pytest.raises(ValueError, match="does not fit.*reference=None"):
        Attributor(LatentGenerator(tiny_models.rgb_generator(), 3, image_shape=(3, 12, 12)))


def test_a_small_profile_is_warned_about_and_an_output_out_of_range_refused(tmp_path, capsys):
    code, _, err = run(["profile", *MODEL, *REF, "-n", "5", *FAST, "--retries", "0", "-o", tmp_path / "p.json"],
                       capsys)
    assert code == 0 and "warning: a belonging profile of 5 images" in err and "at least 30" in err
    code, _, err = run(["profile", *MODEL, *REF, "--output-range", "-0.5", "0.5", "-n", "5", *FAST,
                        "-o", tmp_path / "q.json"], capsys)
    assert code == 2 and "outside its declared output range (-0.5, 0.5)" in err and "--output-range" in err


@pytest.mark.parametrize("option, name", [("-o", "r.jsonl"), ("--html", "r.html"), ("--grid", "g.png")])
def test_an_unwritable_output_stops_before_any_work(profile_path, images, tmp_path, capsys, monkeypatch, option,
                                                    name):
    if os.geteuid() == 0:  # root writes anywhere a mode bit forbids: take a folder no one can write
        locked = Path("/proc/1")
    else:
        locked = tmp_path / "ro"
        locked.mkdir()
        locked.chmod(0o500)
    monkeypatch.setattr(Attributor, "attribute", lambda *a, **k: pytest.fail("inverted before checking outputs"))
    code, _, err = run(inspect(profile_path, images, option, locked / name), capsys)
    assert code == 2 and option in err and "not writable" in err and "Traceback" not in err


def test_an_output_in_a_folder_that_is_a_file_stops_before_any_work(profile_path, images, tmp_path, capsys,
                                                                     monkeypatch):
    (tmp_path / "file").write_text("x")
    monkeypatch.setattr(Attributor, "attribute", lambda *a, **k: pytest.fail("inverted before checking outputs"))
    code, _, err = run(inspect(profile_path, images, "-o", tmp_path / "file" / "r.jsonl"), capsys)
    assert code == 2 and err.count("\n") == 1 and "-o" in err


def test_a_second_writer_stops_with_its_own_exit_code(profile_path, images, tmp_path, capsys):
    report = tmp_path / "r.json"
    with ReportLock(report):  # another run is writing it
        code, _, err = run(inspect(profile_path, images, "-o", report), capsys)
    assert code == 4 and "another ronan-fast run is writing" in err and not report.exists()
    assert run(inspect(profile_path, images, "-o", report), capsys)[0] == 0


def test_two_runs_with_other_inputs_and_one_report_keep_every_record(profile_path, images, tmp_path, capsys):
    report = tmp_path / "r.csv"
    files = sorted(images.glob("*.png"))
    assert run(inspect(profile_path, *files[:2], "-o", report), capsys)[0] == 0
    assert run(inspect(profile_path, *files[2:], "-o", report), capsys)[0] == 0
    header, records = read_report(report)
    assert sorted(Path(r["path"]).name for r in records) == sorted(f.name for f in files)
    assert header["model"]["name"] == "tiny GAN"


def test_a_failed_final_write_keeps_the_finished_results(profile_path, images, tmp_path, capsys, monkeypatch):
    from ronan_fast.reports import session

    report = tmp_path / "r.json"

    def full_disk(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(session, "write_report", full_disk)
    code, _, err = run(inspect(profile_path, images, "-o", report), capsys)
    log = tmp_path / "r.json.partial.jsonl"
    assert code == 2 and "No space left on device" in err and str(log) in err
    assert len(read_report(log)[1]) == 6  # every finished record is there
    monkeypatch.undo()
    code, _, err = run(inspect(profile_path, images, "-o", report), capsys)
    assert code == 0 and "resuming: 6 of 6" in err and not log.exists() and len(read_report(report)[1]) == 6


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv"])
def test_any_file_name_round_trips_into_every_format(profile_path, images, tmp_path, capsys, suffix):
    """A file name that is not UTF-8, with quotes, a comma and a newline: the same name comes back
    from the report; on the terminal it is shown escaped."""
    folder = tmp_path / "odd"
    folder.mkdir()
    raw = os.fsencode(str(folder)) + b'/x\xff, "q"\nz.png'
    with open(raw, "wb") as f:
        f.write((images / "a_gen0.png").read_bytes())
    report = tmp_path / f"r{suffix}"
    code, out, _ = run(inspect(profile_path, folder, "-o", report), capsys)
    assert code == 0 and "\\xff" in out and "\\x0a" in out
    _, records = read_report(report)
    assert [os.fsencode(r["path"]) for r in records] == [raw]


def test_a_resume_after_a_cut_log_gives_the_same_losses(profile_path, images, tmp_path, capsys):
    """Same image, same verdict: a run resumed from a log cut mid-batch reports, for every image,
    the bits an uninterrupted run reports."""
    whole = tmp_path / "whole.jsonl"
    assert run(inspect(profile_path, images, "-o", whole, "--batch", "4"), capsys)[0] == 0
    lines = whole.read_text().splitlines()
    cut = tmp_path / "cut.jsonl"
    cut.write_text("\n".join(lines[:3]) + "\n" + lines[3][:25])  # header, two records, a cut third
    code, _, err = run(inspect(profile_path, images, "-o", cut, "--batch", "4"), capsys)
    assert code == 0 and "resuming: 2 of 6" in err
    a = {r["path"]: (r["loss"], r["reference_loss"], r["verdict"]) for r in read_report(whole)[1]}
    b = {r["path"]: (r["loss"], r["reference_loss"], r["verdict"]) for r in read_report(cut)[1]}
    assert a == b


def test_reports_carry_a_header_and_the_json_report_follows_its_schema(profile_path, images, tmp_path, capsys):
    jsonschema = pytest.importorskip("jsonschema")
    from ronan_fast.reports import load_schema

    report, html = tmp_path / "r.json", tmp_path / "r.html"
    code, _, _ = run(inspect(profile_path, images, tmp_path / "gone.png", "-o", report, "--html", html), capsys)
    assert code == 1
    doc = json.loads(report.read_text())
    jsonschema.validate(doc, load_schema())
    header = doc["header"]
    for key in ("version", "created", "rule", "alpha", "critical_value", "threshold", "settings", "seed",
                "early_stop", "device", "call_rows", "threads"):
        assert key in header, key
    assert header["reference"]["fingerprint"] and header["profile"]["id"] == doc["records"][0]["profile_id"]
    page = html.read_text()
    assert "a_gen0.png" in page and "gone.png" in page and "data:image/png;base64," in page
    assert "http://" not in page and "https://" not in page


def test_report_turns_a_report_or_a_log_into_html_and_other_formats(profile_path, images, tmp_path, capsys):
    src = tmp_path / "r.csv"
    assert run(inspect(profile_path, images, "-o", src), capsys)[0] == 0
    out, html = tmp_path / "r.json", tmp_path / "r.html"
    code, printed, _ = run(["report", src, "-o", out, "--html", html], capsys)
    assert code == 0 and "html:" in printed
    assert read_report(out) == read_report(src)
    page = html.read_text()
    assert all(f.name in page for f in images.glob("*.png")) and "data:image/png;base64," in page
    code, _, err = run(["report", src], capsys)
    assert code == 2 and "nothing to write" in err
    code, _, err = run(["report", src, "-o", src], capsys)
    assert code == 2 and "is the report being read" in err
    (tmp_path / "foreign.jsonl").write_text('{"path": "x"}\n')
    code, _, err = run(["report", tmp_path / "foreign.jsonl", "--html", html], capsys)
    assert code == 2 and "not a ronan-fast report" in err


def test_a_killed_inspect_loses_no_finished_record(profile_path, images, tmp_path):
    """inspect killed (SIGKILL) at random moments, then run again: every image is in the report
    once, with the verdict an uninterrupted run gives it."""
    import random
    import signal
    import subprocess
    import sys
    import time

    argv = [sys.executable, "-m", "ronan_fast.cli", "inspect", "--profile", str(profile_path), *MODEL, "-q",
            "--batch", "1", "--threads", "1", str(images)]
    whole = tmp_path / "whole.jsonl"
    env = {**os.environ, "PYTHONPATH": str(TESTS), "PYTHONSAFEPATH": "1"}
    assert subprocess.run([*argv, "-o", str(whole)], env=env, capture_output=True).returncode == 0
    report = tmp_path / "r.jsonl"
    rng = random.Random(int(time.time()))
    for _ in range(3):  # killed somewhere between start-up and the end
        p = subprocess.Popen([*argv, "-o", str(report)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(1.0, 6.0))
        p.send_signal(signal.SIGKILL)
        p.wait()
    done = subprocess.run([*argv, "-o", str(report)], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    records = read_report(report)[1]
    assert sorted(r["path"] for r in records) == sorted(str(f) for f in images.glob("*.png"))  # each once
    want = {r["path"]: (r["loss"], r["verdict"]) for r in read_report(whole)[1]}
    assert {r["path"]: (r["loss"], r["verdict"]) for r in records} == want


def test_progress_bar_and_log_level(profile_path, images, capsys):
    """progress=True draws one bar of images with an ETA on stderr; --log-level debug shows what
    ronan_fast logs."""
    att = Attributor.from_profile(profile_path, LatentGenerator(tiny_models.generator(), 3, name="generator"),
                                  LatentGenerator(tiny_models.reference(), 3, name="reference"))
    res = att.attribute(sorted(images.glob("*.png"))[:2], progress=True)
    err = capsys.readouterr().err
    assert len(res) == 2 and "images:" in err and "2.0/2" in err and "<" in err  # elapsed<remaining
    from ronan_fast.progress import ImageProgress

    bar = ImageProgress(10, enabled=False)
    report = bar.part(4, ("reference", "model"))
    report("reference", 2, 2)
    report("model", 1, 2)
    assert bar._done == {"reference": 6, "model": 5}  # 5.5 of 10 images: the bar's count
    code, _, err = run(["inspect", "--profile", profile_path, *MODEL, "--log-level", "nonsense", images], capsys)
    assert code == 2 and "--log-level" in err
    code, _, err = run(["inspect", "--profile", profile_path, *MODEL, "-q", "--log-level", "info", images], capsys)
    assert code == 0 and "ronan-fast: model: 6 images inverted by generator in" in err
    code, _, err = run(["inspect", "--profile", profile_path, *MODEL, "-q", images], capsys)
    assert code == 0 and "inverted by" not in err  # the default level: warnings only
