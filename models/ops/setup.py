"""Builds the MultiScaleDeformableAttention CUDA extension (see README.md in this folder).

    pip install --no-build-isolation .        # or: python setup.py build_ext --inplace

A machine without a GPU can build it with FORCE_CUDA=1 and an explicit TORCH_CUDA_ARCH_LIST.
"""
import glob
import os

import torch
from setuptools import setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension

HERE = os.path.dirname(os.path.abspath(__file__))


def check_build_environment():
    if CUDA_HOME is None:
        raise RuntimeError("CUDA_HOME is not set and no CUDA toolkit was found; "
                           "set CUDA_HOME (e.g. /usr/local/cuda)")
    if not (torch.cuda.is_available() or os.environ.get("FORCE_CUDA") == "1"):
        raise RuntimeError("no CUDA device is visible; set FORCE_CUDA=1 to build anyway "
                           "(together with TORCH_CUDA_ARCH_LIST)")
    if not torch.cuda.is_available() and not os.environ.get("TORCH_CUDA_ARCH_LIST"):
        # torch cannot detect the architectures without a device
        raise RuntimeError("set TORCH_CUDA_ARCH_LIST (e.g. '8.0;8.6;9.0+PTX') to build without a GPU")


def nvidia_wheel_include_dirs():
    """Header folders of torch's nvidia-* wheels (cuBLAS, cuSPARSE, cuDNN, ...), which torch's CUDA
    headers include but a minimal CUDA toolkit may lack."""
    try:
        import nvidia
    except ImportError:
        return []
    return sorted(d for root in nvidia.__path__ for d in glob.glob(os.path.join(root, "*", "include")))


def extension():
    sources = glob.glob(os.path.join(HERE, "src", "*.cpp")) + glob.glob(os.path.join(HERE, "src", "cuda", "*.cu"))
    # -isystem: searched after CUDA_HOME/include, so the toolkit's own headers always win and
    # the wheels only fill in what the toolkit lacks.
    system_includes = [flag for d in nvidia_wheel_include_dirs() for flag in ("-isystem", d)]
    nvcc_flags = [
        "-DCUDA_HAS_FP16=1",
        "-D__CUDA_NO_HALF_OPERATORS__",
        "-D__CUDA_NO_HALF_CONVERSIONS__",
        "-D__CUDA_NO_HALF2_OPERATORS__",
    ]
    return CUDAExtension(
        "MultiScaleDeformableAttention",
        sources=sorted(sources),
        include_dirs=[os.path.join(HERE, "src")],
        extra_compile_args={"cxx": ["-O3"] + system_includes, "nvcc": ["-O3"] + nvcc_flags + system_includes},
    )


check_build_environment()
setup(
    name="MultiScaleDeformableAttention",
    version="1.0",
    description="Multi-scale deformable attention (Deformable DETR) CUDA op for dap-detr",
    packages=[],
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension},
)
