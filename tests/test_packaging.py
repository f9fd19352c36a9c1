"""Packaging: the version, the wheels' local version labels, the refusal of a wheel built for another
torch, scripts/build_wheel.sh's argument checks, and the files a wheel must ship.

Building a wheel takes minutes, too long for this suite: .ci/run's wheel phase builds one with
scripts/build_wheel.sh, which checks its contents (scripts/check_wheel.py: the compiled module,
_build_info.py, py.typed, LICENSE, the labelled version), installs it in a fresh environment and
runs the demo and part of this suite against it.
"""

from __future__ import annotations

import importlib.util
import re
import stat
import subprocess
import sys
import tomllib
import types
import zipfile
from pathlib import Path

import pytest
import torch

import ronan_fast
from ronan_fast import _ext
from ronan_fast._version import build_command, cuda_tag, local_label, stamp, torch_minor, wheel_version

ROOT = Path(__file__).resolve().parents[1]
IN_SOURCE_TREE = (ROOT / "pyproject.toml").is_file() and (ROOT / "scripts" / "build_wheel.sh").is_file()
needs_source = pytest.mark.skipif(not IN_SOURCE_TREE, reason="needs the source tree (pyproject.toml, scripts/)")


@pytest.fixture(scope="module")
def check_wheel():
    """scripts/check_wheel.py as a module (scripts/ is not a package)."""
    spec = importlib.util.spec_from_file_location("check_wheel", ROOT / "scripts" / "check_wheel.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ---------------------------------------------------------------------------- version


def test_version_is_0_2_0():
    assert ronan_fast.__version__.split("+")[0] == "0.2.0"


@needs_source
def test_the_build_reads_the_version_that_the_package_has():
    """scikit-build-core's regex provider reads ronan_fast/__init__.py: the same string as __version__."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    provider = config["tool"]["scikit-build"]["metadata"]["version"]
    assert provider == {"provider": "scikit_build_core.metadata.regex", "input": "ronan_fast/__init__.py"}
    # the provider's default regex, as scikit_build_core.metadata.regex has it
    regex = r'(?i)^(__version__|VERSION)(?: ?\: ?str)? *= *([\'"])v?(?P<value>.+?)\2'
    found = re.search(regex, (ROOT / provider["input"]).read_text(), re.MULTILINE)
    assert found and found["value"] == "0.2.0"


@needs_source
def test_the_changelog_has_this_version():
    text = (ROOT / "CHANGELOG.md").read_text()
    released = re.findall(r"^## \[([0-9][^\]]*)\] - (\d{4}-\d\d-\d\d)$", text, re.MULTILINE)
    assert released[0] == ("0.2.0", "2026-12-05")
    assert "0.1.0" in [v for v, _ in released]


@needs_source
def test_project_metadata():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["license"] == "MIT" and project["license-files"] == ["LICENSE"]
    assert project["readme"] == "README.md" and (ROOT / "README.md").is_file()
    assert project["authors"] == [{"name": "The ronan_fast authors"}]
    assert project["requires-python"] == ">=3.11"
    assert not [c for c in project["classifiers"] if c.startswith("License ::")]  # PEP 639: the expression only
    assert "Typing :: Typed" in project["classifiers"]
    assert {"diffusers", "eval", "test"} <= set(project["optional-dependencies"])
    license_text = (ROOT / "LICENSE").read_text()
    assert license_text.startswith("MIT License") and "Copyright (c) 2026 The ronan_fast authors" in license_text


@needs_source
def test_py_typed_and_license_are_where_the_wheel_takes_them_from():
    """wheel.packages ships everything under ronan_fast/ (py.typed too) unless wheel.exclude names it."""
    skb = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["scikit-build"]
    assert skb["wheel"]["packages"] == ["ronan_fast"]
    assert (Path(ronan_fast.__file__).parent / "py.typed").is_file()
    excluded = skb["wheel"].get("exclude", [])
    assert not [p for p in excluded if "py.typed" in p or p in ("**", "*")]


@needs_source
def test_metadata_as_the_build_backend_writes_it(tmp_path, monkeypatch):
    """The wheel's METADATA (no compilation): licence expression and file, version, extras kept."""
    build = pytest.importorskip("scikit_build_core.build")
    monkeypatch.chdir(ROOT)
    dist_info = build.prepare_metadata_for_build_wheel(str(tmp_path))
    metadata = (tmp_path / dist_info / "METADATA").read_text()
    assert re.search(r"^Version: 0\.2\.0$", metadata, re.MULTILINE)
    assert re.search(r"^License-Expression: MIT$", metadata, re.MULTILINE)
    assert re.search(r"^License-File: LICENSE$", metadata, re.MULTILINE)
    assert re.search(r"^Author: The ronan_fast authors$", metadata, re.MULTILINE)
    for extra in ("diffusers", "eval", "test"):
        assert re.search(rf"^Provides-Extra: {extra}$", metadata, re.MULTILINE)


# ---------------------------------------------------------------------------- labels


@pytest.mark.parametrize(("torch_version", "cuda", "label"), [
    ("2.14.1", "13.0", "torch2.14.cu130"),
    ("2.14.1+cu130", "13.0", "torch2.14.cu130"),
    ("2.13.0", None, "torch2.13.cpu"),
    ("2.13.0+cpu", "none", "torch2.13.cpu"),
    ("2.13.0", "cpu", "torch2.13.cpu"),
    ("2.12.0", "12.8", "torch2.12.cu128"),
    ("2.11.0", "11.8", "torch2.11.cu118"),
    ("2.15.0a0+git1a2b3c4", "13.0", "torch2.15.cu130"),
    ("2.14.0rc1", "12.6.3", "torch2.14.cu126"),
    ("10.2.0.post1", "13.1", "torch10.2.cu131"),
])
def test_local_label(torch_version, cuda, label):
    assert local_label(torch_version, cuda) == label
    assert wheel_version("0.2.0", torch_version, cuda) == f"0.2.0+{label}"
    assert wheel_version("0.2.0+torch1.0.cpu", torch_version, cuda) == f"0.2.0+{label}"


@pytest.mark.parametrize("bad", ["", "2", "2.x", "v2.14.1", "2.14.1+", "2.14.1+cu 130", " 2.14.1", "2.14.1\n",
                                 "latest", None, 2.14])
def test_a_bad_torch_version_is_an_error_naming_it(bad):
    with pytest.raises(ValueError, match="torch_version must be a torch release"):
        local_label(bad, "13.0")
    with pytest.raises(ValueError, match="torch_version"):
        torch_minor(bad)


@pytest.mark.parametrize("bad", ["", "13", "cu130", "13.x", "13.0.1.2", "0.9", "gpu", 13.0])
def test_a_bad_cuda_version_is_an_error_naming_it(bad):
    with pytest.raises(ValueError, match="cuda_version must be a CUDA version"):
        local_label("2.14.1", bad)
    with pytest.raises(ValueError, match="cuda_version"):
        cuda_tag(bad)


def test_build_command():
    assert build_command("2.14.1", "13.0") == "bash scripts/build_wheel.sh --torch 2.14.1 --cuda 13.0 --out dist/"
    assert build_command("2.13.0+cpu", None) == "bash scripts/build_wheel.sh --torch 2.13.0+cpu --cuda none --out dist/"
    with pytest.raises(ValueError, match="cuda_version"):
        build_command("2.14.1", "13")


def test_stamp_labels_the_version_line_only(tmp_path):
    init = tmp_path / "__init__.py"
    text = '"""doc: __version__ = "9.9.9" in prose is not the line."""\n\n__version__ = "0.2.0"\n\nX = 1\n'
    init.write_text(text)
    init.chmod(0o640)
    assert stamp(str(init), "2.14.1", "13.0") == "0.2.0+torch2.14.cu130"
    assert init.read_text() == text.replace('__version__ = "0.2.0"', '__version__ = "0.2.0+torch2.14.cu130"')
    assert stat.S_IMODE(init.stat().st_mode) == 0o640
    assert [p.name for p in tmp_path.iterdir()] == ["__init__.py"]  # no temporary file left
    with pytest.raises(ValueError, match="exactly one line"):  # already labelled
        stamp(str(init), "2.14.1", "13.0")


@needs_source
def test_version_script_is_runnable_without_the_package():
    """build_wheel.sh runs ronan_fast/_version.py with a bare interpreter, before any environment exists."""
    script = str(ROOT / "ronan_fast" / "_version.py")
    run = subprocess.run([sys.executable, "-I", script, "label", "--torch", "2.14.1", "--cuda", "13.0"],
                         capture_output=True, text=True)
    assert run.returncode == 0 and run.stdout == "torch2.14.cu130\n"
    run = subprocess.run([sys.executable, "-I", script, "label", "--torch", "2.14.1", "--cuda", "13"],
                         capture_output=True, text=True)
    assert run.returncode == 2 and "--cuda must be a CUDA version" in run.stderr and "'13'" in run.stderr


# ---------------------------------------------------------------------------- refusal at import


def _pretend_built_for(monkeypatch, torch_version, cuda_version):
    fake = types.ModuleType("ronan_fast._build_info")
    fake.TORCH_VERSION, fake.CUDA_VERSION, fake.WITH_CUDA = torch_version, cuda_version, cuda_version is not None
    monkeypatch.setitem(sys.modules, "ronan_fast._build_info", fake)
    monkeypatch.setattr(ronan_fast, "_build_info", fake, raising=False)
    monkeypatch.setattr(_ext, "build_info", _ext.build_info)
    monkeypatch.setattr(_ext, "_C", _ext._C)


def _refusal() -> str:
    with pytest.raises(_ext.ExtensionMismatchError) as info:
        _ext._load()
    assert isinstance(info.value, ImportError)
    return str(info.value)


def test_a_wheel_for_another_torch_says_which_wheel_to_build(monkeypatch):
    _pretend_built_for(monkeypatch, "1.0.0+cu999", "99.9")
    msg = _refusal()
    running_label = local_label(torch.__version__, torch.version.cuda)
    assert "built for torch 1.0.0+cu999 (CUDA 99.9)" in msg and f"but torch {torch.__version__} " in msg
    assert f"labelled {running_label}" in msg
    assert f'"ronan-fast==0.2.0+{running_label}" --find-links' in msg
    assert build_command(torch.__version__, torch.version.cuda) in msg
    cuda = torch.version.cuda or "none"
    assert f"bash scripts/build_wheel.sh --torch {torch.__version__} --cuda {cuda} --out dist/" in msg
    assert "docs/install.md" in msg


def test_the_refusal_for_a_cuda_torch(monkeypatch):
    """Running a CUDA build of torch: the label, the command and the index that has that torch build."""
    monkeypatch.setattr(torch, "__version__", "2.14.1+cu130")
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    _pretend_built_for(monkeypatch, "2.13.0+cpu", None)
    msg = _refusal()
    assert "built for torch 2.13.0+cpu (CUDA none) but torch 2.14.1+cu130 (CUDA 13.0) is running" in msg
    assert "labelled torch2.14.cu130" in msg and '"ronan-fast==0.2.0+torch2.14.cu130"' in msg
    assert ("bash scripts/build_wheel.sh --torch 2.14.1+cu130 --cuda 13.0 --out dist/ "
            "--index-url https://download.pytorch.org/whl/cu130") in msg


def test_the_refusal_when_the_installed_wheel_has_the_right_label(monkeypatch):
    """A wheel of the right label built against another patch release: the label alone is not enough."""
    monkeypatch.setattr(torch, "__version__", "2.14.1")
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(ronan_fast, "__version__", "0.2.0+torch2.14.cu130")
    _pretend_built_for(monkeypatch, "2.14.0", "13.0")
    msg = _refusal()
    assert "bash scripts/build_wheel.sh --torch 2.14.1 --cuda 13.0 --out dist/." in msg  # no index: no local part
    assert "carries that label but was built against another torch release" in msg
    assert "against torch 2.14.1 itself" in msg


def test_the_refusal_for_a_torch_without_a_label(monkeypatch):
    monkeypatch.setattr(torch, "__version__", "nightly")
    _pretend_built_for(monkeypatch, "2.13.0+cpu", None)
    msg = _refusal()
    assert "Rebuild it against the running torch" in msg
    assert "pip install --no-build-isolation --no-deps --force-reinstall ." in msg


# ---------------------------------------------------------------------------- build_wheel.sh arguments


@needs_source
@pytest.mark.parametrize(("args", "says"), [
    ([], "--torch is required"),
    (["--torch", "2.13.0"], "--cuda is required"),
    (["--torch", "2.x", "--cuda", "none"], "--torch must be a torch release"),
    (["--torch", "2.13.0", "--cuda", "13"], "--cuda must be a CUDA version"),
    (["--torch", "2.13.0", "--cuda", "none", "--arch", "8.0"], "--arch '8.0' names GPU architectures"),
    (["--torch", "2.14.1", "--cuda", "13.0", "--arch", "8.0;sm_90"], "--arch: 'sm_90' is not an architecture"),
    (["--torch", "2.14.1", "--cuda", "13.0", "--arch", "8.0;;9.0"], "--arch: '' is not an architecture"),
    (["--torch", "2.13.0", "--cuda", "none", "--jobs", "two"], "--jobs must be a positive integer"),
    (["--torch", "2.13.0", "--cuda", "none", "--out"], "--out needs a value"),
    (["--torch", "2.13.0", "--cuda", "none", "--out", "pyproject.toml"], "--out 'pyproject.toml' exists and is not"),
    (["--torch", "2.13.0", "--cuda", "none", "--python", "no-such-python3"], "--python: 'no-such-python3'"),
    (["--torch", "2.13.0", "--cuda", "none", "--frobnicate"], "unknown argument '--frobnicate'"),
    (["--torch=2.x", "--cuda=none"], "--torch must be a torch release"),
])
def test_build_wheel_refuses_bad_arguments_naming_them(args, says):
    args = ["--python", sys.executable, *args]  # a later --python wins
    run = subprocess.run(["bash", str(ROOT / "scripts" / "build_wheel.sh"), *args], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 2, run.stderr
    assert says in run.stderr
    assert run.stdout == ""  # nothing was started


@needs_source
def test_build_wheel_help_lists_every_option():
    script = (ROOT / "scripts" / "build_wheel.sh").read_text()
    parsed = set(re.findall(r"--[a-z-]+", script.split("while [ $# -gt 0 ]", 1)[1].split("esac", 1)[0]))
    run = subprocess.run(["bash", str(ROOT / "scripts" / "build_wheel.sh"), "--help"], capture_output=True, text=True)
    assert run.returncode == 0
    documented = set(re.findall(r"^  (--[a-z-]+)", run.stdout, re.MULTILINE))
    assert documented == parsed - {"--help"}


# ---------------------------------------------------------------------------- check_wheel.py


@needs_source
def test_check_wheel_reads_architecture_lists(check_wheel):
    assert check_wheel.expected_archs("8.0;8.6;9.0+PTX") == ({80, 86, 90}, {90})
    assert check_wheel.expected_archs("9.0a") == ({90}, set())
    with pytest.raises(ValueError, match="--arch"):
        check_wheel.expected_archs("sm_90")


@needs_source
def test_check_wheel_finds_what_a_wheel_lacks(tmp_path, check_wheel):
    """A wheel without py.typed, LICENSE or a compiled module, with a _build_info of another torch, fails."""
    wheel = tmp_path / "ronan_fast-0.2.0+torch2.13.cpu-cp311-cp311-linux_x86_64.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("ronan_fast/__init__.py", '__version__ = "0.2.0"\n')
        zf.writestr("ronan_fast/_build_info.py", 'TORCH_VERSION = "1.0.0"\nCUDA_VERSION = None\nWITH_CUDA = False\n')
        zf.writestr("ronan_fast-0.2.0+torch2.13.cpu.dist-info/METADATA", "Name: ronan-fast\nVersion: 0.2.0\n")
        zf.writestr("ronan_fast/__pycache__/x.cpython-311.pyc", b"")
    problems = "\n".join(check_wheel.check(str(wheel), "0.2.0+torch2.13.cpu", "none", None))
    for lack in ("expected one ronan_fast/_C*.so", "no ronan_fast/py.typed", "no LICENSE",
                 "compiled Python files", "METADATA says Version 0.2.0, expected 0.2.0+torch2.13.cpu",
                 "ronan_fast.__version__ is '0.2.0' in the wheel",
                 f"TORCH_VERSION = '1.0.0', expected {torch.__version__!r}"):
        assert lack in problems
