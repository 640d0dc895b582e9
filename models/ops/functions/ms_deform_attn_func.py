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
import functools
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
    as in the CUDA kernels. value_spatial_shapes: the long tensor [L, 2], or its (H, W) pairs
    as numbers (then nothing is read back from the device)."""
    N, _, M, D = value.shape
    _, Lq, _, L, P, _ = sampling_locations.shape
    shapes = value_spatial_shapes.tolist() if torch.is_tensor(value_spatial_shapes) else value_spatial_shapes
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


def check_op_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights, im2col_step):
    """Raise ValueError, naming the problem, for inputs the compiled kernels would refuse. Checked
    here, in Python, before the op is called: a check failing inside the extension has killed
    the process (a segmentation fault) instead of raising."""
    if value.dim() != 4:
        raise ValueError(f"value must be [N, S, M, D], got {list(value.shape)}")
    if sampling_locations.dim() != 6 or sampling_locations.shape[5] != 2:
        raise ValueError(f"sampling_locations must be [N, Lq, M, L, P, 2], got {list(sampling_locations.shape)}")
    batch, _, heads, _ = value.shape
    levels = sampling_locations.shape[3]
    if sampling_locations.shape[0] != batch or sampling_locations.shape[2] != heads:
        raise ValueError(f"sampling_locations {list(sampling_locations.shape)} does not match value "
                         f"{list(value.shape)} (N and M)")
    if attention_weights.shape != sampling_locations.shape[:5]:
        raise ValueError(f"attention_weights must be [N, Lq, M, L, P] = {list(sampling_locations.shape[:5])}, "
                         f"got {list(attention_weights.shape)}")
    if spatial_shapes.shape != (levels, 2) or level_start_index.shape != (levels,):
        raise ValueError(f"spatial_shapes must be [L, 2] and level_start_index [L] with L = {levels}, got "
                         f"{list(spatial_shapes.shape)} and {list(level_start_index.shape)}")
    if spatial_shapes.dtype != torch.int64 or level_start_index.dtype != torch.int64:
        raise ValueError("spatial_shapes and level_start_index must be int64")
    if value.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"the op computes in float32 or float64, got value in {value.dtype}")
    if sampling_locations.dtype != value.dtype or attention_weights.dtype != value.dtype:
        raise ValueError(f"sampling_locations ({sampling_locations.dtype}) and attention_weights "
                         f"({attention_weights.dtype}) must have value's dtype ({value.dtype})")
    if im2col_step <= 0 or batch % max(1, min(batch, im2col_step)):  # as the kernels: an empty batch is one chunk
        raise ValueError(f"the batch size ({batch}) must be divisible by im2col_step ({im2col_step}), "
                         f"or im2col_step at least the batch size")
    tensors = dict(value=value, spatial_shapes=spatial_shapes, level_start_index=level_start_index,
                   sampling_locations=sampling_locations, attention_weights=attention_weights)
    for name, t in tensors.items():
        if not t.is_cuda or t.device != value.device:
            raise ValueError(f"{name} is on {t.device}: every input must be on value's CUDA device ({value.device})")
        if not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous")


def batch_chunk(batch, im2col_step):
    """The op's batch elements per launch: the largest divisor of the batch size not above
    im2col_step (the kernels need the chunk to divide the batch)."""
    return max(d for d in range(1, min(batch, im2col_step) + 1) if batch % d == 0) if batch else 1


class MSDeformAttnFunction(Function):
    """Autograd wrapper of the compiled kernels (CUDA tensors, float32 or float64; see
    check_op_inputs)."""

    @staticmethod
    def forward(ctx, value, value_spatial_shapes, value_level_start_index, sampling_locations,
                attention_weights, im2col_step):
        extension = _require_extension()
        check_op_inputs(value, value_spatial_shapes, value_level_start_index, sampling_locations, attention_weights,
                        im2col_step)
        ctx.im2col_step = im2col_step
        output = extension.ms_deform_attn_forward(
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


@functools.cache
def _op_runs_on(device_index):
    """Whether the built op holds code for this GPU. A build for other architectures (e.g. the
    default list on an older card) would fail at the first launch with "no kernel image"."""
    has_kernel = getattr(_C, "has_kernel", None)
    return True if has_kernel is None else bool(has_kernel(device_index))


def _path_for(value):
    """'cuda op' or why the pure-PyTorch path is used, for these inputs."""
    if _C is None:
        return f"the CUDA op {_why_unavailable()}, see models/ops/README.md"
    if not value.is_cuda:
        return f"tensors on {value.device.type}"
    index = value.device.index if value.device.index is not None else torch.cuda.current_device()
    if not _op_runs_on(index):
        major, minor = torch.cuda.get_device_capability(index)
        return (f"the CUDA op was built without code for {torch.cuda.get_device_name(index)} "
                f"(sm_{major}{minor}); rebuild it on this machine with bash models/ops/make.sh")
    return "cuda op"


def _log_path_once(path):
    """One line per process (per path) so that a slow run is never silently on the fallback."""
    if path in _logged_paths:
        return
    _logged_paths.add(path)
    if path == "cuda op":
        print("MSDeformAttn: using the compiled CUDA op (MultiScaleDeformableAttention)")
    else:
        print(f"MSDeformAttn: using the pure-PyTorch path ({path})")


def ms_deform_attn(value, spatial_shapes, level_start_index, sampling_locations, attention_weights,
                   im2col_step=64, spatial_sizes=None):
    """Multi-scale deformable attention; the CUDA op for CUDA tensors when it is built, the
    PyTorch implementation otherwise (same result up to float rounding). spatial_sizes: the
    (H, W) pairs of spatial_shapes on the host, if the caller has them (the PyTorch path needs
    them; without, it reads the tensor)."""
    path = _path_for(value)
    _log_path_once(path)
    if path != "cuda op":
        return ms_deform_attn_core_pytorch(value, spatial_shapes if spatial_sizes is None else spatial_sizes,
                                           sampling_locations, attention_weights)
    # The kernels exist for float32 and float64 only: half/bfloat16 inputs (autocast) run in
    # float32 and the result goes back to the dtype of value.
    dtype = torch.float64 if value.dtype == torch.float64 else torch.float32
    output = MSDeformAttnFunction.apply(
        value.to(dtype).contiguous(), spatial_shapes.contiguous(), level_start_index.contiguous(),
        sampling_locations.to(dtype).contiguous(), attention_weights.to(dtype).contiguous(),
        batch_chunk(value.shape[0], im2col_step))
    return output.to(value.dtype)
