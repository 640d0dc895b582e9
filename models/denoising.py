"""Contrastive denoising groups (DN-DETR / DINO, as in RT-DETR): noised copies of the ground
truth are fed to the decoder next to the matching queries, and must be reconstructed (positives)
or rejected (negatives, noised further). They are matched to their ground truth by
construction, which stabilises the early, unstable bipartite matching."""
from typing import NamedTuple

import torch

from util.box_ops import box_cxcywh_to_xyxy, box_xyxy_to_cxcywh
from util.misc import inverse_sigmoid


class DenoisingGroups(NamedTuple):
    class_embeds: torch.Tensor  # [B, D, C] embedding of each (noised) label; padding: the zero row
    boxes_unact: torch.Tensor   # [B, D, 4] noised cxcywh boxes before the sigmoid
    attn_mask: torch.Tensor     # bool [D + Q, D + Q], True = may not attend
    meta: dict                  # dn_positive_idx, dn_num_group, dn_num_split


def denoising_attn_mask(num_denoising, group_size, num_queries, device=None):
    """Matching queries must not see the denoising ones (they would read the ground truth), and
    each denoising group sees only itself (and the matching queries)."""
    group = torch.arange(num_denoising, device=device) // group_size
    mask = torch.zeros(num_denoising + num_queries, num_denoising + num_queries, dtype=torch.bool, device=device)
    mask[:num_denoising, :num_denoising] = group[:, None] != group[None, :]
    mask[num_denoising:, :num_denoising] = True
    return mask


def contrastive_denoising_groups(targets, num_classes, num_queries, class_embed, num_denoising=100,
                                 label_noise_ratio=0.5, box_noise_scale=1.0):
    """targets: list of B dicts with 'labels' [T_i] and 'boxes' [T_i, 4] (normalised cxcywh);
    class_embed: nn.Embedding(num_classes + 1, C) whose last row is padding.

    With m = the largest T_i, there are G = max(1, num_denoising // m) groups of 2m queries: m
    positives (each ground truth once, padded) followed by m negatives. Labels are replaced by a
    random class with probability label_noise_ratio / 2; each box corner moves by up to
    box_noise_scale * half the box size for positives, and by between one and two times that
    for negatives.

    A batch without any ground truth gets D = 0 denoising queries rather than none at all, so
    that every step uses the same parameters and returns the same losses (DDP and the logged
    loss keys stay in step across processes).
    """
    num_gts = [len(t["labels"]) for t in targets]
    device = class_embed.weight.device
    batch_size, max_gt = len(targets), max(num_gts)
    num_group = max(1, num_denoising // max_gt) if max_gt else 1
    total = 2 * max_gt * num_group

    labels = torch.full((batch_size, max_gt), num_classes, dtype=torch.int64, device=device)
    boxes = torch.zeros(batch_size, max_gt, 4, device=device)
    real = torch.zeros(batch_size, max_gt, dtype=torch.bool, device=device)
    for i, (t, n) in enumerate(zip(targets, num_gts)):
        labels[i, :n] = t["labels"]
        boxes[i, :n] = t["boxes"]
        real[i, :n] = True
    # Layout along the query axis: group 0 positives, group 0 negatives, group 1 positives, ...
    labels = labels.repeat(1, 2 * num_group)
    boxes = boxes.repeat(1, 2 * num_group, 1)
    real = real.repeat(1, 2 * num_group)
    negative = (torch.arange(total, device=device) // max(max_gt, 1)) % 2 == 1  # [D]

    # Image i's positives in group g are the queries 2*m*g + j for its ground truths j < T_i
    # (made from the counts, which the host knows: not read back from a mask).
    group_start = torch.arange(num_group, device=device).unsqueeze(1) * (2 * max_gt)
    positive_idx = tuple((group_start + torch.arange(n, device=device)).flatten() for n in num_gts)

    if label_noise_ratio > 0:
        flip = torch.rand(labels.shape, device=device) < label_noise_ratio * 0.5
        random_labels = torch.randint_like(labels, 0, num_classes)
        labels = torch.where(flip & real, random_labels, labels)

    if box_noise_scale > 0:
        xyxy = box_cxcywh_to_xyxy(boxes)
        max_shift = boxes[..., 2:].repeat(1, 1, 2) * 0.5 * box_noise_scale
        sign = torch.randint_like(boxes, 0, 2) * 2.0 - 1.0
        magnitude = torch.rand_like(boxes) + negative[None, :, None].to(boxes.dtype)  # [0,1) or [1,2)
        xyxy = (xyxy + sign * magnitude * max_shift).clamp(0.0, 1.0)
        boxes = box_xyxy_to_cxcywh(xyxy)

    attn_mask = denoising_attn_mask(total, 2 * max(max_gt, 1), num_queries, device)
    meta = {"dn_positive_idx": positive_idx, "dn_num_group": num_group, "dn_num_split": [total, num_queries]}
    return DenoisingGroups(class_embed(labels), inverse_sigmoid(boxes), attn_mask, meta)


def denoising_match_indices(meta, targets):
    """The fixed matching of the denoising positives: (query indices, target indices) per image,
    in the layout of contrastive_denoising_groups."""
    out = []
    for positive_idx, t in zip(meta["dn_positive_idx"], targets):
        target_idx = torch.arange(len(t["labels"]), dtype=torch.int64, device=positive_idx.device)
        out.append((positive_idx, target_idx.repeat(meta["dn_num_group"])))
    return out
