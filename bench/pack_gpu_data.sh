#!/usr/bin/env bash
# Copy what the GPU benchmark tables need and a GPU machine may lack into .gpu_data/ (ignored by
# git; name it in the device run's carry): Fashion-MNIST's test split (4.4 MB) from Debian's
# dataset-fashion-mnist. bench/gpu_check.sh uses it when the machine has no copy of its own.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
src=${RONAN_FAST_FASHION_MNIST_DIR:-/usr/share/datasets/fashion-mnist}
for f in t10k-images-idx3-ubyte.gz t10k-labels-idx1-ubyte.gz; do
  [ -f "$src/$f" ] || { echo "pack_gpu_data: $src/$f not found (apt-get install dataset-fashion-mnist)" >&2; exit 1; }
done
mkdir -p .gpu_data/fashion-mnist
cp "$src/t10k-images-idx3-ubyte.gz" "$src/t10k-labels-idx1-ubyte.gz" .gpu_data/fashion-mnist/
du -sh .gpu_data
