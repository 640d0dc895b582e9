"""The multi-scale deformable attention operator: a pure-PyTorch implementation that runs
anywhere, and an autograd wrapper around the compiled CUDA extension when it is built.

Shapes (N batch, S = sum of H_l*W_l, M heads, D channels per head, Lq queries, L levels,
P points per level):
    value               [N, S, M, D]
    spatial_shapes      long [L, 2], (H_l, W_l) per level
    level_start_index   long [L], offset of each level in S
    sampling_locations  [N, Lq, M, L, P, 2], (x, y) normalised to [0, 1] per level
    attention_weights   [N, Lq, M, L, P]
    output              [N, Lq, M*D]
"""
import importlib

import torch
import torch.nn.functional as F
from torch.autograd import Function
from torch.autograd.function import once_differentiable


def _load_extension():
    """The compiled op, installed with pip (a top-level module) or built in place next to this
    package; returns (module or None, import error worth showing or None)."""
    in_place = __package__.rsplit(".", 1)[0] + ".MultiScaleDeformableAttention"
    for name in ("MultiScaleDeformableAttention", in_place):
        try:
            return importlib.import_module(name), None
        except ModuleNotFoundError:
            continue  # not built: the normal case on a CPU machine
        except ImportError as e:  # built but broken, e.g. an undefined symbol after a torch upgrade
            return None, e
    return None, None


_C, _C_IMPORT_ERROR = _load_extension()
_logged_paths = set()


def ms_deform_attn_core_pytorch(value, value_spatial_shapes, sampling_locations, attention_weights):
    """Bilinear sampling of every level with F.grid_sample, then the weighted sum over levels and
    points. Pixel centres sit at (i + 0.5) / size and samples outside a map read zeros, exactly
    as in the CUDA kernels."""
    N, _, M, D = value.shape
    _, Lq, _, L, P, _ = sampling_locations.shape
    shapes = value_spatial_shapes.tolist()
    value_per_level = value.split([h * w for h, w in shapes], dim=1)
    grids = 2 * sampling_locations - 1  # grid_sample wants [-1, 1]
    samples = []
    for lvl, (h, w) in enumerate(shapes):
        # [N, H*W, M, D] -> [N*M, D, H, W]: heads become independent images
        value_l = value_per_level[lvl].flatten(2).transpose(1, 2).reshape(N * M, D, h, w)
        # [N, Lq, M, P, 2] -> [N*M, Lq, P, 2]
        grid_l = grids[:, :, :, lvl].transpose(1, 2).flatten(0, 1)
        samples.append(F.grid_sample(value_l, grid_l, mode="bilinear", padding_mode="zeros",
                                     align_corners=False))  # [N*M, D, Lq, P]
    samples = torch.stack(samples, dim=-2).flatten(-2)  # [N*M, D, Lq, L*P]
    weights = attention_weights.transpose(1, 2).reshape(N * M, 1, Lq, L * P)
    output = (samples * weights).sum(-1).view(N, M * D, Lq)
    return output.transpose(1, 2).contiguous()


def _why_unavailable():
    return f"failed to import: {_C_IMPORT_ERROR}" if _C_IMPORT_ERROR else "is not built"


def _require_extension():
    if _C is None:
        raise RuntimeError(f"the MultiScaleDeformableAttention CUDA op {_why_unavailable()}; "
                           "build it as described in models/ops/README.md")
    return _C


class MSDeformAttnFunction(Function):
    """Autograd wrapper of the compiled kernels (CUDA tensors, float32 or float64)."""

    @staticmethod
    def forward(ctx, value, value_spatial_shapes, value_level_start_index, sampling_locations,
                attention_weights, im2col_step):
        ctx.im2col_step = im2col_step
        output = _require_extension().ms_deform_attn_forward(
            value, value_spatial_shapes, value_level_start_index, sampling_locations,
            attention_weights, im2col_step)
        ctx.save_for_backward(value, value_spatial_shapes, value_level_start_index,
                              sampling_locations, attention_weights)
        return output

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        value, spatial_shapes, level_start_index, sampling_locations, attention_weights = ctx.saved_tensors
        grad_value, grad_sampling_loc, grad_attn_weight = _require_extension().ms_deform_attn_backward(
            value, spatial_shapes, level_start_index, sampling_locations, attention_weights,
            grad_output.contiguous(), ctx.im2col_step)
        return grad_value, None, None, grad_sampling_loc, grad_attn_weight, None


def _log_path_once(use_cuda_op, device):
    """One line per process (per path) so that a slow run is never silently on the fallback."""
    if use_cuda_op in _logged_paths:
        return
    _logged_paths.add(use_cuda_op)
    if use_cuda_op:
        print("MSDeformAttn: using the compiled CUDA op (MultiScaleDeformableAttention)")
    elif _C is None:
        print(f"MSDeformAttn: using the pure-PyTorch path (the CUDA op {_why_unavailable()}, "
              "see models/ops/README.md)")
    else:
        print(f"MSDeformAttn: using the pure-PyTorch path (tensors on {device})")


def ms_deform_attn(value, spatial_shapes, level_start_index, sampling_locations, attention_weights,
                   im2col_step=64):
    """Multi-scale deformable attention; the CUDA op for CUDA tensors when it is built, the
    PyTorch implementation otherwise (same result up to float rounding)."""
    use_cuda_op = _C is not None and value.is_cuda
    _log_path_once(use_cuda_op, value.device.type)
    if not use_cuda_op:
        return ms_deform_attn_core_pytorch(value, spatial_shapes, sampling_locations, attention_weights)
    # The kernels exist for float32 and float64 only: half/bfloat16 inputs (autocast) run in
    # float32 and the result goes back to the dtype of value.
    dtype = torch.float64 if value.dtype == torch.float64 else torch.float32
    output = MSDeformAttnFunction.apply(
        value.to(dtype).contiguous(), spatial_shapes.contiguous(), level_start_index.contiguous(),
        sampling_locations.to(dtype).contiguous(), attention_weights.to(dtype).contiguous(),
        im2col_step)
    return output.to(value.dtype)
