// Device dispatch of the operator. There are only CUDA kernels: CPU tensors get a clear error
// pointing at the pure-PyTorch implementation instead of a crash inside a kernel.
#pragma once

#include <torch/extension.h>

#include "cuda/ms_deform_attn_cuda.h"

inline void ms_deform_attn_check_cuda(const at::Tensor& value, const char* name) {
  TORCH_CHECK(value.is_cuda(), name, ": value is on ", value.device(),
              ", but MultiScaleDeformableAttention only has CUDA kernels; "
              "use ms_deform_attn_core_pytorch (models/ops/functions) for CPU tensors");
}

inline at::Tensor ms_deform_attn_forward(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                         const at::Tensor& level_start_index,
                                         const at::Tensor& sampling_loc,
                                         const at::Tensor& attn_weight, int64_t im2col_step) {
  ms_deform_attn_check_cuda(value, "ms_deform_attn_forward");
  return ms_deform_attn_cuda_forward(value, spatial_shapes, level_start_index, sampling_loc,
                                     attn_weight, im2col_step);
}

inline std::vector<at::Tensor> ms_deform_attn_backward(
    const at::Tensor& value, const at::Tensor& spatial_shapes, const at::Tensor& level_start_index,
    const at::Tensor& sampling_loc, const at::Tensor& attn_weight, const at::Tensor& grad_output,
    int64_t im2col_step) {
  ms_deform_attn_check_cuda(value, "ms_deform_attn_backward");
  return ms_deform_attn_cuda_backward(value, spatial_shapes, level_start_index, sampling_loc,
                                      attn_weight, grad_output, im2col_step);
}

inline bool ms_deform_attn_has_kernel(int64_t device_index) {
  return ms_deform_attn_cuda_has_kernel(device_index);
}
