"""RT-DETR's hybrid encoder: attention within the coarsest feature map only (AIFI), then
convolutional fusion across scales (CCFM: a top-down and a bottom-up path of CSP blocks)."""
import copy

import torch
import torch.nn.functional as F
from torch import nn

from .layers import TransformerEncoder, TransformerEncoderLayer
from .presnet import ConvNormLayer, activation


class RepVggBlock(nn.Module):
    """3x3 and 1x1 convolution branches summed (RepVGG); both have batch norm and no activation."""

    def __init__(self, channels, act="relu"):
        super().__init__()
        self.conv1 = ConvNormLayer(channels, channels, 3, 1)
        self.conv2 = ConvNormLayer(channels, channels, 1, 1)
        self.act = activation(act)

    def forward(self, x):
        return self.act(self.conv1(x) + self.conv2(x))


class CSPRepLayer(nn.Module):
    """Cross-stage-partial block: one 1x1 branch through RepVGG blocks, one 1x1 branch straight,
    summed, then projected to out_channels when the hidden width differs."""

    def __init__(self, in_channels, out_channels, num_blocks=3, expansion=1.0, act="silu"):
        super().__init__()
        hidden = int(out_channels * expansion)
        self.conv1 = ConvNormLayer(in_channels, hidden, 1, 1, act=act)
        self.conv2 = ConvNormLayer(in_channels, hidden, 1, 1, act=act)
        self.bottlenecks = nn.Sequential(*[RepVggBlock(hidden, act=act) for _ in range(num_blocks)])
        self.conv3 = nn.Identity() if hidden == out_channels else ConvNormLayer(hidden, out_channels, 1, 1, act=act)

    def forward(self, x):
        return self.conv3(self.bottlenecks(self.conv1(x)) + self.conv2(x))


def sincos_position_embedding(w, h, dim=256, temperature=10000.0, device=None):
    """RT-DETR's fixed 2-D embedding, [1, w*h, dim]: sin/cos of the column index, then of the row
    index, at dim/4 frequencies each.

    The grid is flattened column-major (w outermost) while feature maps are flattened row-major,
    so token (row y, column x) of a square map gets the embedding of (x=y, y=x). Upstream does
    this and its weights were trained with it, so it is kept.
    """
    if dim % 4:
        raise ValueError(f"the 2-D sin-cos embedding needs a dimension divisible by 4, got {dim}")
    grid_w, grid_h = torch.meshgrid(torch.arange(w, dtype=torch.float32, device=device),
                                    torch.arange(h, dtype=torch.float32, device=device), indexing="ij")
    omega = 1.0 / temperature ** (torch.arange(dim // 4, dtype=torch.float32, device=device) / (dim // 4))
    out_w = grid_w.flatten()[:, None] * omega[None]
    out_h = grid_h.flatten()[:, None] * omega[None]
    return torch.cat([out_w.sin(), out_w.cos(), out_h.sin(), out_h.cos()], dim=1)[None]


class HybridEncoder(nn.Module):
    """in_channels / feat_strides: the backbone's maps, finest first. Returns as many maps of
    hidden_dim channels at the same strides."""

    def __init__(self, in_channels=(512, 1024, 2048), feat_strides=(8, 16, 32), hidden_dim=256, nhead=8,
                 dim_feedforward=1024, dropout=0.0, enc_act="gelu", use_encoder_idx=(2,), num_encoder_layers=1,
                 pe_temperature=10000.0, expansion=1.0, depth_mult=1.0, act="silu"):
        super().__init__()
        self.in_channels = list(in_channels)
        self.hidden_dim = hidden_dim
        self.use_encoder_idx = list(use_encoder_idx)
        self.pe_temperature = pe_temperature
        self.out_channels = [hidden_dim] * len(in_channels)
        self.out_strides = list(feat_strides)

        self.input_proj = nn.ModuleList(
            nn.Sequential(nn.Conv2d(c, hidden_dim, kernel_size=1, bias=False), nn.BatchNorm2d(hidden_dim))
            for c in in_channels)
        # The shared (DETR's) post-norm encoder layer is the same computation with the same parameter names.
        layer = TransformerEncoderLayer(hidden_dim, nhead, dim_feedforward, dropout, activation=enc_act)
        self.encoder = nn.ModuleList(TransformerEncoder(copy.deepcopy(layer), num_encoder_layers)
                                     for _ in self.use_encoder_idx)

        num_blocks = round(3 * depth_mult)
        n_fusions = len(in_channels) - 1
        self.lateral_convs = nn.ModuleList(ConvNormLayer(hidden_dim, hidden_dim, 1, 1, act=act)
                                           for _ in range(n_fusions))
        self.fpn_blocks = nn.ModuleList(CSPRepLayer(2 * hidden_dim, hidden_dim, num_blocks, expansion, act)
                                        for _ in range(n_fusions))
        self.downsample_convs = nn.ModuleList(ConvNormLayer(hidden_dim, hidden_dim, 3, 2, act=act)
                                              for _ in range(n_fusions))
        self.pan_blocks = nn.ModuleList(CSPRepLayer(2 * hidden_dim, hidden_dim, num_blocks, expansion, act)
                                        for _ in range(n_fusions))

    def forward(self, feats):
        if len(feats) != len(self.in_channels):
            raise ValueError(f"HybridEncoder: expected {len(self.in_channels)} feature maps, got {len(feats)}")
        proj = [proj_i(feat) for proj_i, feat in zip(self.input_proj, feats)]

        # AIFI: self-attention among the pixels of the selected (coarsest) map.
        for encoder, idx in zip(self.encoder, self.use_encoder_idx):
            b, c, h, w = proj[idx].shape
            src = proj[idx].flatten(2).permute(2, 0, 1)  # [h*w, B, C], sequence first
            pos = sincos_position_embedding(w, h, c, self.pe_temperature, src.device).to(src.dtype)
            memory = encoder(src, pos=pos.transpose(0, 1))
            proj[idx] = memory.permute(1, 2, 0).reshape(b, c, h, w)

        # Top-down: each coarser map, after its lateral conv, is upsampled and fused with the next
        # finer one. The lateral output (not its input) is what the bottom-up path fuses with later.
        inner = [proj[-1]]
        for k, idx in enumerate(range(len(proj) - 1, 0, -1)):
            high = self.lateral_convs[k](inner[0])
            inner[0] = high
            low = proj[idx - 1]
            # Nearest upsampling to the finer map's size: exactly x2 for sizes divisible by the
            # coarsest stride, and still aligned for other input sizes.
            upsampled = F.interpolate(high, size=low.shape[-2:], mode="nearest")
            inner.insert(0, self.fpn_blocks[k](torch.cat([upsampled, low], dim=1)))

        # Bottom-up: each map is downsampled and fused with the next coarser top-down map.
        outs = [inner[0]]
        for k in range(len(proj) - 1):
            down = self.downsample_convs[k](outs[-1])
            outs.append(self.pan_blocks[k](torch.cat([down, inner[k + 1]], dim=1)))
        return outs
