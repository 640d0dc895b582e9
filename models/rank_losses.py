"""
The ranking losses that DAP-loss is compared with (docs/LOSSES.md), as pure functions of
detection scores and IoUs: AP-Loss (Chen et al., "Towards Accurate One-Stage Object Detection
with AP-Loss", CVPR 2019), aLRP Loss (Oksuz et al., "A Ranking-based, Balanced Loss Function
Unifying Classification and Localisation in Object Detection", NeurIPS 2020) and Rank & Sort
Loss (Oksuz et al., "Rank & Sort Loss for Object Detection and Instance Segmentation", ICCV
2021). No detector, matching or process group here: models/rank_criterion.py feeds them.

All three rank positives among negatives with the smoothed step H of width delta, and none is
trained by differentiating through H: each paper splits a positive's error into primary terms
L_ij, the part caused by detection j ranked above positive i, and moves i up by sum_j L_ij and
every cause j down by its share (the error-driven update). _ErrorDriven is a loss value with
that update as its gradient in the scores.

The negatives are every (query, class) pair of a step, up to hundreds of thousands; the
positives are the ground-truth boxes, hundreds. Sums over the negatives are therefore never
formed pair by pair: H is piecewise linear, so a sum of steps is a count plus a linear part
over the entries within delta, read from sorted scores and prefix sums (_steps_above). Tables
among the positives (P x P) are formed directly. Everything is computed in float64 and the
results cast back to the dtype of the scores.
"""
from typing import NamedTuple

import torch
import torch.nn.functional as F


class ALRPTerms(NamedTuple):
    classification: torch.Tensor  # 1 - mean precision; carries the update of the scores
    localisation: torch.Tensor    # differentiable in the IoUs only


class RankSortTerms(NamedTuple):
    ranking: torch.Tensor  # positives above negatives
    sorting: torch.Tensor  # among the positives, higher IoU above lower IoU


def smoothed_step(x, delta):
    """H(x) = clamp(x / (2 delta) + 1/2, 0, 1): 0 below -delta, 1 above delta, 1/2 at 0."""
    return (x / (2 * delta) + 0.5).clamp(0, 1)


def _prefix_sums(x):
    """[0, x_0, x_0 + x_1, ...]: the sum of the first n entries at n."""
    prefix = x.new_zeros(x.shape[0] + 1)
    torch.cumsum(x, 0, out=prefix[1:])
    return prefix


def _steps_above(values, weights, queries, delta):
    """sum_m w_m H(v_m - q), the weight of the values ranked above q, for every float64 query
    q [Q] and the values [M] (weights [M], None: all 1), without the [Q, M] table:
    O((M + Q) log M) time and O(M + Q) memory.

    H(v - q) is 0 for v <= q - delta, 1 for v >= q + delta and linear in between, so over the
    sorted values the sum is a count of those at or above q + delta plus, over those strictly
    inside the window, sum w (v - (q - delta)) / (2 delta): differences of prefix sums. Values
    on either edge of the window fall in the exact part, and a query with no value above
    q - delta gets an exact 0.
    """
    # Sorted in their own dtype (float32 sorts faster), then widened: the order is the same.
    values, order = values.sort()
    values = values.double()
    weights = torch.ones_like(values) if weights is None else weights[order].double()
    weight_prefix = _prefix_sums(weights)
    moment_prefix = _prefix_sums(weights * values)
    lower, upper = queries - delta, queries + delta
    start = torch.searchsorted(values, lower, right=True)  # the first value above q - delta
    stop = torch.searchsorted(values, upper)  # the first value at or above q + delta
    window_weight = weight_prefix[stop] - weight_prefix[start]
    window_moment = moment_prefix[stop] - moment_prefix[start]
    return weight_prefix[-1] - weight_prefix[stop] + (window_moment - lower * window_weight) / (2 * delta)


class _Ranking(NamedTuple):
    relations: torch.Tensor        # [P, P] H(s_k - s_i) at [i, k], and 1 on the diagonal
    rank_pos: torch.Tensor         # [P] rank among the positives, itself counted as 1
    false_positives: torch.Tensor  # [P] N_FP, the weight of the negatives ranked above
    rank: torch.Tensor             # [P] rank among all detections


def _ranking(pos, neg_scores, neg_weights, delta):
    """The smoothed ranks of docs/LOSSES.md ("Common definitions"): pos, the positives' scores
    in float64; neg_scores and neg_weights, detached, in any dtype."""
    relations = smoothed_step(pos.unsqueeze(0) - pos.unsqueeze(1), delta)
    # A positive counts itself as exactly 1, not H(0) = 1/2 (the AP-Loss and aLRP papers; the
    # RS code counts 1/2): the same for the three losses.
    relations.fill_diagonal_(1.0)
    rank_pos = relations.sum(1)
    false_positives = _steps_above(neg_scores, neg_weights, pos, delta)
    return _Ranking(relations, rank_pos, false_positives, rank_pos + false_positives)


def _safe_denominator(denominator, valid):
    # Where `valid` is False the quotient is discarded; 1 keeps it finite.
    return torch.where(valid, denominator, 1.0)


class _ErrorDriven(torch.autograd.Function):
    """A loss value whose gradient in the scores is the error-driven update, not its derivative:
    positive i receives pos_update[i] (what it suffers, negated, and what it causes), negative
    j receives w_j sum_i causes[i] H(s_j - s_i) (its primary terms L_ij with every positive),
    both times the incoming gradient. causes None: no negative causes this error.

    Only the per-positive coefficients are kept for backward, where the one sum over the
    negatives is formed from the positives sorted (_steps_above).
    """

    @staticmethod
    def forward(ctx, value, pos_scores, neg_scores, neg_weights, pos_update, causes, delta):
        ctx.save_for_backward(pos_scores, neg_scores, neg_weights, pos_update, causes)
        ctx.delta = delta
        return value.to(pos_scores.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        pos_scores, neg_scores, neg_weights, pos_update, causes = ctx.saved_tensors
        grad = grad.double()
        pos_grad = (pos_update * grad).to(pos_scores.dtype)
        neg_grad = None
        if causes is not None and ctx.needs_input_grad[2]:
            # H(s_j - s_i) = H((-s_i) - (-s_j)): with every score negated, the positives ranked
            # below a negative are those above it.
            neg = neg_scores.detach().to(torch.float64, copy=True).neg_()
            shares = _steps_above(-pos_scores.detach(), causes * grad, neg, ctx.delta)
            neg_grad = (shares if neg_weights is None else shares * neg_weights).to(neg_scores.dtype)
        return None, pos_grad, neg_grad, None, None, None, None


def _detached(tensor):
    return None if tensor is None else tensor.detach()


def _check_delta(delta):
    if not delta > 0:
        raise ValueError(f"the smoothing width delta must be positive, got {delta}")
    return float(delta)


def ap_loss(pos_scores, neg_scores, neg_weights=None, *, delta=1.0):
    """AP-Loss (Chen et al. 2019): 1 - the mean interpolated precision of the positives.

    pos_scores [P], neg_scores [M]: scores (logits), larger ranks higher.
    neg_weights [M]: 1 for a negative, 0 for an entry to ignore; None: every entry is one.
    delta: the half-width of the smoothed step, in score units (the paper's 1).
    Returns a scalar in the dtype of pos_scores, attached to the graph, whose gradient is the
    paper's error-driven update (docs/LOSSES.md); 0 with no positive.
    """
    delta = _check_delta(delta)
    pos = pos_scores.detach().double()
    num_pos = max(pos.shape[0], 1)  # the mean over the positives; P = 0 gives 0
    ranking = _ranking(pos, neg_scores.detach(), _detached(neg_weights), delta)
    precision = ranking.rank_pos / ranking.rank
    # P̄(i): the best precision at s_i or below, i.e. at a recall at least i's (the paper's
    # interpolated AP). Precisions are positive, so a column of zeros changes no maximum and
    # keeps the reduction defined when P = 0.
    at_or_below = pos.unsqueeze(0) <= pos.unsqueeze(1)  # [i, k]: s_k <= s_i
    interpolated = F.pad(torch.where(at_or_below, precision, 0.0), (0, 1)).amax(1)
    # Rescale i's primary terms so that they sum to 1 - P̄(i) rather than 1 - p(i).
    improved = precision < interpolated
    scale = torch.where(improved, (1 - interpolated) / _safe_denominator(1 - precision, improved), 1.0)
    causes = scale / ranking.rank / num_pos
    pos_update = -causes * ranking.false_positives
    value = (1 - interpolated).sum() / num_pos
    return _ErrorDriven.apply(value, pos_scores, neg_scores, neg_weights, pos_update, causes, delta)


def alrp_loss_terms(pos_scores, pos_ious, neg_scores, neg_weights=None, *, delta=1.0, tau=0.5):
    """aLRP Loss (Oksuz et al. 2020) in its two parts, ALRPTerms(classification, localisation).

    pos_scores [P], neg_scores [M], neg_weights [M]: as for ap_loss.
    pos_ious [P]: IoU of each positive with its ground truth; tau: the IoU threshold of LRP,
        so that a positive's localisation error is E(i) = (1 - IoU_i) / (1 - tau).
    classification = mean N_FP(i) / rank(i). Its gradient in the scores is the error-driven
        update of the whole aLRP Loss (primary terms from the classification and the
        localisation errors both, the paper's).
    localisation = mean [E(i) + sum_{k != i} E(k) H(s_k - s_i)] / rank(i), differentiated in the
        IoUs with every rank and H held constant; no gradient in the scores.
    Both in the dtype of pos_scores; both 0 with no positive.
    """
    delta = _check_delta(delta)
    pos = pos_scores.detach().double()
    num_pos = max(pos.shape[0], 1)  # the mean over the positives; P = 0 gives 0
    ranking = _ranking(pos, neg_scores.detach(), _detached(neg_weights), delta)
    errors = (1 - pos_ious.detach().double()) / (1 - tau)
    # LRP(i) less its target E(i) / rank(i) (i's error with no negative above it), shared among
    # the negatives above i in proportion to H; nothing to share when none is above.
    others_errors = ranking.relations @ errors - errors  # sum_{k != i} E(k) H(s_k - s_i)
    excess = (ranking.false_positives + others_errors) / ranking.rank
    has_false_positives = ranking.false_positives > 0
    false_positives = _safe_denominator(ranking.false_positives, has_false_positives)
    causes = torch.where(has_false_positives, excess / false_positives, 0.0) / num_pos
    pos_update = -torch.where(has_false_positives, excess, 0.0) / num_pos
    value = (ranking.false_positives / ranking.rank).sum() / num_pos
    classification = _ErrorDriven.apply(value, pos_scores, neg_scores, neg_weights, pos_update, causes, delta)

    differentiable_errors = (1 - pos_ious.double()) / (1 - tau)
    localisation = ((ranking.relations @ differentiable_errors) / ranking.rank).sum() / num_pos
    return ALRPTerms(classification, localisation.to(pos_scores.dtype))


def alrp_loss(pos_scores, pos_ious, neg_scores, neg_weights=None, *, delta=1.0, tau=0.5):
    """aLRP Loss (Oksuz et al. 2020), classification + localisation (alrp_loss_terms)."""
    terms = alrp_loss_terms(pos_scores, pos_ious, neg_scores, neg_weights, delta=delta, tau=tau)
    return terms.classification + terms.localisation


def rank_sort_loss_terms(pos_scores, pos_ious, neg_scores, neg_weights=None, *, delta=0.5):
    """Rank & Sort Loss (Oksuz et al. 2021) in its two parts, RankSortTerms(ranking, sorting).

    pos_scores [P], neg_scores [M], neg_weights [M]: as for ap_loss.
    pos_ious [P]: the positives' continuous labels y (constants: no gradient).
    ranking = mean N_FP(i) / rank(i): negatives above i cause its error.
    sorting = mean of i's sorting error less its target: positives with a lower IoU above i
        cause it.
    Each term's gradient in the scores is its own error-driven update. Both in the dtype of
    pos_scores; both 0 with no positive.
    """
    delta = _check_delta(delta)
    pos = pos_scores.detach().double()
    num_pos = max(pos.shape[0], 1)  # the mean over the positives; P = 0 gives 0
    labels = pos_ious.detach().double()
    ranking = _ranking(pos, neg_scores.detach(), _detached(neg_weights), delta)

    # Ranking: L_ij = l_R(i) w_j H(x_ij) / N_FP(i) = w_j H(x_ij) / rank(i) (0 for every j when
    # N_FP(i) = 0, as H(x_ij) is then 0 for every negative).
    ranking_error = ranking.false_positives / ranking.rank
    ranking_value = ranking_error.sum() / num_pos
    pos_update, causes = -ranking_error / num_pos, 1 / ranking.rank / num_pos
    ranking_term = _ErrorDriven.apply(ranking_value, pos_scores, neg_scores, neg_weights, pos_update, causes, delta)

    # Sorting: the mean 1 - y of the positives ranked above i (i included), against its target,
    # the same mean over those of them with y_k >= y_i (what it would be, sorted by IoU).
    sorting_error = ranking.relations @ (1 - labels) / ranking.rank_pos
    target_relations = ranking.relations * (labels.unsqueeze(0) >= labels.unsqueeze(1))  # [i, k]: y_k >= y_i
    target_error = target_relations @ (1 - labels) / target_relations.sum(1)  # i counts itself: >= 1
    excess = sorting_error - target_error
    # The positives with a lower IoU ranked above i cause its excess, in proportion to H.
    missorted = ranking.relations * (labels.unsqueeze(0) < labels.unsqueeze(1))  # [i, k]: y_k < y_i
    missorted_total = missorted.sum(1)
    is_missorted = missorted_total > 0
    share = torch.where(is_missorted, excess / _safe_denominator(missorted_total, is_missorted), 0.0)
    primary = missorted * share.unsqueeze(1)  # L_ik
    # Each positive suffers its own row and causes its column.
    pos_update = (primary.sum(0) - primary.sum(1)) / num_pos
    sorting_value = excess.sum() / num_pos
    sorting_term = _ErrorDriven.apply(sorting_value, pos_scores, neg_scores, neg_weights, pos_update, None, delta)
    return RankSortTerms(ranking_term, sorting_term)


def rank_sort_loss(pos_scores, pos_ious, neg_scores, neg_weights=None, *, delta=0.5):
    """Rank & Sort Loss (Oksuz et al. 2021), ranking + sorting (rank_sort_loss_terms)."""
    terms = rank_sort_loss_terms(pos_scores, pos_ious, neg_scores, neg_weights, delta=delta)
    return terms.ranking + terms.sorting
