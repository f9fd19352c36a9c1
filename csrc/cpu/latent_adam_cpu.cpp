// latent_adam_step_ on the CPU: best-row tracking, then one torch.optim.Adam step per active row.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>

#include "ops.h"

namespace ronan_fast {
namespace {

struct AdamConsts {
  float beta1, one_minus_beta1, beta2, one_minus_beta2, eps;
  double beta1_d, beta2_d;
};

void adam_row(float* __restrict x, const float* __restrict g, float* __restrict m, float* __restrict v,
              int64_t d, float step_size, float bc2_sqrt, const AdamConsts& c) {
  for (int64_t i = 0; i < d; ++i) {
    const float gi = g[i];
    const float mi = c.beta1 * m[i] + c.one_minus_beta1 * gi;
    const float vi = c.beta2 * v[i] + c.one_minus_beta2 * gi * gi;
    m[i] = mi;
    v[i] = vi;
    x[i] -= step_size * (mi / (std::sqrt(vi) / bc2_sqrt + c.eps));
  }
}

}  // namespace

void latent_adam_step_cpu(const Tensor& latent, const Tensor& grad, const Tensor& exp_avg, const Tensor& exp_avg_sq,
                          const Tensor& step, const Tensor& lr, const Tensor& active, const Tensor& loss,
                          const Tensor& best_loss, const Tensor& best_latent, double beta1, double beta2,
                          double eps) {
  const int64_t m_rows = latent.size(0);
  const int64_t d = latent.size(1);
  float* x = latent.mutable_data_ptr<float>();
  const float* g = grad.const_data_ptr<float>();
  float* ma = exp_avg.mutable_data_ptr<float>();
  float* va = exp_avg_sq.mutable_data_ptr<float>();
  int64_t* st = step.mutable_data_ptr<int64_t>();
  const float* lr_p = lr.const_data_ptr<float>();
  const bool* act = active.const_data_ptr<bool>();
  const float* ls = loss.const_data_ptr<float>();
  float* bl = best_loss.mutable_data_ptr<float>();
  float* bx = best_latent.mutable_data_ptr<float>();
  // The moment updates run in float32 with the betas rounded to float, as torch does for float
  // tensors; the bias corrections in float64 as torch.optim.Adam computes them from Python floats.
  const AdamConsts c{static_cast<float>(beta1), static_cast<float>(1.0 - beta1), static_cast<float>(beta2),
                     static_cast<float>(1.0 - beta2), static_cast<float>(eps), beta1, beta2};
  const int64_t grain = std::max<int64_t>(1, (1 << 14) / d);
  at::parallel_for(0, m_rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      if (!act[r]) {
        continue;
      }
      float* xr = x + r * d;
      if (ls[r] < bl[r]) {  // false for a NaN loss
        bl[r] = ls[r];
        std::copy(xr, xr + d, bx + r * d);
      }
      const int64_t s = st[r] + 1;
      st[r] = s;
      const double t = static_cast<double>(std::max<int64_t>(s, 1));
      const float step_size = static_cast<float>(static_cast<double>(lr_p[r]) / (1.0 - std::pow(c.beta1_d, t)));
      const float bc2_sqrt = static_cast<float>(std::sqrt(1.0 - std::pow(c.beta2_d, t)));
      adam_row(xr, g + r * d, ma + r * d, va + r * d, d, step_size, bc2_sqrt, c);
    }
  });
}

TORCH_LIBRARY_IMPL(ronan_fast, CPU, m) {
  m.impl("latent_adam_step_", &latent_adam_step_<DeviceType::CPU>);
}

}  // namespace ronan_fast
