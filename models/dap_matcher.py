"""
The AP-cost matcher (section 3.3, Eq. 11; docs/DAP.md): a prediction is cheap to match to a
ground truth when it would contribute much to the DAP of Eq. 10. The cost itself is
models.dap_functional.ap_matching_cost; this module holds the precision table and the assignment.
"""
import torch
from torch import nn

from util.box_ops import box_cxcywh_to_xyxy, box_iou

from .dap_functional import ap_matching_cost, class_probabilities, constant_precision
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
        """Same inputs and output as HungarianMatcher: a list of (query idx, target idx) per image."""
        probs = class_probabilities(outputs["pred_logits"], self.activation)  # [B, Q, C]
        pred_boxes = box_cxcywh_to_xyxy(outputs["pred_boxes"].float())
        costs = []
        for image_probs, image_boxes, target in zip(probs, pred_boxes, targets):
            ious, _ = box_iou(image_boxes, box_cxcywh_to_xyxy(target["boxes"].float()))
            scores = image_probs[:, target["labels"]]  # [Q, T]: score for each ground truth's class
            costs.append(ap_matching_cost(scores, ious, self.precision, sigma=self.sigma))
        return assign_each(costs)
