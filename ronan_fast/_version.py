"""Local version labels of ronan_fast wheels: which torch and CUDA a wheel was built for.

A wheel's compiled module loads only under the torch it was built against, so wheels for several
torch/CUDA pairs carry a PEP 440 local version label that names both, and can sit in one index::

    0.2.0+torch2.14.cu130   # torch 2.14 with CUDA 13.0
    0.2.0+torch2.13.cpu     # torch 2.13 without CUDA

``scripts/build_wheel.sh`` runs this file to compute the label (it needs only the standard
library, so it runs before any build environment exists)::

    python3 -I ronan_fast/_version.py label --torch 2.14.1 --cuda 13.0      # torch2.14.cu130
    python3 -I ronan_fast/_version.py stamp --torch 2.14.1 --cuda 13.0 FILE  # label FILE's __version__

and ``ronan_fast._ext`` uses it to say which wheel to build when it refuses one built for another torch.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile

#: A torch release as ``torch.__version__`` or pip writes it: ``2.14.1``, ``2.14.1+cu130``, ``2.15.0a0+git1a2b3c``.
_TORCH = re.compile(
    r"(?P<major>0|[1-9][0-9]*)\.(?P<minor>0|[1-9][0-9]*)(?:\.[0-9]+)*"
    r"(?:(?:a|b|rc)[0-9]+)?(?:\.post[0-9]+)?(?:\.dev[0-9]+)?(?:\+[A-Za-z0-9]+(?:\.[A-Za-z0-9]+)*)?"
)
#: A CUDA version as ``torch.version.cuda`` writes it: ``13.0``, ``12.8``, ``11.8``.
_CUDA = re.compile(r"(?P<major>[1-9][0-9]*)\.(?P<minor>[0-9]+)(?:\.[0-9]+)?")
#: How a CPU build is named on the command line (``--cuda none``).
CPU_NAMES = ("none", "cpu")
#: ``__version__ = "..."`` as ronan_fast/__init__.py writes it (the line scikit-build-core reads).
_VERSION_LINE = re.compile(r'^__version__ = "(?P<version>[^"+]+)"$', re.MULTILINE)


def torch_minor(torch_version: str) -> str:
    """``2.14`` for ``2.14.1`` or ``2.14.1+cu130``; ValueError naming ``torch_version`` for anything else."""
    m = _TORCH.fullmatch(torch_version) if isinstance(torch_version, str) else None
    if m is None:
        raise ValueError(
            f"torch_version must be a torch release such as 2.14.1 or 2.14.1+cu130, got {torch_version!r}"
        )
    return f"{m['major']}.{m['minor']}"


def cuda_tag(cuda_version: str | None) -> str:
    """``cu130`` for CUDA ``13.0``, ``cpu`` for None, ``none`` or ``cpu``; ValueError naming ``cuda_version``."""
    if cuda_version is None or (isinstance(cuda_version, str) and cuda_version.lower() in CPU_NAMES):
        return "cpu"
    m = _CUDA.fullmatch(cuda_version) if isinstance(cuda_version, str) else None
    if m is None:
        raise ValueError(
            f"cuda_version must be a CUDA version such as 13.0 or 12.8, or none for a CPU build, got {cuda_version!r}"
        )
    return f"cu{m['major']}{m['minor']}"


def local_label(torch_version: str, cuda_version: str | None) -> str:
    """The local version label of a wheel built for this torch and CUDA.

    >>> local_label("2.14.1", "13.0")
    'torch2.14.cu130'
    >>> local_label("2.13.0+cpu", None)
    'torch2.13.cpu'
    """
    return f"torch{torch_minor(torch_version)}.{cuda_tag(cuda_version)}"


def public_version(version: str) -> str:
    """``0.2.0`` for ``0.2.0`` or ``0.2.0+torch2.14.cu130``."""
    return version.split("+", 1)[0]


def wheel_version(version: str, torch_version: str, cuda_version: str | None) -> str:
    """``0.2.0+torch2.14.cu130``: ``version``'s public part with the label of this torch and CUDA."""
    return f"{public_version(version)}+{local_label(torch_version, cuda_version)}"


def build_command(torch_version: str, cuda_version: str | None, out: str = "dist/") -> str:
    """The ``scripts/build_wheel.sh`` command line that builds the wheel for this torch and CUDA."""
    local_label(torch_version, cuda_version)  # checks both
    cuda = "none" if cuda_tag(cuda_version) == "cpu" else cuda_version
    return f"bash scripts/build_wheel.sh --torch {torch_version} --cuda {cuda} --out {out}"


def stamp(path: str, torch_version: str, cuda_version: str | None) -> str:
    """Rewrite the ``__version__`` line of ``path`` (a copy of ronan_fast/__init__.py) to carry the label.

    Returns the new version. The file is replaced atomically; it must hold exactly one such line
    with no label yet.
    """
    with open(path, encoding="utf-8") as f:
        text = f.read()
    found = list(_VERSION_LINE.finditer(text))
    if len(found) != 1:
        raise ValueError(f'{path} must hold exactly one line __version__ = "X.Y.Z" without a label, '
                         f"found {len(found)}")
    version = wheel_version(found[0]["version"], torch_version, cuda_version)
    text = text[: found[0].start()] + f'__version__ = "{version}"' + text[found[0].end():]
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), prefix=".version-")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, os.stat(path).st_mode & 0o7777)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return version


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="_version.py", description="The local version label of a ronan_fast wheel for a torch and CUDA."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_text in (("label", "print the label, e.g. torch2.14.cu130"),
                            ("stamp", "add the label to the __version__ line of FILE and print the new version")):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--torch", required=True, help="torch version, e.g. 2.14.1")
        p.add_argument("--cuda", required=True, help="CUDA version, e.g. 13.0, or none")
        if name == "stamp":
            p.add_argument("file", metavar="FILE", help="a copy of ronan_fast/__init__.py")
    args = parser.parse_args(argv)
    try:
        torch_minor(args.torch)
    except ValueError:
        parser.error(f"--torch must be a torch release such as 2.14.1 or 2.14.1+cu130, got {args.torch!r}")
    try:
        cuda_tag(args.cuda)
    except ValueError:
        parser.error(f"--cuda must be a CUDA version such as 13.0 or 12.8, or none, got {args.cuda!r}")
    if args.command == "label":
        print(local_label(args.torch, args.cuda))
    else:
        try:
            print(stamp(args.file, args.torch, args.cuda))
        except (OSError, ValueError) as exc:
            print(f"_version.py: error: {exc}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
