"""Joint image/target transforms keep boxes on the pixels they describe.

Each test paints bright rectangles on a dark image, with the rectangles as the target boxes, and
checks after the transform that every box still bounds its bright region (to about a pixel,
since resizing blurs edges) and that `size` is the image's (h, w).
"""
import random

import numpy as np
import pytest
import torch
from PIL import Image

import datasets.transforms as T
from datasets.coco import make_coco_transforms
from util.box_ops import box_cxcywh_to_xyxy

DARK, BRIGHT = 20, 250
TOL = 1.5  # px


def painted(w, h, boxes):
    """A dark w x h image with bright boxes (integer xyxy, pixel x covers [x, x+1)) and its
    target."""
    pixels = np.full((h, w, 3), DARK, dtype=np.uint8)
    for x0, y0, x1, y1 in boxes:
        pixels[y0:y1, x0:x1] = BRIGHT
    boxes_t = torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)
    target = {"boxes": boxes_t, "labels": torch.arange(1, len(boxes) + 1),
              "area": (boxes_t[:, 2] - boxes_t[:, 0]) * (boxes_t[:, 3] - boxes_t[:, 1]),
              "iscrowd": torch.zeros(len(boxes), dtype=torch.int64),
              "size": torch.tensor([h, w]), "orig_size": torch.tensor([h, w])}
    return Image.fromarray(pixels), target


def bright_extent(bright, box):
    """xyxy extent of the bright pixels inside box (grown by 2 px); None when there are none."""
    h, w = bright.shape
    x0, y0 = max(int(box[0]) - 2, 0), max(int(box[1]) - 2, 0)
    x1, y1 = min(int(np.ceil(box[2])) + 2, w), min(int(np.ceil(box[3])) + 2, h)
    rows, cols = np.nonzero(bright[y0:y1, x0:x1])
    if len(rows) == 0:
        return None
    return [x0 + cols.min(), y0 + rows.min(), x0 + cols.max() + 1, y0 + rows.max() + 1]


def bright_mask(image):
    if isinstance(image, Image.Image):
        return np.asarray(image)[..., 0] > (DARK + BRIGHT) / 2
    # normalised tensor: the mid grey maps to about 0.1 on channel 0
    mid = ((DARK + BRIGHT) / 2 / 255 - 0.485) / 0.229
    return image[0].numpy() > mid


def assert_consistent(image, target, normalized=False):
    if isinstance(image, Image.Image):
        h, w = image.height, image.width
    else:
        h, w = image.shape[-2:]
    assert target["size"].tolist() == [h, w]
    boxes = target["boxes"]
    if normalized:
        assert ((boxes >= 0) & (boxes <= 1)).all()
        boxes = box_cxcywh_to_xyxy(boxes) * torch.tensor([w, h, w, h])
    bright = bright_mask(image)
    for box in boxes.tolist():
        if min(box[2] - box[0], box[3] - box[1]) < 2:  # a sliver left by a crop may blur away
            continue
        extent = bright_extent(bright, box)
        assert extent is not None, f"box {box} covers no bright pixels"
        assert np.allclose(extent, box, atol=TOL), f"box {box} vs bright region {extent}"
    assert len(target["labels"]) == len(target["area"]) == len(target["boxes"])


def test_hflip_is_exact():
    img, target = painted(40, 30, [[3, 5, 10, 20], [25, 1, 40, 9]])
    out, t = T.hflip(img, target)
    assert t["boxes"].tolist() == [[30, 5, 37, 20], [0, 1, 15, 9]]
    assert_consistent(out, t)


@pytest.mark.parametrize("size,max_size,expected_hw", [
    (50, None, (50, 100)),   # shorter side (h) -> 50, w follows the aspect ratio
    (50, 80, (40, 80)),      # 100 would pass max_size: long side capped at 80
    (100, None, (100, 200)),  # already at size: unchanged
])
def test_resize_sizes_boxes_and_area(size, max_size, expected_hw):
    img, target = painted(200, 100, [[20, 10, 60, 50], [150, 70, 190, 95]])
    out, t = T.resize(img, target, size, max_size)
    assert (out.height, out.width) == expected_hw
    ratio = expected_hw[0] / 100
    assert torch.allclose(t["area"], target["area"] * ratio * ratio)
    assert_consistent(out, t)


def test_resize_truncates_like_upstream():
    # 7 x 3 image, shorter side -> 5: w = int(5 * 7 / 3) = 11 (not rounded to 12)
    out, t = T.resize(Image.new("RGB", (7, 3)), {"size": torch.tensor([3, 7])}, 5)
    assert (out.width, out.height) == (11, 5) and t["size"].tolist() == [5, 11]


def test_resize_without_target():
    out, t = T.resize(Image.new("RGB", (20, 10)), None, 5)
    assert t is None and out.size == (10, 5)


def test_crop_clips_and_drops_boxes():
    img, target = painted(60, 40, [[5, 5, 25, 25], [40, 10, 55, 30], [0, 35, 4, 40]])
    out, t = T.crop(img, target, (8, 10, 25, 35))  # top, left, h, w: rows 8..33, cols 10..45
    assert (out.height, out.width) == (25, 35)
    # box 1 clipped at the top/left, box 2 clipped on the right, box 3 is outside -> dropped
    assert t["boxes"].tolist() == [[0, 0, 15, 17], [30, 2, 35, 22]]
    assert t["labels"].tolist() == [1, 2]
    assert t["area"].tolist() == [15 * 17, 5 * 20]
    assert t["iscrowd"].tolist() == [0, 0]
    assert_consistent(out, t)


def test_pad_keeps_boxes_and_updates_size():
    img, target = painted(30, 20, [[2, 3, 12, 18]])
    out, t = T.pad(img, target, (7, 4))
    assert (out.width, out.height) == (37, 24)
    assert np.asarray(out)[20:, :].max() == 0 and np.asarray(out)[:, 30:].max() == 0
    assert torch.equal(t["boxes"], target["boxes"])
    assert_consistent(out, t)


def test_center_crop():
    img, target = painted(50, 40, [[20, 15, 30, 25], [0, 0, 5, 5]])
    out, t = T.CenterCrop((20, 30))(img, target)  # top = 10, left = 10
    assert t["boxes"].tolist() == [[10, 5, 20, 15]] and t["labels"].tolist() == [1]
    assert_consistent(out, t)


@pytest.mark.parametrize("make", [
    lambda: T.RandomCrop((30, 40)),
    lambda: T.RandomSizeCrop(20, 50),
    lambda: T.RandomHorizontalFlip(p=0.5),
    lambda: T.RandomResize([17, 33, 64], max_size=90),
    lambda: T.RandomPad(9),
])
def test_random_transforms_stay_consistent(make):
    random.seed(0)
    torch.manual_seed(0)
    transform = make()
    for _ in range(25):
        # boxes at least 10 px apart, so shrinking to 17 px keeps their bright regions apart
        img, target = painted(70, 50, [[5, 5, 30, 20], [40, 20, 66, 48], [8, 32, 22, 46]])
        out, t = transform(img, target)
        assert_consistent(out, t)
        # a dropped box leaves no bright pixels of its own behind
        if len(t["labels"]) < 3:
            assert isinstance(transform, (T.RandomCrop, T.RandomSizeCrop))


def test_random_size_crop_smaller_image_than_min_size():
    img, target = painted(30, 100, [[5, 5, 25, 60]])
    out, t = T.RandomSizeCrop(40, 60)(img, target)
    assert out.width == 30 and 40 <= out.height <= 60
    assert_consistent(out, t)


def test_random_select_picks_both_branches():
    def tag(name):
        return lambda img, target: (img, name)

    random.seed(0)
    picks = {T.RandomSelect(tag("a"), tag("b"), p=0.3)(None, None)[1] for _ in range(50)}
    assert picks == {"a", "b"}
    assert T.RandomSelect(tag("a"), tag("b"), p=1.0)(None, None)[1] == "a"


def test_normalize_image_and_cxcywh_boxes():
    image = torch.full((3, 10, 20), 0.5)
    target = {"boxes": torch.tensor([[2.0, 4.0, 12.0, 8.0]])}
    out, t = T.Normalize([0.5, 0.25, 0.0], [0.5, 0.25, 2.0])(image, target)
    assert torch.allclose(out[:, 0, 0], torch.tensor([0.0, 1.0, 0.25]))
    # cx = 7 / 20, cy = 6 / 10, w = 10 / 20, h = 4 / 10
    assert torch.allclose(t["boxes"], torch.tensor([[0.35, 0.6, 0.5, 0.4]]))
    assert torch.equal(target["boxes"], torch.tensor([[2.0, 4.0, 12.0, 8.0]]))  # not mutated


@pytest.mark.parametrize("seed", range(12))
def test_train_pipeline_consistent(seed):
    random.seed(seed)
    torch.manual_seed(seed)
    img, target = painted(160, 120, [[10, 10, 70, 60], [90, 30, 150, 110], [40, 70, 80, 100]])
    out, t = make_coco_transforms("train", input_scale=0.25)(img, target)
    assert out.dtype == torch.float32 and out.shape[0] == 3
    assert 1 <= len(t["boxes"])  # the crop is at least 96 px, so some box survives
    assert_consistent(out, t, normalized=True)
    assert t["orig_size"].tolist() == [120, 160]
    assert max(out.shape[-2:]) <= 333


def test_val_pipeline_sizes():
    img, target = painted(640, 480, [[100, 50, 300, 400]])
    out, t = make_coco_transforms("val", input_scale=0.25)(img, target)
    assert tuple(out.shape) == (3, 200, 266)  # shorter side 800 / 4; 200 * 640 / 480 truncated
    assert t["orig_size"].tolist() == [480, 640]
    assert_consistent(out, t, normalized=True)
    # an elongated image is capped by max_size 1333 / 4 = 333: size = round(333 * 100 / 1000)
    out, t = make_coco_transforms("val", input_scale=0.25)(*painted(1000, 100, [[0, 0, 500, 50]]))
    assert tuple(out.shape) == (3, 33, 330)
    assert_consistent(out, t, normalized=True)


def test_input_scale_shrinks_every_size():
    train = make_coco_transforms("train", input_scale=0.25)
    flip, select, _ = train.transforms
    plain, cropping = select.transforms1, select.transforms2
    assert plain.sizes == [120, 128, 136, 144, 152, 160, 168, 176, 184, 192, 200]
    assert plain.max_size == 333
    pre_resize, size_crop, post_resize = cropping.transforms
    assert pre_resize.sizes == [100, 125, 150]
    assert (size_crop.min_size, size_crop.max_size) == (96, 150)
    assert post_resize.sizes == plain.sizes and post_resize.max_size == 333

    full = make_coco_transforms("train").transforms[1].transforms1
    assert full.sizes == list(range(480, 801, 32)) and full.max_size == 1333
    assert make_coco_transforms("val", 0.5).transforms[0].sizes == [400]
    # never below one pixel
    tiny = make_coco_transforms("val", 1e-6).transforms[0]
    assert tiny.sizes == [1] and tiny.max_size == 1
