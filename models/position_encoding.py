"""Positional encodings of the backbone feature map, as used by the transformer."""
import math

import torch
from torch import nn

from util.errors import UserInputError
from util.misc import NestedTensor


class PositionEmbeddingSine(nn.Module):
    """Sine/cosine encoding of the (y, x) position of every un-padded pixel.

    Positions are 1-based cumulative counts of valid pixels, so padding does not shift them.
    With `normalize`, they become `(p + offset) / (p_last + eps) * scale`: DETR uses offset 0,
    Deformable DETR -0.5 (the pixel centre).
    """

    def __init__(self, num_pos_feats=64, temperature=10000, normalize=False, scale=None, offset=0.0):
        super().__init__()
        if scale is not None and not normalize:
            raise ValueError("PositionEmbeddingSine: scale is only used with normalize=True")
        self.num_pos_feats = num_pos_feats
        self.temperature = temperature
        self.normalize = normalize
        self.scale = 2 * math.pi if scale is None else scale
        self.offset = offset

    def forward(self, tensor_list: NestedTensor):
        not_mask = ~tensor_list.mask
        y_embed = not_mask.cumsum(1, dtype=torch.float32)
        x_embed = not_mask.cumsum(2, dtype=torch.float32)
        if self.normalize:
            eps = 1e-6
            y_embed = (y_embed + self.offset) / (y_embed[:, -1:, :] + eps) * self.scale
            x_embed = (x_embed + self.offset) / (x_embed[:, :, -1:] + eps) * self.scale

        dim_t = torch.arange(self.num_pos_feats, dtype=torch.float32, device=not_mask.device)
        dim_t = self.temperature ** (2 * (dim_t // 2) / self.num_pos_feats)
        pos_x = x_embed[:, :, :, None] / dim_t
        pos_y = y_embed[:, :, :, None] / dim_t
        # Even channels carry sin, odd channels cos of the same frequency (interleaved).
        pos_x = torch.stack((pos_x[..., 0::2].sin(), pos_x[..., 1::2].cos()), dim=4).flatten(3)
        pos_y = torch.stack((pos_y[..., 0::2].sin(), pos_y[..., 1::2].cos()), dim=4).flatten(3)
        return torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2)


class PositionEmbeddingLearned(nn.Module):
    """Learned absolute encoding: one embedding per row and per column (feature maps up to 50x50)."""

    def __init__(self, num_pos_feats=256):
        super().__init__()
        self.row_embed = nn.Embedding(50, num_pos_feats)
        self.col_embed = nn.Embedding(50, num_pos_feats)
        nn.init.uniform_(self.row_embed.weight)
        nn.init.uniform_(self.col_embed.weight)

    def forward(self, tensor_list: NestedTensor):
        x = tensor_list.tensors
        h, w = x.shape[-2:]
        x_emb = self.col_embed(torch.arange(w, device=x.device))
        y_emb = self.row_embed(torch.arange(h, device=x.device))
        pos = torch.cat([x_emb.unsqueeze(0).expand(h, w, -1), y_emb.unsqueeze(1).expand(h, w, -1)], dim=-1)
        return pos.permute(2, 0, 1).unsqueeze(0).expand(x.shape[0], -1, -1, -1)


def build_position_encoding(args, sine_offset=0.0):
    """sine_offset: the offset of the normalised sine positions (DETR 0, Deformable DETR -0.5)."""
    num_pos_feats = args.hidden_dim // 2
    # v2/v3 are the names the upstream code accepted before sine/learned.
    if args.position_embedding in ("sine", "v2"):
        return PositionEmbeddingSine(num_pos_feats, normalize=True, offset=sine_offset)
    if args.position_embedding in ("learned", "v3"):
        return PositionEmbeddingLearned(num_pos_feats)
    raise UserInputError(f"unknown --position_embedding {args.position_embedding!r}; use sine or learned")
