"""datasets/sampling.py and the loaders of datasets/__init__.py: the training order and every
image's augmentation follow (--seed, epoch, index) alone, whatever the number of workers or
processes and wherever a run starts; the process's own random numbers are left alone."""
import hashlib
import os
import subprocess
import sys

import pytest
import torch
from torch.utils.data import BatchSampler, DataLoader, RandomSampler

import util.misc as utils
from datasets import build_data_loaders, build_dataset
from datasets.sampling import SeededSamples, TrainingBatches, epoch_order
from util.checkpoint import load_checkpoint

from conftest import REPO, assert_equal_states, data_flags, parse, run


def test_one_process_keeps_the_order_of_earlier_versions():
    """Earlier versions shuffled with torch's RandomSampler after seed_everything(seed, 0, epoch):
    the same batches, so earlier runs (the demo, the mini-study) keep their numbers."""
    dataset = list(range(37))
    for epoch in range(3):
        utils.seed_everything(42, 0, epoch)
        earlier = DataLoader(dataset, batch_sampler=BatchSampler(RandomSampler(dataset), 4, drop_last=True),
                             collate_fn=list)
        batches = TrainingBatches(len(dataset), 4, seed=42)
        batches.set_epoch(epoch)
        assert [[index for _, index in batch] for batch in batches] == list(earlier)
        assert {e for batch in batches for e, _ in batch} == {epoch}


def keys(batches):
    return [key for batch in batches for key in batch]


def test_processes_share_the_order_and_a_resumed_epoch_skips_its_first_batches():
    order = epoch_order(3, 5, 11)
    assert sorted(order) == list(range(11)) and order != epoch_order(3, 6, 11) != epoch_order(4, 5, 11)
    one = TrainingBatches(11, 2, seed=3)
    two = [TrainingBatches(11, 2, seed=3, rank=rank, world_size=2) for rank in range(2)]
    for batches in (one, *two):
        batches.set_epoch(5)
    assert keys(one) == [(5, i) for i in order[:10]] and len(one) == 5  # the 11th image: no full batch
    padded = order + order[:1]  # 12 places for 2 processes: the first image twice, as DistributedSampler
    for rank, batches in enumerate(two):
        assert keys(batches) == [(5, i) for i in padded[rank::2]] and len(batches) == 3
    resumed = TrainingBatches(11, 2, seed=3, rank=1, world_size=2)
    resumed.set_epoch(5, skip_batches=2)
    assert list(resumed) == list(two[1])[2:] and len(resumed) == 1


def augmented_digests(coco_path, num_classes, pipeline, workers, epochs=(0, 1)):
    """A sha256 of each epoch's training batches (images, masks, boxes, labels), augmented."""
    args = parse(data_flags((coco_path, num_classes)) + ["--num_workers", str(workers)])
    args.distributed = False
    dataset_train, dataset_val = (build_dataset(split, args, pipeline) for split in ("train", "val"))
    batches, loader, _ = build_data_loaders(dataset_train, dataset_val, args)
    digests = []
    for epoch in epochs:
        batches.set_epoch(epoch)
        digest = hashlib.sha256()
        for samples, targets in loader:
            digest.update(samples.tensors.numpy().tobytes() + samples.mask.numpy().tobytes())
            for target in targets:
                digest.update(target["boxes"].numpy().tobytes() + target["labels"].numpy().tobytes())
        digests.append(digest.hexdigest())
    return digests


@pytest.mark.parametrize("pipeline", ["detr", "rtdetr"])
def test_augmentations_follow_the_image_not_the_workers_or_the_process(pipeline, synthetic_coco):
    """The same batches, augmented alike, with 0 and 2 workers and in a fresh process; the
    process's own random numbers (dropout's) untouched by loading with 0 workers."""
    utils.seed_everything(1)
    expected_draws = torch.rand(3), torch.randint(100, (3,))
    utils.seed_everything(1)
    in_process = augmented_digests(*synthetic_coco, pipeline, workers=0)
    assert torch.equal(torch.rand(3), expected_draws[0]) and torch.equal(torch.randint(100, (3,)), expected_draws[1])
    assert augmented_digests(*synthetic_coco, pipeline, workers=2) == in_process
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([REPO, os.path.join(REPO, "tests")])}
    code = (f"import test_sampling; print(test_sampling.augmented_digests({synthetic_coco[0]!r}, {synthetic_coco[1]}, "
            f"{pipeline!r}, workers=0))")
    fresh = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert fresh.returncode == 0, fresh.stderr[-2000:]
    assert fresh.stdout.strip().splitlines()[-1] == str(in_process)


def test_each_epoch_draws_anew_for_an_image(synthetic_coco):
    args = parse(data_flags(synthetic_coco))
    samples = SeededSamples(build_dataset("train", args), args.seed)
    for index in range(4):
        (first, target), (again, target_again) = samples[(0, index)], samples[(0, index)]
        assert torch.equal(first, again) and torch.equal(target["boxes"], target_again["boxes"])
    # a flip, a crop or a scale: the first 4 images do not all come out alike in epochs 0 and 1
    assert any(samples[(0, i)][0].shape != samples[(1, i)][0].shape
               or not torch.equal(samples[(0, i)][0], samples[(1, i)][0]) for i in range(4))


def test_training_with_augmentation_gives_the_same_checkpoint_with_0_and_2_workers(synthetic_coco, tmp_path):
    flags = data_flags(synthetic_coco) + ["--epochs", "2"]
    for workers in (0, 2):
        run(flags + ["--num_workers", str(workers), "--output_dir", str(tmp_path / str(workers))])
    checkpoints = [load_checkpoint(str(tmp_path / str(workers) / "checkpoint.pth")) for workers in (0, 2)]
    assert_equal_states({k: v for k, v in checkpoints[0].items() if k != "args"},
                        {k: v for k, v in checkpoints[1].items() if k != "args"})
