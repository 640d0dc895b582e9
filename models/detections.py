"""
The detections of one decoder layer as every AP-style loss sees them (DAP-loss,
models.dap_criterion; the ranking losses, models.rank_criterion): the layer to score, its
positives and negatives, and their scores (probabilities or log-odds) and IoUs.
"""
import math
from typing import NamedTuple

import torch

from util import box_ops

from .matcher import MatchedPairs


class BatchLossLayer(NamedTuple):
    """One layer to score with a batch-level loss (DAP-loss or a ranking loss): its name (the
    suffix of its loss keys), outputs, matching (indices, and its pairs with their targets:
    matched_pairs), and whether it is the final layer."""
    name: str
    outputs: dict
    indices: list
    pairs: MatchedPairs
    final: bool = False


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
