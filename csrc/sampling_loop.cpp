// The sampling loop in C++: a whole run without returning to Python between steps.
//
// GPU: one captured CUDA graph of a sampling plan's step (U-Net forward, reverse step, step-counter
// advance); replay_graph replays it num_steps times with the GIL released. CPU (no graphs):
// run_steps calls the plan's step num_steps times; the step reads its index from the plan's counter,
// so both loops run the very step the Python loop runs.
#include <torch/extension.h>

#ifdef DDPM_FAST_WITH_CUDA
#include <ATen/cuda/CUDAGraph.h>
#endif

namespace ddpm_fast {

void run_steps(const py::function& step, int64_t num_steps) {
  TORCH_CHECK(num_steps >= 0, "run_steps: num_steps must be >= 0");
  for (int64_t i = 0; i < num_steps; ++i) step();
}

#ifdef DDPM_FAST_WITH_CUDA
void replay_graph(at::cuda::CUDAGraph& graph, int64_t num_steps) {
  TORCH_CHECK(num_steps >= 0, "replay_graph: num_steps must be >= 0");
  pybind11::gil_scoped_release no_gil;
  for (int64_t i = 0; i < num_steps; ++i) graph.replay();
}
#endif

void register_sampling_loop(pybind11::module_& m) {
  m.def("run_steps", &run_steps, "call a sampling plan's step num_steps times (the CPU loop)", py::arg("step"),
        py::arg("num_steps"));
#ifdef DDPM_FAST_WITH_CUDA
  m.def("replay_graph", &replay_graph, "replay a captured CUDA graph num_steps times (GIL released)",
        py::arg("graph"), py::arg("num_steps"));
#endif
}

}  // namespace ddpm_fast
