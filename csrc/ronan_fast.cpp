// The ronan_fast._C module: op schemas (kernels register from csrc/cpu and csrc/cuda) and what
// the module was built for.
#include <pybind11/pybind11.h>
#include <torch/library.h>

#ifndef RONAN_FAST_TORCH_VERSION
#error "RONAN_FAST_TORCH_VERSION must be defined by the build"
#endif

TORCH_LIBRARY(ronan_fast, m) {
  // Fake (meta) kernels for torch.compile and opcheck are registered from Python.
  m.set_python_module("ronan_fast.ops");
  m.def("recon_loss_grad(Tensor pred, Tensor target, Tensor index, Tensor weight, str metric) -> (Tensor, Tensor)");
  m.def(
      "latent_adam_step_(Tensor(a!) latent, Tensor grad, Tensor(b!) exp_avg, Tensor(c!) exp_avg_sq, "
      "Tensor(d!) step, Tensor lr, Tensor active, Tensor loss, Tensor(e!) best_loss, Tensor(f!) best_latent, "
      "float beta1, float beta2, float eps) -> ()");
  m.def("best_over_restarts(Tensor best_loss, Tensor index, int num_targets) -> (Tensor, Tensor)");
}

PYBIND11_MODULE(_C, mod) {
  mod.doc() = "ronan_fast kernels; importing this module registers torch.ops.ronan_fast.*";
  mod.attr("WITH_CUDA") = pybind11::bool_(RONAN_FAST_WITH_CUDA != 0);
  mod.attr("TORCH_VERSION") = pybind11::str(RONAN_FAST_TORCH_VERSION);
  const char* cuda = RONAN_FAST_CUDA_VERSION;
  mod.attr("CUDA_VERSION") = cuda[0] ? pybind11::object(pybind11::str(cuda)) : pybind11::object(pybind11::none());
}
