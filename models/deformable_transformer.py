"""Deformable DETR's encoder-decoder: multi-scale deformable attention over the flattened
feature levels (encoder self-attention, decoder cross-attention) and, optionally, two-stage
query selection from encoder proposals. Tensors are batch-first: [B, S, C].
"""
import math

import torch
from torch import nn

from util.misc import inverse_sigmoid

from .layers import activation_fn, attend, get_clones, with_pos_embed
from .ops.modules import MSDeformAttn


class DeformableTransformer(nn.Module):

    def __init__(self, d_model=256, nhead=8, num_encoder_layers=6, num_decoder_layers=6, dim_feedforward=1024,
                 dropout=0.1, activation="relu", num_feature_levels=4, dec_n_points=4, enc_n_points=4,
                 two_stage=False, two_stage_num_proposals=300):
        super().__init__()
        self.d_model = d_model
        self.nhead = nhead
        self.two_stage = two_stage
        self.two_stage_num_proposals = two_stage_num_proposals

        encoder_layer = DeformableTransformerEncoderLayer(d_model, dim_feedforward, dropout, activation,
                                                          num_feature_levels, nhead, enc_n_points)
        self.encoder = DeformableTransformerEncoder(encoder_layer, num_encoder_layers)
        decoder_layer = DeformableTransformerDecoderLayer(d_model, dim_feedforward, dropout, activation,
                                                          num_feature_levels, nhead, dec_n_points)
        self.decoder = DeformableTransformerDecoder(decoder_layer, num_decoder_layers)

        self.level_embed = nn.Parameter(torch.empty(num_feature_levels, d_model))
        if two_stage:
            self.enc_output = nn.Linear(d_model, d_model)
            self.enc_output_norm = nn.LayerNorm(d_model)
            self.pos_trans = nn.Linear(d_model * 2, d_model * 2)
            self.pos_trans_norm = nn.LayerNorm(d_model * 2)
        else:
            self.reference_points = nn.Linear(d_model, 2)
        self._reset_parameters()

    def _reset_parameters(self):
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        # The attention modules have their own initialisation (zero offsets on a fixed grid).
        for m in self.modules():
            if isinstance(m, MSDeformAttn):
                m._reset_parameters()
        if not self.two_stage:
            nn.init.xavier_uniform_(self.reference_points.weight, gain=1.0)
            nn.init.constant_(self.reference_points.bias, 0.)
        nn.init.normal_(self.level_embed)

    def get_proposal_pos_embed(self, proposals):
        """Sine embedding of unsigmoided proposal boxes [B,K,4] -> [B,K,2*d_model]: d_model/2
        interleaved sin/cos features per coordinate (upstream fixes 128, i.e. d_model 256)."""
        num_pos_feats = self.d_model // 2
        dim_t = torch.arange(num_pos_feats, dtype=torch.float32, device=proposals.device)
        dim_t = 10000 ** (2 * (dim_t // 2) / num_pos_feats)
        pos = proposals.sigmoid()[:, :, :, None] * (2 * math.pi) / dim_t
        return torch.stack((pos[..., 0::2].sin(), pos[..., 1::2].cos()), dim=4).flatten(2)

    def gen_encoder_output_proposals(self, memory, memory_padding_mask, spatial_sizes):
        """One proposal per encoder token: a box centred on it, 0.05 * 2^level wide and high
        (relative to the valid image). Returns (output_memory [B,S,C], proposals [B,S,4]
        unsigmoided); tokens on padding or with a proposal touching the border get memory 0
        and proposal +inf. spatial_sizes: (H, W) of each level, numbers."""
        batch = memory.shape[0]
        proposals = []
        start = 0
        for lvl, (h, w) in enumerate(spatial_sizes):
            mask = memory_padding_mask[:, start:start + h * w].view(batch, h, w)
            valid_h = (~mask[:, :, 0]).sum(1)
            valid_w = (~mask[:, 0, :]).sum(1)
            grid_y, grid_x = torch.meshgrid(torch.arange(h, dtype=torch.float32, device=memory.device),
                                            torch.arange(w, dtype=torch.float32, device=memory.device),
                                            indexing="ij")
            grid = torch.stack([grid_x, grid_y], -1)  # [h, w, 2] as (x, y)
            scale = torch.stack([valid_w, valid_h], -1).view(batch, 1, 1, 2)
            grid = (grid[None] + 0.5) / scale
            wh = torch.full_like(grid, 0.05 * 2.0 ** lvl)
            proposals.append(torch.cat((grid, wh), -1).view(batch, -1, 4))
            start += h * w
        output_proposals = torch.cat(proposals, 1)
        valid = ((output_proposals > 0.01) & (output_proposals < 0.99)).all(-1, keepdim=True)
        output_proposals = torch.log(output_proposals / (1 - output_proposals))
        invalid = memory_padding_mask.unsqueeze(-1) | ~valid
        output_proposals = output_proposals.masked_fill(invalid, float("inf"))
        output_memory = memory.masked_fill(invalid, 0.)
        return self.enc_output_norm(self.enc_output(output_memory)), output_proposals

    @staticmethod
    def get_valid_ratio(mask):
        """(valid width / W, valid height / H) of each image of a padded [B,H,W] mask -> [B,2]."""
        _, h, w = mask.shape
        valid_h = (~mask[:, :, 0]).sum(1)
        valid_w = (~mask[:, 0, :]).sum(1)
        return torch.stack([valid_w.float() / w, valid_h.float() / h], -1)

    def forward(self, srcs, masks, pos_embeds, query_embed=None):
        """srcs, masks, pos_embeds: one [B,C,H_l,W_l] / [B,H_l,W_l] / [B,C,H_l,W_l] per level;
        query_embed [Q, 2C] (query position | content), unused with two_stage.

        Returns hs [L,B,Q,C] (every decoder layer), init_reference [B,Q,2|4], inter_references
        [L,B,Q,2|4] (sigmoided), and for two_stage the encoder's class logits [B,S,num_classes]
        and unsigmoided boxes [B,S,4] (else None, None).
        """
        if not self.two_stage and query_embed is None:
            raise ValueError("DeformableTransformer: query_embed is required without two_stage")
        src_flatten, mask_flatten, lvl_pos_embed_flatten, spatial_sizes = [], [], [], []
        for lvl, (src, mask, pos_embed) in enumerate(zip(srcs, masks, pos_embeds)):
            spatial_sizes.append(tuple(src.shape[-2:]))
            src_flatten.append(src.flatten(2).transpose(1, 2))
            mask_flatten.append(mask.flatten(1))
            lvl_pos_embed_flatten.append(pos_embed.flatten(2).transpose(1, 2) + self.level_embed[lvl].view(1, 1, -1))
        src_flatten = torch.cat(src_flatten, 1)
        mask_flatten = torch.cat(mask_flatten, 1)
        lvl_pos_embed_flatten = torch.cat(lvl_pos_embed_flatten, 1)
        # The sizes stay on the host as numbers too: reading them back would make it wait for the GPU.
        spatial_shapes = torch.as_tensor(spatial_sizes, dtype=torch.long).to(src_flatten.device, non_blocking=True)
        level_start_index = torch.cat((spatial_shapes.new_zeros((1,)), spatial_shapes.prod(1).cumsum(0)[:-1]))
        valid_ratios = torch.stack([self.get_valid_ratio(m) for m in masks], 1)

        memory = self.encoder(src_flatten, spatial_shapes, level_start_index, valid_ratios,
                              lvl_pos_embed_flatten, mask_flatten, spatial_sizes=spatial_sizes)

        batch, _, c = memory.shape
        enc_outputs_class = enc_outputs_coord_unact = None
        if self.two_stage:
            output_memory, output_proposals = self.gen_encoder_output_proposals(memory, mask_flatten, spatial_sizes)
            # The heads after the last decoder layer's score the encoder tokens (the model registers them).
            enc_outputs_class = self.decoder.class_embed[self.decoder.num_layers](output_memory)
            enc_outputs_coord_unact = self.decoder.bbox_embed[self.decoder.num_layers](output_memory) + output_proposals
            # The best-scoring proposals (class channel 0: object vs not) seed the queries.
            topk = torch.topk(enc_outputs_class[..., 0], self.two_stage_num_proposals, dim=1)[1]
            topk_coords_unact = torch.gather(enc_outputs_coord_unact, 1, topk.unsqueeze(-1).repeat(1, 1, 4)).detach()
            reference_points = topk_coords_unact.sigmoid()
            pos_trans_out = self.pos_trans_norm(self.pos_trans(self.get_proposal_pos_embed(topk_coords_unact)))
            query_pos, tgt = torch.split(pos_trans_out, c, dim=2)
        else:
            query_pos, tgt = torch.split(query_embed, c, dim=1)
            query_pos = query_pos.unsqueeze(0).expand(batch, -1, -1)
            tgt = tgt.unsqueeze(0).expand(batch, -1, -1)
            reference_points = self.reference_points(query_pos).sigmoid()
        init_reference = reference_points

        hs, inter_references = self.decoder(tgt, reference_points, memory, spatial_shapes, level_start_index,
                                            valid_ratios, query_pos, mask_flatten, spatial_sizes=spatial_sizes)
        return hs, init_reference, inter_references, enc_outputs_class, enc_outputs_coord_unact


class DeformableTransformerEncoderLayer(nn.Module):
    """Post-norm: deformable self-attention over all levels, then the feed-forward network."""

    def __init__(self, d_model=256, d_ffn=1024, dropout=0.1, activation="relu", n_levels=4, n_heads=8, n_points=4):
        super().__init__()
        self.self_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, d_ffn)
        self.activation = activation_fn(activation)
        self.dropout2 = nn.Dropout(dropout)
        self.linear2 = nn.Linear(d_ffn, d_model)
        self.dropout3 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)

    def forward(self, src, pos, reference_points, spatial_shapes, level_start_index, padding_mask=None,
                spatial_sizes=None):
        src2 = self.self_attn(with_pos_embed(src, pos), reference_points, src, spatial_shapes, level_start_index,
                              padding_mask, spatial_sizes=spatial_sizes)
        src = self.norm1(src + self.dropout1(src2))
        src2 = self.linear2(self.dropout2(self.activation(self.linear1(src))))
        return self.norm2(src + self.dropout3(src2))


class DeformableTransformerEncoder(nn.Module):

    def __init__(self, encoder_layer, num_layers):
        super().__init__()
        self.layers = get_clones(encoder_layer, num_layers)
        self.num_layers = num_layers

    @staticmethod
    def get_reference_points(spatial_sizes, valid_ratios, device):
        """Normalised centre of every token, [B,S,L,2] (x, y): relative to the valid part of
        its own level, then expressed in each level's padded frame."""
        reference_points_list = []
        for lvl, (h, w) in enumerate(spatial_sizes):
            ref_y, ref_x = torch.meshgrid(torch.linspace(0.5, h - 0.5, h, dtype=torch.float32, device=device),
                                          torch.linspace(0.5, w - 0.5, w, dtype=torch.float32, device=device),
                                          indexing="ij")
            ref_y = ref_y.reshape(-1)[None] / (valid_ratios[:, None, lvl, 1] * h)
            ref_x = ref_x.reshape(-1)[None] / (valid_ratios[:, None, lvl, 0] * w)
            reference_points_list.append(torch.stack((ref_x, ref_y), -1))
        reference_points = torch.cat(reference_points_list, 1)
        return reference_points[:, :, None] * valid_ratios[:, None]

    def forward(self, src, spatial_shapes, level_start_index, valid_ratios, pos=None, padding_mask=None,
                spatial_sizes=None):
        """spatial_sizes: spatial_shapes as (H, W) numbers, when the caller has them."""
        spatial_sizes = spatial_shapes.tolist() if spatial_sizes is None else spatial_sizes
        output = src
        reference_points = self.get_reference_points(spatial_sizes, valid_ratios, device=src.device)
        for layer in self.layers:
            output = layer(output, pos, reference_points, spatial_shapes, level_start_index, padding_mask,
                           spatial_sizes=spatial_sizes)
        return output


class DeformableTransformerDecoderLayer(nn.Module):
    """Post-norm: query self-attention, deformable cross-attention to the encoder memory
    around each query's reference point, then the feed-forward network."""

    def __init__(self, d_model=256, d_ffn=1024, dropout=0.1, activation="relu", n_levels=4, n_heads=8, n_points=4):
        super().__init__()
        self.cross_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.self_attn = nn.MultiheadAttention(d_model, n_heads, dropout=dropout, batch_first=True)
        self.dropout2 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, d_ffn)
        self.activation = activation_fn(activation)
        self.dropout3 = nn.Dropout(dropout)
        self.linear2 = nn.Linear(d_ffn, d_model)
        self.dropout4 = nn.Dropout(dropout)
        self.norm3 = nn.LayerNorm(d_model)

    def forward(self, tgt, query_pos, reference_points, src, src_spatial_shapes, level_start_index,
                src_padding_mask=None, spatial_sizes=None):
        q = k = with_pos_embed(tgt, query_pos)
        tgt2 = attend(self.self_attn, q, k, tgt)
        tgt = self.norm2(tgt + self.dropout2(tgt2))
        tgt2 = self.cross_attn(with_pos_embed(tgt, query_pos), reference_points, src, src_spatial_shapes,
                               level_start_index, src_padding_mask, spatial_sizes=spatial_sizes)
        tgt = self.norm1(tgt + self.dropout1(tgt2))
        tgt2 = self.linear2(self.dropout3(self.activation(self.linear1(tgt))))
        return self.norm3(tgt + self.dropout4(tgt2))


class DeformableTransformerDecoder(nn.Module):
    """Runs the layers, returning every layer's output and reference points.

    bbox_embed / class_embed are the detector's per-layer heads, registered here by
    DeformableDETR: bbox_embed (box refinement) moves each layer's reference boxes by that
    layer's predicted offsets; both heads, one past the last layer, score the encoder
    proposals of the two-stage variant.
    """

    def __init__(self, decoder_layer, num_layers):
        super().__init__()
        self.layers = get_clones(decoder_layer, num_layers)
        self.num_layers = num_layers
        self.bbox_embed = None
        self.class_embed = None

    def forward(self, tgt, reference_points, src, src_spatial_shapes, src_level_start_index, src_valid_ratios,
                query_pos=None, src_padding_mask=None, spatial_sizes=None):
        """reference_points: [B,Q,2] points or [B,Q,4] boxes, sigmoided, relative to the valid image."""
        output = tgt
        intermediate, intermediate_reference_points = [], []
        for lid, layer in enumerate(self.layers):
            # Relative to the valid image -> relative to each level's padded map.
            if reference_points.shape[-1] == 4:
                ratios = torch.cat([src_valid_ratios, src_valid_ratios], -1)
            else:
                ratios = src_valid_ratios
            reference_points_input = reference_points[:, :, None] * ratios[:, None]
            output = layer(output, query_pos, reference_points_input, src, src_spatial_shapes,
                           src_level_start_index, src_padding_mask, spatial_sizes=spatial_sizes)

            if self.bbox_embed is not None:
                delta = self.bbox_embed[lid](output)
                if reference_points.shape[-1] == 4:
                    new_reference_points = delta + inverse_sigmoid(reference_points)
                else:  # points become boxes: the offsets move the centre, w/h are predicted outright
                    new_reference_points = torch.cat([delta[..., :2] + inverse_sigmoid(reference_points),
                                                      delta[..., 2:]], -1)
                # No gradient through the references from one layer to the next, as upstream.
                reference_points = new_reference_points.sigmoid().detach()

            intermediate.append(output)
            intermediate_reference_points.append(reference_points)
        return torch.stack(intermediate), torch.stack(intermediate_reference_points)


def build_deformable_transformer(args):
    return DeformableTransformer(
        d_model=args.hidden_dim,
        nhead=args.nheads,
        num_encoder_layers=args.enc_layers,
        num_decoder_layers=args.dec_layers,
        dim_feedforward=args.dim_feedforward,
        dropout=args.dropout,
        activation="relu",
        num_feature_levels=args.num_feature_levels,
        dec_n_points=args.dec_n_points,
        enc_n_points=args.enc_n_points,
        two_stage=args.two_stage,
        two_stage_num_proposals=args.num_queries,
    )
