// recon_loss_grad on CUDA: per-row loss and weighted gradient in one pass over pred and target.
//
// A row is cut into chunks of kChunk elements, one block each, so that a single large image
// fills the GPU as well as many small ones. Each block reduces its chunk in float32 and writes
// one partial sum; rows of one chunk write their loss directly, others are summed by a second
// small kernel in a fixed order (deterministic, no atomics). No host synchronisation.
//
// Index values: checking them on the host would synchronise on every call, so the Python
// dispatcher checks each index tensor once and here a row whose index is out of range gets a
// NaN loss and a zero gradient instead of reading out of bounds (a device assert would leave
// the CUDA context unusable). A NaN loss is never taken as a best loss.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <torch/library.h>

#include <cstdint>
#include <limits>

#include "ops.h"

namespace ronan_fast {
namespace {

constexpr int kThreads = 256;
constexpr int kVec = 4;
constexpr int64_t kChunk = static_cast<int64_t>(kThreads) * kVec * 4;

template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    x += __shfl_down_sync(0xffffffffu, x, offset);
  }
  return x;
}

// Sum over the block; the result is valid in thread 0.
__device__ __forceinline__ float block_sum(float x) {
  __shared__ float warp_part[kThreads / 32];
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  x = warp_sum(x);
  if (lane == 0) {
    warp_part[warp] = x;
  }
  __syncthreads();
  x = 0.f;
  if (warp == 0) {
    if (lane < kThreads / 32) {
      x = warp_part[lane];
    }
    x = warp_sum(x);
  }
  return x;
}

template <bool kMae>
__device__ __forceinline__ float loss_term(float d) {
  return kMae ? fabsf(d) : d * d;
}

template <bool kMae>
__device__ __forceinline__ float grad_term(float d) {
  // torch.sign: NaN -> 0, like the reference.
  return kMae ? static_cast<float>((d > 0.f) - (d < 0.f)) : d;
}

// grid.x = rows * nchunk. out is loss [M] when nchunk == 1, else partial sums [M * nchunk].
template <typename P, typename T, bool kMae, bool kVectorised>
__global__ void __launch_bounds__(kThreads)
    recon_chunk_kernel(const P* __restrict__ pred, const T* __restrict__ target, const int64_t* __restrict__ index,
                       const float* __restrict__ weight, P* __restrict__ grad, float* __restrict__ out, int64_t n,
                       int64_t num_targets, int64_t nchunk, float scale) {
  const int64_t u = blockIdx.x;
  const int64_t m = u / nchunk;
  const int64_t lo = (u % nchunk) * kChunk;
  const int64_t hi = lo + kChunk < n ? lo + kChunk : n;
  const int64_t b = index[m];
  const float w = weight[m];
  const P* p = pred + m * n;
  P* g = grad + m * n;
  float acc = 0.f;
  if (b < 0 || b >= num_targets) {
    for (int64_t i = lo + threadIdx.x; i < hi; i += kThreads) {
      g[i] = P(0.f);
    }
    acc = std::numeric_limits<float>::quiet_NaN();
  } else {
    const T* t = target + b * n;
    const bool zero_grad = w == 0.f;
    if constexpr (kVectorised) {
      for (int64_t i = lo + threadIdx.x * kVec; i < hi; i += kThreads * kVec) {
        const Pack<P, kVec> pv = *reinterpret_cast<const Pack<P, kVec>*>(p + i);
        const Pack<T, kVec> tv = *reinterpret_cast<const Pack<T, kVec>*>(t + i);
        Pack<P, kVec> gv;
#pragma unroll
        for (int l = 0; l < kVec; ++l) {
          const float d = static_cast<float>(pv.v[l]) - static_cast<float>(tv.v[l]);
          acc += loss_term<kMae>(d);
          gv.v[l] = zero_grad ? P(0.f) : static_cast<P>(grad_term<kMae>(d) * scale * w);
        }
        *reinterpret_cast<Pack<P, kVec>*>(g + i) = gv;
      }
    } else {
      for (int64_t i = lo + threadIdx.x; i < hi; i += kThreads) {
        const float d = static_cast<float>(p[i]) - static_cast<float>(t[i]);
        acc += loss_term<kMae>(d);
        g[i] = zero_grad ? P(0.f) : static_cast<P>(grad_term<kMae>(d) * scale * w);
      }
    }
  }
  const float s = block_sum(acc);
  if (threadIdx.x == 0) {
    out[u] = nchunk == 1 ? s / static_cast<float>(n) : s;
  }
}

__global__ void sum_partials_kernel(const float* __restrict__ partial, float* __restrict__ loss, int64_t m_rows,
                                    int64_t nchunk, int64_t n) {
  const int64_t m = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (m >= m_rows) {
    return;
  }
  double s = 0.0;
  for (int64_t c = 0; c < nchunk; ++c) {
    s += partial[m * nchunk + c];
  }
  loss[m] = static_cast<float>(s / static_cast<double>(n));
}

template <typename T>
bool aligned_for_pack(const T* ptr) {
  return reinterpret_cast<std::uintptr_t>(ptr) % (sizeof(T) * kVec) == 0;
}

}  // namespace

void recon_loss_grad_cuda(const Tensor& pred, const Tensor& target, const Tensor& index, const Tensor& weight,
                          Metric metric, Tensor& loss, Tensor& grad) {
  const int64_t m_rows = pred.size(0);
  const int64_t n = pred.numel() / m_rows;
  const int64_t nchunk = (n + kChunk - 1) / kChunk;
  TORCH_CHECK(m_rows * nchunk <= std::numeric_limits<int32_t>::max(),
              "ronan_fast::recon_loss_grad: pred is too large for one launch: ", pred.sizes());
  const Tensor partial = nchunk == 1 ? loss : at::empty({m_rows * nchunk}, loss.options());
  const float scale = static_cast<float>((metric == Metric::kMae ? 1.0 : 2.0) / static_cast<double>(n));
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  RONAN_FAST_DISPATCH_FLOATS(pred.scalar_type(), "recon_loss_grad_cuda", [&] {
    using pred_t = scalar_t;
    RONAN_FAST_DISPATCH_FLOATS(target.scalar_type(), "recon_loss_grad_cuda", [&] {
      using target_t = scalar_t;
      const pred_t* p = pred.const_data_ptr<pred_t>();
      const target_t* t = target.const_data_ptr<target_t>();
      pred_t* g = grad.mutable_data_ptr<pred_t>();
      const bool vectorised = n % kVec == 0 && aligned_for_pack(p) && aligned_for_pack(t) && aligned_for_pack(g);
      const auto launch = [&](auto kernel) {
        kernel<<<static_cast<unsigned>(m_rows * nchunk), kThreads, 0, stream>>>(
            p, t, index.const_data_ptr<int64_t>(), weight.const_data_ptr<float>(), g,
            partial.mutable_data_ptr<float>(), n, target.size(0), nchunk, scale);
      };
      if (metric == Metric::kMae) {
        vectorised ? launch(recon_chunk_kernel<pred_t, target_t, true, true>)
                   : launch(recon_chunk_kernel<pred_t, target_t, true, false>);
      } else {
        vectorised ? launch(recon_chunk_kernel<pred_t, target_t, false, true>)
                   : launch(recon_chunk_kernel<pred_t, target_t, false, false>);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  if (nchunk > 1) {
    constexpr int threads = 256;
    const auto blocks = static_cast<unsigned>((m_rows + threads - 1) / threads);
    sum_partials_kernel<<<blocks, threads, 0, stream>>>(partial.const_data_ptr<float>(),
                                                         loss.mutable_data_ptr<float>(), m_rows, nchunk, n);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

TORCH_LIBRARY_IMPL(ronan_fast, CUDA, m) {
  m.impl("recon_loss_grad", &recon_loss_grad<DeviceType::CUDA>);
}

}  // namespace ronan_fast
