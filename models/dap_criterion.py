"""
DAP-loss on a detector's outputs (docs/DAP.md): which detections are the positives and the
negatives of one layer, their scores and IoUs, and how the soft counts are summed over processes
and over the micro-batches of an accumulated step. The mathematics is models.dap_functional;
models.set_criterion.BaseSetCriterion calls DAPLoss on every layer that --loss gives a DAP term.
"""
import math
from typing import NamedTuple

import torch

from util import box_ops
from util.misc import is_dist_avail_and_initialized

from .dap_functional import (
    COCO_IOU_THRESHOLDS,
    differentiable_ap_terms,
    localisation_sum,
    safe_divide,
)
from .matcher import MatchedPairs


def gather_detections(outputs, pairs, activation, neg_topk=100, log_odds=False):
    """Positive scores and IoUs and negative scores of one decoder layer (docs/DAP.md, "Positives
    and negatives").

    Positives: each matched (query, ground truth) pair, scored for the ground truth's class,
    with the IoU of the predicted and ground-truth boxes (differentiable in the prediction).
    Negatives, softmax: every unmatched query once, with its best foreground probability.
    Negatives, sigmoid: every (query, class) pair that is not a positive pair, restricted to
    the image's neg_topk highest scores (0 = all pairs).
    A score is the class probability, or with log_odds its logit log(p / (1 - p)) (what the
    ranking losses rank, docs/LOSSES.md): a sigmoid head's own logit, and for a softmax head the
    class's logit minus the log-sum-exp of the others', exact where p rounds to 1.
    Returns (pos_scores [P], pos_ious [P], neg_scores [M], neg_weights [M]): the negatives are
    a fixed-size set, every query (softmax) or the top k pairs of every image (sigmoid), and
    neg_weights is 1 where the entry is a negative and 0 where it is a positive; compacting them
    would read their number back to the host. pairs: the layer's matching, matched_pairs(targets,
    indices). A softmax head's probabilities are exp(log_softmax): from
    outputs["pred_log_probs"] where the criterion computed them for its classification loss too.
    """
    logits = outputs["pred_logits"]
    batch_idx, query_idx, labels = pairs.image, pairs.query, pairs.labels

    pred_boxes = outputs["pred_boxes"][batch_idx, query_idx].float()
    pos_ious = box_ops.paired_box_iou(box_ops.box_cxcywh_to_xyxy(pred_boxes),
                                      box_ops.box_cxcywh_to_xyxy(pairs.boxes.float()))

    if activation == "softmax":
        neg_weights = torch.ones(logits.shape[:2], dtype=torch.float32, device=logits.device)
        neg_weights[batch_idx, query_idx] = 0.0
        logits = logits.float()
        # One score per query: for the ground truth's class where the query is matched (its
        # negative entry weighs 0), for its best foreground class otherwise.
        scored_class = logits[..., :-1].detach().argmax(-1).index_put((batch_idx, query_idx), labels)  # [B, Q]
        if log_odds:
            neg_scores = softmax_log_odds(logits, scored_class)
        else:
            # p = exp(log_softmax), read with one gather: the backward is one scatter into the
            # [B, Q, C + 1] table.
            log_probs = outputs.get("pred_log_probs")
            log_probs = logits.log_softmax(-1) if log_probs is None else log_probs
            neg_scores = log_probs.gather(-1, scored_class.unsqueeze(-1)).squeeze(-1).exp()
        pos_scores = neg_scores[batch_idx, query_idx]
    else:
        logits = logits.float()
        # Rank the pairs on the detached logits (the order of the probabilities) with the
        # positives pushed below every real one, then weigh out what was not a negative (k may
        # exceed the number of negatives).
        ranking = logits.detach().clone()
        ranking[batch_idx, query_idx, labels] = -math.inf
        ranking = ranking.flatten(1)
        k = ranking.shape[1] if neg_topk <= 0 else min(neg_topk, ranking.shape[1])
        top_values, top_idx = ranking.topk(k, dim=1)
        neg_weights = (top_values > -math.inf).float()
        # Score only the positives and the top k: one index_select from the flat logits (its
        # backward one index_add), not a sigmoid of the whole [B, Q, C] table.
        pairs_per_image = ranking.shape[1]
        flat_idx = torch.cat([(batch_idx * logits.shape[1] + query_idx) * logits.shape[2] + labels,
                              (top_idx + pairs_per_image * torch.arange(len(top_idx), device=top_idx.device)[:, None])
                              .flatten()])
        scores = logits.reshape(-1).index_select(0, flat_idx)
        scores = scores if log_odds else scores.sigmoid()
        pos_scores, neg_scores = scores[:len(batch_idx)], scores[len(batch_idx):]
    return pos_scores, pos_ious, neg_scores.flatten(), neg_weights.flatten()


def softmax_log_odds(logits, classes):
    """log(p_c / (1 - p_c)) of softmax logits [..., C + 1] for one class per row, classes [...]:
    x_c minus the log-sum-exp of the other logits, which is exact where p_c rounds to 1."""
    chosen = logits.gather(-1, classes.unsqueeze(-1)).squeeze(-1)
    others = logits.scatter(-1, classes.unsqueeze(-1), -math.inf).logsumexp(-1)
    return chosen - others


def differentiable_all_reduce(tensor):
    """Sum over processes, with a backward that sums the gradients back (torch.distributed.nn)."""
    return torch.distributed.nn.functional.all_reduce(tensor)


class LayerRecord(NamedTuple):
    """One layer of one micro-batch, detached: what the step's other micro-batches need, and the
    matching, which the micro-batch's own gradient pass reuses (its outputs are the same)."""
    counts: torch.Tensor      # tp and fp stacked, [2, K, N], summed over processes
    pos_scores: torch.Tensor  # this process's positives
    pos_ious: torch.Tensor
    indices: list | None = None  # the matching: (query indices, target indices) per image


def merge_records(records):
    """One LayerRecord for several micro-batches: counts summed, positives concatenated."""
    return LayerRecord(sum(r.counts for r in records),
                       torch.cat([r.pos_scores for r in records]), torch.cat([r.pos_ious for r in records]))


class CountReducer:
    """The reduce_counts of a stack of layers (see differentiable_ap_terms): sums the stacked
    tp and fp over processes in one all-reduce, keeps them (detached) in .counts, and adds `offset`, the
    counts of the step's other micro-batches: under gradient accumulation the precision is then
    that of the whole step, while the gradient flows through this micro-batch's own counts only."""

    def __init__(self, distributed, offset=None):
        self.distributed = distributed
        self.offset = offset
        self.counts = None

    def __call__(self, counts):
        if self.distributed:
            counts = differentiable_all_reduce(counts)
        self.counts = counts.detach()
        return counts if self.offset is None else counts + self.offset


class DAPLayer(NamedTuple):
    """One layer to score with DAP-loss (or a ranking loss): its name (the suffix of its loss
    keys), outputs, matching (indices, and its pairs with their targets: matched_pairs), and
    whether it is the final layer."""
    name: str
    outputs: dict
    indices: list
    pairs: MatchedPairs
    final: bool = False


class DAPLayerResult(NamedTuple):
    loss: torch.Tensor       # -DAP (Eq. 9), this process's share, scaled as the upstream losses
    dap: torch.Tensor        # the DAP value, detached (what is logged)
    precision: torch.Tensor  # [K, N] interpolated precision, detached (the momentum matcher's input)
    record: LayerRecord      # what an accumulated step's other micro-batches need of this one

    @property
    def losses(self):
        """The layer's loss terms, keys without the layer's suffix."""
        return {"loss_dap": self.loss}

    @property
    def logged(self):
        """What is logged of the final layer beside its losses."""
        return {"dap_value": self.dap, "dap_precision": self.precision.mean()}


class DAPLoss:
    """loss_dap = -DAP (Eq. 9) of each layer, with the soft counts summed over every process so
    that the AP is that of the global batch (section 3.4: minibatch AP).

    Each process computes its positives' share of the global DAP (the counts and G are global)
    and scales it by `shares`, the number of (process, micro-batch) pairs of the step: the
    engine divides each micro-batch's loss by the number of micro-batches and DDP averages over
    processes, which then gives exactly the gradient of the global DAP; the logged average over
    processes is the global DAP, as the upstream losses do with their box count.

    Under gradient accumulation `others` holds, per layer, the LayerRecords of the step's other
    micro-batches (from the engine's counting pass): their counts are added to this one's,
    so the precision and the DAP are those of the whole step, and their positives' terms of
    Eq. 10 enter through the precision, so that the summed gradients are those of one batch
    holding all the step's images.

    The layers are independent DAP problems. Those of equal sizes (the decoder layers: every
    layer matches each ground truth once and has the same negatives) are computed as one
    stack, with one all-reduce: the cost of DAP is then mostly that of its large tensors, not
    of a few hundred small operations per layer.
    """

    name = "dap"  # its name in a layer's losses

    def __init__(self, *, activation, num_bins=32, sigma=0.05, num_gt=256, neg_topk=100):
        self.activation = activation
        self.num_bins = num_bins
        self.sigma = sigma
        self.num_gt = num_gt if num_gt else None  # 0 means "count the ground truth"
        self.neg_topk = neg_topk

    def __call__(self, layers, totals, step):
        """layers: DAPLayers; totals: the step totals (set_criterion), of which num_matched,
        matched pairs of the step per (process, micro-batch) (G when --dap_num_gt is 0), and
        shares, the number of (process, micro-batch) pairs; step: the StepContext, whose
        counting pass gives the step's other micro-batches. Returns {layer name: DAPLayerResult}."""
        shares = totals["shares"]
        num_gt = self.num_gt if self.num_gt is not None else totals["num_matched"] * shares
        gathered = {layer.name: gather_detections(layer.outputs, layer.pairs, self.activation,
                                                  self.neg_topk) for layer in layers}
        others = {}
        for layer in layers:
            records = step.other_micro_batches(layer.name)
            if records:
                others[layer.name] = merge_records(records)
        groups = {}
        for layer in layers:
            pos_scores, _, neg_scores, _ = gathered[layer.name]
            other = others.get(layer.name)
            key = (pos_scores.shape, neg_scores.shape, None if other is None else other.pos_scores.shape)
            groups.setdefault(key, []).append(layer)
        results = {}
        for group in groups.values():
            results.update(self._stack(group, [gathered[layer.name] for layer in group],
                                       [others.get(layer.name) for layer in group], num_gt, shares))
        return results

    def _stack(self, layers, gathered, others, num_gt, shares):
        """The layers of one size as one stack of DAP problems."""
        pos_scores, pos_ious, neg_scores, neg_weights = (torch.stack(parts) for parts in zip(*gathered))
        with_others = others[0] is not None
        reducer = CountReducer(is_dist_avail_and_initialized(),
                               torch.stack([o.counts for o in others]) if with_others else None)
        terms = differentiable_ap_terms(pos_scores, pos_ious, neg_scores, neg_weights, num_bins=self.num_bins,
                                        sigma=self.sigma, num_gt=num_gt, reduce_counts=reducer)
        dap = terms.dap
        if with_others:
            # The other micro-batches' positives in Eq. 10: constant in value, but through the
            # precision table a function of this micro-batch's counts. With them the gradient
            # through the precision is that of the whole step's DAP, not of this share alone.
            others_sum = localisation_sum(torch.stack([o.pos_scores for o in others]),
                                          torch.stack([o.pos_ious for o in others]), terms.precision, sigma=self.sigma)
            through_precision = safe_divide(others_sum, len(COCO_IOU_THRESHOLDS) * num_gt)
            dap = dap + (through_precision - through_precision.detach())
        dap = dap * shares
        detached, precision = dap.detach(), terms.precision.detach()
        pos_scores, pos_ious = pos_scores.detach(), pos_ious.detach()
        return {layer.name: DAPLayerResult(-dap[i], detached[i], precision[i],
                                           LayerRecord(reducer.counts[i], pos_scores[i], pos_ious[i], layer.indices))
                for i, layer in enumerate(layers)}
