"""Dataset entry points used by main.py: the datasets, their category ids and their loaders."""
import torch
import torch.utils.data
from torch.utils.data import BatchSampler, DataLoader, DistributedSampler, RandomSampler, SequentialSampler

from util.errors import UserInputError
from util.misc import collate_fn

from .coco import build as build_coco
from .coco import category_ids

__all__ = ["build_data_loaders", "build_dataset", "category_ids", "get_coco_api_from_dataset"]

DATASET_BUILDERS = {"coco": build_coco}
IMAGE_SETS = ("train", "val")


def get_coco_api_from_dataset(dataset):
    """The pycocotools COCO object behind a dataset, looking through Subset wrappers."""
    while isinstance(dataset, torch.utils.data.Subset):
        dataset = dataset.dataset
    return dataset.coco


def build_dataset(image_set, args, pipeline="detr"):
    """The image_set ('train' or 'val') of --dataset_file, with the transforms of `pipeline`,
    the detector family's data pipeline."""
    if image_set not in IMAGE_SETS:
        raise UserInputError(f"unknown image set {image_set!r}; supported: {', '.join(IMAGE_SETS)}")
    if args.dataset_file not in DATASET_BUILDERS:
        raise UserInputError(f"--dataset_file {args.dataset_file!r} is not supported; "
                             f"supported: {', '.join(DATASET_BUILDERS)}")
    return DATASET_BUILDERS[args.dataset_file](image_set, args, pipeline)


def build_data_loaders(dataset_train, dataset_val, args):
    """(training sampler, training loader, validation loader): batches of --batch_size images per
    process, the training set shuffled (sharded by DistributedSampler under DDP) with its last
    incomplete batch dropped, the validation set in order."""
    if args.distributed:
        sampler_train = DistributedSampler(dataset_train)
        sampler_val = DistributedSampler(dataset_val, shuffle=False)
    else:
        sampler_train = RandomSampler(dataset_train)
        sampler_val = SequentialSampler(dataset_val)
    batch_sampler_train = BatchSampler(sampler_train, args.batch_size, drop_last=True)
    if len(batch_sampler_train) == 0:
        raise UserInputError(f"the training set has {len(dataset_train)} images, fewer than one batch of "
                             f"{args.batch_size} per process")
    # Page-locked batches copy to a GPU asynchronously (the engine copies with non_blocking).
    pin = torch.device(args.device).type == "cuda" and torch.cuda.is_available()
    data_loader_train = DataLoader(dataset_train, batch_sampler=batch_sampler_train,
                                   collate_fn=collate_fn, num_workers=args.num_workers, pin_memory=pin)
    data_loader_val = DataLoader(dataset_val, args.batch_size, sampler=sampler_val, drop_last=False,
                                 collate_fn=collate_fn, num_workers=args.num_workers, pin_memory=pin)
    return sampler_train, data_loader_train, data_loader_val
