"""The benchmarks' own machinery on tiny models: bench/overhead.py's measurement, bench/convergence.py's
and bench/speed.py's rows and options, and bench/generators.py's large generator."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

# bench/ lives beside the package; appended (not prepended) so the installed ronan_fast keeps precedence
_ROOT = str(Path(__file__).resolve().parents[1])
if _ROOT not in sys.path:
    sys.path.append(_ROOT)

from bench import overhead  # noqa: E402
from ronan_fast.adapters import LatentGenerator  # noqa: E402


def test_overhead_measure_reports_a_consistent_row():
    from bench.generators import BenchGenerator
    from tiny_models import TinyGenerator

    ad = LatentGenerator(TinyGenerator(seed=0), (3,), (-1.0, 1.0), name="tiny")
    bg = BenchGenerator("tiny", ad, lambda n: torch.rand(n, 1, 8, 8), "random")
    r = overhead.measure(bg, rows=16, steps=3, restarts=4, repeats=1)
    assert (r["rows"], r["images"], r["restarts"]) == (16, 4, 4)
    assert r["step_ms"] > 0 and r["generator_ms"] > 0
    assert r["overhead"] == pytest.approx(1 - r["generator_ms"] / r["step_ms"])  # one round: its own pair
    assert r["rounds"] == 1
    assert set(r["ops_share"]) <= {"ronan_fast::recon_loss_grad", "ronan_fast::latent_adam_step_",
                                   "ronan_fast::best_over_restarts"}


def test_overhead_generator_alone_runs_with_denormals_flushed_in_each_round(monkeypatch):
    """Without the flush invert runs with, a generator whose backward meets denormals runs slower
    alone than inside a step (a negative overhead)."""
    import contextlib

    from bench.generators import BenchGenerator
    from tiny_models import TinyGenerator

    ad = LatentGenerator(TinyGenerator(seed=0), (3,), (-1.0, 1.0), name="tiny")
    bg = BenchGenerator("tiny", ad, lambda n: torch.rand(n, 1, 8, 8), "random")
    flushed = []

    @contextlib.contextmanager
    def recording():
        flushed.append(torch.set_flush_denormal(True))
        yield

    monkeypatch.setattr(overhead, "flush_denormals", recording)
    r = overhead.measure(bg, rows=16, steps=3, restarts=4, repeats=2)
    torch.set_flush_denormal(False)
    assert len(flushed) == 1 + r["rounds"] and 1 <= r["rounds"] <= 2


def test_overhead_measure_refuses_a_step_time_lost_in_noise(monkeypatch):
    from bench.generators import BenchGenerator
    from tiny_models import TinyGenerator

    ad = LatentGenerator(TinyGenerator(seed=0), (3,), (-1.0, 1.0), name="tiny")
    bg = BenchGenerator("tiny", ad, lambda n: torch.rand(n, 1, 8, 8), "random")
    calls = []

    def flat(fn, device):  # every run "takes" the same time: the step time cannot be told apart
        calls.append(1)
        return 1.0

    monkeypatch.setattr(overhead, "_timed", flat)
    with pytest.raises(RuntimeError, match="too few to time"):
        overhead.measure(bg, rows=16, steps=3, restarts=4, repeats=1)
    assert len(calls) == 1 + 6  # the generator's warm-up, then both runs three times before giving up


def _spy_invert(monkeypatch, module, record) -> list:
    """Replace ``module.invert`` by one that appends ``record(adapter, kwargs)`` to the list returned."""
    seen = []
    real_invert = module.invert

    def spy(adapter, images, **kw):
        seen.append(record(adapter, kw))
        return real_invert(adapter, images, **kw)

    monkeypatch.setattr(module, "invert", spy)
    return seen


def _bn_bench(monkeypatch):
    """A small generator with one foldable BatchNorm, served by bench.generators.get."""
    from torch import nn

    from bench import generators
    from bench.generators import BenchGenerator

    torch.manual_seed(0)
    net = nn.Sequential(nn.ConvTranspose2d(3, 8, 4, 1, 0), nn.BatchNorm2d(8), nn.ReLU(),
                        nn.ConvTranspose2d(8, 1, 4, 2, 1), nn.Tanh())
    ad = LatentGenerator(net, (3, 1, 1), (-1.0, 1.0), name="bn")
    bg = BenchGenerator("bn", ad, lambda n: torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(4)),
                        "random")
    monkeypatch.setattr(generators, "get", lambda name, device="cpu": bg)
    return ad


def test_convergence_to_verdict_with_a_given_line_stops_real_images_too(tmp_path, monkeypatch):
    """bench.convergence --to-verdict --line X: X is the convergence line and every image's
    threshold, real images included (as attribution inverts them); without --line the real
    images are inverted without one and the line is 1% of their median."""

    from bench import convergence, generators
    from bench.generators import BenchGenerator
    from tiny_models import TinyGenerator

    ad = LatentGenerator(TinyGenerator(seed=0), (3,), (-1.0, 1.0), name="tiny")
    bg = BenchGenerator("tiny", ad, lambda n: torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(4)),
                        "random")
    monkeypatch.setattr(generators, "get", lambda name, device="cpu": bg)
    monkeypatch.setitem(convergence.CANDIDATES, "q", dict(steps=20, restarts=2, check_every=5, polish_steps=3))
    seen = _spy_invert(monkeypatch, convergence, lambda adapter, kw: kw.get("stop_below"))
    common = ["--generators", "tiny", "--n", "3", "--n-real", "3", "--candidates", "q", "--authors-images", "0"]
    out = tmp_path / "c.md"
    assert convergence.main(common + ["--to-verdict", "--line", "0.002", "--out", str(out)]) == 0
    assert seen == [0.002, 0.002]  # real images first, then the generated ones, both with the line
    row = json.loads(out.with_suffix(".json").read_text())["results"][0]
    assert row["line"] == 0.002
    assert row["converged"] == sum(x < 0.002 for x in row["gen_losses"]) / 3
    assert "the line given (`--line`)" in out.read_text()
    seen.clear()
    assert convergence.main(common + ["--to-verdict"]) == 0
    assert seen[0] is None and seen[1] > 0  # real images without a threshold, own ones with 1% of their median
    for bad in (["--line", "0.002"], ["--to-verdict", "--line", "0"], ["--to-verdict", "--line", "nan"]):
        with pytest.raises(SystemExit):
            convergence.main(common + bad)


def test_convergence_fold_bn_and_channels_last_invert_a_transformed_copy(tmp_path, monkeypatch):
    """--fold-bn / --channels-last: the inversions get a folded, NHWC copy of the generator (the
    benchmark's own stays as it was), the table says so, and --resume refuses a file written
    without them."""
    from torch import nn

    from bench import convergence

    ad = _bn_bench(monkeypatch)
    monkeypatch.setitem(convergence.CANDIDATES, "q", dict(steps=10, restarts=2, check_every=5, polish_steps=2))
    seen = _spy_invert(monkeypatch, convergence, lambda adapter, kw: adapter)
    common = ["--generators", "bn", "--n", "2", "--n-real", "2", "--candidates", "q", "--authors-images", "0"]
    out = tmp_path / "c.md"
    assert convergence.main(common + ["--out", str(out)]) == 0
    assert seen and all(x is ad for x in seen)
    seen.clear()
    folded = tmp_path / "f.md"
    assert convergence.main(common + ["--fold-bn", "--channels-last", "--out", str(folded)]) == 0
    assert seen and all(x is not ad and x.folded_batchnorms == 1 for x in seen)
    assert all(x.module[0].weight.is_contiguous(memory_format=torch.channels_last) for x in seen)
    assert isinstance(ad.module[1], nn.BatchNorm2d) and ad.module[0].weight.is_contiguous()
    assert "BatchNorms folded, channels-last" in folded.read_text()
    with pytest.raises(SystemExit):
        convergence.main(common + ["--fold-bn", "--out", str(out), "--resume"])


def test_speed_table_times_each_method_and_its_single_image_latency(tmp_path, monkeypatch):

    from bench import generators, speed
    from bench.generators import BenchGenerator
    from tiny_models import TinyGenerator

    ad = LatentGenerator(TinyGenerator(seed=0), (3,), (-1.0, 1.0), name="tiny")
    bg = BenchGenerator("tiny", ad, lambda n: torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(4)),
                        "random")
    monkeypatch.setattr(generators, "get", lambda name, device="cpu": bg)
    out = tmp_path / "speed.md"
    only = "authors,plain batched,ours (full),ours, channels-last"
    assert speed.main(["--generators", "tiny", "--n", "4", "--steps", "6", "--restarts", "2", "--device", "cpu",
                       "--only", only, "--out", str(out)]) == 0
    rows = json.loads(out.with_suffix(".json").read_text())
    assert [r["name"] for r in rows] == ["authors", "plain batched", "ours (full)", "ours, channels-last"]
    for r in rows:
        assert r["latency_s"] > 0 and r["seconds"] > 0 and r["images"] == 8
    by = {r["name"]: r for r in rows}
    assert by["authors"]["row_steps"] == 8 * 6 and by["plain batched"]["row_steps"] == 8 * 6 * 2
    assert 0 < by["ours (full)"]["row_steps"] <= 8 * 6 * 2
    table = out.read_text()
    assert "| latency s |" in table and "| x authors latency |" in table
    assert len([ln for ln in table.splitlines() if ln.startswith("| tiny |")]) == 4
    # a table of an earlier run, without latencies, still renders (as nan)
    for r in rows:
        del r["latency_s"]
    old = tmp_path / "old.json"
    old.write_text(json.dumps(rows))
    assert speed.main(["--from-json", str(old), "--device", "cpu"]) == 0


def test_speed_threshold_option_lets_rows_stop_early_without_the_plain_batch(tmp_path, monkeypatch):

    from bench import generators, speed
    from bench.generators import BenchGenerator
    from tiny_models import TinyGenerator

    ad = LatentGenerator(TinyGenerator(seed=0), (3,), (-1.0, 1.0), name="tiny")
    bg = BenchGenerator("tiny", ad, lambda n: torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(4)),
                        "random")
    monkeypatch.setattr(generators, "get", lambda name, device="cpu": bg)
    common = ["--generators", "tiny", "--n", "4", "--steps", "40", "--restarts", "2", "--device", "cpu",
              "--only", "ours (full),ours, no early stop"]
    rows = {}
    for tag, extra in (("none", []), ("given", ["--threshold", "0.5"])):
        out = tmp_path / f"{tag}.md"
        assert speed.main(common + extra + ["--out", str(out)]) == 0
        rows[tag] = {r["name"]: r for r in json.loads(out.with_suffix(".json").read_text())}
        rows[tag]["table"] = out.read_text()
    assert rows["none"]["ours (full)"]["stop_below"] is None  # no plain batch, no threshold: nothing to stop on
    assert "Early stopping's belonging threshold" not in rows["none"]["table"]
    given = rows["given"]
    assert given["ours (full)"]["stop_below"] == 0.5 and given["ours, no early stop"]["stop_below"] is None
    assert "given (--threshold): tiny 0.5." in given["table"]
    # a threshold every image is under from the start (the [0, 1] MSE of a tiny generator's
    # reconstruction): rows stop at the first check, well before the budget
    assert given["ours (full)"]["row_steps"] < rows["none"]["ours (full)"]["row_steps"]
    assert given["ours, no early stop"]["row_steps"] == rows["none"]["ours, no early stop"]["row_steps"]
    for bad in ("0", "-1", "nan", "inf"):
        with pytest.raises(SystemExit):
            speed.main(common + ["--threshold", bad])


def test_speed_row_of_the_earlier_gan_default_resolves_its_preset(tmp_path, monkeypatch):
    """The row "ours (family default), 8 starts" inverts with the preset "gan-8-starts" itself."""
    from bench import generators, speed
    from bench.generators import BenchGenerator
    from ronan_fast import inversion
    from tiny_models import TinyGenerator

    ad = LatentGenerator(TinyGenerator(seed=0), (3,), (-1.0, 1.0), name="tiny")
    bg = BenchGenerator("tiny", ad, lambda n: torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(4)),
                        "random")
    monkeypatch.setattr(generators, "get", lambda name, device="cpu": bg)
    seen = []

    def cheap(generator, settings=None, **overrides):  # the real resolution, then a short run
        got = inversion.resolve_settings(generator, settings, **overrides)
        seen.append((settings, got))
        return got.replace(steps=10, patience=0, halving_every=0, restarts=2, polish_steps=1)

    monkeypatch.setattr(speed, "resolve_settings", cheap)
    out = tmp_path / "p.md"
    assert speed.main(["--generators", "tiny", "--n", "2", "--steps", "6", "--restarts", "2", "--device", "cpu",
                       "--authors-images", "2", "--threshold", "0.5", "--out", str(out),
                       "--only", "ours (family default), 8 starts"]) == 0
    assert ("gan-8-starts", inversion.PRESETS["gan-8-starts"]) in seen
    assert "ours (family default), 8 starts" in out.read_text()


def test_speed_rows_with_folded_batchnorm_invert_a_folded_copy(tmp_path, monkeypatch):
    """The folded-BN rows invert a copy of the generator with its BatchNorms folded (and in
    channels-last where the row says so); the benchmark's generator itself stays as it was."""
    from torch import nn

    from bench import speed
    from ronan_fast.inversion import PRESETS

    ad = _bn_bench(monkeypatch)
    seen = {}
    real_invert = speed.invert

    def cheap(adapter, images, settings=None, **kw):
        seen.setdefault(images.shape[0], []).append(adapter)
        return real_invert(adapter, images, settings=PRESETS["authors"].replace(steps=4, restarts=2), **kw)

    monkeypatch.setattr(speed, "invert", cheap)
    rows = ["ours (family default)", "ours (family default), folded BN",
            "ours (family default), folded BN, channels-last"]
    assert speed.main(["--generators", "bn", "--n", "2", "--steps", "4", "--restarts", "2", "--device", "cpu",
                       "--threshold", "0.5", "--only", ",".join(rows), "--out", str(tmp_path / "f.md")]) == 0
    # the 4 images of each row, then the single-image latencies: the plain row inverts the
    # generator itself, the two folded rows their own copies
    assert [a is ad for a in seen[4]] == [True, False, False]
    used = seen[4][1:]
    assert used[0] is not used[1]
    assert all(a.folded_batchnorms == 1 and not isinstance(a.module[1], nn.BatchNorm2d) for a in used)
    assert any(a.module[0].weight.is_contiguous(memory_format=torch.channels_last)
               and not a.module[0].weight.is_contiguous() for a in used)
    assert isinstance(ad.module[1], nn.BatchNorm2d) and ad.module[0].weight.is_contiguous()
    assert all(a.fingerprint() == ad.fingerprint() for a in used)


def test_large_benchmark_generator_is_tens_of_millions_of_parameters():
    from bench import generators

    bg = generators.get("large")
    ad = bg.adapter
    assert 20e6 < sum(p.numel() for p in ad.module.parameters()) < 60e6
    assert ad.image_shape == (3, 128, 128)
    made = generators.generated(bg, 2, seed=0)
    assert made.shape == (2, 3, 128, 128) and torch.isfinite(made).all()
    assert float(made.std(dim=(1, 2, 3)).min()) > 0.02  # not a flat image: BatchNorm statistics were set
    assert float((made[0] - made[1]).abs().mean()) > 0.01  # different latents, different images



@pytest.mark.parametrize("table", sorted((Path(_ROOT) / "bench" / "results").glob("heldout_*.json")),
                         ids=lambda p: p.stem)
def test_each_held_out_table_is_what_its_json_renders(table):
    # the docs cite the .md tables; their figures must be the ones the .json beside them holds
    from bench.heldout import render

    assert render(json.loads(table.read_text())) == table.with_suffix(".md").read_text()


def test_a_held_out_encoder_row_says_when_its_baseline_did_not_run():
    from bench.heldout import render

    raw = json.loads((Path(_ROOT) / "bench" / "results" / "heldout_held-out_solve.json").read_text())
    out = render(raw)
    assert "| mapped | - | - (mapped not in this run) |" in out
    rec = next(iter(raw["results"].values()))
    base = dict(rec["candidates"]["mapped-wenc"], own_wall=rec["candidates"]["mapped-wenc"]["own_wall"] * 2)
    rec["candidates"]["mapped"] = {k: v for k, v in base.items() if k != "encoder"}
    row = next(line for line in render(raw).splitlines() if line.startswith("| stylegan64-photos | mapped-wenc |")
               and "through the mapping network" in line)
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[5] == "mapped" and float(cells[6]) > 0 and int(cells[7]) > 0, row  # saved, break-even images


def _tiny_style():
    from tiny_models import style_generator

    return LatentGenerator(style_generator(), (16,), output_range=(-1, 1), name="style-tiny")


def test_wsearch_traces_each_candidates_two_steps_and_resumes(tmp_path, monkeypatch, capsys):
    # bench.wsearch on a tiny StyleGAN-style generator: every loss in the .json, the table's counts
    # are the .json's, the z losses are those of the z the start's solve gives, --resume keeps
    # what ran, and bad arguments are named
    from bench import wsearch

    import ronan_fast.mapping_start as ms_mod
    import ronan_fast.zoo as zoo

    g = _tiny_style()
    monkeypatch.setattr(zoo, "zoo_adapter", lambda name, device="cpu": g)
    monkeypatch.setitem(zoo.ZOO, "style-tiny", zoo.ZOO["stylegan64-opencv"])
    monkeypatch.setattr(wsearch, "real_images", lambda name, n: torch.rand(n, 1, 16, 16, generator=torch.Generator().manual_seed(1)))
    monkeypatch.setattr(wsearch, "authors_run", lambda adapter, x, seed: {"losses": [4e-2] * x.shape[0],
                                                                          "wall": [1.0] * x.shape[0], "cpu": [1.0] * x.shape[0]})
    monkeypatch.setattr(ms_mod, "MAPPING_STEPS", 40)
    small = {"steps": 30, "restarts": 4, "halving_every": 10, "polish_steps": 3}
    monkeypatch.setitem(wsearch.CANDIDATES, "a", {"w_encoder": False, **small})
    monkeypatch.setitem(wsearch.CANDIDATES, "b", {"w_encoder": False, **small, "restarts": 2})
    out = tmp_path / "w.md"
    argv = ["--generator", "style-tiny", "--n", "3", "--n-real", "2", "--candidates", "a", "--out", str(out)]
    assert wsearch.main(argv) == 0
    raw = json.loads(out.with_suffix(".json").read_text())
    assert raw["line"] == pytest.approx(4e-4)
    r = raw["candidates"]["a"]
    assert len(r["w_losses"]) == len(r["z_losses"]) == 3
    assert r["w_settings"]["restarts"] == 4 and r["w_settings"]["steps"] == 30
    # the z losses are the images' losses at the start's solve of the w found
    from bench.heldout import own_images

    x, _ = own_images(g, 3, 10_000 + 10_000)
    start = ms_mod.mapping_start(g, w_settings=ms_mod.W_SETTINGS.replace(**small))
    found = start.search_w(x)
    assert found.loss.double().tolist() == pytest.approx(r["w_losses"])
    with torch.no_grad():
        zl = (g.decode(start.solve_z(found.inputs, x)) - x).square().flatten(1).mean(1)
    assert zl.double().tolist() == pytest.approx(r["z_losses"], rel=1e-5)
    row = next(line for line in out.read_text().splitlines() if line.startswith("| a |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[2] == f"{sum(v < wsearch.FLOOR for v in r['w_losses'])}/3"
    assert cells[5] == f"{sum(v < raw['line'] for v in r['z_losses'])}/3"
    # --resume runs only what is missing, and the table then holds both
    ran = []
    real_run = wsearch.run_candidate
    monkeypatch.setattr(wsearch, "run_candidate", lambda *a, **k: ran.append(a[2]) or real_run(*a, **k))
    assert wsearch.main([*argv[:-4], "--candidates", "a,b", "--resume", "--out", str(out)]) == 0
    assert ran == [wsearch.CANDIDATES["b"]]
    text = out.read_text()
    assert "| a |" in text and "| b |" in text
    assert wsearch.render(json.loads(out.with_suffix(".json").read_text())) == text
    capsys.readouterr()
    for bad, says in ((["--candidates", "nope"], "--candidates: unknown ['nope']"), (["--n", "0"], "--n must be"),
                      (["--generator", "nope"], "--generator: unknown zoo model 'nope'")):
        with pytest.raises(SystemExit):
            wsearch.main(["--generator", "style-tiny", "--out", str(tmp_path / "x.md"), *bad])
        assert says in capsys.readouterr().err
    from tiny_models import TinyGenerator

    monkeypatch.setattr(zoo, "zoo_adapter", lambda name, device="cpu": LatentGenerator(
        TinyGenerator(seed=0), (3,), (-1.0, 1.0), name="tiny"))
    with pytest.raises(SystemExit):
        wsearch.main(["--generator", "style-tiny", "--out", str(tmp_path / "y.md")])
    assert "has no mapping network" in capsys.readouterr().err
    assert not (tmp_path / "x.md").exists() and not (tmp_path / "y.md").exists()


def test_heldout_runs_a_channels_last_candidate_and_the_authors_loop_on_a_copy(tmp_path, monkeypatch, capsys):
    # bench.heldout end to end on a tiny StyleGAN-style generator: a "channels_last" candidate
    # inverts a channels-last copy (the generator given stays as it was), --authors-channels-last
    # runs the authors' loop on such a copy too, and the table's second ratio is against it
    from tiny_models import in_channels_last

    from bench import heldout

    import ronan_fast.mapping_start as ms_mod
    import ronan_fast.zoo as zoo

    g = _tiny_style()

    def nhwc(adapter) -> bool:
        return in_channels_last(adapter.module)

    monkeypatch.setattr(zoo, "zoo_adapter", lambda name, device="cpu": g)
    monkeypatch.setitem(zoo.ZOO, "style-tiny", zoo.ZOO["stylegan64-opencv"])
    monkeypatch.setattr(zoo, "benchmark_models", lambda split=None: ["style-tiny"])
    monkeypatch.setattr(heldout, "real_images", lambda name, n: torch.rand(n, 1, 16, 16, generator=torch.Generator().manual_seed(1)))
    monkeypatch.setattr(ms_mod, "MAPPING_STEPS", 40)
    monkeypatch.setattr(ms_mod, "W_SETTINGS", ms_mod.W_SETTINGS.replace(steps=30, restarts=4, halving_every=10,
                                                                         polish_steps=3))
    small = {"settings": "default", "warm": "mapping", "w_space": "w", "restarts": 2, "screen": 2, "steps": 20,
             "halving_every": 10}
    monkeypatch.setitem(heldout.CANDIDATES, "m", small)
    monkeypatch.setitem(heldout.CANDIDATES, "m-cl", {**small, "channels_last": True})
    authors_on, inverted_on = [], []
    real_authors, real_invert = heldout.authors_run, heldout.invert
    monkeypatch.setattr(heldout, "authors_run", lambda adapter, *a, **k: authors_on.append(nhwc(adapter))
                        or real_authors(adapter, *a, **k))
    monkeypatch.setattr(heldout, "invert", lambda adapter, *a, **k: inverted_on.append(nhwc(adapter.base))
                        or real_invert(adapter, *a, **k))
    out = tmp_path / "h.md"
    assert heldout.main(["--suite", "tuning", "--n", "3", "--n-real", "2", "--authors-own", "1", "--authors-steps",
                         "5", "--candidates", "m,m-cl", "--authors-channels-last", "--out", str(out)]) == 0
    capsys.readouterr()
    # real then own images per candidate; the authors' loop: real, own, then both on the copy
    assert inverted_on == [False, False, True, True]
    assert authors_on == [False, False, True, True]
    assert not nhwc(g)
    rec = json.loads(out.with_suffix(".json").read_text())["results"]["style-tiny"]
    assert len(rec["authors_cl"]["real"]["losses"]) == 2 and len(rec["authors_cl"]["own"]["losses"]) == 1
    # the same function: the copy's losses are the as-given run's up to rounding
    assert rec["authors_cl"]["real"]["losses"] == pytest.approx(rec["authors_real"]["losses"], rel=1e-3)
    text = out.read_text()
    assert heldout.render(json.loads(out.with_suffix(".json").read_text())) == text
    rows = {line.split("|")[2].strip(): [c.strip() for c in line.strip("|").split("|")]
            for line in text.splitlines() if line.startswith("| style-tiny |") and "channels-last" not in line
            and len(line.strip("|").split("|")) == 7}
    assert set(rows) == {"m", "m-cl"}
    for cname, cells in rows.items():
        r = rec["candidates"][cname]
        per = (r["own_wall"] / 3 + r["real_wall"] / 2) / 2
        cl_auth = (sum(rec["authors_cl"]["real"]["wall"]) + sum(rec["authors_cl"]["own"]["wall"])) / 3
        assert float(cells[3]) == pytest.approx(cl_auth, abs=0.006)
        assert float(cells[6].split()[0].strip("*")) == pytest.approx(cl_auth / per, rel=0.01, abs=0.006)


def test_adam_settle_rule_simulation_counts_stops_risks_and_savings():
    from bench.adam_settle import evaluate, stops_at

    flat = [(25, 100.0), (50, 99.0), (100, 98.0), (150, 97.5), (200, 97.4), (250, 97.3), (300, 97.3)]
    falling = [(25, 60.0), (50, 40.0), (100, 25.0), (150, 19.0), (200, 12.0), (250, 8.0), (300, 5.0)]
    assert stops_at(flat, 20.0, 0.05, 50, 150) == 150  # the first boundary from 150 on, flat since 100
    assert stops_at(flat, 20.0, 0.05, 50, 200) == 200
    assert stops_at(flat, 200.0, 0.05, 50, 150) is None  # under `above`
    assert stops_at(falling, 20.0, 0.05, 50, 100) is None  # falling by far more than 5% per window
    # a guess row whose best loss sits at the guess's while Adam climbs out and back: the risk case
    stuck = [(25, 40.0), (50, 40.0), (100, 40.0), (150, 15.0), (200, 6.0), (250, 4.0), (300, 3.5)]
    assert stops_at(stuck, 20.0, 0.05, 50, 100) == 100 and stops_at(stuck, 20.0, 0.05, 50, 150) is None
    # a guess row that never moves off its start: stopped where it ends anyway, it changes nothing
    still = [(t, 40.0) for t in (25, 50, 100, 150, 200, 250, 300)]
    rec = {"own": [{"final": 0.5, "rows": {0: stuck, 1: flat}}, {"final": 0.9, "rows": {0: falling}},
                   {"final": 0.4, "rows": {0: still, 1: flat}}],
           "real": [{"final": 90.0, "rows": {0: flat, 1: flat}}]}
    rows = {(r["above"], r["min_drop"], r["from"]): r for r in evaluate(rec, 50, 300)}
    early, half = rows[(20.0, 0.05, 100)], rows[(20.0, 0.05, "half")]
    assert (early["own_rows_near_stopped"], early["own_best_rows_stopped"]) == (1, 1)  # the stuck guess row, short
    assert (half["own_rows_near_stopped"], half["own_best_rows_stopped"]) == (0, 0)
    assert (early["real_saved"], early["real_total"]) == (2 * (300 - 100), 600)  # flat from 50 to 100
    assert half["real_saved"] == 2 * (300 - 150)


def test_adam_settle_records_every_row_of_every_image_and_renders(tmp_path, monkeypatch):
    from bench import adam_settle
    from ronan_fast import warmstart
    from tiny_models import TinyGenerator

    g = LatentGenerator(TinyGenerator(seed=0, latent=4, shape=(1, 8, 8)), 4, name="tiny0")
    enc = warmstart.train_encoder(g, samples=256, steps=50, batch=32, lr=1e-2, width=8, hidden=32, image_steps=5,
                                  seed=3)
    inv = warmstart.WarmStarted(g, enc)
    s = adam_settle.recording_settings(inv).replace(steps=50, check_every=25, halving_every=25, polish_steps=2)
    assert s.first_steps == 0 and s.adam_settle_window == 0 and s.restarts == 4
    own = g.generate(3, torch.Generator().manual_seed(1)).images
    noise = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    got = adam_settle.record(inv, torch.cat([own, noise]), 1e-4, s, seed=1, chunk=2)
    assert len(got) == 5 and all(sorted(i["rows"]) == [0, 1, 2, 3] for i in got)
    for i in got:  # every row read at its first check; a row's best loss never rises
        for tr in i["rows"].values():
            assert tr[0][0] == 25 and all(b[1] <= a[1] for a, b in zip(tr, tr[1:]))
    assert all(i["final"] > 20 for i in got[3:])  # the random images, far above the line
    raw = {"machine": {"machine": "x", "cpu_count": 2, "threads": 1, "torch": "t", "python": "p"}, "command": "c",
           "window": 50, "seed": 0, "steps": 300, "generators": {"tiny0": {"line": 1e-4, "own": got[:3], "real": got[3:],
                                                            "best_not_guess": 0,
                                                            "rules": adam_settle.evaluate({"own": got[:3],
                                                                                           "real": got[3:]}, 50, 300)}}}
    text = adam_settle.render(json.loads(json.dumps(raw)))
    assert "## tiny0" in text and text.count("\n| ") == 1 + len(adam_settle.RULES)


def test_jacobian_blocks_times_every_block_size_and_renders_its_json(tmp_path, monkeypatch, capsys):
    """bench.jacobian_blocks times one row's Jacobian all at once and in each block size, on every
    point and repetition, checks each against all columns at once, and its table is what its
    .json renders."""
    from bench import jacobian_blocks
    from tiny_models import TinyGenerator

    g = LatentGenerator(TinyGenerator(seed=0, latent=6, shape=(1, 8, 8)), 6, name="tiny0")
    monkeypatch.setattr(jacobian_blocks, "_function", lambda name, what: g)
    monkeypatch.setattr(jacobian_blocks, "BLOCKS", [None, 4, 1])
    out = tmp_path / "jb.md"
    assert jacobian_blocks.main(["--targets", "tiny0:z", "--points", "2", "--reps", "2", "--out", str(out)]) == 0
    raw = json.loads(out.with_suffix(".json").read_text())
    (r,) = raw["results"]
    assert r["width"] == 6 and r["outputs"] == 64 and list(r["blocks"]) == ["None", "4", "1"]
    for b in r["blocks"].values():
        assert len(b["ms"]) == 4 and b["of"] == 4 and all(t > 0 for t in b["ms"])
        assert b["max_rel_diff"] < 1e-6  # the same Jacobian, to float32 rounding
    assert r["blocks"]["None"]["identical"] == 4
    text = out.read_text()
    assert text == jacobian_blocks.render(raw) and text.count("| tiny0 | z | 6 | 64 |") == 3
    with pytest.raises(SystemExit):
        jacobian_blocks.main(["--targets", "tiny0:x", "--out", str(out)])
    assert "not generator:z or generator:w" in capsys.readouterr().err


def test_heldout_jacobian_columns_sets_the_dense_polishs_blocks_for_a_candidate_and_restores_them():
    from bench import heldout
    from ronan_fast.inversion.polish import dense

    was = dense.DENSE_CPU_COLUMNS
    assert heldout.CANDIDATES["mapped-wenc-first-settle4-stops-wrecipe-jall"]["jacobian_columns"] == "all"
    with heldout.jacobian_columns("all"):
        assert dense.dense_columns(512, cpu=True) == 512  # every column in one pass
    assert dense.DENSE_CPU_COLUMNS == was
    with heldout.jacobian_columns(None):
        assert dense.DENSE_CPU_COLUMNS == was
    with pytest.raises(RuntimeError):
        with heldout.jacobian_columns(7):
            assert dense.dense_columns(512, cpu=True) == 7
            raise RuntimeError("a candidate that fails")
    assert dense.DENSE_CPU_COLUMNS == was  # restored after an error too
    for bad in (0, -1, True, "some"):
        with pytest.raises(ValueError, match="jacobian_columns"):
            with heldout.jacobian_columns(bad):
                pass
