// best_over_restarts on the CPU: one ordered pass over the rows (M is small: targets x restarts).
#include <torch/library.h>

#include <cmath>
#include <limits>

#include "ops.h"

namespace ronan_fast {

void best_over_restarts_cpu(const Tensor& best_loss, const Tensor& index, Tensor& out_loss, Tensor& out_row) {
  const int64_t m_rows = best_loss.size(0);
  const float* v = best_loss.const_data_ptr<float>();
  const int64_t* idx = index.const_data_ptr<int64_t>();
  float* ol = out_loss.mutable_data_ptr<float>();
  int64_t* orow = out_row.mutable_data_ptr<int64_t>();
  const int64_t b_count = out_loss.size(0);
  for (int64_t b = 0; b < b_count; ++b) {
    ol[b] = std::numeric_limits<float>::infinity();
    orow[b] = -1;
  }
  // Rows in increasing order and a strict comparison: ties keep the lowest row.
  for (int64_t m = 0; m < m_rows; ++m) {
    const float x = v[m];
    if (!std::isfinite(x)) {
      continue;
    }
    const int64_t b = idx[m];
    if (orow[b] < 0 || x < ol[b]) {
      ol[b] = x;
      orow[b] = m;
    }
  }
}

TORCH_LIBRARY_IMPL(ronan_fast, CPU, m) {
  m.impl("best_over_restarts", &best_over_restarts<DeviceType::CPU>);
}

}  // namespace ronan_fast
