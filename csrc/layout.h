// Memory-format test shared by every kernel file: the one definition of "channels_last" the kernels use
// (the same rule as ddpm_fast.base.memory_format on the Python side).
#pragma once
#include <torch/extension.h>

namespace ddpm_fast {

// A dense NHWC 4-D tensor that is not also NCHW-contiguous (size-1 dims make both true; then NCHW).
inline bool channels_last_4d(const at::Tensor& t) {
  return !t.is_contiguous() && t.is_contiguous(at::MemoryFormat::ChannelsLast);
}

}  // namespace ddpm_fast
