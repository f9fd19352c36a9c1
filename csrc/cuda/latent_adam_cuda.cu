// latent_adam_step_ on CUDA: one block per latent row; best-row tracking then one
// torch.optim.Adam step, in place, on the current stream, without host synchronisation.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <torch/library.h>

#include <cstdint>

#include "ops.h"

namespace ronan_fast {
namespace {

constexpr int kThreads = 128;

struct AdamConsts {
  float beta1, one_minus_beta1, beta2, one_minus_beta2, eps;
  double beta1_d, beta2_d;
};

__device__ __forceinline__ void adam_elem(float& x, float g, float& m, float& v, float* best, bool better,
                                          float step_size, float bc2_sqrt, const AdamConsts& c) {
  if (better) {
    *best = x;  // the row before this update, as the loss was measured there
  }
  m = c.beta1 * m + c.one_minus_beta1 * g;
  v = c.beta2 * v + c.one_minus_beta2 * g * g;
  x -= step_size * (m / (sqrtf(v) / bc2_sqrt + c.eps));
}

template <bool kVectorised>
__global__ void __launch_bounds__(kThreads)
    latent_adam_kernel(float* __restrict__ latent, const float* __restrict__ grad, float* __restrict__ exp_avg,
                       float* __restrict__ exp_avg_sq, int64_t* __restrict__ step, const float* __restrict__ lr,
                       const bool* __restrict__ active, const float* __restrict__ loss,
                       float* __restrict__ best_loss, float* __restrict__ best_latent, int64_t d, AdamConsts c) {
  const int64_t r = blockIdx.x;
  if (!active[r]) {
    return;  // the whole block leaves: frozen rows are not touched
  }
  __shared__ float s_step_size;
  __shared__ float s_bc2_sqrt;
  __shared__ bool s_better;
  if (threadIdx.x == 0) {
    const float l = loss[r];
    const bool better = l < best_loss[r];  // false for a NaN loss
    const int64_t s = step[r] + 1;
    const double t = static_cast<double>(s > 1 ? s : 1);
    s_step_size = static_cast<float>(static_cast<double>(lr[r]) / (1.0 - pow(c.beta1_d, t)));
    s_bc2_sqrt = static_cast<float>(sqrt(1.0 - pow(c.beta2_d, t)));
    s_better = better;
    step[r] = s;
    if (better) {
      best_loss[r] = l;
    }
  }
  __syncthreads();
  const float step_size = s_step_size;
  const float bc2_sqrt = s_bc2_sqrt;
  const bool better = s_better;
  const int64_t base = r * d;
  if constexpr (kVectorised) {
    for (int64_t i = threadIdx.x * 4; i < d; i += kThreads * 4) {
      float4 x = *reinterpret_cast<const float4*>(latent + base + i);
      const float4 g = *reinterpret_cast<const float4*>(grad + base + i);
      float4 m = *reinterpret_cast<const float4*>(exp_avg + base + i);
      float4 v = *reinterpret_cast<const float4*>(exp_avg_sq + base + i);
      if (better) {
        *reinterpret_cast<float4*>(best_latent + base + i) = x;
      }
      adam_elem(x.x, g.x, m.x, v.x, nullptr, false, step_size, bc2_sqrt, c);
      adam_elem(x.y, g.y, m.y, v.y, nullptr, false, step_size, bc2_sqrt, c);
      adam_elem(x.z, g.z, m.z, v.z, nullptr, false, step_size, bc2_sqrt, c);
      adam_elem(x.w, g.w, m.w, v.w, nullptr, false, step_size, bc2_sqrt, c);
      *reinterpret_cast<float4*>(latent + base + i) = x;
      *reinterpret_cast<float4*>(exp_avg + base + i) = m;
      *reinterpret_cast<float4*>(exp_avg_sq + base + i) = v;
    }
  } else {
    for (int64_t i = threadIdx.x; i < d; i += kThreads) {
      float x = latent[base + i];
      float m = exp_avg[base + i];
      float v = exp_avg_sq[base + i];
      adam_elem(x, grad[base + i], m, v, best_latent + base + i, better, step_size, bc2_sqrt, c);
      latent[base + i] = x;
      exp_avg[base + i] = m;
      exp_avg_sq[base + i] = v;
    }
  }
}

bool aligned16(const void* ptr) {
  return reinterpret_cast<std::uintptr_t>(ptr) % 16 == 0;
}

}  // namespace

void latent_adam_step_cuda(const Tensor& latent, const Tensor& grad, const Tensor& exp_avg, const Tensor& exp_avg_sq,
                           const Tensor& step, const Tensor& lr, const Tensor& active, const Tensor& loss,
                           const Tensor& best_loss, const Tensor& best_latent, double beta1, double beta2,
                           double eps) {
  const int64_t m_rows = latent.size(0);
  const int64_t d = latent.size(1);
  TORCH_CHECK(m_rows <= std::numeric_limits<int32_t>::max(), "ronan_fast::latent_adam_step_: too many rows: ",
              m_rows);
  float* x = latent.mutable_data_ptr<float>();
  const float* g = grad.const_data_ptr<float>();
  float* ma = exp_avg.mutable_data_ptr<float>();
  float* va = exp_avg_sq.mutable_data_ptr<float>();
  float* bx = best_latent.mutable_data_ptr<float>();
  const AdamConsts c{static_cast<float>(beta1), static_cast<float>(1.0 - beta1), static_cast<float>(beta2),
                     static_cast<float>(1.0 - beta2), static_cast<float>(eps), beta1, beta2};
  const bool vectorised = d % 4 == 0 && aligned16(x) && aligned16(g) && aligned16(ma) && aligned16(va) &&
                          aligned16(bx);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const auto kernel = vectorised ? latent_adam_kernel<true> : latent_adam_kernel<false>;
  kernel<<<static_cast<unsigned>(m_rows), kThreads, 0, stream>>>(
      x, g, ma, va, step.mutable_data_ptr<int64_t>(), lr.const_data_ptr<float>(), active.const_data_ptr<bool>(),
      loss.const_data_ptr<float>(), best_loss.mutable_data_ptr<float>(), bx, d, c);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

TORCH_LIBRARY_IMPL(ronan_fast, CUDA, m) {
  m.impl("latent_adam_step_", &latent_adam_step_<DeviceType::CUDA>);
}

}  // namespace ronan_fast
