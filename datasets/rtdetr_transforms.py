"""RT-DETR's data pipelines (torchvision.transforms.v2) and its label space.

RT-DETR classifies into K contiguous labels 0..K-1, one per category of the dataset in
increasing id order (for COCO this is upstream's `mscoco_category2label`): label i is
category_ids[i], with the dataset's sorted category ids (datasets.coco.category_ids). The
pipelines turn category ids into labels; RT-DETR's post-processor turns labels back into
category ids for COCO evaluation.

The pipelines yield this project's targets (datasets/coco.py), so the engine and evaluation
are shared: boxes normalised cxcywh, labels (here: contiguous), image_id, area (box area in
pixels of the output image), iscrowd, orig_size and size as (h, w). Images are resized to a
square without keeping the aspect ratio and are not normalised (values in [0, 1]).
"""
import torch
import torchvision.transforms.v2 as T
from torchvision import tv_tensors

from util.box_ops import box_xyxy_to_cxcywh
from util.errors import UserInputError
from util.misc import scaled_size

IMAGE_SIZE = 640


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


def make_rtdetr_transforms(image_set, input_scale, category_ids):
    """RT-DETR's train / val pipelines at 640 px times input_scale; label i is category_ids[i]."""
    size = scaled_size(IMAGE_SIZE, input_scale)
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
    return RTDETRTransforms(ops, category_ids)
