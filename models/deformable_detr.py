"""Deformable DETR: the detector, its focal-loss set criterion and its top-k post-processor.

Class scores are per-class sigmoids (no "no object" logit); everything the detectors share
(backbone, box losses, matching, DAP plumbing) comes from models.detr.
"""
import math

import torch
import torch.nn.functional as F
from torch import nn

from util.errors import UserInputError
from util.misc import NestedTensor, accuracy, inverse_sigmoid, nested_tensor_from_tensor_list

from .backbone import build_backbone
from .dap_criterion import DAPCriterionMixin
from .deformable_transformer import build_deformable_transformer
from .detr import MLP, BaseSetCriterion, absolute_xyxy, build_criterion, default_num_classes
from .transformer import _get_clones


class DeformableDETR(nn.Module):
    """Backbone + multi-scale deformable transformer + class and box heads per decoder layer."""
    # What --finetune_drop_class_head re-initialises: two-stage registers the heads twice.
    class_head_prefixes = ('class_embed.', 'transformer.decoder.class_embed.')

    def __init__(self, backbone, transformer, num_classes, num_queries, num_feature_levels,
                 aux_loss=True, with_box_refine=False, two_stage=False):
        """num_classes: the largest class id + 1, one sigmoid logit each.
        with_box_refine: each decoder layer refines the previous layer's boxes (own heads per
        layer). two_stage: the queries are the encoder's best proposals (needs with_box_refine).
        """
        super().__init__()
        self.num_queries = num_queries
        self.transformer = transformer
        hidden_dim = transformer.d_model
        self.class_embed = nn.Linear(hidden_dim, num_classes)
        self.bbox_embed = MLP(hidden_dim, hidden_dim, 4, 3)
        self.num_feature_levels = num_feature_levels
        if not two_stage:
            # First half: query position (reference point); second half: query content.
            self.query_embed = nn.Embedding(num_queries, hidden_dim * 2)

        # The coarsest min(levels, #backbone maps) backbone maps, each projected to hidden_dim
        # (upstream has no 2-level case: it always takes all three); the levels beyond come from
        # stride-2 convolutions, the first on the last backbone map, the next on the level before.
        in_channels = backbone.num_channels[-min(num_feature_levels, len(backbone.num_channels)):]
        self.num_backbone_levels = len(in_channels)
        projections = [nn.Conv2d(c, hidden_dim, kernel_size=1) for c in in_channels]
        extra_in = in_channels[-1]
        for _ in range(num_feature_levels - len(in_channels)):
            projections.append(nn.Conv2d(extra_in, hidden_dim, kernel_size=3, stride=2, padding=1))
            extra_in = hidden_dim
        self.input_proj = nn.ModuleList(nn.Sequential(conv, nn.GroupNorm(32, hidden_dim)) for conv in projections)
        self.backbone = backbone
        self.aux_loss = aux_loss
        self.with_box_refine = with_box_refine
        self.two_stage = two_stage

        # Focal-loss prior: every class starts at probability 0.01.
        prior_prob = 0.01
        nn.init.constant_(self.class_embed.bias, -math.log((1 - prior_prob) / prior_prob))
        nn.init.constant_(self.bbox_embed.layers[-1].weight, 0)
        nn.init.constant_(self.bbox_embed.layers[-1].bias, 0)
        for proj in self.input_proj:
            nn.init.xavier_uniform_(proj[0].weight, gain=1)
            nn.init.constant_(proj[0].bias, 0)

        # One head per decoder layer (+1 for the two-stage encoder proposals). Shared heads are
        # the same module listed num_pred times, so the state dict has class_embed.N and
        # bbox_embed.N for every N, as the released checkpoints do.
        num_pred = transformer.decoder.num_layers + (1 if two_stage else 0)
        if with_box_refine:
            self.class_embed = _get_clones(self.class_embed, num_pred)
            self.bbox_embed = _get_clones(self.bbox_embed, num_pred)
            # Only the first layer predicts w/h from 2-d reference points; later layers refine boxes.
            nn.init.constant_(self.bbox_embed[0].layers[-1].bias[2:], -2.0)
            self.transformer.decoder.bbox_embed = self.bbox_embed
        else:
            nn.init.constant_(self.bbox_embed.layers[-1].bias[2:], -2.0)
            self.class_embed = nn.ModuleList([self.class_embed] * num_pred)
            self.bbox_embed = nn.ModuleList([self.bbox_embed] * num_pred)
        if two_stage:
            self.transformer.decoder.class_embed = self.class_embed
            for box_embed in self.bbox_embed:
                nn.init.constant_(box_embed.layers[-1].bias[2:], 0.0)

    def forward(self, samples, targets=None):
        """samples: NestedTensor, or a list of [3,H,W] images / a [B,3,H,W] tensor. targets:
        unused (RT-DETR's denoising needs them; the engine calls every model alike).

        Returns 'pred_logits' [B,Q,num_classes], 'pred_boxes' [B,Q,4] (cxcywh in [0,1] of each
        un-padded image), with aux_loss 'aux_outputs' (every decoder layer but the last) and,
        two-stage, 'enc_outputs' (the encoder proposals, [B,S,num_classes] and [B,S,4]).
        """
        if not isinstance(samples, NestedTensor):
            samples = nested_tensor_from_tensor_list(samples)
        features, pos = self.backbone(samples)
        features, pos = features[-self.num_backbone_levels:], pos[-self.num_backbone_levels:]

        srcs, masks = [], []
        for proj, feature in zip(self.input_proj, features):
            src, mask = feature.decompose()
            srcs.append(proj(src))
            masks.append(mask)
        for level in range(self.num_backbone_levels, self.num_feature_levels):
            src = self.input_proj[level](features[-1].tensors if level == self.num_backbone_levels else srcs[-1])
            mask = F.interpolate(samples.mask[None].float(), size=src.shape[-2:]).to(torch.bool)[0]
            srcs.append(src)
            masks.append(mask)
            pos.append(self.backbone[1](NestedTensor(src, mask)).to(src.dtype))

        query_embed = None if self.two_stage else self.query_embed.weight
        hs, init_reference, inter_references, enc_class, enc_coord_unact = self.transformer(
            srcs, masks, pos, query_embed)

        outputs_classes, outputs_coords = [], []
        for lvl in range(hs.shape[0]):
            reference = inverse_sigmoid(init_reference if lvl == 0 else inter_references[lvl - 1])
            delta = self.bbox_embed[lvl](hs[lvl])
            # Boxes are offsets from the reference, in logit space: the whole box for 4-d
            # references, the centre only for 2-d reference points.
            if reference.shape[-1] == 4:
                coord = delta + reference
            else:
                coord = torch.cat([delta[..., :2] + reference, delta[..., 2:]], -1)
            outputs_classes.append(self.class_embed[lvl](hs[lvl]))
            outputs_coords.append(coord.sigmoid())

        out = {'pred_logits': outputs_classes[-1], 'pred_boxes': outputs_coords[-1]}
        if self.aux_loss:
            out['aux_outputs'] = [{'pred_logits': a, 'pred_boxes': b}
                                  for a, b in zip(outputs_classes[:-1], outputs_coords[:-1])]
        if self.two_stage:
            out['enc_outputs'] = {'pred_logits': enc_class, 'pred_boxes': enc_coord_unact.sigmoid()}
        return out


def sigmoid_focal_loss(inputs, targets, num_boxes, alpha=0.25, gamma=2.0):
    """Focal loss (RetinaNet) of per-class sigmoid logits against 0/1 targets, both [B,Q,C]:
    BCE * (1 - p_t)^gamma, weighted alpha for positives and 1 - alpha for negatives (alpha < 0:
    unweighted). Returned as upstream reduces it: mean over queries, sum, / num_boxes."""
    prob = inputs.sigmoid()
    ce_loss = F.binary_cross_entropy_with_logits(inputs, targets, reduction="none")
    p_t = prob * targets + (1 - prob) * (1 - targets)
    loss = ce_loss * ((1 - p_t) ** gamma)
    if alpha >= 0:
        loss = (alpha * targets + (1 - alpha) * (1 - targets)) * loss
    return loss.mean(1).sum() / num_boxes


class SetCriterion(BaseSetCriterion):
    """Deformable DETR's loss: sigmoid focal classification, L1 and GIoU (from DETR's).

    Two-stage models also have their encoder proposals matched and scored (suffix `_enc`)
    against class-agnostic targets: every ground truth is class 0, "an object".
    """

    def __init__(self, num_classes, matcher, weight_dict, losses, focal_alpha=0.25):
        super().__init__(num_classes, matcher, weight_dict, losses)
        self.focal_alpha = focal_alpha

    def loss_labels(self, outputs, targets, indices, num_boxes, log=True):
        """Focal loss over every (query, class); a matched query's target is its ground
        truth's class, every other target is 0. Normalised by num_boxes."""
        src_logits = outputs['pred_logits']
        idx = self._get_src_permutation_idx(indices)
        target_classes_o = torch.cat([t['labels'][j] for t, (_, j) in zip(targets, indices)])
        target_onehot = torch.zeros_like(src_logits)
        target_onehot[idx + (target_classes_o,)] = 1
        # mean over queries times their number: upstream's reduction, kept for identical numerics.
        loss_ce = sigmoid_focal_loss(src_logits, target_onehot, num_boxes, alpha=self.focal_alpha, gamma=2)
        losses = {'loss_ce': loss_ce * src_logits.shape[1]}
        if log:
            losses['class_error'] = 100 - accuracy(src_logits[idx], target_classes_o)[0]
        return losses

    def _layer_outputs(self, outputs, targets):
        yield from super()._layer_outputs(outputs, targets)
        if 'enc_outputs' in outputs:
            binary_targets = [{**t, 'labels': torch.zeros_like(t['labels'])} for t in targets]
            yield '_enc', outputs['enc_outputs'], binary_targets


class DAPSetCriterion(DAPCriterionMixin, SetCriterion):
    """The focal SetCriterion with the 'dap' loss available (--loss dap or raw+dap)."""


class PostProcess(nn.Module):
    """Turns the model output into COCO-style detections: the num_select best (query, class)
    pairs of each image by sigmoid score, in absolute pixels."""

    def __init__(self, num_select=100):
        super().__init__()
        self.num_select = num_select

    @torch.no_grad()
    def forward(self, outputs, target_sizes):
        """target_sizes: [B,2] (height, width) of each original image.

        Returns a list of B dicts: 'scores' [K], 'labels' [K] (class ids), 'boxes' [K,4]
        (absolute xyxy), best first, K = min(num_select, Q * num_classes). A query can appear
        once per class.
        """
        out_logits = outputs['pred_logits']
        boxes = absolute_xyxy(outputs['pred_boxes'], target_sizes)
        num_classes = out_logits.shape[2]
        prob = out_logits.sigmoid().flatten(1)
        scores, index = prob.topk(min(self.num_select, prob.shape[1]), dim=1)
        labels = index % num_classes
        boxes = torch.gather(boxes, 1, (index // num_classes).unsqueeze(-1).repeat(1, 1, 4))
        return [{'scores': s, 'labels': c, 'boxes': b} for s, c, b in zip(scores, labels, boxes)]


def build(args):
    if getattr(args, 'masks', False):
        raise UserInputError("--masks (segmentation) is not supported by dap-detr; drop the flag")
    if args.pre_norm:
        raise UserInputError("--pre_norm is a DETR option; Deformable DETR's transformer is post-norm only")
    if args.two_stage and not args.with_box_refine:
        # Upstream scores the proposals with the refinement heads; without them it crashes.
        raise UserInputError("--two_stage needs --with_box_refine (as upstream's two-stage configuration)")
    if args.num_feature_levels < 1:
        raise UserInputError(f"--num_feature_levels must be at least 1, not {args.num_feature_levels}")
    num_classes = default_num_classes(args)

    # Multi-scale models read layer2-4; the sine positions use the pixel centres (offset -0.5).
    backbone = build_backbone(args, return_interm_layers=args.num_feature_levels > 1, sine_offset=-0.5)
    transformer = build_deformable_transformer(args)
    model = DeformableDETR(backbone, transformer, num_classes=num_classes, num_queries=args.num_queries,
                           num_feature_levels=args.num_feature_levels, aux_loss=args.aux_loss,
                           with_box_refine=args.with_box_refine, two_stage=args.two_stage)

    criterion = build_criterion(
        args, SetCriterion, DAPSetCriterion, num_classes=num_classes, activation='sigmoid',
        raw_weights={'loss_ce': args.cls_loss_coef, 'loss_bbox': args.bbox_loss_coef, 'loss_giou': args.giou_loss_coef},
        num_aux_layers=args.dec_layers - 1 if args.aux_loss else 0,
        extra_suffixes=('_enc',) if args.two_stage else (), focal_alpha=args.focal_alpha)
    return model, criterion, {'bbox': PostProcess()}
