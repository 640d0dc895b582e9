"""Times multi-scale deformable attention, forward + backward: the compiled CUDA op against the
pure-PyTorch path, at Deformable DETR's scale (batch 2, an 800x1333 image seen at strides 8..64,
8 heads of 32 channels, 4 points per level; 300 decoder queries, and one encoder query per
position). Without a GPU only the PyTorch path is timed, at a small scale.

    python -m benchmarks.ms_deform_attn [--iters 10]
"""
import argparse
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import environment
from models.ops.functions import (
    MSDeformAttnFunction,
    ms_deform_attn_core_pytorch,
    ms_deform_attn_func,
)
from util.args import positive_int


def spatial_shapes(height, width, strides):
    return torch.tensor([[math.ceil(height / s), math.ceil(width / s)] for s in strides])


def make_inputs(shapes, batch, queries, heads=8, channels=32, points=4, device="cpu"):
    levels = len(shapes)
    sizes = shapes[:, 0] * shapes[:, 1]
    start = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]])
    value = torch.randn(batch, int(sizes.sum()), heads, channels)
    loc = torch.rand(batch, queries, heads, levels, points, 2)
    attn = torch.rand(batch, queries, heads, levels * points).softmax(-1).view(batch, queries, heads, levels, points)
    return [t.to(device) for t in (value, shapes, start, loc, attn)]


def time_fwd_bwd(op, value, loc, attn, iters, device):
    """Mean seconds per forward + backward (after one warm-up call)."""
    inputs = [t.clone().requires_grad_() for t in (value, loc, attn)]

    def step():
        op(*inputs).sum().backward()
    step()
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / iters


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iters", type=positive_int, default=10)
    args = parser.parse_args()
    torch.manual_seed(0)

    if torch.cuda.is_available():
        device, shapes, batch = "cuda", spatial_shapes(800, 1333, (8, 16, 32, 64)), 2
    else:
        device, shapes, batch = "cpu", spatial_shapes(128, 128, (8, 16, 32, 64)), 2
        print("no GPU: timing only the PyTorch path, at a small scale (a 128x128 image)")
    use_cuda_op = device == "cuda" and ms_deform_attn_func._C is not None
    if device == "cuda" and not use_cuda_op:
        print("the CUDA op is not built (see models/ops/README.md): timing only the PyTorch path")
    S = int((shapes[:, 0] * shapes[:, 1]).sum())
    print(environment.header(device))
    print(f"device {device}, levels {shapes.tolist()}, S = {S}, batch {batch}, 8 heads x 32 channels, 4 points")

    for name, queries in (("decoder", 300), ("encoder", S)):
        value, shapes_d, start, loc, attn = make_inputs(shapes, batch, queries, device=device)
        t_torch = time_fwd_bwd(lambda v, loc_, a, shapes_d=shapes_d: ms_deform_attn_core_pytorch(v, shapes_d, loc_, a),
                               value, loc, attn, args.iters, device)
        line = f"{name} ({queries} queries): PyTorch {t_torch * 1e3:.2f} ms"
        if use_cuda_op:
            t_cuda = time_fwd_bwd(lambda v, loc_, a, shapes_d=shapes_d, start=start:
                                  MSDeformAttnFunction.apply(v, shapes_d, start, loc_, a, 64),
                                  value, loc, attn, args.iters, device)
            with torch.no_grad():
                diff = (MSDeformAttnFunction.apply(value, shapes_d, start, loc, attn, 64)
                        - ms_deform_attn_core_pytorch(value, shapes_d, loc, attn)).abs().max().item()
            line += f", CUDA op {t_cuda * 1e3:.2f} ms, speed-up x{t_torch / t_cuda:.1f} (max |diff| {diff:.1e})"
        print(line, flush=True)
    print(environment.footer())


if __name__ == "__main__":
    main()
