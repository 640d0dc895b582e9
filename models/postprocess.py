"""Model outputs -> COCO-style detections in absolute pixels: one per query for softmax heads
(DETR), the best (query, class) pairs for sigmoid heads (Deformable DETR, RT-DETR)."""
import torch
import torch.nn.functional as F
from torch import nn

from util import box_ops


def absolute_xyxy(boxes, target_sizes):
    """Normalised cxcywh boxes [B,N,4] -> absolute xyxy in pixels of each image.
    target_sizes: [B,2] (height, width) of each original image."""
    if len(boxes) != len(target_sizes) or target_sizes.shape[1] != 2:
        raise ValueError("PostProcess: target_sizes must be [batch_size, 2] (height, width)")
    img_h, img_w = target_sizes.unbind(1)
    scale_fct = torch.stack([img_w, img_h, img_w, img_h], dim=1)
    return box_ops.box_cxcywh_to_xyxy(boxes) * scale_fct[:, None, :]


class PostProcess(nn.Module):
    """Softmax heads: one detection per query, its best class other than "no object"."""

    @torch.no_grad()
    def forward(self, outputs, target_sizes):
        """target_sizes: [B,2] (height, width) of each original image.

        Returns a list of B dicts: 'scores' [Q], 'labels' [Q] (class ids), 'boxes' [Q,4]
        (absolute xyxy).
        """
        boxes = absolute_xyxy(outputs["pred_boxes"], target_sizes)
        scores, labels = F.softmax(outputs["pred_logits"], -1)[..., :-1].max(-1)
        return [{"scores": s, "labels": c, "boxes": b} for s, c, b in zip(scores, labels, boxes)]


class TopKPostProcess(nn.Module):
    """Sigmoid heads: the num_select best (query, class) pairs of each image by sigmoid score.

    category_ids: when the labels are contiguous indices into a list of dataset categories
    (RT-DETR), report category_ids[label] instead of the label.
    """

    def __init__(self, num_select=100, category_ids=None):
        super().__init__()
        self.num_select = num_select
        self.register_buffer("category_ids", None if category_ids is None else
                             torch.as_tensor(category_ids, dtype=torch.int64), persistent=False)

    @torch.no_grad()
    def forward(self, outputs, target_sizes):
        """target_sizes: [B,2] (height, width) of each original image.

        Returns a list of B dicts: 'scores' [K], 'labels' [K], 'boxes' [K,4] (absolute xyxy),
        best first, K = min(num_select, Q * num_classes). A query can appear once per class.
        """
        out_logits = outputs["pred_logits"]
        boxes = absolute_xyxy(outputs["pred_boxes"], target_sizes)
        num_classes = out_logits.shape[2]
        prob = out_logits.sigmoid().flatten(1)
        scores, index = prob.topk(min(self.num_select, prob.shape[1]), dim=1)
        labels = index % num_classes
        if self.category_ids is not None:
            labels = self.category_ids.to(labels.device)[labels]
        boxes = torch.gather(boxes, 1, (index // num_classes).unsqueeze(-1).repeat(1, 1, 4))
        return [{"scores": s, "labels": c, "boxes": b} for s, c, b in zip(scores, labels, boxes)]
