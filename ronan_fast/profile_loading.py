"""What a belonging profile names beside itself, rebuilt for :meth:`Attributor.from_profile
<ronan_fast.attributor.Attributor.from_profile>`: its reference model and its warm start."""

from __future__ import annotations

import math

from ronan_fast.adapters import GeneratorAdapter
from ronan_fast.profile import BelongingProfile, ProfileError

__all__ = ["load_profile_encoder"]


def _profile_reference(profile: BelongingProfile):
    """What ``reference="auto"`` means for ``profile``: None if uncalibrated, else the reference
    model it records (the bundled one, a zoo model), or the bundled one for a profile that
    records none (made before profiles recorded it)."""
    if not profile.calibrated:
        return None
    spec = (profile.reference_source or {}).get("spec", "default")
    if spec == "default":
        return "default"
    from ronan_fast.zoo import ZOO, zoo_adapter

    if spec in ZOO:
        adapter = zoo_adapter(spec)
        adapter.source = {"spec": spec}
        return adapter
    raise ProfileError(f"the profile was calibrated with reference model {spec!r} ({profile.reference_name}), which "
                       "cannot be built here from its name: pass it as reference=")


def load_profile_encoder(profile: BelongingProfile, path, generator: GeneratorAdapter):
    """The encoder a warm-started profile read from ``path`` was fitted with (None for a profile
    without one): the file beside it (``PROFILE.encoder.safetensors``), checked against the
    model and the profile's digest; :class:`~ronan_fast.profile.ProfileError` when it is missing
    or another."""
    if profile.warm_start is None:
        return None
    kind = (profile.warm_start.get("recipe") or {}).get("kind")
    if kind == "mapping":
        return _rebuild_mapping_start(profile, generator, path)
    if kind == "autoencoder":
        return _rebuild_autoencoder_start(profile, generator)
    if path is None:
        raise ProfileError("the profile was fitted with a learned warm start: give the profile as a path (its "
                           "encoder file sits beside it) or pass warm_start=ronan_fast.warmstart.load_encoder(...)")
    return _encoder_beside(path, generator, profile.warm_start["sha256"], "the learned warm start", "the encoder")


def _encoder_beside(path, generator: GeneratorAdapter, digest: str, fitted_with: str, noun: str):
    """The encoder file beside the profile at ``path`` (``PROFILE.encoder.safetensors``), trained
    for ``generator`` and with the recorded ``digest``; else :class:`~ronan_fast.profile.ProfileError`
    naming the file (``fitted_with`` and ``noun`` say which encoder it should have been)."""
    from ronan_fast.warmstart import EncoderError, encoder_path, load_encoder

    where = encoder_path(path)
    try:
        enc = load_encoder(where, generator)
    except EncoderError as e:
        raise ProfileError(f"the profile was fitted with {fitted_with} {where}: {e}") from None
    if enc.digest() != digest:
        raise ProfileError(f"{where} is not {noun} the profile was fitted with (sha256 "
                           f"{enc.digest()[:12]}, the profile's {digest[:12]})")
    return enc


def _rebuild_autoencoder_start(profile: BelongingProfile, generator: GeneratorAdapter):
    """The :class:`~ronan_fast.autoencoder_start.AutoencoderStart` a profile was fitted with,
    rebuilt for ``generator`` (a latent-diffusion decoder) and checked against the profile's digest."""
    from ronan_fast.autoencoder_start import autoencoder_start

    try:
        start = autoencoder_start(generator)
    except TypeError as e:
        raise ProfileError(f"the profile was fitted with starts from an autoencoder's own encoder: {e}") from None
    return _as_recorded(start, profile, generator, "the autoencoder start", ": another autoencoder")


def _rebuild_mapping_start(profile: BelongingProfile, generator: GeneratorAdapter, path=None):
    """The :class:`~ronan_fast.mapping_start.MappingStart` a profile was fitted with, rebuilt from
    its recorded recipe for ``generator`` (a module with ``mapping_net`` and ``synthesis``), with
    its encoder of ``w`` from the file beside the profile where the recipe names one, and
    checked against the profile's digest."""
    from ronan_fast.inversion.settings import InversionSettings
    from ronan_fast.mapping_start import W_FIRST_DONE, mapping_start

    r = profile.warm_start["recipe"]
    try:
        ms = mapping_start(generator, w_settings=InversionSettings.from_dict(r["w_settings"]),
                           mapping_steps=r["mapping_steps"], mapping_starts=r["mapping_starts"], seed=r["seed"],
                           # a recipe without it was made before the choice existed: Euclidean in w
                           solve_metric=r.get("solve_metric", "w"), w_space=r.get("w_space", "w"),
                           # without it: the lowest error in the solve's metric
                           solve_choice=r.get("solve_choice", "metric"),
                           # without them: the full search over w for every image
                           w_first_steps=r.get("w_first_steps", 0), w_first_done=r.get("w_first_done", W_FIRST_DONE),
                           w_full_within=r.get("w_full_within", math.inf),
                           # without it: the full search over w without a threshold
                           w_full_stops=r.get("w_full_stops", False),
                           # without it: no image settled by the search over w
                           w_settle_above=r.get("w_settle_above", math.inf))
    except (TypeError, ValueError, KeyError) as e:
        raise ProfileError(f"the profile was fitted with starts through a mapping network, which cannot be rebuilt "
                           f"for {generator.name}: {e}; pass warm_start=ronan_fast.mapping_start.MappingStart(...)"
                           ) from None
    if r.get("w_encoder") is not None:
        if path is None:
            raise ProfileError("the profile was fitted with starts through a mapping network and an encoder of w: "
                               "give the profile as a path (the encoder file sits beside it) or pass "
                               "warm_start=ronan_fast.mapping_start.MappingStart(..., w_encoder=...)")
        ms = ms.with_w_encoder(_encoder_beside(path, ms.w_generator, r["w_encoder"], "the encoder of w",
                                               "the encoder of w"))
    return _as_recorded(ms, profile, generator, "the mapping start")


def _as_recorded(start, profile: BelongingProfile, generator: GeneratorAdapter, what: str, why: str = ""):
    """``start`` (rebuilt for ``generator``) if its digest is the one the profile recorded, else
    :class:`~ronan_fast.profile.ProfileError`."""
    recorded = profile.warm_start["sha256"]
    if start.digest() != recorded:
        raise ProfileError(f"{what} rebuilt for {generator.name} is not the one the profile was fitted with (sha256 "
                           f"{start.digest()[:12]}, the profile's {recorded[:12]}){why}")
    return start
