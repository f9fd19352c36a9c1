"""Calibration (Eq. 2): divide a model's reconstruction loss by a reference model's.

Some images are simply easier to reconstruct than others (flat, simple, small), whatever model
is asked. Dividing the model's loss ``A(M, x)`` by the loss ``A(M_r, x)`` of a reference model
``M_r`` trained on other data removes most of that image-dependent difficulty:

    A'(M, x) = A(M, x) / A(M_r, x).

This module holds the division and the bundled default generator and reference model.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from ronan_fast.adapters import LatentGenerator

__all__ = ["calibrate", "default_generator", "default_reference", "check_reference_fits", "DEFAULT_GENERATOR_NAME",
           "DEFAULT_REFERENCE_NAME"]

DEFAULT_GENERATOR_NAME = "default (DCGAN, Fashion-MNIST)"
DEFAULT_REFERENCE_NAME = "reference (DCGAN, MNIST digits)"


def calibrate(loss, reference_loss):
    """The calibrated reconstruction loss ``loss / reference_loss``, elementwise.

    Accepts numbers, sequences, NumPy arrays or torch tensors (the result follows ``loss``'s
    kind; a tensor result is float64). Raises ``ValueError`` when a reference loss is not a
    finite number > 0 (the ratio would be meaningless) or a loss is negative or not finite.
    """
    if isinstance(loss, Tensor) or isinstance(reference_loss, Tensor):
        a = torch.as_tensor(loss).detach().double()
        r = torch.as_tensor(reference_loss, device=a.device).detach().double()
        if a.shape != r.shape and r.dim() and a.dim():
            raise ValueError(f"loss {tuple(a.shape)} and reference_loss {tuple(r.shape)} differ in shape")
        _check(a.cpu().numpy(), r.cpu().numpy())
        return a / r
    scalar = np.isscalar(loss) and np.isscalar(reference_loss)
    a = np.asarray(loss, dtype=np.float64)
    r = np.asarray(reference_loss, dtype=np.float64)
    if a.shape != r.shape and r.ndim and a.ndim:
        raise ValueError(f"loss {a.shape} and reference_loss {r.shape} differ in shape")
    _check(a, r)
    out = a / r
    return float(out) if scalar else out


def _check(a: np.ndarray, r: np.ndarray) -> None:
    bad_r = ~(np.isfinite(r) & (r > 0))
    if bad_r.any():
        where = np.flatnonzero(np.atleast_1d(bad_r))[:10].tolist()
        vals = np.atleast_1d(r)[where].tolist()
        raise ValueError(
            f"reference_loss must be finite and > 0 to calibrate, got {vals} at index {where}; "
            "a reference model that reconstructs an image exactly cannot calibrate it"
        )
    bad_a = ~(np.isfinite(a) & (a >= 0))
    if bad_a.any():
        where = np.flatnonzero(np.atleast_1d(bad_a))[:10].tolist()
        raise ValueError(f"loss must be finite and >= 0, got {np.atleast_1d(a)[where].tolist()} at index {where}")


def _default_adapter(module, name: str) -> LatentGenerator:
    from ronan_fast import default

    return LatentGenerator(
        module,
        latent_shape=default.LATENT_SHAPE,
        output_range=default.OUTPUT_RANGE,
        image_shape=default.IMAGE_SHAPE,
        family=default.FAMILY,
        name=name,
    )


def default_generator(device: str | torch.device = "cpu") -> LatentGenerator:
    """The bundled default generator: a DCGAN trained on Fashion-MNIST (``z [32] -> 1x28x28``)."""
    from ronan_fast import default

    adapter = _default_adapter(default.default_generator_module(device=device), DEFAULT_GENERATOR_NAME)
    adapter.source = {"spec": "default"}
    return adapter


def default_reference(device: str | torch.device = "cpu") -> LatentGenerator:
    """The bundled reference model: the same DCGAN architecture trained on MNIST-style digits.

    Used by ``Attributor(reference="default")`` to calibrate reconstruction losses. It suits
    small greyscale images; for other generators pass a reference model of your own (same kind
    of generator, trained on other data).
    """
    from ronan_fast import default

    adapter = _default_adapter(default.default_reference_module(device=device), DEFAULT_REFERENCE_NAME)
    adapter.source = {"spec": "default"}
    return adapter


def check_reference_fits(generator, reference, option: str = "reference") -> None:
    """Refuse the bundled reference model for a generator whose images it does not fit.

    The bundled reference makes 1x28x28 greyscale images: calibrating another model's images with
    it would first resize and recolour them, and the calibrated loss would measure that more than
    the image. ``option`` names how the caller passes another (``reference`` in Python,
    ``--reference`` on the command line)."""
    from ronan_fast import default

    if getattr(reference, "source", None) != {"spec": "default"}:
        return
    have, want = tuple(generator.image_shape), tuple(default.IMAGE_SHAPE)
    if have != want:
        shape = "x".join(str(v) for v in have)
        raise ValueError(
            f"the bundled reference model makes {want[0]}x{want[1]}x{want[2]} greyscale images but {generator.name} "
            f"makes {shape}: it does not fit. Pass {option}= a generator of {shape} images trained on other data "
            f"(the same kind of model as {generator.name}), or {option}=None for uncalibrated attribution"
            if option == "reference" else
            f"the bundled reference model makes {want[0]}x{want[1]}x{want[2]} greyscale images but {generator.name} "
            f"makes {shape}: it does not fit. Give a reference model of {shape} images trained on other data with "
            f"{option} SPEC (and --reference-weights), or {option} none for uncalibrated attribution")
