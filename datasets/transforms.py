"""Transforms that act on a PIL image and its detection target together, so boxes, areas and
the recorded image size always follow the pixels.

Targets hold absolute xyxy `boxes`; `Normalize` is the last step and turns them into cxcywh
relative to the final (un-padded) image size, the format the model predicts.
"""
import random

import torch
import torchvision.transforms as T
import torchvision.transforms.functional as F

from util.box_ops import box_xyxy_to_cxcywh


def crop(image, target, region):
    """Crop to region = (top, left, height, width); boxes are clipped to it and boxes left
    with no width or height are dropped together with their labels, areas and crowd flags."""
    top, left, h, w = region
    image = F.crop(image, top, left, h, w)
    target = target.copy()
    target["size"] = torch.tensor([h, w])
    if "boxes" in target:
        boxes = target["boxes"] - torch.as_tensor([left, top, left, top], dtype=torch.float32)
        corners = torch.min(boxes.reshape(-1, 2, 2), torch.as_tensor([w, h], dtype=torch.float32))
        corners = corners.clamp(min=0)
        target["boxes"] = corners.reshape(-1, 4)
        target["area"] = (corners[:, 1] - corners[:, 0]).prod(dim=1)
        keep = (corners[:, 1] > corners[:, 0]).all(dim=1)
        for field in ("boxes", "labels", "area", "iscrowd"):
            if field in target:
                target[field] = target[field][keep]
    return image, target


def hflip(image, target):
    image = F.hflip(image)
    target = target.copy()
    if "boxes" in target:
        w = image.width
        x0, y0, x1, y1 = target["boxes"].unbind(-1)
        target["boxes"] = torch.stack([w - x1, y0, w - x0, y1], dim=-1)
    return image, target


def _resized_hw(w, h, size, max_size):
    """(h, w) after scaling the shorter side to size, unless that pushes the longer side past
    max_size, in which case the longer side becomes (about) max_size instead."""
    if max_size is not None:
        short, long = min(w, h), max(w, h)
        if long / short * size > max_size:
            size = int(round(max_size * short / long))
    if (w <= h and w == size) or (h <= w and h == size):
        return h, w
    if w < h:
        return int(size * h / w), size
    return size, int(size * w / h)


def resize(image, target, size, max_size=None):
    """Scale the shorter side to size (the longer one to at most max_size)."""
    new_h, new_w = _resized_hw(image.width, image.height, size, max_size)
    ratio_w, ratio_h = new_w / image.width, new_h / image.height
    image = F.resize(image, [new_h, new_w])
    if target is None:
        return image, None
    target = target.copy()
    if "boxes" in target:
        target["boxes"] = target["boxes"] * torch.as_tensor([ratio_w, ratio_h, ratio_w, ratio_h])
    if "area" in target:
        target["area"] = target["area"] * (ratio_w * ratio_h)
    target["size"] = torch.tensor([new_h, new_w])
    return image, target


def pad(image, target, padding):
    """Pad padding = (x, y) pixels at the right and bottom, so box coordinates stay valid."""
    image = F.pad(image, [0, 0, padding[0], padding[1]])
    if target is None:
        return image, None
    target = target.copy()
    target["size"] = torch.tensor([image.height, image.width])
    return image, target


class RandomCrop:
    def __init__(self, size):
        self.size = size  # (h, w)

    def __call__(self, img, target):
        return crop(img, target, T.RandomCrop.get_params(img, self.size))


class RandomSizeCrop:
    """Crop a random (h, w) with each side drawn from [min_size, max_size] (and at most the
    image side)."""

    def __init__(self, min_size, max_size):
        self.min_size = min_size
        self.max_size = max_size

    def __call__(self, img, target):
        # An image narrower than min_size (a very elongated one capped by max_size) is kept
        # whole along that side instead of failing.
        w = random.randint(min(self.min_size, img.width), min(img.width, self.max_size))
        h = random.randint(min(self.min_size, img.height), min(img.height, self.max_size))
        return crop(img, target, T.RandomCrop.get_params(img, [h, w]))


class CenterCrop:
    def __init__(self, size):
        self.size = size  # (h, w)

    def __call__(self, img, target):
        crop_h, crop_w = self.size
        top = int(round((img.height - crop_h) / 2.0))
        left = int(round((img.width - crop_w) / 2.0))
        return crop(img, target, (top, left, crop_h, crop_w))


class RandomHorizontalFlip:
    def __init__(self, p=0.5):
        self.p = p

    def __call__(self, img, target):
        if random.random() < self.p:
            return hflip(img, target)
        return img, target


class RandomResize:
    """Resize the shorter side to one of sizes, picked at random."""

    def __init__(self, sizes, max_size=None):
        self.sizes = list(sizes)
        self.max_size = max_size

    def __call__(self, img, target=None):
        return resize(img, target, random.choice(self.sizes), self.max_size)


class RandomPad:
    def __init__(self, max_pad):
        self.max_pad = max_pad

    def __call__(self, img, target):
        return pad(img, target, (random.randint(0, self.max_pad), random.randint(0, self.max_pad)))


class RandomSelect:
    """Apply transforms1 with probability p, otherwise transforms2."""

    def __init__(self, transforms1, transforms2, p=0.5):
        self.transforms1 = transforms1
        self.transforms2 = transforms2
        self.p = p

    def __call__(self, img, target):
        if random.random() < self.p:
            return self.transforms1(img, target)
        return self.transforms2(img, target)


class ToTensor:
    def __call__(self, img, target):
        return F.to_tensor(img), target


class Normalize:
    """Normalise the image tensor and turn boxes into cxcywh relative to the image size."""

    def __init__(self, mean, std):
        self.mean = mean
        self.std = std

    def __call__(self, image, target=None):
        image = F.normalize(image, mean=self.mean, std=self.std)
        if target is None:
            return image, None
        target = target.copy()
        if "boxes" in target:
            h, w = image.shape[-2:]
            scale = torch.tensor([w, h, w, h], dtype=torch.float32)
            target["boxes"] = box_xyxy_to_cxcywh(target["boxes"]) / scale
        return image, target


class Compose:
    def __init__(self, transforms):
        self.transforms = transforms

    def __call__(self, image, target):
        for t in self.transforms:
            image, target = t(image, target)
        return image, target

    def __repr__(self):
        lines = "".join(f"\n    {t}" for t in self.transforms)
        return f"{type(self).__name__}({lines}\n)"
