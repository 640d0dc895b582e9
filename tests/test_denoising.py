"""RT-DETR's contrastive denoising: the groups' layout, their attention mask, the noise magnitudes."""
import torch

from models.denoising import contrastive_denoising_groups, denoising_attn_mask, denoising_match_indices
from util.box_ops import box_cxcywh_to_xyxy


def test_denoising_groups_layout_and_mask():
    targets = [{"labels": torch.tensor([4]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]])},
               {"labels": torch.tensor([1, 2]), "boxes": torch.tensor([[0.3, 0.4, 0.2, 0.2], [0.6, 0.5, 0.2, 0.4]])}]
    embed = torch.nn.Embedding(6, 3, padding_idx=5)
    dn = contrastive_denoising_groups(targets, num_classes=5, num_queries=3, class_embed=embed, num_denoising=9,
                                      label_noise_ratio=0.0, box_noise_scale=0.0)
    # max 2 ground truths -> 9 // 2 = 4 groups of 2 positives + 2 negatives = 16 queries
    assert dn.meta["dn_num_group"] == 4 and dn.meta["dn_num_split"] == [16, 3]
    assert [p.tolist() for p in dn.meta["dn_positive_idx"]] == [[0, 4, 8, 12], [0, 1, 4, 5, 8, 9, 12, 13]]
    # Without noise the queries are the ground truth itself, padding is class 5 (the zero row).
    labels_0 = [4, 5, 4, 5] * 4
    labels_1 = [1, 2, 1, 2] * 4
    torch.testing.assert_close(dn.class_embeds, embed(torch.tensor([labels_0, labels_1])))
    assert torch.equal(dn.class_embeds[0, 1], torch.zeros(3))
    torch.testing.assert_close(dn.boxes_unact[1, 2:4].sigmoid(), targets[1]["boxes"], atol=1e-6, rtol=0)
    assert torch.equal(denoising_match_indices(dn.meta, targets)[1][1], torch.tensor([0, 1] * 4))

    # Hand-built mask for 2 groups of size 2 and 2 matching queries: True = blocked.
    F, T = False, True
    expected = torch.tensor([[F, F, T, T, F, F],
                             [F, F, T, T, F, F],
                             [T, T, F, F, F, F],
                             [T, T, F, F, F, F],
                             [T, T, T, T, F, F],
                             [T, T, T, T, F, F]])
    assert torch.equal(denoising_attn_mask(4, 2, 2), expected)
    assert dn.attn_mask.shape == (19, 19) and dn.attn_mask[16:, :16].all() and not dn.attn_mask[:, 16:].any()


def test_denoising_noise_magnitudes():
    """Box corners move by less than half the box size (x scale) for positives and by one to
    two times that for negatives; labels flip with probability ratio / 2."""
    torch.manual_seed(0)
    box = torch.tensor([0.5, 0.5, 0.2, 0.2])
    targets = [{"labels": torch.zeros(50, dtype=torch.int64), "boxes": box.repeat(50, 1)}]
    embed = torch.nn.Embedding(11, 4, padding_idx=10)
    dn = contrastive_denoising_groups(targets, num_classes=10, num_queries=1, class_embed=embed, num_denoising=100,
                                      label_noise_ratio=0.5, box_noise_scale=1.0)
    noised = dn.boxes_unact.sigmoid()[0]
    shift = (box_cxcywh_to_xyxy(noised) - box_cxcywh_to_xyxy(box)).abs() / 0.1  # [200, 4]
    # A negative's corners can cross (x1 < x0): its width becomes ~0 and its corners are lost.
    intact = (noised[:, 2:] > 1e-3).all(-1).view(2, 2, 50)
    # 2 groups, each 50 positives then 50 negatives
    (positives, negatives), (pos_intact, neg_intact) = shift.view(2, 2, 50, 4).unbind(1), intact.unbind(1)
    assert pos_intact.all() and neg_intact.sum() > 20
    negatives = negatives[neg_intact]
    assert (positives < 1 + 1e-4).all() and (negatives > 1 - 1e-4).all() and (negatives < 2 + 1e-4).all()
    # labels: 25 % replaced by a random class (itself 1 in 10 times) -> about 22.5 % differ
    changed = (dn.class_embeds[0] != embed.weight[0]).any(-1).float().mean()
    assert 0.1 < changed < 0.35
