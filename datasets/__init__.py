"""Dataset entry points used by main.py."""
import torch.utils.data

from util.errors import UserInputError

from .coco import build as build_coco

DATASET_BUILDERS = {"coco": build_coco}
IMAGE_SETS = ("train", "val")


def get_coco_api_from_dataset(dataset):
    """The pycocotools COCO object behind a dataset, looking through Subset wrappers."""
    while isinstance(dataset, torch.utils.data.Subset):
        dataset = dataset.dataset
    return dataset.coco


def build_dataset(image_set, args):
    if image_set not in IMAGE_SETS:
        raise UserInputError(f"unknown image set {image_set!r}; supported: {', '.join(IMAGE_SETS)}")
    if args.dataset_file not in DATASET_BUILDERS:
        raise UserInputError(f"--dataset_file {args.dataset_file!r} is not supported; "
                             f"supported: {', '.join(DATASET_BUILDERS)}")
    return DATASET_BUILDERS[args.dataset_file](image_set, args)
