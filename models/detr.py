"""DETR: the detector, its set-prediction criterion and its post-processor."""
import torch
import torch.nn.functional as F
from torch import nn

from util import box_ops
from util.errors import UserInputError
from util.misc import (NestedTensor, accuracy, get_world_size, is_dist_avail_and_initialized,
                       nested_tensor_from_tensor_list)

from .backbone import build_backbone
from .dap_criterion import DAPCriterionMixin
from .dap_matcher import build_dap_matcher
from .matcher import build_matcher
from .transformer import build_transformer


class DETR(nn.Module):
    """Backbone + transformer + a class head and a box head on every decoder output."""
    class_head_prefixes = ('class_embed.',)  # what --finetune_drop_class_head re-initialises

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
        out = {'pred_logits': outputs_class[-1], 'pred_boxes': outputs_coord[-1]}
        if self.aux_loss:
            out['aux_outputs'] = [{'pred_logits': a, 'pred_boxes': b}
                                  for a, b in zip(outputs_class[:-1], outputs_coord[:-1])]
        return out


class BaseSetCriterion(nn.Module):
    """What the set criteria of the DETR family share: match predictions to targets, then
    score the matched pairs. Subclasses supply the classification loss, loss_labels.

    The same losses are computed for the final output and, separately matched, for every
    auxiliary decoder output (keys get the suffix `_i`).
    """

    # Extra arguments of a loss on auxiliary layers: class_error is logged for the final layer only.
    aux_layer_kwargs = {'labels': {'log': False}}

    def __init__(self, num_classes, matcher, weight_dict, losses):
        """losses: names among 'labels', 'boxes', 'cardinality'."""
        super().__init__()
        self.num_classes = num_classes
        self.matcher = matcher
        self.weight_dict = weight_dict
        self.losses = losses

    def loss_labels(self, outputs, targets, indices, num_boxes, log=True):
        raise NotImplementedError

    @torch.no_grad()
    def loss_cardinality(self, outputs, targets, indices, num_boxes):
        """Mean absolute error of the number of predicted objects; for logging only."""
        pred_logits = outputs['pred_logits']
        tgt_lengths = torch.as_tensor([len(t['labels']) for t in targets], device=pred_logits.device)
        card_pred = (pred_logits.argmax(-1) != pred_logits.shape[-1] - 1).sum(1)
        return {'cardinality_error': F.l1_loss(card_pred.float(), tgt_lengths.float())}

    def loss_boxes(self, outputs, targets, indices, num_boxes):
        """L1 and generalized-IoU losses of the matched boxes, normalised by num_boxes."""
        idx = self._get_src_permutation_idx(indices)
        src_boxes = outputs['pred_boxes'][idx]
        target_boxes = torch.cat([t['boxes'][j] for t, (_, j) in zip(targets, indices)], dim=0)

        loss_bbox = F.l1_loss(src_boxes, target_boxes, reduction='none')
        loss_giou = 1 - torch.diag(box_ops.generalized_box_iou(
            box_ops.box_cxcywh_to_xyxy(src_boxes), box_ops.box_cxcywh_to_xyxy(target_boxes)))
        return {'loss_bbox': loss_bbox.sum() / num_boxes, 'loss_giou': loss_giou.sum() / num_boxes}

    @staticmethod
    def _get_src_permutation_idx(indices):
        """(batch index, query index) of every matched prediction, for advanced indexing."""
        batch_idx = torch.cat([torch.full_like(src, i) for i, (src, _) in enumerate(indices)])
        src_idx = torch.cat([src for src, _ in indices])
        return batch_idx, src_idx

    @staticmethod
    def _get_tgt_permutation_idx(indices):
        """(batch index, target index) of every matched target, in the same order."""
        batch_idx = torch.cat([torch.full_like(tgt, i) for i, (_, tgt) in enumerate(indices)])
        tgt_idx = torch.cat([tgt for _, tgt in indices])
        return batch_idx, tgt_idx

    @staticmethod
    def _step_mean(local_total, device, micro_batches=1):
        """A total over this process's micro-batches of the optimisation step, summed over
        processes and divided by the number of (process, micro-batch) pairs.

        A micro-batch's loss normalised by it, divided by the number of micro-batches (engine)
        and averaged over processes (DDP), is normalised by the total of the whole step: the
        gradients are those of one process holding the global batch.
        """
        total = torch.tensor(float(local_total), dtype=torch.float64, device=device)
        if is_dist_avail_and_initialized():
            torch.distributed.all_reduce(total)
        return (total / (get_world_size() * micro_batches)).float()

    @staticmethod
    def _num_boxes(targets, device, micro_batches=1):
        """Target boxes per (process, micro-batch), at least 1: upstream's num_boxes, extended
        to gradient accumulation. targets: every target of this process's step."""
        local = sum(len(t['labels']) for t in targets)
        return torch.clamp(BaseSetCriterion._step_mean(local, device, micro_batches), min=1).item()

    def _begin_step(self, outputs, targets, step_targets):
        """Record what the step-wide normalisers need (see forward); returns num_boxes."""
        step_targets = step_targets or [targets]
        self._step_targets = [t for batch in step_targets for t in batch]
        self._micro_batches = len(step_targets)
        self._device, self._num_queries = outputs['pred_logits'].device, outputs['pred_logits'].shape[1]
        return self._num_boxes(self._step_targets, self._device, self._micro_batches)

    def _num_matched(self):
        """Matched queries of the step per (process, micro-batch): one-to-one matching pairs
        min(queries, boxes) per image."""
        local = sum(min(self._num_queries, len(t['labels'])) for t in self._step_targets)
        return self._step_mean(local, self._device, self._micro_batches)

    def _layer_outputs(self, outputs, targets):
        """(key suffix, outputs, targets) of the final layer ('') and of each auxiliary layer ('_i')."""
        yield '', {k: v for k, v in outputs.items() if k not in ('aux_outputs', 'enc_outputs')}, targets
        for i, aux_outputs in enumerate(outputs.get('aux_outputs', [])):
            yield f'_{i}', aux_outputs, targets

    def loss_map(self):
        return {'labels': self.loss_labels, 'cardinality': self.loss_cardinality, 'boxes': self.loss_boxes}

    def get_loss(self, loss, outputs, targets, indices, num_boxes, **kwargs):
        loss_map = self.loss_map()
        if loss not in loss_map:
            raise ValueError(f"unknown loss {loss!r}; expected one of {sorted(loss_map)}")
        return loss_map[loss](outputs, targets, indices, num_boxes, **kwargs)

    def forward(self, outputs, targets, step_targets=None):
        """outputs: the model's output dict; targets: list of dicts with 'labels' [T_i] and
        'boxes' [T_i,4] (normalised cxcywh). Returns a dict of scalar losses and log values.

        step_targets: under gradient accumulation, the targets of every micro-batch of the
        optimisation step on this process (this one included). The losses are then normalised
        by the totals of the whole step, and the engine divides each micro-batch's loss by
        their number. None: this batch is the whole step.
        """
        num_boxes = self._begin_step(outputs, targets, step_targets)
        losses = {}
        for suffix, layer_outputs, layer_targets in self._layer_outputs(outputs, targets):
            indices = self.matcher(layer_outputs, layer_targets)
            for loss in self.losses:
                kwargs = self.aux_layer_kwargs.get(loss, {}) if suffix else {}
                layer_losses = self.get_loss(loss, layer_outputs, layer_targets, indices, num_boxes, **kwargs)
                losses.update({k + suffix: v for k, v in layer_losses.items()})
        return losses


class SetCriterion(BaseSetCriterion):
    """DETR's loss: softmax cross-entropy with a down-weighted "no object" class, L1 and GIoU."""

    def __init__(self, num_classes, matcher, weight_dict, eos_coef, losses):
        super().__init__(num_classes, matcher, weight_dict, losses)
        self.eos_coef = eos_coef
        empty_weight = torch.ones(num_classes + 1)
        empty_weight[-1] = eos_coef
        self.register_buffer('empty_weight', empty_weight)

    def loss_labels(self, outputs, targets, indices, num_boxes, log=True):
        """Weighted cross-entropy over all queries; unmatched ones target the "no object" class."""
        src_logits = outputs['pred_logits']
        idx = self._get_src_permutation_idx(indices)
        target_classes_o = torch.cat([t['labels'][j] for t, (_, j) in zip(targets, indices)])
        target_classes = torch.full(src_logits.shape[:2], self.num_classes, dtype=torch.int64,
                                    device=src_logits.device)
        target_classes[idx] = target_classes_o

        # Upstream's weighted mean, sum(w_i * ce_i) / sum(w_i), with sum(w_i) taken over the whole
        # step like num_boxes: identical on one process without accumulation, and the loss of the
        # global batch under data parallelism instead of a mean of per-process means.
        ce = F.cross_entropy(src_logits.transpose(1, 2), target_classes, self.empty_weight, reduction='sum')
        losses = {'loss_ce': ce / self._class_weight_total()}
        if log:
            losses['class_error'] = 100 - accuracy(src_logits[idx], target_classes_o)[0]
        return losses


    def _class_weight_total(self):
        """sum(w_i) of the step per (process, micro-batch): each image has min(queries, boxes)
        matched queries of weight 1, and its other queries weigh eos_coef."""
        q = self._num_queries
        local = sum(min(q, len(t['labels'])) * (1 - self.eos_coef) + q * self.eos_coef for t in self._step_targets)
        return self._step_mean(local, self._device, self._micro_batches)


class DAPSetCriterion(DAPCriterionMixin, SetCriterion):
    """SetCriterion with the 'dap' loss available (--loss dap or raw+dap)."""


class PostProcess(nn.Module):
    """Turns the model output into COCO-style detections: one per query, in absolute pixels."""

    @torch.no_grad()
    def forward(self, outputs, target_sizes):
        """target_sizes: [B,2] (height, width) of each original image.

        Returns a list of B dicts: 'scores' [Q], 'labels' [Q] (class ids), 'boxes' [Q,4]
        (absolute xyxy).
        """
        boxes = absolute_xyxy(outputs['pred_boxes'], target_sizes)
        scores, labels = F.softmax(outputs['pred_logits'], -1)[..., :-1].max(-1)
        return [{'scores': s, 'labels': c, 'boxes': b} for s, c, b in zip(scores, labels, boxes)]


def absolute_xyxy(boxes, target_sizes):
    """Normalised cxcywh boxes [B,N,4] -> absolute xyxy in pixels of each image.
    target_sizes: [B,2] (height, width) of each original image."""
    if len(boxes) != len(target_sizes) or target_sizes.shape[1] != 2:
        raise ValueError("PostProcess: target_sizes must be [batch_size, 2] (height, width)")
    img_h, img_w = target_sizes.unbind(1)
    scale_fct = torch.stack([img_w, img_h, img_w, img_h], dim=1)
    return box_ops.box_cxcywh_to_xyxy(boxes) * scale_fct[:, None, :]


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


def default_num_classes(args):
    """Largest class id + 1: --num_classes if given, else upstream's value for the dataset."""
    if getattr(args, 'num_classes', None) is not None:
        return args.num_classes
    return {'coco': 91, 'coco_panoptic': 250}.get(args.dataset_file, 20)


def with_aux_weights(weight_dict, num_aux_layers, extra_suffixes=()):
    """weight_dict plus a copy of every entry for each auxiliary layer i (key suffix `_i`)
    and for each extra suffix (two-stage Deformable DETR: '_enc')."""
    out = dict(weight_dict)
    for suffix in [f'_{i}' for i in range(num_aux_layers)] + list(extra_suffixes):
        out.update({k + suffix: v for k, v in weight_dict.items()})
    return out


def build_criterion(args, criterion_cls, dap_criterion_cls, *, num_classes, activation, raw_weights,
                    num_aux_layers, extra_suffixes=(), **criterion_kwargs):
    """The criterion chosen by --loss and --matcher, for any detector of the family.

    activation: how the head scores classes, 'softmax' (DETR) or 'sigmoid' (focal heads); it
    picks the Hungarian class cost and the DAP scores. raw_weights: the upstream loss weights
    of the final layer; every loss is also weighted on each auxiliary layer and extra output.
    criterion_cls(num_classes, matcher, weight_dict, losses=..., **criterion_kwargs) is the
    upstream criterion, dap_criterion_cls its DAPCriterionMixin version (--loss dap/raw+dap).
    """
    if args.matcher == 'dap':
        matcher = build_dap_matcher(args, activation=activation)
    else:
        matcher = build_matcher(args, focal=activation == 'sigmoid')
    with_raw, with_dap = args.loss in ('raw', 'raw+dap'), args.loss in ('dap', 'raw+dap')
    weights = {**(raw_weights if with_raw else {}), **({'loss_dap': args.dap_loss_coef} if with_dap else {})}
    losses = (['labels', 'boxes'] if with_raw else []) + (['dap'] if with_dap else []) + ['cardinality']
    criterion = (dap_criterion_cls if with_dap else criterion_cls)(
        num_classes, matcher, with_aux_weights(weights, num_aux_layers, extra_suffixes), losses=losses,
        **criterion_kwargs)
    if with_dap:
        criterion.init_dap(activation=activation, num_bins=args.dap_bins, sigma=args.dap_sigma,
                           num_gt=args.dap_num_gt, neg_topk=args.dap_neg_topk)
    return criterion.to(torch.device(args.device))


def build(args):
    if getattr(args, 'masks', False):
        raise UserInputError("--masks (segmentation) is not supported by dap-detr; drop the flag")
    num_classes = default_num_classes(args)

    backbone = build_backbone(args)
    transformer = build_transformer(args)
    model = DETR(backbone, transformer, num_classes=num_classes, num_queries=args.num_queries,
                 aux_loss=args.aux_loss)

    criterion = build_criterion(
        args, SetCriterion, DAPSetCriterion, num_classes=num_classes, activation='softmax',
        raw_weights={'loss_ce': args.cls_loss_coef, 'loss_bbox': args.bbox_loss_coef, 'loss_giou': args.giou_loss_coef},
        num_aux_layers=args.dec_layers - 1 if args.aux_loss else 0, eos_coef=args.eos_coef)
    return model, criterion, {'bbox': PostProcess()}
