#!/usr/bin/env bash
# Set up ronan_fast in ./.venv on a fresh machine and run it:
#
#   bash run.sh test [pytest args]   # build and install, then run the test suite (or pytest args)
#   bash run.sh demo [args]          # build and install, then run `ronan-fast demo`
#
# The first run creates .venv (torch 2.13.0 CPU, the build tools, the package with its test,
# diffusers and eval extras); later runs reinstall only when the sources changed.
# RONAN_FAST_VENV picks another virtual environment.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
CALLER_PWD=$PWD
VENV=${RONAN_FAST_VENV:-$ROOT/.venv}
TORCH_VERSION=2.13.0
PY=$VENV/bin/python

log() { printf '[run.sh] %s\n' "$*" >&2; }
pip_q() {
  # This machine's pip configuration names local indexes that may be absent: drop that noise.
  "$PY" -m pip --disable-pip-version-check -q "$@" 2> >(grep -v "^WARNING: Location 'file:" >&2)
}

usage() {
  sed -n '2,6p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2
  exit 2
}

ensure_python() {
  if [ ! -x "$PY" ]; then
    python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
      || { log "python3 is $(python3 --version 2>&1); ronan_fast needs Python >= 3.11"; exit 1; }
    log "creating $VENV"
    python3 -m venv "$VENV"
  fi
  if ! "$PY" -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '$TORCH_VERSION')" 2>/dev/null; then
    log "installing torch==$TORCH_VERSION"
    pip_q install "torch==$TORCH_VERSION"
  fi
  if ! "$PY" - <<'EOF' 2>/dev/null; then
import importlib.metadata as md, sys
import numpy, scikit_build_core, pybind11, ninja
sys.exit(tuple(int(x) for x in md.version("cmake").split(".")[:2]) < (3, 26))
EOF
    log "installing the build tools"
    pip_q install numpy scikit-build-core pybind11 'cmake>=3.26' ninja
  fi
}

source_stamp() {
  # Everything the installed package is made from, and what it is built against.
  local files
  if git -C "$ROOT" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    files=$(cd "$ROOT" && git ls-files -co --exclude-standard -- pyproject.toml CMakeLists.txt csrc ronan_fast)
  else
    files=$(cd "$ROOT" && find pyproject.toml CMakeLists.txt csrc ronan_fast -type f -not -path '*/__pycache__/*')
  fi
  {
    "$PY" -c 'import sys, torch; print(sys.version, torch.__version__)'
    (cd "$ROOT" && printf '%s\n' "$files" | LC_ALL=C sort | while IFS= read -r f; do
      if [ -f "$f" ]; then sha256sum "$f"; fi
    done)
  } | sha256sum | cut -d' ' -f1
}

ensure_installed() {
  local stamp_file=$VENV/.ronan-fast-stamp stamp tag
  stamp=$(source_stamp)
  if [ -f "$stamp_file" ] && [ "$(cat "$stamp_file")" = "$stamp" ] \
      && PYTHONSAFEPATH=1 "$PY" -c 'from ronan_fast import _ext; assert _ext._C' 2>/dev/null; then
    return
  fi
  # A build directory per environment keeps rebuilds incremental.
  tag=$("$PY" -c 'import sys, hashlib, torch; print(f"cp{sys.version_info[0]}{sys.version_info[1]}-torch{torch.__version__}-" + hashlib.sha256(sys.prefix.encode()).hexdigest()[:8])')
  log "building and installing ronan_fast (build/$tag)"
  (cd "$ROOT" && pip_q install --no-build-isolation -C "build-dir=build/$tag" '.[test,diffusers,eval]')
  echo "$stamp" > "$stamp_file"
}

ensure_data() {
  [ -d /usr/share/datasets/fashion-mnist ] && return
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    log "installing dataset-fashion-mnist"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 \
      || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1; } \
      || log "could not install dataset-fashion-mnist; the tests that read it will not run"
  else
    log "note: Fashion-MNIST is missing; install it with: sudo apt-get install dataset-fashion-mnist"
  fi
}

ensure_chromium() {
  # The HTML report's tests open it in a headless Chromium.
  command -v chromium >/dev/null || command -v chromium-browser >/dev/null || [ -n "${RONAN_FAST_CHROMIUM:-}" ] && return
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    log "installing chromium"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -q chromium >/dev/null 2>&1 \
      || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q chromium >/dev/null 2>&1; } \
      || log "could not install chromium; the HTML report's browser tests will not run"
  else
    log "note: Chromium is missing; install it with: sudo apt-get install chromium"
  fi
}

[ $# -ge 1 ] || usage
cmd=$1
shift
case $cmd in
  test)
    ensure_python
    ensure_installed
    ensure_data
    ensure_chromium
    cd "$ROOT"
    # PYTHONSAFEPATH keeps the source tree (which has no compiled _C) from shadowing the
    # installed package; RONAN_FAST_REQUIRE_EXT makes a missing extension a failure.
    [ $# -gt 0 ] || set -- tests
    RONAN_FAST_REQUIRE_EXT=1 PYTHONSAFEPATH=1 exec "$PY" -m pytest -q "$@"
    ;;
  demo)
    ensure_python
    ensure_installed
    cd "$CALLER_PWD"
    PYTHONSAFEPATH=1 exec "$VENV/bin/ronan-fast" demo "$@"
    ;;
  *)
    usage
    ;;
esac
