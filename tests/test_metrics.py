"""Reconstruction metrics: values against reference implementations, gradients, shapes, bad input."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ronan_fast import metrics as M
from ronan_fast.adapters import LatentGenerator
from ronan_fast.inversion import invert


def _pair(shape=(4, 3, 28, 28), noise=0.2, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    target = torch.rand(shape, generator=g, dtype=dtype)
    pred = (target + noise * torch.randn(shape, generator=g, dtype=dtype)).clamp(0, 1)
    return pred, target


class TinyBackbone(nn.Module):
    """Two conv stages with ReLU, returning both feature maps (LPIPS-style list output)."""

    def __init__(self, in_channels: int = 3, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.a = nn.Sequential(nn.Conv2d(in_channels, 6, 3, padding=1), nn.ReLU())
        self.b = nn.Sequential(nn.Conv2d(6, 5, 3, stride=2, padding=1), nn.ReLU())

    def forward(self, x):
        fa = self.a(x)
        return [fa, self.b(fa)]


class DictBackbone(TinyBackbone):
    def forward(self, x):
        fa, fb = super().forward(x)
        return {"low": fa, "high": fb}


def _lpips_reference(backbone, pred, target, weights=None):
    """LPIPS written out directly from its definition, one layer at a time."""
    feats_p = backbone(pred * 2 - 1)
    feats_t = backbone(target * 2 - 1)
    total = 0
    for i, (fp, ft) in enumerate(zip(feats_p, feats_t)):
        fp = fp / (fp.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
        ft = ft / (ft.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
        d = (fp - ft) ** 2
        if weights is not None:
            d = d * weights[i].view(1, -1, 1, 1)
        total = total + d.sum(1).mean((1, 2))
    return total


# --------------------------------------------------------------------------- MSE / MAE


def test_mse_mae_values():
    pred, target = _pair((3, 1, 5, 4))
    diff = (pred - target).reshape(3, -1)
    torch.testing.assert_close(M.MSE()(pred, target), (diff**2).mean(1))
    torch.testing.assert_close(M.MAE()(pred, target), diff.abs().mean(1))
    assert M.MSE()(pred, pred).abs().max() == 0


# --------------------------------------------------------------------------- SSIM


@pytest.mark.parametrize("channels", [1, 3])
def test_ssim_matches_pytorch_msssim(channels):
    pytorch_msssim = pytest.importorskip("pytorch_msssim")
    pred, target = _pair((5, channels, 28, 28))
    ours = M.SSIMLoss().ssim(pred, target)
    ref = pytorch_msssim.ssim(pred, target, data_range=1.0, size_average=False, win_size=11, win_sigma=1.5, K=(0.01, 0.03))
    assert ours.shape == (5,)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(M.SSIMLoss()(pred, target), 1 - ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 28, 28), (3, 17, 23)])
def test_ssim_matches_skimage(shape):
    skm = pytest.importorskip("skimage.metrics")
    pred, target = _pair((3, *shape), noise=0.3, seed=1)
    ours = M.SSIMLoss().ssim(pred, target)
    for i in range(3):
        ref = skm.structural_similarity(
            pred[i].numpy(), target[i].numpy(), data_range=1.0, gaussian_weights=True, sigma=1.5,
            use_sample_covariance=False, channel_axis=0,
        )
        assert abs(float(ours[i]) - ref) < 1e-4


def test_ssim_float64_matches_skimage_closely():
    skm = pytest.importorskip("skimage.metrics")
    pred, target = _pair((1, 1, 28, 28), dtype=torch.float64)
    ours = M.SSIMLoss().ssim(pred, target)
    assert ours.dtype == torch.float64
    ref = skm.structural_similarity(pred[0, 0].numpy(), target[0, 0].numpy(), data_range=1.0, gaussian_weights=True,
                                    sigma=1.5, use_sample_covariance=False)
    assert abs(float(ours[0]) - ref) < 1e-10


def test_ssim_identical_and_constant_images():
    pred, _ = _pair((2, 3, 16, 16))
    assert torch.allclose(M.SSIMLoss()(pred, pred), torch.zeros(2), atol=1e-6)
    flat = torch.full((1, 1, 12, 12), 0.5)
    assert torch.allclose(M.SSIMLoss().ssim(flat, flat), torch.ones(1))
    # A constant image against its inverse has zero structure correlation and far-off means.
    assert float(M.SSIMLoss().ssim(torch.zeros(1, 1, 12, 12), torch.ones(1, 1, 12, 12))[0]) < 1e-3


def test_ssim_needs_window_sized_images_and_valid_params():
    with pytest.raises(ValueError, match=r"win_size=11.*11x11.*10x28"):
        M.SSIMLoss()(torch.rand(1, 1, 10, 28), torch.rand(1, 1, 10, 28))
    assert M.SSIMLoss(win_size=7)(torch.rand(1, 1, 7, 7), torch.rand(1, 1, 7, 7)).shape == (1,)
    with pytest.raises(ValueError, match="win_size"):
        M.SSIMLoss(win_size=10)
    with pytest.raises(ValueError, match="sigma"):
        M.SSIMLoss(sigma=0)
    with pytest.raises(ValueError, match="data_range"):
        M.SSIMLoss(data_range=-1.0)


# --------------------------------------------------------------------------- LPIPS


def test_lpips_zero_for_identical_positive_and_symmetric():
    metric = M.LPIPS(TinyBackbone())
    pred, target = _pair((4, 3, 16, 16))
    same = metric(target, target)
    assert same.shape == (4,) and float(same.abs().max()) < 1e-6
    d = metric(pred, target)
    assert bool((d > 0).all())
    torch.testing.assert_close(d, metric(target, pred))


def test_lpips_matches_its_definition_with_and_without_weights():
    backbone = TinyBackbone()
    pred, target = _pair((3, 3, 16, 16), seed=2)
    torch.testing.assert_close(M.LPIPS(backbone)(pred, target), _lpips_reference(backbone, pred, target))
    weights = [torch.rand(6), torch.rand(1, 5, 1, 1)]  # the second shaped like an LPIPS "lin" conv weight
    flat = [w.flatten() for w in weights]
    torch.testing.assert_close(M.LPIPS(backbone, weights=weights)(pred, target),
                               _lpips_reference(backbone, pred, target, flat))
    # Only the second layer
    only_b = M.LPIPS(backbone, layers=[1])(pred, target)
    full = _lpips_reference(backbone, pred, target, [torch.zeros(6), torch.ones(5)])
    torch.testing.assert_close(only_b, full)


def test_lpips_dict_outputs_and_layer_keys():
    backbone = DictBackbone()
    pred, target = _pair((2, 3, 16, 16), seed=3)
    both = M.LPIPS(backbone)(pred, target)
    low = M.LPIPS(backbone, layers=["low"])(pred, target)
    high = M.LPIPS(backbone, layers=["high"], weights={"high": torch.ones(5)})(pred, target)
    torch.testing.assert_close(both, low + high)
    with pytest.raises(ValueError, match=r"\['nope'\] not among"):
        M.LPIPS(backbone, layers=["nope"])(pred, target)
    with pytest.raises(ValueError, match="no weights for layer 'low'"):
        M.LPIPS(backbone, weights={"high": torch.ones(5)})(pred, target)


def test_lpips_grey_images_repeated_for_rgb_backbone():
    backbone = TinyBackbone()
    pred, target = _pair((2, 1, 16, 16), seed=4)
    grey = M.LPIPS(backbone)(pred, target)
    rgb = M.LPIPS(backbone)(pred.repeat(1, 3, 1, 1), target.repeat(1, 3, 1, 1))
    torch.testing.assert_close(grey, rgb)
    with pytest.raises(ValueError, match="takes 3-channel images, got 1 channels"):
        M.LPIPS(backbone, repeat_grey=False)(pred, target)
    # A grey backbone takes grey images as they are.
    assert M.LPIPS(TinyBackbone(in_channels=1))(pred, target).shape == (2,)


def test_lpips_backbone_frozen_and_in_eval_mode():
    backbone = TinyBackbone()
    backbone.train()
    metric = M.LPIPS(backbone)
    assert not metric.backbone.training
    assert all(not p.requires_grad for p in backbone.parameters())


def test_lpips_bad_arguments():
    with pytest.raises(TypeError, match="backbone must be a torch.nn.Module"):
        M.LPIPS(lambda x: [x])
    with pytest.raises(ValueError, match=r"weights\[1\] must be non-negative"):
        M.LPIPS(TinyBackbone(), weights=[torch.ones(6), -torch.ones(5)])
    with pytest.raises(ValueError, match="weights has 1 entries but layers names 2"):
        M.LPIPS(TinyBackbone(), layers=[0, 1], weights=[torch.ones(6)])
    pred, target = _pair((1, 3, 16, 16))
    with pytest.raises(ValueError, match="weights has 1 entries but 2 layers are used"):
        M.LPIPS(TinyBackbone(), weights=[torch.ones(6)])(pred, target)
    with pytest.raises(ValueError, match="have 4 entries but the layer has 6 channels"):
        M.LPIPS(TinyBackbone(), weights=[torch.ones(4), torch.ones(5)])(pred, target)


# --------------------------------------------------------------------------- tone-fitted MSE


def _tone_reference(pred, target, ridge):
    """The tone-fitted loss from its definition, one row and channel at a time, in float64: the
    ridge fit as an augmented least-squares problem ``[F; sqrt(lam) I] beta = [x; sqrt(lam) e_c]``
    over the target's unclipped pixels, then the residual with clipped pixels one-sided."""
    m, c = pred.shape[:2]
    out = []
    for i in range(m):
        f = torch.cat([pred[i].double().flatten(1).T, torch.ones(pred[0, 0].numel(), 1, dtype=torch.float64)], 1)
        total = 0.0
        for ch in range(c):
            x = target[i, ch].double().flatten()
            low, high = x <= 0.5 / 255, x >= 1 - 0.5 / 255
            inside = ~(low | high)
            lam = ridge * x.numel()
            e = torch.zeros(c + 1, dtype=torch.float64)
            e[ch] = 1.0
            a = torch.cat([f[inside], lam ** 0.5 * torch.eye(c + 1, dtype=torch.float64)])
            rhs = torch.cat([x[inside], lam ** 0.5 * e])
            beta = torch.linalg.lstsq(a, rhs.unsqueeze(1), driver="gelsd").solution.squeeze(1)
            d = f @ beta - x
            d = torch.where(high, d.clamp(max=0), torch.where(low, d.clamp(min=0), d))
            total += float(d.square().sum())
        out.append(total / pred[i].numel())
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("ridge", [0.0, 1e-3])
def test_tone_mse_matches_its_definition(channels, ridge):
    g = torch.Generator().manual_seed(100 + channels)
    pred = torch.rand(5, channels, 12, 10, generator=g, dtype=torch.float64)
    target = (0.8 * pred.flip(1) + 0.1 + 0.3 * torch.randn(pred.shape, generator=g, dtype=torch.float64)).clamp(0, 1)
    assert float((target == 0).float().mean()) > 0.03 and float((target == 1).float().mean()) > 0.03
    got = M.ToneMSE(ridge)(pred, target)
    torch.testing.assert_close(got, _tone_reference(pred, target, ridge), rtol=1e-9, atol=1e-15)
    # float32 inputs: the same loss to float32 precision, no NaN
    got32 = M.ToneMSE(ridge)(pred.float(), target.float())
    assert got32.dtype == torch.float32 and bool(torch.isfinite(got32).all())
    torch.testing.assert_close(got32.double(), _tone_reference(pred.float(), target.float(), ridge), rtol=1e-5, atol=0)


@pytest.mark.parametrize("channels", [1, 3])
def test_tone_mse_ignores_affine_tone_edits_and_clipping(channels):
    g = torch.Generator().manual_seed(7)
    pred = torch.rand(4, channels, 16, 16, generator=g, dtype=torch.float64)
    gain = torch.eye(channels, dtype=torch.float64) * 1.3 + 0.1 * torch.rand(4, channels, channels, generator=g,
                                                                             dtype=torch.float64)
    edited = (torch.einsum("nck,nkhw->nchw", gain, pred) + 0.15).clamp(0, 1)  # brightened: whites clip at 1
    assert float((edited == 1).float().mean()) > 0.1
    assert bool((M.MSE()(pred, edited) > 1e-2).all())
    assert bool((M.ToneMSE(0.0)(pred, edited) < 1e-25).all())
    assert bool((M.ToneMSE()(pred, edited) < 1e-14).all())  # the default ridge moves an exact fit a little
    # a structural change is not a tone edit: it still costs
    assert bool((M.ToneMSE()(pred, edited.flip(-1)) > 1e-3).all())


def test_tone_mse_clipped_pixels_cost_only_on_the_wrong_side():
    pred = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5, 0.9], dtype=torch.float64).view(1, 1, 1, 6)
    fits = 2 * pred - 0.1  # what the first five (unclipped) target pixels make the map
    target = fits.clone()
    target[..., 5] = 1.0  # the fit gives 1.7 there: above a clipped white, free
    assert float(M.ToneMSE(0.0)(pred, target)) < 1e-28
    target[..., 5] = 0.0  # a clipped black under a fit of 1.7: costs 1.7^2 / 6
    torch.testing.assert_close(M.ToneMSE(0.0)(pred, target), torch.tensor([1.7 ** 2 / 6], dtype=torch.float64))


def test_tone_mse_gradient_matches_finite_differences():
    g = torch.Generator().manual_seed(3)
    pred = (0.1 + 0.8 * torch.rand(2, 3, 6, 6, generator=g, dtype=torch.float64)).requires_grad_(True)
    target = torch.rand(2, 3, 6, 6, generator=g, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda p: M.ToneMSE()(p, target), (pred,))


def test_tone_mse_flat_images_and_bad_ridge():
    flat = torch.full((2, 1, 8, 8), 0.5)
    loss = M.ToneMSE()(flat, torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(0)))
    assert bool(torch.isfinite(loss).all())  # the ridge keeps the fit defined
    assert bool(torch.isfinite(M.ToneMSE()(torch.rand(1, 1, 8, 8), torch.ones(1, 1, 8, 8))).all())  # all clipped
    for bad in (-1e-3, float("nan"), float("inf"), "0.1", True):
        with pytest.raises(ValueError, match="ridge must be a finite number >= 0"):
            M.ToneMSE(bad)


# --------------------------------------------------------------------------- gradients


def _metrics_under_test():
    return [M.MSE(), M.MAE(), M.ToneMSE(), M.SSIMLoss(), M.LPIPS(TinyBackbone())]


@pytest.mark.parametrize("metric", _metrics_under_test(), ids=lambda m: m.name)
def test_gradient_descent_on_pred_reduces_the_loss(metric):
    pred, target = _pair((3, 3, 16, 16), noise=0.3, seed=5)
    pred = pred.clamp(0.05, 0.95).requires_grad_(True)
    loss = metric(pred, target)
    assert loss.shape == (3,)
    (grad,) = torch.autograd.grad(loss.sum(), pred)
    assert bool(torch.isfinite(grad).all()) and float(grad.abs().sum()) > 0
    with torch.no_grad():
        # Normalised step per row, so every metric moves by the same small amount.
        step = grad / grad.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
        after = metric(pred - 0.05 * step, target)
    assert bool((after < loss.detach()).all()), (loss, after)


class MaskedBackbone(nn.Module):
    """A conv whose features are multiplied by a mask that is zero on the left half: all-zero feature vectors there."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        mask = torch.ones(1, 1, 16, 16)
        mask[..., :8] = 0
        self.register_buffer("mask", mask)

    def forward(self, x):
        return [self.conv(x) * self.mask]


def test_lpips_gradient_finite_where_features_are_all_zero():
    # d/dx sqrt(sum x^2) is 0/0 at x = 0; a plain sqrt-based norm would send NaN through the mask.
    pred, target = _pair((2, 3, 16, 16), seed=6)
    pred.requires_grad_(True)
    loss = M.LPIPS(MaskedBackbone())(pred, target)
    (grad,) = torch.autograd.grad(loss.sum(), pred)
    assert bool(torch.isfinite(loss).all()) and bool(torch.isfinite(grad).all())
    assert float(grad.abs().sum()) > 0


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("metric", _metrics_under_test(), ids=lambda m: m.name)
def test_mismatched_and_malformed_inputs(metric):
    a = torch.rand(2, 3, 16, 16)
    with pytest.raises(ValueError, match=r"pred and target must have the same shape.*pred \(2, 3, 16, 16\).*target \(2, 3, 16, 15\)"):
        metric(a, torch.rand(2, 3, 16, 15))
    with pytest.raises(ValueError, match=r"pred must be \[M, C, H, W\]"):
        metric(a[0], a[0])
    with pytest.raises(TypeError, match="target must be a float tensor"):
        metric(a, a.numpy())
    with pytest.raises(ValueError, match="target must be a float tensor in"):
        metric(a, (a * 255).to(torch.uint8))


# --------------------------------------------------------------------------- get_metric


def test_get_metric_names_and_objects():
    assert isinstance(M.get_metric("mse"), M.MSE)
    assert isinstance(M.get_metric("MAE"), M.MAE)
    assert isinstance(M.get_metric("ssim"), M.SSIMLoss)
    lp = M.LPIPS(TinyBackbone())
    assert M.get_metric(lp) is lp
    with pytest.raises(ValueError, match=r"backbone.*metrics\.LPIPS\(backbone\)"):
        M.get_metric("lpips")
    assert isinstance(M.get_metric("mse-tone"), M.ToneMSE)
    with pytest.raises(ValueError, match=r"one of \('mse', 'mae', 'ssim', 'mse-tone'\).*got 'psnr'"):
        M.get_metric("psnr")
    with pytest.raises(ValueError, match="got 3"):
        M.get_metric(3)


# --------------------------------------------------------------------------- through inversion


def _tiny_generator():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 3 * 16 * 16), nn.Tanh(), nn.Unflatten(1, (3, 16, 16)))
    return LatentGenerator(net, 6, output_range=(-1, 1))


@pytest.mark.parametrize("metric", ["ssim", "lpips"])
def test_invert_runs_with_non_fused_metrics(metric):
    gen = _tiny_generator()
    images = gen.generate(2, torch.Generator().manual_seed(1)).images
    m = M.LPIPS(TinyBackbone()) if metric == "lpips" else "ssim"
    res = invert(gen, images, steps=5, restarts=2, metric=m, seed=0)
    assert res.loss.shape == (2,) and bool(torch.isfinite(res.loss).all())
    assert res.metric == metric
    # The reported loss is the metric at the returned reconstruction.
    mobj = M.get_metric(m)
    torch.testing.assert_close(res.loss, mobj(res.reconstruction, images), atol=1e-5, rtol=1e-4)


def test_invert_with_tone_mse_polishes_tone_edited_images_to_zero(monkeypatch):
    """A generated image under an affine tone edit: plain MSE cannot reach it, "mse-tone" with
    its Levenberg-Marquardt polish (the Jacobian mapped through each row's tone fit) does, with
    two polished candidates per image scored at their own images."""
    from ronan_fast.inversion import PRESETS
    from ronan_fast.inversion.polish import DenseLM, polish
    from ronan_fast.inversion.polish import dense as dense_polish

    gen = _tiny_generator()
    images = gen.generate(3, torch.Generator().manual_seed(2)).images
    edited = (images * 1.25 - 0.05).clamp(0, 1)
    s = PRESETS["authors"].replace(steps=150, lr=0.1, restarts=4, schedule="cosine", polish_steps=15, polish_candidates=2)
    plain = invert(gen, edited, settings=s, seed=0)
    assert bool((plain.loss > 1e-4).all())
    adam_only = invert(gen, edited, settings=s.replace(polish_steps=0), metric="mse-tone", seed=0)
    toned = invert(gen, edited, settings=s, metric="mse-tone", seed=0)
    assert toned.metric == "mse-tone"
    assert bool((toned.loss < 1e-9).all()) and bool((toned.loss < adam_only.loss).all()), (toned.loss, adam_only.loss)
    torch.testing.assert_close(toned.loss, M.ToneMSE()(toned.reconstruction, edited), atol=1e-9, rtol=1e-3)
    # the polish alone, from a perturbed true input
    z_true = gen.sample_latents(3, torch.Generator().manual_seed(2))
    start = z_true + 0.3 * torch.randn(z_true.shape, generator=torch.Generator().manual_seed(5))
    target_raw = gen.from_unit(edited)
    z = polish(DenseLM(tone=M.ToneMSE()), gen, start, None, target_raw, 30, metric="mse-tone")
    with torch.no_grad():
        before = M.ToneMSE()(gen.to_unit(gen.decode_raw(start)), edited)
        after = M.ToneMSE()(gen.to_unit(gen.decode_raw(z)), edited)
    assert bool((after < 1e-10).all()) and bool((before > 1e-4).all()), (before, after)
    # no tone object: not its residual
    assert polish(DenseLM(), gen, start, None, target_raw, 30, metric="mse-tone") is start
    # the Jacobians built one row at a time (as for large batches): the same steps
    few = polish(DenseLM(tone=M.ToneMSE()), gen, start, None, target_raw, 3, metric="mse-tone")
    monkeypatch.setattr(dense_polish, "DENSE_CHUNK_ELEMENTS", gen.latent_dim * edited[0].numel())
    again = polish(DenseLM(tone=M.ToneMSE()), gen, start, None, target_raw, 3, metric="mse-tone")
    torch.testing.assert_close(again, few,
                               rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("channels", [1, 3])
def test_tone_polish_jacobian_is_the_fixed_map_residual_jacobian(channels):
    """The polish's Jacobian for "mse-tone" against torch.func.jacfwd of the residual with the
    colour map held at its fitted value (float64, random generator, partly clipped target)."""
    from torch.func import jacfwd

    from ronan_fast.inversion.polish.dense import tone_jacobian

    torch.manual_seed(11)
    d, shape = 5, (channels, 6, 7)
    net = nn.Sequential(nn.Linear(d, 40), nn.Tanh(), nn.Linear(40, channels * 42), nn.Tanh()).double()
    z = torch.randn(3, d, dtype=torch.float64)
    tone = M.ToneMSE()

    def unit(zz):  # raw output in (-1, 1) -> [0, 1]
        return (net(zz).view(zz.shape[0], *shape) + 1) / 2

    with torch.no_grad():  # a contrast-stretched, noisy copy: clipped on both sides
        target = (3 * unit(z) - 1 + 0.05 * torch.randn(3, *shape, dtype=torch.float64)).clamp(0, 1)

    r, beta, active = tone.residual(unit(z), target)
    assert 0 < float(active.double().mean()) < 1  # some clipped pixels are inactive
    jac_raw = torch.stack([jacfwd(lambda q: net(q.unsqueeze(0)).flatten())(z[i]) for i in range(3)])
    got = tone_jacobian(jac_raw, beta, active)

    def fixed_map_residual(q, i):
        y = unit(q.unsqueeze(0)).flatten(2)[0]  # [C, P]
        feats = torch.cat([y, torch.ones_like(y[:1])])
        diff = beta[i] @ feats - target[i].flatten(1)
        return (torch.where(active[i], diff, torch.zeros_like(diff)) * 2).flatten()  # raw units: x (hi - lo)

    want = torch.stack([jacfwd(fixed_map_residual)(z[i], i) for i in range(3)])
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"))]


@pytest.mark.parametrize("device", DEVICES)
def test_tone_mse_and_its_polish_on_a_device(device):
    """float32 on the device against the float64 definition; the tone-edited images of a tiny
    generator on the device invert to near zero with the polish."""
    g = torch.Generator().manual_seed(21)
    pred = torch.rand(6, 3, 16, 16, generator=g, dtype=torch.float64)
    target = (0.9 * pred + 0.2 * torch.rand(pred.shape, generator=g, dtype=torch.float64) - 0.05).clamp(0, 1)
    got = M.ToneMSE()(pred.float().to(device), target.float().to(device))
    assert got.device.type == device and got.dtype == torch.float32
    torch.testing.assert_close(got.cpu().double(), _tone_reference(pred.float(), target.float(), 1e-8),
                               rtol=1e-5, atol=0)
    gen = _tiny_generator().to(device)
    images = gen.generate(2, torch.Generator().manual_seed(2)).images
    edited = (images * 0.8 + 0.1).clamp(0, 1)
    from ronan_fast.inversion import PRESETS

    s = PRESETS["authors"].replace(steps=150, lr=0.1, restarts=4, schedule="cosine", polish_steps=15)
    res = invert(gen, edited, settings=s, metric="mse-tone", seed=0)
    assert res.loss.device.type == device and bool((res.loss < 1e-8).all()), res.loss
