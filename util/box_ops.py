"""Box format conversions and IoU / generalized IoU on xyxy boxes."""
import torch


def box_cxcywh_to_xyxy(boxes):
    cx, cy, w, h = boxes.unbind(-1)
    return torch.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], dim=-1)


def box_xyxy_to_cxcywh(boxes):
    x0, y0, x1, y1 = boxes.unbind(-1)
    return torch.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], dim=-1)


def box_area(boxes):
    """Areas of [..., 4] xyxy boxes."""
    return (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])


def box_iou(boxes1, boxes2):
    """Pairwise IoU of [N,4] and [M,4] xyxy boxes; returns (iou [N,M], union [N,M])."""
    area1, area2 = box_area(boxes1), box_area(boxes2)
    top_left = torch.max(boxes1[:, None, :2], boxes2[None, :, :2])
    bottom_right = torch.min(boxes1[:, None, 2:], boxes2[None, :, 2:])
    inter = (bottom_right - top_left).clamp(min=0).prod(dim=-1)
    union = area1[:, None] + area2[None, :] - inter
    return inter / union, union


def generalized_box_iou(boxes1, boxes2):
    """Pairwise generalized IoU (Rezatofighi et al. 2019) of [N,4] and [M,4] xyxy boxes.

    The boxes must have x1 >= x0 and y1 >= y0: predictions do by construction (a width is a
    sigmoid), and the datasets drop target boxes without width or height when they load. Not
    checked here: a check reads the GPU, and this runs in every matcher and loss call."""
    iou, union = box_iou(boxes1, boxes2)
    top_left = torch.min(boxes1[:, None, :2], boxes2[None, :, :2])
    bottom_right = torch.max(boxes1[:, None, 2:], boxes2[None, :, 2:])
    enclosing = (bottom_right - top_left).clamp(min=0).prod(dim=-1)
    return iou - (enclosing - union) / enclosing


def paired_box_iou(boxes1, boxes2):
    """IoU of corresponding xyxy boxes of two [..., 4] tensors that broadcast against each other
    ([N,4] and [N,4]: the diagonal of box_iou; [B,Q,1,4] and [B,1,T,4]: every pair per image)."""
    return _paired_iou_and_union(boxes1, boxes2)[0]


def _paired_iou_and_union(boxes1, boxes2):
    top_left = torch.max(boxes1[..., :2], boxes2[..., :2])
    bottom_right = torch.min(boxes1[..., 2:], boxes2[..., 2:])
    inter = (bottom_right - top_left).clamp(min=0).prod(dim=-1)
    union = box_area(boxes1) + box_area(boxes2) - inter
    return inter / union, union


def paired_generalized_box_iou(boxes1, boxes2):
    """Generalized IoU of corresponding xyxy boxes (as paired_box_iou): the diagonal of
    generalized_box_iou without the N x N table."""
    iou, union = _paired_iou_and_union(boxes1, boxes2)
    top_left = torch.min(boxes1[..., :2], boxes2[..., :2])
    bottom_right = torch.max(boxes1[..., 2:], boxes2[..., 2:])
    enclosing = (bottom_right - top_left).clamp(min=0).prod(dim=-1)
    return iou - (enclosing - union) / enclosing
