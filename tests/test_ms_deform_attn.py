"""Multi-scale deformable attention: the PyTorch operator against a brute-force bilinear reference,
its gradients, the MSDeformAttn module (parameters, init, sampling locations, padding), the CUDA
kernels compiled for the CPU against the PyTorch operator, and, where a GPU and the built extension
exist, the CUDA op itself against the PyTorch operator."""
import ctypes
import math
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

from models.ops import MSDeformAttn, ms_deform_attn, ms_deform_attn_core_pytorch
from models.ops.functions import MSDeformAttnFunction
from models.ops.functions import ms_deform_attn_func as msda_func
from models.ops.modules import ms_deform_attn as msda_module

OPS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "models", "ops")

requires_cuda_op = pytest.mark.skipif(
    not (torch.cuda.is_available() and msda_func._C is not None),
    reason="needs a GPU and the built MultiScaleDeformableAttention extension")


def level_start_index(shapes):
    sizes = shapes[:, 0] * shapes[:, 1]
    return torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]])


def random_inputs(shapes, N=2, M=2, D=3, Lq=4, P=2, dtype=torch.float64, device="cpu", seed=0):
    """Random operator inputs; locations span [-0.3, 1.3] so some points fall outside the maps."""
    g = torch.Generator().manual_seed(seed)
    shapes = torch.tensor(shapes, dtype=torch.long)
    S, L = int((shapes[:, 0] * shapes[:, 1]).sum()), len(shapes)
    value = torch.randn(N, S, M, D, generator=g, dtype=dtype)
    loc = torch.rand(N, Lq, M, L, P, 2, generator=g, dtype=dtype) * 1.6 - 0.3
    attn = torch.rand(N, Lq, M, L, P, generator=g, dtype=dtype)
    attn = attn / attn.sum((-1, -2), keepdim=True)
    return [t.to(device) for t in (value, shapes, level_start_index(shapes), loc, attn)]


def naive_ms_deform_attn(value, shapes, loc, attn):
    """Bilinear sampling with explicit loops: pixel (i, j) is centred at ((j+0.5)/W, (i+0.5)/H),
    each of the 4 neighbouring pixels weighs (1-|dy|)(1-|dx|), pixels outside the map are zero."""
    N, _, M, D = value.shape
    _, Lq, _, L, P, _ = loc.shape
    starts = level_start_index(shapes).tolist()
    out = torch.zeros(N, Lq, M, D, dtype=value.dtype)
    for n in range(N):
        for q in range(Lq):
            for m in range(M):
                for lvl in range(L):
                    H, W = shapes[lvl].tolist()
                    for p in range(P):
                        x = loc[n, q, m, lvl, p, 0].item() * W - 0.5
                        y = loc[n, q, m, lvl, p, 1].item() * H - 0.5
                        for i in (math.floor(y), math.floor(y) + 1):
                            for j in (math.floor(x), math.floor(x) + 1):
                                if 0 <= i < H and 0 <= j < W:
                                    w = (1 - abs(y - i)) * (1 - abs(x - j))
                                    out[n, q, m] += attn[n, q, m, lvl, p] * w * value[n, starts[lvl] + i * W + j, m]
    return out.flatten(2)


# ---- the PyTorch operator ---------------------------------------------------------------------

def test_pytorch_op_matches_bruteforce_bilinear():
    value, shapes, _, loc, attn = random_inputs([(3, 4), (2, 5), (1, 1)], N=2, M=2, D=3, Lq=5, P=3)
    assert ((loc < 0) | (loc > 1)).any()  # some points outside the maps are covered
    out = ms_deform_attn_core_pytorch(value, shapes, loc, attn)
    assert out.shape == (2, 5, 2 * 3)
    torch.testing.assert_close(out, naive_ms_deform_attn(value, shapes, loc, attn), rtol=0, atol=1e-12)


def test_pytorch_op_hand_values():
    # One level of 2x3 pixels, one head, one channel holding the pixel number 1..6.
    shapes = torch.tensor([[2, 3]])
    value = torch.arange(1.0, 7.0, dtype=torch.float64).view(1, 6, 1, 1)
    points = [
        ((2 + 0.5) / 3, (1 + 0.5) / 2),  # centre of pixel (1, 2) -> its value, 6
        (0.0, (0 + 0.5) / 2),            # left edge of row 0: half of pixel (0, 0) -> 0.5
        ((1 + 1.0) / 3, (0 + 0.5) / 2),  # between pixels (0, 1) and (0, 2) -> 2.5
        (-0.6, 0.5),                     # far outside -> 0
    ]
    loc = torch.tensor(points, dtype=torch.float64).view(1, 4, 1, 1, 1, 2)
    attn = torch.ones(1, 4, 1, 1, 1, dtype=torch.float64)
    out = ms_deform_attn_core_pytorch(value, shapes, loc, attn)
    torch.testing.assert_close(out.flatten(), torch.tensor([6.0, 0.5, 2.5, 0.0], dtype=torch.float64))


def test_pytorch_op_gradcheck():
    value, shapes, _, loc, attn = random_inputs([(3, 2), (2, 2)], N=1, M=2, D=2, Lq=2, P=2, seed=1)
    inputs = [t.requires_grad_() for t in (value, loc, attn)]
    assert torch.autograd.gradcheck(
        lambda v, loc_, a: ms_deform_attn_core_pytorch(v, shapes, loc_, a), inputs)


def test_entry_point_uses_pytorch_on_cpu_and_logs_once(monkeypatch, capsys):
    # Pretend the extension is built: CPU tensors must still take the PyTorch path (the dummy
    # has no kernels, so calling it would fail).
    monkeypatch.setattr(msda_func, "_C", object())
    monkeypatch.setattr(msda_func, "_logged_paths", set())
    value, shapes, start, loc, attn = random_inputs([(3, 4), (2, 2)])
    out = ms_deform_attn(value, shapes, start, loc, attn)
    ms_deform_attn(value, shapes, start, loc, attn)
    torch.testing.assert_close(out, ms_deform_attn_core_pytorch(value, shapes, loc, attn), rtol=0, atol=0)
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1 and "pure-PyTorch" in lines[0] and "cpu" in lines[0]


def test_a_build_without_code_for_the_gpu_falls_back_with_one_line(monkeypatch):
    """An op built for other architectures (e.g. a V100 with the sm_80+ default) is not launched
    ("no kernel image"): the PyTorch path is used, and the line says why and how to fix it."""
    from types import SimpleNamespace
    monkeypatch.setattr(msda_func, "_C", SimpleNamespace(has_kernel=lambda index: index != 1))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index: (7, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index: "Tesla V100")
    msda_func._op_runs_on.cache_clear()
    try:
        on = [SimpleNamespace(is_cuda=True, device=torch.device("cuda", i)) for i in (0, 1)]
        assert msda_func._path_for(on[0]) == "cuda op"
        why = msda_func._path_for(on[1])
        assert "without code for Tesla V100 (sm_70)" in why and "models/ops/make.sh" in why
    finally:
        msda_func._op_runs_on.cache_clear()


def test_function_without_extension_says_how_to_build(monkeypatch):
    monkeypatch.setattr(msda_func, "_C", None)
    value, shapes, start, loc, attn = random_inputs([(2, 2)])
    with pytest.raises(RuntimeError, match="models/ops/README.md"):
        MSDeformAttnFunction.apply(value, shapes, start, loc, attn, 64)


# ---- the module -------------------------------------------------------------------------------

@pytest.mark.parametrize("n_levels, n_rows", [(4, 256), (1, 64)])
def test_module_parameters_match_upstream(n_levels, n_rows):
    m = MSDeformAttn(256, n_levels, 8, 4)
    shapes = {k: tuple(v.shape) for k, v in m.state_dict().items()}
    assert shapes == {
        "sampling_offsets.weight": (n_rows, 256), "sampling_offsets.bias": (n_rows,),
        "attention_weights.weight": (n_rows // 2, 256), "attention_weights.bias": (n_rows // 2,),
        "value_proj.weight": (256, 256), "value_proj.bias": (256,),
        "output_proj.weight": (256, 256), "output_proj.bias": (256,),
    }
    assert m.im2col_step == 64


def test_module_init():
    m = MSDeformAttn(256, 4, 8, 4)
    # head h looks along angle 2*pi*h/8, pushed onto the unit square; point i at (i+1) steps
    directions = torch.tensor([[1, 0], [1, 1], [0, 1], [-1, 1], [-1, 0], [-1, -1], [0, -1], [1, -1]],
                              dtype=torch.float32)
    expected = directions[:, None, None, :] * torch.arange(1.0, 5.0)[None, None, :, None]
    torch.testing.assert_close(m.sampling_offsets.bias.detach().view(8, 4, 4, 2),
                               expected.expand(8, 4, 4, 2), rtol=0, atol=1e-5)
    for t in (m.sampling_offsets.weight, m.attention_weights.weight, m.attention_weights.bias,
              m.value_proj.bias, m.output_proj.bias):
        assert torch.count_nonzero(t) == 0
    bound = math.sqrt(6 / (256 + 256))  # xavier_uniform
    for w in (m.value_proj.weight, m.output_proj.weight):
        assert w.abs().max() <= bound and w.std() > 0.9 * bound / math.sqrt(3)


def test_module_head_dim_checks():
    with pytest.warns(UserWarning, match="power of 2"):
        MSDeformAttn(d_model=48, n_levels=1, n_heads=2, n_points=1)
    with pytest.raises(ValueError, match="divisible"):
        MSDeformAttn(d_model=30, n_levels=1, n_heads=4, n_points=1)


SHAPES = [(4, 5), (2, 3)]


def small_module(seed=0):
    torch.manual_seed(seed)
    m = MSDeformAttn(d_model=16, n_levels=2, n_heads=2, n_points=3)
    # Non-zero offsets and attention logits, so that the query actually matters.
    nn.init.normal_(m.sampling_offsets.weight, std=0.3)
    nn.init.normal_(m.attention_weights.weight, std=0.3)
    return m


def module_inputs(N=2, Lq=3, ref_dim=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = torch.tensor(SHAPES)
    S = int((shapes[:, 0] * shapes[:, 1]).sum())
    query = torch.randn(N, Lq, 16, generator=g)
    ref = torch.rand(N, Lq, len(SHAPES), ref_dim, generator=g)
    src = torch.randn(N, S, 16, generator=g)
    return query, ref, src, shapes, level_start_index(shapes)


def capture_operator_inputs(monkeypatch):
    captured = {}

    def spy(value, shapes, start, loc, attn, im2col_step, spatial_sizes=None):
        captured.update(value=value, loc=loc, attn=attn, spatial_sizes=spatial_sizes)
        return ms_deform_attn(value, shapes, start, loc, attn, im2col_step, spatial_sizes=spatial_sizes)
    monkeypatch.setattr(msda_module, "ms_deform_attn", spy)
    return captured


@pytest.mark.parametrize("ref_dim", [2, 4])
def test_module_sampling_locations_and_weights(monkeypatch, ref_dim):
    captured = capture_operator_inputs(monkeypatch)
    m = small_module()
    query, ref, src, shapes, start = module_inputs(ref_dim=ref_dim)
    out = m(query, ref, src, shapes, start)
    assert out.shape == query.shape

    offsets = m.sampling_offsets(query).view(2, 3, 2, 2, 3, 2)  # N, Lq, heads, levels, points, xy
    expected = torch.empty_like(offsets)
    for lvl, (H, W) in enumerate(SHAPES):
        r = ref[:, :, None, lvl, None, :]
        if ref_dim == 2:  # offsets in pixels of this level
            expected[:, :, :, lvl, :, 0] = r[..., 0] + offsets[:, :, :, lvl, :, 0] / W
            expected[:, :, :, lvl, :, 1] = r[..., 1] + offsets[:, :, :, lvl, :, 1] / H
        else:  # offsets in units of half the box over n_points
            expected[:, :, :, lvl] = r[..., :2] + offsets[:, :, :, lvl] / 3 * r[..., 2:] * 0.5
    torch.testing.assert_close(captured["loc"], expected)

    logits = m.attention_weights(query).view(2, 3, 2, 6)
    torch.testing.assert_close(captured["attn"], logits.softmax(-1).view(2, 3, 2, 2, 3))
    assert captured["value"].shape == (2, 4 * 5 + 2 * 3, 2, 8)


def test_module_padding_mask_hides_padded_values():
    m = small_module()
    query, ref, src, shapes, start = module_inputs()
    # Pad the last column of every level.
    mask = torch.zeros(2, src.shape[1], dtype=torch.bool)
    for (H, W), s in zip(SHAPES, start.tolist()):
        mask[:, s + W - 1:s + H * W:W] = True
    changed = src.clone()
    changed[mask] = torch.randn(int(mask.sum()), 16) * 10

    with torch.no_grad():
        torch.testing.assert_close(m(query, ref, changed, shapes, start, mask),
                                   m(query, ref, src, shapes, start, mask), rtol=0, atol=0)
        # without the mask the padded values do reach the output
        assert not torch.allclose(m(query, ref, changed, shapes, start), m(query, ref, src, shapes, start))


def test_module_rejects_bad_inputs():
    m = small_module()
    query, ref, src, shapes, start = module_inputs()
    with pytest.raises(ValueError, match="2 or 4"):
        m(query, torch.rand(2, 3, 2, 3), src, shapes, start)
    with pytest.raises(ValueError, match="input_flatten has"):
        m(query, ref, src[:, :-1], shapes, start)


def test_module_backward_reaches_every_parameter():
    m = small_module()
    query, ref, src, shapes, start = module_inputs()
    m(query, ref, src, shapes, start).square().sum().backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


# ---- the CUDA kernels, compiled for the CPU (tests/cuda_host emulates warps and atomics) ---------

HOST_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cuda_host")


@pytest.fixture(scope="module")
def host_kernels(tmp_path_factory):
    """The kernel source of the CUDA op, built with g++ as a CPU library: the kernels' indexing,
    bilinear weights, boundary handling, warp reductions and atomic accumulation are checked
    here on every machine, not only where a GPU is lent."""
    if shutil.which("g++") is None:
        pytest.skip("needs g++ to compile the kernels for the CPU")
    library = tmp_path_factory.mktemp("msda_host") / "msda_host.so"
    build = subprocess.run(
        ["g++", "-std=c++20", "-O2", "-pthread", "-shared", "-fPIC", "-Wall", "-Wextra", "-Werror",
         "-I", HOST_DIR, "-I", os.path.join(OPS_DIR, "src", "cuda"),
         os.path.join(HOST_DIR, "ms_deform_attn_host.cpp"), "-o", str(library)],
        capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr[-3000:]
    return ctypes.CDLL(str(library))


def _host_call(lib, name, dtype, tensors, sizes, outputs):
    """Calls msda_<name>_<f32|f64> with contiguous CPU tensors; returns its status (0 = fine)."""
    for t in tensors + outputs:
        assert t.is_contiguous() and t.device.type == "cpu"
    fn = getattr(lib, f"msda_{name}_{'f64' if dtype == torch.float64 else 'f32'}")
    fn.restype = ctypes.c_int
    pointers = [ctypes.c_void_p(t.data_ptr()) for t in tensors]
    batch, spatial, *small = sizes
    ints = [ctypes.c_int64(batch), ctypes.c_int64(spatial)] + [ctypes.c_int(v) for v in small]
    return fn(*pointers, *ints, *[ctypes.c_void_p(t.data_ptr()) for t in outputs])


def host_forward_backward(lib, value, shapes, start, loc, attn, grad_output):
    """Forward and backward of the kernels on the CPU, launched as ms_deform_attn_cuda.cu does
    (one batch chunk)."""
    N, S, M, D = value.shape
    _, Lq, _, L, P, _ = loc.shape
    sizes = (N, S, Lq, M, D, L, P)
    output = torch.empty(N, Lq, M * D, dtype=value.dtype)
    assert _host_call(lib, "forward", value.dtype, [value, shapes, start, loc, attn], sizes, [output]) == 0
    grads = [torch.zeros_like(value), torch.zeros_like(loc), torch.zeros_like(attn)]
    status = _host_call(lib, "backward", value.dtype, [value, shapes, start, loc, attn, grad_output],
                        sizes, grads)
    assert status == 0, "the lanes of a warp did not all reach the same shuffles"
    return [output] + grads


def pytorch_forward_backward(value, shapes, loc, attn, grad_output):
    inputs = [t.clone().requires_grad_() for t in (value, loc, attn)]
    output = ms_deform_attn_core_pytorch(inputs[0], shapes, inputs[1], inputs[2])
    output.backward(grad_output)
    return [output.detach()] + [t.grad for t in inputs]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("channels", [3, 32, 33, 70])
def test_host_kernels_match_pytorch(host_kernels, dtype, channels):
    # channels < 32 leaves lanes idle, 33 and 70 make lanes loop; 2*5*3 = 30 rows end inside a block.
    value, shapes, start, loc, attn = random_inputs([(6, 4), (3, 2), (2, 1), (1, 1)], N=2, M=3,
                                                    D=channels, Lq=5, P=3, dtype=dtype)
    grad_output = torch.randn(2, 5, 3 * channels, dtype=dtype, generator=torch.Generator().manual_seed(3))
    kernels = host_forward_backward(host_kernels, value, shapes, start, loc, attn, grad_output)
    reference = pytorch_forward_backward(*(t.double() for t in (value,)), shapes,
                                         loc.double(), attn.double(), grad_output.double())
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-12)
    for name, got, want in zip(("output", "grad_value", "grad_sampling_loc", "grad_attn_weight"),
                               kernels, reference):
        torch.testing.assert_close(got.double(), want, **tol, msg=lambda m, name=name: f"{name}: {m}")


def test_host_kernels_edges_and_far_away_points(host_kernels):
    # Points on pixel centres, on the map borders, just outside, and absurdly far away (the
    # kernels must not convert those to integers): all read zeros outside, as grid_sample does.
    value, shapes, start, _, attn = random_inputs([(3, 4), (2, 2)], N=1, M=2, D=5, Lq=8, P=2)
    coords = torch.tensor([0.0, 1.0, 0.5, 1 / 8, -1e-7, 1 + 1e-7, -1e30, 1e30], dtype=torch.float64)
    g = torch.Generator().manual_seed(4)
    loc = coords[torch.randint(len(coords), (1, 8, 2, 2, 2, 2), generator=g)]
    grad_output = torch.randn(1, 8, 10, dtype=torch.float64, generator=g)
    kernels = host_forward_backward(host_kernels, value, shapes, start, loc, attn, grad_output)
    reference = pytorch_forward_backward(value, shapes, loc, attn, grad_output)
    far = loc.abs().amax(-1) > 2
    assert far.any() and (~far).any()
    for got, want in zip(kernels[:2] + kernels[3:], reference[:2] + reference[3:]):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    # Location gradients: grid_sample's and the kernels' agree where the point is not on a pixel
    # boundary (there the bilinear weight has a kink and each picks a side).
    on_grid = torch.zeros_like(far)
    for lvl, (h, w) in enumerate(shapes.tolist()):
        for axis, size in ((0, w), (1, h)):
            pixels = loc[:, :, :, lvl, :, axis] * size - 0.5
            on_grid[:, :, :, lvl] |= (pixels == pixels.round()) & ~far[:, :, :, lvl]
    smooth = ~on_grid
    assert smooth.any()
    torch.testing.assert_close(kernels[2][smooth], reference[2][smooth], rtol=1e-10, atol=1e-12)


# ---- the CUDA op (GPU machines with the extension built) ---------------------------------------

@requires_cuda_op
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("channels", [30, 32, 64, 71])
def test_cuda_op_matches_pytorch(dtype, channels):
    value, shapes, start, loc, attn = random_inputs([(6, 4), (3, 2), (2, 1), (1, 1)], N=2, M=2,
                                                    D=channels, Lq=5, P=4, dtype=dtype, device="cuda")
    grad_out = torch.randn(2, 5, 2 * channels, dtype=dtype, device="cuda")
    results = []
    for op in (lambda v, loc_, a: MSDeformAttnFunction.apply(v, shapes, start, loc_, a, 64),
               lambda v, loc_, a: ms_deform_attn_core_pytorch(v, shapes, loc_, a)):
        inputs = [t.clone().requires_grad_() for t in (value, loc, attn)]
        out = op(*inputs)
        out.backward(grad_out)
        results.append([out] + [t.grad for t in inputs])
    tol = dict(rtol=1e-2, atol=1e-3) if dtype == torch.float32 else dict(rtol=1e-7, atol=1e-9)
    for cuda, reference in zip(*results):
        torch.testing.assert_close(cuda, reference, **tol)


@requires_cuda_op
def test_cuda_op_gradcheck():
    value, shapes, start, loc, attn = random_inputs([(3, 2), (2, 2)], N=1, M=2, D=3, Lq=2, P=2,
                                                    device="cuda", seed=2)
    inputs = [t.requires_grad_() for t in (value, loc, attn)]
    assert torch.autograd.gradcheck(
        lambda v, loc_, a: MSDeformAttnFunction.apply(v, shapes, start, loc_, a, 64), inputs)


@requires_cuda_op
def test_cuda_op_batch_chunks():
    value, shapes, start, loc, attn = random_inputs([(4, 3), (2, 2)], N=4, device="cuda")
    torch.testing.assert_close(MSDeformAttnFunction.apply(value, shapes, start, loc, attn, 2),
                               MSDeformAttnFunction.apply(value, shapes, start, loc, attn, 64))
    with pytest.raises(ValueError, match="divisible"):  # raised before the op (it crashed the process)
        MSDeformAttnFunction.apply(value[:3], shapes, start, loc[:3], attn[:3], 2)
    # the module's path picks a chunk that divides the batch
    torch.testing.assert_close(ms_deform_attn(value[:3], shapes, start, loc[:3], attn[:3], im2col_step=2),
                               ms_deform_attn_core_pytorch(value[:3], shapes, loc[:3], attn[:3]))


def test_op_inputs_are_checked_in_python_before_the_op(monkeypatch):
    """Every input the kernels would refuse raises a ValueError naming it, before the compiled op
    is called (a failing check inside it has killed the process)."""
    class NeverCalled:
        def __getattr__(self, name):
            raise AssertionError("the op was called")

    monkeypatch.setattr(msda_func, "_C", NeverCalled())
    good = random_inputs([(4, 3), (2, 2)], N=4, dtype=torch.float32)
    value, shapes, start, loc, attn = good
    cases = {
        "value must be": (value[0], shapes, start, loc, attn, 64),
        "sampling_locations must be": (value, shapes, start, loc[..., :1], attn, 64),
        "does not match value": (value, shapes, start, loc[:2], attn[:2], 64),
        "attention_weights must be": (value, shapes, start, loc, attn[..., :1], 64),
        "spatial_shapes must be": (value, shapes[:1], start, loc, attn, 64),
        "must be int64": (value, shapes.int(), start, loc, attn, 64),
        "float32 or float64": (value.half(), shapes, start, loc.half(), attn.half(), 64),
        "must have value's dtype": (value, shapes, start, loc.double(), attn, 64),
        "divisible by im2col_step": (value[:3], shapes, start, loc[:3], attn[:3], 2),
        "every input must be on value's CUDA device": good + [64],
    }
    for message, inputs in cases.items():
        with pytest.raises(ValueError, match=message):
            MSDeformAttnFunction.apply(*inputs)
        with pytest.raises(ValueError, match=message):
            msda_func.check_op_inputs(*inputs)
    # an empty batch divides any step: only the device is wrong here
    with pytest.raises(ValueError, match="CUDA device"):
        msda_func.check_op_inputs(value[:0], shapes, start, loc[:0], attn[:0], 64)


@pytest.mark.parametrize("batch, step, chunk", [(4, 64, 4), (65, 64, 13), (64, 64, 64), (3, 2, 1), (6, 4, 3),
                                                (7, 1, 1), (0, 64, 1)])
def test_batch_chunk_divides_the_batch(batch, step, chunk):
    assert msda_func.batch_chunk(batch, step) == chunk


@requires_cuda_op
def test_cuda_op_half_inputs_and_autocast():
    value, shapes, start, loc, attn = random_inputs([(4, 3), (2, 2)], dtype=torch.float32, device="cuda")
    out = ms_deform_attn(value.half(), shapes, start, loc, attn.half())
    assert out.dtype == torch.float16
    torch.testing.assert_close(out.float(), ms_deform_attn_core_pytorch(value, shapes, loc, attn),
                               rtol=1e-2, atol=1e-2)

    m = small_module().cuda()
    query, ref, src, shapes, start = (t.cuda() for t in module_inputs())
    with torch.autocast("cuda", dtype=torch.float16):
        out = m(query, ref, src, shapes, start)
    out.float().sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in m.parameters())


@pytest.mark.skipif(msda_func._C is None, reason="needs the built MultiScaleDeformableAttention extension")
def test_extension_rejects_cpu_tensors():
    value, shapes, start, loc, attn = random_inputs([(2, 2)])
    with pytest.raises(RuntimeError, match="only has CUDA kernels"):
        msda_func._C.ms_deform_attn_forward(value, shapes, start, loc, attn, 64)


# ---- building the extension (slow; opt in with DAP_DETR_BUILD_OPS=1) ---------------------------

@pytest.mark.skipif(os.environ.get("DAP_DETR_BUILD_OPS") != "1",
                    reason="compiles the CUDA extension (about a minute); set DAP_DETR_BUILD_OPS=1")
def test_extension_compiles_and_imports(tmp_path):
    env = dict(os.environ, FORCE_CUDA="1", CUDA_HOME=os.environ.get("CUDA_HOME", "/usr/local/cuda"),
               TORCH_CUDA_ARCH_LIST="9.0")
    build = subprocess.run(
        [sys.executable, "setup.py", "build_ext", "--build-lib", str(tmp_path / "lib"),
         "--build-temp", str(tmp_path / "tmp")],
        cwd=OPS_DIR, env=env, capture_output=True, text=True, timeout=900)
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]

    # Import in a fresh process (calling a kernel needs a GPU; a CPU call must fail cleanly).
    check = textwrap.dedent(f"""
        import sys, torch
        sys.path.insert(0, {str(tmp_path / 'lib')!r})
        import MultiScaleDeformableAttention as ext
        x = torch.zeros(1, 4, 1, 1)
        try:
            ext.ms_deform_attn_forward(x, torch.tensor([[2, 2]]), torch.tensor([0]),
                                       torch.zeros(1, 1, 1, 1, 1, 2), torch.zeros(1, 1, 1, 1, 1), 64)
        except RuntimeError as e:
            assert 'only has CUDA kernels' in str(e), e
        else:
            raise AssertionError('CPU tensors were accepted')
        assert callable(ext.has_kernel)  # asked before the first launch on a GPU
        print('ok', ext.__file__)
    """)
    run = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and run.stdout.startswith("ok"), run.stdout + run.stderr
