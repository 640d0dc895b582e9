"""RT-DETR (Zhao et al., "DETRs Beat YOLOs on Real-time Object Detection"): the detector, its
criterion (varifocal + box losses, denoising losses), its flags and its recipe (FAMILY).

Labels are RT-DETR's contiguous 0..K-1, label i for the dataset's i-th category id (its data
pipeline, datasets/rtdetr_transforms.py, maps them); the post-processor reports category ids.
"""
import random
import re

import torch
import torch.nn.functional as F
from torch import nn

from datasets.rtdetr_transforms import IMAGE_SIZE
from util import box_ops
from util.args import non_negative_float, non_negative_int, unit_interval
from util.coco import COCO_CATEGORY_IDS
from util.errors import UserInputError
from util.misc import NestedTensor, nested_tensor_from_tensor_list, scaled_size

from .denoising import denoising_match_indices
from .family import DetectorFamily
from .hybrid_encoder import HybridEncoder
from .postprocess import TopKPostProcess
from .presnet import OUT_STRIDES, build_presnet
from .rtdetr_decoder import RTDETRDecoder
from .set_criterion import (
    BaseSetCriterion,
    Layer,
    batch_loss_weights,
    build_criterion,
    focal_classification_loss,
    loss_choice,
    one_hot_targets,
)

# Training sizes of upstream's multi-scale schedule (times --input_scale), one drawn per batch.
MULTI_SCALE_SIZES = (480, 512, 544, 576, 608, 640, 640, 640, 672, 704, 736, 768, 800)

# Per backbone: CSP expansion of the encoder, and the widening of its AIFI/fusion width and
# feed-forward size relative to --hidden_dim / --dim_feedforward (R101: 384 and 2048).
# Upstream also uses 3 (R18) and 4 (R34) decoder layers: pass --dec_layers for those.
BACKBONE_PRESETS = {
    "presnet18vd": dict(expansion=0.5, width_mult=1.0, ffn_mult=1),
    "presnet34vd": dict(expansion=0.5, width_mult=1.0, ffn_mult=1),
    "presnet50vd": dict(expansion=1.0, width_mult=1.0, ffn_mult=1),
    "presnet101vd": dict(expansion=1.0, width_mult=1.5, ffn_mult=2),
}


class RTDETR(nn.Module):
    """Backbone -> hybrid encoder -> decoder. In training, with multi_scale (a list of sizes),
    the whole batch is first resized to a random square size (nearest neighbour), as upstream."""

    # what --finetune_drop_class_head re-initialises: everything sized by the number of classes
    class_head_prefixes = ("decoder.denoising_class_embed.", "decoder.enc_score_head.", "decoder.dec_score_head.")

    def __init__(self, backbone, encoder, decoder, multi_scale=None):
        super().__init__()
        # Assignment order gives upstream's state-dict order: backbone, decoder, encoder.
        self.backbone = backbone
        self.decoder = decoder
        self.encoder = encoder
        self.multi_scale = list(multi_scale) if multi_scale else None

    def forward(self, samples, targets=None):
        """samples: NestedTensor, a [B,3,H,W] tensor or a list of [3,H,W] images, all of one size
        (the pipelines resize to a square; padding would be read as image). targets: needed in
        training for the denoising queries. Output: see RTDETRDecoder."""
        if isinstance(samples, (list, tuple)):
            samples = nested_tensor_from_tensor_list(samples)
        x = samples.tensors if isinstance(samples, NestedTensor) else samples
        if self.training and self.multi_scale:
            size = random.choice(self.multi_scale)
            x = F.interpolate(x, size=[size, size])
        return self.decoder(self.encoder(self.backbone(x)), targets)


class RTDETRCriterion(BaseSetCriterion):
    """RT-DETR's set criterion. Every output layer is matched (Hungarian, focal class cost) and
    scored with its list of losses: `losses` for the final layer and the other decoder layers
    (key suffix `_aux_i`), `enc_losses` for the selected encoder queries (suffix `_aux_{n}`,
    after the n decoder aux layers, as upstream names it). The denoising queries are matched by
    construction and scored with `dn_losses` (suffix `_dn_i`), normalised by num_boxes times the
    number of groups.

    Loss names: 'vfl' (varifocal: IoU-aware classification), 'focal' (plain classification),
    'boxes' (L1 + GIoU, DETR's). Values are unweighted; weight_dict weighs them.
    """

    def __init__(self, num_classes, matcher, weight_dict, losses, enc_losses, dn_losses, alpha=0.75, gamma=2.0,
                 batch_loss=None):
        super().__init__(num_classes, matcher, weight_dict, losses, batch_loss)
        self.enc_losses = enc_losses
        self.dn_losses = dn_losses
        self.alpha = alpha
        self.gamma = gamma

    def loss_map(self):
        return {"vfl": self.loss_vfl, "focal": self.loss_focal, "boxes": self.loss_boxes}

    def loss_vfl(self, outputs, targets, pairs, totals):
        """Varifocal loss: BCE towards the matched box's IoU (detached) at its class and 0
        elsewhere; negatives weighted by alpha * p**gamma, positives by their target IoU."""
        logits = outputs["pred_logits"]
        idx, one_hot = pairs.index, one_hot_targets(logits, pairs)
        ious = box_ops.paired_box_iou(box_ops.box_cxcywh_to_xyxy(outputs["pred_boxes"][idx]),
                                      box_ops.box_cxcywh_to_xyxy(pairs.boxes)).detach()
        target_score = torch.zeros_like(logits)
        target_score[idx] = ious.to(logits.dtype)[:, None]
        target_score = target_score * one_hot
        weight = self.alpha * logits.detach().sigmoid() ** self.gamma * (1 - one_hot) + target_score
        loss = F.binary_cross_entropy_with_logits(logits, target_score, weight=weight, reduction="none")
        # Upstream's loss.mean(1).sum() * num_queries / num_boxes, without its NaN when a batch
        # has no denoising queries.
        return {"loss_vfl": loss.sum() / totals["num_boxes"]}

    def loss_focal(self, outputs, targets, pairs, totals):
        """Sigmoid focal loss towards the one-hot class of the matched queries (RT-DETR's
        classification loss without IoU awareness)."""
        logits = outputs["pred_logits"]
        return {"loss_focal": focal_classification_loss(logits, pairs, totals["num_boxes"], self.alpha, self.gamma)}

    def layers(self, outputs, targets):
        aux = outputs.get("aux_outputs", [])
        yield Layer("", outputs, targets, self.losses)
        for i, aux_outputs in enumerate(aux):
            yield Layer(f"_aux_{i}", aux_outputs, targets, self.losses)
        if "enc_outputs" in outputs:
            yield Layer(f"_aux_{len(aux)}", outputs["enc_outputs"], targets, self.enc_losses)
        if "dn_aux_outputs" in outputs:
            meta = outputs["dn_meta"]
            indices = denoising_match_indices(meta, targets)
            for i, layer_outputs in enumerate(outputs["dn_aux_outputs"]):
                yield Layer(f"_dn_{i}", layer_outputs, targets, self.dn_losses, indices=indices,
                            box_groups=meta["dn_num_group"])


# ----------------------------------------------------------------------------- flags and recipe

def add_args(parser):
    """RT-DETR's own flags; the others map onto DETR's (FAMILY.defaults)."""
    group = parser.add_argument_group("RT-DETR")
    group.add_argument("--no_iou_aware_query_selection", dest="iou_aware_query_selection", action="store_false",
                       help="train the encoder's query-selection scores with the focal loss instead of the "
                            "IoU-aware varifocal loss (the paper's RT-DETR-dagger rows); required by --loss dap, "
                            "ap, alrp and rs")
    group.add_argument("--num_denoising", default=100, type=non_negative_int,
                       help="denoising queries (positives and negatives, all groups); 0 disables denoising")
    group.add_argument("--label_noise_ratio", default=0.5, type=unit_interval,
                       help="denoising: twice the probability of replacing a label by a random class")
    group.add_argument("--box_noise_scale", default=1.0, type=non_negative_float,
                       help="denoising: box corner noise, in units of half the box size")
    group.add_argument("--no_multi_scale", dest="multi_scale", action="store_false",
                       help="train at the evaluation size only (default: a random size of 480..800, times "
                            "--input_scale, per batch; also off with --no_train_augmentation)")


# Upstream (optimizer.yml): no weight decay on the biases and norm weights of the encoder and
# decoder (names are matched as upstream's regexes do, e.g. the BN of `encoder.input_proj.N.1`
# keeps its decay), nor on the backbone's norms (R18/R34; R50/R101 norms are frozen buffers).
_NO_DECAY = re.compile(r"(encoder|decoder).*(bias|norm.*weight)")


def param_groups(model, args):
    """AdamW parameter groups: backbone (names containing one of --lr_backbone_names) at
    --lr_backbone; weight decay 0 as above; the rest at --lr and --weight_decay."""
    groups = {key: [] for key in [(False, False), (False, True), (True, False), (True, True)]}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        backbone = any(k in name for k in args.lr_backbone_names)
        no_decay = ("norm" in name) if backbone else bool(_NO_DECAY.search(name))
        groups[backbone, no_decay].append(p)
    return [{"params": params, **({"lr": args.lr_backbone} if backbone else {}),
             **({"weight_decay": 0.0} if no_decay else {})}
            for (backbone, no_decay), params in groups.items() if params]


def loss_names(args):
    """(decoder losses, encoder losses, denoising losses) for --loss and the query selection.

    The encoder's selected queries are trained like the decoder layers (the batch-level loss
    included), with VFL (IoU-aware selection) or the focal loss as raw classification. The
    denoising queries keep their raw losses under every --loss: they reconstruct noised ground
    truth as a training aid and are never detections, so there is no AP of theirs to optimise.
    """
    choice = loss_choice(args)
    enc_cls = "vfl" if args.iou_aware_query_selection else "focal"
    rest = (["boxes"] if choice.boxes else []) + ([choice.batch_loss] if choice.batch_loss else [])
    return ((["vfl"] if choice.classification else []) + rest,
            ([enc_cls] if choice.classification else []) + rest,
            ["vfl", "boxes"])


def weights_for(names, suffix, args):
    batch_loss = loss_choice(args).batch_loss
    keys = {"vfl": {"loss_vfl": args.cls_loss_coef}, "focal": {"loss_focal": args.cls_loss_coef},
            "boxes": {"loss_bbox": args.bbox_loss_coef, "loss_giou": args.giou_loss_coef},
            batch_loss: batch_loss_weights(args)}
    return {k + suffix: w for name in names for k, w in keys[name].items()}


def check_args(args):
    if not loss_choice(args).classification and args.iou_aware_query_selection:
        raise UserInputError(f"--loss {args.loss} with RT-DETR trains the encoder's query selection with that loss, "
                             f"not with the IoU-aware varifocal loss: add --no_iou_aware_query_selection (or use "
                             f"--loss raw+dap)")
    if args.dilation or args.pre_norm:
        raise UserInputError("--dilation and --pre_norm are DETR options; RT-DETR's backbone and transformer "
                             "have neither: drop them")
    if args.backbone not in BACKBONE_PRESETS:
        raise UserInputError(f"unknown --backbone {args.backbone!r} for RT-DETR; use one of "
                             f"{', '.join(BACKBONE_PRESETS)}")
    # The query selection keeps num_queries of the encoder's positions, all levels together: the
    # smallest image of the run (square: RT-DETR resizes to size x size) must have as many.
    multi_scale = args.multi_scale and args.train_augmentation
    smallest = scaled_size(min(MULTI_SCALE_SIZES) if multi_scale else IMAGE_SIZE, args.input_scale)
    positions = sum((smallest // stride) ** 2 for stride in OUT_STRIDES)
    if positions < args.num_queries:
        raise UserInputError(f"--num_queries {args.num_queries} is more than the {positions} encoder positions of the "
                             f"smallest image ({smallest} px with --input_scale {args.input_scale}"
                             f"{', multi-scale' if multi_scale else ''}): lower --num_queries, or raise --input_scale")
    width = int(args.hidden_dim * BACKBONE_PRESETS[args.backbone]["width_mult"])
    if width % args.nheads:
        raise UserInputError(f"the encoder width {width} (--hidden_dim {args.hidden_dim} for {args.backbone}) is "
                             f"not divisible by --nheads {args.nheads}; change one of them")


def build(args, category_ids):
    categories = COCO_CATEGORY_IDS if category_ids is None else category_ids
    if args.num_classes is not None and args.num_classes != max(categories) + 1:
        raise UserInputError(f"--num_classes {args.num_classes} does not fit the dataset: RT-DETR classifies "
                             f"its {len(categories)} categories (largest id {max(categories)}, so --num_classes "
                             f"{max(categories) + 1}); drop the flag")
    num_classes = len(categories)
    preset = BACKBONE_PRESETS[args.backbone]

    backbone = build_presnet(args.backbone, train_backbone=args.lr_backbone > 0, pretrained=args.pretrained_backbone)
    encoder = HybridEncoder(
        in_channels=backbone.out_channels, feat_strides=backbone.out_strides,
        hidden_dim=int(args.hidden_dim * preset["width_mult"]), nhead=args.nheads,
        dim_feedforward=args.dim_feedforward * preset["ffn_mult"], dropout=args.dropout,
        num_encoder_layers=args.enc_layers, expansion=preset["expansion"])
    decoder = RTDETRDecoder(
        num_classes, hidden_dim=args.hidden_dim, num_queries=args.num_queries, feat_channels=encoder.out_channels,
        num_points=args.dec_n_points, nhead=args.nheads, num_layers=args.dec_layers,
        dim_feedforward=args.dim_feedforward, dropout=args.dropout, num_denoising=args.num_denoising,
        label_noise_ratio=args.label_noise_ratio, box_noise_scale=args.box_noise_scale, aux_loss=args.aux_loss)
    multi_scale = None
    if args.multi_scale and args.train_augmentation:
        multi_scale = [scaled_size(s, args.input_scale) for s in MULTI_SCALE_SIZES]
    model = RTDETR(backbone, encoder, decoder, multi_scale)

    dec_losses, enc_losses, dn_losses = loss_names(args)
    num_aux = args.dec_layers - 1 if args.aux_loss else 0
    weight_dict = weights_for(dec_losses, "", args)
    for i in range(num_aux):
        weight_dict.update(weights_for(dec_losses, f"_aux_{i}", args))
    weight_dict.update(weights_for(enc_losses, f"_aux_{num_aux}", args))
    if args.num_denoising > 0:
        for i in range(args.dec_layers):
            weight_dict.update(weights_for(dn_losses, f"_dn_{i}", args))

    criterion = build_criterion(args, RTDETRCriterion, activation="sigmoid", num_classes=num_classes,
                                weight_dict=weight_dict, losses=dec_losses, enc_losses=enc_losses, dn_losses=dn_losses)
    return model, criterion, {"bbox": TopKPostProcess(num_select=300, category_ids=categories)}


FAMILY = DetectorFamily(
    name="rtdetr", build=build, param_groups=param_groups, add_args=add_args, check_args=check_args,
    data_pipeline="rtdetr",
    # RT-DETR trains its encoder/decoder batch norms with statistics of the global batch.
    sync_batchnorm=True,
    # No find_unused_parameters: the decoder stacks every layer's scores, so each score head has
    # a gradient (zero without auxiliary losses) and DDP need not search the graph.
    # RT-DETR R50 (rtdetr_r50vd_6x_coco) where it differs from DETR's defaults: 72 epochs, batch 4
    # per GPU (x4), MultiStepLR at epoch 1000 (never), every epoch's checkpoint kept, EMA; the
    # post-processor keeps 300 pairs, hence 300 DAP negatives per image. Its lr (1e-4, backbone
    # 1e-5), weight decay, clipping, width, heads, decoder layers, sampling points, box costs and
    # loss weights are DETR's.
    defaults=dict(epochs=72, lr_drop=1000, batch_size=4, backbone="presnet50vd", enc_layers=1,
                  dim_feedforward=1024, dropout=0.0, num_queries=300, set_cost_class=2, checkpoint_period=1,
                  ema=True, dap_neg_topk=300))
