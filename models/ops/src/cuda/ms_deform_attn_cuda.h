// Host entry points of the CUDA implementation (shapes in models/ops/functions/ms_deform_attn_func.py).
#pragma once

#include <vector>

#include <ATen/ATen.h>

at::Tensor ms_deform_attn_cuda_forward(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                       const at::Tensor& level_start_index,
                                       const at::Tensor& sampling_loc,
                                       const at::Tensor& attn_weight, int64_t im2col_step);

std::vector<at::Tensor> ms_deform_attn_cuda_backward(
    const at::Tensor& value, const at::Tensor& spatial_shapes, const at::Tensor& level_start_index,
    const at::Tensor& sampling_loc, const at::Tensor& attn_weight, const at::Tensor& grad_output,
    int64_t im2col_step);

// Whether the build holds code the given CUDA device can run (an architecture of
// TORCH_CUDA_ARCH_LIST it is compatible with, or PTX it can compile). Asked, not launched: a
// launch without such code fails with "no kernel image is available".
bool ms_deform_attn_cuda_has_kernel(int64_t device_index);
