#!/usr/bin/env bash
# Train the bundled default models and the zoo one after another (never two at once), each
# logging to runs/NAME.log. Usage: scripts/train_zoo.sh [NAME ...]  (default: all, in order).
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p runs
names=("$@")
if [ ${#names[@]} -eq 0 ]; then
  names=(default-generator default-reference default-samples vae-fmnist condgan-fmnist ddim-fmnist onestep-fmnist dcgan-photos
         dcgan-fmnist-overlap50 dcgan-fmnist-overlap60 dcgan-fmnist-overlap70 dcgan-fmnist-overlap80
         dcgan-fmnist-overlap90)
fi
for n in "${names[@]}"; do
  echo "== $n ($(date -u +%H:%M:%S))"
  OMP_NUM_THREADS=1 python -m ronan_fast.zoo.train "$n" > "runs/$n.log" 2>&1 || { echo "FAILED: $n (see runs/$n.log)"; exit 1; }
  tail -n 1 "runs/$n.log"
done
