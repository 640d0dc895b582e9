"""
The AP-cost matcher (section 3.3, Eq. 11; docs/DAP.md): a prediction is cheap to match to a
ground truth when it would contribute much to the DAP of Eq. 10. The cost itself is
models.dap_functional.ap_matching_cost; this module holds the precision table and the assignment.
"""
import torch
from torch import nn

from util.box_ops import box_cxcywh_to_xyxy, paired_box_iou

from .dap_functional import (
    COCO_IOU_THRESHOLDS,
    ap_matching_cost,
    class_probabilities,
    constant_precision,
    localisation_function,
)
from .matcher import assign_each


class DAPMatcher(nn.Module):
    """Hungarian matching with the AP cost of Eq. 11, a drop-in for HungarianMatcher.

    mode 'constant': P_k^i = 1/N (the paper), i.e. an IoU-only cost.
    mode 'momentum': P is an exponential moving average (factor `momentum`) of the final
        layer's interpolated precision reported by the DAP criterion through
        update_precision(); it starts from the constant table, so before the first update the
        matcher is the constant one. The table is a buffer: it is saved with the criterion's
        state in checkpoints and, fed with globally reduced precisions, equal on all ranks.
    """

    def __init__(self, *, activation, num_bins=32, sigma=0.05, mode="constant", momentum=0.9):
        super().__init__()
        if mode not in ("constant", "momentum"):
            raise ValueError(f"unknown DAP cost mode {mode!r}; expected 'constant' or 'momentum'")
        self.activation = activation
        self.sigma = sigma
        self.mode = mode
        self.momentum = momentum
        self.register_buffer("precision", constant_precision(num_bins))

    @torch.no_grad()
    def update_precision(self, batch_precision):
        if self.mode == "momentum":
            self.precision.mul_(self.momentum).add_(batch_precision.to(self.precision), alpha=1 - self.momentum)

    @torch.no_grad()
    def forward(self, outputs, targets):
        """Same inputs and output as HungarianMatcher: a list of (query idx, target idx) per image.

        The whole batch at once: targets padded to the largest count of the batch, one cost
        tensor [B, Q, T_max] and one copy of it to the host. In constant mode the cost is the
        closed form -L̂(IoU) (the bin masses of a score sum to 1), without the [B, Q, T, N] bins."""
        sizes = [len(t["labels"]) for t in targets]
        batch, num_queries = outputs["pred_logits"].shape[:2]
        most = max(sizes, default=0)
        device = outputs["pred_boxes"].device
        # each target's (image, slot) in the padded [B, T_max] layout; one scatter for the batch
        image = torch.arange(batch).repeat_interleave(torch.tensor(sizes))
        slot = torch.cat([torch.arange(n) for n in sizes])
        where = tuple(torch.stack([image, slot]).to(device, non_blocking=True))  # one copy, not waited for
        gt_boxes = torch.zeros(batch, most, 4, device=device)
        gt_boxes[..., 2:] = 1.0  # padding: a valid box, its costs are never read
        gt_boxes[where] = torch.cat([t["boxes"] for t in targets]).float()
        labels = torch.zeros(batch, most, dtype=torch.int64, device=device)
        labels[where] = torch.cat([t["labels"] for t in targets])
        pred_boxes = box_cxcywh_to_xyxy(outputs["pred_boxes"].float())
        ious = paired_box_iou(pred_boxes.unsqueeze(2), box_cxcywh_to_xyxy(gt_boxes).unsqueeze(1))  # [B, Q, T]
        if self.mode == "constant":
            cost = -localisation_function(ious, self.precision[:, :1], COCO_IOU_THRESHOLDS)[..., 0]
        else:
            probs = class_probabilities(outputs["pred_logits"], self.activation)  # [B, Q, C]
            scores = probs.gather(2, labels.unsqueeze(1).expand(batch, num_queries, most))  # [B, Q, T]
            cost = ap_matching_cost(scores, ious, self.precision, sigma=self.sigma)
        cost = cost.cpu()  # one device-to-host copy for the batch
        return assign_each([c[:, :n] for c, n in zip(cost, sizes)])
