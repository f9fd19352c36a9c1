"""The Adam phase captured in CUDA graphs gives the eager loop's results (CUDA cases need a GPU)."""

from __future__ import annotations

import contextlib

import pytest
import torch
from test_inversion import CondNet, small_dcgan
from torch import nn

from ronan_fast.adapters import ConditionalGenerator, LatentGenerator
from ronan_fast.inversion import PRESETS, InversionSettings, adam, invert
from ronan_fast.inversion.batched import invert_chunk
from ronan_fast.inversion.calls import FixedShapeCalls
from ronan_fast.inversion.problem import Loss, Problem

HAS_CUDA = torch.cuda.is_available()
need_cuda = pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device")


def settings(**kw) -> InversionSettings:
    # halving, patience and a short check interval: the batch is compacted several times, so
    # graphs are captured, dropped and captured again
    base = dict(steps=120, lr=0.1, restarts=4, schedule="cosine", min_lr_frac=0.01, halving_every=30,
                halving_keep=0.5, min_rows=1, patience=40, rel_tol=1e-2, check_every=10)
    base.update(kw)
    return PRESETS["authors"].replace(**base)


def test_cuda_graph_is_refused_off_cuda():
    gen = LatentGenerator(small_dcgan(), 8, (-1, 1))
    images = gen.generate(2, torch.Generator().manual_seed(0)).images
    with pytest.raises(ValueError, match="cuda_graph=True needs a generator on a CUDA device"):
        invert(gen, images, settings=settings(steps=5), cuda_graph=True)
    with pytest.raises(ValueError, match="cuda_graph must be True or False"):
        invert(gen, images, settings=settings(steps=5), cuda_graph=1)


def test_attributor_checks_its_cuda_graph_flag():
    from ronan_fast.attributor import Attributor

    gen = LatentGenerator(small_dcgan(), 8, (-1, 1))
    with pytest.raises(ValueError, match="cuda_graph must be True or False"):
        Attributor(gen, None, cuda_graph="yes")
    att = Attributor(gen, None, cuda_graph=True, steps=5, restarts=2)
    with pytest.raises(ValueError, match="cuda_graph=True needs a generator on a CUDA device"):
        att.fit(n=3, seed=0)


def _count_captures(monkeypatch) -> list:
    seen = []
    real = adam.capture_graph

    def counting(step, generator):
        seen.append(1)
        return real(step, generator)

    monkeypatch.setattr(adam, "capture_graph", counting)
    return seen


def _on_cuda(gen, n, seed):
    """The generator on CUDA, and ``n`` of its own images (drawn on the CPU) followed by ``n`` noise images."""
    own = gen.generate(n, torch.Generator().manual_seed(seed)).images
    noise = torch.rand(n, *gen.image_shape, generator=torch.Generator().manual_seed(seed))
    return gen.to("cuda"), torch.cat([own, noise]).cuda()


class _RecordedStep:
    """Stands in for a captured graph on the CPU: replays the step, and fails if any tensor the step
    reads or writes (the Adam phase's and its batch's) was replaced since capture (a real graph
    would go on using the old memory)."""

    replays = 0

    def __init__(self, step):
        self.step, self.bound = step, self._tensors(step)

    #: what an Adam step reads or writes of the batch (RowBatch)
    STEP_STATE = ("z", "exp_avg", "exp_avg_sq", "step", "lr", "best_loss", "best_latent", "weight", "stop", "index",
                  "cond")

    @classmethod
    def _tensors(cls, step) -> dict:
        phase = step.__self__  # the AdamPhase whose step was captured
        out = {f"batch.{k}": getattr(phase.batch, k) for k in cls.STEP_STATE}
        out.update({k: v for k, v in vars(phase).items() if isinstance(v, torch.Tensor)})
        return {k: v for k, v in out.items() if isinstance(v, torch.Tensor)}

    def replay(self):
        now = self._tensors(self.step)
        moved = sorted(k for k in self.bound if now.get(k) is not self.bound[k])
        assert not moved, f"graph replayed after {moved} were replaced"
        type(self).replays += 1
        self.step()


def test_graph_control_flow_recaptures_after_each_compaction(monkeypatch):
    """The loop's capture/replay logic, run on the CPU with the CUDA calls stood in for."""

    class Stream:
        def __init__(self, *a, **k):
            pass

        def wait_stream(self, other):
            pass

    monkeypatch.setattr(torch.cuda, "Stream", Stream)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda *a, **k: Stream())
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    captures = []
    monkeypatch.setattr(adam, "capture_graph", lambda step, g: captures.append(1) or _RecordedStep(step))
    _RecordedStep.replays = 0
    gen = LatentGenerator(small_dcgan(), 8, (-1, 1))
    own = gen.generate(3, torch.Generator().manual_seed(5)).images
    images = torch.cat([own, torch.rand(3, *gen.image_shape, generator=torch.Generator().manual_seed(6))])
    s = settings()
    for stop in (None, torch.full((6,), 1e-4)):
        problem = Problem.build(FixedShapeCalls(gen, 16), images, None, s, Loss.named("mse"), stop, "ref")

        def chunk(cuda_graph):
            w, steps = invert_chunk(problem, 0, problem.m, cuda_graph=cuda_graph)
            return w.loss, w.inputs, w.reconstruction, w.conditions, steps

        eager = chunk(False)
        n_before = len(captures)
        graphed = chunk(True)
        assert len(captures) - n_before >= 3  # one per batch shape
        for a, b in zip(eager, graphed):
            if a is not None:
                assert torch.equal(a, b)
    assert _RecordedStep.replays > 100


@need_cuda
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("early_stop", [False, True])
def test_graph_replay_matches_the_eager_loop(monkeypatch, precision, early_stop):
    gen, images = _on_cuda(LatentGenerator(small_dcgan(), 8, (-1, 1)), 4, seed=1)
    s = settings(precision=precision)
    stop = torch.full((8,), 1e-4) if early_stop else None
    eager = invert(gen, images, settings=s, seed=3, stop_below=stop)
    captures = _count_captures(monkeypatch)
    graphed = invert(gen, images, settings=s, seed=3, stop_below=stop, cuda_graph=True)
    assert len(captures) >= 2  # captured again after a compaction
    assert torch.isfinite(graphed.loss).all()
    torch.testing.assert_close(graphed.loss, eager.loss, rtol=1e-4, atol=1e-9)
    torch.testing.assert_close(graphed.inputs, eager.inputs, rtol=1e-4, atol=1e-6)
    assert torch.equal(graphed.row_steps, eager.row_steps)


@need_cuda
def test_graph_replay_matches_the_eager_loop_for_a_conditional_generator():
    gen, images = _on_cuda(ConditionalGenerator(CondNet(), 4, num_classes=3), 3, seed=2)
    s = settings(restarts=2)
    eager = invert(gen, images, settings=s, seed=0)
    graphed = invert(gen, images, settings=s, seed=0, cuda_graph=True)
    torch.testing.assert_close(graphed.loss, eager.loss, rtol=1e-4, atol=1e-9)
    assert torch.equal(graphed.conditions, eager.conditions)


class Syncing(nn.Module):
    """Reads a value back to the host in its forward: cannot be captured."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 64)

    def forward(self, z):
        scale = float(z.abs().max().item()) + 1.0
        return torch.tanh(self.fc(z) / scale).view(-1, 1, 8, 8)


@need_cuda
def test_a_generator_that_synchronises_gets_a_clear_error():
    gen, images = _on_cuda(LatentGenerator(Syncing(), 4, (-1, 1)), 1, seed=0)
    with pytest.raises(RuntimeError, match="cuda_graph=True: capturing the inversion step of .* Invert with "
                                           "cuda_graph=False"):
        invert(gen, images, settings=settings(steps=20), cuda_graph=True)
    # the eager loop still works on the same generator afterwards
    res = invert(gen, images, settings=settings(steps=20))
    assert torch.isfinite(res.loss).all()
