// recon_loss_grad on the CPU: per-row loss and weighted gradient in one pass over pred and target.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "ops.h"

namespace ronan_fast {
namespace {

// Work is split into chunks of a row so that one large row (M=1, 3x256x256) spreads over all
// threads as well as many small rows do. Each chunk's partial sum lands in its own slot and the
// slots are added in a fixed order, so the loss does not depend on the thread count.
constexpr int64_t kChunk = 4096;
constexpr int kLanes = 16;  // independent float accumulators: vectorisable, and short sums

template <bool kMae>
inline float loss_term(float d) {
  return kMae ? std::abs(d) : d * d;
}

template <bool kMae>
inline float grad_term(float d) {
  // torch.sign: NaN -> 0, like the reference.
  return kMae ? static_cast<float>((d > 0.f) - (d < 0.f)) : d;
}

// Returns the chunk's sum of loss terms; writes grad = (term'(d) * scale) * w, or 0 when w == 0.
template <bool kMae, bool kZeroGrad, typename P, typename T>
float recon_chunk(const P* __restrict p, const T* __restrict t, P* __restrict g, int64_t n, float scale, float w) {
  float acc[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int l = 0; l < kLanes; ++l) {
      const float d = static_cast<float>(p[i + l]) - static_cast<float>(t[i + l]);
      acc[l] += loss_term<kMae>(d);
      g[i + l] = kZeroGrad ? P(0.f) : static_cast<P>(grad_term<kMae>(d) * scale * w);
    }
  }
  for (int l = 0; i < n; ++i, ++l) {
    const float d = static_cast<float>(p[i]) - static_cast<float>(t[i]);
    acc[l] += loss_term<kMae>(d);
    g[i] = kZeroGrad ? P(0.f) : static_cast<P>(grad_term<kMae>(d) * scale * w);
  }
  for (int width = kLanes / 2; width > 0; width /= 2) {
    for (int l = 0; l < width; ++l) {
      acc[l] += acc[l + width];
    }
  }
  return acc[0];
}

template <typename P, typename T>
void recon_rows(const P* pred, const T* target, const int64_t* index, const float* weight, P* grad, float* loss,
                int64_t m_rows, int64_t n, Metric metric) {
  const int64_t nchunk = (n + kChunk - 1) / kChunk;
  const bool mae = metric == Metric::kMae;
  const float scale = static_cast<float>((mae ? 1.0 : 2.0) / static_cast<double>(n));
  std::vector<float> partial(static_cast<size_t>(m_rows * nchunk));
  const int64_t grain = std::max<int64_t>(1, (1 << 15) / kChunk);
  at::parallel_for(0, m_rows * nchunk, grain, [&](int64_t begin, int64_t end) {
    for (int64_t u = begin; u < end; ++u) {
      const int64_t m = u / nchunk;
      const int64_t lo = (u % nchunk) * kChunk;
      const int64_t len = std::min(kChunk, n - lo);
      const P* p = pred + m * n + lo;
      const T* t = target + index[m] * n + lo;
      P* g = grad + m * n + lo;
      const float w = weight[m];
      float s;
      if (w == 0.f) {
        s = mae ? recon_chunk<true, true>(p, t, g, len, scale, w) : recon_chunk<false, true>(p, t, g, len, scale, w);
      } else {
        s = mae ? recon_chunk<true, false>(p, t, g, len, scale, w)
                : recon_chunk<false, false>(p, t, g, len, scale, w);
      }
      partial[u] = s;
    }
  });
  for (int64_t m = 0; m < m_rows; ++m) {
    double s = 0.0;
    for (int64_t c = 0; c < nchunk; ++c) {
      s += partial[m * nchunk + c];
    }
    loss[m] = static_cast<float>(s / static_cast<double>(n));
  }
}

}  // namespace

void recon_loss_grad_cpu(const Tensor& pred, const Tensor& target, const Tensor& index, const Tensor& weight,
                         Metric metric, Tensor& loss, Tensor& grad) {
  const int64_t m_rows = pred.size(0);
  const int64_t n = pred.numel() / m_rows;
  RONAN_FAST_DISPATCH_FLOATS(pred.scalar_type(), "recon_loss_grad_cpu", [&] {
    using pred_t = scalar_t;
    RONAN_FAST_DISPATCH_FLOATS(target.scalar_type(), "recon_loss_grad_cpu", [&] {
      using target_t = scalar_t;
      recon_rows<pred_t, target_t>(pred.const_data_ptr<pred_t>(), target.const_data_ptr<target_t>(),
                                   index.const_data_ptr<int64_t>(), weight.const_data_ptr<float>(),
                                   grad.mutable_data_ptr<pred_t>(), loss.mutable_data_ptr<float>(), m_rows, n,
                                   metric);
    });
  });
}

TORCH_LIBRARY_IMPL(ronan_fast, CPU, m) {
  m.impl("recon_loss_grad", &recon_loss_grad<DeviceType::CPU>);
}

}  // namespace ronan_fast
