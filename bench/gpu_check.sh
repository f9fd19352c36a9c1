#!/usr/bin/env bash
# Check the CUDA kernels on a machine with an NVIDIA GPU and no package registry: build and
# install ronan_fast into the machine's Python (its torch, scikit-build-core, pybind11, cmake
# and ninja), run tests/test_ops.py with its CUDA cases, then print accuracy and timings of the
# kernels against the references (bench/gpu_check.py), also to $OUT/gpu_check.md when OUT is set.
# Fails loudly when any step or check fails.
#
#   bash bench/gpu_check.sh [gpu_check.py args]
#   bash bench/gpu_check.sh --cpu [args]   # no build, no GPU: the installed package's CPU kernels
#
# PYTHON picks the interpreter (default: python3).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1

fail() { echo "gpu_check: FAIL: $*" >&2; exit 1; }
step() { echo; echo "== $*"; }

cpu=0
if [ "${1:-}" = "--cpu" ]; then
  cpu=1
  shift
fi

step "versions"
"$PY" - "$cpu" <<'EOF' || fail "torch cannot be imported or sees no GPU (see above)"
import platform, sys, torch
print(f"python {platform.python_version()} ({sys.executable}); torch {torch.__version__}, built for CUDA {torch.version.cuda}")
if sys.argv[1] == "0":
    if not torch.cuda.is_available():
        sys.exit("no CUDA device is visible to torch")
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        print(f"GPU {i}: {p.name}, sm {p.major}.{p.minor}, {p.total_memory / 2**30:.0f} GiB, {p.multi_processor_count} SMs")
EOF

if [ "$cpu" = 0 ]; then
  command -v nvcc >/dev/null || fail "nvcc is not on PATH"
  nvcc --version | tail -n 1
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version --format=csv,noheader || true
  cmake --version | head -n 1 || true

  # Only the local GPU's architecture: a third of the default build time.
  arch=$("$PY" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())')
  step "build and install (RONAN_FAST_CUDA=ON, arch $arch)"
  start=$(date +%s)
  RONAN_FAST_CUDA=ON RONAN_FAST_CUDA_ARCHS="$arch" CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) \
    "$PY" -m pip install --no-build-isolation --no-deps --disable-pip-version-check -q \
    -C build-dir=build/gpu-check . || fail "build or install failed"
  echo "built in $(( $(date +%s) - start ))s"
fi

step "tests/test_ops.py"
# PYTHONSAFEPATH: the installed package, not the source tree, must be under test.
log=$(mktemp)
RONAN_FAST_REQUIRE_EXT=1 PYTHONSAFEPATH=1 "$PY" -m pytest -q -rs -p no:cacheprovider tests/test_ops.py 2>&1 \
  | tee "$log" || fail "tests/test_ops.py failed"
if [ "$cpu" = 0 ] && grep -qi 'SKIPPED.*cuda' "$log"; then
  fail "CUDA test cases were skipped"
fi
rm -f "$log"

step "kernels against the references"
args=("$@")
[ "$cpu" = 1 ] && args=(--cpu "${args[@]}")
PYTHONSAFEPATH=1 "$PY" bench/gpu_check.py "${args[@]}" || fail "kernel checks failed"
echo "gpu_check: all checks passed"
