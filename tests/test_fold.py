"""fold_batchnorm: eval-mode BatchNorms folded into the convolutions before them."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ronan_fast.adapters import LatentGenerator, channels_last, fold_batchnorm
from ronan_fast.inversion import PRESETS, invert


class Mixed(nn.Module):
    """Every foldable kind: Conv1d, grouped Conv2d with bias, grouped ConvTranspose2d without
    bias into a BatchNorm without affine parameters, ConvTranspose3d; [N, 8] -> [N, 12, 8, 8]."""

    def __init__(self):
        super().__init__()
        self.head = nn.Sequential(nn.Linear(8, 4 * 16), nn.Unflatten(1, (4, 16)), nn.Conv1d(4, 6, 3, padding=1),
                                  nn.BatchNorm1d(6), nn.ReLU(), nn.Unflatten(2, (4, 4)))
        self.body = nn.Sequential(nn.Conv2d(6, 8, 3, padding=1, groups=2), nn.BatchNorm2d(8), nn.ReLU(),
                                  nn.ConvTranspose2d(8, 6, 4, 2, 1, groups=2, bias=False),
                                  nn.BatchNorm2d(6, affine=False), nn.Tanh())
        self.vol = nn.Sequential(nn.Unflatten(1, (1, 6)), nn.ConvTranspose3d(1, 2, 3, padding=1), nn.BatchNorm3d(2),
                                 nn.Flatten(1, 2))

    def forward(self, z):
        return self.vol(self.body(self.head(z)))


def randomise_batchnorms(net: nn.Module, g: torch.Generator) -> nn.Module:
    """Running statistics and affine parameters far from the identity, so a wrong fold shows."""
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats:
                m.running_mean.copy_(torch.randn(m.num_features, generator=g, dtype=m.running_mean.dtype))
                m.running_var.copy_(torch.rand(m.num_features, generator=g, dtype=m.running_var.dtype) * 3 + 0.05)
                if m.affine:
                    m.weight.copy_(torch.randn(m.num_features, generator=g, dtype=m.weight.dtype))
                    m.bias.copy_(torch.randn(m.num_features, generator=g, dtype=m.bias.dtype))
    return net


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_folded_generator_is_the_same_function_in_float64(seed):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    net = randomise_batchnorms(Mixed().double(), g)
    gen = LatentGenerator(net, 8, (-1, 1), image_shape=(12, 8, 8))
    z = torch.randn(7, 8, generator=g, dtype=torch.float64)
    out = gen.decode_raw(z.clone().requires_grad_(True))
    target = torch.randn(out.shape, generator=g, dtype=torch.float64)

    def value_and_grad(adapter):
        zz = z.clone().requires_grad_(True)
        o = adapter.decode_raw(zz)
        (grad,) = torch.autograd.grad((o - target).square().sum(), zz)
        return o.detach(), grad

    want, want_grad = value_and_grad(gen)
    folded = fold_batchnorm(gen, copy=True)
    assert folded.folded_batchnorms == 4
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in folded.module.modules())
    assert all(p.dtype == torch.float64 and not p.requires_grad for p in folded.module.parameters())
    got, got_grad = value_and_grad(folded)
    assert torch.isfinite(got).all() and torch.isfinite(got_grad).all()
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-9, atol=1e-12)
    # the original is untouched: its BatchNorms are still there and it computes what it did
    assert sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in gen.module.modules()) == 4
    torch.testing.assert_close(value_and_grad(gen)[0], want, rtol=0, atol=0)


def test_folded_float32_generator_agrees_to_rounding():
    g = torch.Generator().manual_seed(5)
    torch.manual_seed(5)
    net = randomise_batchnorms(Mixed(), g)
    gen = LatentGenerator(net, 8, (-1, 1))
    exact = LatentGenerator(Mixed(), 8, (-1, 1))
    exact.module.load_state_dict(net.state_dict())
    exact.module.double()
    z = torch.randn(9, 8, generator=g)
    with torch.no_grad():
        ref = exact.decode_raw(z.double())
        plain_err = (gen.decode_raw(z).double() - ref).abs().max()
        folded_err = (fold_batchnorm(gen, copy=True).decode_raw(z).double() - ref).abs().max()
    assert folded_err <= 1e-5 * ref.abs().max()
    assert folded_err <= 10 * plain_err + 1e-7


class Split(nn.Module):
    """A convolution and its BatchNorm that are not neighbours in one Sequential."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 1)
        self.bn = nn.BatchNorm2d(3)
        self.inner = nn.Sequential(nn.Conv2d(3, 3, 1))
        self.outer = nn.Sequential(self.inner, nn.BatchNorm2d(3))

    def forward(self, z):
        return self.outer(self.bn(self.conv(z.view(-1, 2, 2, 2))))


class MyBatchNorm(nn.BatchNorm2d):
    def forward(self, x):
        return super().forward(x) * 2


def unfoldable_cases():
    def seq(*layers):
        return nn.Sequential(nn.Unflatten(1, (2, 2, 2)), *layers)

    yield "training-mode BatchNorm", seq(nn.Conv2d(2, 3, 1), nn.BatchNorm2d(3)), lambda m: m[2].train()
    yield "batch statistics", seq(nn.Conv2d(2, 3, 1), nn.BatchNorm2d(3, track_running_stats=False)), None
    yield "hooked convolution", seq(nn.Conv2d(2, 3, 1), nn.BatchNorm2d(3)), \
        lambda m: m[1].register_forward_hook(lambda mod, i, o: o * 3)
    yield "hooked BatchNorm", seq(nn.Conv2d(2, 3, 1), nn.BatchNorm2d(3)), \
        lambda m: m[2].register_forward_pre_hook(lambda mod, i: (i[0] * 3,))
    yield "BatchNorm subclass", seq(nn.Conv2d(2, 3, 1), MyBatchNorm(3)), None
    yield "not neighbours", Split(), None


@pytest.mark.parametrize("case", list(unfoldable_cases()), ids=lambda c: c[0])
def test_fold_leaves_what_it_cannot_prove_the_same(case):
    _, net, after = case
    randomise_batchnorms(net, torch.Generator().manual_seed(3))
    gen = LatentGenerator(net, 8, (-1, 1), image_shape=(3, 2, 2))
    if after is not None:
        after(net)
    z = torch.randn(4, 8, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        want = gen.decode_raw(z)
    out = fold_batchnorm(gen)
    assert out is gen and gen.folded_batchnorms == 0
    with torch.no_grad():
        torch.testing.assert_close(gen.decode_raw(z), want, rtol=0, atol=0)


def small_dcgan64ish(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.ConvTranspose2d(8, 32, 4, 1, 0, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
        nn.ConvTranspose2d(32, 16, 4, 2, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
        nn.ConvTranspose2d(16, 1, 4, 2, 1), nn.Tanh(),
    )
    with torch.no_grad():  # non-trivial running statistics
        net.train()
        net(torch.randn(256, 8, 1, 1))
    return net.eval()


def test_fingerprint_stays_the_unfolded_generators_until_the_weights_change():
    gen = LatentGenerator(small_dcgan64ish(), (8, 1, 1), (-1, 1))
    before = gen.fingerprint()
    assert fold_batchnorm(gen) is gen and gen.folded_batchnorms == 2
    assert gen.fingerprint() == before
    assert fold_batchnorm(gen).folded_batchnorms == 2  # nothing more to fold
    assert gen.fingerprint() == before
    both = channels_last(fold_batchnorm(LatentGenerator(small_dcgan64ish(), (8, 1, 1), (-1, 1))))
    assert both.fingerprint() == before
    with torch.no_grad():
        gen.module[0].weight.mul_(1.5)
    assert gen.fingerprint() != before
    with pytest.raises(TypeError, match="adapter"):
        fold_batchnorm(gen.module)


def test_fingerprint_of_a_folded_conditional_generator_follows_its_class():
    """with_class changes the adapter's config, not its weights: each class's fingerprint is the
    unfolded generator's for that class, and deep copies keep it."""
    import copy

    class Cond(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(3, 8)
            self.net = small_dcgan64ish()

        def forward(self, z, c):
            return self.net(z + self.emb(c)[:, :, None, None])

    from ronan_fast.adapters import ConditionalGenerator

    gen = ConditionalGenerator(Cond(), (8, 1, 1), num_classes=3)
    want = [gen.fingerprint(), gen.with_class(1).fingerprint(), gen.with_class(2).fingerprint()]
    assert len(set(want)) == 3
    folded = fold_batchnorm(gen, copy=True)
    assert folded.folded_batchnorms == 2
    assert [folded.fingerprint(), folded.with_class(1).fingerprint(), folded.with_class(2).fingerprint()] == want
    assert copy.deepcopy(folded.with_class(2)).fingerprint() == want[2]
    assert gen.fingerprint() == want[0]  # the original, unfolded, is untouched


def test_inversion_of_a_folded_generator_agrees():
    plain = LatentGenerator(small_dcgan64ish(), (8, 1, 1), (-1, 1))
    images = plain.generate(3, torch.Generator().manual_seed(4)).images
    s = PRESETS["authors"].replace(steps=60, lr=0.1, restarts=2, schedule="cosine", check_every=10)
    a = invert(plain, images, settings=s, seed=0)
    b = invert(channels_last(fold_batchnorm(plain, copy=True)), images, settings=s, seed=0)
    assert torch.isfinite(b.loss).all()
    torch.testing.assert_close(b.loss, a.loss, rtol=1e-2, atol=1e-7)
