"""The ``ronan-fast`` command: fit a belonging profile, inspect images, run the offline demo.

Exit codes: 0 success; 1 some images could not be processed (the others are reported);
2 usage or input error (bad arguments, unimportable model, unreadable profile or weights);
3 the profile does not match the model, reference model or settings.
"""

from __future__ import annotations

import argparse
import csv
import importlib
import io
import json
import os
import sys
import textwrap
import time
from collections.abc import Sequence
from pathlib import Path

from ronan_fast import _atomic
from ronan_fast.edits import EDIT_HELP, RANDOM_EDITS, check_edit, check_edit_metric
from ronan_fast.profile import DEFAULT_RULE, RULES

EXIT_OK = 0
EXIT_PARTIAL = 1
EXIT_USAGE = 2
EXIT_MISMATCH = 3

EXIT_CODES_TEXT = """\
exit codes:
  0  success
  1  some images could not be processed (the others are reported)
  2  usage or input error (bad arguments, model that cannot be imported, unreadable
     profile, weights that do not fit the model)
  3  the profile does not match the model, reference model, metric or settings
"""

#: inversion of the demo: the paper's loop (one start, 1500 Adam steps at lr 0.1), which takes
#: the bundled DCGAN's own images to losses far below the real images' within about a minute
DEMO_SETTINGS = "authors"
#: ``--quick``: fewer images and steps, for a smoke test
QUICK = {"n_profile": 30, "n_test": 8, "steps": 1000}


class UsageError(Exception):
    """Bad arguments or inputs: reported on stderr, exit code 2."""


# ---------------------------------------------------------------------------- parser


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a number >= 1, got {v}")
    return v


def _probability(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1), got {text!r}") from None
    if not 0 < v < 1:
        raise argparse.ArgumentTypeError(f"expected a number strictly between 0 and 1, got {v}")
    return v


def _add_model_args(p: argparse.ArgumentParser, with_reference_choice: str) -> None:
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
    g.add_argument("--latent-shape", type=_positive_int, nargs="+", metavar="N",
                   help="shape of one latent when the factory returns a torch module, e.g. 128 or 100 1 1")
    g.add_argument("--output-range", type=float, nargs=2, metavar=("LOW", "HIGH"),
                   help="range of the module's output (default -1 1, i.e. tanh; use 0 1 for sigmoid)")
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
                        + (" ('auto': as the profile says: its zoo reference model or default if calibrated, "
                           "none if not)"
                           if with_reference_choice == "auto" else "") + f" (default: {with_reference_choice})")
    r.add_argument("--reference-weights", metavar="FILE", help="state dict for a factory reference model")
    r.add_argument("--reference-latent-shape", type=_positive_int, nargs="+", metavar="N",
                   help="latent shape of a factory reference module (default: --latent-shape)")
    r.add_argument("--reference-output-range", type=float, nargs=2, metavar=("LOW", "HIGH"),
                   help="output range of a factory reference module (default: --output-range)")


def _add_common(p: argparse.ArgumentParser, threads_default: int | None = None) -> None:
    p.add_argument("--device", help="torch device, e.g. cuda or cpu (default: cpu)")
    p.add_argument("--cuda-graph", action="store_true",
                   help="capture each Adam step of the inversion in a CUDA graph and replay it (fewer kernel "
                        "launches; needs --device cuda and a generator that does not synchronise with the host)")
    p.add_argument("--compile", action="store_true", dest="compile_generator",
                   help="run the generator's forward and backward in the inversion's Adam phase through "
                        "torch.compile: the first images wait while it compiles (seconds to a minute), then the "
                        "inversion runs faster (on CPU, 1.1-1.3x for the zoo's DCGANs); not with --cuda-graph")
    p.add_argument("--channels-last", action="store_true",
                   help="hold the generators' 4-D weights in channels-last (NHWC) memory format: the same "
                        "values, often faster convolutions (on CPU, 15%% less time per step for a 64x64 DCGAN); a "
                        "profile fitted with or without it serves both")
    p.add_argument("--fold-bn", action="store_true",
                   help="fold the generators' eval-mode BatchNorm layers into the convolutions before them: the "
                        "same function up to rounding, cheaper steps (on CPU with --channels-last, a 64x64 DCGAN's "
                        "inversion 1.1-1.3x faster); a profile fitted with or without it serves both")
    p.add_argument("--threads", type=_positive_int, default=threads_default,
                   help="CPU threads for torch (default: "
                        + ("torch's choice, one per core" if threads_default is None else
                           f"{threads_default}, which keeps the demo's time steady when other processes share the "
                           "cores") + ")")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars (they are off anyway when stderr is not a terminal)")


def _add_inversion_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("inversion and test")
    g.add_argument("--settings", default="default", choices=["default", "authors", "stagewise", "gan-8-starts"],
                   help="inversion preset: 'default' (the model family's tuned settings), 'authors' "
                        "(the paper's single start, 1500 Adam steps at lr 0.1), 'stagewise' (a multi-step "
                        "sampler such as the zoo's DDIM inverted step by step: its last step by Gauss-Newton, "
                        "the earlier ones solved exactly) or 'gan-8-starts' (the earlier GAN default: 8 starts "
                        "halved every 100 steps instead of 24 halved every 25) (default: default)")
    g.add_argument("--steps", type=_positive_int, help="Adam steps per start")
    g.add_argument("--restarts", type=_positive_int, help="random starts per image")
    g.add_argument("--lr", type=float, help="Adam learning rate")
    g.add_argument("--precision", choices=["fp32", "bf16", "fp16"], help="the generator's precision in the Adam phase "
                   "(bf16/fp16: autocast; the latents, the polish and the scores stay float32)")
    g.add_argument("--metric", help="reconstruction loss: mse (default), mae, ssim, or mse-tone (MSE after the best "
                   "affine tone map: tolerates brightness, contrast and colour-filter edits)")
    g.add_argument("--rule", default=None, choices=list(RULES),
                   help="'grubbs': the paper's test on the calibrated loss; 'grubbs-log': the same on its "
                        f"logarithm, for heavy-tailed losses (default: the model family's: {DEFAULT_RULE}, "
                        "grubbs for one-step 'consistency' models; grubbs for a profile with --edit tone or any)")
    g.add_argument("--alpha", type=_probability, default=0.05, help="significance level (default: 0.05)")
    g.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", dest="set_fields",
                   help="override any other field of ronan_fast.InversionSettings, e.g. --set "
                        "polish_candidates=1 or --set schedule=cosine; repeatable")


def _setting_overrides(pairs: Sequence[str], given: dict) -> dict:
    """``--set FIELD=VALUE`` pairs as keyword overrides, each value of its field's type."""
    import dataclasses

    from ronan_fast.inversion import InversionSettings

    fields = {f.name: type(f.default) for f in dataclasses.fields(InversionSettings) if f.name != "metric"}
    out = {}
    for pair in pairs:
        name, eq, text = pair.partition("=")
        name = name.strip()
        if not eq or not name:
            raise UsageError(f"--set {pair!r}: expected FIELD=VALUE, e.g. --set polish_candidates=2")
        if name == "metric":
            raise UsageError(f"--set {pair!r}: the metric has its own option, --metric")
        if name not in fields:
            raise UsageError(f"--set {pair!r}: {name!r} is not an inversion setting; the fields are "
                             + ", ".join(sorted(fields)))
        if name in given or name in out:
            raise UsageError(f"--set {pair!r}: {name} is given twice")
        kind = fields[name]
        try:
            out[name] = kind(text) if kind in (int, float) else text
        except ValueError:
            raise UsageError(f"--set {pair!r}: {name} takes {'a whole number' if kind is int else 'a number'}, "
                             f"got {text!r}") from None
    return out


def _para(text: str) -> str:
    return textwrap.fill(text, 88)


def build_parser() -> argparse.ArgumentParser:
    from ronan_fast import __version__

    fmt = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(
        prog="ronan-fast",
        formatter_class=fmt,
        description=(
            "Was this image generated by this model? Origin attribution by model inversion (RONAN).\n\n"
            "Each image is reconstructed by the model (inversion: the lowest reconstruction loss over\n"
            "the model's inputs), the loss is divided by a reference model's (calibration), and the\n"
            "result is compared with the same quantity for the model's own images (the belonging\n"
            "profile) by a one-sided Grubbs test. Fit a profile once per model, then inspect images."
        ),
        epilog=(
            "examples:\n"
            "  ronan-fast demo                      # the whole method on the bundled DCGAN, offline\n"
            "  ronan-fast profile --model default -o fmnist.json\n"
            "  ronan-fast inspect --profile fmnist.json --model default suspects/ -o report.jsonl\n"
            "  ronan-fast profile --model mygan.models:make_generator --weights g.safetensors \\\n"
            "      --latent-shape 128 --reference none -o mygan.json\n\n"
            + EXIT_CODES_TEXT
        ),
    )
    parser.add_argument("--version", action="version", version=f"ronan-fast {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser(
        "profile", formatter_class=fmt,
        help="fit a model's belonging profile and save it as JSON",
        description=_para("Generate N images with the model, invert them with the model and the reference model, and "
                    "save the mean and standard deviation of their calibrated reconstruction losses (the "
                    "belonging profile) with everything that made them. The images are inverted in parts; "
                    "each finished part is saved to PROFILE.json.partial.json, and running the same command again "
                    "after an interruption resumes after the last one (the file is removed once the profile "
                    "is saved)."),
        epilog=(
            "examples:\n"
            "  ronan-fast profile --model default -o default.json\n"
            "  ronan-fast profile --model mygan.models:make_generator --weights g.pt --latent-shape 100 1 1 \\\n"
            "      --reference mygan.models:make_reference --reference-weights r.pt -n 100 -o mygan.json\n"
            "  ronan-fast profile --model default --settings authors --rule grubbs -o paper.json   # the paper's setup\n"
            "  ronan-fast profile --model default --edit jpeg75 -o default-jpeg75.json   # for JPEG-75 copies\n"
            "  ronan-fast profile --model onestep-fmnist -o onestep.json   # a model of the package's zoo\n\n"
            + EXIT_CODES_TEXT
        ),
    )
    _add_model_args(p, "default")
    _add_inversion_args(p)
    p.add_argument("-n", type=_positive_int, default=100, help="number of generated profile images (default: 100)")
    p.add_argument("--seed", type=int, default=0, help="seed of the profile images (default: 0)")
    p.add_argument("--inversion-seed", type=int, default=0, help="seed of the inversion's starting points (default: 0)")
    p.add_argument("--part", type=_positive_int, default=50, metavar="N",
                   help="profile images per saved part: an interruption loses at most one part, smaller "
                        "parts batch less well (default: 50)")
    p.add_argument("--retries", type=int, default=2, metavar="ROUNDS",
                   help="rounds of inverting again, from other starts, the profile images that fail the "
                        "belonging test against the rest of the profile (inversions that missed); "
                        "0: none, as in the paper (default: 2)")
    p.add_argument("--edit", metavar="EDIT",
                   help=f"edit the profile images before inverting them, for images known to reach you so edited: {EDIT_HELP}")
    p.add_argument("-o", "--output", required=True, metavar="PROFILE.json", help="where to write the profile")
    _add_common(p)

    p = sub.add_parser(
        "inspect", formatter_class=fmt,
        help="attribute images (files or folders) to a model with a saved profile",
        description=_para("Judge each image: was it generated by the model? Inversion settings, metric and rule come "
                    "from the profile, which must match the model and reference model (else exit code 3). "
                    "Images are processed in batches; with -o each finished batch is appended to a JSON-lines "
                    "log, and running the same command again resumes, skipping the images already reported "
                    "(unreadable ones are retried)."),
        epilog=(
            "examples:\n"
            "  ronan-fast inspect --profile default.json --model default photos/ -o report.jsonl\n"
            "  ronan-fast inspect --profile mygan.json --model mygan.models:make_generator --weights g.pt \\\n"
            "      --latent-shape 100 1 1 --reference mygan.models:make_reference --reference-weights r.pt \\\n"
            "      img1.png img2.jpg -o report.csv --grid grid.png\n\n"
            "report formats (by suffix of -o): .jsonl (one record per line, written as it goes), .json (a list),\n"
            ".csv. For .json and .csv the progress log is OUTPUT.partial.jsonl until the end.\n\n"
            + EXIT_CODES_TEXT
        ),
    )
    p.add_argument("--profile", required=True, metavar="PROFILE.json", help="a profile written by 'ronan-fast profile'")
    _add_model_args(p, "auto")
    p.add_argument("images", nargs="+", metavar="IMAGE_OR_FOLDER", help="image files and/or folders of images")
    p.add_argument("--recursive", action="store_true", help="also search sub-folders")
    p.add_argument("-o", "--output", metavar="REPORT", help="report file: .jsonl, .json or .csv")
    p.add_argument("--grid", metavar="GRID.png",
                   help="PNG grid: each image processed in this run beside its reconstruction (and the reference model's)")
    p.add_argument("--grid-max", type=_positive_int, default=32, help="images in the grid at most (default: 32)")
    p.add_argument("--batch", type=_positive_int, default=64, help="images per batch (default: 64)")
    p.add_argument("--alpha", type=_probability, help="significance level (default: the profile's)")
    p.add_argument("--no-early-stop", action="store_true",
                   help="invert every image to the end even once its verdict is settled (same verdicts, "
                        "lowest losses, slower)")
    _add_common(p)

    p = sub.add_parser(
        "demo", formatter_class=fmt,
        help="the whole method offline on the bundled model: profile, then generated vs real images",
        description=_para("Fit a belonging profile of the bundled DCGAN (Fashion-MNIST) calibrated by the bundled "
                    "reference model (MNIST digits), then attribute fresh images generated by the DCGAN (another "
                    "seed than the profile's) and the bundled real Fashion-MNIST test images, and print the "
                    "confusion table (TP: generated judged as belonging, FP: real judged as belonging)."),
        epilog=(
            "examples:\n"
            "  ronan-fast demo\n"
            "  ronan-fast demo --quick\n"
            "  ronan-fast demo --rule grubbs --n-profile 200 --save-profile demo.json\n\n"
            "The demo inverts with the paper's settings (--settings authors: one start, 1500 Adam steps at\n"
            "lr 0.1); --steps / --restarts change them. Images stop early once their verdict is settled.\n"
            f"--quick: {QUICK['n_profile']} profile images, {QUICK['n_test']} generated test images, "
            f"{QUICK['steps']} steps.\n\n" + EXIT_CODES_TEXT
        ),
    )
    p.add_argument("--n-profile", type=_positive_int, help="generated profile images (default: 100)")
    p.add_argument("--n-test", type=_positive_int, help="fresh generated test images (default: 16)")
    p.add_argument("--quick", action="store_true", help="a faster, smaller run")
    p.add_argument("--steps", type=_positive_int, help="Adam steps per start (default: 1500)")
    p.add_argument("--restarts", type=_positive_int, help="starts per image (default: 1)")
    p.add_argument("--rule", default=None, choices=list(RULES),
                   help=f"belonging rule (default: the model family's, {DEFAULT_RULE} for the bundled DCGAN; "
                        "'grubbs' is the paper's)")
    p.add_argument("--alpha", type=_probability, default=0.05, help="significance level (default: 0.05)")
    p.add_argument("--seed", type=int, default=0, help="seed of the profile images; test images use another stream")
    p.add_argument("--save-profile", metavar="PROFILE.json", help="also save the demo's profile")
    _add_common(p, threads_default=1)
    return parser


# ---------------------------------------------------------------------------- models


def _import_factory(spec: str, option: str):
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


def load_state_dict_file(path: str | os.PathLike, option: str = "--weights") -> dict:
    """Read a state dict without unpickling: safetensors, or ``torch.load(weights_only=True)``."""
    import torch

    p = Path(path)
    if not p.is_file():
        raise UsageError(f"{option} {p}: file not found")
    if p.suffix.lower() == ".safetensors":
        try:
            from safetensors.torch import load_file

            sd = load_file(str(p))
        except Exception as e:
            raise UsageError(f"{option} {p}: not a readable safetensors file ({type(e).__name__}: {e})") from None
    else:
        try:
            sd = torch.load(p, map_location="cpu", weights_only=True)
        except Exception as e:
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UsageError(f"{option} {p}: cannot be read with torch.load(weights_only=True) "
                             f"({type(e).__name__}: {msg[:300]})") from None
    if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in sd.items()):
        raise UsageError(f"{option} {p}: expected a state dict (names -> tensors), got {type(sd).__name__}")
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


def _spec_kind(spec: str) -> str:
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
    adapter = _build_adapter(spec, weights, latent_shape, output_range, option, role, class_label)
    if class_label is None or _spec_kind(spec) == "diffusers":  # from_folder took the class
        return adapter
    if not callable(getattr(adapter, "with_class", None)) or getattr(adapter, "num_classes", None) is None:
        raise UsageError(f"--class-label {class_label}: {option} {spec} is not class-conditional")
    try:
        return adapter.with_class(class_label)
    except ValueError as e:
        raise UsageError(f"--class-label {class_label}: {e}") from None


def _build_adapter(spec, weights, latent_shape, output_range, option, role, class_label):
    from torch import nn

    from ronan_fast.adapters import GeneratorAdapter, LatentGenerator
    from ronan_fast.zoo import ZOO

    wopt = "--weights" if option == "--model" else "--reference-weights"
    kind = _spec_kind(spec)
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
            apply_state_dict(adapter.module, load_state_dict_file(weights, wopt), weights, wopt)
        return adapter
    factory = _import_factory(spec, option)
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
            raise UsageError(f"{option} {spec!r} returned a torch module: give its latent shape with "
                             f"{'--latent-shape' if role == 'model' else '--reference-latent-shape (or --latent-shape)'}")
        if weights is not None:
            apply_state_dict(obj, load_state_dict_file(weights, wopt), weights, wopt)
        try:
            return LatentGenerator(obj, tuple(latent_shape), output_range=tuple(output_range or (-1.0, 1.0)),
                                   name=spec.rpartition(":")[2])
        except Exception as e:
            raise UsageError(f"{option} {spec!r}: cannot use the module as a generator ({type(e).__name__}: {e})") from None
    raise UsageError(f"{option} {spec!r}: the factory returned {type(obj).__name__}, expected a torch.nn.Module "
                     "or a ronan_fast GeneratorAdapter")


def _profile_reference(profile) -> str:
    """What ``--reference auto`` means for ``profile``: none if uncalibrated, the zoo model it
    was calibrated with (by name), else the bundled reference model."""
    from ronan_fast.zoo import ZOO

    if not profile.calibrated:
        return "none"
    return profile.reference_name if profile.reference_name in ZOO else "default"


def _transform_generators(args, *generators) -> None:
    """``--fold-bn``, then ``--channels-last``: convert each of ``generators`` (None skipped) in place."""
    from ronan_fast.adapters import channels_last, fold_batchnorm

    for g in generators:
        if g is None:
            continue
        if getattr(args, "fold_bn", False):
            fold_batchnorm(g)
        if getattr(args, "channels_last", False):
            channels_last(g)


def _models(args, reference_default: str):
    model, reference = _build_models(args, reference_default)
    _transform_generators(args, model, reference)
    return model, reference


def _build_models(args, reference_default: str):
    model = build_generator(args.model, args.weights, args.latent_shape, args.output_range,
                            class_label=args.class_label)
    ref = args.reference
    if ref in ("none", "None"):
        if args.reference_weights:
            raise UsageError("--reference-weights given with --reference none")
        return model, None
    if ref == "auto":
        ref = reference_default
        if ref == "none":
            return model, None
    # only a factory module takes a latent shape and range
    factory = _spec_kind(ref) == "factory"
    ref_latent = args.reference_latent_shape or (args.latent_shape if factory else None)
    ref_range = args.reference_output_range or (args.output_range if factory else None)
    reference = build_generator(ref, args.reference_weights, ref_latent, ref_range, option="--reference",
                                role="reference")
    return model, reference


# ---------------------------------------------------------------------------- progress


class _Progress:
    """tqdm bars on stderr, one per stage; nothing when quiet or stderr is not a terminal."""

    def __init__(self, quiet: bool):
        self.enabled = not quiet and sys.stderr.isatty()
        self.bar = None
        self.stage = None

    def __call__(self, stage: str, done: int, total: int) -> None:
        if not self.enabled:
            return
        from tqdm import tqdm

        if stage != self.stage:
            self.close()
            self.stage = stage
            self.bar = tqdm(total=total, desc=f"{stage:>9}", unit="img", file=sys.stderr, leave=False)
        self.bar.n = done
        self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
            self.stage = None


def _err(msg: str) -> None:
    print(f"ronan-fast: {msg}", file=sys.stderr)


def _setup_device(args):
    if getattr(args, "threads", None):
        import torch

        torch.set_num_threads(args.threads)
    if args.device:
        import torch

        try:
            torch.empty(0, device=args.device)
        except Exception as e:
            raise UsageError(f"--device {args.device}: not usable ({e})") from None
    if getattr(args, "cuda_graph", False) and not (args.device or "cpu").startswith("cuda"):
        raise UsageError(f"--cuda-graph needs --device cuda, got --device {args.device or 'cpu (the default)'}")
    if getattr(args, "cuda_graph", False) and getattr(args, "compile_generator", False):
        raise UsageError("--compile and --cuda-graph: choose one")
    return args.device


# ---------------------------------------------------------------------------- profile


def cmd_profile(args) -> int:
    from ronan_fast.attributor import Attributor, CheckpointError

    device = _setup_device(args)
    out = Path(args.output)
    if out.is_dir():
        raise UsageError(f"-o {out}: is a directory")
    if args.retries < 0:
        raise UsageError(f"--retries {args.retries}: expected a number of rounds >= 0")
    if args.n < 3:
        raise UsageError(f"-n {args.n}: a Grubbs test needs at least 3 profile images (the paper uses 100)")
    if args.edit is not None:
        try:
            check_edit(args.edit, "--edit")
            check_edit_metric(args.edit, args.metric, "--edit", "--metric")
        except ValueError as e:
            raise UsageError(str(e)) from None
    model, reference = _models(args, "default")
    overrides = {k: getattr(args, k) for k in ("steps", "restarts", "lr", "precision") if getattr(args, k) is not None}
    overrides.update(_setting_overrides(args.set_fields, overrides))
    # random tone edits spread the profile over decades, which the log rule turns into false
    # positives (README, Table 8's -anytone cells): the paper's rule unless one is asked for
    rule = "grubbs" if args.rule is None and args.edit in RANDOM_EDITS else args.rule
    try:
        att = Attributor(model, reference, alpha=args.alpha, metric=args.metric, rule=rule,
                         settings=args.settings, seed=args.inversion_seed, device=device, cuda_graph=args.cuda_graph,
                         compile_generator=args.compile_generator,
                         profile_retries=args.retries, **overrides)
    except (TypeError, ValueError) as e:
        raise UsageError(str(e)) from None
    progress = _Progress(args.quiet)
    partial = out.with_name(out.name + ".partial.json")
    t0 = time.perf_counter()

    def fit():
        return att.fit(n=args.n, seed=args.seed, progress=progress, edit=args.edit, checkpoint=partial,
                       checkpoint_every=args.part)

    try:
        try:
            profile = fit()
        except CheckpointError:
            _err(f"note: {partial} was left by a profile run with other options (or is unreadable); "
                 "starting afresh")
            partial.unlink()
            profile = fit()
    except KeyboardInterrupt:
        progress.close()
        if partial.exists():
            _err(f"interrupted; the finished parts are in {partial}; run the same command again to resume")
        raise
    finally:
        progress.close()
    profile.save(out)
    partial.unlink(missing_ok=True)
    print(profile.describe())
    print(f"saved {out} ({time.perf_counter() - t0:.1f} s)")
    return EXIT_OK


# ---------------------------------------------------------------------------- inspect


def _log_path(output: Path) -> Path:
    if output.suffix.lower() == ".jsonl":
        return output
    return output.with_name(output.name + ".partial.jsonl")


def _atomic_write_text(path: Path, text: str) -> None:
    _atomic.write_text(path, text, newline="")


def _read_jsonl(path: Path) -> list[dict]:
    """Records of a JSON-lines log; an unfinished last line (an interrupted write) is dropped from the file."""
    text = path.read_text(encoding="utf-8")
    lines = text.split("\n")
    records, good = [], []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            if i == len(lines) - 1:  # the last line was cut short: drop it
                _atomic_write_text(path, "".join(g + "\n" for g in good))
                break
            raise UsageError(f"{path}: line {i + 1} is not valid JSON; not a report written by ronan-fast?") from None
        if not isinstance(rec, dict) or "path" not in rec:
            raise UsageError(f"{path}: line {i + 1} is not a report record")
        records.append(rec)
        good.append(line)
    return records


def _read_report(path: Path) -> list[dict]:
    suffix = path.suffix.lower()
    if suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise UsageError(f"{path}: existing report is not valid JSON ({e.msg}); move it away to start afresh") from None
        if not isinstance(data, list) or not all(isinstance(r, dict) and "path" in r for r in data):
            raise UsageError(f"{path}: existing file is not a ronan-fast report")
        return data
    if suffix == ".csv":
        with path.open(newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
        if rows and "path" not in rows[0]:
            raise UsageError(f"{path}: existing file is not a ronan-fast report")
        for r in rows:
            for k, v in list(r.items()):
                r[k] = None if v == "" else v
        return rows
    return _read_jsonl(path)


CSV_FIELDS = ["path", "verdict", "belongs", "loss", "reference_loss", "calibrated_loss", "statistic",
              "critical_value", "p_value", "threshold", "alpha", "rule", "stopped_early", "row_steps", "notes",
              "error", "profile_id"]


def _write_final(output: Path, records: list[dict]) -> None:
    suffix = output.suffix.lower()
    if suffix == ".json":
        _atomic_write_text(output, json.dumps(records, indent=2) + "\n")
    elif suffix == ".csv":
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=CSV_FIELDS, extrasaction="ignore")
        w.writeheader()
        for r in records:
            w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in CSV_FIELDS})
        _atomic_write_text(output, buf.getvalue())
    else:
        _atomic_write_text(output, "".join(json.dumps(r) + "\n" for r in records))


def _key(path) -> str:
    return os.path.normcase(os.path.abspath(str(path)))


def _fmt(v, spec=".3g") -> str:
    if v is None or v == "":
        return "-"
    try:
        return format(float(v), spec)
    except (TypeError, ValueError):
        return str(v)


def _print_table(records: list[dict], limit: int = 50) -> None:
    header = f"{'image':<32} {'loss A':>9} {'ref A_r':>9} {'A/A_r':>9} {'G':>9} {'p':>9}  verdict"
    print(header)
    for r in records[:limit]:
        name = str(r.get("path") or "-")
        if len(name) > 32:
            name = "..." + name[-29:]
        if r.get("error"):
            print(f"{name:<32} {'':>9} {'':>9} {'':>9} {'':>9} {'':>9}  error: {r['error']}")
            continue
        print(f"{name:<32} {_fmt(r.get('loss')):>9} {_fmt(r.get('reference_loss')):>9} "
              f"{_fmt(r.get('calibrated_loss')):>9} {_fmt(r.get('statistic')):>9} {_fmt(r.get('p_value')):>9}  "
              f"{r.get('verdict')}")
    if len(records) > limit:
        print(f"... {len(records) - limit} more in the report")


def _expand_inputs(items: Sequence[str], recursive: bool) -> tuple[list[Path], list[dict]]:
    from ronan_fast.imageio import list_images

    files: list[Path] = []
    errors: list[dict] = []
    seen: set[str] = set()
    for item in items:
        p = Path(item)
        if not p.exists():
            errors.append({"path": str(p), "belongs": None, "verdict": "error", "error": "file not found"})
            continue
        try:
            found = list_images([p], recursive=recursive)
        except ValueError as e:
            raise UsageError(str(e)) from None
        for f in found:
            k = _key(f)
            if k not in seen:
                seen.add(k)
                files.append(f)
    return files, errors


def cmd_inspect(args) -> int:
    from ronan_fast.attributor import Attributor
    from ronan_fast.profile import BelongingProfile

    device = _setup_device(args)
    profile = BelongingProfile.load(args.profile)
    output = Path(args.output) if args.output else None
    if output is not None:
        if output.suffix.lower() not in (".jsonl", ".json", ".csv"):
            raise UsageError(f"-o {output}: the report must end in .jsonl, .json or .csv")
        if output.is_dir():
            raise UsageError(f"-o {output}: is a directory")
    if args.grid and Path(args.grid).suffix.lower() != ".png":
        raise UsageError(f"--grid {args.grid}: the grid is written as PNG; use a .png name")
    model, reference = _models(args, _profile_reference(profile))
    att = Attributor.from_profile(profile, model, reference, alpha=args.alpha, device=device,
                                  early_stop=not args.no_early_stop, cuda_graph=args.cuda_graph,
                                  compile_generator=args.compile_generator)
    profile = att.profile
    pid = profile.identity()
    files, missing = _expand_inputs(args.images, args.recursive)

    # ---- resume from an earlier run with the same output
    previous: list[dict] = []
    log = _log_path(output) if output is not None else None
    if output is not None:
        source = log if log.exists() else (output if output.exists() else None)
        if source is not None:
            previous = _read_report(source)
            other = {r.get("profile_id") for r in previous if r.get("profile_id")} - {pid}
            if other:
                raise UsageError(f"{source} holds results made with another profile; choose another -o or move "
                                 "the old report away")
            if source != log:  # a finished .json/.csv report: carry it over into a fresh log
                _atomic_write_text(log, "".join(json.dumps(r) + "\n" for r in previous))
    done = {_key(r["path"]) for r in previous if not r.get("error") and r.get("path")}
    todo = [f for f in files if _key(f) not in done]
    skipped = len(files) - len(todo)
    if skipped:
        print(f"resuming: {skipped} of {len(files)} images already in {log}; skipping them", file=sys.stderr)

    new: list[dict] = []
    grid_rows: list = []
    log_file = log.open("a", encoding="utf-8") if log is not None else None

    def append(recs: list[dict]) -> None:
        new.extend(recs)
        if log_file is not None:
            for r in recs:
                log_file.write(json.dumps(r) + "\n")
            log_file.flush()
            os.fsync(log_file.fileno())

    progress = _Progress(args.quiet)
    overall = None
    if progress.enabled and todo:
        from tqdm import tqdm

        overall = tqdm(total=len(todo), desc="   images", unit="img", file=sys.stderr, position=1, leave=False)
    try:
        for m in missing:
            m["profile_id"] = pid
        append(missing)
        for start in range(0, len(todo), args.batch):
            batch = [str(f) for f in todo[start:start + args.batch]]
            res = att.attribute(batch, progress=progress)
            recs = res.to_records()
            for r in recs:
                r.pop("index", None)
                r["profile_id"] = pid
            append(recs)
            if args.grid:
                for i in range(len(res)):
                    if len(grid_rows) >= args.grid_max:
                        break
                    row = [res.images[i], res.reconstruction[i]]
                    if res.reference_reconstruction is not None:
                        row.append(res.reference_reconstruction[i])
                    grid_rows.append(row)
            if overall is not None:
                overall.update(len(batch))
    except KeyboardInterrupt:
        progress.close()
        if log is not None:
            _err(f"interrupted; {len(new)} records so far are in {log}; run the same command again to resume")
        raise
    finally:
        progress.close()
        if overall is not None:
            overall.close()
        if log_file is not None:
            log_file.close()

    # Latest record per image wins (an unreadable image may have been retried).
    merged: dict[str, dict] = {}
    for r in previous + new:
        merged[_key(r["path"])] = r
    final = list(merged.values())
    if output is not None:
        _write_final(output, final)
        if log != output and log.exists():
            log.unlink()
    if args.grid and grid_rows:
        from ronan_fast.imageio import save_grid

        save_grid(grid_rows, args.grid)
    _print_table(final)
    errors = [r for r in final if r.get("error")]
    judged = [r for r in final if not r.get("error")]
    yes = sum(1 for r in judged if r.get("belongs") in (True, "True", "true"))
    print(f"{len(judged)} images judged: {yes} belong to {model.name}, {len(judged) - yes} do not "
          f"(rule {profile.rule}, alpha={profile.alpha}, G_crit={profile.critical_value:.4f}"
          + (f"; profile of images edited by {profile.edit}" if profile.edit else "") + ")"
          + (f"; {len(errors)} could not be processed" if errors else ""))
    if output is not None:
        print(f"report: {output}")
    if args.grid and grid_rows:
        cols = "image | model reconstruction" + (" | reference reconstruction" if reference is not None else "")
        print(f"grid: {args.grid} ({cols})")
    return EXIT_PARTIAL if errors else EXIT_OK


# ---------------------------------------------------------------------------- demo


def cmd_demo(args) -> int:
    import torch

    from ronan_fast import calibration
    from ronan_fast.attributor import Attributor
    from ronan_fast.imageio import load_images

    device = _setup_device(args)
    n_profile = args.n_profile or (QUICK["n_profile"] if args.quick else 100)
    n_test = args.n_test or (QUICK["n_test"] if args.quick else 16)
    if n_profile < 3:
        raise UsageError(f"--n-profile {n_profile}: a Grubbs test needs at least 3 profile images")
    overrides = {}
    if args.quick:
        overrides["steps"] = QUICK["steps"]
    if args.steps:
        overrides["steps"] = args.steps
    if args.restarts:
        overrides["restarts"] = args.restarts
    try:
        from ronan_fast.default import default_sample_paths

        model = calibration.default_generator()
        reference = calibration.default_reference()
        sample_paths = default_sample_paths()
    except FileNotFoundError as e:
        raise UsageError(f"the bundled default models are missing: {e}") from None
    _transform_generators(args, model, reference)
    att = Attributor(model, reference, alpha=args.alpha, rule=args.rule, settings=DEMO_SETTINGS, device=device,
                     cuda_graph=args.cuda_graph, compile_generator=args.compile_generator, **overrides)
    s = att.settings
    print(f"model:     {model.name}\nreference: {reference.name}")
    print(f"inversion: {s.steps} steps x {s.restarts} starts, lr {s.lr} ({s.schedule}), metric {s.metric}")
    progress = _Progress(args.quiet)
    t0 = time.perf_counter()
    try:
        print(f"fitting the belonging profile on {n_profile} generated images ...", flush=True)
        profile = att.fit(n=n_profile, seed=args.seed, progress=progress)
        t_profile = time.perf_counter() - t0
        print(profile.describe())
        generated = att.sample(n_test, seed=args.seed, purpose="demo-test")
        real, kept, errors = load_images(sample_paths, model.image_shape)
        if errors:
            raise UsageError(f"bundled sample images unreadable: {errors[0]}")
        print(f"attributing {n_test} fresh generated images and {len(kept)} real Fashion-MNIST test images ...",
              flush=True)
        res = att.attribute(torch.cat([generated, real]), progress=progress)
    finally:
        progress.close()
    elapsed = time.perf_counter() - t0
    if args.save_profile:
        profile.save(args.save_profile)
    b = res.belonging
    gen_b, real_b = b[:n_test], b[n_test:]
    tp, fn = int(gen_b.sum()), int((~gen_b).sum())
    fp, tn = int(real_b.sum()), int((~real_b).sum())
    total = tp + fn + fp + tn
    print()
    print(f"{'':<24}{'judged: belongs':>18}{'judged: does not':>19}")
    print(f"{'generated (n=' + str(n_test) + ')':<24}{'TP = ' + str(tp):>18}{'FN = ' + str(fn):>19}")
    print(f"{'real (n=' + str(len(kept)) + ')':<24}{'FP = ' + str(fp):>18}{'TN = ' + str(tn):>19}")
    print(f"accuracy {(tp + tn) / total:.3f}   TPR {tp / max(1, tp + fn):.3f}   FPR {fp / max(1, fp + tn):.3f}   "
          f"time {elapsed:.1f} s (profile {t_profile:.1f} s, attribution {elapsed - t_profile:.1f} s)")
    if args.save_profile:
        print(f"profile saved to {args.save_profile}")
    return EXIT_OK


# ---------------------------------------------------------------------------- main


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``ronan-fast`` with ``argv`` (default: the command line); returns the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, --version (0) and argument errors (2)
        return int(e.code or 0) if not isinstance(e.code, str) else EXIT_USAGE
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    import warnings

    from ronan_fast.adapters import GeneratorOutputError
    from ronan_fast.profile import ProfileError, ProfileMismatchError

    commands = {"profile": cmd_profile, "inspect": cmd_inspect, "demo": cmd_demo}
    threads_before = None
    if getattr(args, "threads", None):
        import torch

        threads_before = torch.get_num_threads()
    with warnings.catch_warnings():
        if getattr(args, "quiet", False):
            warnings.filterwarnings("ignore", message=r"ronan_fast: .* runs the plain PyTorch reference")
        try:
            return commands[args.command](args)
        except ProfileMismatchError as e:
            _err(f"error: {e}")
            return EXIT_MISMATCH
        except (UsageError, ProfileError, GeneratorOutputError, FileNotFoundError) as e:
            _err(f"error: {e}")
            return EXIT_USAGE
        except KeyboardInterrupt:
            _err("interrupted")
            return 130
        finally:
            if threads_before is not None:
                import torch

                torch.set_num_threads(threads_before)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
