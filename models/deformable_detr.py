"""Deformable DETR: the detector, its focal-loss set criterion, its flags and its recipe (FAMILY).

Class scores are per-class sigmoids (no "no object" logit); what the families share (backbone,
box losses, matching, DAP, top-k post-processing) comes from the shared modules.
"""
import math

import torch
import torch.nn.functional as F
from torch import nn

from util.args import non_negative_float, positive_int
from util.errors import UserInputError
from util.misc import NestedTensor, accuracy, inverse_sigmoid, nested_tensor_from_tensor_list

from .backbone import build_backbone
from .deformable_transformer import build_deformable_transformer
from .family import DetectorFamily, num_classes_for, param_groups_by_name
from .layers import MLP, get_clones
from .postprocess import TopKPostProcess
from .set_criterion import (
    BaseSetCriterion,
    Layer,
    build_criterion,
    focal_classification_loss,
    set_losses,
    with_aux_weights,
)


class DeformableDETR(nn.Module):
    """Backbone + multi-scale deformable transformer + class and box heads per decoder layer."""
    # What --finetune_drop_class_head re-initialises: two-stage registers the heads twice.
    class_head_prefixes = ("class_embed.", "transformer.decoder.class_embed.")

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
            self.class_embed = get_clones(self.class_embed, num_pred)
            self.bbox_embed = get_clones(self.bbox_embed, num_pred)
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

        out = {"pred_logits": outputs_classes[-1], "pred_boxes": outputs_coords[-1]}
        if self.aux_loss:
            out["aux_outputs"] = [{"pred_logits": a, "pred_boxes": b}
                                  for a, b in zip(outputs_classes[:-1], outputs_coords[:-1])]
        if self.two_stage:
            out["enc_outputs"] = {"pred_logits": enc_class, "pred_boxes": enc_coord_unact.sigmoid()}
        return out


class SetCriterion(BaseSetCriterion):
    """Deformable DETR's loss: sigmoid focal classification, L1 and GIoU (from DETR's).

    Two-stage models also have their encoder proposals matched and scored (suffix `_enc`)
    against class-agnostic targets: every ground truth is class 0, "an object".
    """

    def __init__(self, num_classes, matcher, weight_dict, losses, focal_alpha=0.25, batch_loss=None):
        super().__init__(num_classes, matcher, weight_dict, losses, batch_loss)
        self.focal_alpha = focal_alpha

    def loss_labels(self, outputs, targets, pairs, totals, log=True):
        """Focal loss over every (query, class); a matched query's target is its ground
        truth's class, every other target is 0. Normalised by num_boxes."""
        src_logits = outputs["pred_logits"]
        losses = {"loss_ce": focal_classification_loss(src_logits, pairs, totals["num_boxes"], self.focal_alpha)}
        if log:
            losses["class_error"] = 100 - accuracy(src_logits[pairs.index], pairs.labels)[0]
        return losses

    def layers(self, outputs, targets):
        yield from super().layers(outputs, targets)
        if "enc_outputs" in outputs:
            binary_targets = [{**t, "labels": torch.zeros_like(t["labels"])} for t in targets]
            yield Layer("_enc", outputs["enc_outputs"], binary_targets, self.losses)


def check_args(args):
    if args.pre_norm:
        raise UserInputError("--pre_norm is a DETR option; Deformable DETR's transformer is post-norm only")
    if args.two_stage and not args.with_box_refine:
        # Upstream scores the proposals with the refinement heads; without them it crashes.
        raise UserInputError("--two_stage needs --with_box_refine (as upstream's two-stage configuration)")


def build(args, category_ids):
    num_classes = num_classes_for(args, category_ids)

    # Multi-scale models read layer2-4; the sine positions use the pixel centres (offset -0.5).
    backbone = build_backbone(args, return_interm_layers=args.num_feature_levels > 1, sine_offset=-0.5)
    transformer = build_deformable_transformer(args)
    model = DeformableDETR(backbone, transformer, num_classes=num_classes, num_queries=args.num_queries,
                           num_feature_levels=args.num_feature_levels, aux_loss=args.aux_loss,
                           with_box_refine=args.with_box_refine, two_stage=args.two_stage)

    losses, weights = set_losses(args)
    suffixes = [f"_{i}" for i in range(args.dec_layers - 1 if args.aux_loss else 0)]
    criterion = build_criterion(
        args, SetCriterion, activation="sigmoid", num_classes=num_classes, focal_alpha=args.focal_alpha,
        weight_dict=with_aux_weights(weights, suffixes + (["_enc"] if args.two_stage else [])), losses=losses)
    return model, criterion, {"bbox": TopKPostProcess(num_select=100)}


def param_groups(model, args):
    """Upstream's three groups: the rest at --lr, the backbone (--lr_backbone_names) at
    --lr_backbone, the sampling offsets and reference points (--lr_linear_proj_names) at
    --lr times --lr_linear_proj_mult."""
    return param_groups_by_name(model, args, [(args.lr_linear_proj_names, args.lr * args.lr_linear_proj_mult)])


def add_args(parser):
    group = parser.add_argument_group("Deformable DETR")
    group.add_argument("--num_feature_levels", default=4, type=positive_int, help="feature levels")
    group.add_argument("--enc_n_points", default=4, type=positive_int, help="sampling points per encoder head")
    group.add_argument("--with_box_refine", action="store_true", help="iterative box refinement")
    group.add_argument("--two_stage", action="store_true", help="two-stage proposals (needs --with_box_refine)")
    group.add_argument("--focal_alpha", default=0.25, type=float, help="focal loss alpha")
    group.add_argument("--lr_linear_proj_names", default=["reference_points", "sampling_offsets"], type=str,
                       nargs="+", help="parameters at --lr times --lr_linear_proj_mult")
    group.add_argument("--lr_linear_proj_mult", default=0.1, type=non_negative_float)


FAMILY = DetectorFamily(
    name="deformable_detr", build=build, param_groups=param_groups, add_args=add_args, check_args=check_args,
    # With box refinement every decoder layer has its own heads; without the auxiliary losses
    # those of the earlier layers get no gradient.
    find_unused_parameters=lambda args: args.with_box_refine and not args.aux_loss,
    # Upstream's recipe: 50 epochs, lr drop at 40, 300 queries, focal class cost and weight 2.
    defaults=dict(lr=2e-4, lr_backbone=2e-5, lr_backbone_names=["backbone.0"], epochs=50, lr_drop=40,
                  dim_feedforward=1024, num_queries=300, set_cost_class=2, cls_loss_coef=2, checkpoint_period=5))
