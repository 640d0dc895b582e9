"""MSDeformAttn: every query attends to a few learned sampling points around its reference point
on each feature level, instead of to every key. Parameter names and shapes follow Deformable DETR
so that its checkpoints load unchanged."""
import math
import warnings

import torch
from torch import nn

from ..functions import ms_deform_attn


def _is_power_of_2(n):
    return n > 0 and n & (n - 1) == 0


class MSDeformAttn(nn.Module):

    def __init__(self, d_model=256, n_levels=4, n_heads=8, n_points=4):
        super().__init__()
        if d_model % n_heads != 0:
            raise ValueError(f"MSDeformAttn: d_model ({d_model}) must be divisible by n_heads ({n_heads})")
        if not _is_power_of_2(d_model // n_heads):
            warnings.warn(f"MSDeformAttn: d_model / n_heads = {d_model // n_heads} is not a power of 2; "
                          "the CUDA kernel is most efficient when it is", stacklevel=2)

        self.im2col_step = 64  # batch chunk of the CUDA op
        self.d_model = d_model
        self.n_levels = n_levels
        self.n_heads = n_heads
        self.n_points = n_points

        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(d_model, d_model)
        self.output_proj = nn.Linear(d_model, d_model)
        self._reset_parameters()

    def _reset_parameters(self):
        # At init each head looks in its own direction (evenly spread angles), point i at (i+1)
        # steps along it, on every level; attention is uniform over all points.
        nn.init.zeros_(self.sampling_offsets.weight)
        angles = torch.arange(self.n_heads, dtype=torch.float32) * (2.0 * math.pi / self.n_heads)
        directions = torch.stack([angles.cos(), angles.sin()], -1)
        directions = directions / directions.abs().max(-1, keepdim=True).values  # onto the unit square
        steps = torch.arange(1, self.n_points + 1, dtype=torch.float32)
        grid = directions[:, None, None, :] * steps[None, None, :, None]
        grid = grid.expand(self.n_heads, self.n_levels, self.n_points, 2)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.flatten())
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.zeros_(self.value_proj.bias)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.zeros_(self.output_proj.bias)

    def forward(self, query, reference_points, input_flatten, input_spatial_shapes,
                input_level_start_index, input_padding_mask=None, spatial_sizes=None):
        """
        query                    [N, Lq, C]
        reference_points         [N, Lq, L, 2] (x, y) in [0, 1], or [N, Lq, L, 4] boxes (cx, cy, w, h)
        input_flatten            [N, S, C], the L levels flattened and concatenated
        input_spatial_shapes     long [L, 2], (H, W) of each level
        input_level_start_index  long [L], start of each level in S
        input_padding_mask       bool [N, S], True at padding, or None
        spatial_sizes            the (H, W) of each level as numbers on the host, or None: then
                                 they are read from input_spatial_shapes, which makes the host
                                 wait for the GPU (the detectors pass them)
        returns                  [N, Lq, C]
        """
        N, Lq, _ = query.shape
        _, S, _ = input_flatten.shape
        if spatial_sizes is None:
            spatial_sizes = input_spatial_shapes.tolist()
        covered = sum(h * w for h, w in spatial_sizes)
        if covered != S:
            raise ValueError(f"MSDeformAttn: input_spatial_shapes cover {covered} positions "
                             f"but input_flatten has {S}")

        value = self.value_proj(input_flatten)
        if input_padding_mask is not None:
            value = value.masked_fill(input_padding_mask[..., None], 0.0)
        value = value.view(N, S, self.n_heads, self.d_model // self.n_heads)

        offsets = self.sampling_offsets(query).view(N, Lq, self.n_heads, self.n_levels, self.n_points, 2)
        attention_weights = self.attention_weights(query).view(N, Lq, self.n_heads, self.n_levels * self.n_points)
        attention_weights = attention_weights.softmax(-1).view(N, Lq, self.n_heads, self.n_levels, self.n_points)

        if reference_points.shape[-1] == 2:
            # offsets are in pixels of each level: normalise by its (W, H), matching (x, y)
            normalizer = torch.stack([input_spatial_shapes[..., 1], input_spatial_shapes[..., 0]], -1)
            sampling_locations = (reference_points[:, :, None, :, None, :]
                                  + offsets / normalizer[None, None, None, :, None, :])
        elif reference_points.shape[-1] == 4:
            # offsets are relative to the box: n_points steps reach half its size
            sampling_locations = (reference_points[:, :, None, :, None, :2]
                                  + offsets / self.n_points * reference_points[:, :, None, :, None, 2:] * 0.5)
        else:
            raise ValueError(f"MSDeformAttn: reference_points must end in 2 or 4 values, "
                             f"got shape {tuple(reference_points.shape)}")

        output = ms_deform_attn(value, input_spatial_shapes, input_level_start_index,
                                sampling_locations, attention_weights, self.im2col_step, spatial_sizes=spatial_sizes)
        return self.output_proj(output)
