"""ronan_fast: was this image made by this model? Fast alteration-free origin attribution.

An implementation of RONAN (Wang et al., NeurIPS 2023): invert the model to reconstruct the
image (reconstruction loss), divide by a reference model's loss (calibration), and compare the
result with the model's own images by a one-sided Grubbs test (the belonging profile).

    >>> from ronan_fast import Attributor, LatentGenerator
    >>> attributor = Attributor(LatentGenerator(my_module, latent_shape=128))  # doctest: +SKIP
    >>> attributor.fit(n=100)                                                  # doctest: +SKIP
    >>> attributor.attribute(["suspect.png"]).summary()                        # doctest: +SKIP

The names below are imported on first use, so ``import ronan_fast`` stays cheap.
"""

from __future__ import annotations

import importlib

__version__ = "0.2.0"

_EXPORTS = {
    # attribution
    "Attributor": "ronan_fast.attributor",
    "AttributionResult": "ronan_fast.attributor",
    # belonging profile and test
    "BelongingProfile": "ronan_fast.profile",
    "ProfileError": "ronan_fast.profile",
    "ProfileMismatchError": "ronan_fast.profile",
    "DEFAULT_RULE": "ronan_fast.profile",
    "default_rule": "ronan_fast.profile",
    "RULES": "ronan_fast.profile",
    "profile_outliers": "ronan_fast.profile",
    "grubbs_critical_value": "ronan_fast.grubbs",
    "grubbs_p_value": "ronan_fast.grubbs",
    "grubbs_statistic": "ronan_fast.grubbs",
    # calibration
    "calibrate": "ronan_fast.calibration",
    "default_generator": "ronan_fast.calibration",
    "default_reference": "ronan_fast.calibration",
    # generators
    "GeneratorAdapter": "ronan_fast.adapters",
    "LatentGenerator": "ronan_fast.adapters",
    "ConditionalGenerator": "ronan_fast.adapters",
    "GeneratorOutputError": "ronan_fast.adapters",
    "channels_last": "ronan_fast.adapters",
    "fold_batchnorm": "ronan_fast.adapters",
    # inversion
    "invert": "ronan_fast.inversion",
    "InversionSettings": "ronan_fast.inversion",
    "InversionResult": "ronan_fast.inversion",
    # edits of images (edit-aware profiles)
    "apply_edit": "ronan_fast.edits",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'ronan_fast' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
