// The kernels of models/ops/src/cuda compiled for the CPU, launched with the grid shapes of
// ms_deform_attn_cuda.cu, behind a C interface for ctypes (tests/test_ms_deform_attn.py).
#include "cuda_host_runtime.h"
#include "ms_deform_attn_kernels.cuh"

namespace {

constexpr unsigned int kThreadsPerBlock = 256;  // as in ms_deform_attn_cuda.cu

unsigned int num_blocks(int64_t threads) {
  return static_cast<unsigned int>((threads + kThreadsPerBlock - 1) / kThreadsPerBlock);
}

template <typename scalar_t>
int forward(const scalar_t* value, const int64_t* spatial_shapes, const int64_t* level_start_index,
            const scalar_t* sampling_loc, const scalar_t* attn_weight, int64_t batch,
            int64_t spatial_size, int num_queries, int num_heads, int channels, int num_levels,
            int num_points, scalar_t* output) {
  const int64_t elements = batch * num_queries * num_heads * channels;
  cuda_host::launch_threads_in_turn(num_blocks(elements), kThreadsPerBlock, [&] {
    msda::ms_deform_attn_forward_kernel<scalar_t>(
        elements, value, spatial_shapes, level_start_index, sampling_loc, attn_weight, spatial_size,
        num_queries, num_heads, channels, num_levels, num_points, output);
  });
  return 0;
}

// grad_value must be zero on entry (the kernel accumulates into it).
template <typename scalar_t>
int backward(const scalar_t* value, const int64_t* spatial_shapes, const int64_t* level_start_index,
             const scalar_t* sampling_loc, const scalar_t* attn_weight, const scalar_t* grad_output,
             int64_t batch, int64_t spatial_size, int num_queries, int num_heads, int channels,
             int num_levels, int num_points, scalar_t* grad_value, scalar_t* grad_sampling_loc,
             scalar_t* grad_attn_weight) {
  const int64_t rows = batch * num_queries * num_heads;
  const bool warps_converged = cuda_host::launch_warps_in_turn(
      num_blocks(rows * msda::kWarpSize), kThreadsPerBlock, [&] {
        msda::ms_deform_attn_backward_kernel<scalar_t>(
            rows, value, spatial_shapes, level_start_index, sampling_loc, attn_weight, grad_output,
            spatial_size, num_queries, num_heads, channels, num_levels, num_points, grad_value,
            grad_sampling_loc, grad_attn_weight);
      });
  return warps_converged ? 0 : 1;
}

}  // namespace

#define MSDA_HOST_ENTRY_POINTS(suffix, scalar_t)                                                    \
  extern "C" int msda_forward_##suffix(                                                             \
      const scalar_t* value, const int64_t* shapes, const int64_t* starts, const scalar_t* loc,     \
      const scalar_t* attn, int64_t batch, int64_t spatial, int queries, int heads, int channels,   \
      int levels, int points, scalar_t* output) {                                                   \
    return forward(value, shapes, starts, loc, attn, batch, spatial, queries, heads, channels,      \
                   levels, points, output);                                                         \
  }                                                                                                 \
  extern "C" int msda_backward_##suffix(                                                            \
      const scalar_t* value, const int64_t* shapes, const int64_t* starts, const scalar_t* loc,     \
      const scalar_t* attn, const scalar_t* grad_output, int64_t batch, int64_t spatial,            \
      int queries, int heads, int channels, int levels, int points, scalar_t* grad_value,           \
      scalar_t* grad_loc, scalar_t* grad_attn) {                                                    \
    return backward(value, shapes, starts, loc, attn, grad_output, batch, spatial, queries, heads,  \
                    channels, levels, points, grad_value, grad_loc, grad_attn);                     \
  }

MSDA_HOST_ENTRY_POINTS(f32, float)
MSDA_HOST_ENTRY_POINTS(f64, double)
