#!/usr/bin/env bash
# Check the CUDA kernels on a machine with an NVIDIA GPU and no package registry: build and
# install ronan_fast into the machine's Python (its torch, scikit-build-core, pybind11, cmake
# and ninja), run tests/test_ops.py and tests/test_cuda_graph.py with their CUDA cases (the
# Adam step captured in CUDA graphs against the eager loop) and the tone-fitted metric's device
# test (mse-tone and its polish on the GPU), then print accuracy and timings of the
# kernels against the references (bench/gpu_check.py), also to $OUT/gpu_check.md when OUT is set.
# Then the benchmark tables, each against the installed package: bench.speed (both baselines
# and our variants, on the bundled default generator, the zoo's one-step model and the 28M-
# parameter large-dcgan128) and bench.overhead (the share of a step outside the generator at
# batch 256 and up), written to $OUT (or bench/results/gpu_run/) as .md and .json. Each table
# runs under its own time limit (BENCH_TIMEOUT seconds, default 100; the large generator gets
# 1.3 times that); a table cut short keeps and prints the rows it finished.
# Fails loudly when any build step or check fails.
#
#   bash bench/gpu_check.sh [gpu_check.py args]
#   bash bench/gpu_check.sh --cpu [args]   # no build, no GPU: the installed package's CPU kernels
#
# PYTHON picks the interpreter (default: python3). BENCH=0 skips the tables; BENCH=quick runs
# them at toy sizes (seconds: a check that the step works). The default and one-step tables
# need Fashion-MNIST's test split: RONAN_FAST_FASHION_MNIST_DIR, Debian's
# /usr/share/datasets/fashion-mnist, or .gpu_data/fashion-mnist in the repository (a machine
# without the Debian package: `bash bench/pack_gpu_data.sh` here, then carry .gpu_data).
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

step "tests/test_ops.py tests/test_cuda_graph.py, the tone metric on the device"
# PYTHONSAFEPATH: the installed package, not the source tree, must be under test.
log=$(mktemp)
RONAN_FAST_REQUIRE_EXT=1 PYTHONSAFEPATH=1 "$PY" -m pytest -q -rs -p no:cacheprovider tests/test_ops.py \
  "tests/test_metrics.py::test_tone_mse_and_its_polish_on_a_device" \
  tests/test_cuda_graph.py 2>&1 | tee "$log" || fail "tests/test_ops.py, the tone metric test or tests/test_cuda_graph.py failed"
if [ "$cpu" = 0 ] && grep -qi 'SKIPPED.*cuda' "$log"; then
  fail "CUDA test cases were skipped"
fi
rm -f "$log"

step "kernels against the references"
args=("$@")
[ "$cpu" = 1 ] && args=(--cpu "${args[@]}")
PYTHONSAFEPATH=1 "$PY" bench/gpu_check.py "${args[@]}" || fail "kernel checks failed"
echo "gpu_check: all checks passed"

bench=${BENCH:-1}
[ "$bench" = 0 ] && exit 0
if [ -z "${RONAN_FAST_FASHION_MNIST_DIR:-}" ] && [ ! -d /usr/share/datasets/fashion-mnist ] \
   && [ -d .gpu_data/fashion-mnist ]; then
  export RONAN_FAST_FASHION_MNIST_DIR=$PWD/.gpu_data/fashion-mnist
fi
dev=cuda
[ "$cpu" = 1 ] && dev=cpu
res=${OUT:-bench/results/gpu_run}
mkdir -p "$res"
limit=${BENCH_TIMEOUT:-100}

run_bench() {  # run_bench SECONDS MODULE ARGS...: a bench module against the installed package
  local secs=$1 mod=$2
  shift 2
  echo "-- $mod $*" >&2  # stderr: a caller may keep the module's stdout as a table
  PYTHONSAFEPATH=1 timeout "$secs" "$PY" -c '
import runpy, sys
import torch
sys.path.append(".")  # bench/ from the source tree; ronan_fast from the installed package
from ronan_fast import _ext
dev = torch.device(sys.argv[1])
if not _ext.has_device(dev):
    sys.exit(f"the installed ronan_fast has no compiled kernels for {dev}: {_ext.why_unavailable(dev)}")
sys.argv = [sys.argv[2]] + sys.argv[3:]
runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
' "$dev" "$mod" "$@"
}

speed_table() {  # speed_table NAME SECONDS speed.py ARGS...
  local name=$1 secs=$2
  shift 2
  local rc=0
  run_bench "$secs" bench.speed --device "$dev" --out "$res/speed_${dev}_${name}.md" "$@" || rc=$?
  if [ "$rc" != 0 ] && [ -f "$res/speed_${dev}_${name}.json" ]; then
    echo "bench.speed stopped (exit $rc; 124: its time limit); the rows it finished:"
    run_bench 60 bench.speed --device "$dev" --from-json "$res/speed_${dev}_${name}.json" "$@" \
      | tee "$res/speed_${dev}_${name}.md"
  fi
}

large_limit=$(( limit * 13 / 10 ))
if [ "$bench" = quick ]; then
  step "benchmark tables (quick: toy sizes)"
  speed_table default "$limit" --generators default --n 2 --steps 10 --restarts 2 --authors-images 2
  speed_table large "$large_limit" --generators large --n 1 --steps 3 --restarts 2 --authors-images 1 \
    --only "authors,plain batched,ours (full)"
  run_bench "$limit" bench.overhead --device "$dev" --generator default --batch 16 --steps 3 --repeats 1 \
    --out "$res/overhead_${dev}_default.md" || echo "bench.overhead failed or stopped (exit $?)"
else
  step "benchmark tables"
  speed_table default "$limit" --generators default --n 32 --steps 1500 --restarts 8 --authors-images 4
  speed_table large "$large_limit" --generators large --n 16 --steps 300 --restarts 8 --authors-images 2
  run_bench "$limit" bench.overhead --device "$dev" --generator large --batch 256,1024 --steps 20 \
    --out "$res/overhead_${dev}_large.md" || echo "bench.overhead failed or stopped (exit $?)"
  speed_table onestep "$limit" --generators onestep-fmnist --n 32 --steps 1500 --restarts 8 --authors-images 4
fi
echo "gpu_check: benchmark tables in $res"
