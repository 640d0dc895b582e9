"""COCO detection dataset: images and annotations in the COCO layout turned into DETR targets.

Layout under --coco_path: train2017/, val2017/ and annotations/instances_{train,val}2017.json.
Labels are the raw category ids (COCO's run 1..90 with holes), so the model needs
num_classes = max category id + 1.
"""
import contextlib
import functools
import io
from pathlib import Path

import torch
import torchvision
from pycocotools.coco import COCO

import datasets.transforms as T
from datasets.checks import (
    category_ids_of,
    check_detection_file,
    check_image_files,
    check_split_is_usable,
    read_detection_json,
)
from datasets.rtdetr_transforms import make_rtdetr_transforms
from util.errors import UserInputError

LAYOUT = "train2017/, val2017/ and annotations/instances_{train,val}2017.json"


class CocoDetection(torchvision.datasets.CocoDetection):
    """Returns (image, target) with target keys boxes (absolute xyxy), labels, image_id, area,
    iscrowd, orig_size and size ((h, w) of the image before / after the transforms)."""

    def __init__(self, img_folder, ann_file, transforms, category_ids=None, category_file=None):
        """category_ids: the ids the model classifies, read from category_file; every annotation
        must use one of them (default: the file's own categories). The file is parsed and checked
        whole, and every image file looked for, before pycocotools indexes it (datasets/checks.py)."""
        torchvision.datasets.VisionDataset.__init__(self, str(img_folder))
        self.ann_file = Path(ann_file)
        data = read_detection_json(ann_file)
        check_detection_file(data, ann_file, category_ids, category_file)
        check_image_files(data, ann_file, img_folder)
        default_iscrowd(data["annotations"])
        self.coco = COCO()
        self.coco.dataset = data
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
            self.coco.createIndex()
        self.ids = sorted(self.coco.imgs)
        self._transforms = transforms
        self.prepare = ConvertCocoAnnotations()

    def _load_image(self, id):
        info = self.coco.loadImgs(id)[0]
        path = Path(self.root) / info["file_name"]
        if not path.is_file():
            raise UserInputError(f"image file {path} (image id {id}, listed in {self.ann_file}) "
                                 f"does not exist")
        try:
            image = super()._load_image(id)
        except (OSError, ValueError, SyntaxError) as err:  # PIL: unidentified, truncated, corrupt
            raise UserInputError(f"image file {path} (image id {id}) cannot be decoded: {err}") from None
        # the boxes are in the JSON's pixel coordinates: on an image of another size they point elsewhere
        if "width" in info and "height" in info and image.size != (info["width"], info["height"]):
            raise UserInputError(f"image file {path} is {image.width}x{image.height} pixels, but {self.ann_file} "
                                 f"gives {info['width']}x{info['height']} (width x height) for image id {id}; "
                                 "fix its width and height there, or the image")
        return image

    def __getitem__(self, idx):
        img, annotations = super().__getitem__(idx)
        img, target = self.prepare(img, {"image_id": self.ids[idx], "annotations": annotations})
        if self._transforms is not None:
            img, target = self._transforms(img, target)
        return img, target


def default_iscrowd(annotations):
    """A missing iscrowd means 0 (an ordinary object), written into the annotations once, before
    anything reads them, so that the training targets and every evaluation backend (they all read
    dataset.coco) see the same value: hotcoco and ultrafast-pycocotools already read a missing
    iscrowd as 0, while pycocotools raises KeyError after the epoch. Filling it in keeps the three
    identical and still accepts the files of exporters that leave the key out."""
    for ann in annotations:
        ann.setdefault("iscrowd", 0)


class ConvertCocoAnnotations:
    """COCO annotation dicts -> tensors: crowd regions are dropped, xywh boxes become xyxy
    clipped to the image, and boxes with no width or height are dropped."""

    def __call__(self, image, target):
        w, h = image.size
        annotations = [a for a in target["annotations"] if a.get("iscrowd", 0) == 0]

        boxes = torch.as_tensor([a["bbox"] for a in annotations], dtype=torch.float32)
        boxes = boxes.reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]
        boxes[:, 0::2].clamp_(min=0, max=w)
        boxes[:, 1::2].clamp_(min=0, max=h)
        keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])

        size = torch.tensor([h, w])
        return image, {
            "boxes": boxes[keep],
            "labels": torch.tensor([a["category_id"] for a in annotations],
                                   dtype=torch.int64)[keep],
            "image_id": torch.tensor([target["image_id"]]),
            "area": torch.tensor([a["area"] for a in annotations], dtype=torch.float32)[keep],
            "iscrowd": torch.zeros(int(keep.sum()), dtype=torch.int64),
            "orig_size": size,
            "size": size.clone(),
        }


def make_coco_transforms(image_set, input_scale=1.0):
    """DETR's pipelines with every size (scales, crop bounds, max_size) times input_scale."""

    def scaled(size):
        return max(1, int(round(size * input_scale)))

    normalize = T.Compose([
        T.ToTensor(),
        T.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
    ])
    scales = [scaled(s) for s in range(480, 801, 32)]
    max_size = scaled(1333)

    if image_set == "train":
        return T.Compose([
            T.RandomHorizontalFlip(),
            T.RandomSelect(
                T.RandomResize(scales, max_size=max_size),
                T.Compose([
                    T.RandomResize([scaled(s) for s in (400, 500, 600)]),
                    T.RandomSizeCrop(scaled(384), scaled(600)),
                    T.RandomResize(scales, max_size=max_size),
                ]),
            ),
            normalize,
        ])
    if image_set == "val":
        return T.Compose([T.RandomResize([scaled(800)], max_size=max_size), normalize])
    raise UserInputError(f"unknown image set {image_set!r}; expected 'train' or 'val'")


def coco_files(args, image_set):
    """(image folder, annotation file) of image_set under --coco_path, refused with one line when
    the layout is not there."""
    if args.coco_path is None:
        raise UserInputError(f"--coco_path is not set; point it at a folder holding {LAYOUT}")
    root = Path(args.coco_path)
    if not root.is_dir():
        raise UserInputError(f"--coco_path {root} is not a folder; expected one holding {LAYOUT}")
    img_folder = root / f"{image_set}2017"
    ann_file = root / "annotations" / f"instances_{image_set}2017.json"
    if not img_folder.is_dir():
        raise UserInputError(f"image folder {img_folder} does not exist; --coco_path must hold {LAYOUT}")
    if not ann_file.is_file():
        raise UserInputError(f"annotation file {ann_file} does not exist; --coco_path must hold {LAYOUT}")
    return img_folder, ann_file


@functools.lru_cache(maxsize=8)
def _read_category_ids(ann_file):
    return category_ids_of(read_detection_json(ann_file), ann_file)


def category_file(args):
    """The annotation file whose 'categories' are the model's classes: the validation split's
    (train and val share their categories), once both splits were found."""
    coco_files(args, "train")
    return coco_files(args, "val")[1]


def category_ids(args):
    """The dataset's category ids, sorted (RT-DETR's label i is category_ids[i]), from
    category_file(args); None without --coco_path."""
    if args.coco_path is None:
        return None
    return _read_category_ids(str(category_file(args)))


def make_transforms(pipeline, image_set, args):
    """The transforms of a detector family's data pipeline ('detr' or 'rtdetr', its
    DetectorFamily.data_pipeline); --no_train_augmentation trains on the deterministic val ones."""
    if not args.train_augmentation:
        image_set = "val"
    if pipeline == "detr":
        return make_coco_transforms(image_set, args.input_scale)
    if pipeline == "rtdetr":
        return make_rtdetr_transforms(image_set, args.input_scale, category_ids(args))
    raise ValueError(f"unknown data pipeline {pipeline!r}; expected 'detr' or 'rtdetr'")


def build(image_set, args, pipeline):
    img_folder, ann_file = coco_files(args, image_set)
    dataset = CocoDetection(img_folder, ann_file, transforms=make_transforms(pipeline, image_set, args),
                            category_ids=category_ids(args), category_file=category_file(args))
    check_split_is_usable(dataset.coco.dataset, ann_file, image_set)
    return dataset
