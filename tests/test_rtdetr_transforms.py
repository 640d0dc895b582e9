"""RT-DETR's data pipelines and label space: the val and train pipelines, and the category ids
read from the annotations."""
import argparse
import json
import os

import pytest
import torch
from PIL import Image

from datasets.coco import ConvertCocoAnnotations, category_ids
from datasets.rtdetr_transforms import make_rtdetr_transforms
from models import build_model
from util.box_ops import box_cxcywh_to_xyxy, box_xyxy_to_cxcywh
from util.coco import COCO_CATEGORY_IDS
from util.errors import UserInputError

from conftest import rtdetr_args


def sample_image_and_target(w=120, h=80):
    g = torch.Generator().manual_seed(0)
    image = Image.fromarray((torch.rand(h, w, 3, generator=g) * 255).to(torch.uint8).numpy())
    annotations = [{"bbox": [10, 20, 40, 30], "category_id": 13, "area": 1200.0},
                   {"bbox": [60, 10, 50, 60], "category_id": 2, "area": 3000.0}]
    return ConvertCocoAnnotations()(image, {"image_id": 5, "annotations": annotations})


def test_val_pipeline():
    image, target = sample_image_and_target()
    transform = make_rtdetr_transforms("val", 0.1, COCO_CATEGORY_IDS)
    img, out = transform(image, target)
    # 640 * 0.1 -> 64 px square, [0, 1] without mean/std, same keys as the DETR pipeline
    assert img.shape == (3, 64, 64) and type(img) is torch.Tensor and 0 <= img.min() and img.max() <= 1
    assert set(out) == set(target) and out["size"].tolist() == [64, 64] and out["orig_size"].tolist() == [80, 120]
    expected = box_xyxy_to_cxcywh(target["boxes"]) / torch.tensor([120, 80, 120, 80])
    torch.testing.assert_close(out["boxes"], expected)  # a square resize keeps normalised boxes
    assert out["labels"].tolist() == [COCO_CATEGORY_IDS.index(13), COCO_CATEGORY_IDS.index(2)]
    assert out["image_id"].tolist() == [5] and out["iscrowd"].tolist() == [0, 0]
    torch.testing.assert_close(out["area"], expected[:, 2] * expected[:, 3] * 64 * 64)

    image, target = sample_image_and_target()
    target["labels"][0] = 12  # not a COCO detection category
    with pytest.raises(UserInputError, match=r"category id\(s\) \[12\]"):
        transform(image, target)


def test_train_pipeline_invariants():
    transform = make_rtdetr_transforms("train", 0.1, COCO_CATEGORY_IDS)
    untouched = box_xyxy_to_cxcywh(sample_image_and_target()[1]["boxes"]) / torch.tensor([120, 80, 120, 80])
    augmented = 0
    for seed in range(12):
        torch.manual_seed(seed)
        img, out = transform(*sample_image_and_target())
        assert img.shape == (3, 64, 64) and img.dtype == torch.float32 and 0 <= img.min() and img.max() <= 1
        n = len(out["labels"])
        assert out["boxes"].shape == (n, 4) and len(out["area"]) == n and len(out["iscrowd"]) == n
        xyxy = box_cxcywh_to_xyxy(out["boxes"])
        assert (xyxy >= -1e-6).all() and (xyxy <= 1 + 1e-6).all() and (out["boxes"][:, 2:] > 0).all()
        assert set(out["labels"].tolist()) <= {COCO_CATEGORY_IDS.index(13), COCO_CATEGORY_IDS.index(2)}
        augmented += n != 2 or not torch.allclose(out["boxes"], untouched)
    assert augmented >= 6  # flips alone change half of them


def test_category_ids_from_annotations(synthetic_coco, tmp_path):
    path, _ = synthetic_coco
    ids = category_ids(argparse.Namespace(coco_path=path))
    with open(os.path.join(path, "annotations", "instances_val2017.json")) as f:
        assert list(ids) == sorted(c["id"] for c in json.load(f)["categories"])
    assert category_ids(argparse.Namespace(coco_path=None)) is None and len(COCO_CATEGORY_IDS) == 80
    with pytest.raises(UserInputError, match="does not exist"):
        category_ids(argparse.Namespace(coco_path=str(tmp_path)))
    # The model classifies the dataset's categories; --num_classes (largest id + 1) must agree.
    _, criterion, post = build_model(rtdetr_args(), ids)
    assert criterion.num_classes == len(ids) and post["bbox"].category_ids.tolist() == list(ids)
    with pytest.raises(UserInputError, match="--num_classes"):
        build_model(rtdetr_args("--num_classes", str(max(ids) + 3)), ids)
