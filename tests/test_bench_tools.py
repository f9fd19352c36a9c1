"""The benchmark scripts' own numerics: the matrix-free Gauss-Newton solver and the DDIM inversion
of bench/ddim_probe.py, and the overhead measurement of bench/overhead.py, on tiny models."""

from __future__ import annotations

import json
import math
import platform
import sys
from pathlib import Path

import pytest
import torch

# bench/ lives beside the package; appended (not prepended) so the installed ronan_fast keeps precedence
_ROOT = str(Path(__file__).resolve().parents[1])
if _ROOT not in sys.path:
    sys.path.append(_ROOT)

from bench import ddim_probe, overhead  # noqa: E402
from ronan_fast.adapters import LatentGenerator  # noqa: E402
from ronan_fast.models.diffusion import DDIMSampler, TinyUNet  # noqa: E402


def test_gauss_newton_cg_solves_linear_least_squares():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(24, 10, generator=g, dtype=torch.float64)
    z_true = torch.randn(5, 10, generator=g, dtype=torch.float64)
    z0 = torch.randn(5, 10, generator=g, dtype=torch.float64)
    target = z_true @ a.T
    seen = []
    z = ddim_probe.gauss_newton_cg(lambda q: q @ a.T, z0, target, iters=12, cg_iters=10,
                                   report=lambda k, mse: seen.append(mse.clone()))
    assert 2 <= len(seen) <= 12  # one report per step run; solved rows end the loop early
    assert torch.allclose(z, z_true, atol=1e-6), (z - z_true).abs().max()
    assert bool((seen[-1] < 1e-12).all()) and bool((seen[-1] <= seen[0]).all())


def test_fixed_point_ddim_inversion_recovers_the_noise():
    torch.manual_seed(0)
    unet = TinyUNet(ch=8, channels=1, size=8, groups=4, patch=2)
    with torch.no_grad():  # a small noise prediction keeps each step's fixed point a contraction
        unet.conv_out.weight.mul_(0.05)
        unet.conv_out.bias.zero_()
    sampler = DDIMSampler(unet, steps=3, clip_x0=False).eval()
    x_t = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        x0 = sampler(x_t)
    x_rec = ddim_probe.fixed_point_inversion(sampler, x0, iters=40)
    assert torch.isfinite(x_rec).all()
    assert torch.allclose(x_rec, x_t, atol=1e-3, rtol=1e-3), (x_rec - x_t).abs().max()
    # one iteration per step is plain DDIM inversion: an approximation, measurably worse
    assert (ddim_probe.fixed_point_inversion(sampler, x0, iters=1) - x_t).abs().max() > (x_rec - x_t).abs().max()


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

    monkeypatch.setattr(overhead, "_flush_denormals", recording)
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


def test_jacobian_products_table_times_both_modes_and_checks_they_agree(tmp_path):
    from bench import jacobian_products

    out = tmp_path / "jp.md"
    assert jacobian_products.main(["--generators", "default", "--rows", "2,3", "--calls", "1", "--repeats", "1",
                                   "--device", "cpu", "--out", str(out)]) == 0
    rows = [ln.split(" | ") for ln in out.read_text().splitlines() if ln.startswith("| default |")]
    assert [r[1] for r in rows] == ["2", "3"]
    for r in rows:
        assert all(float(x) > 0 for x in r[2:9])  # every timing measured
        assert float(r[9]) < 1e-5  # forward- and reverse-mode J v agree (float32)
        assert r[10].rstrip(" |") == "reverse"
    with pytest.raises(SystemExit):
        jacobian_products.main(["--rows", "0"])


def test_polish_probe_writes_one_row_per_mark(tmp_path):
    from bench import polish_probe

    out = tmp_path / "probe.md"
    assert polish_probe.main(["--generator", "default", "--n", "2", "--adam-steps", "8", "--pairs", "2:4",
                              "--out", str(out)]) == 0
    text = out.read_text()
    rows = [ln for ln in text.splitlines() if ln.startswith("| 2 |")]
    assert [ln.split(" | ")[1] for ln in rows] == ["1", "2", "3", "4"]  # a quarter, half, three quarters, end
    assert "Command: `python -m bench.polish_probe --generator default" in text
    with pytest.raises(SystemExit):
        polish_probe.main(["--pairs", "10-20"])


@pytest.mark.parametrize("method", ["cg", "dense"])
def test_polish_plateau_replay_matches_the_polish(tmp_path, method):
    """Rows of the polish are independent: replaying the plateau rule on recorded trajectories
    gives the loss the polish with that rule ends at (the matrix-free polish and the GAN
    family's Levenberg-Marquardt polish)."""
    import functools
    import json

    from bench import polish_plateau
    from ronan_fast.inversion import _polish, _polish_cg

    polish = functools.partial(_polish_cg, cg_iters=6) if method == "cg" else _polish

    from ronan_fast.models import DCGANGenerator, dcgan_init_

    torch.manual_seed(0)
    gen = LatentGenerator(dcgan_init_(DCGANGenerator(nz=6, ngf=4, channels=1, size=8)).eval(), (6,), (-1.0, 1.0))
    with torch.no_grad():
        made = gen.decode_raw(torch.randn(2, 6), None)
    target = torch.cat([made, torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1])
    start = torch.randn(4, 6, generator=torch.Generator().manual_seed(2))
    steps = 12
    traj = torch.full((steps + 1, 4), float("nan"), dtype=torch.float64)
    with torch.no_grad():
        traj[0] = (gen.decode_raw(start, None) - target).square().flatten(1).mean(1).double()

    def report(k, mse):
        traj[k] = mse.double()

    polish(gen, start, None, target, "mse", steps, report=report)
    assert not bool(torch.isnan(traj[1]).any())  # every row reported after the first step
    for k in range(1, steps + 1):
        traj[k] = torch.where(torch.isnan(traj[k]), traj[k - 1], traj[k])
    for w, drop in ((2, 0.5), (3, 0.2), (4, 0.9)):
        z = polish(gen, start, None, target, "mse", steps, patience=w, min_drop=drop)
        with torch.no_grad():
            got = (gen.decode_raw(z, None) - target).square().flatten(1).mean(1).double()
        want, used = polish_plateau.replay(traj, steps, w, drop)
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-12)
        assert bool((used >= w).all()) and bool((used <= steps).all())
    # the settle rule against a threshold: under it a row stops, far over it and levelled off too
    line = float(traj[0].min()) * 1e-3  # under every start: the made images reach it, the noise does not
    dismissed = 0
    for w, drop, above in ((2, 0.2, 2.0), (3, 0.5, 4.0)):
        z = polish(gen, start, None, target, "mse", steps, stop_raw=torch.full((4,), line), settle=(w, drop, above))
        with torch.no_grad():
            got = (gen.decode_raw(z, None) - target).square().flatten(1).mean(1).double()
        want, used = polish_plateau.replay_settle(traj, steps, line, w, drop, above)
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-12)
        dismissed += int(((want > above * line) & (used < steps)).sum())
    assert dismissed > 0  # the rule fired on some row
    # the report from saved trajectories
    path = tmp_path / "t.json"
    path.write_text(json.dumps({"generator": "tiny", "data": "noise", "settings": "{}", "cg_iters": 6,
                                "own": traj[:, :2].tolist(), "real": traj[:, 2:].tolist()}))
    out = tmp_path / "r.md"
    assert polish_plateau.main(["--trajectories", str(path), "--caps", "8,12", "--rules", "2:0.5,3:0.2",
                                "--settle", "2:0.2:4,3:0.5:2", "--out", str(out)]) == 0
    text = out.read_text()
    rows = [ln for ln in text.splitlines() if ln.startswith("| 8 |") or ln.startswith("| 12 |")]
    assert len(rows) == 6  # per cap: no rule, and the two rules
    assert [ln.split(" | ")[0] for ln in text.splitlines() if ln.startswith("| none |") or ln.startswith("| 2, 0.2, 4 |")
            or ln.startswith("| 3, 0.5, 2 |")] == ["| none", "| 2, 0.2, 4", "| 3, 0.5, 2"]
    for bad in (["--rules", "3:1.5"], ["--settle", "3:0.2:1"], ["--settle", "3:0.2"]):
        with pytest.raises(SystemExit):
            polish_plateau.main(bad)


def test_polish_plateau_gmres_cg_trajectories_start_where_the_gmres_phase_left_each_row(monkeypatch):
    """--method gmres-cg: the family default's GMRES phase, then CG steps recorded from where it
    left each row (row 0 of the trajectory is the GMRES phase's loss, never above Adam's)."""
    from bench import generators, polish_plateau
    from bench.generators import BenchGenerator
    from ronan_fast.inversion import InversionSettings
    from test_inversion import _square_gen

    gen = _square_gen()
    bg = BenchGenerator("square", gen, lambda n: torch.rand(n, 1, 4, 4, generator=torch.Generator().manual_seed(4)),
                        "random")
    monkeypatch.setattr(generators, "get", lambda name, device="cpu": bg)
    small = InversionSettings(steps=30, restarts=2, polish_steps=4, polish_gmres_iters=4, polish_method="cg",
                              polish_cg_iters=4)  # the one-step default's shape, at toy size
    monkeypatch.setattr(polish_plateau, "resolve_settings", lambda ad, base, **kw: small.replace(**kw))
    cg = polish_plateau.trajectories("square", 2, 3, 4, 0, method="cg")
    both = polish_plateau.trajectories("square", 2, 3, 4, 0, method="gmres-cg")
    for part in ("own", "real"):
        assert both[part].shape == (4, 2) and bool(torch.isfinite(both[part]).all())
        assert bool((both[part][0] <= cg[part][0] * (1 + 1e-5)).all())  # GMRES only lowers Adam's loss
        assert bool((both[part][1:] <= both[part][:-1] * (1 + 1e-6)).all())  # a CG step never raises it
    assert bool((both["real"][0] < cg["real"][0]).any())


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
    import json

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
    import json

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
    import json

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
    from ronan_fast.inversion import InversionSettings

    ad = _bn_bench(monkeypatch)
    seen = {}
    real_invert = speed.invert

    def cheap(adapter, images, settings=None, **kw):
        seen.setdefault(images.shape[0], []).append(adapter)
        return real_invert(adapter, images, settings=InversionSettings(steps=4, restarts=2), **kw)

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


def test_cpu_heap_tables_measure_each_setting_in_its_own_process(tmp_path):
    from bench import cpu_heap

    out = tmp_path / "heap.md"
    assert cpu_heap.main(["--generators", "default", "--batches", "4,8", "--rows-per-measure", "16",
                          "--polish", "default", "--polish-rows", "1,2", "--out", str(out)]) == 0
    report = json.loads(out.with_suffix(".json").read_text())
    steps = report["steps"]["default"]
    assert steps["off"]["held"] is False  # RONAN_FAST_CPU_HEAP=0 reached the worker
    assert steps["on"]["held"] is (platform.libc_ver()[0] == "glibc")
    for label in ("off", "on"):
        for b in ("4", "8"):
            cell = steps[label]["steps"][b]
            assert math.isfinite(cell["us_per_row"]) and cell["us_per_row"] > 0 and cell["faults_per_row"] >= 0
    polish = report["polish"]
    assert set(polish["ms_per_row_step"]) == {"1", "2"} and all(v > 0 for v in polish["ms_per_row_step"].values())
    assert polish["default_rows"] == 128 // 32  # the bundled DCGAN's latent is 32 wide
    text = out.read_text()
    assert "| default | off |" in text and "| default | on |" in text and "| 2 |" in text


def test_start_selection_replays_a_halving_policy_on_saved_trajectories(tmp_path, capsys):
    """bench/start_selection.py: a policy keeps the rows lowest at each checkpoint, so a good start
    that leads from step 25 survives halving at 25, one that leads only from step 100 does not;
    row-steps count each phase's live rows."""
    from bench import start_selection as ss

    cp = ss.CHECKPOINTS
    R = 4
    traj = torch.ones(len(cp), 2, R)
    c25 = cp.index(25)
    # image 0: start 2 leads from step 25 on and ends good; image 1: start 3 ends good but trails until step 100
    traj[c25:, 0, 2] = 1e-4
    traj[cp.index(100):, 1, 3] = 1e-4
    traj[: cp.index(100), 1, 3] = 2.0
    fin = traj[-1]
    p = ss.replay(traj, fin, cp, R, [(25, 2), (50, 1)], good=1e-3, trials=5)
    assert p.tolist() == [1.0, 0.0]
    assert ss.replay(traj, fin, cp, R, [(100, 1)], good=1e-3, trials=5).tolist() == [1.0, 1.0]
    assert ss.row_steps(24, [(25, 12), (50, 6), (75, 3), (100, 2)], 600) == 24 * 25 + 12 * 25 + 6 * 25 + 3 * 25 + 2 * 500
    path = tmp_path / "traj.pt"
    torch.save({"idx": [7, 8], "hard": [7], "checkpoints": cp, "traj": traj.view(len(cp), -1), "R": R, "n": 10,
                "seed": 1}, path)
    assert ss.main(["simulate", str(path), "--trials", "3"]) == 0
    out = capsys.readouterr().out
    assert "| 7 | yes |" in out and "expected failures of 10" in out
