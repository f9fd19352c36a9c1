"""Adapters for ``diffusers`` generators (optional extra: ``pip install 'ronan-fast[diffusers]'``).

* :class:`LatentDiffusionDecoder` -- the decoder of a latent diffusion model's autoencoder
  (``AutoencoderKL`` as in Stable Diffusion, or ``VQModel`` as in LDM): the optimised input is
  the latent the diffusion model would hand to the decoder, in its scaled space.
* :class:`OneStepSampler` -- a consistency model (``UNet2DModel`` with
  ``CMStochasticIterativeScheduler``) sampled in one step: the optimised input is the initial
  Gaussian noise.

Both load only from local folders (``local_files_only=True``); nothing is downloaded. diffusers
is imported when an adapter is built, so this module imports without it.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from ronan_fast.adapters import GeneratorAdapter

__all__ = ["LatentDiffusionDecoder", "OneStepSampler", "from_folder", "require_diffusers"]

_INSTALL_HINT = "pip install 'ronan-fast[diffusers]'"


def require_diffusers():
    """Import and return diffusers, or raise an ImportError saying how to install it."""
    try:
        import diffusers
    except ImportError as e:
        raise ImportError(f"this adapter needs the diffusers package: {_INSTALL_HINT}") from e
    return diffusers


def _freeze(module: nn.Module) -> nn.Module:
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return module


def _param_dtype(module: nn.Module) -> torch.dtype:
    p = next(iter(module.parameters()), None)
    return torch.float32 if p is None else p.dtype


def _local_folder(folder: str | os.PathLike, subfolder: str | None = None) -> Path:
    path = Path(folder)
    if not path.is_dir():
        raise FileNotFoundError(
            f"{path} is not a local folder; these adapters load only saved models from disk (nothing is downloaded)"
        )
    if subfolder is not None and not (path / subfolder).is_dir():
        raise FileNotFoundError(f"{path} has no sub-folder {subfolder!r}")
    return path


def _autoencoder_subfolder(root: Path) -> str | None:
    """The sub-folder of a pipeline folder that holds its autoencoder (``vae`` or ``vqvae``), if any."""
    return next((s for s in ("vae", "vqvae") if (root / s / "config.json").is_file()), None)


def _load_kwargs(load_kwargs: dict) -> dict:
    """diffusers' ``from_pretrained`` arguments: local files only, and without ``accelerate``
    installed the plain loading (which diffusers would fall back to after a warning on every load)."""
    out = {**load_kwargs, "local_files_only": True}
    if importlib.util.find_spec("accelerate") is None:
        out.setdefault("low_cpu_mem_usage", False)
    return out


def _image_hw(size: int | Sequence[int], arg: str) -> tuple[int, int]:
    if isinstance(size, int) and not isinstance(size, bool):
        h = w = size
    else:
        try:
            h, w = (int(s) for s in size)  # type: ignore[union-attr]
        except (TypeError, ValueError):
            raise ValueError(f"{arg} must be an int or (height, width), got {size!r}") from None
    if h < 1 or w < 1:
        raise ValueError(f"{arg} must be positive, got {size!r}")
    return h, w


# --------------------------------------------------------------------------- latent diffusion decoder


class LatentDiffusionDecoder(GeneratorAdapter):
    """Invert the latent fed to an ``AutoencoderKL`` or ``VQModel`` decoder, as for Stable Diffusion.

    The optimised latent ``z`` lives in the diffusion model's (scaled) space and has shape
    ``(latent_channels, H / f, W / f)``, with ``f = 2 ** (len(block_out_channels) - 1)`` as the
    diffusers pipelines compute it. Decoding follows the pipelines: ``z / scaling_factor +
    shift_factor`` (or ``z * latents_std / scaling_factor + latents_mean`` when the config gives
    per-channel statistics) goes through ``vae.decode``. Output range (-1, 1).

    Args:
        vae: a loaded ``diffusers.AutoencoderKL`` or ``diffusers.VQModel``; frozen and put in eval mode.
        image_size: the image size to invert at, an int or (H, W); default the config's ``sample_size``.
        init: "random" (inversion starts from the prior) or "encoder" (:meth:`initial_latents`
            puts each image's first row at the encoder's mean latent, computed for that image
            alone). An :class:`~ronan_fast.Attributor` given an ``init="encoder"`` decoder uses
            :class:`~ronan_fast.autoencoder_start.AutoencoderStart` as its warm start, so that the
            profile records it.
        quantize: for a ``VQModel``, quantise the latent to the codebook before decoding (as
            ``VQModel.decode`` does by default; gradients pass straight through). Ignored for
            ``AutoencoderKL``.
        name: a name for reports.
    """

    family = "vae"
    output_range = (-1.0, 1.0)

    def __init__(
        self,
        vae: nn.Module,
        image_size: int | Sequence[int] | None = None,
        *,
        init: str = "random",
        quantize: bool = True,
        name: str | None = None,
    ) -> None:
        diffusers = require_diffusers()
        if isinstance(vae, diffusers.AutoencoderKL):
            self.kind = "kl"
        elif isinstance(vae, diffusers.VQModel):
            self.kind = "vq"
        else:
            raise TypeError(f"vae must be a diffusers AutoencoderKL or VQModel, got {type(vae).__name__}")
        if init not in ("random", "encoder"):
            raise ValueError(f"init must be 'random' or 'encoder', got {init!r}")
        cfg = vae.config
        self.vae = _freeze(vae)
        self.init = init
        self.quantize = bool(quantize)
        self.name = name or type(vae).__name__
        h, w = _image_hw(cfg.sample_size if image_size is None else image_size, "image_size")
        self.factor = 2 ** (len(cfg.block_out_channels) - 1)
        if h % self.factor or w % self.factor:
            raise ValueError(
                f"image_size {h}x{w} must be a multiple of the autoencoder's downsampling factor {self.factor}"
            )
        channels = cfg.latent_channels
        if self.kind == "vq" and getattr(cfg, "vq_embed_dim", None):
            channels = cfg.vq_embed_dim  # VQModel.decode takes the pre-quantisation embedding
        self.latent_shape = (int(channels), h // self.factor, w // self.factor)
        self.latent_dim = math.prod(self.latent_shape)
        self.image_shape = (int(cfg.out_channels), h, w)
        self.scaling_factor = float(cfg.scaling_factor)
        if not (math.isfinite(self.scaling_factor) and self.scaling_factor != 0):
            raise ValueError(f"the autoencoder's scaling_factor must be finite and non-zero, got {cfg.scaling_factor}")
        self.shift_factor = float(getattr(cfg, "shift_factor", None) or 0.0)
        mean, std = getattr(cfg, "latents_mean", None), getattr(cfg, "latents_std", None)
        if (mean is None) != (std is None):
            raise ValueError("the autoencoder config gives only one of latents_mean and latents_std")
        self.latents_mean = None if mean is None else torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.latents_std = None if std is None else torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
        for arg, t in (("latents_mean", self.latents_mean), ("latents_std", self.latents_std)):
            if t is not None and t.numel() != self.latent_shape[0]:
                raise ValueError(f"{arg} has {t.numel()} entries, expected {self.latent_shape[0]} latent channels")

    @classmethod
    def from_pretrained(
        cls,
        folder: str | os.PathLike,
        subfolder: str | None = None,
        *,
        image_size: int | Sequence[int] | None = None,
        init: str = "random",
        quantize: bool = True,
        name: str | None = None,
        **load_kwargs,
    ) -> "LatentDiffusionDecoder":
        """Load the autoencoder from a local folder (a model folder, or a pipeline folder with a
        ``vae``/``vqvae`` sub-folder) and wrap it. ``load_kwargs`` go to diffusers' ``from_pretrained``
        (e.g. ``torch_dtype``); ``local_files_only=True`` is always passed."""
        diffusers = require_diffusers()
        root = _local_folder(folder, subfolder)
        if subfolder is None and not (root / "config.json").is_file():
            subfolder = _autoencoder_subfolder(root)
        where = root / subfolder if subfolder else root
        config_path = where / "config.json"
        if not config_path.is_file():
            raise FileNotFoundError(f"no autoencoder config.json in {where}")
        try:
            class_name = json.loads(config_path.read_text()).get("_class_name")
        except (OSError, ValueError) as e:
            raise ValueError(f"{config_path} is not a readable JSON config: {e}") from None
        loaders = {"AutoencoderKL": diffusers.AutoencoderKL, "VQModel": diffusers.VQModel}
        if class_name not in loaders:
            raise ValueError(f"{config_path} describes {class_name!r}; expected one of {sorted(loaders)}")
        vae = loaders[class_name].from_pretrained(root, subfolder=subfolder, **_load_kwargs(load_kwargs))
        return cls(vae, image_size, init=init, quantize=quantize, name=name or f"{class_name}:{root.name}")

    # ---------------------------------------------------------------- the map

    def _unscale(self, z: Tensor) -> Tensor:
        if self.latents_mean is not None:
            return z * self.latents_std.to(z) / self.scaling_factor + self.latents_mean.to(z)
        return z / self.scaling_factor + self.shift_factor

    def _scale(self, z: Tensor) -> Tensor:
        if self.latents_mean is not None:
            return (z - self.latents_mean.to(z)) * self.scaling_factor / self.latents_std.to(z)
        return (z - self.shift_factor) * self.scaling_factor

    def decode_raw(self, latents: Tensor, conditions: Tensor | None = None) -> Tensor:
        if conditions is not None:
            raise ValueError(f"{self.name} takes no conditions, but conditions were given")
        z = self._unscale(latents.reshape(latents.shape[0], *self.latent_shape))
        z = z.to(_param_dtype(self.vae))
        if self.kind == "vq":
            out = self.vae.decode(z, force_not_quantize=not self.quantize).sample
        else:
            out = self.vae.decode(z).sample
        return out.float()

    def modules(self) -> list[nn.Module]:
        return [self.vae]

    def config(self) -> dict:
        cfg = {
            **super().config(),
            "latent_shape": list(self.latent_shape),
            "scaling_factor": self.scaling_factor,
            "shift_factor": self.shift_factor,
            "family": self.family,
        }
        if self.latents_mean is not None:
            cfg["latents_mean"] = self.latents_mean.flatten().tolist()
            cfg["latents_std"] = self.latents_std.flatten().tolist()
        if self.kind == "vq":
            cfg["quantize"] = self.quantize
        return cfg

    # ---------------------------------------------------------------- encoder start

    @torch.no_grad()
    def encoder_latents(self, images: Tensor) -> Tensor:
        """The encoder's mean latent for ``images`` ``[B, C, H, W]`` in [0, 1], scaled, as rows ``[B, D]``.

        For ``AutoencoderKL`` this is the posterior mean; for ``VQModel`` the pre-quantisation
        embedding. Decoding it gives the autoencoder's reconstruction of the image.
        """
        if not isinstance(images, Tensor) or images.dim() != 4 or tuple(images.shape[1:]) != self.image_shape:
            got = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
            raise ValueError(f"images must be [B, {', '.join(map(str, self.image_shape))}] in [0, 1], got {got}")
        if not images.is_floating_point() or not bool(torch.isfinite(images).all()):
            raise ValueError("images must be finite float values in [0, 1]")
        x = self.from_unit(images.to(self.device)).to(_param_dtype(self.vae))
        if self.kind == "vq":
            h = self.vae.encode(x).latents
        else:
            h = self.vae.encode(x).latent_dist.mean
        return self._scale(h.float()).reshape(images.shape[0], -1)

    @property
    def guided_starts(self) -> bool:
        """Whether each image's first start is a guess (the encoder's), not a draw: screening
        (``InversionSettings.screen``) keeps it."""
        return self.init == "encoder"

    def initial_latents(self, images: Tensor, rows_per_image: int, generator: torch.Generator | None = None) -> Tensor:
        """Starting rows for inverting ``images`` ``[B, C, H, W]``: ``[B * rows_per_image, D]``, image-major.

        With ``init="encoder"`` the first row of each image is its :meth:`encoder_latents` and
        the other rows are prior draws (from ``generator``); with ``init="random"`` all rows are
        prior draws, exactly as :meth:`sample_latents` gives them.
        """
        if not isinstance(rows_per_image, int) or rows_per_image < 1:
            raise ValueError(f"rows_per_image must be an integer >= 1, got {rows_per_image!r}")
        b = images.shape[0]
        z = self.sample_latents(b * rows_per_image, generator)
        if self.init == "encoder":
            from ronan_fast.autoencoder_start import encoder_latents_each  # its start is the same in any batch

            z = z.view(b, rows_per_image, -1).clone()
            z[:, 0] = encoder_latents_each(self, images).to(z)
            z = z.view(b * rows_per_image, -1)
        return z


# --------------------------------------------------------------------------- consistency model, one step


class OneStepSampler(GeneratorAdapter):
    """A consistency model sampled in one step: ``image = f(sigma_max * noise)``; the noise is optimised.

    The map is exactly what ``ConsistencyModelPipeline(unet, scheduler)(num_inference_steps=1,
    latents=noise)`` computes before post-processing (there one step adds no fresh noise):

    * ``CMStochasticIterativeScheduler.set_timesteps(1)`` gives the one sigma, ``sigma_max``
      (through ``_convert_to_karras``), and the model timestep ``t = sigma_to_t(sigma) =
      250 * log(sigma)``;
    * ``ConsistencyModelPipeline.prepare_latents``: ``x = noise * init_noise_sigma``;
    * ``CMStochasticIterativeScheduler.scale_model_input``: ``x_in = x / sqrt(sigma**2 + sigma_data**2)``;
    * ``CMStochasticIterativeScheduler.step`` with ``get_scalings_for_boundary_condition``:
      ``denoised = c_out * unet(x_in, t) + c_skip * x``, clamped to [-1, 1] when the scheduler's
      ``clip_denoised`` is set, where ``c_skip = sigma_data**2 / ((sigma - sigma_min)**2 +
      sigma_data**2)`` and ``c_out = (sigma - sigma_min) * sigma_data / sqrt(sigma**2 + sigma_data**2)``.

    The map is deterministic and differentiable (the clamp passes no gradient to saturated pixels;
    ``clip_denoised=False`` drops it). Output range (-1, 1).

    Args:
        unet: a loaded ``diffusers.UNet2DModel``; frozen and put in eval mode.
        scheduler: its ``diffusers.CMStochasticIterativeScheduler`` (only its config is read; it is
            not modified).
        class_label: for a class-conditional unet, the class used when inversion is given none.
        clip_denoised: override the scheduler's ``clip_denoised``.
        name: a name for reports.
    """

    #: a latent as wide as the image: the "consistency" inversion default (with the matrix-free polish)
    family = "consistency"
    output_range = (-1.0, 1.0)

    def __init__(
        self,
        unet: nn.Module,
        scheduler,
        *,
        class_label: int | None = None,
        clip_denoised: bool | None = None,
        name: str | None = None,
    ) -> None:
        diffusers = require_diffusers()
        if not isinstance(unet, diffusers.UNet2DModel):
            raise TypeError(f"unet must be a diffusers UNet2DModel, got {type(unet).__name__}")
        if not isinstance(scheduler, diffusers.CMStochasticIterativeScheduler):
            raise TypeError(f"scheduler must be a diffusers CMStochasticIterativeScheduler, got {type(scheduler).__name__}")
        self.unet = _freeze(unet)
        self.name = name or "ConsistencyModel"
        h, w = _image_hw(unet.config.sample_size, "unet.config.sample_size")
        if unet.config.in_channels != unet.config.out_channels:
            raise ValueError(
                f"the unet maps {unet.config.in_channels} to {unet.config.out_channels} channels; a consistency "
                "model's input and output must have the same channels"
            )
        self.latent_shape = (int(unet.config.in_channels), h, w)
        self.latent_dim = math.prod(self.latent_shape)
        self.image_shape = self.latent_shape
        self.num_classes = unet.config.num_class_embeds
        self.class_label = None if class_label is None else self._checked_label(class_label)
        # A private scheduler from the same config, so the caller's keeps its state.
        sched = diffusers.CMStochasticIterativeScheduler.from_config(scheduler.config)
        sched.set_timesteps(1)
        self.scheduler_config = dict(sched.config)
        self.sigma = sched.sigmas[0]  # float32, as the pipeline uses it
        self.timestep = sched.timesteps[0]  # float64, as the pipeline passes it to the unet
        self.init_noise_sigma = sched.init_noise_sigma
        self.sigma_data = sched.config.sigma_data
        self.c_skip, self.c_out = sched.get_scalings_for_boundary_condition(self.sigma)
        self.clip = bool(sched.config.clip_denoised if clip_denoised is None else clip_denoised)

    def _checked_label(self, label) -> int:
        if self.num_classes is None:
            raise ValueError("class_label was given but the unet is not class-conditional (num_class_embeds is None)")
        if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < self.num_classes:
            raise ValueError(f"class_label must be an int in [0, {self.num_classes}), got {label!r}")
        return label

    def with_class(self, label: int) -> "OneStepSampler":
        """A copy of this adapter whose class, when inversion is given none, is ``label``; the
        unet is shared, not copied."""
        new = copy.copy(self)
        new.class_label = self._checked_label(label)
        return new

    @classmethod
    def from_pretrained(
        cls,
        folder: str | os.PathLike,
        *,
        class_label: int | None = None,
        clip_denoised: bool | None = None,
        name: str | None = None,
        **load_kwargs,
    ) -> "OneStepSampler":
        """Load ``unet/`` and ``scheduler/`` from a local folder as ``ConsistencyModelPipeline.save_pretrained``
        writes it. ``load_kwargs`` go to ``UNet2DModel.from_pretrained``; ``local_files_only=True`` is always passed."""
        diffusers = require_diffusers()
        root = _local_folder(folder)
        for sub in ("unet", "scheduler"):
            _local_folder(root, sub)
        unet = diffusers.UNet2DModel.from_pretrained(root, subfolder="unet", **_load_kwargs(load_kwargs))
        scheduler = diffusers.CMStochasticIterativeScheduler.from_pretrained(
            root, subfolder="scheduler", local_files_only=True
        )
        return cls(unet, scheduler, class_label=class_label, clip_denoised=clip_denoised,
                   name=name or f"ConsistencyModel:{root.name}")

    # ---------------------------------------------------------------- the map

    def _labels(self, conditions: Tensor | None, rows: int) -> Tensor | None:
        if self.num_classes is None:
            if conditions is not None:
                raise ValueError(f"{self.name} is unconditional, but conditions were given")
            return None
        if conditions is None:
            if self.class_label is None:
                raise ValueError(f"{self.name} is class-conditional: give class_label or per-image conditions")
            return torch.full((rows,), self.class_label, dtype=torch.int64, device=self.device)
        return torch.as_tensor(conditions, device=self.device).long()

    def decode_raw(self, latents: Tensor, conditions: Tensor | None = None) -> Tensor:
        labels = self._labels(conditions, latents.shape[0])
        noise = latents.reshape(latents.shape[0], *self.latent_shape).to(_param_dtype(self.unet))
        sample = noise * self.init_noise_sigma
        scaled = sample / ((self.sigma**2 + self.sigma_data**2) ** 0.5)
        model_output = self.unet(scaled, self.timestep, class_labels=labels, return_dict=False)[0]
        denoised = self.c_out * model_output + self.c_skip * sample
        if self.clip:
            denoised = denoised.clamp(-1, 1)
        return denoised.float()

    def modules(self) -> list[nn.Module]:
        return [self.unet]

    def config(self) -> dict:
        keys = ("num_train_timesteps", "sigma_min", "sigma_max", "sigma_data", "rho")
        cfg = {
            **super().config(),
            "scheduler": {k: self.scheduler_config[k] for k in keys},
            "clip_denoised": self.clip,
            "family": self.family,
        }
        if self.class_label is not None:
            cfg["class_label"] = self.class_label
        return cfg

    # ---------------------------------------------------------------- conditions

    def sample_conditions(self, n: int, generator: torch.Generator | None = None) -> Tensor | None:
        if self.num_classes is None:
            return None
        if self.class_label is not None:
            return torch.full((n,), self.class_label, dtype=torch.int64, device=self.device)
        dev = generator.device if generator is not None else "cpu"
        return torch.randint(0, self.num_classes, (n,), generator=generator, device=dev).to(self.device)

    def row_conditions(self, conditions: Tensor | None, batch: int, restarts: int) -> tuple[Tensor | None, int]:
        if self.num_classes is None:
            return super().row_conditions(conditions, batch, restarts)
        if conditions is None:
            if self.class_label is None:
                raise ValueError(
                    f"{self.name} is class-conditional: pass each image's class as conditions, or set class_label"
                )
            return torch.full((batch * restarts,), self.class_label, dtype=torch.int64, device=self.device), restarts
        conditions = torch.as_tensor(conditions, device=self.device)
        if conditions.dim() != 1 or conditions.shape[0] != batch:
            raise ValueError(f"conditions must be one class per image ([{batch}]), got shape {tuple(conditions.shape)}")
        if conditions.is_floating_point() or (
            conditions.numel() and (int(conditions.min()) < 0 or int(conditions.max()) >= self.num_classes)
        ):
            raise ValueError(f"conditions must be integer classes in [0, {self.num_classes})")
        return conditions.long().repeat_interleave(restarts, dim=0), restarts


def from_folder(folder: str | os.PathLike, *, class_label: int | None = None) -> GeneratorAdapter:
    """The adapter for a saved diffusers model folder, chosen by what it holds.

    * ``unet/`` and ``scheduler/`` with a ``CMStochasticIterativeScheduler`` (as
      ``ConsistencyModelPipeline.save_pretrained`` writes): :meth:`OneStepSampler.from_pretrained`;
    * an autoencoder (``AutoencoderKL`` / ``VQModel``) folder, or a pipeline folder with a ``vae/``
      or ``vqvae/`` one: :meth:`LatentDiffusionDecoder.from_pretrained` (random starts, the
      config's image size).

    ``class_label``: the class of a class-conditional consistency model (``ValueError`` for any
    other model).

    Raises ``FileNotFoundError`` (not a folder, or none of these in it) or ``ValueError`` (a
    config of another kind), naming the folder and what was looked for.
    """
    root = _local_folder(folder)
    sched = root / "scheduler" / "scheduler_config.json"
    if (root / "unet").is_dir() and sched.is_file():
        try:
            kind = json.loads(sched.read_text()).get("_class_name")
        except (OSError, ValueError) as e:
            raise ValueError(f"{sched} is not a readable JSON config: {e}") from None
        if kind == "CMStochasticIterativeScheduler":
            return OneStepSampler.from_pretrained(root, class_label=class_label)
        if _autoencoder_subfolder(root) is None:
            raise ValueError(f"{root} holds a unet with a {kind!r} scheduler: only one-step consistency models "
                             "(CMStochasticIterativeScheduler) are inverted from their noise; for a latent diffusion "
                             "pipeline the folder needs its vae/ or vqvae/ autoencoder")
    if (root / "config.json").is_file() or _autoencoder_subfolder(root) is not None:
        if class_label is not None:
            raise ValueError(f"{root} holds a latent diffusion model's autoencoder, which takes no class: "
                             "class_label applies to a class-conditional consistency model")
        return LatentDiffusionDecoder.from_pretrained(root)
    raise FileNotFoundError(f"{root} holds no diffusers model this package can invert: expected unet/ and scheduler/ "
                            "of a consistency model, or an autoencoder config.json (itself or in vae/ or vqvae/)")
