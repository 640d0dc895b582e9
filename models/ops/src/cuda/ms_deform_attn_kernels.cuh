// Kernels of multi-scale deformable attention.
//
// Layouts (all contiguous; a "row" is one (batch, query, head) triple, row = (b * Lq + q) * M + m):
//   value         [N, S, M, D]        spatial_shapes     int64 [L, 2] (H, W)
//   sampling_loc  [N, Lq, M, L, P, 2] (x, y) in [0, 1]   level_start_index  int64 [L]
//   attn_weight   [N, Lq, M, L, P]    output / grad_output  [N, Lq, M, D]
//
// Forward: one thread per output element (row, channel); neighbouring threads read neighbouring
// channels of the same pixels, so loads are coalesced.
// Backward: one warp per row, lanes over channels. grad_value gets coalesced atomic adds (several
// queries sample the same pixel); the gradients of a sampling point (its location and attention
// weight) are sums over channels, reduced inside the warp and written by lane 0 without atomics.
#pragma once

#include <cstdint>

#include <ATen/cuda/Atomic.cuh>

namespace msda {

constexpr int kWarpSize = 32;

// The four pixels around a sampling point and their bilinear weights, with the pixel-centre
// convention of grid_sample(align_corners=False): pixel (i, j) is centred at ((j + 0.5) / W,
// (i + 0.5) / H). Pixels outside the map read as zero, so they get index -1 and are skipped.
template <typename scalar_t>
struct BilinearCorners {
  int64_t pixel[4];    // h * W + w, or -1 outside the map
  scalar_t weight[4];  // bilinear weight
  scalar_t d_dh[4];    // d weight / d h (h in pixels)
  scalar_t d_dw[4];    // d weight / d w
  bool any_inside;

  __device__ __forceinline__ BilinearCorners(scalar_t x, scalar_t y, int height, int width) {
    const scalar_t h = y * height - scalar_t(0.5);
    const scalar_t w = x * width - scalar_t(0.5);
    // Beyond one pixel outside the map every corner is outside; this also keeps huge or NaN
    // locations away from the integer conversion below.
    any_inside = h > -1 && w > -1 && h < height && w < width;
    if (!any_inside) {
      for (int k = 0; k < 4; ++k) pixel[k] = -1;
      return;
    }
    const int h0 = static_cast<int>(floor(h));
    const int w0 = static_cast<int>(floor(w));
    const scalar_t lh = h - h0, lw = w - w0;  // distances to the top-left corner
    const scalar_t hh = 1 - lh, hw = 1 - lw;
    for (int k = 0; k < 4; ++k) {
      const int dy = k >> 1, dx = k & 1;  // corners in order (0,0), (0,1), (1,0), (1,1)
      const int hk = h0 + dy, wk = w0 + dx;
      const bool inside = hk >= 0 && hk < height && wk >= 0 && wk < width;
      pixel[k] = inside ? static_cast<int64_t>(hk) * width + wk : -1;
      const scalar_t wy = dy ? lh : hh, wx = dx ? lw : hw;
      weight[k] = wy * wx;
      d_dh[k] = dy ? wx : -wx;
      d_dw[k] = dx ? wy : -wy;
    }
  }
};

template <typename scalar_t>
__device__ __forceinline__ scalar_t warp_sum(scalar_t v) {
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    v += __shfl_down_sync(0xffffffffu, v, offset);
  }
  return v;  // complete in lane 0
}

template <typename scalar_t>
__global__ void ms_deform_attn_forward_kernel(
    int64_t num_elements,  // N * Lq * M * D
    const scalar_t* __restrict__ value, const int64_t* __restrict__ spatial_shapes,
    const int64_t* __restrict__ level_start_index, const scalar_t* __restrict__ sampling_loc,
    const scalar_t* __restrict__ attn_weight, int64_t spatial_size, int num_queries,
    int num_heads, int channels, int num_levels, int num_points, scalar_t* __restrict__ output) {
  const int64_t index = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (index >= num_elements) return;
  const int c = index % channels;
  const int64_t row = index / channels;
  const int m = row % num_heads;
  const int64_t b = row / (static_cast<int64_t>(num_heads) * num_queries);
  const int64_t pixel_stride = static_cast<int64_t>(num_heads) * channels;
  const int64_t point0 = row * num_levels * num_points;  // first (level, point) of this row

  scalar_t result = 0;
  for (int l = 0; l < num_levels; ++l) {
    const int height = static_cast<int>(spatial_shapes[2 * l]);
    const int width = static_cast<int>(spatial_shapes[2 * l + 1]);
    const scalar_t* value_l =
        value + ((b * spatial_size + level_start_index[l]) * num_heads + m) * channels + c;
    for (int p = 0; p < num_points; ++p) {
      const int64_t point = point0 + l * num_points + p;
      const BilinearCorners<scalar_t> corners(sampling_loc[2 * point], sampling_loc[2 * point + 1],
                                              height, width);
      if (!corners.any_inside) continue;
      scalar_t sample = 0;
      for (int k = 0; k < 4; ++k) {
        if (corners.pixel[k] >= 0) sample += corners.weight[k] * value_l[corners.pixel[k] * pixel_stride];
      }
      result += attn_weight[point] * sample;
    }
  }
  output[index] = result;
}

template <typename scalar_t>
__global__ void ms_deform_attn_backward_kernel(
    int64_t num_rows,  // N * Lq * M
    const scalar_t* __restrict__ value, const int64_t* __restrict__ spatial_shapes,
    const int64_t* __restrict__ level_start_index, const scalar_t* __restrict__ sampling_loc,
    const scalar_t* __restrict__ attn_weight, const scalar_t* __restrict__ grad_output,
    int64_t spatial_size, int num_queries, int num_heads, int channels, int num_levels,
    int num_points, scalar_t* __restrict__ grad_value, scalar_t* __restrict__ grad_sampling_loc,
    scalar_t* __restrict__ grad_attn_weight) {
  // blockDim.x is a multiple of the warp size, so a warp returns (or not) as a whole and every
  // lane takes part in warp_sum.
  const int64_t row = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  if (row >= num_rows) return;
  const int m = row % num_heads;
  const int64_t b = row / (static_cast<int64_t>(num_heads) * num_queries);
  const int64_t pixel_stride = static_cast<int64_t>(num_heads) * channels;
  const int64_t point0 = row * num_levels * num_points;
  const scalar_t* grad_out_row = grad_output + row * channels;

  for (int l = 0; l < num_levels; ++l) {
    const int height = static_cast<int>(spatial_shapes[2 * l]);
    const int width = static_cast<int>(spatial_shapes[2 * l + 1]);
    const int64_t level_offset = ((b * spatial_size + level_start_index[l]) * num_heads + m) * channels;
    const scalar_t* value_l = value + level_offset;
    scalar_t* grad_value_l = grad_value + level_offset;
    for (int p = 0; p < num_points; ++p) {
      const int64_t point = point0 + l * num_points + p;
      const BilinearCorners<scalar_t> corners(sampling_loc[2 * point], sampling_loc[2 * point + 1],
                                              height, width);
      const scalar_t attn = attn_weight[point];
      // This lane's share of sum_c grad_out[c] * {sample[c], d sample[c]/dh, d sample[c]/dw}.
      scalar_t grad_attn = 0, grad_h = 0, grad_w = 0;
      if (corners.any_inside) {
        for (int c = lane; c < channels; c += kWarpSize) {
          const scalar_t g = grad_out_row[c];
          for (int k = 0; k < 4; ++k) {
            if (corners.pixel[k] < 0) continue;
            const int64_t offset = corners.pixel[k] * pixel_stride + c;
            const scalar_t v = value_l[offset];
            grad_attn += g * corners.weight[k] * v;
            grad_h += g * corners.d_dh[k] * v;
            grad_w += g * corners.d_dw[k] * v;
            gpuAtomicAdd(grad_value_l + offset, g * attn * corners.weight[k]);
          }
        }
      }
      grad_attn = warp_sum(grad_attn);
      grad_h = warp_sum(grad_h);
      grad_w = warp_sum(grad_w);
      if (lane == 0) {
        grad_attn_weight[point] = grad_attn;
        // d h / d y = H and d w / d x = W (pixel units per normalised unit)
        grad_sampling_loc[2 * point] = attn * grad_w * width;
        grad_sampling_loc[2 * point + 1] = attn * grad_h * height;
      }
    }
  }
}

}  // namespace msda
