"""Starts through a mapping network: invert ``synthesis`` over ``w``, then ``mapping`` for ``z``.

A StyleGAN-style generator is ``G(z) = synthesis(mapping(z))``: an MLP maps the input ``z`` to
an intermediate latent ``w`` that styles every layer. The mapping folds the input space: the
search over ``z`` that Eq. 1 asks for gets stuck in other basins far more often than a search
over ``w`` for the same image. Belonging is still decided over ``z`` -- the model's input -- so
``w`` only tells the search where to begin:

1. ``synthesis`` is inverted over ``w`` for the image (the package's inversion with
   :data:`W_SETTINGS`, in coordinates whitened by the mapping's mean and covariance:
   :data:`W_SPACES`; its random starts are ``mapping`` of prior draws, from the image's own
   stream; with a ``w_encoder``, a learned encoder's guess of ``w`` is the first of them, and
   given each image's belonging threshold a first search from that guess alone settles the
   images it takes under :data:`W_FIRST_DONE` of it: :data:`W_FIRST_STEPS`, and the full search
   for the others stops each under that too), giving ``w*``;
2. ``mapping`` is inverted for ``w*``, giving ``z*``: a small MLP, so a few hundred Adam steps
   on several prior draws (``|mapping(z) - w*|^2 / |w*|^2``) and Levenberg-Marquardt steps cost
   little. With ``solve_metric="image"`` (the default) the last Levenberg-Marquardt steps measure
   ``mapping(z) - w*`` by the change it makes to the image, to first order (``|J dw|^2``, ``J``
   the Jacobian of ``synthesis`` at ``w*``): ``w*`` mostly lies a little off what ``mapping``
   can reach, and the ``z`` closest in ``w`` is not the one whose image is closest;
3. ``z*`` is the image's first start of the ordinary inversion over ``z``
   (:class:`ronan_fast.warmstart.WarmStarted`), whose other starts stay random and whose loss,
   over the model's input, is the one reported. Given each image's threshold, an image its
   search over ``w`` leaves above :data:`W_SETTLE_ABOVE` times it is settled there: ``z*`` is its
   result, with no search over ``z`` (:meth:`MappingStart.guess_and_settled`).

:class:`MappingStart` has the interface of a learned encoder
(:class:`ronan_fast.warmstart.WarmStartEncoder`: ``guess``, ``check``, ``digest``,
``describe``), so it goes wherever one does: ``WarmStarted(generator, MappingStart(...))`` or
``Attributor(warm_start=MappingStart(...))``. Nothing need be trained: its cost is per image,
inside the time to the verdict. :func:`train_w_encoder` trains an encoder from images to ``w``
on the model's own samples (pairs of ``mapping(z)`` and the image it makes), for the search over
``w`` to begin at its guess (``MappingStart(..., w_encoder=...)``). :func:`mapping_start` builds
one for a module with ``mapping_net`` and ``synthesis`` methods (the zoo's
:class:`~ronan_fast.models.stylegan.StyleGenerator`); for another StyleGAN pass the two
functions, e.g. for NVIDIA's StyleGAN2-ADA networks
``mapping=lambda z: G.mapping(z, None)[:, 0]`` and
``synthesis=lambda w: G.synthesis(w[:, None].repeat(1, G.num_ws, 1))``.

Each image's guess is computed from that image alone (its starts come from its pixels and the
seed; its threshold where given), so the same image gets the same guess in any batch, bit for bit
(:attr:`MappingStart.batch_invariant`: ``WarmStarted`` asks for a chunk's guesses in one call).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

from ronan_fast.adapters import GeneratorAdapter, LatentGenerator
from ronan_fast.inversion.linalg import solve_damped
from ronan_fast.inversion.presets import FAMILY_DEFAULTS
from ronan_fast.inversion.settings import InversionSettings
from ronan_fast.warmstart import EncoderError, EncoderMismatchError, ModelDerivedStart, WarmStarted, WarmStartEncoder

__all__ = ["MappingStart", "mapping_start", "has_mapping_network", "train_w_encoder", "W_SETTINGS", "W_SPACES",
           "W_ENCODER_RECIPE",
           "WHITEN_DRAWS", "W_FIRST_STEPS", "W_FIRST_DONE", "W_SETTLE_ABOVE", "MAPPING_STEPS",
           "MAPPING_STARTS", "MAPPING_LM_STEPS", "SOLVE_METRICS", "SOLVE_CHOICES", "IMAGE_METRIC_RIDGE",
           "METRIC_CHUNK_ELEMENTS"]

#: the search over ``w``: the GAN family default (24 starts halved every 25 steps, then 25 dense
#: Levenberg-Marquardt steps) with 300 Adam steps instead of 600. Chosen on the tuning half's
#: StyleGAN (stylegan64-opencv, 6 own 8-bit images): it took all 6 to the 8-bit floor over ``w``
#: in 11.4 s per image (600 steps: 14.4 s); 8 or 16 starts missed 1 or 2 of them, and 10 polish
#: steps 3 of them. Chord steps in its polish (``polish_reuse=8``) made own images faster (3.45 s
#: against 4.27 s each on 100 of that StyleGAN's, with the full search's stop) but left two more
#: near-line own images of the held-out StyleGAN above the line (96 of 100 against 98), so they
#: stay off (bench/results/heldout_tuning_reuse_n100.md, heldout_held-out_reuse_n100.md)
W_SETTINGS = FAMILY_DEFAULTS["gan"].replace(steps=300)
#: with a ``w_encoder`` and a belonging threshold (attributing with early stop: the guess is
#: given each image's ``stop_below``), the search over ``w`` first polishes the encoder's guess
#: alone: :data:`W_SETTINGS` with one start and this many Adam steps, each image stopping once its
#: loss over ``w`` is under :data:`W_FIRST_DONE` times its threshold. Only the images it leaves
#: above go on to the full search (and keep the lower of the two). 0: the full search for every
#: image. Chosen on the tuning half's StyleGAN (stylegan64-opencv; docs/inversion.md)
W_FIRST_STEPS = 50
#: the fraction of an image's threshold under which the first, one-start search settles its ``w``.
#: 0.1 and 0.25 measured against it on the tuning half's StyleGAN (100 own images): own images
#: faster, the mean with real images not, the worst own image nearer its threshold (docs/performance.md)
W_FIRST_DONE = 0.05
#: given each image's threshold, an image whose search over ``w`` ends above this many times it is
#: settled above it by that search: no search over ``z`` follows (``MappingStart.guess_and_settled``).
#: Chosen on the tuning half's StyleGAN (stylegan64-opencv, 100 own images; docs/inversion.md)
W_SETTLE_ABOVE = 4.0
#: the coordinates the search over ``w`` runs in: "whitened" (the default), ``u`` with
#: ``w = mean + L u`` (``mean`` and ``L L^T`` the mean and covariance of ``mapping`` over
#: :data:`WHITEN_DRAWS` prior draws): every direction of ``w`` the mapping spreads over gets the
#: same scale for Adam, and the search's steps follow the model's ``w`` rather than ``w``'s own
#: axes; "w", ``w`` itself (the start's first recipe). The search, its starts and its result are
#: otherwise the same; ``w* = mean + L u*``. Chosen on the tuning half's StyleGAN
#: (stylegan64-opencv): over ``w`` alone, 30 of 32 own 8-bit images at the 8-bit floor from
#: mapping draws against 26, and 32 against 31 from the encoder of ``w``'s guess, in the same
#: time (bench/results/wsearch_stylegan64-opencv.md); to the verdict, 16 of 16 own images
#: converged against 13 (bench/results/heldout_tuning_white.md)
W_SPACES = ("whitened", "w")
#: prior draws whose ``mapping`` gives the whitening's mean and covariance (a fixed stream of
#: the start's seed: the same for every image and batch)
WHITEN_DRAWS = 4096
#: :func:`train_w_encoder`'s recipe (:func:`ronan_fast.warmstart.train_encoder`'s arguments): four
#: times the samples, eight times the steps and twice the width of the learned warm starts' default.
#: Chosen on the tuning half's StyleGAN (stylegan64-opencv, 100 own and 4 real images;
#: docs/inversion.md): the guess is closer (median loss over ``w`` 52x the line against 72x), so
#: the first search over ``w`` settles own images with fewer Jacobians (3.32 s against 4.12 s each
#: to the verdict, 100 of 100 converged either way; real images 14.75 s against 12.58 s). It costs
#: about 24 minutes of one CPU thread for a 64x64 model, once per model
W_ENCODER_RECIPE = {"samples": 32768, "steps": 8000, "batch": 64, "lr": 1e-3, "width": 32, "hidden": 1024,
                    "image_steps": 400, "seed": 0}
#: Adam steps and prior draws of the search over ``z`` for ``mapping(z) = w*``
MAPPING_STEPS = 300
MAPPING_STARTS = 8
#: at most this many Levenberg-Marquardt steps after the Adam steps (and as many again in the
#: image's metric, with ``solve_metric="image"``)
MAPPING_LM_STEPS = 30
#: how the solve for ``z`` measures ``mapping(z) - w*`` in its last steps: "image", by the change
#: to the image to first order, ``dw^T (J^T J + ridge) dw`` (``J``: ``synthesis``' Jacobian at
#: ``w*``); "w", Euclidean in ``w`` (the start's first recipe). On the tuning-half StyleGAN's 16
#: own 8-bit images (their ``w*`` from the search over ``w``), "image" took ``z*`` to within 1.3x
#: of the 8-bit floor on 14 where "w" left them at 1.1x to 6.3x of it, and one more under the
#: convergence line; real images' ``z*`` stayed 85x to 1200x above it (docs/inversion.md)
SOLVE_METRICS = ("image", "w")
#: which of the solve's :data:`MAPPING_STARTS` draws becomes ``z*``: "metric", the one whose last
#: error (``mapping(z) - w*`` in the solve's metric) is lowest; "loss", the one whose image is
#: closest to the image (MSE; one generator call over the draws). Where ``w*`` lies off what
#: ``mapping`` reaches, the draws end at similar errors but their images differ: on three
#: held-out StyleGAN own images the draw chosen by its error gave 0.82x, 0.69x and 4.9x the line,
#: the closest draw 0.80x, 0.51x and 4.1x
SOLVE_CHOICES = ("metric", "loss")
#: the metric's ridge, a fraction of ``J^T J``'s mean diagonal: directions the image barely
#: sees still count a little
IMAGE_METRIC_RIDGE = 1e-4
#: the metric's Jacobian is built in blocks of at most this many elements (image size x columns;
#: 128 MiB in float32): one block for a 64x64 image and a 256-wide ``w``
METRIC_CHUNK_ELEMENTS = 1 << 25


class _Synthesis(nn.Module):
    """``synthesis`` as a module over ``w [N, w_dim]`` (the generator's modules registered for
    device moves and freezing)."""

    def __init__(self, synthesis: Callable[[Tensor], Tensor], modules: list[nn.Module]):
        super().__init__()
        self.fn = synthesis
        self.owners = nn.ModuleList(modules)

    def forward(self, w: Tensor) -> Tensor:
        return self.fn(w)


class _Whitened(nn.Module):
    """``synthesis`` over whitened coordinates: ``u -> synthesis(mean + u L^T)``."""

    def __init__(self, synthesis: _Synthesis, mean: Tensor, chol: Tensor):
        super().__init__()
        self.synthesis = synthesis
        self.register_buffer("mean", mean)
        self.register_buffer("chol", chol)

    def to_w(self, u: Tensor) -> Tensor:
        return self.mean.to(u) + u @ self.chol.to(u).T

    def rows_to_w(self, u: Tensor) -> Tensor:
        """:meth:`to_w` one row at a time: each row's ``w`` the same bits alone or in any batch (a
        product over the whole batch may sum in another order)."""
        return torch.cat([self.to_w(u[k : k + 1]) for k in range(u.shape[0])])

    def to_u(self, w: Tensor) -> Tensor:
        d = (w - self.mean.to(w)).T
        return torch.linalg.solve_triangular(self.chol.to(w), d, upper=False).T

    def forward(self, u: Tensor) -> Tensor:
        return self.synthesis(self.to_w(u))


class _GuessInU:
    """A ``w`` encoder's guesses in the whitened coordinates of the search (``to_u`` of its ``w``),
    for :class:`~ronan_fast.warmstart.WarmStarted` (``guess``, ``check``, ``to``); checked against
    the generator of ``w`` it was trained for, and moved with the encoder."""

    def __init__(self, encoder: WarmStartEncoder, whitened: _Whitened, w_generator: GeneratorAdapter):
        self.encoder, self.whitened, self.w_generator = encoder, whitened, w_generator

    def guess(self, images: Tensor) -> Tensor:
        return self.whitened.to_u(self.encoder.guess(images).float())

    def check(self, generator: GeneratorAdapter) -> None:
        self.encoder.check(self.w_generator)

    def to(self, device):
        self.encoder.to(device)
        return self


class _WGenerator(LatentGenerator):
    """``synthesis`` as a generator of ``w``; its prior draws are ``mapping`` of the base's."""

    def __init__(self, base: GeneratorAdapter, mapping: Callable[[Tensor], Tensor], module: nn.Module,
                 w_dim: int, what: str = "w"):
        super().__init__(module, (w_dim,), output_range=base.output_range, image_shape=base.image_shape,
                         family=base.family, name=f"{base.name} (synthesis over {what})")
        self.base, self.mapping = base, mapping

    @property
    def prior_radius(self) -> float | None:
        return None  # w is not drawn from a Gaussian prior

    @torch.no_grad()
    def sample_latents(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        z = self.base.sample_latents(n, generator).to(self.device)
        return self.mapping(z.view(n, *self.base.latent_shape)).reshape(n, -1).float()


class MappingStart(ModelDerivedStart):
    """First starts for a ``synthesis(mapping(z))`` generator, found through ``w`` (module docstring).

    Args:
        generator: the adapter whose input is ``z`` (``generator.decode`` must equal
            ``synthesis(mapping(z))``; :meth:`check` verifies it on prior draws).
        mapping: ``z [N, *latent_shape] -> w [N, w_dim]``.
        synthesis: ``w [N, w_dim] -> images`` in the generator's output range.
        w_dim: the width of ``w``.
        modules: the modules the two functions use (for the device and the fingerprint).
        w_settings: the search over ``w`` (default :data:`W_SETTINGS`).
        mapping_steps / mapping_starts: the search over ``z`` for ``mapping(z) = w*``.
        w_encoder: a learned encoder from images to ``w`` (:func:`train_w_encoder`) whose guess
            is the first start of the search over ``w``; None: every start is a mapping draw.
        solve_metric: how the solve for ``z`` ends (:data:`SOLVE_METRICS`): "image" (default)
            weighs ``mapping(z) - w*`` by the image it changes; "w" stays Euclidean in ``w``.
        solve_choice: which of the solve's draws is ``z*`` (:data:`SOLVE_CHOICES`): "metric"
            (default), the lowest error in the solve's metric; "loss", the one whose image is
            closest to the image.
        w_space: the coordinates of the search over ``w`` (:data:`W_SPACES`): "whitened"
            (default) by the mapping's mean and covariance; "w" in ``w`` itself.
        w_first_steps / w_first_done: with a ``w_encoder`` and a threshold, the Adam steps of a
            first search over ``w`` from the encoder's guess alone, and the fraction of the
            threshold under which it settles an image (:data:`W_FIRST_STEPS`,
            :data:`W_FIRST_DONE`); ``w_first_steps=0``: none.
        w_full_within: with the first search, only the images it leaves under this many times
            their threshold go on to the full search (the others are far from it: their verdict
            stands on the first search's ``w``); ``math.inf`` (default): every image it leaves
            above :attr:`w_first_done` of it; equal to ``w_first_done``: none (the first search
            alone, what the full search adds measured against it).
        w_full_stops: with the first search, the full search that follows it is given each
            image's stop too (:attr:`w_first_done` times its threshold, where usable): an image
            stops once under it, and the polish lets go of rows levelled off far above it (the
            settings' settle rule; no escalation: an image left in doubt over ``w`` goes on to the
            search over ``z``, which decides it). False: the full search runs to its end, as
            recorded before the option existed.
        w_settle_above: given each image's threshold, an image whose search over ``w`` ends above
            this many times it is settled above it by that search (:meth:`guess_and_settled`):
            the inversion over ``z`` skips it and reports its ``z*`` (every image ``z`` can make,
            ``w`` can make: a search over ``z`` cannot go where the search over ``w`` did not
            reach; :data:`W_SETTLE_ABOVE`, the default). ``math.inf``: none is, every image is
            searched over ``z``.
        seed: seeds both searches (with each image's pixels).
    """

    #: what a profile's ``warm_start`` record calls this kind of start
    kind = "mapping"
    #: an image's guess is the same alone or in any batch (tested): WarmStarted makes a whole
    #: chunk's guesses in one call, its search over ``w`` batching their starts
    batch_invariant = True
    #: :meth:`guess` takes each image's belonging threshold (``stop_below``)
    takes_threshold = True
    _DIGEST_TAG = b"ronan_fast/mapping_start/v1"
    _MADE_FOR = "the mapping start was made for the generator"

    def __init__(self, generator: GeneratorAdapter, mapping: Callable[[Tensor], Tensor],
                 synthesis: Callable[[Tensor], Tensor], w_dim: int, modules: list[nn.Module] | None = None, *,
                 w_settings: InversionSettings | None = None, mapping_steps: int = MAPPING_STEPS,
                 mapping_starts: int = MAPPING_STARTS, w_encoder: WarmStartEncoder | None = None,
                 solve_metric: str = "image", solve_choice: str = "metric", w_space: str = "whitened",
                 w_first_steps: int = W_FIRST_STEPS,
                 w_first_done: float = W_FIRST_DONE, w_full_within: float = math.inf,
                 w_settle_above: float = W_SETTLE_ABOVE, w_full_stops: bool = True, seed: int = 0):
        if not isinstance(generator, GeneratorAdapter):
            raise TypeError(f"generator must be a GeneratorAdapter, got {type(generator).__name__}")
        if not callable(mapping) or not callable(synthesis):
            raise TypeError("mapping and synthesis must be callables (z -> w and w -> images)")
        for name, v in (("w_dim", w_dim), ("mapping_steps", mapping_steps), ("mapping_starts", mapping_starts)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if isinstance(w_first_steps, bool) or not isinstance(w_first_steps, int) or w_first_steps < 0:
            raise ValueError(f"w_first_steps must be an int >= 0, got {w_first_steps!r}")
        if isinstance(w_first_done, bool) or not isinstance(w_first_done, (int, float)) or not 0 < w_first_done <= 1:
            raise ValueError(f"w_first_done must be a float in (0, 1], got {w_first_done!r}")
        if isinstance(w_full_within, bool) or not isinstance(w_full_within, (int, float)) \
                or not w_full_within >= w_first_done:
            raise ValueError(f"w_full_within must be a number at least w_first_done ({w_first_done}) or math.inf, "
                             f"got {w_full_within!r}")
        if isinstance(w_settle_above, bool) or not isinstance(w_settle_above, (int, float)) \
                or not w_settle_above >= 1:
            raise ValueError(f"w_settle_above must be a number >= 1 (times the threshold) or math.inf, "
                             f"got {w_settle_above!r}")
        if not isinstance(w_full_stops, bool):
            raise ValueError(f"w_full_stops must be True or False, got {w_full_stops!r}")
        if w_settings is not None and not isinstance(w_settings, InversionSettings):
            raise TypeError(f"w_settings must be InversionSettings or None, got {type(w_settings).__name__}")
        if solve_metric not in SOLVE_METRICS:
            raise ValueError(f"solve_metric must be one of {SOLVE_METRICS}, got {solve_metric!r}")
        if solve_choice not in SOLVE_CHOICES:
            raise ValueError(f"solve_choice must be one of {SOLVE_CHOICES}, got {solve_choice!r}")
        if w_space not in W_SPACES:
            raise ValueError(f"w_space must be one of {W_SPACES}, got {w_space!r}")
        self.generator = generator
        self.solve_metric, self.solve_choice, self.w_space = solve_metric, solve_choice, w_space
        self.w_first_steps, self.w_first_done = int(w_first_steps), float(w_first_done)
        self.w_full_within, self.w_settle_above = float(w_full_within), float(w_settle_above)
        self.w_full_stops = w_full_stops
        self.mapping, self.w_dim = mapping, int(w_dim)
        self.w_settings = w_settings or W_SETTINGS
        self.mapping_steps, self.mapping_starts, self.seed = int(mapping_steps), int(mapping_starts), int(seed)
        self.fingerprint = generator.fingerprint()
        synth = _Synthesis(synthesis, list(modules or generator.modules()))
        self._w = _WGenerator(generator, mapping, synth, self.w_dim)
        self._u = None if w_space == "w" else self._whitened(synth)
        self._set_w_encoder(w_encoder)

    @torch.no_grad()
    def _whitened(self, synth: _Synthesis) -> _WGenerator:
        """The search's generator over whitened ``u`` (:data:`W_SPACES`): the mean and covariance of
        ``mapping`` over :data:`WHITEN_DRAWS` prior draws of the seed's own stream (a small ridge,
        1e-6 of the mean variance, keeps Cholesky's factor invertible where ``w`` spans fewer
        dimensions than its width)."""
        z = self.generator.sample_latents(WHITEN_DRAWS, torch.Generator().manual_seed(self.seed))
        w = self._map(z.to(self.generator.device)).double()
        mean = w.mean(0)
        cov = torch.cov(w.T)
        spread = cov.diagonal().mean()
        if not bool(torch.isfinite(cov).all()) or not float(spread) > 0:
            raise EncoderError(f"w_space='whitened': mapping's w over {WHITEN_DRAWS} prior draws "
                               f"{'holds NaN or Inf' if not bool(torch.isfinite(cov).all()) else 'does not vary'}, "
                               "so it has no covariance to whiten by; pass w_space='w'")
        cov = cov + 1e-6 * spread * torch.eye(self.w_dim, dtype=cov.dtype, device=cov.device)
        chol, info = torch.linalg.cholesky_ex(cov)
        if int(info) != 0:
            raise EncoderError(f"w_space='whitened': the covariance of mapping's w over {WHITEN_DRAWS} prior draws "
                               "has no Cholesky factor; pass w_space='w'")
        module = _Whitened(synth, mean.float(), chol.float())
        return _WGenerator(self.generator, lambda z_: module.to_u(self._map(z_)), module, self.w_dim,
                           what="whitened w")

    def _set_w_encoder(self, w_encoder: WarmStartEncoder | None) -> None:
        if w_encoder is not None and not isinstance(w_encoder, WarmStartEncoder):
            raise TypeError(f"w_encoder must be a WarmStartEncoder (train_w_encoder) or None, "
                            f"got {type(w_encoder).__name__}")
        self.w_encoder = w_encoder
        # what the search over w inverts (WarmStarted checks the encoder against the generator of w:
        # trained for this w); in whitened coordinates, the encoder's guesses are whitened too
        if self._u is None:
            self._w_search = self._w if w_encoder is None else WarmStarted(self._w, w_encoder)
        else:
            self._w_search = self._u if w_encoder is None else \
                WarmStarted(self._u, _GuessInU(w_encoder, self._u.module, self._w))

    def with_w_encoder(self, w_encoder: WarmStartEncoder | None) -> "MappingStart":
        """This start, its settings unchanged, with ``w_encoder`` (:func:`train_w_encoder`; None:
        none) giving the first start of the search over ``w``."""
        out = copy.copy(self)
        out._set_w_encoder(w_encoder)
        return out

    @property
    def w_generator(self) -> GeneratorAdapter:
        """``synthesis`` as a generator of ``w`` (its prior draws are ``mapping`` of the model's):
        what a ``w_encoder`` is trained for, and what the search over ``w`` inverts (in whitened
        coordinates of it, unless ``w_space="w"``)."""
        return self._w

    @property
    def recipe(self) -> dict:
        r = {"kind": self.kind, "w_dim": self.w_dim, "w_settings": self.w_settings.to_dict(),
             "mapping_steps": self.mapping_steps, "mapping_starts": self.mapping_starts, "seed": self.seed}
        if self.solve_metric != "w":  # absent: Euclidean in w, as every start recorded before the choice existed
            r["solve_metric"] = self.solve_metric
        if self.solve_choice != "metric":  # absent: the lowest error in the solve's metric, as before the choice
            r["solve_choice"] = self.solve_choice
        if self.w_space != "w":  # absent: the search in w itself, as every start recorded before the choice existed
            r["w_space"], r["whiten_draws"] = self.w_space, WHITEN_DRAWS
        if self.w_encoder is not None:  # its weights' digest: a profile is refused with another encoder
            r["w_encoder"] = self.w_encoder.digest()
            # absent: the full search for every image, as before the first search existed (and
            # without an encoder, which the first search starts from)
            if self.w_first_steps:
                r["w_first_steps"], r["w_first_done"] = self.w_first_steps, self.w_first_done
                if math.isfinite(self.w_full_within):  # absent: every image the first search leaves above
                    r["w_full_within"] = self.w_full_within
                if self.w_full_stops:  # absent: the full search without a threshold, as it was first recorded
                    r["w_full_stops"] = True
        if math.isfinite(self.w_settle_above):  # absent: no image settled by the search over w
            r["w_settle_above"] = self.w_settle_above
        return r

    @property
    def cost(self) -> dict:
        """Nothing trained, or the ``w_encoder``'s training cost."""
        return super().cost if self.w_encoder is None else dict(self.w_encoder.cost)

    def to(self, device):
        if self.w_encoder is not None:
            self.w_encoder.to(device)
        return self

    @torch.no_grad()
    def check(self, generator: GeneratorAdapter) -> None:
        """Raise :class:`EncoderMismatchError` unless ``generator`` is the one this start was made
        for and ``synthesis(mapping(z))`` reproduces it on two prior draws."""
        self._check_fingerprint(generator)
        z = generator.sample_latents(2, torch.Generator().manual_seed(0)).to(generator.device)
        direct = generator.decode(z)
        staged = self._w.decode(self._map(z))
        err = float((direct - staged).abs().max())
        if not err <= 1e-4:
            raise EncoderMismatchError(
                f"synthesis(mapping(z)) differs from {generator.name}(z) by up to {err:.3g} (of pixels in [0, 1]): "
                "pass the generator's own mapping and synthesis")

    @property
    def settles_above(self) -> bool:
        """Whether :meth:`guess_and_settled` may settle an image above its threshold
        (:attr:`w_settle_above` finite)."""
        return math.isfinite(self.w_settle_above)

    def guess(self, images: Tensor, stop_below: Tensor | float | None = None) -> Tensor:
        """``[B, latent_dim]``: each image's ``z*`` (module docstring), float32:
        :meth:`solve_z` of :meth:`search_w` (given ``stop_below``, each image's belonging
        threshold, its search over ``w`` may end early: :meth:`search_w`)."""
        return self.guess_and_settled(images, stop_below)[0]

    def guess_and_settled(self, images: Tensor, stop_below: Tensor | float | None = None) -> tuple[Tensor, Tensor]:
        """:meth:`guess`, and which images the search over ``w`` settled above their threshold
        (a bool per image): its loss over ``w`` ended above :attr:`w_settle_above` times a usable
        threshold (positive and finite). ``synthesis(mapping(z))`` is an image ``synthesis`` makes
        from ``w = mapping(z)``, so an image the search over ``w`` leaves that far above its
        threshold is one the search over ``z`` would leave above it too; the inversion skips
        that search (:class:`~ronan_fast.warmstart.WarmStarted`: where ``z*``'s own loss is
        above the threshold as well) and reports ``z*``. All False without a threshold or with
        ``w_settle_above=math.inf``."""
        shape = tuple(self.generator.image_shape)
        if not isinstance(images, Tensor) or images.dim() != 4 or tuple(images.shape[1:]) != shape:
            got = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
            raise EncoderError(f"images must be [B, {', '.join(map(str, shape))}], got {got}")
        found = self.search_w(images, stop_below)
        settled = torch.zeros(images.shape[0], dtype=torch.bool)
        if stop_below is not None and self.settles_above:
            sb, usable = self._thresholds(stop_below, images.shape[0])
            settled = usable & (found.loss.detach().cpu().float() > self.w_settle_above * sb)
        return self.solve_z(found.inputs, images), settled

    def search_w(self, images: Tensor, stop_below: Tensor | float | None = None):
        """Step 1 alone: the search over ``w`` for each image (:attr:`w_settings`, from the
        ``w_encoder``'s guess where there is one). Returns its
        :class:`~ronan_fast.inversion.InversionResult`: ``inputs`` are the ``w*`` ``[B, w_dim]``,
        ``loss`` each image's loss over ``w`` (the loss over ``z``, the one reported, comes from
        the inversion over ``z`` that follows), ``row_steps`` both searches' where there were two.

        With a ``w_encoder``, :attr:`w_first_steps` and ``stop_below`` (each image's belonging
        threshold, in MSE; a float or one per image), a first search from the encoder's guess
        alone (:data:`W_FIRST_STEPS`) settles the images whose loss over ``w`` it takes under
        :attr:`w_first_done` times their threshold; the others (under :attr:`w_full_within`
        times it) get the full search too (which, with :attr:`w_full_stops`, stops each under
        that as well) and keep the lower of the two. An image whose
        threshold is not positive and finite gets the full search. Each image's result depends
        on it and its threshold only."""
        import dataclasses

        from ronan_fast.inversion import invert

        found = invert(self._w_search, images, settings=self.w_settings, seed=self.seed) \
            if stop_below is None or self.w_encoder is None or not self.w_first_steps \
            else self._search_first(images, stop_below)
        if self._u is None:
            return found
        with torch.no_grad():
            return dataclasses.replace(found, inputs=self._u.module.rows_to_w(found.inputs.to(self._u.device)).float())

    def _search_first(self, images: Tensor, stop_below: Tensor | float):
        """:meth:`search_w` with a first search from the encoder's guess alone."""
        import dataclasses

        from ronan_fast.inversion import invert
        from ronan_fast.inversion.result import after_second_search

        # an image without a usable threshold (not positive and finite) is settled by nothing and
        # far from nothing: it gets the full search, as without a threshold
        sb, usable = self._thresholds(stop_below, images.shape[0])
        done_below = torch.where(usable, self.w_first_done * sb, torch.zeros_like(sb))
        within = torch.where(usable, self.w_full_within * sb, torch.full_like(sb, math.inf))
        first = invert(self._w_search, images, settings=self.w_settings.replace(restarts=1, steps=self.w_first_steps),
                       seed=self.seed, stop_below=done_below)
        ended = first.loss.cpu()
        rest = (~usable | ((ended >= done_below) & (ended < within))).nonzero().squeeze(1)
        if rest.numel() == 0:
            return first
        full = self._full_search(images[rest], done_below[rest] if self.w_full_stops else None, usable[rest])
        better = full.loss < first.loss[rest.to(first.loss.device)]  # images whose full search ended lower
        return dataclasses.replace(after_second_search(first, rest, full, better), settings=self.w_settings)

    def _full_search(self, images: Tensor, stop: Tensor | None, usable: Tensor):
        """The full search over ``w`` for ``images``; given ``stop`` (each image's
        :attr:`w_first_done` times its threshold), the images with a usable threshold stop under
        it and their polish lets go of rows levelled off far above it (the settings' settle rule),
        the others searched without one."""
        from ronan_fast.inversion import invert

        # no escalation: an image left in doubt over w (within a few times its stop) goes on to the
        # search over z, which decides it
        stopped = self.w_settings.replace(polish_escalate=0)
        if stop is None or not bool(usable.any()):
            return invert(self._w_search, images, settings=self.w_settings, seed=self.seed)
        if bool(usable.all()):
            return invert(self._w_search, images, settings=stopped, seed=self.seed, stop_below=stop)
        import dataclasses

        idx = [usable.nonzero().squeeze(1), (~usable).nonzero().squeeze(1)]
        parts = [invert(self._w_search, images[idx[0]], settings=stopped, seed=self.seed, stop_below=stop[idx[0]]),
                 invert(self._w_search, images[idx[1]], settings=self.w_settings, seed=self.seed)]
        order = torch.argsort(torch.cat(idx))

        def merged(name):
            return torch.cat([getattr(p, name) for p in parts])[order.to(getattr(parts[0], name).device)]

        fields = ["loss", "inputs", "reconstruction", "row_steps"]
        if all(p.settled is not None for p in parts):
            fields.append("settled")
        return dataclasses.replace(parts[0], **{k: merged(k) for k in fields})

    @staticmethod
    def _thresholds(stop_below: Tensor | float, b: int) -> tuple[Tensor, Tensor]:
        """``stop_below`` as one float32 threshold per image, on the CPU, and which are usable
        (positive and finite: the others settle nothing and bound nothing)."""
        sb = torch.as_tensor(stop_below, dtype=torch.float32).flatten().cpu()
        if sb.numel() not in (1, b):
            raise ValueError(f"stop_below must be a float or one per image ({b}), got {sb.numel()} values")
        sb = sb.expand(b)
        return sb, torch.isfinite(sb) & (sb > 0)

    def solve_z(self, w: Tensor, images: Tensor) -> Tensor:
        """Step 2 alone: ``[B, latent_dim]``, each image's ``z*`` for its ``w*`` (a row of ``w``,
        from :meth:`search_w`), seeded by the image's pixels as :meth:`guess` seeds it."""
        from ronan_fast.inversion.starts import image_seed

        if not isinstance(w, Tensor) or w.dim() != 2 or w.shape[0] != images.shape[0] or w.shape[1] != self.w_dim:
            got = tuple(w.shape) if isinstance(w, Tensor) else type(w).__name__
            raise ValueError(f"w must be [{images.shape[0]}, {self.w_dim}] (one w per image), got {got}")
        out = []
        for k in range(images.shape[0]):
            g = torch.Generator(device="cpu").manual_seed(image_seed(images[k], self.seed + 1))
            # the image only where it chooses the draw
            out.append(self._solve_for(w[k], g) if self.solve_choice == "metric"
                       else self._solve_for(w[k], g, images[k]))
        return torch.stack(out)

    def _solve_for(self, w_target: Tensor, g: torch.Generator, image: Tensor | None = None) -> Tensor:
        """``z*`` for one image's ``w*``: :meth:`_solve_mapping`, its last steps in the image's
        metric where :attr:`solve_metric` is "image"; given ``image``, the draw whose image is
        closest to it."""
        metric = self._image_metric(w_target) if self.solve_metric == "image" else None
        return self._solve_mapping(w_target, g, metric, image)

    def _map(self, z: Tensor) -> Tensor:
        return self.mapping(z.view(z.shape[0], *self.generator.latent_shape)).reshape(z.shape[0], -1)

    @torch.no_grad()
    def _image_metric(self, w: Tensor) -> Tensor | None:
        """``L`` (lower triangular, ``[w_dim, w_dim]``) with ``L L^T = J^T J + ridge``: ``J`` the
        Jacobian of ``synthesis``'s raw output at ``w`` (forward mode, in the search over ``w``'s
        ``polish_precision``, in blocks of columns of at most :data:`METRIC_CHUNK_ELEMENTS`
        elements, on CPU of at most the dense polish's ``DENSE_CPU_COLUMNS``; a block's
        ``J^T J_B`` by vector-Jacobian products where ``J`` does not fit whole), the ridge
        :data:`IMAGE_METRIC_RIDGE` times its mean diagonal. None where Cholesky refuses it (a
        Jacobian with NaN): the solve stays Euclidean."""
        from torch.func import jvp, vmap

        from ronan_fast.inversion.polish.dense import dense_columns, forward_jacobian
        from ronan_fast.inversion.runtime import forward_ad_attention, low_precision_decode

        w = w.detach().to(self._w.device, torch.float32).reshape(1, -1)
        d = w.shape[1]
        # in the search over w's polish precision (W_SETTINGS.polish_precision): a metric, not a loss
        decode = low_precision_decode(self._w, self.w_settings.polish_precision)[0]

        def image(q: Tensor) -> Tensor:
            return decode(q).flatten().float()

        with forward_ad_attention():
            out = image(w)
            cols = max(1, min(d, METRIC_CHUNK_ELEMENTS // out.numel()))
            eye = torch.eye(d, device=w.device)

            def block(b: Tensor) -> Tensor:  # [c, P]: J's columns b, as rows
                return vmap(lambda t: jvp(image, (w,), (t[None],))[1])(eye[b])

            if cols >= d:  # J whole, built as the dense polish builds its Jacobians (on CPU
                # DENSE_CPU_COLUMNS passes at a time: the same J to rounding, faster than all at once)
                jac = forward_jacobian(lambda q: image(q[None]), w[0], dense_columns(d, cpu=w.device.type == "cpu"))
                jtj = jac.T @ jac
            else:
                jtj = w.new_empty(d, d)
                with torch.enable_grad():
                    wq = w.clone().requires_grad_(True)
                    y = image(wq)
                    for lo in range(0, d, cols):
                        b = torch.arange(lo, min(d, lo + cols), device=w.device)
                        jb = block(b)
                        jtj[:, b] = torch.autograd.grad(y, wq, grad_outputs=jb, is_grads_batched=True,
                                                        retain_graph=True)[0].reshape(b.numel(), d).T
                jtj = 0.5 * (jtj + jtj.T)
        h = jtj.double()
        h = h + IMAGE_METRIC_RIDGE * h.diagonal().mean() * torch.eye(d, device=h.device, dtype=h.dtype)
        chol, info = torch.linalg.cholesky_ex(h)
        if int(info) != 0 or not bool(torch.isfinite(chol).all()):
            return None
        return chol.float()

    def _solve_mapping(self, w_target: Tensor, g: torch.Generator, metric: Tensor | None = None,
                       image: Tensor | None = None) -> Tensor:
        """``z`` with ``mapping(z)`` closest to ``w_target``: from :attr:`mapping_starts` prior
        draws, :attr:`mapping_steps` Adam steps on the relative squared error, then
        Levenberg-Marquardt steps on each draw (the mapping is a small network: its Jacobian, one
        batched backward pass, costs little); with ``metric`` (:meth:`_image_metric`'s ``L``)
        as many again on ``|(mapping(z) - w_target) L|^2``, the image's first-order change. The
        best draw by the last error measured, or given ``image`` (``[C, H, W]``, in the unit range
        of :meth:`~ronan_fast.adapters.GeneratorAdapter.decode`) the draw whose image is closest
        to it (MSE; every draw in one call, so the choice is the same alone or in a batch)."""
        base = self.generator
        dev = base.device
        target = w_target.to(dev, torch.float32).reshape(1, -1)
        scale = target.square().sum().clamp_min(1e-12)
        z = base.sample_latents(self.mapping_starts, g).to(dev, torch.float32).requires_grad_(True)
        opt = torch.optim.Adam([z], lr=0.05)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, self.mapping_steps, eta_min=5e-4)
        with torch.enable_grad():
            for _ in range(self.mapping_steps):
                opt.zero_grad(set_to_none=True)
                err = (self._map(z) - target).square().sum(1) / scale
                err.sum().backward()
                opt.step()
                sched.step()
        z, err = self._levenberg_marquardt(z.detach(), target, scale)
        if metric is not None:
            metric = metric.to(dev)
            z, err = self._levenberg_marquardt(z, target, (target @ metric).square().sum().clamp_min(1e-12), metric)
        if image is None:
            return z[int(torch.argmin(err))].float()
        with torch.no_grad():
            recon = base.to_unit(base.decode_raw(z).float())
            loss = (recon - image.to(dev, torch.float32)[None]).square().flatten(1).mean(1)
        # a draw whose image is not finite is never chosen over one that is
        loss = torch.where(torch.isfinite(loss), loss, torch.full_like(loss, math.inf))
        return z[int(torch.argmin(loss))].float()

    def _levenberg_marquardt(self, z: Tensor, target: Tensor, scale: Tensor,
                             metric: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Up to :data:`MAPPING_LM_STEPS` damped Gauss-Newton steps on every row of ``z`` at once
        for ``mapping(z) = target`` (the residual ``mapping(z) - target``, times ``metric`` where
        given); a row's step is taken only where it lowers its error. Returns ``z`` and each row's
        squared error."""
        rows, w_dim = z.shape[0], target.shape[1]
        lam = torch.full((rows,), 1e-3, device=z.device)
        eye = torch.eye(w_dim, device=z.device)

        def residual(q: Tensor) -> Tensor:
            dw = self._map(q) - target
            return dw if metric is None else dw @ metric

        with torch.no_grad():
            err = residual(z).square().sum(1)
        for _ in range(MAPPING_LM_STEPS):
            if float(err.max() / scale) < 1e-12:
                break
            zz = z.detach().requires_grad_(True)
            with torch.enable_grad():
                r = residual(zz)
                # every row's Jacobian at once: one batched backward pass per w coordinate (vmapped)
                basis = eye[:, None, :].expand(w_dim, rows, w_dim)
                jac = torch.autograd.grad(r, zz, grad_outputs=basis, is_grads_batched=True)[0].transpose(0, 1)
            r = r.detach()  # [rows, w_dim]
            jjt = jac @ jac.transpose(1, 2)  # [rows, w_dim, w_dim]
            damp = lam[:, None, None] * (jjt.diagonal(dim1=1, dim2=2).mean(1)[:, None, None] * eye + 1e-12 * eye)
            # NaN where Cholesky refuses the matrix: a refused step
            step = -(jac.transpose(1, 2) @ solve_damped(jjt + damp, r[:, :, None])).squeeze(2)
            with torch.no_grad():
                new_err = residual(z + step).square().sum(1)
            better = torch.isfinite(new_err) & (new_err < err)
            z = torch.where(better[:, None], z + step, z)
            err = torch.where(better, new_err, err)
            lam = torch.where(better, (lam / 3).clamp_min(1e-9), lam * 4)
        return z, err


def train_w_encoder(start: MappingStart, **recipe) -> WarmStartEncoder:
    """An encoder from images to ``w`` for ``start``'s model, trained on its own samples only:
    :func:`ronan_fast.warmstart.train_encoder` on :attr:`MappingStart.w_generator` (inputs
    ``mapping(z)`` of prior draws, the images ``synthesis`` makes of them, rounded to 8 bits);
    ``recipe`` goes to it, over :data:`W_ENCODER_RECIPE` (e.g. ``samples=8192, steps=1000,
    width=16, hidden=512, image_steps=200``: the learned warm starts' recipe, about 2 minutes).
    Pass it as ``start.with_w_encoder(...)`` or ``MappingStart(..., w_encoder=...)``; it saves and
    loads as any encoder (:meth:`~ronan_fast.warmstart.WarmStartEncoder.save`,
    ``load_encoder(path, start.w_generator)``)."""
    from ronan_fast.warmstart import train_encoder

    if not isinstance(start, MappingStart):
        raise TypeError(f"start must be a MappingStart, got {type(start).__name__}")
    return train_encoder(start.w_generator, **{**W_ENCODER_RECIPE, **recipe})


def has_mapping_network(generator: GeneratorAdapter) -> bool:
    """Whether :func:`mapping_start` can build a start for ``generator``: its module has
    ``mapping_net(z) -> w``, ``synthesis(w) -> images`` and an int ``w_dim``."""
    module = getattr(generator, "module", None)
    return module is not None and all(callable(getattr(module, a, None)) for a in ("mapping_net", "synthesis")) \
        and isinstance(getattr(module, "w_dim", None), int)


def mapping_start(generator: GeneratorAdapter, **kwargs) -> MappingStart:
    """A :class:`MappingStart` for an adapter whose module has ``mapping_net(z) -> w`` and
    ``synthesis(w) -> images`` and a ``w_dim`` (the zoo's StyleGAN-style generators);
    ``kwargs`` go to :class:`MappingStart`."""
    module = getattr(generator, "module", None)
    if not has_mapping_network(generator):
        raise TypeError(f"{getattr(generator, 'name', generator)!r} has no module with mapping_net, synthesis and "
                        "w_dim: build MappingStart(generator, mapping=..., synthesis=..., w_dim=...) yourself")
    return MappingStart(generator, module.mapping_net, module.synthesis, module.w_dim, [module], **kwargs)
