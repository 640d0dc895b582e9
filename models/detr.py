"""DETR: the detector, its set-prediction criterion and its recipe (FAMILY)."""
import torch
import torch.nn.functional as F
from torch import nn

from util.misc import NestedTensor, accuracy, nested_tensor_from_tensor_list

from .backbone import build_backbone
from .family import DetectorFamily, num_classes_for, param_groups_by_name
from .layers import MLP
from .postprocess import PostProcess
from .set_criterion import BaseSetCriterion, build_criterion, set_losses, with_aux_weights
from .transformer import build_transformer


class DETR(nn.Module):
    """Backbone + transformer + a class head and a box head on every decoder output."""
    class_head_prefixes = ("class_embed.",)  # what --finetune_drop_class_head re-initialises

    def __init__(self, backbone, transformer, num_classes, num_queries, aux_loss=False):
        """num_classes is the largest class id + 1; one more logit means "no object"."""
        super().__init__()
        self.num_queries = num_queries
        self.transformer = transformer
        hidden_dim = transformer.d_model
        self.class_embed = nn.Linear(hidden_dim, num_classes + 1)
        self.bbox_embed = MLP(hidden_dim, hidden_dim, 4, 3)
        self.query_embed = nn.Embedding(num_queries, hidden_dim)
        self.input_proj = nn.Conv2d(backbone.num_channels[-1], hidden_dim, kernel_size=1)
        self.backbone = backbone
        self.aux_loss = aux_loss

    def forward(self, samples, targets=None):
        """samples: NestedTensor, or a list of [3,H,W] images / a [B,3,H,W] tensor. targets:
        unused (RT-DETR's denoising needs them; the engine calls every model alike).

        Returns 'pred_logits' [B,Q,num_classes+1], 'pred_boxes' [B,Q,4] (cxcywh in [0,1],
        relative to each un-padded image) and, with aux_loss, 'aux_outputs': the same pair
        for every decoder layer but the last.
        """
        if not isinstance(samples, NestedTensor):
            samples = nested_tensor_from_tensor_list(samples)
        features, pos = self.backbone(samples)
        src, mask = features[-1].decompose()
        hs = self.transformer(self.input_proj(src), mask, self.query_embed.weight, pos[-1])[0]

        outputs_class = self.class_embed(hs)
        outputs_coord = self.bbox_embed(hs).sigmoid()
        out = {"pred_logits": outputs_class[-1], "pred_boxes": outputs_coord[-1]}
        if self.aux_loss:
            out["aux_outputs"] = [{"pred_logits": a, "pred_boxes": b}
                                  for a, b in zip(outputs_class[:-1], outputs_coord[:-1])]
        return out


class SetCriterion(BaseSetCriterion):
    """DETR's loss: softmax cross-entropy with a down-weighted "no object" class, L1 and GIoU."""

    def __init__(self, num_classes, matcher, weight_dict, eos_coef, losses, batch_loss=None):
        super().__init__(num_classes, matcher, weight_dict, losses, batch_loss)
        self.eos_coef = eos_coef
        empty_weight = torch.ones(num_classes + 1)
        empty_weight[-1] = eos_coef
        self.register_buffer("empty_weight", empty_weight)

    def loss_labels(self, outputs, targets, pairs, totals, log=True):
        """Weighted cross-entropy over all queries; unmatched ones target the "no object" class."""
        src_logits = outputs["pred_logits"]
        idx, target_classes_o = pairs.index, pairs.labels
        target_classes = torch.full(src_logits.shape[:2], self.num_classes, dtype=torch.int64,
                                    device=src_logits.device)
        target_classes[idx] = target_classes_o

        # Upstream's weighted mean, sum(w_i * ce_i) / sum(w_i), with sum(w_i) taken over the whole
        # step like num_boxes: identical on one process without accumulation, and the loss of the
        # global batch under data parallelism instead of a mean of per-process means.
        log_probs = outputs.get("pred_log_probs")  # given where DAP reads them too (set_criterion)
        if log_probs is None:
            ce = F.cross_entropy(src_logits.transpose(1, 2), target_classes, self.empty_weight, reduction="sum")
        else:
            ce = F.nll_loss(log_probs.flatten(0, 1), target_classes.flatten(), self.empty_weight, reduction="sum")
        losses = {"loss_ce": ce / totals["class_weight"]}
        if log:
            losses["class_error"] = 100 - accuracy(src_logits[idx], target_classes_o)[0]
        return losses


    def local_totals(self, targets, num_queries):
        """Adds class_weight, sum(w_i) of loss_labels: each image has min(queries, boxes) matched
        queries of weight 1, and its other queries weigh eos_coef."""
        q = num_queries
        return {**super().local_totals(targets, num_queries),
                "class_weight": sum(min(q, len(t["labels"])) * (1 - self.eos_coef) + q * self.eos_coef
                                    for t in targets)}


def build(args, category_ids):
    num_classes = num_classes_for(args, category_ids)
    backbone = build_backbone(args)
    transformer = build_transformer(args)
    model = DETR(backbone, transformer, num_classes=num_classes, num_queries=args.num_queries,
                 aux_loss=args.aux_loss)

    losses, weights = set_losses(args)
    num_aux_layers = args.dec_layers - 1 if args.aux_loss else 0
    criterion = build_criterion(
        args, SetCriterion, activation="softmax", num_classes=num_classes, eos_coef=args.eos_coef,
        weight_dict=with_aux_weights(weights, [f"_{i}" for i in range(num_aux_layers)]), losses=losses)
    return model, criterion, {"bbox": PostProcess()}


def param_groups(model, args):
    """Upstream's two groups: the backbone (names containing one of --lr_backbone_names, by
    default 'backbone': a learned position embedding, backbone.1, included) at --lr_backbone,
    the rest at --lr."""
    return param_groups_by_name(model, args)


FAMILY = DetectorFamily(name="detr", build=build, param_groups=param_groups)
