"""Generator adapters: how to draw a generator's inputs, which of them are optimised, and how
they map to an image in [0, 1], NCHW.

Inversion sees every generator through :class:`GeneratorAdapter`: a row of float32 latents
``[M, D]`` (the optimised input, flattened), an optional per-row condition that is not
optimised (a class label or an embedding), and :meth:`GeneratorAdapter.decode_raw`, the
differentiable map to the model's own output range. Adapters know nothing of losses,
optimisers or statistics.
"""

from __future__ import annotations

import abc
import copy
import hashlib
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

__all__ = [
    "GeneratorAdapter",
    "DelegatingAdapter",
    "GeneratedBatch",
    "LatentGenerator",
    "ConditionalGenerator",
    "GeneratorOutputError",
    "module_fingerprint",
    "channels_last",
    "fold_batchnorm",
]


#: what a module needs to be inverted step by step (GeneratorAdapter.stage_chain)
_CHAIN_API = ("step", "final_step", "step_start", "final_start")


class GeneratorOutputError(RuntimeError):
    """The generator returned something that is not a usable image batch."""


@dataclass
class GeneratedBatch:
    """Images drawn from a generator, with the inputs that made them."""

    images: Tensor  # [N, C, H, W] in [0, 1]
    latents: Tensor  # [N, D] float32
    conditions: Tensor | None  # [N] or [N, E], or None


def _weights_hash(modules: Sequence[nn.Module]) -> "hashlib._Hash":
    h = hashlib.sha256()
    for i, module in enumerate(modules):
        for name, t in sorted(module.state_dict().items()):
            h.update(f"{i}:{name}:{tuple(t.shape)}:{t.dtype}".encode())
            data = t.detach().to("cpu").contiguous()
            if data.dtype == torch.bfloat16:
                data = data.view(torch.int16)
            h.update(data.numpy().tobytes())
    return h


def _finish_fingerprint(h: "hashlib._Hash", extra: dict | None) -> str:
    if extra:
        h.update(json.dumps(extra, sort_keys=True, default=str).encode())
    return h.hexdigest()


def module_fingerprint(modules: Sequence[nn.Module], extra: dict | None = None) -> str:
    """SHA-256 over the modules' parameters and buffers (names, shapes, dtypes, bytes) and ``extra``."""
    return _finish_fingerprint(_weights_hash(modules), extra)


def _freeze(module: nn.Module) -> nn.Module:
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return module


class GeneratorAdapter(abc.ABC):
    """What inversion needs to know of a generator.

    Subclasses set :attr:`latent_dim`, :attr:`image_shape`, :attr:`output_range` and
    :attr:`family`, and implement :meth:`decode_raw`. The latent prior is a standard normal
    of width ``latent_dim`` unless :meth:`sample_latents` says otherwise.
    """

    #: width D of one optimised input row
    latent_dim: int
    #: native (C, H, W) of the generator's images
    image_shape: tuple[int, int, int]
    #: (low, high) of the raw output; decode maps it linearly onto [0, 1]
    output_range: tuple[float, float] = (-1.0, 1.0)
    #: generator family, used to pick inversion defaults: "gan", "vae", "conditional", "diffusion",
    #: "consistency" (a one-step generator whose latent is as wide as the image)
    family: str = "gan"
    #: short human-readable name for reports
    name: str = "generator"

    # ---------------------------------------------------------------- to implement

    @abc.abstractmethod
    def decode_raw(self, latents: Tensor, conditions: Tensor | None = None) -> Tensor:
        """Map ``latents [M, D]`` (and per-row ``conditions``) to images in :attr:`output_range`."""

    @abc.abstractmethod
    def modules(self) -> list[nn.Module]:
        """The modules whose weights define the generator (for fingerprints and device moves)."""

    # ---------------------------------------------------------------- defaults

    @property
    def device(self) -> torch.device:
        for module in self.modules():
            for t in list(module.parameters()) + list(module.buffers()):
                return t.device
        return torch.device("cpu")

    def to(self, device: torch.device | str) -> "GeneratorAdapter":
        for module in self.modules():
            module.to(device)
        return self

    def config(self) -> dict:
        """What besides the weights defines the map from inputs to images (part of the fingerprint)."""
        return {
            "class": type(self).__name__,
            "latent_dim": self.latent_dim,
            "image_shape": list(self.image_shape),
            "output_range": list(self.output_range),
        }

    def fingerprint(self) -> str:
        return _finish_fingerprint(self._unfolded_weights_hash(), self.config())

    def _unfolded_weights_hash(self) -> "hashlib._Hash":
        """A fresh hash of the weights, or of the weights before :func:`fold_batchnorm` while the
        folded ones are unchanged."""
        h = _weights_hash(self.modules())
        folded = getattr(self, "_unfolded_weights", None)
        if folded is not None and h.hexdigest() == folded.folded_digest:
            return folded.unfolded.copy()
        return h

    def sample_latents(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """Draw ``n`` rows from the input prior (standard normal), float32 on :attr:`device`."""
        z = torch.randn(n, self.latent_dim, generator=generator, dtype=torch.float32,
                        device=generator.device if generator is not None else "cpu")
        return z.to(self.device)

    @property
    def prior_radius(self) -> float | None:
        """Radius of the prior's typical set (sqrt(D) for a standard normal), or None."""
        return math.sqrt(self.latent_dim)

    def sample_conditions(self, n: int, generator: torch.Generator | None = None) -> Tensor | None:
        """Conditions for ``n`` freshly generated images (None for unconditional generators)."""
        return None

    def stage_chain(self) -> nn.Module | None:
        """The generator as a chain of sampler steps, for stagewise inversion, or None.

        A chain is a module with ``steps`` (an int >= 2), ``step(i, x)`` (step ``i < steps - 1``:
        its input to the next step's input, shaped like the latent), ``final_step(x)`` (the
        last step's input to the raw image), ``step_start(i, x_next)`` (a first guess of step
        ``i``'s input) and ``final_start(image_raw, noise)`` (a starting input of the last step);
        :class:`~ronan_fast.models.DDIMSampler` is one. See :mod:`ronan_fast.inversion.stagewise`.
        """
        return None

    def row_conditions(self, conditions: Tensor | None, batch: int, restarts: int) -> tuple[Tensor | None, int]:
        """Per-row conditions for ``batch`` images times ``restarts`` and the rows per image.

        Rows are laid out image-major: row ``b * rows_per_image + r`` belongs to image ``b``.
        Unconditional generators have no conditions and ``rows_per_image == restarts``.
        """
        if conditions is not None:
            raise ValueError(f"{self.name} takes no conditions, but conditions were given")
        return None, restarts

    def to_unit(self, raw: Tensor) -> Tensor:
        lo, hi = self.output_range
        return (raw - lo) / (hi - lo)

    def from_unit(self, images: Tensor) -> Tensor:
        lo, hi = self.output_range
        return images * (hi - lo) + lo

    def decode(self, latents: Tensor, conditions: Tensor | None = None) -> Tensor:
        """Images in [0, 1] for ``latents``, checked for shape and finiteness."""
        out = self.decode_raw(latents, conditions)
        self.check_output(out, latents.shape[0])
        return self.to_unit(out)

    def check_output(self, out: Tensor, rows: int, check_finite: bool = True) -> None:
        if not isinstance(out, Tensor):
            raise GeneratorOutputError(f"{self.name} returned {type(out).__name__}, expected a tensor")
        want = (rows, *self.image_shape)
        if tuple(out.shape) != want:
            raise GeneratorOutputError(
                f"{self.name} returned shape {tuple(out.shape)} for {rows} inputs; expected {want} "
                f"(image_shape={self.image_shape})"
            )
        if check_finite and not bool(torch.isfinite(out).all()):
            raise GeneratorOutputError(f"{self.name} returned NaN or Inf values")

    @torch.no_grad()
    def generate(self, n: int, generator: torch.Generator | None = None, batch_size: int = 256) -> GeneratedBatch:
        """Draw ``n`` images from the generator with the inputs that made them."""
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        z = self.sample_latents(n, generator)
        c = self.sample_conditions(n, generator)
        parts = [
            self.decode(z[i : i + batch_size], None if c is None else c[i : i + batch_size]).clamp(0, 1)
            for i in range(0, n, batch_size)
        ]
        return GeneratedBatch(torch.cat(parts), z, c)


class LatentGenerator(GeneratorAdapter):
    """Any module from a latent tensor to an image: DCGAN, VAE decoder, ``G(z, c)`` with a fixed c.

    Args:
        module: the generator; put in eval mode with its parameters frozen.
        latent_shape: the shape of one latent, e.g. ``(100,)`` or ``(100, 1, 1)`` for a DCGAN.
        output_range: the range of the module's output, e.g. ``(-1, 1)`` for tanh, ``(0, 1)`` for sigmoid.
        image_shape: (C, H, W) of the output; found by one forward pass when omitted.
        call: how to call the module with a batch of latents shaped ``[M, *latent_shape]``;
            defaults to ``module(z)``. Use it to fix extra arguments, e.g. ``lambda m, z: m(z, c)``.
        family: "gan", "vae", "diffusion" or "consistency" (selects inversion defaults; see
            :data:`ronan_fast.inversion.FAMILY_DEFAULTS`).
        name: a name for reports.
    """

    def __init__(
        self,
        module: nn.Module,
        latent_shape: Sequence[int] | int,
        output_range: tuple[float, float] = (-1.0, 1.0),
        image_shape: Sequence[int] | None = None,
        call: Callable[[nn.Module, Tensor], Tensor] | None = None,
        family: str = "gan",
        name: str | None = None,
    ) -> None:
        if not isinstance(module, nn.Module):
            raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}")
        self.latent_shape = (int(latent_shape),) if isinstance(latent_shape, int) else tuple(int(s) for s in latent_shape)
        if not self.latent_shape or any(s < 1 for s in self.latent_shape):
            raise ValueError(f"latent_shape must be positive sizes, got {latent_shape!r}")
        lo, hi = (float(v) for v in output_range)
        if not (math.isfinite(lo) and math.isfinite(hi) and hi > lo):
            raise ValueError(f"output_range must be finite (low, high) with high > low, got {output_range!r}")
        self.module = _freeze(module)
        self.output_range = (lo, hi)
        self.latent_dim = math.prod(self.latent_shape)
        self.call = call
        self.family = family
        self.name = name or type(module).__name__
        if image_shape is None:
            with torch.no_grad():
                probe = self._forward(torch.zeros(1, self.latent_dim, device=self.device))
            if not isinstance(probe, Tensor) or probe.dim() != 4:
                got = tuple(probe.shape) if isinstance(probe, Tensor) else type(probe).__name__
                raise GeneratorOutputError(f"{self.name} must return [N, C, H, W] images, got {got}")
            image_shape = tuple(probe.shape[1:])
        self.image_shape = tuple(int(s) for s in image_shape)  # type: ignore[assignment]
        if len(self.image_shape) != 3:
            raise ValueError(f"image_shape must be (C, H, W), got {image_shape!r}")

    def _forward(self, latents: Tensor) -> Tensor:
        z = latents.view(latents.shape[0], *self.latent_shape)
        return self.module(z) if self.call is None else self.call(self.module, z)

    def decode_raw(self, latents: Tensor, conditions: Tensor | None = None) -> Tensor:
        if conditions is not None:
            raise ValueError(f"{self.name} takes no conditions, but conditions were given")
        return self._forward(latents)

    def modules(self) -> list[nn.Module]:
        return [self.module]

    def stage_chain(self) -> nn.Module | None:
        m = self.module
        if self.call is not None or not all(hasattr(m, a) for a in _CHAIN_API):
            return None
        return m if isinstance(getattr(m, "steps", None), int) and m.steps >= 2 else None

    def config(self) -> dict:
        return {**super().config(), "latent_shape": list(self.latent_shape), "family": self.family}


class ConditionalGenerator(GeneratorAdapter):
    """A generator ``G(z, c)`` with a condition c: a class label or a condition embedding.

    A known condition is fixed (``condition=`` here, or per image at inversion time); an unknown
    class is searched: inversion spreads the ``num_classes`` candidates over the restart
    dimension (every class gets ``restarts`` rows) and keeps the best row.

    Args:
        module: the generator, called as ``call(module, z, c)`` (default ``module(z, c)``).
        latent_shape: shape of one latent.
        num_classes: number of classes for label conditions (None for embeddings).
        condition: a fixed condition used for every image (an int label or an embedding tensor [E]).
        output_range, image_shape, name: as for :class:`LatentGenerator`.
    """

    family = "conditional"

    def __init__(
        self,
        module: nn.Module,
        latent_shape: Sequence[int] | int,
        num_classes: int | None = None,
        condition: int | Tensor | None = None,
        output_range: tuple[float, float] = (-1.0, 1.0),
        image_shape: Sequence[int] | None = None,
        call: Callable[[nn.Module, Tensor, Tensor], Tensor] | None = None,
        name: str | None = None,
    ) -> None:
        if not isinstance(module, nn.Module):
            raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}")
        if num_classes is None and condition is None:
            raise ValueError("give num_classes (class labels) or a fixed condition (embedding)")
        if num_classes is not None and num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.latent_shape = (int(latent_shape),) if isinstance(latent_shape, int) else tuple(int(s) for s in latent_shape)
        lo, hi = (float(v) for v in output_range)
        if not hi > lo:
            raise ValueError(f"output_range must be (low, high) with high > low, got {output_range!r}")
        self.module = _freeze(module)
        self.output_range = (lo, hi)
        self.latent_dim = math.prod(self.latent_shape)
        self.num_classes = num_classes
        self.call = call
        self.name = name or type(module).__name__
        self.condition = None if condition is None else self._checked_condition(condition)
        if image_shape is None:
            with torch.no_grad():
                c = self._fixed_or_default(1)
                probe = self._forward(torch.zeros(1, self.latent_dim, device=self.device), c)
            if not isinstance(probe, Tensor) or probe.dim() != 4:
                raise GeneratorOutputError(f"{self.name} must return [N, C, H, W] images")
            image_shape = tuple(probe.shape[1:])
        self.image_shape = tuple(int(s) for s in image_shape)  # type: ignore[assignment]

    def _checked_condition(self, condition: int | Tensor) -> Tensor:
        if isinstance(condition, bool):
            raise ValueError(f"condition must be a class label or an embedding, got {condition!r}")
        if isinstance(condition, int):
            if self.num_classes is not None and not 0 <= condition < self.num_classes:
                raise ValueError(f"condition must be a class in [0, {self.num_classes}), got {condition}")
            return torch.tensor(condition, dtype=torch.int64)
        return torch.as_tensor(condition).detach()

    def with_class(self, label: int) -> "ConditionalGenerator":
        """A copy of this adapter that generates and inverts every image as class ``label`` (the
        class is then known, not searched); the module is shared, not copied."""
        if self.num_classes is None:
            raise ValueError(f"{self.name} is conditioned on embeddings, not class labels: give condition= instead")
        if isinstance(label, bool) or not isinstance(label, int):
            raise ValueError(f"the class label must be an int in [0, {self.num_classes}), got {label!r}")
        new = copy.copy(self)
        new.condition = self._checked_condition(label)
        return new

    def _fixed_or_default(self, n: int) -> Tensor:
        if self.condition is not None:
            c = self.condition.to(self.device)
            return c.expand(n, *c.shape) if c.dim() else c.expand(n)
        return torch.zeros(n, dtype=torch.int64, device=self.device)

    def _forward(self, latents: Tensor, conditions: Tensor) -> Tensor:
        z = latents.view(latents.shape[0], *self.latent_shape)
        return self.module(z, conditions) if self.call is None else self.call(self.module, z, conditions)

    def decode_raw(self, latents: Tensor, conditions: Tensor | None = None) -> Tensor:
        if conditions is None:
            if self.condition is None:
                raise ValueError(f"{self.name} needs a condition per row (class unknown: let inversion search it)")
            conditions = self._fixed_or_default(latents.shape[0])
        return self._forward(latents, conditions)

    def modules(self) -> list[nn.Module]:
        return [self.module]

    def config(self) -> dict:
        cfg = {**super().config(), "latent_shape": list(self.latent_shape), "num_classes": self.num_classes}
        if self.condition is not None:
            cfg["condition"] = self.condition.tolist()
        return cfg

    def sample_conditions(self, n: int, generator: torch.Generator | None = None) -> Tensor | None:
        if self.condition is not None:
            return self._fixed_or_default(n)
        dev = generator.device if generator is not None else "cpu"
        return torch.randint(0, self.num_classes, (n,), generator=generator, device=dev).to(self.device)

    def row_conditions(self, conditions: Tensor | None, batch: int, restarts: int) -> tuple[Tensor | None, int]:
        if conditions is not None:
            conditions = torch.as_tensor(conditions, device=self.device)
            if conditions.shape[0] != batch:
                raise ValueError(f"conditions must have one entry per image ({batch}), got {conditions.shape[0]}")
            if self.num_classes is not None and conditions.dtype == torch.int64:
                if conditions.numel() and (int(conditions.min()) < 0 or int(conditions.max()) >= self.num_classes):
                    raise ValueError(f"conditions must be classes in [0, {self.num_classes})")
            return conditions.repeat_interleave(restarts, dim=0), restarts
        if self.condition is not None:
            return self._fixed_or_default(batch * restarts), restarts
        # Unknown class: every image gets `restarts` rows for each candidate class.
        classes = torch.arange(self.num_classes, device=self.device).repeat_interleave(restarts)
        return classes.repeat(batch), restarts * self.num_classes


class DelegatingAdapter(GeneratorAdapter):
    """An adapter that is ``generator`` (:attr:`base`) in everything it does not override: the
    base for wrappers that change one aspect of a model's use (how its calls are blocked, where
    its inversions start) and keep its function, fingerprint and prior."""

    def __init__(self, generator: GeneratorAdapter):
        if not isinstance(generator, GeneratorAdapter):
            raise TypeError(f"generator must be a GeneratorAdapter, got {type(generator).__name__}")
        self.base = generator

    def __getattr__(self, name: str):
        if name == "base":  # not set yet (copying, unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.base, name)

    # attributes the base class defines: the wrapped adapter's
    latent_dim = property(lambda self: self.base.latent_dim)
    image_shape = property(lambda self: self.base.image_shape)
    output_range = property(lambda self: self.base.output_range)
    family = property(lambda self: self.base.family)
    name = property(lambda self: self.base.name)
    device = property(lambda self: self.base.device)
    prior_radius = property(lambda self: self.base.prior_radius)

    def decode_raw(self, latents: Tensor, conditions: Tensor | None = None) -> Tensor:
        return self.base.decode_raw(latents, conditions)

    def modules(self) -> list[nn.Module]:
        return self.base.modules()

    def config(self) -> dict:
        return self.base.config()

    def fingerprint(self) -> str:
        return self.base.fingerprint()

    def _unfolded_weights_hash(self) -> "hashlib._Hash":
        return self.base._unfolded_weights_hash()

    def sample_latents(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        return self.base.sample_latents(n, generator)

    def sample_conditions(self, n: int, generator: torch.Generator | None = None) -> Tensor | None:
        return self.base.sample_conditions(n, generator)

    def stage_chain(self) -> nn.Module | None:
        return self.base.stage_chain()

    def row_conditions(self, conditions: Tensor | None, batch: int, restarts: int) -> tuple[Tensor | None, int]:
        return self.base.row_conditions(conditions, batch, restarts)

    def to_unit(self, raw: Tensor) -> Tensor:
        return self.base.to_unit(raw)

    def from_unit(self, images: Tensor) -> Tensor:
        return self.base.from_unit(images)

    def check_output(self, out: Tensor, rows: int, check_finite: bool = True) -> None:
        self.base.check_output(out, rows, check_finite)

    def to(self, device: torch.device | str) -> "DelegatingAdapter":
        self.base.to(device)
        return self


# what makes a generator's steps cheaper without changing its function (re-exported from here)
from ronan_fast.weight_transforms import channels_last, fold_batchnorm  # noqa: E402
