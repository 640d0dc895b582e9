"""One-to-one assignment of predictions to ground-truth boxes (Hungarian algorithm), and the
matched pairs as the losses read them."""
from typing import NamedTuple

import torch
from scipy.optimize import linear_sum_assignment
from torch import nn

from util.box_ops import box_cxcywh_to_xyxy, generalized_box_iou


def assign_each(costs):
    """Solve one linear assignment per image; costs: list of [Q, T_i] cost matrices on the host
    (the caller copies the batch's costs there at once).

    Returns a list (one per image) of (query indices, target indices), int64 tensors of
    length min(Q, T_i).
    """
    indices = [linear_sum_assignment(c) for c in costs]
    return [(torch.as_tensor(i, dtype=torch.int64), torch.as_tensor(j, dtype=torch.int64)) for i, j in indices]


class MatchedPairs(NamedTuple):
    """Every matched (query, target) pair of a batch, image after image."""
    image: torch.Tensor   # [P] the pair's image in the batch (all on the targets' device)
    query: torch.Tensor   # [P] its query
    labels: torch.Tensor  # [P] its target's class
    boxes: torch.Tensor   # [P, 4] its target's box

    @property
    def index(self):
        """(image, query): the pairs' predictions, as an index into [B, Q, ...] outputs."""
        return self.image, self.query


def matched_pairs(targets, indices):
    """The pairs of a matching (one (query indices, target indices) per image) with their
    targets' classes and boxes, on the targets' device: one gather from the batch's
    concatenated targets, not one per image (which costs a kernel launch each on a GPU).

    Which image each pair belongs to is known on the host (the lengths); the matcher's indices
    are host tensors too (the assignment runs there). Both go to the device in one copy that
    does not make the host wait, never as host tensors indexing device ones (a blocking copy
    each time)."""
    device = targets[0]["labels"].device
    lengths = torch.tensor([len(q) for q, _ in indices])
    image = torch.arange(len(indices)).repeat_interleave(lengths)
    offset = torch.tensor([0] + [len(t["labels"]) for t in targets[:-1]]).cumsum(0)[image]
    query = torch.cat([query for query, _ in indices])
    target = torch.cat([target for _, target in indices])
    if query.device == device:  # pairs made on the device (the denoising queries)
        image, offset = torch.stack([image, offset]).to(device, non_blocking=True)
        flat = target + offset
    else:
        image, query, flat = torch.stack([image, query, target + offset]).to(device, non_blocking=True)
    labels = torch.cat([t["labels"] for t in targets])
    boxes = torch.cat([t["boxes"] for t in targets])
    return MatchedPairs(image, query, labels[flat], boxes[flat])


def assign_per_image(cost, sizes):
    """cost: [B, Q, sum(sizes)], every query against every target of the batch; sizes: the
    number of targets of each image. Image i is assigned among its own targets only."""
    cost = cost.detach().cpu()  # one device-to-host copy for the whole batch
    return assign_each([c[i] for i, c in enumerate(cost.split(sizes, -1))])


def focal_class_cost(logits, tgt_ids, alpha=0.25, gamma=2.0):
    """Class cost of sigmoid heads: the focal loss of calling each prediction the target's
    class minus that of calling it background, i.e. what matching the pair adds to the
    focal classification loss. logits [N, C], tgt_ids [T] -> [N, T]."""
    prob = logits.sigmoid()[:, tgt_ids]
    neg_cost = (1 - alpha) * prob ** gamma * -(1 - prob + 1e-8).log()
    pos_cost = alpha * (1 - prob) ** gamma * -(prob + 1e-8).log()
    return pos_cost - neg_cost


class HungarianMatcher(nn.Module):
    """Matches each ground-truth box to one query by minimising
    cost_class * class_cost + cost_bbox * L1(boxes) + cost_giou * (-GIoU(boxes)).

    class_cost is -p(class) for softmax heads (DETR: logits [B,Q,C+1]) and, with focal=True,
    focal_class_cost for sigmoid heads (Deformable DETR: logits [B,Q,C], alpha 0.25 and
    gamma 2 fixed as upstream). Queries left over (there are more queries than targets) are
    "no object".
    """

    def __init__(self, cost_class: float = 1, cost_bbox: float = 1, cost_giou: float = 1, focal: bool = False):
        super().__init__()
        if cost_class == 0 and cost_bbox == 0 and cost_giou == 0:
            raise ValueError("HungarianMatcher: all costs are 0")
        self.cost_class = cost_class
        self.cost_bbox = cost_bbox
        self.cost_giou = cost_giou
        self.focal = focal

    @torch.no_grad()
    def forward(self, outputs, targets):
        """outputs: 'pred_logits' [B,Q,C+1] (or [B,Q,C] with focal), 'pred_boxes' [B,Q,4]
        (normalised cxcywh); targets: list of B dicts with 'labels' [T_i] and 'boxes' [T_i,4]
        (normalised cxcywh).
        """
        bs, num_queries = outputs["pred_logits"].shape[:2]
        # Batch everything and split per image only for the assignment itself.
        out_logits = outputs["pred_logits"].flatten(0, 1)
        out_bbox = outputs["pred_boxes"].flatten(0, 1)
        tgt_ids = torch.cat([t["labels"] for t in targets])
        tgt_bbox = torch.cat([t["boxes"] for t in targets])

        if self.focal:
            cost_class = focal_class_cost(out_logits, tgt_ids)
        else:
            # 1 - p(class) would do; the constant does not change the assignment.
            cost_class = -out_logits.softmax(-1)[:, tgt_ids]
        cost_bbox = torch.cdist(out_bbox, tgt_bbox, p=1)
        cost_giou = -generalized_box_iou(box_cxcywh_to_xyxy(out_bbox), box_cxcywh_to_xyxy(tgt_bbox))

        cost = self.cost_bbox * cost_bbox + self.cost_class * cost_class + self.cost_giou * cost_giou
        return assign_per_image(cost.view(bs, num_queries, -1), [len(t["boxes"]) for t in targets])

