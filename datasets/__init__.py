"""Dataset entry points used by main.py: the datasets, their category ids and their loaders."""
import torch
import torch.utils.data
from torch.utils.data import DataLoader, DistributedSampler, SequentialSampler

import util.misc as utils
from util.errors import UserInputError

from .coco import build as build_coco
from .coco import category_ids
from .sampling import SeededSamples, TrainingBatches

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
    """(training batch sampler, training loader, validation loader): batches of --batch_size
    images per process; the training set in the order of datasets/sampling.py (shuffled from
    --seed and the epoch, sharded across processes, the last incomplete batch dropped), each image
    augmented from (--seed, epoch, index); the validation set in order.

    With --num_workers > 0 the workers persist from epoch to epoch (no restart per epoch), each
    keeping 2 batches ready (torch's default prefetch). Neither loader draws from the process's
    random generators: each has a generator of its own (for its workers' seeds, which nothing
    uses), so the model's draws are the same whatever the number of workers."""
    rank, world_size = utils.get_rank(), utils.get_world_size()
    batches_train = TrainingBatches(len(dataset_train), args.batch_size, args.seed, rank, world_size)
    if len(batches_train) == 0:
        raise UserInputError(f"the training set has {len(dataset_train)} images, fewer than one batch of "
                             f"{args.batch_size} per process")
    sampler_val = DistributedSampler(dataset_val, shuffle=False) if args.distributed else SequentialSampler(dataset_val)
    # Page-locked batches copy to a GPU asynchronously (the engine copies with non_blocking).
    pin = torch.device(args.device).type == "cuda" and torch.cuda.is_available()
    options = dict(collate_fn=utils.collate_fn, num_workers=args.num_workers, pin_memory=pin,
                   persistent_workers=args.num_workers > 0)
    data_loader_train = DataLoader(SeededSamples(dataset_train, args.seed), batch_sampler=batches_train,
                                   generator=torch.Generator(), **options)
    data_loader_val = DataLoader(dataset_val, args.batch_size, sampler=sampler_val, drop_last=False,
                                 generator=torch.Generator(), **options)
    return batches_train, data_loader_train, data_loader_val
