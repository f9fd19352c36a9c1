"""Stagewise inversion of deterministic multi-step samplers (a DDIM sampler's steps).

A K-step deterministic sampler is the composition ``G = f_K o f_(K-1) o ... o f_1`` of its
steps: ``f_i`` maps step i's input (shaped like the initial noise) to the next step's input,
and the last, ``f_K``, maps its input to the image (its predicted x_0). Inverting G end to end
by gradient descent fails on the zoo's 6-step DDIM sampler: no own image converges
(``bench/results/convergence_cpu_ddim.md``), because the first step, at t = 999, divides by
sqrt(abar) = 0.0064 and clips, and every gradient has to pass through all six UNet calls.

Each earlier step on its own is benign: ``f_i`` is a well-conditioned map of the noise-shaped
input onto itself (a scaled identity plus a correction), and Gauss-Newton solves
``f_i(x) = x_next`` to rounding error in a few iterations from the DDIM scaling
``sqrt(abar_t / abar_prev) x_next``. So the whole difficulty of the inversion lies in the last
step, a one-step generator of its own (one UNet call whose input is as wide as the image). This
module inverts:

1. the last step, seen as a one-step generator (:class:`FinalStep`), with the package's
   inversion (Adam over restarts, then the square-Jacobian polish), starting from the forward
   process at that step's timestep, ``sqrt(abar) image + sqrt(1 - abar) noise``;
2. each earlier step, last to first, for the input that gives the next step's recovered input,
   by GMRES Gauss-Newton steps (``J v`` products only), then matrix-free Levenberg-Marquardt for
   rows GMRES leaves unsolved;
3. and reports the loss of the whole sampler's output from the recovered initial noise: a
   reconstruction is only as good as the chain that was actually solved.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ronan_fast.adapters import GeneratorAdapter
from ronan_fast.inversion.batched import invert_batched
from ronan_fast.inversion.calls import FixedShapeCalls, call_rows_for
from ronan_fast.inversion.polish import ConjugateGradientLM, GMRESGaussNewton, Leaving
from ronan_fast.inversion.problem import Loss
from ronan_fast.inversion.result import InversionResult

__all__ = ["FinalStep", "StepMap", "invert_stagewise", "solve_step", "PREFIX_GMRES_STEPS", "PREFIX_CG_STEPS",
           "SOLVED_REL"]

#: Gauss-Newton steps (30 GMRES iterations each) per earlier step, then Levenberg-Marquardt
#: steps (100 CG iterations each) for rows still unsolved; the earlier steps of the zoo's DDIM
#: sampler solve to float32 rounding in 3 to 6 Gauss-Newton steps
PREFIX_GMRES_STEPS = 20
PREFIX_CG_STEPS = 20
#: an earlier step counts as solved once its residual's RMS is under this fraction of its
#: target's RMS (float32 rounding is 6e-8); only unsolved rows go on to the CG phase
SOLVED_REL = 1e-6


class _ChainPart(GeneratorAdapter):
    """A part of a sampler chain seen as a generator of latent-shaped inputs."""

    def __init__(self, base: GeneratorAdapter, chain: nn.Module, name: str):
        self.base, self.chain = base, chain
        self.latent_shape = tuple(base.latent_shape)
        self.latent_dim = base.latent_dim
        self.name = name

    def modules(self) -> list[nn.Module]:
        return self.base.modules()

    def config(self) -> dict:
        return {**super().config(), "part_of": self.base.config(), "part": self.name}

    @property
    def prior_radius(self) -> float | None:
        return None  # a step's input is not drawn from the prior

    def _z(self, latents: Tensor) -> Tensor:
        return latents.view(latents.shape[0], *self.latent_shape)


class FinalStep(_ChainPart):
    """The sampler's last step as a one-step generator: its input (noise-shaped) to the image.

    Inversion starts from ``chain.final_start(image, noise)`` (the forward process at the last
    step's timestep) with fresh standard-normal noise per row, instead of from the prior.
    """

    family = "consistency"

    def __init__(self, base: GeneratorAdapter, chain: nn.Module):
        super().__init__(base, chain, f"{base.name} (last step)")
        self.output_range = base.output_range
        self.image_shape = tuple(base.image_shape)

    def decode_raw(self, latents: Tensor, conditions: Tensor | None = None) -> Tensor:
        if conditions is not None:
            raise ValueError(f"{self.base.name} takes no conditions, but conditions were given")
        return self.chain.final_step(self._z(latents))

    def initial_latents(self, images: Tensor, rows_per_image: int, generator: torch.Generator | None = None) -> Tensor:
        raw = self.from_unit(images.to(self.device, torch.float32))
        noise = self.sample_latents(rows_per_image * raw.shape[0], generator).view(-1, *self.latent_shape)
        raw = raw.repeat_interleave(rows_per_image, 0).view(-1, *self.latent_shape)
        return self.chain.final_start(raw, noise).flatten(1).float()


class StepMap(_ChainPart):
    """Step ``i`` of the chain as a map from its input to the next step's input (both flat)."""

    family = "consistency"
    output_range = (-1.0, 1.0)  # not an image: only decode_raw is used

    def __init__(self, base: GeneratorAdapter, chain: nn.Module, i: int):
        super().__init__(base, chain, f"{base.name} (step {i})")
        self.i = i
        self.image_shape = tuple(base.latent_shape)

    def decode_raw(self, latents: Tensor, conditions: Tensor | None = None) -> Tensor:
        return self.chain.step(self.i, self._z(latents))


def solve_step(part: StepMap, target: Tensor, max_rows: int, call_rows: int | None = None) -> tuple[Tensor, Tensor]:
    """Inputs x with ``part(x) = target`` (rows of ``target [n, D]``), by Gauss-Newton, and
    each row's mean squared residual at them; the step runs in calls of ``call_rows`` rows."""
    step = FixedShapeCalls(part, call_rows_for(target.device, call_rows, part))

    def residual(z: Tensor, tgt: Tensor) -> Tensor:
        with torch.no_grad():
            return (step.decode_raw(z).flatten(1).float() - tgt).square().mean(1)

    out = torch.empty_like(target)
    out_res = torch.empty(target.shape[0], device=target.device)
    for a in range(0, target.shape[0], max_rows):
        tgt = target[a:a + max_rows]
        shaped = tgt.view(-1, *part.latent_shape)
        with torch.no_grad():
            start = part.chain.step_start(part.i, shaped).flatten(1).float()
        z = GMRESGaussNewton(krylov=30)(step, start, None, shaped, PREFIX_GMRES_STEPS, Leaving(start.shape[0])).inputs
        res = residual(z, tgt)
        # solved: a root-mean-square residual within float32 rounding of the target's scale
        unsolved = res > SOLVED_REL ** 2 * tgt.square().mean(1).clamp_min(1e-30)
        if bool(unsolved.any()):
            idx = unsolved.nonzero().squeeze(1)
            z[idx] = ConjugateGradientLM(cg_iters=100)(step, z[idx], None, shaped[idx], PREFIX_CG_STEPS,
                                                       Leaving(idx.numel())).inputs
            res[idx] = residual(z[idx], tgt[idx])
        out[a:a + max_rows], out_res[a:a + max_rows] = z, res
    return out, out_res


def invert_stagewise(generator: GeneratorAdapter, images: Tensor, settings, loss: Loss, *, chain: nn.Module,
                     seed: int = 0, conditions: Tensor | None = None, stop_below: Tensor | None = None,
                     max_rows: int | None = None, impl="auto", cuda_graph: bool = False, progress=None,
                     compile_generator: bool = False, call_rows: int | None = None) -> InversionResult:
    """Invert ``generator`` (whose :meth:`~GeneratorAdapter.stage_chain` is ``chain``) step by step.

    Called by :func:`~ronan_fast.inversion.invert` for settings with ``stagewise``.
    ``images [B, C, H, W]`` in [0, 1] on the generator's device; ``settings`` invert the last
    step. Returns an :class:`~ronan_fast.inversion.InversionResult` whose ``inputs`` are the
    recovered initial noise and whose ``loss`` is the whole sampler's reconstruction loss from
    it. ``extra`` holds ``last_step_loss`` (the loss the last step's inversion reached) and
    ``chain_residual`` (per image, the largest mean squared residual of the earlier steps'
    solves, raw units).
    """
    if conditions is not None:
        raise ValueError(f"{generator.name} takes no conditions, but conditions were given")
    res = invert_batched(FinalStep(generator, chain), images, settings.replace(stagewise=False), loss, seed=seed,
                         conditions=None, stop_below=stop_below, max_rows=max_rows, impl=impl, cuda_graph=cuda_graph,
                         progress=progress, compile_generator=compile_generator, call_rows=call_rows)
    rows = max_rows or 4096
    x = res.inputs
    worst = torch.zeros(x.shape[0], device=x.device)
    for i in reversed(range(chain.steps - 1)):
        x, r = solve_step(StepMap(generator, chain, i), x, rows, call_rows)
        worst = torch.maximum(worst, r)
    whole = FixedShapeCalls(generator, call_rows_for(x.device, call_rows, generator))
    with torch.no_grad():
        recon = torch.cat([whole.to_unit(whole.decode_raw(x[a:a + rows]).float()) for a in range(0, x.shape[0], rows)])
        final = loss.on_unit(recon, images, whole.rows, loss.clipped_pixels(images, settings))
    # the loss is the output's (one-sided at clipped pixels with clip_aware), the reconstruction
    # clamped to [0, 1], as invert() returns them
    return InversionResult(loss=final, inputs=x, reconstruction=recon.clamp(0, 1), conditions=None,
                           row_steps=res.row_steps, settings=settings, metric=res.metric,
                           extra={**res.extra, "last_step_loss": res.loss, "chain_residual": worst})
