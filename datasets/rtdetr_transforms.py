"""RT-DETR's data pipelines (torchvision.transforms.v2) and its label space.

RT-DETR classifies into K contiguous labels 0..K-1, one per category of the dataset in
increasing id order (for COCO this is upstream's `mscoco_category2label`). `category_ids`
is the one place that defines this mapping: the pipelines turn category ids into labels, and
the post-processor turns labels back into category ids for COCO evaluation.

The pipelines yield this project's targets (datasets/coco.py), so the engine and evaluation
are shared: boxes normalised cxcywh, labels (here: contiguous), image_id, area (box area in
pixels of the output image), iscrowd, orig_size and size as (h, w). Images are resized to a
square without keeping the aspect ratio and are not normalised (values in [0, 1]).
"""
import functools
import json
from pathlib import Path

import torch
import torchvision.transforms.v2 as T
from torchvision import tv_tensors

from util.box_ops import box_xyxy_to_cxcywh
from util.errors import UserInputError

# COCO's 80 category ids (1..90 without the 10 ids unused by the detection annotations).
COCO_CATEGORY_IDS = tuple(i for i in range(1, 91) if i not in (12, 26, 29, 30, 45, 66, 68, 69, 71, 83))
IMAGE_SIZE = 640
MULTI_SCALE_SIZES = (480, 512, 544, 576, 608, 640, 640, 640, 672, 704, 736, 768, 800)


def scaled_size(size, input_scale=1.0):
    """size * input_scale rounded to a multiple of 32 (the coarsest stride), at least 32."""
    return max(32, round(size * input_scale / 32) * 32)


@functools.lru_cache(maxsize=8)
def _read_category_ids(ann_file):
    try:
        with open(ann_file) as f:
            categories = json.load(f)["categories"]
        return tuple(sorted({int(c["id"]) for c in categories}))
    except FileNotFoundError:
        raise UserInputError(f"annotation file {ann_file} does not exist; --coco_path must hold "
                             "annotations/instances_val2017.json") from None
    except (ValueError, KeyError, TypeError) as e:
        raise UserInputError(f"annotation file {ann_file} has no valid 'categories' list "
                             f"({type(e).__name__}: {e})") from None


def category_ids(args):
    """The dataset's category ids, sorted: label i means category category_ids[i].

    Read from the validation annotation file under --coco_path (train and val share their
    categories); COCO's 80 ids when no dataset is given (e.g. building the model alone).
    """
    if getattr(args, "coco_path", None) is None:
        return COCO_CATEGORY_IDS
    return _read_category_ids(str(Path(args.coco_path) / "annotations" / "instances_val2017.json"))


class ToProjectTarget:
    """Last step: plain image tensor; boxes to normalised cxcywh; category ids to labels; area,
    iscrowd and size recomputed for the boxes and image that remain."""

    def __init__(self, category_ids):
        self.label_of = torch.full((max(category_ids) + 1,), -1, dtype=torch.int64)
        self.label_of[list(category_ids)] = torch.arange(len(category_ids))

    def __call__(self, image, target):
        h, w = image.shape[-2:]
        boxes = target["boxes"].as_subclass(torch.Tensor)
        ids = target["labels"]
        labels = torch.full_like(ids, -1)
        in_range = (ids >= 0) & (ids < len(self.label_of))
        labels[in_range] = self.label_of[ids[in_range]]
        if (labels < 0).any():
            unknown = sorted(set(ids[labels < 0].tolist()))
            raise UserInputError(f"image {int(target['image_id'])} has category id(s) {unknown} that are not "
                                 "among the categories of annotations/instances_val2017.json")
        target = dict(target)
        target.update(
            boxes=box_xyxy_to_cxcywh(boxes) / torch.tensor([w, h, w, h], dtype=boxes.dtype),
            labels=labels,
            area=(boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]),
            iscrowd=torch.zeros(len(labels), dtype=torch.int64),
            size=torch.tensor([h, w]),
        )
        return image.as_subclass(torch.Tensor), target


class RTDETRTransforms:
    """Wraps a v2 pipeline so it takes and returns this project's (PIL image, target) pairs."""

    def __init__(self, ops, category_ids):
        self.ops = T.Compose(ops)
        self.finish = ToProjectTarget(category_ids)

    def __call__(self, image, target):
        target = dict(target)
        target["boxes"] = tv_tensors.BoundingBoxes(target["boxes"], format="XYXY",
                                                   canvas_size=(image.height, image.width))
        return self.finish(*self.ops(image, target))

    def __repr__(self):
        return f"{type(self).__name__}({self.ops})"


def make_rtdetr_transforms(image_set, args):
    """RT-DETR's train / val pipelines at 640 px times --input_scale; labels follow category_ids(args)."""
    size = scaled_size(IMAGE_SIZE, args.input_scale)
    to_tensor = [T.Resize([size, size]), T.ToImage(), T.ToDtype(torch.float32, scale=True)]
    if image_set == "train":
        ops = [
            T.RandomPhotometricDistort(p=0.5),
            T.RandomZoomOut(fill=0),
            T.RandomApply([T.RandomIoUCrop()], p=0.8),
            T.SanitizeBoundingBoxes(min_size=1),  # drops the boxes the crop cut away, with their labels
            T.RandomHorizontalFlip(),
            *to_tensor,
            T.SanitizeBoundingBoxes(min_size=1),
        ]
    elif image_set == "val":
        ops = to_tensor
    else:
        raise UserInputError(f"unknown image set {image_set!r}; expected 'train' or 'val'")
    return RTDETRTransforms(ops, category_ids(args))
