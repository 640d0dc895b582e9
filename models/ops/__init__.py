"""Multi-scale deformable attention (Deformable DETR): the module, the operator and its
optional CUDA kernels (see README.md in this folder for building them)."""
from .functions import ms_deform_attn, ms_deform_attn_core_pytorch
from .modules import MSDeformAttn

__all__ = ["MSDeformAttn", "ms_deform_attn", "ms_deform_attn_core_pytorch"]
