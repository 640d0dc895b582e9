"""RT-DETR's decoder: anchors, output shapes with and without denoising, and the attention
mask that hides the denoising queries from the matching queries."""
import pytest
import torch

from models.rtdetr_decoder import generate_anchors
from util.coco import COCO_CATEGORY_IDS

from conftest import build_rtdetr, rtdetr_targets


def test_anchors():
    anchors, valid = generate_anchors([(2, 2), (1, 1)])
    boxes = torch.sigmoid(anchors[0])
    expected = torch.tensor([[0.25, 0.25, 0.05, 0.05], [0.75, 0.25, 0.05, 0.05], [0.25, 0.75, 0.05, 0.05],
                             [0.75, 0.75, 0.05, 0.05], [0.5, 0.5, 0.1, 0.1]])
    torch.testing.assert_close(boxes, expected)
    assert valid.all()
    # 100 columns: the first and last centres (0.005, 0.995) are within 1e-2 of the border
    anchors, valid = generate_anchors([(1, 100)])
    assert valid[0, :, 0].tolist() == [False] + [True] * 98 + [False]
    assert torch.isinf(anchors[0, 0]).all() and torch.isfinite(anchors[0, 1]).all()


def test_forward_shapes_train_and_eval():
    model, _, _ = build_rtdetr("--no_multi_scale")
    targets = rtdetr_targets()
    x = torch.rand(2, 3, 64, 64)
    model.train()
    out = model(x, targets)
    # max 2 ground truths, --num_denoising 8: 8 // 2 = 4 groups of 2 positives + 2 negatives
    num_classes = len(COCO_CATEGORY_IDS)
    assert out["pred_logits"].shape == (2, 16, num_classes) and out["pred_boxes"].shape == (2, 16, 4)
    assert [tuple(a["pred_logits"].shape) for a in out["aux_outputs"]] == [(2, 16, num_classes)]
    assert out["enc_outputs"]["pred_boxes"].shape == (2, 16, 4)
    assert [tuple(a["pred_boxes"].shape) for a in out["dn_aux_outputs"]] == [(2, 16, 4)] * 2
    assert out["dn_meta"]["dn_num_split"] == [16, 16] and out["dn_meta"]["dn_num_group"] == 4
    for boxes in [out["pred_boxes"], out["enc_outputs"]["pred_boxes"], out["dn_aux_outputs"][1]["pred_boxes"]]:
        assert ((boxes >= 0) & (boxes <= 1)).all()

    model.eval()
    with torch.no_grad():
        out = model(x)
    assert set(out) == {"pred_logits", "pred_boxes"} and out["pred_logits"].shape == (2, 16, num_classes)

    model.train()
    with pytest.raises(ValueError, match="needs the targets"):
        model(x)


def test_denoising_queries_are_invisible_to_the_matching_queries():
    """The attention mask keeps the matching queries' outputs independent of the denoising
    queries: other ground truth, same matching outputs."""
    model, _, _ = build_rtdetr("--no_multi_scale")
    model.train()
    x = torch.rand(2, 3, 64, 64)
    other = [{"labels": torch.tensor([7]), "boxes": torch.tensor([[0.2, 0.2, 0.1, 0.1]])},
             {"labels": torch.tensor([2, 5, 9]),
              "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2], [0.4, 0.6, 0.3, 0.1], [0.7, 0.3, 0.2, 0.3]])}]
    a = model(x, rtdetr_targets())
    b = model(x, other)
    assert a["dn_aux_outputs"][0]["pred_boxes"].shape != b["dn_aux_outputs"][0]["pred_boxes"].shape
    torch.testing.assert_close(a["pred_logits"], b["pred_logits"])
    torch.testing.assert_close(a["pred_boxes"], b["pred_boxes"])
