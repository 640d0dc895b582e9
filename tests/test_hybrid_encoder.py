"""RT-DETR's hybrid encoder: the 2-d sin-cos position embedding against its formula."""
import math

import torch

from models.hybrid_encoder import sincos_position_embedding


def test_sincos_position_embedding_formula():
    """Column index first (sin, cos), then row index, at 1 / 10000**(i / (dim / 4)); the grid is
    enumerated column-major: position k is column k // h, row k % h."""
    w, h, dim = 3, 2, 8
    pos = sincos_position_embedding(w, h, dim)
    assert pos.shape == (1, w * h, dim)
    omega = [1.0, 1.0 / 100.0]  # 10000 ** -(i / 2), i = 0, 1
    for k in range(w * h):
        x, y = k // h, k % h
        expected = ([math.sin(x * o) for o in omega] + [math.cos(x * o) for o in omega]
                    + [math.sin(y * o) for o in omega] + [math.cos(y * o) for o in omega])
        torch.testing.assert_close(pos[0, k], torch.tensor(expected))
