#!/usr/bin/env bash
# Train the bundled default models and the zoo one after another (never two at once), each
# logging to runs/NAME.log. Usage: scripts/train_zoo.sh [NAME ...]  (default: all, in order);
# the name "benchmark" stands for the 64x64 generator benchmark's recipes (ronan_fast/zoo/train64.py;
# its dcgan64-photos was trained with --threads 2: python -m ronan_fast.zoo.train dcgan64-photos --threads 2).
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p runs
benchmark=(dcgan64n-opencv dcgan64n-opencv-long condgan64-digits vae64-fmnist stylegan64-photos
           upgan64-fmnist aekl64-photos)
names=()
for a in "$@"; do
  if [ "$a" = benchmark ]; then names+=("${benchmark[@]}"); else names+=("$a"); fi
done
if [ ${#names[@]} -eq 0 ]; then
  names=(default-generator default-reference default-samples vae-fmnist condgan-fmnist ddim-fmnist onestep-fmnist dcgan-photos
         dcgan-fmnist-overlap50 dcgan-fmnist-overlap60 dcgan-fmnist-overlap70 dcgan-fmnist-overlap80
         dcgan-fmnist-overlap90 "${benchmark[@]}")
fi
for n in "${names[@]}"; do
  echo "== $n ($(date -u +%H:%M:%S))"
  OMP_NUM_THREADS=1 python -m ronan_fast.zoo.train "$n" > "runs/$n.log" 2>&1 || { echo "FAILED: $n (see runs/$n.log)"; exit 1; }
  tail -n 1 "runs/$n.log"
done
