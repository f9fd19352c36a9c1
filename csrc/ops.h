// Entry points of the ronan_fast ops, shared by the backends: argument checks whose messages
// name the argument, device guard, output allocation, then the backend's launcher.
// Each backend file instantiates the entry points for its device type and registers them.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/core/DeviceGuard.h>
#include <c10/util/Exception.h>
#include <c10/util/string_view.h>

#include <cstdint>
#include <limits>
#include <tuple>

namespace ronan_fast {

using at::Tensor;
using c10::DeviceType;

enum class Metric { kMse, kMae };

// The float types the kernels take: float32, bfloat16, float16.
#define RONAN_FAST_DISPATCH_FLOATS(TYPE, NAME, ...)                         \
  AT_DISPATCH_SWITCH(TYPE, NAME,                                             \
                     AT_DISPATCH_CASE(at::ScalarType::Float, __VA_ARGS__)    \
                     AT_DISPATCH_CASE(at::ScalarType::BFloat16, __VA_ARGS__) \
                     AT_DISPATCH_CASE(at::ScalarType::Half, __VA_ARGS__))

// ----------------------------------------------------------------------------- launchers

// Inputs are contiguous and checked; outputs allocated; M >= 1.
void recon_loss_grad_cpu(const Tensor& pred, const Tensor& target, const Tensor& index, const Tensor& weight,
                         Metric metric, Tensor& loss, Tensor& grad);
void recon_loss_grad_cuda(const Tensor& pred, const Tensor& target, const Tensor& index, const Tensor& weight,
                          Metric metric, Tensor& loss, Tensor& grad);

void latent_adam_step_cpu(const Tensor& latent, const Tensor& grad, const Tensor& exp_avg, const Tensor& exp_avg_sq,
                          const Tensor& step, const Tensor& lr, const Tensor& active, const Tensor& loss,
                          const Tensor& best_loss, const Tensor& best_latent, double beta1, double beta2, double eps);
void latent_adam_step_cuda(const Tensor& latent, const Tensor& grad, const Tensor& exp_avg, const Tensor& exp_avg_sq,
                           const Tensor& step, const Tensor& lr, const Tensor& active, const Tensor& loss,
                           const Tensor& best_loss, const Tensor& best_latent, double beta1, double beta2, double eps);

void best_over_restarts_cpu(const Tensor& best_loss, const Tensor& index, Tensor& out_loss, Tensor& out_row);
void best_over_restarts_cuda(const Tensor& best_loss, const Tensor& index, Tensor& out_loss, Tensor& out_row);

// ----------------------------------------------------------------------------- checks

// torch's Python names (float32, int64), which the Python checks print too.
inline const char* dtype_name(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return "float32";
    case at::kDouble: return "float64";
    case at::kHalf: return "float16";
    case at::kBFloat16: return "bfloat16";
    case at::kLong: return "int64";
    case at::kInt: return "int32";
    case at::kShort: return "int16";
    case at::kChar: return "int8";
    case at::kByte: return "uint8";
    case at::kBool: return "bool";
    default: return c10::toString(t);
  }
}

inline bool is_kernel_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf;
}

inline void check_dense(const char* op, const Tensor& t, const char* name) {
  TORCH_CHECK(t.defined(), op, ": ", name, " is an undefined tensor");
  TORCH_CHECK(t.layout() == at::kStrided, op, ": ", name, " must be a dense (strided) tensor, got layout ",
              t.layout());
}

inline void check_same_device(const char* op, const Tensor& t, const char* name, const Tensor& ref,
                              const char* ref_name) {
  TORCH_CHECK(t.device() == ref.device(), op, ": ", name, " is on ", t.device(), " but ", ref_name, " is on ",
              ref.device());
}

inline void check_vector(const char* op, const Tensor& t, const char* name, int64_t m, at::ScalarType dtype) {
  check_dense(op, t, name);
  TORCH_CHECK(t.dim() == 1 && t.size(0) == m, op, ": ", name, " must be [M]=[", m, "], got shape ", t.sizes());
  TORCH_CHECK(t.scalar_type() == dtype, op, ": ", name, " must be ", dtype_name(dtype), ", got ",
              dtype_name(t.scalar_type()));
}

// A host-side range check: free on the CPU. On CUDA it would cost a synchronisation, so the
// CUDA kernels guard each row instead (see the .cu files).
inline void check_index_range_cpu(const char* op, const Tensor& index, int64_t bound, const char* bound_name) {
  const int64_t* idx = index.const_data_ptr<int64_t>();
  const int64_t n = index.numel();
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK(idx[i] >= 0 && idx[i] < bound, op, ": index values must lie in [0, ", bound_name, "=", bound,
                "), got index[", i, "]=", idx[i]);
  }
}

inline Metric check_recon_loss_grad(const Tensor& pred, const Tensor& target, const Tensor& index,
                                    const Tensor& weight, c10::string_view metric, DeviceType dev) {
  constexpr const char* op = "ronan_fast::recon_loss_grad";
  Metric mt = Metric::kMse;
  if (metric == "mse") {
    mt = Metric::kMse;
  } else if (metric == "mae") {
    mt = Metric::kMae;
  } else {
    TORCH_CHECK(false, op, ": metric must be 'mse' or 'mae', got '", metric, "'");
  }
  check_dense(op, pred, "pred");
  check_dense(op, target, "target");
  TORCH_CHECK(pred.device().type() == dev, op, ": pred is on ", pred.device(), ", not on ", dev);
  TORCH_CHECK(pred.dim() == 4, op, ": pred must be [M, C, H, W], got shape ", pred.sizes());
  TORCH_CHECK(target.dim() == 4, op, ": target must be [B, C, H, W], got shape ", target.sizes());
  TORCH_CHECK(is_kernel_float(pred.scalar_type()), op, ": pred must be float32, bfloat16 or float16, got ",
              dtype_name(pred.scalar_type()));
  TORCH_CHECK(is_kernel_float(target.scalar_type()), op, ": target must be float32, bfloat16 or float16, got ",
              dtype_name(target.scalar_type()));
  TORCH_CHECK(pred.sizes().slice(1) == target.sizes().slice(1), op, ": pred ", pred.sizes(), " and target ",
              target.sizes(), " differ in [C, H, W]");
  TORCH_CHECK(pred.size(1) * pred.size(2) * pred.size(3) > 0, op, ": pred must have C*H*W > 0, got shape ",
              pred.sizes());
  const int64_t m = pred.size(0);
  check_vector(op, index, "index", m, at::kLong);
  check_vector(op, weight, "weight", m, at::kFloat);
  check_same_device(op, target, "target", pred, "pred");
  check_same_device(op, index, "index", pred, "pred");
  check_same_device(op, weight, "weight", pred, "pred");
  return mt;
}

inline void check_latent_adam_step(const Tensor& latent, const Tensor& grad, const Tensor& exp_avg,
                                   const Tensor& exp_avg_sq, const Tensor& step, const Tensor& lr,
                                   const Tensor& active, const Tensor& loss, const Tensor& best_loss,
                                   const Tensor& best_latent, double beta1, double beta2, double eps, DeviceType dev) {
  constexpr const char* op = "ronan_fast::latent_adam_step_";
  check_dense(op, latent, "latent");
  TORCH_CHECK(latent.device().type() == dev, op, ": latent is on ", latent.device(), ", not on ", dev);
  TORCH_CHECK(latent.dim() == 2, op, ": latent must be [M, D], got shape ", latent.sizes());
  const int64_t m = latent.size(0);
  const std::pair<const Tensor*, const char*> rows[] = {
      {&latent, "latent"}, {&grad, "grad"}, {&exp_avg, "exp_avg"}, {&exp_avg_sq, "exp_avg_sq"},
      {&best_latent, "best_latent"}};
  for (const auto& [t, name] : rows) {
    check_dense(op, *t, name);
    TORCH_CHECK(t->sizes() == latent.sizes(), op, ": ", name, " must have latent's shape ", latent.sizes(),
                ", got ", t->sizes());
    TORCH_CHECK(t->scalar_type() == at::kFloat, op, ": ", name, " must be float32, got ",
                dtype_name(t->scalar_type()));
    TORCH_CHECK(t->is_contiguous(), op, ": ", name, " must be contiguous");
    check_same_device(op, *t, name, latent, "latent");
  }
  const std::tuple<const Tensor*, const char*, at::ScalarType> vecs[] = {
      {&step, "step", at::kLong},       {&lr, "lr", at::kFloat},
      {&active, "active", at::kBool},   {&loss, "loss", at::kFloat},
      {&best_loss, "best_loss", at::kFloat}};
  for (const auto& [t, name, dtype] : vecs) {
    check_vector(op, *t, name, m, dtype);
    TORCH_CHECK(t->is_contiguous(), op, ": ", name, " must be contiguous");
    check_same_device(op, *t, name, latent, "latent");
  }
  TORCH_CHECK(beta1 >= 0.0 && beta1 < 1.0, op, ": beta1 must lie in [0, 1), got ", beta1);
  TORCH_CHECK(beta2 >= 0.0 && beta2 < 1.0, op, ": beta2 must lie in [0, 1), got ", beta2);
  TORCH_CHECK(eps > 0.0, op, ": eps must be > 0, got ", eps);
}

inline void check_best_over_restarts(const Tensor& best_loss, const Tensor& index, int64_t num_targets,
                                     DeviceType dev) {
  constexpr const char* op = "ronan_fast::best_over_restarts";
  check_dense(op, best_loss, "best_loss");
  TORCH_CHECK(best_loss.device().type() == dev, op, ": best_loss is on ", best_loss.device(), ", not on ", dev);
  TORCH_CHECK(best_loss.dim() == 1, op, ": best_loss must be [M], got shape ", best_loss.sizes());
  TORCH_CHECK(best_loss.scalar_type() == at::kFloat, op, ": best_loss must be float32, got ",
              dtype_name(best_loss.scalar_type()));
  check_vector(op, index, "index", best_loss.size(0), at::kLong);
  check_same_device(op, index, "index", best_loss, "best_loss");
  TORCH_CHECK(num_targets >= 0, op, ": num_targets must be >= 0, got ", num_targets);
  // Rows are packed into 32 bits on CUDA.
  TORCH_CHECK(best_loss.size(0) < std::numeric_limits<int32_t>::max(), op, ": at most 2^31-2 rows, got ",
              best_loss.size(0));
}

// ----------------------------------------------------------------------------- entry points

template <DeviceType kDev>
std::tuple<Tensor, Tensor> recon_loss_grad(const Tensor& pred_in, const Tensor& target_in, const Tensor& index_in,
                                           const Tensor& weight_in, c10::string_view metric_name) {
  const Metric metric = check_recon_loss_grad(pred_in, target_in, index_in, weight_in, metric_name, kDev);
  const c10::DeviceGuard guard(pred_in.device());
  const Tensor pred = pred_in.contiguous();
  const Tensor target = target_in.contiguous();
  const Tensor index = index_in.contiguous();
  const Tensor weight = weight_in.contiguous();
  if constexpr (kDev == DeviceType::CPU) {
    check_index_range_cpu("ronan_fast::recon_loss_grad", index, target.size(0), "target.size(0)");
  }
  Tensor loss = at::empty({pred.size(0)}, pred.options().dtype(at::kFloat));
  Tensor grad = at::empty_like(pred, at::MemoryFormat::Contiguous);
  if (pred.size(0) > 0) {
    if constexpr (kDev == DeviceType::CPU) {
      recon_loss_grad_cpu(pred, target, index, weight, metric, loss, grad);
    } else {
      recon_loss_grad_cuda(pred, target, index, weight, metric, loss, grad);
    }
  }
  return {loss, grad};
}

template <DeviceType kDev>
void latent_adam_step_(const Tensor& latent, const Tensor& grad, const Tensor& exp_avg, const Tensor& exp_avg_sq,
                       const Tensor& step, const Tensor& lr, const Tensor& active, const Tensor& loss,
                       const Tensor& best_loss, const Tensor& best_latent, double beta1, double beta2, double eps) {
  check_latent_adam_step(latent, grad, exp_avg, exp_avg_sq, step, lr, active, loss, best_loss, best_latent, beta1,
                         beta2, eps, kDev);
  const c10::DeviceGuard guard(latent.device());
  if (latent.numel() == 0) {
    // D == 0 still counts the step of active rows, as the reference does.
    if (latent.size(0) > 0) {
      step.add_(active.to(at::kLong));
    }
    return;
  }
  if constexpr (kDev == DeviceType::CPU) {
    latent_adam_step_cpu(latent, grad, exp_avg, exp_avg_sq, step, lr, active, loss, best_loss, best_latent, beta1,
                         beta2, eps);
  } else {
    latent_adam_step_cuda(latent, grad, exp_avg, exp_avg_sq, step, lr, active, loss, best_loss, best_latent, beta1,
                          beta2, eps);
  }
}

template <DeviceType kDev>
std::tuple<Tensor, Tensor> best_over_restarts(const Tensor& best_loss_in, const Tensor& index_in,
                                              int64_t num_targets) {
  check_best_over_restarts(best_loss_in, index_in, num_targets, kDev);
  const c10::DeviceGuard guard(best_loss_in.device());
  const Tensor best_loss = best_loss_in.contiguous();
  const Tensor index = index_in.contiguous();
  if constexpr (kDev == DeviceType::CPU) {
    check_index_range_cpu("ronan_fast::best_over_restarts", index, num_targets, "num_targets");
  }
  Tensor out_loss = at::empty({num_targets}, best_loss.options());
  Tensor out_row = at::empty({num_targets}, index.options());
  if (num_targets > 0) {
    if constexpr (kDev == DeviceType::CPU) {
      best_over_restarts_cpu(best_loss, index, out_loss, out_row);
    } else {
      best_over_restarts_cuda(best_loss, index, out_loss, out_row);
    }
  }
  return {out_loss, out_row};
}

}  // namespace ronan_fast
