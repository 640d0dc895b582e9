"""RT-DETR's decoder: IoU-aware selection of the top-k encoder features as initial queries, then
decoder layers with deformable cross-attention that refine boxes layer by layer, and (in
training) contrastive denoising groups decoded alongside the matching queries."""
import math
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from util.misc import inverse_sigmoid

from .denoising import contrastive_denoising_groups
from .layers import MLP, ResidualLayer, attend
from .ops import MSDeformAttn


class DecoderLayer(ResidualLayer):
    """Post-norm: self-attention (masked between denoising groups), multi-scale deformable
    cross-attention around each query's box, feed-forward."""

    def __init__(self, d_model=256, n_head=8, dim_feedforward=1024, dropout=0.0, n_levels=3, n_points=4):
        super().__init__(normalize_before=False)
        self.self_attn = nn.MultiheadAttention(d_model, n_head, dropout=dropout, batch_first=True)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        # RT-DETR's MSDeformableAttention has Deformable DETR's parameters, initialisation and
        # box-relative sampling, so the same module serves both.
        self.cross_attn = MSDeformAttn(d_model, n_levels, n_head, n_points)
        self.dropout2 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.activation = F.relu
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.dropout3 = nn.Dropout(dropout)
        self.norm3 = nn.LayerNorm(d_model)

    def forward(self, tgt, ref_boxes, memory, spatial_shapes, level_start_index, attn_mask=None, query_pos=None,
                spatial_sizes=None):
        """tgt, query_pos [B, Q, C]; ref_boxes [B, Q, 1, 4] cxcywh in [0, 1]; memory [B, S, C];
        spatial_sizes: spatial_shapes as (H, W) numbers on the host."""
        def self_attention(x):
            q = k = x + query_pos
            return attend(self.self_attn, q, k, x, attn_mask=attn_mask)

        def cross_attention(x):
            return self.cross_attn(x + query_pos, ref_boxes, memory, spatial_shapes, level_start_index,
                                   spatial_sizes=spatial_sizes)

        tgt = self._residual(tgt, self_attention, self.norm1, self.dropout1)
        tgt = self._residual(tgt, cross_attention, self.norm2, self.dropout2)
        return self._residual(tgt, self._ffn, self.norm3, self.dropout3)


class TransformerDecoder(nn.Module):

    def __init__(self, layer_kwargs, num_layers):
        super().__init__()
        self.layers = nn.ModuleList(DecoderLayer(**layer_kwargs) for _ in range(num_layers))

    def forward(self, tgt, ref_unact, memory, spatial_shapes, level_start_index, bbox_head, score_head,
                query_pos_head, attn_mask=None, spatial_sizes=None):
        """Returns (boxes [L', B, Q, 4], logits [L', B, Q, K]): every layer in training, the last
        one in evaluation.

        Each layer predicts a correction of its reference box in logit space; the corrected box
        is the next layer's reference, detached so that each layer learns its own step (look
        forward twice: the box a layer is trained on goes back through the previous layer's
        undetached prediction, DINO's scheme).
        """
        out = tgt
        ref = ref_detached = ref_unact.sigmoid()
        boxes, logits = [], []
        for i, layer in enumerate(self.layers):
            out = layer(out, ref_detached.unsqueeze(2), memory, spatial_shapes, level_start_index,
                        attn_mask, query_pos_head(ref_detached), spatial_sizes=spatial_sizes)
            delta = bbox_head[i](out)
            refined = (delta + inverse_sigmoid(ref_detached)).sigmoid()
            if self.training:
                logits.append(score_head[i](out))
                boxes.append(refined if i == 0 else (delta + inverse_sigmoid(ref)).sigmoid())
            elif i == len(self.layers) - 1:
                logits.append(score_head[i](out))
                boxes.append(refined)
            ref = refined
            ref_detached = refined.detach() if self.training else refined
        return torch.stack(boxes), torch.stack(logits)


def bias_init_with_prob(prior_prob):
    """The logit bias that makes the initial sigmoid score prior_prob (focal-loss init)."""
    return -math.log((1 - prior_prob) / prior_prob)


def generate_anchors(spatial_shapes, grid_size=0.05, eps=1e-2, dtype=torch.float32, device=None):
    """One anchor box per feature pixel: centred on it, of side grid_size * 2**level. Returns
    (anchors [1, S, 4] in logit space, +inf where invalid; valid [1, S, 1]) where valid anchors
    lie strictly within (eps, 1 - eps) in every coordinate."""
    anchors = []
    for lvl, (h, w) in enumerate(spatial_shapes):
        grid_y, grid_x = torch.meshgrid(torch.arange(h, dtype=dtype, device=device),
                                        torch.arange(w, dtype=dtype, device=device), indexing="ij")
        xy = (torch.stack([grid_x, grid_y], -1) + 0.5) / torch.tensor([w, h], dtype=dtype, device=device)
        wh = torch.full_like(xy, grid_size * 2.0 ** lvl)
        anchors.append(torch.cat([xy, wh], -1).reshape(-1, 4))
    anchors = torch.cat(anchors)[None]
    valid = ((anchors > eps) & (anchors < 1 - eps)).all(-1, keepdim=True)
    anchors = torch.where(valid, torch.log(anchors / (1 - anchors)), torch.inf)
    return anchors, valid


class RTDETRDecoder(nn.Module):
    """feats: the encoder's maps (finest first). Output dict:
    'pred_logits' [B, Q, K], 'pred_boxes' [B, Q, 4] (cxcywh in [0, 1]); in training also
    'aux_outputs' (the other decoder layers, with aux_loss), 'enc_outputs' (the selected encoder
    queries, whose classification trains the query selection) and, with denoising,
    'dn_aux_outputs' (every layer's denoising queries) and 'dn_meta'.
    """

    def __init__(self, num_classes=80, hidden_dim=256, num_queries=300, feat_channels=(256, 256, 256),
                 num_points=4, nhead=8, num_layers=6, dim_feedforward=1024, dropout=0.0, num_denoising=100,
                 label_noise_ratio=0.5, box_noise_scale=1.0, aux_loss=True, eps=1e-2):
        super().__init__()
        self.num_classes = num_classes
        self.num_queries = num_queries
        self.num_denoising = num_denoising
        self.label_noise_ratio = label_noise_ratio
        self.box_noise_scale = box_noise_scale
        self.aux_loss = aux_loss
        self.eps = eps

        self.input_proj = nn.ModuleList(
            nn.Sequential(OrderedDict([("conv", nn.Conv2d(c, hidden_dim, 1, bias=False)),
                                       ("norm", nn.BatchNorm2d(hidden_dim))]))
            for c in feat_channels)
        self.decoder = TransformerDecoder(
            dict(d_model=hidden_dim, n_head=nhead, dim_feedforward=dim_feedforward, dropout=dropout,
                 n_levels=len(feat_channels), n_points=num_points), num_layers)
        if num_denoising > 0:
            self.denoising_class_embed = nn.Embedding(num_classes + 1, hidden_dim, padding_idx=num_classes)
        self.query_pos_head = MLP(4, 2 * hidden_dim, hidden_dim, num_layers=2)
        self.enc_output = nn.Sequential(nn.Linear(hidden_dim, hidden_dim), nn.LayerNorm(hidden_dim))
        self.enc_score_head = nn.Linear(hidden_dim, num_classes)
        self.enc_bbox_head = MLP(hidden_dim, hidden_dim, 4, num_layers=3)
        self.dec_score_head = nn.ModuleList(nn.Linear(hidden_dim, num_classes) for _ in range(num_layers))
        self.dec_bbox_head = nn.ModuleList(MLP(hidden_dim, hidden_dim, 4, num_layers=3) for _ in range(num_layers))
        self._reset_parameters()

    def _reset_parameters(self):
        bias = bias_init_with_prob(0.01)
        for score_head, bbox_head in zip([self.enc_score_head, *self.dec_score_head],
                                         [self.enc_bbox_head, *self.dec_bbox_head]):
            nn.init.constant_(score_head.bias, bias)
            # Zero box correction at first: queries start exactly at their anchor / reference.
            nn.init.zeros_(bbox_head.layers[-1].weight)
            nn.init.zeros_(bbox_head.layers[-1].bias)
        nn.init.xavier_uniform_(self.enc_output[0].weight)
        nn.init.xavier_uniform_(self.query_pos_head.layers[0].weight)
        nn.init.xavier_uniform_(self.query_pos_head.layers[1].weight)

    def _flatten(self, feats):
        """Projected maps flattened and concatenated: memory [B, S, C], spatial shapes long [L, 2],
        level start indices long [L], and the shapes as (H, W) numbers (kept on the host: reading
        them back would make it wait for the GPU)."""
        proj = [proj_i(feat) for proj_i, feat in zip(self.input_proj, feats)]
        memory = torch.cat([p.flatten(2).transpose(1, 2) for p in proj], 1)
        spatial_sizes = [tuple(p.shape[-2:]) for p in proj]
        shapes = torch.tensor(spatial_sizes, dtype=torch.long)
        starts = torch.cat([shapes.new_zeros(1), shapes.prod(1).cumsum(0)[:-1]])
        return (memory, shapes.to(memory.device, non_blocking=True), starts.to(memory.device, non_blocking=True),
                spatial_sizes)

    def _select_queries(self, memory, spatial_sizes):
        """IoU-aware query selection: score every encoder feature, keep the num_queries best as
        the decoder's initial content (detached) and reference boxes (their anchor plus the
        predicted correction, detached). Returns (target, ref_unact, enc_outputs)."""
        if memory.shape[1] < self.num_queries:
            raise ValueError(f"RT-DETR: the feature maps have {memory.shape[1]} positions, fewer than "
                             f"num_queries={self.num_queries}; use larger images or fewer queries")
        anchors, valid = generate_anchors(spatial_sizes, eps=self.eps, device=memory.device)
        output_memory = self.enc_output(valid.to(memory.dtype) * memory)
        enc_logits = self.enc_score_head(output_memory)
        enc_coords_unact = self.enc_bbox_head(output_memory) + anchors

        topk = enc_logits.max(-1).values.topk(self.num_queries, dim=1).indices  # [B, Q]

        def gather(x):
            return x.gather(1, topk.unsqueeze(-1).expand(-1, -1, x.shape[-1]))

        ref_unact = gather(enc_coords_unact)
        enc_outputs = {"pred_logits": gather(enc_logits), "pred_boxes": ref_unact.sigmoid()}
        return gather(output_memory).detach(), ref_unact.detach(), enc_outputs

    def forward(self, feats, targets=None):
        memory, spatial_shapes, level_start_index, spatial_sizes = self._flatten(feats)
        target, ref_unact, enc_outputs = self._select_queries(memory, spatial_sizes)

        dn = None
        if self.training and self.num_denoising > 0:
            if targets is None:
                raise ValueError("RT-DETR's training forward needs the targets (denoising): "
                                 "call model(samples, targets)")
            dn = contrastive_denoising_groups(targets, self.num_classes, self.num_queries, self.denoising_class_embed,
                                              self.num_denoising, self.label_noise_ratio, self.box_noise_scale)
            target = torch.cat([dn.class_embeds, target], 1)
            ref_unact = torch.cat([dn.boxes_unact, ref_unact], 1)

        boxes, logits = self.decoder(target, ref_unact, memory, spatial_shapes, level_start_index,
                                     self.dec_bbox_head, self.dec_score_head, self.query_pos_head,
                                     attn_mask=None if dn is None else dn.attn_mask, spatial_sizes=spatial_sizes)
        if dn is not None:
            dn_boxes, boxes = boxes.split(dn.meta["dn_num_split"], dim=2)
            dn_logits, logits = logits.split(dn.meta["dn_num_split"], dim=2)

        out = {"pred_logits": logits[-1], "pred_boxes": boxes[-1]}
        if self.training:
            if self.aux_loss:
                out["aux_outputs"] = [{"pred_logits": a, "pred_boxes": b} for a, b in zip(logits[:-1], boxes[:-1])]
            out["enc_outputs"] = enc_outputs
            if dn is not None:
                out["dn_aux_outputs"] = [{"pred_logits": a, "pred_boxes": b} for a, b in zip(dn_logits, dn_boxes)]
                out["dn_meta"] = dn.meta
        return out
