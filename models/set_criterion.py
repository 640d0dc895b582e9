"""
What the set criteria of the three detector families share: matching every output layer to the
targets, the losses on the matched pairs, DAP-loss on the layers that have it, the step totals
that normalise them, and the one place that chooses the matcher and wires DAP (build_criterion).

The engine <-> criterion protocol
---------------------------------
For every micro-batch the engine calls ``criterion(outputs, targets, step)``, where ``step`` is a
StepContext: the targets of every micro-batch of this process's optimisation step and which one
this call is. Every loss is normalised by totals of the whole step, summed over processes (one
all-reduce per call), and the engine divides each micro-batch's weighted loss by the number of
micro-batches: the step's gradient is that of one batch holding all its images, on one process
or many. Without ``step`` the batch is the whole step.

DAP's precision is a function of the whole step's detections, which a micro-batch does not see.
So when the step has several micro-batches and the criterion has a DAP term
(``criterion.needs_counting_pass``), the engine first calls ``criterion.count(outputs, targets,
step)`` on every micro-batch but the last, without gradients (the counting pass), and hands the
list of what it returned to the gradient passes as ``step.counted``. The last micro-batch's
gradient pass runs first, as ``criterion.score(outputs, targets, step)``, which returns its
losses and its own records (its entry of ``step.counted`` is None until then); the engine fills
them in for the other micro-batches. ``step.final_call`` marks the step's last call. Layers are
named by the suffix of their loss keys ('' for the final layer, '_0', '_enc', '_aux_1', '_dn_0',
...), and records are keyed by that name. The AP-cost matcher's momentum table moves once per
step, after the step's last call.

Where a layer's classification loss and DAP both read a softmax head's probabilities (raw+dap on
DETR), the criterion adds ``pred_log_probs``, the layer's float32 log_softmax, to the outputs it
hands both: each reads it instead of computing its own.
"""
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from util import box_ops
from util.misc import get_world_size, is_dist_avail_and_initialized

from .dap_criterion import DAPLoss
from .dap_matcher import DAPMatcher
from .detections import BatchLossLayer
from .matcher import HungarianMatcher, matched_pairs
from .rank_criterion import RankingLoss

FINAL_LAYER = ""


@dataclass(frozen=True)
class StepContext:
    """The optimisation step a criterion call belongs to (see the module docstring).

    targets: for every micro-batch of this process's step, its list of targets (this call's
        micro-batch included).
    micro_batch: the index of this call's micro-batch in `targets`.
    counted: the counting pass, when there was one: for every micro-batch, what
        SetCriterion.count returned for it ({layer name: LayerRecord}); None for the micro-batch
        whose gradient pass counts itself (criterion.score).
    final_call: whether no criterion call of this step follows; None: the micro-batches are
        called in order, so the last micro-batch's call is the final one.
    epoch: the training epoch (aLRP's self-balancing weight changes between epochs); None
        outside training.
    """
    targets: list
    micro_batch: int = 0
    counted: list | None = None
    final_call: bool | None = None
    epoch: int | None = None

    @classmethod
    def single(cls, targets):
        """A step of one micro-batch: these targets."""
        return cls([targets])

    @property
    def micro_batches(self):
        return len(self.targets)

    @property
    def is_last(self):
        return self.micro_batch == len(self.targets) - 1 if self.final_call is None else self.final_call

    def counted_matching(self, layer):
        """The matching the counting pass made for `layer` of this micro-batch, whose outputs it
        saw as they are now (same weights and random draws); None where it made none."""
        records = None if self.counted is None else self.counted[self.micro_batch]
        record = None if records is None else records.get(layer)
        return None if record is None else record.indices

    def other_micro_batches(self, layer):
        """The records of `layer` in every counted micro-batch but this one; None without a
        counting pass."""
        if self.counted is None:
            return None
        return [records[layer] for i, records in enumerate(self.counted) if i != self.micro_batch]


class Layer(NamedTuple):
    """One output layer to score. name: the suffix of its loss keys; losses: the names of its
    losses, 'dap' included where DAP-loss applies; indices: a given matching (denoising
    queries), None to run the matcher; box_groups: num_boxes is multiplied by it."""
    name: str
    outputs: dict
    targets: list
    losses: list
    indices: list | None = None
    box_groups: int = 1


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


def one_hot_targets(logits, pairs):
    """[B, Q, K] targets of a sigmoid head: 1 at each matched query's class (pairs: MatchedPairs),
    0 elsewhere."""
    one_hot = torch.zeros_like(logits)
    one_hot[pairs.index + (pairs.labels,)] = 1.0
    return one_hot


def focal_classification_loss(logits, pairs, num_boxes, alpha, gamma=2.0):
    """Deformable DETR's and RT-DETR's classification loss: the focal loss of every (query, class)
    towards one_hot_targets; sigmoid_focal_loss's mean over queries times their number, upstream's
    reduction, kept for identical numerics."""
    return sigmoid_focal_loss(logits, one_hot_targets(logits, pairs), num_boxes, alpha, gamma) * logits.shape[1]


class BaseSetCriterion(nn.Module):
    """Match each output layer to the targets, then score the matched pairs with the layer's
    losses (keys get the layer's name as suffix). Subclasses supply the classification losses
    (loss_map) and, where they have more than the final and auxiliary decoder layers, layers().

    A loss function is called as fn(outputs, targets, pairs, totals, **kwargs), pairs the layer's
    matched_pairs, and returns a dict of scalars; `totals` holds the step totals (see
    step_totals), num_boxes among them.
    """

    # Extra arguments of a loss on layers other than the final one: class_error is logged for
    # the final layer only.
    aux_layer_kwargs = {"labels": {"log": False}}

    def __init__(self, num_classes, matcher, weight_dict, losses, batch_loss=None):
        """losses: names of the loss functions (loss_map), and the name of batch_loss where it
        applies; batch_loss: the loss whose value depends on the whole step's batch, DAP-loss
        (DAPLoss, 'dap') or a ranking loss (RankingLoss: 'ap', 'alrp', 'rs'), computed for all its
        layers at once; None without one."""
        super().__init__()
        self.num_classes = num_classes
        self.matcher = matcher
        self.weight_dict = weight_dict
        self.losses = losses
        self.batch_loss = batch_loss
        # DAP's final-layer precision table [K, N] of the last training step, detached and left on
        # the device: the engine reads it once at the epoch's end (its log and TensorBoard).
        self.final_precision = None

    @property
    def needs_counting_pass(self):
        """Whether an accumulated step must be counted first (see the module docstring)."""
        return self.batch_loss is not None

    def precision_tables(self):
        """DAP's precision tables at the epoch's end, lists [10 IoU thresholds][N bins]: the final
        layer's of the last step and, under --dap_cost_mode momentum, the matcher's. One host read
        per epoch: the steps only keep the last table."""
        tables = {}
        if self.final_precision is not None:
            tables["dap_precision_table"] = self.final_precision.tolist()
        if getattr(self.matcher, "mode", None) == "momentum":
            tables["matcher_precision_table"] = self.matcher.precision.tolist()
        return tables

    def continue_epoch(self, final_precision):
        """An epoch continued from a mid-epoch checkpoint: the final layer's table of the last step
        done (None if it had none), which precision_tables reports if no step is left."""
        self.final_precision = final_precision

    def has_batch_loss(self, layer):
        return self.batch_loss is not None and self.batch_loss.name in layer.losses

    # ------------------------------------------------------------------ losses

    def loss_map(self):
        return {"labels": self.loss_labels, "cardinality": self.loss_cardinality, "boxes": self.loss_boxes}

    def loss_labels(self, outputs, targets, pairs, totals, log=True):
        raise NotImplementedError

    @torch.no_grad()
    def loss_cardinality(self, outputs, targets, pairs, totals):
        """Mean absolute error of the number of predicted objects; for logging only."""
        pred_logits = outputs["pred_logits"]
        tgt_lengths = torch.tensor([len(t["labels"]) for t in targets]).to(pred_logits.device, non_blocking=True)
        card_pred = (pred_logits.argmax(-1) != pred_logits.shape[-1] - 1).sum(1)
        return {"cardinality_error": F.l1_loss(card_pred.float(), tgt_lengths.float())}

    def loss_boxes(self, outputs, targets, pairs, totals):
        """L1 and generalized-IoU losses of the matched boxes, normalised by num_boxes."""
        src_boxes = outputs["pred_boxes"][pairs.index]
        target_boxes = pairs.boxes

        loss_bbox = F.l1_loss(src_boxes, target_boxes, reduction="none")
        loss_giou = 1 - box_ops.paired_generalized_box_iou(box_ops.box_cxcywh_to_xyxy(src_boxes),
                                                           box_ops.box_cxcywh_to_xyxy(target_boxes))
        num_boxes = totals["num_boxes"]
        return {"loss_bbox": loss_bbox.sum() / num_boxes, "loss_giou": loss_giou.sum() / num_boxes}

    # ------------------------------------------------------------------ step totals

    def local_totals(self, targets, num_queries):
        """This process's totals over the step's targets (flat list), before the all-reduce:
        num_boxes, upstream's normaliser (target boxes), and num_matched, the matched queries
        (one-to-one matching pairs min(queries, boxes) per image). Subclasses add theirs."""
        return {"num_boxes": sum(len(t["labels"]) for t in targets),
                "num_matched": sum(min(num_queries, len(t["labels"])) for t in targets)}

    def step_totals(self, step, num_queries, device):
        """local_totals of the whole step, summed over processes (one all-reduce) and divided by
        the number of (process, micro-batch) pairs, `shares`; num_boxes at least 1. Numbers on
        one process; under DDP float32 tensors on `device`, never read back to the host (a read
        waits for the GPU).

        A micro-batch's loss normalised by them, divided by the number of micro-batches (engine)
        and averaged over processes (DDP), is normalised by the total of the whole step: the
        gradients are those of one process holding the global batch.
        """
        local = self.local_totals([t for batch in step.targets for t in batch], num_queries)
        shares = get_world_size() * step.micro_batches
        if is_dist_avail_and_initialized():
            summed = torch.tensor([float(v) for v in local.values()], dtype=torch.float64).to(device, non_blocking=True)
            torch.distributed.all_reduce(summed)
            totals = dict(zip(local, (summed / shares).float()))
            totals["num_boxes"] = totals["num_boxes"].clamp(min=1)
        else:
            totals = {k: float(v) / shares for k, v in local.items()}
            totals["num_boxes"] = max(totals["num_boxes"], 1.0)
        totals["shares"] = shares
        return totals

    # ------------------------------------------------------------------ layers and forward

    def layers(self, outputs, targets):
        """The final layer and each auxiliary decoder layer ('_i'), all with self.losses."""
        yield Layer(FINAL_LAYER, {k: v for k, v in outputs.items() if k not in ("aux_outputs", "enc_outputs")},
                    targets, self.losses)
        for i, aux_outputs in enumerate(outputs.get("aux_outputs", [])):
            yield Layer(f"_{i}", aux_outputs, targets, self.losses)

    def get_loss(self, loss, outputs, targets, pairs, totals, **kwargs):
        loss_map = self.loss_map()
        if loss not in loss_map:
            raise ValueError(f"unknown loss {loss!r}; expected one of {sorted(loss_map)}")
        return loss_map[loss](outputs, targets, pairs, totals, **kwargs)

    def compute(self, outputs, targets, step, raw_losses=True):
        """Score every layer. Returns (losses, batch-level loss results per layer name).
        raw_losses=False computes the batch-level loss alone (the counting pass needs nothing
        else)."""
        totals = self.step_totals(step, outputs["pred_logits"].shape[1], outputs["pred_logits"].device)
        losses, batch_layers = {}, []
        for layer in self.layers(outputs, targets):
            with_batch_loss = self.has_batch_loss(layer)
            if not raw_losses and not with_batch_loss:
                continue
            indices = layer.indices if layer.indices is not None else step.counted_matching(layer.name)
            if indices is None:
                indices = self.matcher(layer.outputs, layer.targets)
            # The matched pairs with their targets, made once for all the layer's losses: one
            # host-to-device copy of the matching per layer.
            pairs = matched_pairs(layer.targets, indices)
            outputs = layer.outputs
            if with_batch_loss and raw_losses and "labels" in layer.losses and self.batch_loss.activation == "softmax":
                # The classification loss and DAP both read the softmax (raw+dap): one
                # log_softmax per layer and one backward through it, not one each.
                outputs = {**outputs, "pred_log_probs": outputs["pred_logits"].float().log_softmax(-1)}
            if with_batch_loss:
                batch_layers.append(BatchLossLayer(layer.name, outputs, indices, pairs,
                                                   final=layer.name == FINAL_LAYER))
            if not raw_losses:
                continue
            layer_totals = {**totals, "num_boxes": totals["num_boxes"] * layer.box_groups}
            for name in layer.losses:
                if with_batch_loss and name == self.batch_loss.name:
                    continue
                kwargs = self.aux_layer_kwargs.get(name, {}) if layer.name != FINAL_LAYER else {}
                layer_losses = self.get_loss(name, outputs, layer.targets, pairs, layer_totals, **kwargs)
                losses.update({k + layer.name: v for k, v in layer_losses.items()})
        # The batch-level loss once for all its layers: they are computed together.
        results = {}
        if batch_layers:
            results = self.batch_loss(batch_layers, totals, step)
            for name, result in results.items():
                losses.update({k + name: v for k, v in result.losses.items()})
            if FINAL_LAYER in results:
                losses.update(results[FINAL_LAYER].logged)
        return losses, results

    def forward(self, outputs, targets, step=None):
        """outputs: the model's output dict; targets: list of dicts with 'labels' [T_i] and
        'boxes' [T_i,4] (normalised cxcywh); step: a StepContext (see the module docstring),
        None when this batch is the whole step. Returns a dict of scalar losses and log values."""
        return self.score(outputs, targets, step)[0]

    def score(self, outputs, targets, step=None):
        """forward's losses, and what count() returns for this micro-batch (its batch-level loss
        layers' records), here from the gradient pass itself."""
        step = step or StepContext.single(targets)
        losses, results = self.compute(outputs, targets, step)
        # The momentum matcher's table moves once per step, after every layer of every
        # micro-batch was matched: all layers see the table of the earlier steps. DAP's final
        # layer gives it (the ranking losses have no table).
        update = getattr(self.matcher, "update_precision", None)
        final = results.get(FINAL_LAYER)
        if self.training and final is not None and final.precision is not None and step.is_last:
            self.final_precision = final.precision
            if update is not None:
                update(final.precision)
        return losses, {name: result.record for name, result in results.items()}

    @torch.no_grad()
    def count(self, outputs, targets, step):
        """The counting pass of one micro-batch: {layer name: record} of every layer with the
        batch-level loss (DAP: its counts summed over processes and this process's positives;
        a ranking loss: every process's detections). Changes no state."""
        _, results = self.compute(outputs, targets, step, raw_losses=False)
        return {name: result.record for name, result in results.items()}


# ---------------------------------------------------------------------- building

def with_aux_weights(weight_dict, layer_suffixes):
    """weight_dict plus a copy of every entry for each layer suffix (e.g. '_0', '_enc')."""
    out = dict(weight_dict)
    for suffix in layer_suffixes:
        out.update({k + suffix: v for k, v in weight_dict.items()})
    return out


class LossChoice(NamedTuple):
    """What --loss trains with."""
    classification: bool  # the upstream classification loss
    boxes: bool           # the upstream box losses (L1, GIoU)
    batch_loss: str | None  # 'dap', 'ap', 'alrp', 'rs', or None


# The values of --loss: raw, dap and raw+dap (docs/DAP.md); ap (AP-Loss beside the upstream box
# losses) and rs (RS Loss with its own GIoU term) replace the classification loss, alrp (aLRP Loss,
# with its own localisation component) both upstream losses (docs/LOSSES.md).
LOSSES = {
    "raw": LossChoice(classification=True, boxes=True, batch_loss=None),
    "dap": LossChoice(classification=False, boxes=False, batch_loss="dap"),
    "raw+dap": LossChoice(classification=True, boxes=True, batch_loss="dap"),
    "ap": LossChoice(classification=False, boxes=True, batch_loss="ap"),
    "alrp": LossChoice(classification=False, boxes=False, batch_loss="alrp"),
    "rs": LossChoice(classification=False, boxes=False, batch_loss="rs"),
}


def loss_choice(args):
    return LOSSES[args.loss]


def batch_loss_weights(args):
    """The weights of the batch-level loss's terms, keys without a layer suffix."""
    return {"dap": {"loss_dap": args.dap_loss_coef}, "ap": {"loss_ap": args.rank_loss_coef},
            "alrp": {"loss_alrp": args.rank_loss_coef, "loss_alrp_loc": args.rank_loss_coef},
            "rs": {"loss_rs": args.rank_loss_coef, "loss_rs_giou": args.rank_loss_coef},
            None: {}}[loss_choice(args).batch_loss]


def set_losses(args):
    """DETR's and Deformable DETR's criteria under --loss: (loss names, final-layer weights).
    'labels' (classification) and 'boxes' (L1, GIoU) are the upstream losses, then the
    batch-level loss ('dap', 'ap', 'alrp' or 'rs'); 'cardinality' is logged under every --loss."""
    choice = loss_choice(args)
    names = ((["labels"] if choice.classification else []) + (["boxes"] if choice.boxes else [])
             + ([choice.batch_loss] if choice.batch_loss else []) + ["cardinality"])
    weights = {**({"loss_ce": args.cls_loss_coef} if choice.classification else {}),
               **({"loss_bbox": args.bbox_loss_coef, "loss_giou": args.giou_loss_coef} if choice.boxes else {}),
               **batch_loss_weights(args)}
    return names, weights


def build_matcher(args, activation):
    """--matcher: the upstream Hungarian cost, or the AP cost of Eq. 11. activation: how the head
    scores classes, 'softmax' (DETR) or 'sigmoid' (focal heads)."""
    if args.matcher == "dap":
        return DAPMatcher(activation=activation, num_bins=args.dap_bins, sigma=args.dap_sigma,
                          mode=args.dap_cost_mode, momentum=args.dap_momentum)
    return HungarianMatcher(cost_class=args.set_cost_class, cost_bbox=args.set_cost_bbox,
                            cost_giou=args.set_cost_giou, focal=activation == "sigmoid")


def build_criterion(args, criterion_cls, *, activation, **criterion_kwargs):
    """The criterion of any family, with the matcher of --matcher and the batch-level loss of
    --loss, if any (DAP-loss or a ranking loss).

    criterion_cls(matcher=..., batch_loss=..., **criterion_kwargs): the family's criterion; its
    `losses` name the batch-level loss where it applies.
    """
    name = loss_choice(args).batch_loss
    if name == "dap":
        batch_loss = DAPLoss(activation=activation, num_bins=args.dap_bins, sigma=args.dap_sigma,
                             num_gt=args.dap_num_gt, neg_topk=args.dap_neg_topk)
    elif name is not None:
        batch_loss = RankingLoss(name, activation=activation, neg_topk=args.dap_neg_topk, delta=args.rank_delta)
    else:
        batch_loss = None
    criterion = criterion_cls(matcher=build_matcher(args, activation), batch_loss=batch_loss, **criterion_kwargs)
    return criterion.to(torch.device(args.device))
