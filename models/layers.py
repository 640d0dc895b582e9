"""Small building blocks that several detector families use: the box/score MLP head, module
clones, activations and positional-embedding addition."""
import copy

import torch.nn.functional as F
from torch import nn


class MLP(nn.Module):
    """A stack of Linear layers with ReLU between them (none after the last)."""

    def __init__(self, input_dim, hidden_dim, output_dim, num_layers):
        super().__init__()
        hidden = [hidden_dim] * (num_layers - 1)
        self.num_layers = num_layers
        self.layers = nn.ModuleList(nn.Linear(n, k) for n, k in zip([input_dim] + hidden, hidden + [output_dim]))

    def forward(self, x):
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < self.num_layers - 1:
                x = F.relu(x)
        return x


def get_clones(module, n):
    """n independent deep copies of module, in a ModuleList."""
    return nn.ModuleList([copy.deepcopy(module) for _ in range(n)])


def activation_fn(name):
    if name == "relu":
        return F.relu
    if name == "gelu":
        return F.gelu
    raise ValueError(f"activation should be relu or gelu, not {name}")


def attend(attention, query, key, value, **kwargs):
    """The output of nn.MultiheadAttention `attention`. On CUDA through its fused kernel
    (need_weights=False: scaled_dot_product_attention). Elsewhere through the explicit softmax
    (upstream's path): the CPU kernel returns non-finite input gradients for very large attention
    logits where the explicit softmax stays finite (a randomly initialised R101 DETR reaches them)."""
    return attention(query, key, value, need_weights=not query.is_cuda, **kwargs)[0]


def with_pos_embed(tensor, pos):
    return tensor if pos is None else tensor + pos
