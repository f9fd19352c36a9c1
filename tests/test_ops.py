"""The compiled kernels against their reference twins (evaluated in float64), torch.optim.Adam,
torch.library.opcheck and torch.compile; and bad input, through the dispatcher and torch.ops.

CUDA cases run where a GPU and CUDA kernels are present and are skipped otherwise. With
RONAN_FAST_REQUIRE_EXT=1 (CI) a missing extension fails instead of skipping.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
import types
import zlib

import pytest
import torch
from torch.testing import assert_close

import ronan_fast
from ronan_fast import _ext, ops

REQUIRE_EXT = os.environ.get("RONAN_FAST_REQUIRE_EXT") == "1"
HAS_CUDA = torch.cuda.is_available()
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device"))]
FLOATS = [torch.float32, torch.bfloat16, torch.float16]
METRICS = ["mse", "mae"]


def need_ext(device: str) -> None:
    if _ext.has_device(torch.device(device)):
        return
    why = _ext.why_unavailable(torch.device(device))
    if REQUIRE_EXT:
        pytest.fail(f"the compiled extension is required here (RONAN_FAST_REQUIRE_EXT=1): {why}")
    pytest.skip(why)


def gen(*key: object) -> torch.Generator:
    """A generator seeded from the test's parameters (and RONAN_FAST_TEST_SEED, to draw other inputs)."""
    salt = os.environ.get("RONAN_FAST_TEST_SEED", "0")
    return torch.Generator().manual_seed(zlib.crc32(repr((salt, *key)).encode()))


def tol(dtype: torch.dtype) -> float:
    return 1e-5 if dtype == torch.float32 else 1e-2


# --------------------------------------------------------------------------- recon_loss_grad

RECON_SHAPES = [  # M, B, C, H, W
    (1, 1, 1, 1, 1),
    (1, 1, 3, 64, 64),  # one row over several chunks
    (1, 1, 3, 128, 96),
    (7, 3, 3, 17, 19),  # odd sizes
    (12, 4, 1, 28, 28),  # 3 restarts per target
    (5, 5, 2, 1, 4099),  # a chunk tail of a few elements
    (33, 2, 3, 5, 5),
]


def recon_inputs(shape, pred_dtype, target_dtype, device, g):
    m, b, c, h, w = shape
    pred = torch.randn(m, c, h, w, generator=g).to(pred_dtype)
    target = torch.randn(b, c, h, w, generator=g).to(target_dtype)
    index = torch.randint(0, b, (m,), generator=g)
    index[: min(m, b)] = torch.arange(min(m, b))  # every target used at least once where possible
    weight = torch.rand(m, generator=g) * 2 - 0.5
    weight[torch.rand(m, generator=g) < 0.3] = 0.0
    if m > 1:
        weight[1] = 0.0
        pred[1, 0, 0, 0] = float("inf")  # a frozen, diverged row: its gradient is still 0
    return [t.to(device) for t in (pred, target, index, weight)]


def check_recon(pred, target, index, weight, metric, loss, grad):
    ref_loss, ref_grad = ops.recon_loss_grad_ref(pred.double(), target.double(), index, weight, metric)
    assert loss.dtype == torch.float32 and loss.shape == (pred.shape[0],)
    assert grad.dtype == pred.dtype and grad.shape == pred.shape
    finite_rows = torch.isfinite(ref_loss)
    assert torch.isfinite(loss[finite_rows]).all()
    assert torch.isfinite(grad[weight == 0]).all() and (grad[weight == 0] == 0).all()
    assert_close(loss[finite_rows].double(), ref_loss[finite_rows], rtol=1e-5, atol=1e-7)
    assert (torch.isinf(loss) == torch.isinf(ref_loss)).all()
    live = weight != 0
    if live.any():
        r = tol(pred.dtype)
        scale = ref_grad[live].abs().max().item()
        assert_close(grad[live].double(), ref_grad[live], rtol=r, atol=r * scale)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("target_dtype", FLOATS, ids=str)
@pytest.mark.parametrize("pred_dtype", FLOATS, ids=str)
@pytest.mark.parametrize("shape", RECON_SHAPES, ids=str)
def test_recon_loss_grad_matches_reference(shape, pred_dtype, target_dtype, metric, device):
    need_ext(device)
    args = recon_inputs(shape, pred_dtype, target_dtype, device, gen("recon", shape, pred_dtype, target_dtype, metric))
    loss, grad = ops.recon_loss_grad(*args, metric, impl="ext")
    check_recon(*args, metric, loss, grad)


@pytest.mark.parametrize("device", DEVICES)
def test_recon_loss_grad_exact_cases(device):
    need_ext(device)
    pred = torch.tensor([[1.0, 2.0, 3.0, 4.0], [0.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]]).view(3, 1, 2, 2)
    target = torch.tensor([[1.0, 0.0, 5.0, 4.0]]).view(1, 1, 2, 2)
    index = torch.zeros(3, dtype=torch.int64)
    weight = torch.tensor([1.0, 0.0, 2.0])
    d = (device,)
    loss, grad = ops.recon_loss_grad(pred.to(*d), target.to(*d), index.to(*d), weight.to(*d), "mse", impl="ext")
    assert_close(loss.cpu(), torch.tensor([2.0, 10.5, 6.5]))
    assert_close(grad.cpu().flatten(1), torch.tensor([[0, 1.0, -1.0, 0], [0, 0, 0, 0], [0, 1.0, -4.0, -3.0]]))
    loss, grad = ops.recon_loss_grad(pred.to(*d), target.to(*d), index.to(*d), weight.to(*d), "mae", impl="ext")
    assert_close(loss.cpu(), torch.tensor([1.0, 2.5, 2.0]))
    assert_close(grad.cpu().flatten(1), torch.tensor([[0, 0.25, -0.25, 0], [0, 0, 0, 0], [0, 0.5, -0.5, -0.5]]))


@pytest.mark.parametrize("device", DEVICES)
def test_recon_loss_grad_handles_non_contiguous_inputs(device):
    need_ext(device)
    g = gen("noncontig")
    pred = torch.randn(4, 3, 9, 11, generator=g).to(device).to(memory_format=torch.channels_last)
    target = torch.randn(2, 3, 11, 9, generator=g).to(device).transpose(2, 3)
    index = torch.tensor([0, 1, 1, 0, 1, 0, 0, 1], device=device)[::2]
    weight = torch.rand(8, generator=g).to(device)[::2]
    assert not (pred.is_contiguous() or target.is_contiguous() or index.is_contiguous())
    for call in (ops.recon_loss_grad, lambda *a: torch.ops.ronan_fast.recon_loss_grad(*a)):
        loss, grad = call(pred, target, index, weight, "mse")
        check_recon(pred, target, index, weight, "mse", loss, grad)


@pytest.mark.parametrize("device", DEVICES)
def test_recon_loss_grad_empty_batch(device):
    need_ext(device)
    pred = torch.empty(0, 3, 4, 4, device=device)
    target = torch.randn(2, 3, 4, 4, device=device)
    empty_i = torch.empty(0, dtype=torch.int64, device=device)
    loss, grad = ops.recon_loss_grad(pred, target, empty_i, torch.empty(0, device=device), impl="ext")
    assert loss.shape == (0,) and grad.shape == pred.shape


# --------------------------------------------------------------------------- latent_adam_step_

ADAM_SHAPES = [(1, 1), (1, 512), (7, 13), (64, 512), (3, 4099), (5, 18 * 512)]


def adam_state(m, d, device, g):
    latent = torch.randn(m, d, generator=g)
    state = dict(
        latent=latent,
        exp_avg=torch.randn(m, d, generator=g) * 0.1,
        exp_avg_sq=torch.rand(m, d, generator=g) * 0.01,
        step=torch.randint(0, 6, (m,), generator=g),
        lr=torch.rand(m, generator=g) * 0.1 + 1e-3,
        active=torch.rand(m, generator=g) < 0.7,
        best_loss=torch.where(torch.rand(m, generator=g) < 0.5, torch.rand(m, generator=g), float("inf")),
        best_latent=torch.randn(m, d, generator=g),
    )
    if m > 0:
        state["active"][0] = True
    if m > 1:
        state["active"][1] = False
    return {k: v.to(device) for k, v in state.items()}


ADAM_ATOL = {"latent": 1e-6, "best_latent": 1e-6, "exp_avg": 1e-7, "exp_avg_sq": 1e-9}
ADAM_ORDER = ("latent", "grad", "exp_avg", "exp_avg_sq", "step", "lr", "active", "loss", "best_loss", "best_latent")


def adam_args(state, grad, loss):
    full = dict(state, grad=grad, loss=loss)
    return [full[k] for k in ADAM_ORDER]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", ADAM_SHAPES, ids=str)
def test_latent_adam_step_matches_reference(shape, device):
    need_ext(device)
    m, d = shape
    g = gen("adam", shape)
    state = adam_state(m, d, device, g)
    ref = {k: (v.double() if v.is_floating_point() else v.clone()) for k, v in state.items()}
    betas = (0.9, 0.999, 1e-8) if m != 7 else (0.5, 0.99, 1e-6)
    for it in range(5):
        grad = torch.randn(m, d, generator=g).to(device)
        loss = torch.rand(m, generator=g)
        loss[torch.rand(m, generator=g) < 0.2] = float("nan")  # never an improvement
        loss = loss.to(device)
        before = {k: v.clone() for k, v in state.items()}
        ops.latent_adam_step_(*adam_args(state, grad, loss), *betas, impl="ext")
        ops.latent_adam_step_ref_(*adam_args(ref, grad.double(), loss.double()), *betas)
        frozen = ~before["active"]
        for k, v in state.items():
            assert torch.equal(v[frozen], before[k][frozen]), f"{k} of a frozen row changed at step {it}"
            if v.is_floating_point():
                assert not torch.isnan(v).any(), f"NaN in {k} at step {it}"
                assert_close(v.double(), ref[k], rtol=1e-5, atol=ADAM_ATOL.get(k, 0.0), msg=f"{k} at step {it}")
            else:
                assert torch.equal(v, ref[k]), f"{k} at step {it}"
        assert torch.isfinite(state["latent"]).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("hyper", [(0.9, 0.999, 1e-8), (0.5, 0.99, 1e-6)], ids=str)
def test_latent_adam_step_matches_torch_optim_adam(hyper, device):
    need_ext(device)
    beta1, beta2, eps = hyper
    g = gen("torch-adam", hyper)
    d = 37
    lr = torch.tensor([0.05])
    latent = torch.randn(1, d, generator=g).to(device)
    param = torch.nn.Parameter(latent.clone())
    opt = torch.optim.Adam([param], lr=lr.item(), betas=(beta1, beta2), eps=eps)
    z = torch.zeros_like(latent)
    state = dict(latent=latent, exp_avg=z.clone(), exp_avg_sq=z.clone(), step=torch.zeros(1, dtype=torch.int64),
                 lr=lr, active=torch.ones(1, dtype=torch.bool), best_loss=torch.full((1,), float("inf")),
                 best_latent=z.clone())
    state = {k: v.to(device) for k, v in state.items()}
    for it in range(8):
        grad = torch.randn(1, d, generator=g).to(device)
        param.grad = grad.clone()
        opt.step()
        loss = torch.tensor([1.0 / (it + 1)], device=device)
        ops.latent_adam_step_(*adam_args(state, grad, loss), beta1, beta2, eps, impl="ext")
        s = opt.state[param]
        assert_close(state["latent"], param.detach(), rtol=1e-6, atol=1e-6, msg=f"latent at step {it}")
        assert_close(state["exp_avg"], s["exp_avg"], rtol=1e-6, atol=1e-7)
        assert_close(state["exp_avg_sq"], s["exp_avg_sq"], rtol=1e-6, atol=1e-9)
        assert int(state["step"]) == it + 1 == int(s["step"])
        assert float(state["best_loss"]) == loss.item()


@pytest.mark.parametrize("device", DEVICES)
def test_latent_adam_step_best_tracking(device):
    need_ext(device)
    d = 8
    state = dict(latent=torch.arange(3 * d, dtype=torch.float32).view(3, d), exp_avg=torch.zeros(3, d),
                 exp_avg_sq=torch.zeros(3, d), step=torch.zeros(3, dtype=torch.int64), lr=torch.full((3,), 0.1),
                 active=torch.tensor([True, True, False]), best_loss=torch.tensor([0.5, 0.5, 0.5]),
                 best_latent=torch.full((3, d), -1.0))
    state = {k: v.to(device) for k, v in state.items()}
    before = state["latent"].clone()
    loss = torch.tensor([0.25, float("nan"), 0.0], device=device)  # better, NaN, frozen
    ops.latent_adam_step_(*adam_args(state, torch.ones(3, d, device=device), loss), impl="ext")
    assert state["best_loss"].tolist() == [0.25, 0.5, 0.5]
    assert torch.equal(state["best_latent"][0], before[0])
    assert (state["best_latent"][1:] == -1).all()
    assert state["step"].tolist() == [1, 1, 0]
    assert_close(state["latent"][:2], before[:2] - 0.1, rtol=0, atol=1e-6)  # Adam's first step is lr * sign(g)
    assert torch.equal(state["latent"][2], before[2])


@pytest.mark.parametrize("device", DEVICES)
def test_latent_adam_step_empty_rows(device):
    need_ext(device)
    a = good_adam(device, m=3, d=0)
    a["active"][:] = torch.tensor([True, False, True])
    ops.latent_adam_step_(*a.values(), impl="ext")
    assert a["step"].cpu().tolist() == [s + t for s, t in zip(good_adam("cpu", 3, 0)["step"].tolist(), [1, 0, 1])]
    ops.latent_adam_step_(*good_adam(device, m=0, d=4).values(), impl="ext")


# --------------------------------------------------------------------------- best_over_restarts


BEST_SHAPES = [(1, 1), (10, 3), (100, 7), (0, 3), (0, 0), (6, 9)]  # M, B; B > used targets leaves some empty


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", BEST_SHAPES, ids=str)
def test_best_over_restarts_matches_reference(shape, device):
    need_ext(device)
    m, b = shape
    g = gen("best", shape)
    loss = torch.randint(0, 4, (m,), generator=g).float() / 4 - 0.25  # many ties, a few negatives
    special = torch.rand(m, generator=g)
    loss[special < 0.15] = float("nan")
    loss[(special >= 0.15) & (special < 0.2)] = float("inf")
    loss[(special >= 0.2) & (special < 0.25)] = -float("inf")
    if m > 2:
        loss[0], loss[1] = -0.0, 0.0
    index = torch.randint(0, max(b - 1, 1), (m,), generator=g)  # the last target stays empty when B > 1
    out_loss, out_row = ops.best_over_restarts(loss.to(device), index.to(device), b, impl="ext")
    ref_loss, ref_row = ops.best_over_restarts_ref(loss.double(), index, b)
    assert out_loss.dtype == torch.float32 and out_row.dtype == torch.int64
    assert out_loss.shape == out_row.shape == (b,)
    assert torch.equal(out_row.cpu(), ref_row)
    assert_close(out_loss.cpu().double(), ref_loss, rtol=0, atol=0)
    assert not torch.isnan(out_loss).any()
    if b > 1:
        assert out_row[-1] == -1 and out_loss[-1] == float("inf")


@pytest.mark.parametrize("device", DEVICES)
def test_best_over_restarts_ties_go_to_the_lowest_row(device):
    need_ext(device)
    loss = torch.tensor([3.0, 1.0, float("nan"), 1.0, 1.0, -0.0, 0.0], device=device)
    index = torch.tensor([0, 0, 1, 0, 0, 2, 2], device=device)
    out_loss, out_row = ops.best_over_restarts(loss, index, 4, impl="ext")
    assert out_row.tolist() == [1, -1, 5, -1]
    assert out_loss.tolist()[:3] == [1.0, float("inf"), 0.0]


# --------------------------------------------------------------------------- dispatch


def test_extension_reports_what_it_was_built_for():
    need_ext("cpu")
    assert isinstance(_ext._C.WITH_CUDA, bool)
    assert _ext._C.TORCH_VERSION == torch.__version__
    assert _ext._C.CUDA_VERSION == torch.version.cuda
    assert _ext.build_info == {"torch_version": torch.__version__, "cuda_version": torch.version.cuda,
                               "with_cuda": _ext._C.WITH_CUDA}


def test_impl_ext_runs_the_extension_on_cpu():
    need_ext("cpu")
    assert torch._C._dispatch_has_kernel_for_dispatch_key("ronan_fast::recon_loss_grad", "CPU")
    args = recon_inputs((3, 2, 1, 4, 4), torch.float32, torch.float32, "cpu", gen("ext-runs"))
    seen = {}
    for impl in ("ext", "ref", "auto"):
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            ops.recon_loss_grad(*args, impl=impl)
            ops.best_over_restarts(torch.rand(3), torch.tensor([0, 1, 0]), 2, impl=impl)
        seen[impl] = {e.name for e in prof.events() if e.name.startswith("ronan_fast::")}
    assert seen["ext"] == seen["auto"] == {"ronan_fast::recon_loss_grad", "ronan_fast::best_over_restarts"}
    assert seen["ref"] == set()


def test_impl_ext_without_kernels_raises(monkeypatch):
    monkeypatch.setattr(_ext, "_C", None)
    monkeypatch.setattr(_ext, "_error", "not built for this test")
    args = recon_inputs((2, 1, 1, 2, 2), torch.float32, torch.float32, "cpu", gen("no-ext"))
    with pytest.raises(RuntimeError, match="not built for this test"):
        ops.recon_loss_grad(*args, impl="ext")
    monkeypatch.setattr(ops, "_warned", set())
    with pytest.warns(RuntimeWarning, match="reference"):
        loss, _ = ops.recon_loss_grad(*args, impl="auto")
    assert_close(loss, ops.recon_loss_grad_ref(*args)[0])
    with pytest.raises(ValueError, match="impl must be"):
        ops.recon_loss_grad(*args, impl="fast")


def test_a_build_for_another_torch_is_refused(monkeypatch):
    fake = types.ModuleType("ronan_fast._build_info")
    fake.TORCH_VERSION, fake.CUDA_VERSION, fake.WITH_CUDA = "1.0.0+cu999", "99.9", True
    monkeypatch.setitem(sys.modules, "ronan_fast._build_info", fake)
    monkeypatch.setattr(ronan_fast, "_build_info", fake, raising=False)
    monkeypatch.setattr(_ext, "build_info", _ext.build_info)
    monkeypatch.setattr(_ext, "_C", _ext._C)
    with pytest.raises(_ext.ExtensionMismatchError) as info:
        _ext._load()
    msg = str(info.value)
    assert "built for torch 1.0.0+cu999 (CUDA 99.9)" in msg and f"torch {torch.__version__}" in msg
    assert isinstance(info.value, ImportError)


def test_index_checked_again_after_in_place_change():
    args = recon_inputs((4, 2, 1, 3, 3), torch.float32, torch.float32, "cpu", gen("index-cache"))
    index = args[2]
    ops.recon_loss_grad(*args)
    ops.recon_loss_grad(*args)  # same tensor, unchanged: not read again
    index[3] = 2
    with pytest.raises(ValueError, match=r"index values must lie in \[0, 2\), got range \[0, 2\]"):
        ops.recon_loss_grad(*args)


# --------------------------------------------------------------------------- bad input


def cpp_words(words: str) -> str:
    """The part of a Python check's message that the C++ check's message has too."""
    return re.split(r" \[|=", words)[0]


def good_recon(device="cpu"):
    return dict(zip(("pred", "target", "index", "weight"),
                    recon_inputs((3, 2, 2, 4, 4), torch.float32, torch.float32, device, gen("bad")))) | {"metric": "mse"}


BAD_RECON = [  # change, words the message must contain
    (lambda a: a.update(metric="l2"), "metric"),
    (lambda a: a.update(pred=a["pred"][0]), "pred must be [M, C, H, W]"),
    (lambda a: a.update(target=a["target"][0]), "target must be [B, C, H, W]"),
    (lambda a: a.update(pred=a["pred"].double()), "pred must be float32"),
    (lambda a: a.update(target=a["target"].int()), "target must be float32"),
    (lambda a: a.update(target=a["target"][:, :, :3]), "differ in [C, H, W]"),
    (lambda a: a.update(pred=a["pred"][:, :0], target=a["target"][:, :0]), "C*H*W > 0"),
    (lambda a: a.update(index=a["index"][:2]), "index must be [M]"),
    (lambda a: a.update(index=a["index"].int()), "index must be int64"),
    (lambda a: a.update(weight=a["weight"][:, None]), "weight must be [M]"),
    (lambda a: a.update(weight=a["weight"].half()), "weight must be float32"),
    (lambda a: a["index"].__setitem__(1, 2), "index values must lie in [0, 2)"),
    (lambda a: a["index"].__setitem__(0, -1), "index values must lie in [0, 2)"),
]


@pytest.mark.parametrize("change,words", BAD_RECON, ids=[w for _, w in BAD_RECON])
def test_recon_loss_grad_bad_input(change, words):
    a = good_recon()
    change(a)
    with pytest.raises(ValueError) as info:
        ops.recon_loss_grad(**a, impl="ref")
    assert words in str(info.value)
    if _ext.has_device(torch.device("cpu")):
        with pytest.raises(RuntimeError) as info:
            torch.ops.ronan_fast.recon_loss_grad(a["pred"], a["target"], a["index"], a["weight"], a["metric"])
        assert cpp_words(words) in str(info.value)


def good_adam(device="cpu", m=3, d=5):
    state = adam_state(m, d, device, gen("bad-adam"))
    return dict(zip(ADAM_ORDER, adam_args(state, torch.randn(m, d, device=device), torch.rand(m, device=device))))


BAD_ADAM = [
    (lambda a: a.update(latent=a["latent"][0]), "latent must be [M, D]"),
    (lambda a: a.update(grad=a["grad"][:, :4]), "grad must have latent's shape"),
    (lambda a: a.update(exp_avg=a["exp_avg"].double()), "exp_avg must be float32"),
    (lambda a: a.update(exp_avg_sq=a["exp_avg_sq"].t().contiguous().t()), "exp_avg_sq must be contiguous"),
    (lambda a: a.update(best_latent=a["best_latent"][:2]), "best_latent must have latent's shape"),
    (lambda a: a.update(step=a["step"].int()), "step must be"),
    (lambda a: a.update(lr=a["lr"][:2]), "lr must be [M]"),
    (lambda a: a.update(active=a["active"].float()), "active must be"),
    (lambda a: a.update(loss=a["loss"].half()), "loss must be"),
    (lambda a: a.update(best_loss=torch.zeros(6)[::2]), "best_loss must be contiguous"),
]


@pytest.mark.parametrize("change,words", BAD_ADAM, ids=[w for _, w in BAD_ADAM])
def test_latent_adam_step_bad_input(change, words):
    a = good_adam()
    change(a)
    before = {k: v.clone() for k, v in a.items()}
    with pytest.raises(ValueError, match=re.escape(words)):
        ops.latent_adam_step_(*a.values(), impl="ref")
    if _ext.has_device(torch.device("cpu")):
        with pytest.raises(RuntimeError, match=re.escape(cpp_words(words))):
            torch.ops.ronan_fast.latent_adam_step_(*a.values(), 0.9, 0.999, 1e-8)
    for k, v in a.items():
        assert torch.equal(v, before[k]), f"{k} changed by a refused call"


@pytest.mark.parametrize("hyper,words", [((1.0, 0.999, 1e-8), "beta1"), ((0.9, -0.1, 1e-8), "beta2"),
                                         ((0.9, 0.999, 0.0), "eps")])
def test_latent_adam_step_bad_hyperparameters(hyper, words):
    a = good_adam()
    with pytest.raises(ValueError, match=words):
        ops.latent_adam_step_(*a.values(), *hyper)
    if _ext.has_device(torch.device("cpu")):
        with pytest.raises(RuntimeError, match=words):
            torch.ops.ronan_fast.latent_adam_step_(*a.values(), *hyper)


BAD_BEST = [
    (dict(best_loss=torch.zeros(3, 1)), "best_loss must be [M]"),
    (dict(best_loss=torch.zeros(3, dtype=torch.float64)), "best_loss must be float32"),
    (dict(index=torch.zeros(2, dtype=torch.int64)), "index must be [M]"),
    (dict(index=torch.zeros(3, dtype=torch.int32)), "index must be int64"),
    (dict(num_targets=-1), "num_targets must be >= 0"),
    (dict(index=torch.tensor([0, 2, 1])), "index values must lie in [0, 2)"),
]


@pytest.mark.parametrize("change,words", BAD_BEST, ids=[w for _, w in BAD_BEST])
def test_best_over_restarts_bad_input(change, words):
    a = dict(best_loss=torch.rand(3), index=torch.tensor([0, 1, 1]), num_targets=2) | change
    with pytest.raises(ValueError) as info:
        ops.best_over_restarts(**a, impl="ref")
    assert words in str(info.value)
    if _ext.has_device(torch.device("cpu")):
        with pytest.raises(RuntimeError) as info:
            torch.ops.ronan_fast.best_over_restarts(a["best_loss"], a["index"], a["num_targets"])
        assert cpp_words(words) in str(info.value)


@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device")
def test_wrong_device_is_refused():
    need_ext("cuda")
    a = good_recon()
    a["target"] = a["target"].cuda()
    with pytest.raises(ValueError, match="target is on cuda"):
        ops.recon_loss_grad(**a)
    with pytest.raises(RuntimeError, match="pred is on cpu"):
        torch.ops.ronan_fast.recon_loss_grad(*a.values())
    b = good_adam()
    b["exp_avg"] = b["exp_avg"].cuda()
    with pytest.raises(ValueError, match="exp_avg is on cuda"):
        ops.latent_adam_step_(*b.values())
    with pytest.raises(RuntimeError, match="is on"):
        torch.ops.ronan_fast.latent_adam_step_(*b.values(), 0.9, 0.999, 1e-8)
    with pytest.raises(RuntimeError, match="index is on"):
        torch.ops.ronan_fast.best_over_restarts(torch.rand(3, device="cuda"), torch.tensor([0, 1, 1]), 2)


@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device")
def test_cuda_out_of_range_index_poisons_the_row_only():
    need_ext("cuda")
    a = good_recon("cuda")
    a["index"][1] = 7  # direct call: no host check on CUDA, the kernel guards the row
    loss, grad = torch.ops.ronan_fast.recon_loss_grad(*a.values())
    torch.cuda.synchronize()
    assert torch.isnan(loss[1]) and (grad[1] == 0).all()
    good = torch.tensor([True, False, True], device="cuda")
    ref_loss, _ = ops.recon_loss_grad_ref(a["pred"][good], a["target"], a["index"][good], a["weight"][good])
    assert_close(loss[good], ref_loss, rtol=1e-5, atol=1e-7)
    out_loss, out_row = torch.ops.ronan_fast.best_over_restarts(torch.tensor([0.5, 0.1], device="cuda"),
                                                               torch.tensor([0, 5], device="cuda"), 1)
    assert out_row.tolist() == [0] and out_loss.tolist() == [0.5]


# --------------------------------------------------------------------------- opcheck and torch.compile


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    need_ext(device)
    for pred_dtype, target_dtype, metric in [(torch.float32, torch.float32, "mse"), (torch.bfloat16, torch.float16,
                                                                                     "mae")]:
        args = recon_inputs((4, 2, 3, 5, 7), pred_dtype, target_dtype, device, gen("opcheck"))
        torch.library.opcheck(torch.ops.ronan_fast.recon_loss_grad.default, (*args, metric))
    a = good_adam(device, m=4, d=6)
    torch.library.opcheck(torch.ops.ronan_fast.latent_adam_step_.default, (*a.values(), 0.9, 0.999, 1e-8))
    loss = torch.tensor([0.3, float("nan"), 0.1, 0.2], device=device)
    torch.library.opcheck(torch.ops.ronan_fast.best_over_restarts.default,
                          (loss, torch.tensor([0, 0, 1, 2], device=device), 4))


def _compiler_available() -> bool:
    return shutil.which(os.environ.get("CXX", "g++")) is not None or shutil.which("c++") is not None


@pytest.mark.skipif(not _compiler_available(), reason="torch.compile on the CPU needs a C++ compiler")
def test_torch_compile_of_one_inversion_step():
    need_ext("cpu")
    g = gen("compile")
    pred, target, index, weight = recon_inputs((6, 2, 3, 8, 8), torch.float32, torch.float32, "cpu", g)
    weight[1] = 1.0
    pred[1, 0, 0, 0] = 0.0

    def step(pred, target, index, weight, state):
        loss, grad = torch.ops.ronan_fast.recon_loss_grad(pred, target, index, weight, "mse")
        latent_grad = grad.flatten(1)[:, : state["latent"].shape[1]] * 3.0
        torch.ops.ronan_fast.latent_adam_step_(state["latent"], latent_grad, state["exp_avg"], state["exp_avg_sq"],
                                               state["step"], state["lr"], state["active"], loss,
                                               state["best_loss"], state["best_latent"], 0.9, 0.999, 1e-8)
        return torch.ops.ronan_fast.best_over_restarts(state["best_loss"], index, target.shape[0])

    eager_state = adam_state(6, 16, "cpu", g)
    compiled_state = {k: v.clone() for k, v in eager_state.items()}
    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, dynamic=False)
    for _ in range(2):
        expect = step(pred, target, index, weight, eager_state)
        got = compiled(pred, target, index, weight, compiled_state)
        assert_close(got, expect)
        for k in eager_state:
            assert_close(compiled_state[k], eager_state[k], msg=k)
