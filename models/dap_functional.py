"""
DAP's mathematics as pure functions of detection scores and IoUs: the differentiable average
precision of "Differentiable Average Precision Loss in DETR" (section 3, docs/DAP.md) and the AP
matching cost of Eq. 11. No detector, matching or process group here: models/dap_criterion.py
feeds these functions from a detector's outputs, models/dap_matcher.py matches with the cost.

DAP smooths the rectangle-rule AP of Eq. 3: scores are spread over N bins by a Gaussian, and
the step in IoU is replaced by a piecewise-linear function.

Notation: N score thresholds x_i = i / N, Gaussian score smoothing of width sigma, K IoU
thresholds alpha_k (COCO's ten by default). Every count and precision table is [K, N].

DAP's functions also take a stack of independent problems: a leading dimension L on every
input ([L, P] positives, [L, M] negatives) gives [L] values and [L, K, N] tables. The criterion
computes the decoder layers of one step this way, in one pass instead of one per layer.
"""
import functools
import math
from typing import NamedTuple

import torch

# Rounded, not accumulated: 0.85 and 0.9 must be the decimal values so that an IoU lying
# exactly on a threshold reaches it.
COCO_IOU_THRESHOLDS = tuple(round(0.5 + 0.05 * k, 2) for k in range(10))


class DAPTerms(NamedTuple):
    dap: torch.Tensor        # DAP value (Eq. 10), [] or [L]; the loss is its negative (Eq. 9)
    precision: torch.Tensor  # [K, N] or [L, K, N] interpolated precision P_k^i (section 3.4)


# The constant tensors of every call are made once per (size, dtype, device) and reused: no
# small tensor is created on the device at each call. Nothing writes into them.

@functools.lru_cache(maxsize=64)
@torch.inference_mode(False)  # a normal tensor even when first asked for under inference mode
def _score_thresholds(num_bins, dtype, device):
    return (torch.arange(num_bins, dtype=torch.float64, device=device) / num_bins).to(dtype)


def score_thresholds(num_bins, dtype, device=None):
    """x_i = i / N for i = 0..N-1."""
    return _score_thresholds(num_bins, dtype, torch.device(device or "cpu"))


@functools.lru_cache(maxsize=64)
@torch.inference_mode(False)
def _iou_threshold_tensor(iou_thresholds, dtype, device):
    return torch.as_tensor(iou_thresholds, dtype=torch.float64, device=device).to(dtype)


def iou_threshold_tensor(iou_thresholds, dtype, device=None):
    # Made in float64 and then cast, so an IoU equal to the decimal in `dtype` compares equal.
    return _iou_threshold_tensor(tuple(float(a) for a in iou_thresholds), dtype, torch.device(device or "cpu"))


@functools.lru_cache(maxsize=64)
@torch.inference_mode(False)
def _lower_edges(num_bins, dtype, device):
    edges = _score_thresholds(num_bins, dtype, device).clone()
    edges[0] = -math.inf
    return edges


@functools.lru_cache(maxsize=8)
def _tail_cutoff(dtype):
    """The bound c on |u| beyond which T = erfc(u) / 2 is taken as exactly 0 (u > c) or 1
    (u < -c) and its derivative, from exp(-u^2), as 0: the largest c (in steps of 1/64) whose
    erfc(c) / 2, and so exp(-c^2), is still a normal number of `dtype` (9.08 in float32, 26.5
    in float64). Beyond it they are subnormal, which CPUs compute several times slower (low
    scores put most of the negatives' table there), and a little further they underflow to 0
    anyway."""
    smallest = 4 * torch.finfo(dtype).tiny  # a margin for erfc's rounding in `dtype`
    c = math.floor(math.sqrt(-math.log(smallest)) * 64) / 64
    while math.erfc(c) / 2 < smallest:
        c -= 1 / 64
    return c


def _tail_argument(scores, num_bins, sigma):
    """u = (x_i - s) / (sigma * sqrt 2) for every score and bin, [..., N], so that
    T_i(s) = erfc(u) / 2. The difference first: it is exact where x_i and s are close, where
    erfc is steep. In place after the first pass: the full-size passes are the cost."""
    return (_lower_edges(num_bins, scores.dtype, scores.device) - scores.unsqueeze(-1)).mul_(1 / (sigma * math.sqrt(2)))


def tail_mass(scores, thresholds, sigma):
    """T_i(s) (Eq. 5): probability that a detection is counted at threshold x_i; [..., N].

    x_0 is read as -inf, so T_0 = 1. Evaluated as Phi(-z) = erfc(z / sqrt 2) / 2 rather than
    1 - Phi(z), or torch.special.ndtr, which computes 0.5 * (1 + erf) and flushes to 0
    (pytorch/pytorch#192295), to keep precision far in the lower tail, down to the dtype's
    smallest normal number; below it, T is 0 (see _tail_cutoff).
    """
    u = _tail_argument(scores, len(thresholds), sigma)
    c = _tail_cutoff(scores.dtype)
    return 0.5 * torch.special.erfc(u.clamp(-c, c)).masked_fill(u > c, 0.0)


class _WeightedTailSum(torch.autograd.Function):
    """sum_m w_m T_i(s_m) for every bin i, [..., N], with its gradient in the scores written out:
    dT_i(s) / ds = exp(-u^2) / (sigma sqrt(2 pi)) with u the erfc argument (0 for |u| > c, as
    in tail_mass). The negatives are every query of the batch, so the [M, N] table is the
    largest tensor of DAP-loss; autograd would keep it until backward, this keeps only the
    scores and rebuilds the density there, in place."""

    @staticmethod
    def forward(ctx, scores, weights, num_bins, sigma):
        ctx.save_for_backward(scores, weights)
        ctx.num_bins, ctx.sigma = num_bins, sigma
        u = _tail_argument(scores, num_bins, sigma)
        c = _tail_cutoff(scores.dtype)
        beyond = u > c
        tails = u.clamp_(-c, c).erfc_().masked_fill_(beyond, 0.0)
        # Unweighted, a plain sum: it sums more accurately than a matrix-vector product.
        return 0.5 * (tails.sum(-2) if weights is None else (weights.unsqueeze(-2) @ tails).squeeze(-2))

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        scores, weights = ctx.saved_tensors
        c = _tail_cutoff(scores.dtype)
        squared = _tail_argument(scores, ctx.num_bins, ctx.sigma).square_()
        outside = squared > c * c
        density = squared.clamp_(max=c * c).neg_().exp_().masked_fill_(outside, 0.0)
        scale = 1.0 / (ctx.sigma * math.sqrt(2 * math.pi))
        grad_scores = (density @ grad.unsqueeze(-1)).squeeze(-1) * scale
        return grad_scores if weights is None else grad_scores * weights, None, None, None


def weighted_tail_sum(scores, weights, num_bins, sigma):
    """sum_m w_m T_i(s_m) over scores [..., M] with weights [..., M] (None: all 1), for every
    bin i; [..., N].
    Equal to weights @ tail_mass(scores, ...), without keeping the [M, N] table for backward."""
    weights = None if weights is None else weights.to(scores.dtype)
    return _WeightedTailSum.apply(scores, weights, num_bins, float(sigma))


def _mass_from_tails(tails):
    # F_i = T_i - T_{i+1} with T_N = 0: the bins partition the score axis.
    return -tails.diff(dim=-1, append=torch.zeros_like(tails[..., :1]))


def bin_mass(scores, thresholds, sigma):
    """F_i(s) (Eq. 8): probability that the score falls in bin [x_i, x_{i+1}); [..., N].

    x_0 is read as -inf and x_N as +inf, so the masses of a score sum to 1.
    """
    return _mass_from_tails(tail_mass(scores, thresholds, sigma))


def soft_counts(pos_tails, pos_ious, neg_tail_sum, iou_thresholds):
    """Soft true / false positive counts tp_k^i, fp_k^i, each [..., K, N] (Eq. 6, 7).

    pos_tails: [..., P, N] the positives' T_i; pos_ious: [..., P]; neg_tail_sum: [..., N] the
    negatives' T_i summed (weighted_tail_sum). Whether a positive reaches alpha_k is a step of
    its IoU: no gradient flows through it.
    """
    alphas = iou_threshold_tensor(iou_thresholds, pos_ious.dtype, pos_ious.device)
    reached = (pos_ious.detach().unsqueeze(-2) >= alphas.unsqueeze(-1)).to(pos_tails.dtype)  # [..., K, P]
    tp = reached @ pos_tails
    fp = (1 - reached) @ pos_tails + neg_tail_sum.unsqueeze(-2)
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


# Precisions within this many units in the last place of the envelope count as tied (below).
TIE_ULPS = 16


@functools.lru_cache(maxsize=64)
@torch.inference_mode(False)
def _lower_triangle(size, device):
    return torch.ones(size, size, dtype=torch.bool, device=device).tril()


def interpolated_precision(precision):
    """P_k^i = max_{j <= i} p_k^j (section 3.4), of [..., K, N] tables: COCO's precision
    envelope, taken over the lower score thresholds (higher recalls), so P_k^i is
    non-decreasing in i.

    The value is the exact maximum. Its gradient goes to the lowest bin j whose precision is
    within TIE_ULPS units in the last place of it: bins whose precisions are equal in exact
    arithmetic (e.g. every score equal, or far below the higher thresholds) differ only by
    rounding, and a plain cummax would send the gradient to whichever rounded highest, a bin
    whose precision can have a large derivative. In float64 the rounding is too small to matter
    and ties already resolve to the lowest bin; in float32 the gradient would otherwise follow
    the rounding noise (docs/DAP.md, Numerics).
    """
    envelope = precision.detach().cummax(dim=-1).values  # [..., K, N]
    slack = TIE_ULPS * torch.finfo(precision.dtype).eps * envelope
    # near[..., k, i, j]: bin j <= i is tied with the envelope at bin i
    below = _lower_triangle(precision.shape[-1], precision.device)
    near = (precision.detach().unsqueeze(-2) >= (envelope - slack).unsqueeze(-1)) & below
    chosen = precision.gather(-1, near.to(torch.uint8).argmax(dim=-1))  # the lowest such j
    return envelope + (chosen - chosen.detach())


def localisation_function(ious, interp_precision, iou_thresholds=COCO_IOU_THRESHOLDS):
    """L̂_i(u) (Eq. 4, section 3.2.1) for every IoU u and bin i; shape ious.shape + (N,).

    interp_precision: [K, N], or a stack [..., K, N] whose leading dimensions ious starts with
    (ious [L, P] with tables [L, K, N]: each row of IoUs with its own table).

    Piecewise linear in u (clamped to [0, 1]) through the knots (0, 0), (alpha_k, C_k^i) with
    C_k^i = sum_{m <= k} P_m^i, and (1, C_K^i + P_K^i); for the COCO thresholds this last knot
    extends the 0.90 -> 0.95 segment with its own slope. At the knots alpha_k, L̂ equals the
    step function L_i(u) = sum_k [u >= alpha_k] P_k^i that it smooths.
    """
    knots = iou_threshold_tensor((0.0, *iou_thresholds, 1.0), ious.dtype, ious.device)  # [K + 2]
    cumulative = interp_precision.cumsum(dim=-2)
    heights = torch.cat([torch.zeros_like(cumulative[..., :1, :]), cumulative,
                         cumulative[..., -1:, :] + interp_precision[..., -1:, :]], dim=-2)  # [..., K + 2, N]
    # Clamp to [0, 1] while keeping the segment's slope as the derivative at 0 and 1 themselves
    # (Tensor.clamp would give 0 there).
    u = torch.where((ious >= 0) & (ious <= 1), ious, ious.detach().clamp(0, 1))
    # Segment index: knot at or below u; u = 1 belongs to the last segment.
    seg = torch.searchsorted(knots, u.detach().contiguous(), right=True).sub(1).clamp(0, len(knots) - 2)
    x0, x1 = knots[seg], knots[seg + 1]
    weight = ((u - x0) / (x1 - x0)).unsqueeze(-1)
    h0, h1 = _rows(heights, seg), _rows(heights, seg + 1)
    return h0 + weight * (h1 - h0)


def _rows(table, index):
    """table[..., index, :] for a stack of tables [..., R, N] and row indices whose shape
    starts with the stack's leading dimensions; shape index.shape + (N,)."""
    lead = table.shape[:-2]
    flat = index.reshape(*lead, -1)
    rows = table.gather(-2, flat.unsqueeze(-1).expand(*flat.shape, table.shape[-1]))
    return rows.reshape(*index.shape, table.shape[-1])


def localisation_sum(pos_scores, pos_ious, precision, *, sigma=0.05, iou_thresholds=COCO_IOU_THRESHOLDS):
    """The sum of Eq. 10 over positives b and bins i of F_i(s_b) * L̂_i(IoU_b), for a given
    interpolated precision table [K, N] (or per problem of a stack: [..., P] positives and
    [..., K, N] tables give [...])."""
    thresholds = score_thresholds(precision.shape[-1], pos_scores.dtype, pos_scores.device)
    return _localisation_total(bin_mass(pos_scores, thresholds, sigma), pos_ious, precision, iou_thresholds)


def _localisation_total(pos_masses, pos_ious, precision, iou_thresholds):
    return (pos_masses * localisation_function(pos_ious, precision, iou_thresholds)).sum((-2, -1))


def differentiable_ap_terms(pos_scores, pos_ious, neg_scores, neg_weights=None, *, num_bins=32, sigma=0.05,
                            num_gt=None, iou_thresholds=COCO_IOU_THRESHOLDS, reduce_counts=None):
    """DAP (Eq. 10) and the interpolated precision table it was built from.

    pos_scores, pos_ious: [P] score and IoU of each positive (matched) detection.
    neg_scores: [M] scores of the negative detections; neg_weights: [M] 1 for a negative, 0 for
        an entry to ignore (fixed-size negatives need no host synchronisation to compact), or
        None when every entry is a negative.
    A stack of L problems ([L, P] and [L, M] inputs) gives L values and tables at once.
    num_gt: G of Eq. 1; None counts the positives (through reduce_counts), 0 gives DAP = 0.
    reduce_counts: callable applied to the counts, tp and fp stacked [..., 2, K, N] (one call,
        so one all-reduce), and, when num_gt is None, then to the ground-truth count (a 0-dim
        tensor), before precision is formed; the distributed criterion passes a differentiable
        all-reduce here. Each process then returns its own positives' share of the global DAP.
    Returns DAPTerms(dap, precision) in the dtype of pos_scores, attached to the graph.
    """
    reduce = reduce_counts if reduce_counts is not None else (lambda counts: counts)
    dtype, device = pos_scores.dtype, pos_scores.device
    thresholds = score_thresholds(num_bins, dtype, device)
    pos_tails = tail_mass(pos_scores, thresholds, sigma)
    tp, fp = soft_counts(pos_tails, pos_ious, weighted_tail_sum(neg_scores, neg_weights, num_bins, sigma),
                         iou_thresholds)
    tp, fp = reduce(torch.stack([tp, fp], dim=-3)).unbind(-3)
    precision = interpolated_precision(precision_from_counts(tp, fp))

    if num_gt is None:
        num_gt = reduce(torch.tensor(float(pos_scores.shape[-1]), dtype=dtype, device=device))
    # Eq. 10: the sum averaged over the IoU thresholds and divided by G.
    total = _localisation_total(_mass_from_tails(pos_tails), pos_ious, precision, iou_thresholds)
    return DAPTerms(safe_divide(total, len(iou_thresholds) * num_gt), precision)


def safe_divide(total, denominator):
    """total / denominator, and 0 where the denominator is 0 (no ground truth: DAP = 0).
    denominator: a tensor, or a number (then no tensor is made for it, nor read back)."""
    if not torch.is_tensor(denominator):
        return total / denominator if denominator > 0 else total * 0.0
    denominator = denominator.to(total.dtype)
    nonzero = denominator > 0
    return torch.where(nonzero, total / torch.where(nonzero, denominator, torch.ones_like(denominator)), 0.0)


def differentiable_ap(pos_scores, pos_ious, neg_scores, neg_weights=None, *, num_bins=32, sigma=0.05, num_gt=None,
                      iou_thresholds=COCO_IOU_THRESHOLDS, reduce_counts=None):
    """The DAP value alone (Eq. 10); the DAP-loss is its negative (Eq. 9)."""
    return differentiable_ap_terms(pos_scores, pos_ious, neg_scores, neg_weights, num_bins=num_bins, sigma=sigma,
                                   num_gt=num_gt, iou_thresholds=iou_thresholds,
                                   reduce_counts=reduce_counts).dap


def class_probabilities(logits, activation):
    """Per-class scores in float32 (also under mixed precision). Softmax heads (DETR) drop
    the trailing no-object column; sigmoid heads (Deformable DETR, RT-DETR) have none."""
    logits = logits.float()
    if activation == "softmax":
        return logits.softmax(-1)[..., :-1]
    if activation == "sigmoid":
        return logits.sigmoid()
    raise ValueError(f"unknown score activation {activation!r}; expected 'softmax' or 'sigmoid'")


# ----------------------------------------------------------------------------- matching cost (Eq. 11)

def constant_precision(num_bins, dtype=torch.float32, device=None):
    """The paper's constant precision table: P_k^i = 1 / N for the ten IoU thresholds, [10, N]."""
    return torch.full((len(COCO_IOU_THRESHOLDS), num_bins), 1.0 / num_bins, dtype=dtype, device=device)


def ap_matching_cost(scores, ious, precision, *, sigma, iou_thresholds=COCO_IOU_THRESHOLDS):
    """cost(q, g) = -sum_i L̂_i(u) F_i(s) (Eq. 11) for every prediction / ground-truth pair.

    scores: [Q, T] score of prediction q for the class of ground truth g.
    ious: [Q, T] box IoU of prediction q with ground truth g.
    precision: [K, N] table P_k^i inside L̂ (N = number of score bins).
    Returns the cost matrix [Q, T].

    With constant_precision, L̂_i is the same function for every bin i and the bin masses of a
    score sum to 1, so the cost reduces to -L̂(u): an IoU-only cost that ignores the scores.
    This is the paper's constant mode.
    """
    thresholds = score_thresholds(precision.shape[1], scores.dtype, scores.device)
    masses = bin_mass(scores, thresholds, sigma)  # [Q, T, N]
    return -(masses * localisation_function(ious, precision, iou_thresholds)).sum(-1)
