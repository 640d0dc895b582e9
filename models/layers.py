"""Building blocks that several detector families use: the box/score MLP head, module clones,
activations, positional-embedding addition, the post-/pre-norm transformer encoder (DETR's, also
RT-DETR's AIFI) with the residual wiring of its layers, and frozen batch norm (the backbones')."""
import copy

import torch
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


class ResidualLayer(nn.Module):
    """Residual wiring of the transformer layers (DETR's encoder and decoder layers, RT-DETR's
    decoder layer).

    Post-norm: x = norm(x + dropout(f(x))). Pre-norm: x = x + dropout(f(norm(x))).
    """

    def __init__(self, normalize_before):
        super().__init__()
        self.normalize_before = normalize_before

    def _residual(self, x, sublayer, norm, dropout):
        if self.normalize_before:
            return x + dropout(sublayer(norm(x)))
        return norm(x + dropout(sublayer(x)))

    def _ffn(self, x):
        return self.linear2(self.dropout(self.activation(self.linear1(x))))


class TransformerEncoderLayer(ResidualLayer):

    def __init__(self, d_model, nhead, dim_feedforward=2048, dropout=0.1, activation="relu",
                 normalize_before=False):
        super().__init__(normalize_before)
        self.self_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.activation = activation_fn(activation)

    def forward(self, src, src_key_padding_mask=None, pos=None):
        def self_attention(x):
            q = k = with_pos_embed(x, pos)
            return attend(self.self_attn, q, k, x, key_padding_mask=src_key_padding_mask)

        src = self._residual(src, self_attention, self.norm1, self.dropout1)
        return self._residual(src, self._ffn, self.norm2, self.dropout2)


class TransformerEncoder(nn.Module):
    """DETR's encoder; RT-DETR's AIFI is one of post-norm layers without the final norm."""

    def __init__(self, encoder_layer, num_layers, norm=None):
        super().__init__()
        self.layers = get_clones(encoder_layer, num_layers)
        self.num_layers = num_layers
        self.norm = norm

    def forward(self, src, src_key_padding_mask=None, pos=None):
        output = src
        for layer in self.layers:
            output = layer(output, src_key_padding_mask=src_key_padding_mask, pos=pos)
        if self.norm is not None:
            output = self.norm(output)
        return output


class FrozenBatchNorm2d(nn.Module):
    """BatchNorm2d whose statistics and affine parameters are fixed buffers.

    DETR trains with 2 images per GPU, too few for batch statistics. The module keeps no
    `num_batches_tracked`, so its state dict matches the released DETR checkpoints (and
    RT-DETR's, whose PResNet freezes its batch norm the same way).
    """

    def __init__(self, n, eps=1e-5):
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(n))
        self.register_buffer("bias", torch.zeros(n))
        self.register_buffer("running_mean", torch.zeros(n))
        self.register_buffer("running_var", torch.ones(n))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict,
                              missing_keys, unexpected_keys, error_msgs):
        # torchvision's ImageNet weights come from a real BatchNorm2d and carry this counter.
        state_dict.pop(prefix + "num_batches_tracked", None)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict,
                                      missing_keys, unexpected_keys, error_msgs)

    def forward(self, x):
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        shift = self.bias - self.running_mean * scale
        # Folded in float32, applied in the input's dtype: under --amp the float32 buffers would
        # otherwise promote every feature map to float32 between the convolutions.
        return x * scale.to(x.dtype)[None, :, None, None] + shift.to(x.dtype)[None, :, None, None]
