"""
DAP-loss: the differentiable average precision of "Differentiable Average Precision Loss in
DETR" (section 3), as pure functions of detection scores and IoUs. It smooths the
rectangle-rule AP of Eq. 3: scores are spread over N bins by a Gaussian, and the step in IoU
is replaced by a piecewise-linear function.

Notation: N score thresholds x_i = i / N, Gaussian score smoothing of width sigma, K IoU
thresholds alpha_k (COCO's ten by default). Every count and precision table is [K, N].
"""
import math
from typing import NamedTuple

import torch

from util import box_ops
from util.misc import get_world_size, is_dist_avail_and_initialized

# Rounded, not accumulated: 0.85 and 0.9 must be the decimal values so that an IoU lying
# exactly on a threshold reaches it.
COCO_IOU_THRESHOLDS = tuple(round(0.5 + 0.05 * k, 2) for k in range(10))


class DAPTerms(NamedTuple):
    dap: torch.Tensor        # scalar DAP value (Eq. 10); the loss is its negative (Eq. 9)
    precision: torch.Tensor  # [K, N] interpolated precision P_k^i (section 3.4)


def score_thresholds(num_bins, dtype, device=None):
    """x_i = i / N for i = 0..N-1."""
    return (torch.arange(num_bins, dtype=torch.float64, device=device) / num_bins).to(dtype)


def iou_threshold_tensor(iou_thresholds, dtype, device=None):
    # Made in float64 and then cast, so an IoU equal to the decimal in `dtype` compares equal.
    return torch.as_tensor(iou_thresholds, dtype=torch.float64, device=device).to(dtype)


def normal_cdf(z):
    """Phi(z) through erfc, accurate far into the lower tail, where torch.special.ndtr
    computes 0.5 * (1 + erf) and flushes to 0 (pytorch/pytorch#192295)."""
    return 0.5 * torch.special.erfc(-z / math.sqrt(2))


def tail_mass(scores, thresholds, sigma):
    """T_i(s) (Eq. 5): probability that a detection is counted at threshold x_i; [..., N].

    x_0 is read as -inf, so T_0 = 1. Evaluated as Phi(-z) rather than 1 - Phi(z) to keep
    precision far in the tail.
    """
    lower = torch.cat([thresholds.new_full((1,), -math.inf), thresholds[1:]])
    return normal_cdf((scores.unsqueeze(-1) - lower) / sigma)


def _mass_from_tails(tails):
    # F_i = T_i - T_{i+1} with T_N = 0: the bins partition the score axis.
    return -tails.diff(dim=-1, append=torch.zeros_like(tails[..., :1]))


def bin_mass(scores, thresholds, sigma):
    """F_i(s) (Eq. 8): probability that the score falls in bin [x_i, x_{i+1}); [..., N].

    x_0 is read as -inf and x_N as +inf, so the masses of a score sum to 1.
    """
    return _mass_from_tails(tail_mass(scores, thresholds, sigma))


def soft_counts(pos_tails, pos_ious, neg_tails, iou_thresholds):
    """Soft true / false positive counts tp_k^i, fp_k^i, each [K, N] (Eq. 6, 7).

    Whether a positive reaches alpha_k is a step of its IoU: no gradient flows through it.
    """
    alphas = iou_threshold_tensor(iou_thresholds, pos_ious.dtype, pos_ious.device)
    reached = (pos_ious.detach().unsqueeze(0) >= alphas.unsqueeze(1)).to(pos_tails.dtype)  # [K, P]
    tp = reached @ pos_tails
    fp = (1 - reached) @ pos_tails + neg_tails.sum(0)
    return tp, fp


def precision_from_counts(tp, fp):
    """p = tp / (tp + fp), and 0 where nothing is counted.

    The denominator itself is made safe so that the unused branch of `where` cannot put a
    NaN into the gradient. Denominators below the dtype's smallest normal number count as 0:
    the backward of a division forms (tp / denom) / denom, which overflows for subnormal
    denominators (scores some 13 sigma below a threshold in float32), while the positives'
    bin mass there, and so the effect on DAP, is below that number too.
    """
    denom = tp + fp
    counted = denom >= torch.finfo(denom.dtype).tiny
    return torch.where(counted, tp / torch.where(counted, denom, torch.ones_like(denom)), 0.0)


def interpolated_precision(precision):
    """P_k^i = max_{j <= i} p_k^j (section 3.4): COCO's precision envelope, taken over the
    lower score thresholds (higher recalls), so P_k^i is non-decreasing in i."""
    return precision.cummax(dim=-1).values


def localisation_function(ious, interp_precision, iou_thresholds=COCO_IOU_THRESHOLDS):
    """L̂_i(u) (Eq. 4, section 3.2.1) for every IoU u and bin i; shape ious.shape + (N,).

    Piecewise linear in u (clamped to [0, 1]) through the knots (0, 0), (alpha_k, C_k^i) with
    C_k^i = sum_{m <= k} P_m^i, and (1, C_K^i + P_K^i); for the COCO thresholds this last knot
    extends the 0.90 -> 0.95 segment with its own slope. At the knots alpha_k, L̂ equals the
    step function L_i(u) = sum_k [u >= alpha_k] P_k^i that it smooths.
    """
    alphas = iou_threshold_tensor(iou_thresholds, ious.dtype, ious.device)
    knots = torch.cat([alphas.new_zeros(1), alphas, alphas.new_ones(1)])  # [K + 2]
    cumulative = interp_precision.cumsum(dim=0)
    heights = torch.cat([torch.zeros_like(cumulative[:1]), cumulative,
                         cumulative[-1:] + interp_precision[-1:]])  # [K + 2, N]
    # Clamp to [0, 1] while keeping the segment's slope as the derivative at 0 and 1 themselves
    # (Tensor.clamp would give 0 there).
    u = torch.where((ious >= 0) & (ious <= 1), ious, ious.detach().clamp(0, 1))
    # Segment index: knot at or below u; u = 1 belongs to the last segment.
    seg = torch.searchsorted(knots, u.detach().contiguous(), right=True).sub(1).clamp(0, len(knots) - 2)
    x0, x1 = knots[seg], knots[seg + 1]
    weight = ((u - x0) / (x1 - x0)).unsqueeze(-1)
    h0 = heights[seg]
    return h0 + weight * (heights[seg + 1] - h0)


def localisation_sum(pos_scores, pos_ious, precision, *, sigma=0.05, iou_thresholds=COCO_IOU_THRESHOLDS):
    """The sum of Eq. 10 over positives b and bins i of F_i(s_b) * L̂_i(IoU_b), for a given
    interpolated precision table [K, N]."""
    thresholds = score_thresholds(precision.shape[-1], pos_scores.dtype, pos_scores.device)
    return (bin_mass(pos_scores, thresholds, sigma) * localisation_function(pos_ious, precision, iou_thresholds)).sum()


def differentiable_ap_terms(pos_scores, pos_ious, neg_scores, *, num_bins=32, sigma=0.05,
                            num_gt=None, iou_thresholds=COCO_IOU_THRESHOLDS, reduce_counts=None):
    """DAP (Eq. 10) and the interpolated precision table it was built from.

    pos_scores, pos_ious: [P] score and IoU of each positive (matched) detection.
    neg_scores: [M] scores of the negative detections.
    num_gt: G of Eq. 1; None counts the positives (through reduce_counts), 0 gives DAP = 0.
    reduce_counts: callable applied, in this order, to tp [K, N], fp [K, N] and, when num_gt
        is None, to the ground-truth count (a 0-dim tensor) before precision is formed; the
        distributed criterion passes a differentiable all-reduce here. Each process then
        returns its own positives' share of the global DAP.
    Returns DAPTerms(dap, precision) in the dtype of pos_scores, attached to the graph.
    """
    reduce = reduce_counts if reduce_counts is not None else (lambda counts: counts)
    dtype, device = pos_scores.dtype, pos_scores.device
    thresholds = score_thresholds(num_bins, dtype, device)
    tp, fp = soft_counts(tail_mass(pos_scores, thresholds, sigma), pos_ious,
                         tail_mass(neg_scores, thresholds, sigma), iou_thresholds)
    precision = interpolated_precision(precision_from_counts(reduce(tp), reduce(fp)))

    if num_gt is None:
        num_gt = reduce(torch.tensor(float(pos_scores.numel()), dtype=dtype, device=device))
    num_gt = torch.as_tensor(num_gt, dtype=dtype, device=device)
    # Eq. 10: the sum averaged over the IoU thresholds and divided by G.
    total = localisation_sum(pos_scores, pos_ious, precision, sigma=sigma, iou_thresholds=iou_thresholds)
    return DAPTerms(safe_divide(total, len(iou_thresholds) * num_gt), precision)


def safe_divide(total, denominator):
    """total / denominator, and 0 where the denominator is 0 (no ground truth: DAP = 0)."""
    nonzero = denominator > 0
    return torch.where(nonzero, total / torch.where(nonzero, denominator, torch.ones_like(denominator)), 0.0)


def differentiable_ap(pos_scores, pos_ious, neg_scores, *, num_bins=32, sigma=0.05, num_gt=None,
                      iou_thresholds=COCO_IOU_THRESHOLDS, reduce_counts=None):
    """The DAP value alone (Eq. 10); the DAP-loss is its negative (Eq. 9)."""
    return differentiable_ap_terms(pos_scores, pos_ious, neg_scores, num_bins=num_bins, sigma=sigma,
                                   num_gt=num_gt, iou_thresholds=iou_thresholds,
                                   reduce_counts=reduce_counts).dap


# ----------------------------------------------------------------------------- plumbing
# Everything below turns a detector's outputs and a matching into the inputs of the pure
# functions above: which detections are positives and negatives and what their scores and
# IoUs are (spec section 3), and how counts are summed over processes (section 4).

def class_probabilities(logits, activation):
    """Per-class scores in float32 (also under mixed precision). Softmax heads (DETR) drop
    the trailing no-object column; sigmoid heads (Deformable DETR, RT-DETR) have none."""
    logits = logits.float()
    if activation == "softmax":
        return logits.softmax(-1)[..., :-1]
    if activation == "sigmoid":
        return logits.sigmoid()
    raise ValueError(f"unknown score activation {activation!r}; expected 'softmax' or 'sigmoid'")


def gather_detections(outputs, targets, indices, activation, neg_topk=100):
    """Positive scores and IoUs and negative scores of one decoder layer (spec section 3).

    Positives: each matched (query, ground truth) pair, scored for the ground truth's class,
    with the IoU of the predicted and ground-truth boxes (differentiable in the prediction).
    Negatives, softmax: every unmatched query once, with its best foreground probability.
    Negatives, sigmoid: every (query, class) pair that is not a positive pair, restricted to
    the image's neg_topk highest scores (0 = all pairs).
    Returns (pos_scores [P], pos_ious [P], neg_scores [M]).
    """
    probs = class_probabilities(outputs["pred_logits"], activation)  # [B, Q, C]
    batch_idx = torch.cat([torch.full_like(src, i) for i, (src, _) in enumerate(indices)])
    query_idx = torch.cat([src for src, _ in indices])
    labels = torch.cat([t["labels"][tgt] for t, (_, tgt) in zip(targets, indices)])
    gt_boxes = torch.cat([t["boxes"][tgt] for t, (_, tgt) in zip(targets, indices)])

    pos_scores = probs[batch_idx, query_idx, labels]
    pred_boxes = outputs["pred_boxes"][batch_idx, query_idx].float()
    pos_ious = box_ops.paired_box_iou(box_ops.box_cxcywh_to_xyxy(pred_boxes),
                                      box_ops.box_cxcywh_to_xyxy(gt_boxes.float()))

    if activation == "softmax":
        unmatched = torch.ones(probs.shape[:2], dtype=torch.bool, device=probs.device)
        unmatched[batch_idx, query_idx] = False
        neg_scores = probs.max(-1).values[unmatched]
    else:
        # Rank the pairs on detached scores with the positives pushed below every real score,
        # then keep only what was really a negative (k may exceed the number of negatives).
        ranking = probs.detach().clone()
        ranking[batch_idx, query_idx, labels] = -1.0
        ranking = ranking.flatten(1)
        k = ranking.shape[1] if neg_topk <= 0 else min(neg_topk, ranking.shape[1])
        top_values, top_idx = ranking.topk(k, dim=1)
        neg_scores = probs.flatten(1).gather(1, top_idx)[top_values >= 0]
    return pos_scores, pos_ious, neg_scores


def differentiable_all_reduce(tensor):
    """Sum over processes, with a backward that sums the gradients back (torch.distributed.nn)."""
    return torch.distributed.nn.functional.all_reduce(tensor)


class LayerRecord(NamedTuple):
    """One layer of one micro-batch, detached: what the step's other micro-batches need."""
    counts: list              # [tp, fp], each [K, N], summed over processes
    pos_scores: torch.Tensor  # this process's positives
    pos_ious: torch.Tensor


class CountReducer:
    """The reduce_counts of one layer (see differentiable_ap_terms): sums tp and fp over
    processes, keeps them (detached) in .counts, and adds `offsets`, the counts of the step's
    other micro-batches: under gradient accumulation the precision is then that of the whole
    step, while the gradient flows through this micro-batch's own counts only."""

    def __init__(self, distributed, offsets=None):
        self.distributed = distributed
        self.offsets = offsets
        self.counts = []

    def __call__(self, counts):
        if self.distributed:
            counts = differentiable_all_reduce(counts)
        self.counts.append(counts.detach())
        if self.offsets is not None:
            counts = counts + self.offsets[len(self.counts) - 1]
        return counts


class DAPCriterionMixin:
    """Adds the 'dap' loss to a set criterion: loss_dap = -DAP (Eq. 9) of every decoder layer
    (and of a two-stage encoder's proposals, suffix _enc), matched by the criterion's own
    matcher, with the soft counts summed over all processes so the AP is that of the global
    batch (section 3.4: minibatch AP).

    Each process computes its positives' share of the global DAP (the counts and G are global)
    and scales it by the number of processes: DDP's gradient average then gives exactly the
    gradient of the global DAP, and the logged average over processes is the global DAP, as
    the upstream losses do with their box count.

    Gradient accumulation: the engine first runs every micro-batch of the step without
    gradients and hands what micro_batch_records keeps of each (its counts and positives) to
    set_step_records. Each micro-batch is then called with micro_batch=i: it adds the other
    micro-batches' counts to its own, so the precision and the DAP are those of the whole step,
    and their positives' terms of Eq. 10 through the precision, so the summed gradients are
    those of one batch holding all the step's images. The momentum matcher moves once per step.
    """

    @property
    def aux_layer_kwargs(self):
        # Auxiliary and encoder outputs add their loss_dap but neither log nor feed the matcher.
        return {**super().aux_layer_kwargs, "dap": {"final_layer": False}}

    def loss_map(self):
        return {**super().loss_map(), "dap": self.loss_dap}

    def init_dap(self, *, activation, num_bins=32, sigma=0.05, num_gt=256, neg_topk=100):
        self.dap_activation = activation
        self.dap_num_bins = num_bins
        self.dap_sigma = sigma
        self.dap_num_gt = num_gt if num_gt else None  # 0 means "count the ground truth"
        self.dap_neg_topk = neg_topk
        self._step_records, self._others, self._layer_records = None, None, []

    @property
    def needs_counting_pass(self):
        """Whether an accumulated step must be counted first (see the class docstring)."""
        return "dap" in self.losses

    def loss_dap(self, outputs, targets, indices, num_boxes, final_layer=True):
        pos_scores, pos_ious, neg_scores = gather_detections(
            outputs, targets, indices, self.dap_activation, self.dap_neg_topk)
        # (process, micro-batch) pairs of the optimisation step: the engine divides each
        # micro-batch's loss by their number and DDP averages over processes.
        shares = get_world_size() * self._micro_batches
        # G counted: the positives of the whole step (one-to-one matching pairs min(Q, T) per image).
        num_gt = self.dap_num_gt if self.dap_num_gt is not None else self._num_matched() * shares
        # Layers are scored in the same order in every call: the i-th call is the i-th layer.
        others = None if self._others is None else self._others[len(self._layer_records)]
        reducer = CountReducer(is_dist_avail_and_initialized(), None if others is None else others.counts)
        terms = differentiable_ap_terms(
            pos_scores, pos_ious, neg_scores, num_bins=self.dap_num_bins, sigma=self.dap_sigma,
            num_gt=num_gt, reduce_counts=reducer)
        self._layer_records.append(LayerRecord(reducer.counts, pos_scores.detach(), pos_ious.detach()))
        dap = terms.dap
        if others is not None:
            # The other micro-batches' positives in Eq. 10: constant in value, but through the
            # precision table a function of this micro-batch's counts. With them the gradient
            # through the precision is that of the whole step's DAP, not of this share alone.
            others_sum = localisation_sum(others.pos_scores, others.pos_ious, terms.precision,
                                          sigma=self.dap_sigma)
            denominator = others_sum.new_tensor(len(COCO_IOU_THRESHOLDS) * float(num_gt))
            through_precision = safe_divide(others_sum, denominator)
            dap = dap + (through_precision - through_precision.detach())
        dap = dap * shares
        losses = {"loss_dap": -dap}
        if final_layer:
            precision = terms.precision.detach()
            losses.update(dap_value=dap.detach(), dap_precision=precision.mean())
            self._final_precision = precision
        return losses

    @torch.no_grad()
    def micro_batch_records(self, outputs, targets, step_targets):
        """What the first pass of an accumulated step keeps of one micro-batch: a LayerRecord
        per layer (counts summed over processes, this process's positives). Changes no state."""
        self._forward(outputs, targets, None, step_targets=step_targets)
        return self._layer_records

    def set_step_records(self, step_records):
        """step_records[i]: what micro_batch_records kept of micro-batch i of the step."""
        self._step_records = step_records

    def _other_micro_batches(self, micro_batch):
        """Per layer, a LayerRecord of every micro-batch of the step but this one, merged."""
        others = [records for i, records in enumerate(self._step_records) if i != micro_batch]
        if not others:
            return None
        return [LayerRecord([sum(records[layer].counts[k] for records in others) for k in range(2)],
                            torch.cat([records[layer].pos_scores for records in others]),
                            torch.cat([records[layer].pos_ious for records in others]))
                for layer in range(len(others[0]))]

    def _forward(self, outputs, targets, micro_batch, **kwargs):
        self._final_precision = None
        self._layer_records = []
        self._others = None if micro_batch is None else self._other_micro_batches(micro_batch)
        return super().forward(outputs, targets, **kwargs)

    def forward(self, outputs, targets, micro_batch=None, **kwargs):
        """micro_batch: the index of this micro-batch in an accumulated step whose counts were
        given to set_step_records; None: this batch is counted on its own."""
        losses = self._forward(outputs, targets, micro_batch, **kwargs)
        # The momentum matcher's table moves only after every layer of the step has been
        # matched, so all layers see the table of the earlier steps (spec section 2).
        last = micro_batch is None or micro_batch == len(self._step_records) - 1
        update = getattr(self.matcher, "update_precision", None)
        if self.training and update is not None and self._final_precision is not None and last:
            update(self._final_precision)
        return losses
