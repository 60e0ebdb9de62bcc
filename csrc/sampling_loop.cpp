// The sampling loop in C++: a whole DDPM/DDIM chain without returning to Python between steps.
//
// GPU: one captured CUDA graph per (shape, dtype, model, sampler settings) holds a full step (U-Net
// forward, reverse step, step-counter advance); replay_graph replays it num_steps times with the GIL
// released. CPU: sample_loop_cpu runs the chain itself, calling the model (a Python module) for eps
// and the C++ reverse-step kernel for the update, with noise from the caller's generator in the
// same order the Python samplers draw it.
#include <torch/extension.h>

#include "reverse_step.h"

#ifdef DDPM_FAST_WITH_CUDA
#include <ATen/cuda/CUDAGraph.h>
#endif

namespace ddpm_fast {

at::Tensor reverse_step_cpu(const at::Tensor&, const at::Tensor&, const c10::optional<at::Tensor>&,
                            const at::Tensor&, const at::Tensor&, const c10::optional<at::Tensor>&, double, bool);

at::Tensor sample_loop_cpu(const py::function& model_fn, at::Tensor x, const at::Tensor& coefs,
                           const at::Tensor& rows, double guidance_scale, bool clip,
                           c10::optional<at::Generator> generator) {
  TORCH_CHECK(x.is_cpu() && x.dim() == 4 && x.scalar_type() == at::kFloat,
              "sample_loop_cpu: x must be a float32 (N, C, H, W) CPU tensor");
  TORCH_CHECK(rows.is_cpu() && rows.dim() == 1 && rows.scalar_type() == at::kLong,
              "sample_loop_cpu: rows must be a 1-D int64 CPU tensor (one coefficient row per step)");
  TORCH_CHECK(coefs.is_cpu() && coefs.dim() == 2 && coefs.size(1) == kNumCoefs && coefs.scalar_type() == at::kFloat,
              "sample_loop_cpu: coefs must be a float32 (S, 6) CPU table");
  auto row_of = rows.accessor<int64_t, 1>();
  auto table = coefs.accessor<float, 2>();
  const auto fmt = x.suggest_memory_format();
  for (int64_t i = 0; i < rows.size(0); ++i) {
    const int64_t row = row_of[i];
    TORCH_CHECK(row >= 0 && row < coefs.size(0), "sample_loop_cpu: rows[", i, "] = ", row, " out of range");
    py::object result = model_fn(x, i);
    at::Tensor eps;
    c10::optional<at::Tensor> eps_uncond;
    if (py::isinstance<py::tuple>(result)) {
      auto pair = result.cast<py::tuple>();
      TORCH_CHECK(pair.size() == 2, "sample_loop_cpu: model_fn must return eps or (eps_cond, eps_uncond)");
      eps = pair[0].cast<at::Tensor>().contiguous(fmt);
      eps_uncond = pair[1].cast<at::Tensor>().contiguous(fmt);
    } else {
      eps = result.cast<at::Tensor>().contiguous(fmt);
    }
    c10::optional<at::Tensor> noise;
    if (table[row][kSigma] > 0.f) {
      noise = at::randn(x.sizes(), generator, x.options()).contiguous(fmt);
    }
    at::Tensor index = at::full({x.size(0)}, row, rows.options());
    x = reverse_step_cpu(x, eps, eps_uncond, coefs, index, noise, guidance_scale, clip);
  }
  return x;
}

#ifdef DDPM_FAST_WITH_CUDA
void replay_graph(at::cuda::CUDAGraph& graph, int64_t num_steps) {
  TORCH_CHECK(num_steps >= 0, "replay_graph: num_steps must be >= 0");
  pybind11::gil_scoped_release no_gil;
  for (int64_t i = 0; i < num_steps; ++i) graph.replay();
}
#endif

void register_sampling_loop(pybind11::module_& m) {
  m.def("sample_loop_cpu", &sample_loop_cpu, "the whole reverse chain on the CPU, looped in C++",
        py::arg("model_fn"), py::arg("x"), py::arg("coefs"), py::arg("rows"), py::arg("guidance_scale"),
        py::arg("clip_denoised"), py::arg("generator") = py::none());
#ifdef DDPM_FAST_WITH_CUDA
  m.def("replay_graph", &replay_graph, "replay a captured CUDA graph num_steps times (GIL released)",
        py::arg("graph"), py::arg("num_steps"));
#endif
}

}  // namespace ddpm_fast
