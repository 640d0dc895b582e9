"""
DAP-loss on a detector's outputs (docs/DAP.md): DAP of each layer's positives and negatives
(models.detections), and how the soft counts are summed over processes and over the
micro-batches of an accumulated step. The mathematics is models.dap_functional;
models.set_criterion.BaseSetCriterion calls DAPLoss on every layer that --loss gives a DAP term.
"""
from typing import NamedTuple

import torch

from util.misc import is_dist_avail_and_initialized

from .dap_functional import (
    COCO_IOU_THRESHOLDS,
    differentiable_ap_terms,
    localisation_sum,
    safe_divide,
)
from .detections import gather_detections


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
        """layers: BatchLossLayers (models.detections); totals: the step totals (set_criterion), of which num_matched,
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
