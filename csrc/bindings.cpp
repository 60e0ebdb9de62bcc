// The one extension module, ddpm_fast.ops._C.
#include <torch/extension.h>

#include "cpu_kernels.h"
#include "reverse_step_common.h"

namespace ddpm_fast {
at::Tensor reverse_step_cpu(const at::Tensor&, const at::Tensor&, const OptTensor&, const at::Tensor&,
                            const at::Tensor&, const StepIO&, double, bool);
#ifdef DDPM_FAST_WITH_CUDA
at::Tensor reverse_step_cuda(const at::Tensor&, const at::Tensor&, const OptTensor&, const at::Tensor&,
                             const at::Tensor&, const StepIO&, double, bool);
#endif
void register_sampling_loop(pybind11::module_& m);
at::Tensor group_norm_silu_cpu(const at::Tensor&, const OptTensor&, const OptTensor&, const OptTensor&, int64_t,
                               double, bool);
at::Tensor group_norm_silu_cat_cpu(const at::Tensor&, const at::Tensor&, const OptTensor&, const OptTensor&,
                                   const OptTensor&, int64_t, double, bool);
at::Tensor residual_add_cpu(const at::Tensor&, const at::Tensor&, const OptTensor&);
at::Tensor conv3x3_cpu(const at::Tensor&, const at::Tensor&, const OptTensor&, bool);
at::Tensor vb_terms_cpu(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                        const at::Tensor&, bool, const OptTensor&);

at::Tensor reverse_step(const at::Tensor& x, const at::Tensor& eps, const OptTensor& eps_uncond,
                        const at::Tensor& coefs, const at::Tensor& index, const OptTensor& noise,
                        double guidance_scale, bool clip, const OptTensor& noise_key, const OptTensor& images,
                        const OptTensor& out, const OptTensor& half_out,
                        const std::vector<at::Tensor>& history, const OptTensor& model_var_values) {
  const StepIO io{noise, noise_key, images, out, half_out, history, model_var_values};
  if (x.is_cuda()) {
#ifdef DDPM_FAST_WITH_CUDA
    return reverse_step_cuda(x, eps, eps_uncond, coefs, index, io, guidance_scale, clip);
#else
    TORCH_CHECK(false, "ddpm_fast.ops._C was built without CUDA sources; reinstall with nvcc available");
#endif
  }
  return reverse_step_cpu(x, eps, eps_uncond, coefs, index, io, guidance_scale, clip);
}
}  // namespace ddpm_fast

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "ddpm_fast native kernels and the sampling loop";
  m.def("reverse_step", &ddpm_fast::reverse_step,
        "The sampler update of every solver (CPU or CUDA); noise from a tensor or the Philox stream "
        "keyed by noise_key = [seed, step] and images; history: a multistep solver's ring slots (up to 3); "
        "model_var_values: a learned-variance model's v (sigma from the table's log-variance columns)",
        py::arg("x_t"), py::arg("model_output"), py::arg("model_output_uncond"), py::arg("coefs"),
        py::arg("index"), py::arg("noise"), py::arg("guidance_scale"), py::arg("clip_denoised"),
        py::arg("noise_key") = py::none(), py::arg("images") = py::none(), py::arg("out") = py::none(),
        py::arg("half_out") = py::none(), py::arg("history") = std::vector<at::Tensor>(),
        py::arg("model_var_values") = py::none());
  m.def("group_norm_silu", &ddpm_fast::group_norm_silu_cpu,
        "SiLU(GroupNorm(x + add[:, :, None, None])) forward on the CPU (fp32 statistics; NCHW or channels_last)",
        py::arg("x"), py::arg("weight"), py::arg("bias"), py::arg("add"), py::arg("num_groups"), py::arg("eps"),
        py::arg("silu"));
  m.def("group_norm_silu_cat", &ddpm_fast::group_norm_silu_cat_cpu,
        "group_norm_silu of torch.cat([x, x2], 1) without the concatenation (float32, channels_last, CPU): the same "
        "bits", py::arg("x"), py::arg("x2"), py::arg("weight"), py::arg("bias"), py::arg("add"), py::arg("num_groups"),
        py::arg("eps"), py::arg("silu"));
  m.def("residual_add", &ddpm_fast::residual_add_cpu,
        "y + skip + bias[c] on the CPU (fp32 arithmetic; y and skip of one dtype and memory format)", py::arg("y"),
        py::arg("skip"), py::arg("bias"));
  m.def("conv3x3", &ddpm_fast::conv3x3_cpu,
        "3x3 stride-1 padding-1 convolution by Winograd F(4x4, 3x3) on the CPU (float32, channels_last, "
        "inference) of x, or with upsample of x's 2x nearest upsampling (read in place); u: the transformed weight "
        "(36, C, C_out) (ddpm_fast.ops.winograd_weight)",
        py::arg("x"), py::arg("u"), py::arg("bias"), py::arg("upsample") = false);
  m.def("vb_terms", &ddpm_fast::vb_terms_cpu,
        "per (image, t) row: the variational bound's term in bits/dim (KL, or the discretized decoder NLL at t = 0), "
        "the eps MSE and the x_0 MSE, as (N, 3) float32 (CPU)",
        py::arg("x_start"), py::arg("x_t"), py::arg("eps"), py::arg("noise"), py::arg("table"), py::arg("t"),
        py::arg("clip_denoised"), py::arg("v") = py::none());
  m.def("cpu_avx512", [](c10::optional<bool> enable) {
    if (enable) ddpm_fast::cpu::set_avx512(*enable);
    return ddpm_fast::cpu::avx512_enabled();
  }, "whether the C++ CPU kernels run their AVX-512 loops (on where the CPU has AVX-512F); pass False to run "
     "the portable loops instead, True to turn them back on", py::arg("enable") = py::none());
  m.def("with_cuda", []() {
#ifdef DDPM_FAST_WITH_CUDA
    return true;
#else
    return false;
#endif
  }, "whether the CUDA sources were compiled in");
  ddpm_fast::register_sampling_loop(m);
}
