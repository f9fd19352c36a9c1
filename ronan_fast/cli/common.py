"""What the subcommands share: exit codes, usage errors, option groups and types, devices."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import textwrap
from collections.abc import Sequence
from pathlib import Path

from ronan_fast.profile import DEFAULT_RULE, RULES

EXIT_OK = 0
EXIT_PARTIAL = 1
EXIT_USAGE = 2
EXIT_MISMATCH = 3
EXIT_LOCKED = 4

EXIT_CODES_TEXT = """\
exit codes:
  0  success
  1  some images could not be processed (the others are reported)
  2  usage or input error (bad arguments, model that cannot be imported, unreadable
     profile, report or weights, an output that cannot be written)
  3  the profile does not match the model, reference model, metric or settings
  4  another ronan-fast run is writing the same report (see --wait)
"""


class UsageError(Exception):
    """Bad arguments or inputs: reported on stderr, exit code 2."""


# ---------------------------------------------------------------------------- parser


def _int_at_least(text: str, least: int) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if v < least:
        raise argparse.ArgumentTypeError(f"expected a number >= {least}, got {v}")
    return v


def positive_int(text: str) -> int:
    return _int_at_least(text, 1)


def nonnegative_int(text: str) -> int:
    return _int_at_least(text, 0)


def at_least_one(text: str) -> float:
    """A number >= 1, ``inf`` included (a multiple of a threshold)."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 1 or inf, got {text!r}") from None
    if not v >= 1:
        raise argparse.ArgumentTypeError(f"expected a number >= 1 or inf, got {text}")
    return v


def probability(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1), got {text!r}") from None
    if not 0 < v < 1:
        raise argparse.ArgumentTypeError(f"expected a number strictly between 0 and 1, got {v}")
    return v


def add_common_args(p: argparse.ArgumentParser, threads_default: int | None = None) -> None:
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
    p.add_argument("--threads", type=positive_int, default=threads_default,
                   help="CPU threads for torch (default: "
                        + ("torch's choice, one per core" if threads_default is None else
                           f"{threads_default}, which keeps the demo's time steady when other processes share the "
                           "cores") + ")")
    p.add_argument("--call-rows", type=positive_int, metavar="N",
                   help="rows per generator call: every call runs in blocks of exactly N rows, so that an image's "
                        "result does not depend on what else is inverted with it (default: set by the model's size: "
                        "on CPU 16 for a small model, else 8; on CUDA up to 256). The same N, device and threads give the same losses")
    p.add_argument("--max-rows", type=positive_int, metavar="N",
                   help="inversion rows in memory at once (default: sized to the device); lower it to bound memory")
    p.add_argument("-q", "--quiet", action="store_true",
                   help="no progress bars (they are off anyway when stderr is not a terminal)")
    p.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"],
                   help="what ronan_fast logs on stderr besides progress bars and errors (default: warning)")


def add_inversion_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("inversion and test")
    g.add_argument("--settings", default="default", choices=["default", "authors", "stagewise", "gan-8-starts"],
                   help="inversion preset: 'default' (the model family's tuned settings), 'authors' "
                        "(the paper's single start, 1500 Adam steps at lr 0.1), 'stagewise' (a multi-step "
                        "sampler such as the zoo's DDIM inverted step by step: its last step by Gauss-Newton, "
                        "the earlier ones solved exactly) or 'gan-8-starts' (the earlier GAN default: 8 starts "
                        "halved every 100 steps instead of 24 halved every 25) (default: default)")
    g.add_argument("--steps", type=positive_int, help="Adam steps per start")
    g.add_argument("--restarts", type=positive_int, help="random starts per image")
    g.add_argument("--lr", type=float, help="Adam learning rate")
    g.add_argument("--precision", choices=["fp32", "bf16", "fp16"], help="the generator's precision in the Adam phase "
                   "(bf16/fp16: autocast; the latents, the polish and the scores stay float32)")
    g.add_argument("--metric", help="reconstruction loss: mse (default), mae, ssim, or mse-tone (MSE after the best "
                   "affine tone map: tolerates brightness, contrast and colour-filter edits)")
    g.add_argument("--rule", default=None, choices=list(RULES),
                   help="'grubbs': the paper's test on the calibrated loss; 'grubbs-log': the same on its "
                        f"logarithm, for heavy-tailed losses (default: the model family's: {DEFAULT_RULE}, "
                        "grubbs for one-step 'consistency' models; grubbs for a profile with --edit tone or any)")
    g.add_argument("--alpha", type=probability, default=0.05, help="significance level (default: 0.05)")
    g.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", dest="set_fields",
                   help="override any other field of ronan_fast.InversionSettings, e.g. --set "
                        "polish_candidates=1, --set schedule=cosine or --set clip_aware=false (a true/false "
                        "field takes true/false, 1/0, yes/no or on/off); repeatable")


#: the words ``--set`` reads as a true/false setting's value
_BOOLS = {"true": True, "1": True, "yes": True, "on": True, "false": False, "0": False, "no": False, "off": False}


def setting_overrides(pairs: Sequence[str], given: dict, option: str = "--set") -> dict:
    """``--set FIELD=VALUE`` pairs (or ``option``'s) as keyword overrides, each value of its field's type."""
    import dataclasses

    from ronan_fast.inversion import InversionSettings

    fields = {f.name: type(f.default) for f in dataclasses.fields(InversionSettings) if f.name != "metric"}
    out = {}
    for pair in pairs:
        name, eq, text = pair.partition("=")
        name = name.strip()
        if not eq or not name:
            raise UsageError(f"{option} {pair!r}: expected FIELD=VALUE, e.g. {option} restarts=8")
        if name == "metric":
            raise UsageError(f"{option} {pair!r}: the metric has its own option, --metric")
        if name not in fields:
            raise UsageError(f"{option} {pair!r}: {name!r} is not an inversion setting; the fields are "
                             + ", ".join(sorted(fields)))
        if name in given or name in out:
            raise UsageError(f"{option} {pair!r}: {name} is given twice")
        kind = fields[name]
        if kind is bool:
            flag = _BOOLS.get(text.strip().lower())
            if flag is None:
                raise UsageError(f"{option} {pair!r}: {name} takes true or false, got {text!r}")
            out[name] = flag
            continue
        try:
            out[name] = kind(text) if kind in (int, float) else text
        except ValueError:
            raise UsageError(f"{option} {pair!r}: {name} takes {'a whole number' if kind is int else 'a number'}, "
                             f"got {text!r}") from None
    return out


def para(text: str) -> str:
    return textwrap.fill(text, 88)


def err(msg: str) -> None:
    print(f"ronan-fast: {msg}", file=sys.stderr)


def setup_device(args):
    """Threads, logging and the device the command's options ask for; the device (or None)."""
    setup_logging(getattr(args, "log_level", "warning"))
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


# ---------------------------------------------------------------------------- outputs


def check_output(path: str | os.PathLike | None, option: str, suffixes: Sequence[str]) -> Path | None:
    """``path`` if a file can be written there, checked before any work: its suffix is one of
    ``suffixes``, it is not a folder, its folder exists or can be made, and it (or, if new, its
    folder) is writable. A :class:`UsageError` naming ``option`` otherwise."""
    if path is None:
        return None
    p = Path(path)
    if p.suffix.lower() not in suffixes:
        raise UsageError(f"{option} {p}: must end in {' or '.join(suffixes)}")
    if p.is_dir():
        raise UsageError(f"{option} {p}: is a folder")
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"{option} {p}: its folder cannot be made ({e.strerror or e})") from None
    try:
        fd, probe = tempfile.mkstemp(dir=p.parent, prefix=f".{p.name}.", suffix=".probe")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise UsageError(f"{option} {p}: its folder {p.parent} is not writable ({e.strerror or e})") from None
    if p.exists() and not os.access(p, os.W_OK):
        raise UsageError(f"{option} {p}: the file is not writable")
    return p


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is when a message comes (not when the handler was made)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def setup_logging(level: str) -> None:
    """ronan_fast's log messages on stderr at ``level``."""
    logger = logging.getLogger("ronan_fast")
    logger.setLevel(level.upper())
    if not any(isinstance(h, _StderrHandler) for h in logger.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("ronan-fast: %(message)s"))
        logger.addHandler(handler)
