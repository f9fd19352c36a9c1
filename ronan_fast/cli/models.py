"""Building the model and the reference model from command-line specs, safely."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from pathlib import Path

from ronan_fast.cli.common import UsageError, positive_int


def add_model_args(p: argparse.ArgumentParser, with_reference_choice: str) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", required=True, metavar="SPEC",
                   help="the generator: 'default' (the bundled DCGAN on Fashion-MNIST), a model of the "
                        "package's zoo by name (e.g. onestep-fmnist; see ronan_fast.zoo.ZOO), 'diffusers:FOLDER' "
                        "(a saved consistency-model pipeline, or a latent diffusion model's autoencoder; needs "
                        "the diffusers extra) or 'package.module:factory', a function with no arguments returning "
                        "a torch.nn.Module (z -> image) or a ronan_fast GeneratorAdapter; the current folder is "
                        "importable")
    g.add_argument("--weights", metavar="FILE",
                   help="state dict to load into the model: .safetensors, or a file for torch.load(weights_only=True)")
    g.add_argument("--latent-shape", type=positive_int, nargs="+", metavar="N",
                   help="shape of one latent when the factory returns a torch module, e.g. 128 or 100 1 1")
    g.add_argument("--output-range", type=float, nargs=2, metavar=("LOW", "HIGH"),
                   help="range of the module's output (default -1 1, i.e. tanh; use 0 1 for sigmoid)")
    g.add_argument("--name", metavar="NAME",
                   help="the model's name in every message and report (default: the name the profile was fitted "
                        "under, else the zoo name or factory)")
    g.add_argument("--class-label", type=int, metavar="K",
                   help="the class of a class-conditional model (a conditional zoo or factory generator, or a "
                        "class-conditional diffusers consistency model): every image is generated and inverted "
                        "as class K. Without it a conditional generator's class is searched (all classes "
                        "tried) and a conditional diffusers model is refused. A profile fitted with a class is "
                        "used with the same class")
    r = p.add_argument_group("reference model (calibration)")
    r.add_argument("--reference", default=with_reference_choice, metavar="SPEC",
                   help="reference model dividing the reconstruction loss: 'default' (the bundled DCGAN on MNIST "
                        "digits), a zoo model's name, 'diffusers:FOLDER', 'none' (uncalibrated) or "
                        "'package.module:factory'"
                        + (" ('auto': the reference model the profile was fitted with, rebuilt from what it "
                           "records; none if it is uncalibrated)"
                           if with_reference_choice == "auto" else
                           " (the bundled one only for 1x28x28 greyscale models: give your own otherwise)")
                        + f" (default: {with_reference_choice})")
    r.add_argument("--reference-weights", metavar="FILE", help="state dict for a factory reference model")
    r.add_argument("--reference-latent-shape", type=positive_int, nargs="+", metavar="N",
                   help="latent shape of a factory reference module (default: --latent-shape)")
    r.add_argument("--reference-output-range", type=float, nargs=2, metavar=("LOW", "HIGH"),
                   help="output range of a factory reference module (default: --output-range)")


def import_factory(spec: str, option: str):
    if ":" not in spec:
        from ronan_fast.zoo import ZOO

        raise UsageError(f"{option} {spec!r}: expected 'default', a zoo model ({', '.join(ZOO)}) or "
                         "'package.module:factory'")
    mod_name, _, attr = spec.partition(":")
    if not mod_name or not attr:
        raise UsageError(f"{option} {spec!r}: expected 'package.module:factory'")
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    try:
        module = importlib.import_module(mod_name)
    except ImportError as e:
        raise UsageError(f"{option} {spec!r}: cannot import module {mod_name!r} ({e})") from None
    except Exception as e:
        raise UsageError(f"{option} {spec!r}: importing {mod_name!r} failed ({type(e).__name__}: {e})") from None
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise UsageError(f"{option} {spec!r}: module {mod_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise UsageError(f"{option} {spec!r}: {attr!r} is not callable")
    return obj


#: tensor dtypes a weights file may hold: floating point, integer (e.g. BatchNorm's step counter) and bool
_WEIGHT_DTYPES = ("float16", "bfloat16", "float32", "float64", "uint8", "int8", "int16", "int32", "int64", "bool")


def _short(e: BaseException) -> str:
    """The first sentence of an error from a reader, on one line, without any advice it gives."""
    text = " ".join(str(e).split())
    if not text:
        return type(e).__name__
    first = text.split(". ")[0].rstrip(".")
    if "weights_only" in first or "pickle" in first.lower():  # torch's advice, never passed on
        return type(e).__name__
    return first[:160]


def _refusal(e: BaseException) -> str:
    """Why torch's weights-only unpickler refused a file, without torch's advice to load it otherwise."""
    import re

    text = str(e)
    found = re.search(r"GLOBAL ([A-Za-z_][\w.]*)", text)
    if found:
        return f"it holds a Python object ({found.group(1)}) that torch.load(weights_only=True) does not build"
    found = re.search(r"Unsupported operand (\d+)", text)
    if found:
        return f"it uses a pickle instruction (opcode {found.group(1)}) that torch.load(weights_only=True) does not run"
    return "it holds Python objects that torch.load(weights_only=True) does not build"


def load_state_dict_file(path: str | os.PathLike, option: str = "--weights") -> dict:
    """Read a state dict without unpickling: safetensors, or ``torch.load(weights_only=True)``.

    Whatever the file holds, the result is a dict of names to tensors or a :class:`UsageError`
    with one line naming the file and what is wrong: not found, not a regular file, not a
    safetensors file (or a truncated one), not a weights-only torch file (it holds Python
    objects, which are never built, or it is truncated or random bytes), not a state dict, or a
    tensor of a dtype weights cannot have. torch's own messages are not passed on: they advise
    loading with ``weights_only=False``, which would run code from the file.
    """
    import pickle
    import stat
    import warnings

    import torch

    from ronan_fast.imageio import display_path

    p = Path(os.fsdecode(path)) if isinstance(path, bytes) else Path(path)
    where = f"{option} {display_path(p)}"
    try:
        mode = os.stat(p).st_mode
    except (FileNotFoundError, NotADirectoryError):
        raise UsageError(f"{where}: " + ("a symbolic link to a missing file" if os.path.lexists(p)
                                          else "file not found")) from None
    except (OSError, ValueError) as e:
        raise UsageError(f"{where}: cannot read ({getattr(e, 'strerror', None) or type(e).__name__})") from None
    if stat.S_ISDIR(mode):
        raise UsageError(f"{where}: is a folder, not a weights file")
    if not stat.S_ISREG(mode):
        raise UsageError(f"{where}: not a regular file (a FIFO, device or socket is never read)")
    try:
        with open(p, "rb") as f:
            head = f.read(16)
    except OSError as e:
        raise UsageError(f"{where}: cannot read ({e.strerror or type(e).__name__})") from None
    looks_zip = head.startswith(b"PK\x03\x04")
    looks_safetensors = len(head) >= 9 and head[8:9] == b"{"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch warns about pickle protocols; the outcome says all
        if p.suffix.lower() == ".safetensors":
            try:
                from safetensors.torch import load_file

                sd = load_file(str(p))
            except MemoryError:
                raise UsageError(f"{where}: too large to load into memory") from None
            except Exception as e:
                hint = "; it looks like a torch file: name it .pt" if looks_zip else ""
                raise UsageError(f"{where}: not a safetensors file, or a truncated one ({_short(e)}){hint}") from None
        else:
            looks_torch = looks_zip or head.startswith(b"\x80")  # torch.save's zip, or its older pickle
            try:
                sd = torch.load(p, map_location="cpu", weights_only=True)
            except MemoryError:
                raise UsageError(f"{where}: too large to load into memory") from None
            except Exception as e:
                refused = isinstance(e, pickle.UnpicklingError) and "weights only load failed" in str(e).lower()
                if refused and not looks_safetensors:  # read as a pickle, and refused
                    raise UsageError(f"{where}: not a weights-only torch file: {_refusal(e)}; nothing in it was "
                                     "run. Save the state dict alone (torch.save(model.state_dict(), FILE)) or as "
                                     ".safetensors") from None
                hint = "; it looks like a safetensors file: name it .safetensors" if looks_safetensors else ""
                reason = ("an empty file" if not head else _short(e) if looks_torch
                          else "it is neither a zip archive nor a pickle, as torch.save writes")
                raise UsageError(f"{where}: not a torch weights file, or a truncated one ({reason}){hint}") from None
    if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict):
        raise UsageError(f"{where}: not a state dict (names -> tensors) but a {type(sd).__name__}")
    for k, v in sd.items():
        if not isinstance(k, str):
            raise UsageError(f"{where}: not a state dict (names -> tensors): a key is a {type(k).__name__}")
        if not isinstance(v, torch.Tensor):
            raise UsageError(f"{where}: not a state dict (names -> tensors): {display_path(k)[:80]!r} holds a "
                             f"{type(v).__name__}, not a tensor")
        if v.layout != torch.strided or v.is_quantized or str(v.dtype).removeprefix("torch.") not in _WEIGHT_DTYPES:
            kind = "quantized " if v.is_quantized else ("" if v.layout == torch.strided else f"{v.layout} ")
            raise UsageError(f"{where}: tensor {display_path(k)[:80]!r} is a {kind}{v.dtype} tensor; weights must "
                             "be floating point, integer or bool tensors")
    return sd


def apply_state_dict(module, sd: dict, path, option: str = "--weights") -> None:
    """Load ``sd`` into ``module``; a clear error naming the file and the keys that do not fit."""
    own = module.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    shapes = [f"{k} (file {tuple(sd[k].shape)}, model {tuple(own[k].shape)})"
              for k in own if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        def few(items):
            return ", ".join(items[:8]) + (f" and {len(items) - 8} more" if len(items) > 8 else "")

        parts = []
        if missing:
            parts.append(f"missing keys: {few(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {few(unexpected)}")
        if shapes:
            parts.append(f"shape mismatches: {few(shapes)}")
        raise UsageError(f"{option} {path}: the weights do not fit the model ({'; '.join(parts)})")
    module.load_state_dict(sd, strict=True)


def spec_kind(spec: str) -> str:
    """What a ``--model``/``--reference`` spec names: "diffusers" (``diffusers:FOLDER``), "bundled"
    ('default' or a zoo model's name) or "factory" (``package.module:factory``)."""
    from ronan_fast.zoo import ZOO

    if spec.startswith("diffusers:"):
        return "diffusers"
    return "bundled" if spec == "default" or spec in ZOO else "factory"


def build_generator(spec: str, weights, latent_shape, output_range, option: str = "--model", role: str = "model",
                    class_label: int | None = None):
    """The adapter for a ``--model``/``--reference`` spec: 'default', a zoo model's name, or a
    factory path; with ``class_label`` (``--class-label``), a class-conditional one fixed to that class."""
    adapter = build_adapter(spec, weights, latent_shape, output_range, option, role, class_label)
    adapter.source = _source(spec, weights, latent_shape, output_range)
    if class_label is None or spec_kind(spec) == "diffusers":  # from_folder took the class
        return adapter
    if not callable(getattr(adapter, "with_class", None)) or getattr(adapter, "num_classes", None) is None:
        raise UsageError(f"--class-label {class_label}: {option} {spec} is not class-conditional")
    try:
        fixed = adapter.with_class(class_label)
    except ValueError as e:
        raise UsageError(f"--class-label {class_label}: {e}") from None
    fixed.source = adapter.source
    return fixed


def build_adapter(spec, weights, latent_shape, output_range, option, role, class_label):
    from torch import nn

    from ronan_fast.adapters import GeneratorAdapter, LatentGenerator
    from ronan_fast.zoo import ZOO

    wopt = "--weights" if option == "--model" else "--reference-weights"
    kind = spec_kind(spec)
    if kind == "diffusers":
        if latent_shape is not None or output_range is not None or weights is not None:
            raise UsageError(f"{option} {spec}: a diffusers folder holds its own weights and shapes; drop "
                             f"{wopt}, --latent-shape and --output-range")
        from ronan_fast import diffusers_adapters

        try:
            adapter = diffusers_adapters.from_folder(spec[len("diffusers:"):], class_label=class_label)
        except ImportError as e:
            raise UsageError(f"{option} {spec}: {e}") from None
        except (OSError, ValueError) as e:  # FileNotFoundError is an OSError
            raise UsageError(f"{option} {spec}: {e}" if class_label is None
                             else f"{option} {spec} with --class-label {class_label}: {e}") from None
        if getattr(adapter, "num_classes", None) is not None and getattr(adapter, "class_label", 0) is None:
            raise UsageError(f"{option} {spec}: the model is class-conditional ({adapter.num_classes} classes): "
                             "give its class with --class-label K")
        return adapter
    if kind == "bundled":
        if latent_shape is not None or output_range is not None:
            raise UsageError(f"{option} {spec} has a fixed latent shape and output range; "
                             "--latent-shape/--output-range apply to factory models")
        from ronan_fast import calibration, zoo

        try:
            if spec in ZOO:
                adapter = zoo.zoo_adapter(spec)
            else:
                adapter = calibration.default_generator() if role == "model" else calibration.default_reference()
        except FileNotFoundError as e:
            raise UsageError(f"{option} {spec}: {e}") from None
        if weights is not None:
            if not hasattr(adapter, "module"):
                raise UsageError(f"{wopt}: {spec} is a diffusers model saved with its weights; it takes no {wopt}")
            apply_state_dict(adapter.module, load_state_dict_file(weights, wopt), weights, wopt)
        return adapter
    factory = import_factory(spec, option)
    try:
        obj = factory()
    except Exception as e:
        raise UsageError(f"{option} {spec!r}: the factory raised {type(e).__name__}: {e}") from None
    if isinstance(obj, GeneratorAdapter):
        if latent_shape is not None or output_range is not None:
            raise UsageError(f"{option} {spec!r} returned a GeneratorAdapter, which sets its own latent shape and "
                             "output range; drop --latent-shape/--output-range")
        if weights is not None:
            mods = obj.modules()
            if len(mods) != 1:
                raise UsageError(f"{wopt}: the adapter from {spec!r} has {len(mods)} modules; load its weights in "
                                 "the factory instead")
            apply_state_dict(mods[0], load_state_dict_file(weights, wopt), weights, wopt)
        return obj
    if isinstance(obj, nn.Module):
        if latent_shape is None:
            shape_option = "--latent-shape" if role == "model" else "--reference-latent-shape (or --latent-shape)"
            raise UsageError(f"{option} {spec!r} returned a torch module: give its latent shape with {shape_option}")
        if weights is not None:
            apply_state_dict(obj, load_state_dict_file(weights, wopt), weights, wopt)
        try:
            return LatentGenerator(obj, tuple(latent_shape), output_range=tuple(output_range or (-1.0, 1.0)),
                                   name=spec.rpartition(":")[2])
        except Exception as e:
            raise UsageError(f"{option} {spec!r}: cannot use the module as a generator "
                             f"({type(e).__name__}: {e})") from None
    raise UsageError(f"{option} {spec!r}: the factory returned {type(obj).__name__}, expected a torch.nn.Module "
                     "or a ronan_fast GeneratorAdapter")


def reference_from_profile(profile) -> tuple[str, str | None, list | None, list | None]:
    """What ``--reference auto`` means for ``profile``: the spec, weights, latent shape and output
    range of the reference model it records ("none" if uncalibrated; the bundled model, or the
    zoo model of its name, for a profile that records no source)."""
    from ronan_fast.zoo import ZOO

    if not profile.calibrated:
        return "none", None, None, None
    src = profile.reference_source
    if src is None:
        return (profile.reference_name if profile.reference_name in ZOO else "default"), None, None, None
    return src["spec"], src.get("weights"), src.get("latent_shape"), src.get("output_range")


def _check_weights_hash(source: dict, option: str) -> None:
    want = source.get("weights_sha256")
    path = source.get("weights")
    if want is None or path is None:
        return
    if not Path(path).is_file():
        raise UsageError(f"the profile's reference model is {source['spec']} with weights {path}, which is not found: "
                         f"give it with {option} SPEC --reference-weights FILE")
    if file_sha256(path) != want:
        raise UsageError(f"the profile's reference weights {path} changed since the profile was fitted (another "
                         f"sha256): give the reference model it was fitted with, {option} SPEC "
                         "--reference-weights FILE")


def file_sha256(path: str | os.PathLike) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _source(spec: str, weights, latent_shape, output_range) -> dict:
    """How a CLI-built model can be built again (recorded in a profile for its reference)."""
    src: dict = {"spec": spec}
    if weights is not None:
        src["weights"] = str(Path(weights).resolve())
        src["weights_sha256"] = file_sha256(weights)
    if latent_shape is not None:
        src["latent_shape"] = [int(v) for v in latent_shape]
    if output_range is not None:
        src["output_range"] = [float(v) for v in output_range]
    return src


def transform_generators(args, *generators) -> None:
    """``--fold-bn``, then ``--channels-last``: convert each of ``generators`` (None skipped) in place."""
    from ronan_fast.adapters import channels_last, fold_batchnorm

    for g in generators:
        if g is None:
            continue
        if getattr(args, "fold_bn", False):
            fold_batchnorm(g)
        if getattr(args, "channels_last", False):
            channels_last(g)


def models(args, profile=None):
    """The model and the reference model (or None) the command's options name; ``--reference
    auto`` rebuilds the one ``profile`` records. Transformed as ``--fold-bn`` and
    ``--channels-last`` ask."""
    model, reference = build_models(args, profile)
    transform_generators(args, model, reference)
    return model, reference


def build_models(args, profile=None):
    from ronan_fast.calibration import check_reference_fits

    model = build_generator(args.model, args.weights, args.latent_shape, args.output_range,
                            class_label=args.class_label)
    ref, ref_weights = args.reference, args.reference_weights
    ref_latent, ref_range = args.reference_latent_shape, args.reference_output_range
    if ref in ("none", "None"):
        if ref_weights:
            raise UsageError("--reference-weights given with --reference none")
        return model, None
    if ref == "auto":
        if profile is None:
            ref = "default"
        else:
            ref, recorded_weights, recorded_latent, recorded_range = reference_from_profile(profile)
            if ref == "none":
                return model, None
            if profile.reference_source is not None:
                _check_weights_hash(profile.reference_source, "--reference")
            ref_weights = ref_weights or recorded_weights
            ref_latent, ref_range = ref_latent or recorded_latent, ref_range or recorded_range
    # only a factory module takes a latent shape and range
    factory = spec_kind(ref) == "factory"
    ref_latent = ref_latent or (args.latent_shape if factory else None)
    ref_range = ref_range or (args.output_range if factory else None)
    reference = build_generator(ref, ref_weights, ref_latent, ref_range, option="--reference", role="reference")
    try:
        check_reference_fits(model, reference, "--reference")
    except ValueError as e:
        raise UsageError(str(e)) from None
    return model, reference
