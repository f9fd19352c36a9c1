// best_over_restarts on CUDA: each row does one 64-bit atomicMin of (orderable loss bits << 32 | row)
// into its target's slot, so the lowest loss wins and, among equal losses, the lowest row.
// Three small kernels on the current stream, no host synchronisation.
//
// Index values: a row whose index is out of range is skipped rather than read out of bounds (a
// device assert would leave the CUDA context unusable); the Python dispatcher checks each index
// tensor once on the host, and the CPU kernel raises.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <torch/library.h>

#include <cstdint>
#include <limits>

#include "ops.h"

namespace ronan_fast {
namespace {

constexpr int kThreads = 256;
constexpr unsigned long long kEmpty = ~0ull;  // no finite float maps to 0xffffffff in the high word

// Maps finite floats to unsigned integers in the same order; -0 and +0 both map to +0's key.
__device__ __forceinline__ uint32_t orderable(float x) {
  const uint32_t u = __float_as_uint(x == 0.0f ? 0.0f : x);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

__device__ __forceinline__ float from_orderable(uint32_t k) {
  return __uint_as_float((k & 0x80000000u) ? (k & 0x7fffffffu) : ~k);
}

__global__ void fill_empty_kernel(unsigned long long* __restrict__ keys, int64_t num_targets) {
  const int64_t b = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (b < num_targets) {
    keys[b] = kEmpty;
  }
}

__global__ void scatter_min_kernel(const float* __restrict__ best_loss, const int64_t* __restrict__ index,
                                   unsigned long long* __restrict__ keys, int64_t m_rows, int64_t num_targets) {
  const int64_t m = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (m >= m_rows) {
    return;
  }
  const float x = best_loss[m];
  const int64_t b = index[m];
  if (!isfinite(x) || b < 0 || b >= num_targets) {
    return;
  }
  const unsigned long long key =
      (static_cast<unsigned long long>(orderable(x)) << 32) | static_cast<unsigned long long>(m);
  atomicMin(keys + b, key);
}

__global__ void unpack_kernel(const unsigned long long* __restrict__ keys, float* __restrict__ out_loss,
                              int64_t* __restrict__ out_row, int64_t num_targets) {
  const int64_t b = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (b >= num_targets) {
    return;
  }
  const unsigned long long key = keys[b];
  if (key == kEmpty) {
    out_loss[b] = std::numeric_limits<float>::infinity();
    out_row[b] = -1;
  } else {
    out_loss[b] = from_orderable(static_cast<uint32_t>(key >> 32));
    out_row[b] = static_cast<int64_t>(key & 0xffffffffull);
  }
}

unsigned blocks_for(int64_t n) {
  return static_cast<unsigned>((n + kThreads - 1) / kThreads);
}

}  // namespace

void best_over_restarts_cuda(const Tensor& best_loss, const Tensor& index, Tensor& out_loss, Tensor& out_row) {
  const int64_t m_rows = best_loss.size(0);
  const int64_t num_targets = out_loss.size(0);
  const Tensor keys_t = at::empty({num_targets}, index.options());  // int64 storage for the packed keys
  auto* keys = reinterpret_cast<unsigned long long*>(keys_t.mutable_data_ptr<int64_t>());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  fill_empty_kernel<<<blocks_for(num_targets), kThreads, 0, stream>>>(keys, num_targets);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (m_rows > 0) {
    scatter_min_kernel<<<blocks_for(m_rows), kThreads, 0, stream>>>(best_loss.const_data_ptr<float>(),
                                                                   index.const_data_ptr<int64_t>(), keys, m_rows,
                                                                   num_targets);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  unpack_kernel<<<blocks_for(num_targets), kThreads, 0, stream>>>(keys, out_loss.mutable_data_ptr<float>(),
                                                                  out_row.mutable_data_ptr<int64_t>(), num_targets);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

TORCH_LIBRARY_IMPL(ronan_fast, CUDA, m) {
  m.impl("best_over_restarts", &best_over_restarts<DeviceType::CUDA>);
}

}  // namespace ronan_fast
