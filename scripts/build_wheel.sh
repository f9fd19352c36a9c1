#!/usr/bin/env bash
# Build a ronan_fast wheel for one torch release and CUDA version (or none) and a chosen list of GPU
# architectures, in a fresh virtual environment of that torch, and check it:
#
#   bash scripts/build_wheel.sh --torch 2.14.1 --cuda 13.0 --arch "8.0;9.0" --out dist/
#       -> dist/ronan_fast-0.2.0+torch2.14.cu130-cp311-cp311-linux_x86_64.whl
#   bash scripts/build_wheel.sh --torch 2.13.0 --cuda none --out dist/
#       -> dist/ronan_fast-0.2.0+torch2.13.cpu-cp311-cp311-linux_x86_64.whl
#
# The wheel's version carries a local label naming torch's major.minor and the CUDA version, so
# wheels for several torch/CUDA pairs can share one folder or index; its compiled module loads only
# under the exact torch release it was built against (ronan_fast/_ext.py checks at import).
#
# options:
#   --torch VERSION    torch release to build against, as pip names it: 2.14.1, or 2.14.1+cu130 (required)
#   --cuda VERSION     CUDA version of that torch build, e.g. 13.0, or none for a CPU wheel (required);
#                      a CUDA wheel needs nvcc of the same major version on PATH (or CUDACXX)
#   --arch LIST        GPU architectures in TORCH_CUDA_ARCH_LIST form, e.g. "8.0;9.0" or "8.0;8.6;9.0+PTX"
#                      (default "8.0;8.6;9.0+PTX"; +PTX adds PTX that newer GPUs compile at load time)
#   --out DIR          where the wheel goes (default dist/)
#   --python PYTHON    interpreter of the build environment; it decides the wheel's cpXY tag (default python3)
#   --index-url URL    index to install torch from, e.g. https://download.pytorch.org/whl/cu130
#                      (default: pip's configured index)
#   --jobs N           parallel compile jobs (default: the number of CPUs)
#   --work DIR         build in DIR (build environment in DIR/venv, build tree in DIR/build) and keep it;
#                      by default a temporary folder, removed at the end
#   -h, --help         this text
#
# The source tree is not modified: the build runs on a copy whose __version__ carries the label.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
ME=build_wheel.sh
DEFAULT_ARCH="8.0;8.6;9.0+PTX"  # CMakeLists.txt's default too

usage() { sed -n '2,/^# The source tree/p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }
die() { echo "$ME: error: $*" >&2; exit 2; }
fail() { echo "$ME: $*" >&2; exit 1; }
log() { echo "[$ME] $*"; }

TORCH="" CUDA="" ARCH="" OUT=dist/ PY=python3 INDEX_URL="" JOBS="" WORK=""
while [ $# -gt 0 ]; do
  opt=$1
  case $opt in
    --*=*) shift; set -- "${opt%%=*}" "${opt#*=}" "$@"; continue ;;
    -h|--help) usage; exit 0 ;;
    --torch|--cuda|--arch|--out|--python|--index-url|--jobs|--work)
      [ $# -ge 2 ] || die "$opt needs a value"
      val=$2
      [ -n "$val" ] || die "$opt needs a non-empty value"
      case $opt in
        --torch) TORCH=$val ;; --cuda) CUDA=$val ;; --arch) ARCH=$val ;; --out) OUT=$val ;;
        --python) PY=$val ;; --index-url) INDEX_URL=$val ;; --jobs) JOBS=$val ;; --work) WORK=$val ;;
      esac
      shift 2 ;;
    *) die "unknown argument '$opt' (see --help)" ;;
  esac
done

# ---------------------------------------------------------------------------- arguments

[ -n "$TORCH" ] || die "--torch is required, e.g. --torch 2.14.1"
[ -n "$CUDA" ] || die "--cuda is required: a CUDA version such as 13.0, or none for a CPU wheel"
command -v "$PY" >/dev/null || die "--python: '$PY' is not an executable on PATH"
"$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null \
  || die "--python: ronan_fast needs Python >= 3.11, '$PY' is $("$PY" --version 2>&1)"
LABEL=$("$PY" -I "$ROOT/ronan_fast/_version.py" label --torch "$TORCH" --cuda "$CUDA" 2>&1) \
  || die "${LABEL##*error: }"
case $CUDA in none|cpu|NONE|CPU) CUDA=none ;; esac
if [ "$CUDA" = none ]; then
  [ -z "$ARCH" ] || die "--arch '$ARCH' names GPU architectures, but --cuda none builds a CPU wheel"
else
  ARCH=${ARCH:-$DEFAULT_ARCH}
  IFS=';' read -r -a _archs <<< "$ARCH"
  [ ${#_archs[@]} -gt 0 ] || die "--arch must list at least one architecture, e.g. \"8.0;9.0\""
  for a in "${_archs[@]}"; do
    [[ $a =~ ^[1-9][0-9]*\.[0-9][a-z]?(\+PTX)?$ ]] \
      || die "--arch: '$a' is not an architecture like 8.0, 9.0a or 9.0+PTX (list them separated by ';')"
  done
fi
if [ -z "$JOBS" ]; then
  JOBS=$(nproc 2>/dev/null || echo 2)
fi
[[ $JOBS =~ ^[1-9][0-9]*$ ]] || die "--jobs must be a positive integer, got '$JOBS'"
[ ! -e "$OUT" ] || [ -d "$OUT" ] || die "--out '$OUT' exists and is not a folder"
[ -z "$WORK" ] || [ ! -e "$WORK" ] || [ -d "$WORK" ] || die "--work '$WORK' exists and is not a folder"

if [ "$CUDA" != none ]; then
  NVCC=${CUDACXX:-nvcc}
  command -v "$NVCC" >/dev/null \
    || fail "--cuda $CUDA needs nvcc (CUDA $CUDA) on PATH or in CUDACXX to compile the CUDA kernels; none found"
  nvcc_version=$("$NVCC" --version | sed -n 's/.*release \([0-9][0-9]*\.[0-9][0-9]*\).*/\1/p')
  [ "${nvcc_version%%.*}" = "${CUDA%%.*}" ] \
    || fail "--cuda $CUDA: $NVCC is CUDA ${nvcc_version:-of unknown version}; the kernels must be compiled by nvcc of the CUDA major version torch was built with"
fi

BASE=$(sed -n 's/^__version__ = "\([^"]*\)"$/\1/p' "$ROOT/ronan_fast/__init__.py")
[ -n "$BASE" ] || fail "no __version__ line in $ROOT/ronan_fast/__init__.py"
VERSION="${BASE%%+*}+$LABEL"
log "ronan_fast $VERSION: torch $TORCH, CUDA $CUDA$([ "$CUDA" = none ] || echo ", architectures $ARCH"), $("$PY" --version 2>&1), $JOBS jobs -> $OUT"

# ---------------------------------------------------------------------------- build environment

if [ -n "$WORK" ]; then
  mkdir -p "$WORK"
  WORK=$(cd "$WORK" && pwd)
else
  WORK=$(mktemp -d "${TMPDIR:-/tmp}/ronan-fast-wheel.XXXXXX")
  trap 'rm -rf "$WORK"' EXIT
fi
VENV=$WORK/venv
VPY=$VENV/bin/python
pip_q() {
  # pip's configuration may name local indexes that are absent: drop that noise, keep the rest.
  "$VPY" -m pip --disable-pip-version-check -q "$@" 2> >(grep -v "^WARNING: Location 'file:" >&2)
}

rm -rf "$VENV"
log "fresh build environment in $VENV: torch==$TORCH${INDEX_URL:+ from $INDEX_URL}"
"$PY" -m venv "$VENV"
pip_q install "torch==$TORCH" ${INDEX_URL:+--index-url "$INDEX_URL"}
pip_q install numpy 'scikit-build-core>=0.11' pybind11 'cmake>=3.26' ninja
"$VPY" - "$TORCH" "$CUDA" "$INDEX_URL" <<'EOF' || exit 1
import sys, torch
want_torch, want_cuda, index = sys.argv[1:]
have_cuda = torch.version.cuda or "none"
where = f" from {index}" if index else ""
if want_torch != torch.__version__ and want_torch != torch.__version__.split("+")[0]:
    sys.exit(f"build_wheel.sh: --torch {want_torch}: pip installed torch {torch.__version__}{where}")
if have_cuda.split(".")[:2] != want_cuda.split(".")[:2]:
    sys.exit(f"build_wheel.sh: --cuda {want_cuda}: torch {torch.__version__}{where} was built with CUDA {have_cuda}; "
             "install the torch build for that CUDA with --index-url (e.g. https://download.pytorch.org/whl/"
             f"cu{want_cuda.replace('.', '')}) or pass --cuda {have_cuda}")
print(f"[build_wheel.sh] torch {torch.__version__}, CUDA {have_cuda}")
EOF

# ---------------------------------------------------------------------------- a labelled copy of the source

SRC=$WORK/src
rm -rf "$SRC" "$WORK/wheel"
mkdir -p "$SRC" "$WORK/wheel"
# What the wheel is made of (pyproject.toml's readme and license files included), without build
# products of an in-place build; .gitignore goes along because scikit-build-core honours it.
parts=(pyproject.toml CMakeLists.txt README.md LICENSE csrc ronan_fast)
if [ -f "$ROOT/.gitignore" ]; then parts+=(.gitignore); fi
tar -C "$ROOT" --exclude=__pycache__ --exclude='*.pyc' --exclude='*.so' --exclude=ronan_fast/_build_info.py \
  -cf - "${parts[@]}" | tar -C "$SRC" -xf -
stamped=$("$VPY" -I "$SRC/ronan_fast/_version.py" stamp --torch "$TORCH" --cuda "$CUDA" "$SRC/ronan_fast/__init__.py")
[ "$stamped" = "$VERSION" ] || fail "the source copy says $stamped, expected $VERSION"

# ---------------------------------------------------------------------------- build

if [ "$CUDA" = none ]; then
  cuda_switch=OFF
else
  cuda_switch=ON  # fail if the CUDA kernels cannot be built instead of falling back to CPU only
fi
log "building (RONAN_FAST_CUDA=$cuda_switch${ARCH:+, RONAN_FAST_CUDA_ARCHS=$ARCH})"
start=$(date +%s)
(
  unset CUDAARCHS CMAKE_CUDA_ARCHITECTURES
  export RONAN_FAST_CUDA=$cuda_switch CMAKE_BUILD_PARALLEL_LEVEL=$JOBS PATH="$VENV/bin:$PATH"
  if [ "$CUDA" = none ]; then
    unset RONAN_FAST_CUDA_ARCHS TORCH_CUDA_ARCH_LIST
  else
    export RONAN_FAST_CUDA_ARCHS=$ARCH TORCH_CUDA_ARCH_LIST=$ARCH
  fi
  "$VPY" -m pip --disable-pip-version-check wheel -q --no-build-isolation --no-deps \
    -C build-dir="$WORK/build" -w "$WORK/wheel" "$SRC" 2> >(grep -v "^WARNING: Location 'file:" >&2)
) || fail "the build failed (output above)"
log "built in $(( $(date +%s) - start ))s"

# ---------------------------------------------------------------------------- check and deliver

shopt -s nullglob
wheels=("$WORK"/wheel/ronan_fast-*.whl)
[ ${#wheels[@]} -eq 1 ] || fail "expected one wheel in $WORK/wheel, found ${#wheels[@]}"
wheel=${wheels[0]}
"$VPY" -I "$ROOT/scripts/check_wheel.py" "$wheel" --version "$VERSION" --cuda "$CUDA" ${ARCH:+--arch "$ARCH"} \
  || fail "$(basename "$wheel") failed its checks (above)"

mkdir -p "$OUT"
name=$(basename "$wheel")
cp "$wheel" "$OUT/.$name.tmp.$$"
mv -f "$OUT/.$name.tmp.$$" "$OUT/$name"
log "wrote $OUT/$name"
