"""The training order and the training augmentations' random numbers, both functions of (--seed,
epoch) alone: not of the number of DataLoader workers, of which process loads an image, or of
where in the epoch a run started.

TrainingBatches yields each process's batches of (epoch, index) keys; SeededSamples loads the
image `index` with the transforms' generators seeded from (--seed, epoch, index). A run resumed in
the middle of an epoch skips the batches already trained without loading them
(`set_epoch(epoch, skip_batches=...)`), and every image after them is augmented as it would have
been.
"""
import contextlib
import random

import numpy as np
import torch
from torch.utils.data import Dataset

import util.misc as utils


def epoch_order(seed, epoch, size):
    """A permutation of range(size) that depends on (seed, epoch) only. It is the order torch's
    RandomSampler drew on one process in earlier versions (seeded by the second number of the
    torch generator that seed_everything(seed, 0, epoch) seeded; the DataLoader drew the first),
    so that their runs keep their data order, hence their numbers."""
    numbers = torch.Generator().manual_seed(utils.seed_of(seed, 0, epoch))
    _loader_seed, order_seed = torch.empty(2, dtype=torch.int64).random_(generator=numbers).tolist()
    return torch.randperm(size, generator=torch.Generator().manual_seed(order_seed)).tolist()


class TrainingBatches:
    """A batch sampler: this process's batches of an epoch, as lists of (epoch, index) keys.

    Every process shuffles with epoch_order and takes every world_size-th image from its rank on,
    the order padded with its first images to a multiple of world_size (as DistributedSampler
    does); batches of batch_size, the last incomplete one dropped. Call set_epoch before each
    epoch (epoch 0 until then)."""

    def __init__(self, dataset_size, batch_size, seed, rank=0, world_size=1):
        self.dataset_size, self.batch_size, self.seed = dataset_size, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.epoch, self.skip_batches = 0, 0

    @property
    def batches_per_epoch(self):
        return -(-self.dataset_size // self.world_size) // self.batch_size

    def set_epoch(self, epoch, skip_batches=0):
        """The epoch to draw; its first skip_batches batches are left out (already trained)."""
        self.epoch, self.skip_batches = epoch, skip_batches

    def __len__(self):
        return max(self.batches_per_epoch - self.skip_batches, 0)

    def __iter__(self):
        order = epoch_order(self.seed, self.epoch, self.dataset_size)
        total = -(-len(order) // self.world_size) * self.world_size
        mine = [order[i % len(order)] for i in range(self.rank, total, self.world_size)]
        for batch in range(self.skip_batches, self.batches_per_epoch):
            indices = mine[batch * self.batch_size:(batch + 1) * self.batch_size]
            yield [(self.epoch, index) for index in indices]


@contextlib.contextmanager
def seeded_transforms(seed):
    """Python's random and torch's CPU generator (what datasets/transforms.py and torchvision's
    transforms draw from) seeded with seed for the block, and put back afterwards: the block's
    draws depend on the seed alone, and the process's own streams (dropout, denoising noise, with
    --num_workers 0) continue where they were."""
    states = random.getstate(), torch.get_rng_state()
    random.seed(seed)
    torch.default_generator.manual_seed(seed)  # not torch.manual_seed: it would reseed CUDA too
    try:
        yield
    finally:
        random.setstate(states[0])
        torch.set_rng_state(states[1])


class SeededSamples(Dataset):
    """The training set indexed by (epoch, index) keys (TrainingBatches'): each image's random
    augmentation is drawn from generators seeded from (seed, epoch, index)."""

    def __init__(self, dataset, seed):
        self.dataset, self.seed = dataset, seed

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, key):
        epoch, index = key
        # spawn_key: a stream apart from seed_everything's (seed, rank, epoch) ones
        seed = int(np.random.SeedSequence(self.seed, spawn_key=(epoch, index)).generate_state(1)[0])
        with seeded_transforms(seed):
            return self.dataset[index]
