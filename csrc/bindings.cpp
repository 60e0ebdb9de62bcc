// The one extension module, ddpm_fast._C.
#include <torch/extension.h>

namespace ddpm_fast {
at::Tensor reverse_step_cpu(const at::Tensor&, const at::Tensor&, const c10::optional<at::Tensor>&,
                            const at::Tensor&, const at::Tensor&, const c10::optional<at::Tensor>&, double, bool);
#ifdef DDPM_FAST_WITH_CUDA
at::Tensor reverse_step_cuda(const at::Tensor&, const at::Tensor&, const c10::optional<at::Tensor>&,
                             const at::Tensor&, const at::Tensor&, const c10::optional<at::Tensor>&, double, bool,
                             const c10::optional<at::Tensor>&);
#endif
void register_sampling_loop(pybind11::module_& m);

at::Tensor reverse_step(const at::Tensor& x, const at::Tensor& eps, const c10::optional<at::Tensor>& eps_uncond,
                        const at::Tensor& coefs, const at::Tensor& index, const c10::optional<at::Tensor>& noise,
                        double guidance_scale, bool clip, const c10::optional<at::Tensor>& noise_key) {
  if (x.is_cuda()) {
#ifdef DDPM_FAST_WITH_CUDA
    return reverse_step_cuda(x, eps, eps_uncond, coefs, index, noise, guidance_scale, clip, noise_key);
#else
    TORCH_CHECK(false, "ddpm_fast._C was built without CUDA sources; reinstall with nvcc available");
#endif
  }
  TORCH_CHECK(!noise_key, "reverse_step: in-kernel noise (noise_key) runs on CUDA only; pass noise on the CPU");
  return reverse_step_cpu(x, eps, eps_uncond, coefs, index, noise, guidance_scale, clip);
}
}  // namespace ddpm_fast

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "ddpm_fast native kernels and the sampling loop";
  m.def("reverse_step", &ddpm_fast::reverse_step, "DDPM/DDIM reverse-step update (CPU or CUDA)",
        py::arg("x_t"), py::arg("model_output"), py::arg("model_output_uncond"), py::arg("coefs"),
        py::arg("index"), py::arg("noise"), py::arg("guidance_scale"), py::arg("clip_denoised"),
        py::arg("noise_key") = py::none());
  m.def("with_cuda", []() {
#ifdef DDPM_FAST_WITH_CUDA
    return true;
#else
    return false;
#endif
  }, "whether the CUDA sources were compiled in");
  ddpm_fast::register_sampling_loop(m);
}
