"""Check a built ronan_fast wheel; scripts/build_wheel.sh runs it in the wheel's build environment.

    python scripts/check_wheel.py WHEEL --version 0.2.0+torch2.14.cu130 --cuda 13.0 --arch "8.0;9.0"

Checks that the wheel holds what a user needs (the compiled module, ``_build_info.py``, ``py.typed``,
the licence, the labelled version in its metadata and in ``ronan_fast.__version__``), that
``_build_info.py`` names the running torch and CUDA (the build environment's) with CUDA kernels
exactly when ``--cuda`` is not none, that with ``--arch`` the module's CUDA device code is for those
architectures, and that the unpacked wheel imports with its kernels registered. No GPU is needed.
Exits 1 with one line per failed check.
"""

from __future__ import annotations

import argparse
import ast
import os
import re
import struct
import subprocess
import sys
import tempfile
import zipfile


def read_assignments(source: str) -> dict[str, object]:
    """``NAME = literal`` lines of a generated module, read without running it."""
    values = {}
    for node in ast.parse(source).body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            try:
                values[node.targets[0].id] = ast.literal_eval(node.value)
            except ValueError:
                pass
    return values


def fatbin_archs(elf: bytes) -> tuple[set[int], set[int]]:
    """The SM versions of the device code in an ELF's ``.nv_fatbin`` section: (cubins, PTX).

    Reads the fat binary's container headers (magic 0xBA55ED50, then entries of kind 1 = PTX and
    2 = ELF cubin, each with its SM version as 10 * major + minor). Empty sets if there is none.
    """
    if elf[:4] != b"\x7fELF" or elf[4] != 2:
        raise ValueError("not a 64-bit ELF file")
    (shoff,) = struct.unpack_from("<Q", elf, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", elf, 0x3A)
    sections = [struct.unpack_from("<IIQQQQ", elf, shoff + i * shentsize) for i in range(shnum)]
    names_off = sections[shstrndx][4]

    def name(sec):
        start = names_off + sec[0]
        return elf[start:elf.index(b"\0", start)].decode()

    cubins: set[int] = set()
    ptx: set[int] = set()
    for sec in sections:
        if name(sec) != ".nv_fatbin":
            continue
        data = elf[sec[4]:sec[4] + sec[5]]
        pos = 0
        while pos + 16 <= len(data):
            magic, _version, header_size, fat_size = struct.unpack_from("<IHHQ", data, pos)
            if magic != 0xBA55ED50:
                pos += 8  # containers are 8-byte aligned; skip padding
                continue
            entry, end = pos + header_size, pos + header_size + fat_size
            while entry + 32 <= end:
                kind, _v, entry_header, payload = struct.unpack_from("<HHII", data, entry)
                (sm,) = struct.unpack_from("<I", data, entry + 28)
                (ptx if kind == 1 else cubins).add(sm)
                if entry_header == 0:
                    break
                entry += entry_header + payload
            pos = end
    return cubins, ptx


def expected_archs(arch: str) -> tuple[set[int], set[int]]:
    """``8.0;9.0+PTX`` -> cubins {80, 90}, PTX {90}."""
    cubins, ptx = set(), set()
    for a in arch.split(";"):
        m = re.fullmatch(r"([0-9]+)\.([0-9])[a-z]?(\+PTX)?", a.strip())
        if m is None:
            raise ValueError(f"--arch: cannot read {a!r}")
        sm = int(m[1]) * 10 + int(m[2])
        cubins.add(sm)
        if m[3]:
            ptx.add(sm)
    return cubins, ptx


LOAD_CHECK = """
import sys, torch
import ronan_fast
from ronan_fast import _ext, ops
where, want_cuda = sys.argv[1], sys.argv[2] == "1"
assert ronan_fast.__file__.startswith(where), f"imported {ronan_fast.__file__}, not the unpacked wheel in {where}"
assert _ext._C is not None, _ext.why_unavailable(torch.device("cpu"))
assert _ext._C.WITH_CUDA == want_cuda, f"_C.WITH_CUDA is {_ext._C.WITH_CUDA}"
for op in ("recon_loss_grad", "latent_adam_step_", "best_over_restarts"):
    for key in ("CPU", "CUDA") if want_cuda else ("CPU",):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"ronan_fast::{op}", key), f"no {key} kernel for {op}"
loss, row = ops.best_over_restarts(torch.tensor([0.3, 0.1, 0.2]), torch.tensor([0, 0, 1]), 2, impl="ext")
assert row.tolist() == [1, 2], row
print(f"ronan_fast {ronan_fast.__version__} imports from the unpacked wheel; kernels registered for "
      + ("CPU and CUDA" if want_cuda else "CPU"))
"""


def check(wheel: str, version: str, cuda: str, arch: str | None) -> list[str]:
    import torch  # the build environment's

    problems: list[str] = []
    base = os.path.basename(wheel)
    if not base.startswith(f"ronan_fast-{version}-"):
        problems.append(f"the wheel's file name {base} does not start with ronan_fast-{version}-")
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        so = [n for n in names if re.fullmatch(r"ronan_fast/_C\..*\.so", n)]
        if len(so) != 1:
            problems.append(f"expected one ronan_fast/_C*.so, found {so}")
        for need in ("ronan_fast/_build_info.py", "ronan_fast/py.typed", "ronan_fast/__init__.py"):
            if need not in names:
                problems.append(f"no {need}")
        if not any(re.fullmatch(r"ronan_fast-[^/]*\.dist-info/(licenses/)?LICENSE", n) for n in names):
            problems.append("no LICENSE in the .dist-info folder")
        stray = [n for n in names if "__pycache__" in n or n.endswith(".pyc")]
        if stray:
            problems.append(f"compiled Python files in the wheel: {stray[:3]}")
        metadata = [n for n in names if re.fullmatch(r"ronan_fast-[^/]*\.dist-info/METADATA", n)]
        if metadata:
            text = zf.read(metadata[0]).decode()
            got = re.search(r"^Version: (.*)$", text, re.MULTILINE)
            if not got or got[1] != version:
                problems.append(f"METADATA says Version {got[1] if got else None}, expected {version}")
        else:
            problems.append("no METADATA")
        if "ronan_fast/__init__.py" in names:
            got = read_assignments(zf.read("ronan_fast/__init__.py").decode()).get("__version__")
            if got != version:
                problems.append(f"ronan_fast.__version__ is {got!r} in the wheel, expected {version!r}")
        if "ronan_fast/_build_info.py" in names:
            info = read_assignments(zf.read("ronan_fast/_build_info.py").decode())
            want = {"TORCH_VERSION": torch.__version__, "CUDA_VERSION": torch.version.cuda,
                    "WITH_CUDA": cuda != "none"}
            for key, value in want.items():
                if info.get(key, "<missing>") != value:
                    problems.append(f"_build_info.py says {key} = {info.get(key, '<missing>')!r}, expected {value!r}")
            print(f"_build_info.py: torch {info.get('TORCH_VERSION')}, CUDA {info.get('CUDA_VERSION')}, "
                  f"WITH_CUDA = {info.get('WITH_CUDA')}")
        if arch and len(so) == 1:
            cubins, ptx = fatbin_archs(zf.read(so[0]))
            want_cubins, want_ptx = expected_archs(arch)
            print(f"{so[0]}: device code for sm {sorted(cubins)}, PTX for {sorted(ptx) or 'none'}")
            if cubins != want_cubins or not want_ptx <= ptx:
                problems.append(f"--arch {arch} asks for sm {sorted(want_cubins)} and PTX for {sorted(want_ptx)}, "
                                f"the module holds sm {sorted(cubins)} and PTX for {sorted(ptx)}")
        if problems:
            return problems
        with tempfile.TemporaryDirectory() as site:
            zf.extractall(site)
            env = dict(os.environ, PYTHONPATH=site, PYTHONSAFEPATH="1")
            run = subprocess.run([sys.executable, "-c", LOAD_CHECK, site, "1" if cuda != "none" else "0"],
                                 cwd=site, env=env, capture_output=True, text=True)
            sys.stdout.write(run.stdout)
            if run.returncode:
                problems.append(f"the unpacked wheel does not load:\n{run.stderr.strip()}")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Check a built ronan_fast wheel.")
    parser.add_argument("wheel")
    parser.add_argument("--version", required=True, help="the version the wheel must carry, label included")
    parser.add_argument("--cuda", required=True, help="CUDA version it was built for, or none")
    parser.add_argument("--arch", help="the GPU architectures it was built for (TORCH_CUDA_ARCH_LIST form)")
    args = parser.parse_args(argv)
    problems = check(args.wheel, args.version, args.cuda, args.arch)
    for p in problems:
        print(f"check_wheel.py: {p}", file=sys.stderr)
    if not problems:
        print(f"{os.path.basename(args.wheel)}: checks passed")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
