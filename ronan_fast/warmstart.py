"""Learned warm starts: an encoder from a generator's images to its inputs, trained on its own samples.

Inversion (Eq. 1) searches a generator's input for an image from random starts; a start in the
wrong basin ends as high as a real image, and the model's own image is then rejected. An
encoder trained on pairs the generator itself makes -- an input drawn from its prior and the
image it gives, rounded to 8 bits as a saved file holds it -- maps an image to a guess of its
input: for the model's own images a start in (or near) the right basin. Nothing about the
generator changes; the encoder only chooses where the search begins.

* :func:`train_encoder` trains one (:class:`LatentEncoder`, a small convolutional network) and
  returns a :class:`WarmStartEncoder` that records the generator's fingerprint and what the
  training cost (seconds, samples).
* :meth:`WarmStartEncoder.save` / :func:`load_encoder`: one safetensors file (no pickle), the
  generator's fingerprint and the recipe in its metadata; :func:`load_encoder` refuses it for
  any other generator (:class:`EncoderMismatchError`). :func:`encoder_path` names it beside a
  belonging profile: ``PROFILE.encoder.safetensors``.
* :class:`WarmStarted` wraps a generator adapter so that the first start of each image (of each
  class, where a conditional generator's class is searched) is the encoder's guess for that
  image; the other starts are the random draws the image would get without it, from its own
  stream (:mod:`ronan_fast.inversion.starts`). The guess is computed for each image alone, so
  it does not depend on the batch. Random starts remain for the images the encoder misses.

For a latent-diffusion decoder the autoencoder's own encoder is the warm start
(:class:`ronan_fast.autoencoder_start.AutoencoderStart`, which an
:class:`~ronan_fast.Attributor` also uses for a
:class:`~ronan_fast.diffusers_adapters.LatentDiffusionDecoder` built with ``init="encoder"``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from ronan_fast.adapters import DelegatingAdapter, GeneratorAdapter

__all__ = ["LatentEncoder", "WarmStartEncoder", "ModelDerivedStart", "WarmStarted", "EncoderError",
           "EncoderMismatchError", "train_encoder", "load_encoder", "encoder_path", "FORMAT"]

#: the file format's name, in every encoder file's metadata
FORMAT = "ronan_fast.encoder/v1"


class EncoderError(ValueError):
    """An encoder file that cannot be read as one, or arguments an encoder cannot take."""


class EncoderMismatchError(EncoderError):
    """An encoder trained for another generator (its fingerprint differs)."""


class LatentEncoder(nn.Module):
    """A convolutional encoder: images ``[B, C, H, W]`` in [0, 1] to latent rows ``[B, latent_dim]``.

    Stride-2 4x4 convolutions (``width``, doubling up to ``8 * width`` channels) with LeakyReLU
    while the image is at least 8 pixels on each side, an average pool to 4x4, then two linear
    layers (``hidden`` units). No normalisation layer: an image's guess depends on that image alone.
    """

    def __init__(self, image_shape: tuple[int, int, int], latent_dim: int, width: int = 32, hidden: int = 512):
        super().__init__()
        c, h, w = (int(v) for v in image_shape)
        self.image_shape, self.latent_dim, self.width, self.hidden = (c, h, w), int(latent_dim), int(width), int(hidden)
        layers: list[nn.Module] = []
        ch_in, ch = c, self.width
        while h >= 8 and w >= 8:
            layers += [nn.Conv2d(ch_in, ch, 4, 2, 1), nn.LeakyReLU(0.2)]
            ch_in, ch = ch, min(2 * ch, 8 * self.width)
            h, w = h // 2, w // 2
        layers.append(nn.AdaptiveAvgPool2d(4))
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(ch_in * 16, self.hidden), nn.LeakyReLU(0.2),
                                  nn.Linear(self.hidden, self.latent_dim))

    def config(self) -> dict:
        return {"image_shape": list(self.image_shape), "latent_dim": self.latent_dim, "width": self.width,
                "hidden": self.hidden}

    def forward(self, images: Tensor) -> Tensor:
        return self.head(self.features(images * 2 - 1))


@dataclass
class WarmStartEncoder:
    """A trained :class:`LatentEncoder` and what it belongs to.

    ``fingerprint`` is the generator's (:meth:`GeneratorAdapter.fingerprint`); ``recipe`` the
    training arguments; ``cost`` what training took (``samples``: generator calls made for it;
    ``train_s``: wall seconds, sample generation included; ``generate_s`` of them for the samples).
    """

    module: LatentEncoder
    fingerprint: str
    recipe: dict = field(default_factory=dict)
    cost: dict = field(default_factory=dict)

    @torch.no_grad()
    def guess(self, images: Tensor) -> Tensor:
        """The encoder's latent for each image, ``[B, latent_dim]`` float32, each image computed
        alone (batch-size independent)."""
        if not isinstance(images, Tensor) or images.dim() != 4 or tuple(images.shape[1:]) != self.module.image_shape:
            got = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
            raise EncoderError(f"images must be [B, {', '.join(map(str, self.module.image_shape))}], got {got}")
        p = next(self.module.parameters())
        x = images.detach().to(p.device, torch.float32)
        return torch.cat([self.module(x[k : k + 1]) for k in range(x.shape[0])]).float()

    def digest(self) -> str:
        """sha256 of the encoder's architecture and weights: a belonging profile fitted with this
        encoder records it, and is refused with another."""
        h = hashlib.sha256(json.dumps(self.module.config(), sort_keys=True).encode())
        for k, v in sorted(self.module.state_dict().items()):
            h.update(k.encode())
            h.update(v.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
        return h.hexdigest()

    def describe(self) -> dict:
        """What a profile records about the encoder: its digest, recipe and training cost."""
        return {"sha256": self.digest(), "recipe": dict(self.recipe), "cost": dict(self.cost)}

    def check(self, generator: GeneratorAdapter) -> None:
        """Raise :class:`EncoderMismatchError` unless this encoder was trained for ``generator``."""
        if self.module.latent_dim != generator.latent_dim or tuple(self.module.image_shape) != tuple(generator.image_shape):
            raise EncoderMismatchError(
                f"the encoder maps {tuple(self.module.image_shape)} images to {self.module.latent_dim}-wide latents, "
                f"but {generator.name} makes {tuple(generator.image_shape)} images from {generator.latent_dim}-wide ones")
        fp = generator.fingerprint()
        if fp != self.fingerprint:
            raise EncoderMismatchError(
                f"the encoder was trained for the generator with fingerprint {self.fingerprint[:16]}..., not for "
                f"{generator.name} ({fp[:16]}...): train one for this generator (ronan_fast.warmstart.train_encoder)")

    def to(self, device) -> "WarmStartEncoder":
        """Move the encoder's network to ``device``; returns self."""
        self.module.to(device)
        return self

    def save(self, path: str | os.PathLike) -> Path:
        """Write the encoder as one safetensors file (atomically), with its generator's fingerprint,
        architecture, recipe and training cost in the metadata."""
        from safetensors.torch import save_file

        from ronan_fast._atomic import atomic_path

        path = Path(path)
        meta = {"format": FORMAT, "fingerprint": self.fingerprint, "config": json.dumps(self.module.config()),
                "recipe": json.dumps(self.recipe, sort_keys=True), "cost": json.dumps(self.cost, sort_keys=True)}
        state = {k: v.detach().to("cpu").contiguous() for k, v in self.module.state_dict().items()}
        with atomic_path(path) as tmp:
            save_file(state, str(tmp), metadata=meta)
        return path


def encoder_path(profile_path: str | os.PathLike) -> Path:
    """Where the encoder of a belonging profile lives: ``PROFILE.encoder.safetensors`` beside
    ``PROFILE.json`` (the profile's suffix replaced)."""
    p = Path(profile_path)
    return p.with_name(f"{p.stem if p.suffix == '.json' else p.name}.encoder.safetensors")


def load_encoder(path: str | os.PathLike, generator: GeneratorAdapter | None = None) -> WarmStartEncoder:
    """Read an encoder file written by :meth:`WarmStartEncoder.save`.

    With ``generator``, refuse it (:class:`EncoderMismatchError`) unless it was trained for that
    generator (same fingerprint); any file that is not such an encoder ends in :class:`EncoderError`.
    """
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise EncoderError(f"no encoder file at {path}")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for a damaged header
        raise EncoderError(f"{path} is not a readable safetensors file: {e}") from None
    if meta.get("format") != FORMAT:
        raise EncoderError(f"{path} is not a ronan_fast encoder (format {meta.get('format')!r}, expected {FORMAT!r})")
    try:
        cfg = json.loads(meta["config"])
        recipe, cost = json.loads(meta.get("recipe", "{}")), json.loads(meta.get("cost", "{}"))
        fingerprint = str(meta["fingerprint"])
        module = LatentEncoder(tuple(cfg["image_shape"]), int(cfg["latent_dim"]), int(cfg["width"]), int(cfg["hidden"]))
        module.load_state_dict(state, strict=True)
    except (KeyError, ValueError, TypeError, RuntimeError) as e:
        raise EncoderError(f"{path}: its metadata or weights do not describe an encoder: {e}") from None
    enc = WarmStartEncoder(module.eval().requires_grad_(False), fingerprint, recipe, cost)
    if generator is not None:
        enc.check(generator)
        enc.module.to(generator.device)
    return enc


def _round8(x: Tensor) -> Tensor:
    return (x.clamp(0, 1) * 255).round() / 255


@torch.no_grad()
def _samples(generator: GeneratorAdapter, n: int, g: torch.Generator, block: int = 64) -> tuple[Tensor, Tensor, Tensor | None]:
    z = generator.sample_latents(n, g)
    c = generator.sample_conditions(n, g)
    x = torch.cat([generator.decode(z[i : i + block], None if c is None else c[i : i + block])
                   for i in range(0, n, block)])
    return _round8(x), z, c


def train_encoder(
    generator: GeneratorAdapter,
    *,
    samples: int = 8192,
    steps: int = 1000,
    batch: int = 64,
    lr: float = 1e-3,
    width: int = 16,
    hidden: int = 512,
    image_steps: int | None = None,
    image_weight: float = 1.0,
    seed: int = 0,
    log_every: int = 0,
) -> WarmStartEncoder:
    """Train an encoder for ``generator`` on its own samples only.

    ``samples`` inputs are drawn from the generator's prior (with its conditions, for a
    conditional generator) and decoded once; the images are rounded to 8 bits. The encoder
    learns to map each image to its input (mean squared error on the latent) for ``steps``
    Adam steps of ``batch`` pairs, the learning rate ``lr`` cosine-annealed to 1% of it. In the
    last ``image_steps`` of them the loss also has ``image_weight`` times the image's
    reconstruction error through the generator (its weights fixed), which helps where several
    inputs make one image (a mapping network); None: the last fifth. Deterministic for a given ``seed`` and thread count.
    The defaults are the recipe of the held-out benchmark (bench/results/heldout_*.md): one to two
    minutes on one CPU thread for the zoo's 64x64 generators.
    """
    for name, v in (("samples", samples), ("steps", steps), ("batch", batch), ("width", width), ("hidden", hidden)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise EncoderError(f"{name} must be an integer >= 1, got {v!r}")
    if image_steps is None:
        image_steps = steps // 5
    if isinstance(image_steps, bool) or not isinstance(image_steps, int) or not 0 <= image_steps <= steps:
        raise EncoderError(f"image_steps must be an integer in [0, steps], got {image_steps!r}")
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise EncoderError(f"lr must be a finite number > 0, got {lr!r}")
    recipe = dict(samples=samples, steps=steps, batch=batch, lr=lr, width=width, hidden=hidden,
                  image_steps=image_steps, image_weight=image_weight, seed=seed)
    device = generator.device
    t0 = time.perf_counter()
    g = torch.Generator(device="cpu").manual_seed(seed)
    x, z, c = _samples(generator, samples, g)
    t_gen = time.perf_counter() - t0
    torch.manual_seed(seed)
    module = LatentEncoder(tuple(generator.image_shape), generator.latent_dim, width, hidden).to(device)
    opt = torch.optim.Adam(module.parameters(), lr=lr)
    order = torch.Generator(device="cpu").manual_seed(seed + 1)
    perm, at = torch.randperm(samples, generator=order), 0
    calls = samples
    for step in range(steps):
        for grp in opt.param_groups:
            grp["lr"] = lr * (0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * step / steps)))
        if at + batch > samples:
            perm, at = torch.randperm(samples, generator=order), 0
        idx = perm[at : at + batch]
        at += batch
        xb, zb = x[idx].to(device), z[idx].to(device)
        pred = module(xb)
        loss = (pred - zb).square().mean()
        if step >= steps - image_steps:
            cb = None if c is None else c[idx].to(device)
            recon = generator.to_unit(generator.decode_raw(pred, cb))
            loss = loss + image_weight * (recon - xb).square().mean() * pred.shape[1]
            calls += batch
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if log_every and (step % log_every == 0 or step == steps - 1):
            print(f"encoder step {step}: loss {float(loss.detach()):.4g}", flush=True)
    module.eval().requires_grad_(False)
    cost = {"samples": samples, "generator_calls": calls, "steps": steps, "train_s": time.perf_counter() - t0,
            "generate_s": t_gen, "threads": torch.get_num_threads()}
    return WarmStartEncoder(module, generator.fingerprint(), recipe, cost)


class ModelDerivedStart:
    """What a warm start made from the model itself shares (nothing trained, no file beside the
    profile: :class:`~ronan_fast.mapping_start.MappingStart`,
    :class:`~ronan_fast.autoencoder_start.AutoencoderStart`): its identity is its ``recipe`` and
    the model's ``fingerprint``, which a profile records as :meth:`digest` and rebuilds it from.

    A subclass sets ``kind``, ``_DIGEST_TAG`` (bytes opening the digest) and ``_MADE_FOR`` (how
    a refusal names it), ``fingerprint`` in its constructor, and defines ``recipe``, ``check``
    and ``guess``."""

    kind: str
    _DIGEST_TAG: bytes
    _MADE_FOR: str
    fingerprint: str

    @property
    def recipe(self) -> dict:
        raise NotImplementedError

    @property
    def cost(self) -> dict:
        return {"samples": 0, "train_s": 0.0, "generate_s": 0.0}

    def digest(self) -> str:
        """sha256 of the recipe and the model's fingerprint: what a profile records."""
        h = hashlib.sha256(self._DIGEST_TAG)
        h.update(json.dumps({"recipe": self.recipe, "fingerprint": self.fingerprint}, sort_keys=True).encode())
        return h.hexdigest()

    def describe(self) -> dict:
        return {"sha256": self.digest(), "recipe": self.recipe, "cost": self.cost}

    def to(self, device):
        """Nothing of its own to move: what it runs is the model's (moved with it); returns self."""
        return self

    def _check_fingerprint(self, generator) -> None:
        """Raise :class:`EncoderMismatchError` unless ``generator`` is the model this start was made for."""
        fp = generator.fingerprint() if isinstance(generator, GeneratorAdapter) else None
        if fp != self.fingerprint:
            name = getattr(generator, "name", type(generator).__name__)
            raise EncoderMismatchError(f"{self._MADE_FOR} with fingerprint {self.fingerprint[:16]}..., not for "
                                       f"{name} ({(fp or 'none')[:16]}...)")


class WarmStarted(DelegatingAdapter):
    """``generator`` whose inversion starts each image's first row (of each class searched) at
    ``encoder``'s guess for it; everything else is the wrapped adapter's (:attr:`base`).

    The other rows are exactly the random starts the image gets without the encoder (the
    image's own stream, :func:`ronan_fast.inversion.starts.row_latents`). The fingerprint is the
    generator's: the encoder changes where a search begins, not the function searched.
    ``encoder`` is a :class:`WarmStartEncoder` or anything with its ``guess``, ``check`` and
    ``to`` (a :class:`~ronan_fast.mapping_start.MappingStart`). Raises
    :class:`EncoderMismatchError` for an encoder made for another generator.
    """

    #: the first row of each block of starts is a guess, not a draw (screening keeps it)
    guided_starts = True

    def __init__(self, generator: GeneratorAdapter, encoder: WarmStartEncoder):
        super().__init__(generator)
        encoder.check(generator)
        self.encoder = encoder
        encoder.to(generator.device)
        self._ready: dict | None = None  # the guesses of the images being started (guesses_for)

    def to(self, device):
        self.base.to(device)
        self.encoder.to(device)
        return self

    @property
    def guess_searches(self) -> bool:
        """Whether the encoder's guess is itself a search given each image's threshold
        (``takes_threshold``: :class:`~ronan_fast.mapping_start.MappingStart`, which has its own
        first search over ``w``): :attr:`~ronan_fast.inversion.InversionSettings.first_steps`
        does not apply then (it would guess every image twice)."""
        return bool(getattr(self.encoder, "takes_threshold", False))

    @contextlib.contextmanager
    def guesses_for(self, images: Tensor, stop_below: Tensor | None = None):
        """Within it, :meth:`initial_latents` takes the guess of each of ``images`` from here, in
        their order (the inversion's starts enter it for each chunk of images:
        :func:`ronan_fast.inversion.starts.start_latents`).

        An encoder whose guess of an image is the same alone or in any batch (``batch_invariant =
        True``: :class:`~ronan_fast.mapping_start.MappingStart`, whose search over ``w`` runs many
        images' starts in one batch) is called once for all of them; any other once per image,
        as outside it. An encoder that takes a belonging threshold (``takes_threshold = True``)
        is given each image's ``stop_below`` (a float or one per image; None: none).

        It yields which images the encoder settled above their threshold while guessing (a bool
        per image, in their order), where it can (``settles_above = True`` and a threshold: its
        ``guess_and_settled(images, stop_below)`` returns the guesses and that mask; the
        inversion confirms each by the guess's own loss before it skips the image's search), and
        None otherwise."""
        b = images.shape[0]
        sb = None if stop_below is None else torch.as_tensor(stop_below, dtype=torch.float32).flatten().cpu()
        if sb is not None:
            sb = sb.expand(b)
        settles = sb is not None and getattr(self.encoder, "settles_above", False)
        if getattr(self.encoder, "batch_invariant", False):
            guesses, settled = self._guess(images, sb)
            guesses = list(guesses)
        else:
            pairs = [self._guess(images[k : k + 1], None if sb is None else sb[k : k + 1]) for k in range(b)]
            guesses = [g[0] for g, _ in pairs]
            settled = None if not settles else torch.cat([m for _, m in pairs])
        ready: dict[int, list[Tensor]] = {}
        for k in range(b):  # an image that appears twice takes its guesses in order
            ready.setdefault(self._key(images[k]), []).append(guesses[k])
        self._ready = ready
        try:
            yield None if settled is None else settled.cpu().bool()
        finally:
            self._ready = None

    def _guess(self, images: Tensor, stop_below: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """The encoder's guesses of ``images`` and (where it settles images above their
        threshold, given one) the mask of those it settled."""
        if stop_below is not None and getattr(self.encoder, "settles_above", False):
            return self.encoder.guess_and_settled(images, stop_below=stop_below)
        if stop_below is not None and getattr(self.encoder, "takes_threshold", False):
            return self.encoder.guess(images, stop_below=stop_below), None
        return self.encoder.guess(images), None

    @staticmethod
    def _key(image: Tensor) -> int:
        from ronan_fast.inversion.starts import image_seed

        return image_seed(image, 0)

    def _ready_guesses(self, images: Tensor) -> Tensor:
        """The guesses of ``images``: :meth:`guesses_for`'s where it made them, else the encoder's."""
        if self._ready is None:
            return self.encoder.guess(images)
        out = []
        for k in range(images.shape[0]):
            queue = self._ready.get(self._key(images[k]))
            out.append(queue.pop(0) if queue else self.encoder.guess(images[k : k + 1])[0])
        return torch.stack(out)

    def initial_latents(self, images: Tensor, rows_per_image: int, generator: torch.Generator | None = None) -> Tensor:
        """``[B * rows_per_image, D]`` starts, image-major: the base's random starts for each
        image, the first row of each block of ``rows_per_image / blocks`` (one block per class
        searched, else one) replaced by the encoder's guess for the image (the one
        :meth:`guesses_for` made for it, inside it)."""
        init = getattr(self.base, "initial_latents", None)
        b = images.shape[0]
        z = init(images, rows_per_image, generator) if init is not None else \
            self.base.sample_latents(b * rows_per_image, generator)
        _, blocks = self.base.row_conditions(None, 1, 1)
        if rows_per_image % blocks:
            raise EncoderError(f"rows_per_image={rows_per_image} is not a whole number of blocks of {blocks}")
        z = z.reshape(b, blocks, rows_per_image // blocks, -1).clone()
        z[:, :, 0] = self._ready_guesses(images).to(z).unsqueeze(1)
        return z.reshape(b * rows_per_image, -1)
