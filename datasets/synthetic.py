"""A small synthetic detection dataset written in the exact COCO layout, for tests and CPU demos.

Each image has a textured, cluttered background (smooth colour noise, thin random lines, pixel
noise; none of it annotated; `clutter` scales all three) and 1..max_objects shapes of these
classes:

    id  name        id  name
    1   rectangle   7   ring       (ellipse outline)
    2   ellipse     9   frame      (rectangle outline)
    4   triangle    11  diamond
    5   cross       13  star

num_classes has the meaning of the training flag of the same name, largest id + 1, and the
dataset uses every class with a smaller id: the default 10 gives ids 1, 2, 4, 5, 7, 9; 14 gives
all 8. Ids have holes like COCO's, so only largest-id + 1 values (2, 3, 5, 6, 8, 10, 12, 14)
are accepted, and the same number is then passed to main.py --num_classes.
Colours are drawn independently of the class, so only the shape tells classes apart.

Sizes: COCO's area ranges are absolute (small < 32^2 <= medium < 96^2 <= large px), so at
128-320 px most naturally sized objects would be small. Each object instead picks a range
(small 40 %, medium 40 %, large 20 % by default, see size_weights; among those that fit in the
image: large needs an image of at least 107 px) and a log-uniform box area inside it, with aspect ratio 0.6..1.67.

Occlusion: objects are drawn largest first, so smaller ones partly cover larger ones. The box is
the full (amodal) extent of the shape's pixels even when part of it is covered; a placement that
would leave any earlier object less than 30 % visible is rejected and redrawn elsewhere (and
the object dropped after 20 tries), so every annotated object stays recognisable.

Annotations: bbox = pixel extent of the shape in xywh, area = bbox area (the same measure
pycocotools gives detections, so area ranges treat both alike), segmentation = the shape's
outer polygon, iscrowd = 0, plus a non-standard visible_fraction (share of the shape's pixels
left uncovered; pycocotools ignores it). Images are square PNGs (exact pixels). Everything
depends only on the seed and the image's index, so output is byte-identical for a seed and
adding images keeps the earlier ones unchanged.
"""
import json
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

CATEGORIES = [(1, "rectangle"), (2, "ellipse"), (4, "triangle"), (5, "cross"), (7, "ring"),
              (9, "frame"), (11, "diamond"), (13, "star")]
COCO_SMALL, COCO_LARGE = 32 ** 2, 96 ** 2
MIN_SIDE = 8
MIN_VISIBLE = 0.3
PLACEMENT_TRIES = 20
SIZE_RANGE_WEIGHTS = (0.4, 0.4, 0.2)  # small, medium, large


def _ellipse(n=48):
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    return np.stack([np.cos(t), np.sin(t)], axis=1)


def _star(points=5, inner=0.45):
    t = np.linspace(0, 2 * np.pi, 2 * points, endpoint=False) - np.pi / 2
    r = np.where(np.arange(2 * points) % 2 == 0, 1.0, inner)
    return np.stack([r * np.cos(t), r * np.sin(t)], axis=1)


def _inset(outline, fraction):
    """The outline shrunk towards its centre, for the hole of an outlined shape."""
    centre = (outline.min(0) + outline.max(0)) / 2
    return centre + (outline - centre) * (1 - fraction)


def _shape_polygons(name, rng):
    """(outer polygon, hole polygon or None) of a shape, in any coordinates (fitted to the box
    later)."""
    square = np.array([[0, 0], [1, 0], [1, 1], [0, 1]], dtype=np.float64)
    if name == "rectangle":
        return square, None
    if name == "frame":
        return square, _inset(square, rng.uniform(0.3, 0.5))
    if name == "ellipse":
        return _ellipse(), None
    if name == "ring":
        return _ellipse(), _inset(_ellipse(), rng.uniform(0.3, 0.5))
    if name == "triangle":
        apex = rng.uniform(0.2, 0.8)
        triangle = np.array([[0, 1], [1, 1], [apex, 0]])
        return (triangle if rng.random() < 0.5 else triangle * [1, -1]), None
    if name == "cross":
        a, b = 1 / 3, 2 / 3
        return np.array([[a, 0], [b, 0], [b, a], [1, a], [1, b], [b, b], [b, 1], [a, 1],
                         [a, b], [0, b], [0, a], [a, a]]), None
    if name == "diamond":
        return np.array([[0.5, 0], [1, 0.5], [0.5, 1], [0, 0.5]]), None
    if name == "star":
        return _star(), None
    raise ValueError(f"unknown shape {name!r}")



def _rasterize(outer, hole, w, h):
    """Boolean [h, w] mask of the polygon outer (minus hole) fitted to a w x h box, and the
    fitted outer polygon."""
    lo, hi = outer.min(0), outer.max(0)
    scale = np.array([w, h]) / (hi - lo)

    def fit(poly):
        return (poly - lo) * scale

    canvas = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(canvas)
    # PIL puts integer coordinates on pixel centres; shift so pixel i spans [i, i + 1).
    draw.polygon([tuple(p) for p in fit(outer) - 0.5], fill=255)
    if hole is not None:
        draw.polygon([tuple(p) for p in fit(hole) - 0.5], fill=0)
    return np.asarray(canvas) > 0, fit(outer)


def _sample_box_size(rng, image_size, size_weights=SIZE_RANGE_WEIGHTS):
    """(w, h) of a box whose area falls in a COCO area range chosen at random."""
    max_side = image_size - 2
    ranges = [(12 ** 2, COCO_SMALL), (COCO_SMALL, COCO_LARGE),
              (COCO_LARGE, (0.9 * image_size) ** 2)]
    feasible = [i for i, (lo, hi) in enumerate(ranges) if lo < hi]
    weights = np.array([size_weights[i] for i in feasible])
    if not weights.sum():
        raise ValueError(f"size_weights {size_weights} weigh only size ranges that do not fit in a "
                         f"{image_size} px image (large needs at least 107 px)")
    lo, hi = ranges[feasible[rng.choice(len(feasible), p=weights / weights.sum())]]
    area = math.exp(rng.uniform(math.log(lo), math.log(hi)))
    aspect = math.exp(rng.uniform(math.log(0.6), math.log(1 / 0.6)))
    w = min(max(round(math.sqrt(area * aspect)), MIN_SIDE), max_side)
    h = min(max(round(math.sqrt(area / aspect)), MIN_SIDE), max_side)
    return w, h


def _background(rng, size, clutter=1.0):
    """Smooth colour texture plus thin random lines; float [size, size, 3]. clutter scales the
    texture's amplitude and the number of lines."""
    base = rng.uniform(40, 215, size=3)
    grid = max(2, size // 16)
    texture = clutter * rng.uniform(-40, 40, size=(grid, grid, 3)).astype(np.float32)
    texture = np.stack([np.asarray(Image.fromarray(texture[..., c])
                                   .resize((size, size), Image.Resampling.BILINEAR)) for c in range(3)], -1)
    image = Image.fromarray(np.clip(base + texture, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(round(clutter * rng.integers(2, 9))):
        x0, y0, x1, y1 = rng.uniform(0, size, size=4)
        draw.line([(x0, y0), (x1, y1)], fill=tuple(int(c) for c in rng.integers(0, 256, 3)),
                  width=1)
    return np.asarray(image, dtype=np.float32), base


def _object_colour(rng, background):
    """A random colour that stands out from the background's base colour."""
    for _ in range(20):
        colour = rng.uniform(0, 255, size=3)
        if np.linalg.norm(colour - background) > 100:
            break
    return colour


def render_image(rng, image_size, categories, max_objects, size_weights=SIZE_RANGE_WEIGHTS,
                 clutter=1.0):
    """One image (uint8 [S, S, 3]) and its objects as dicts with category_id, bbox (xywh),
    polygon (flat list) and visible (fraction of the shape's pixels left uncovered)."""
    image, background = _background(rng, image_size, clutter)
    num_objects = int(rng.integers(1, max_objects + 1))
    specs = [(categories[rng.integers(len(categories))], _sample_box_size(rng, image_size, size_weights))
             for _ in range(num_objects)]
    specs.sort(key=lambda spec: -spec[1][0] * spec[1][1])  # largest first: small ones on top

    owner = np.full((image_size, image_size), -1, dtype=np.int64)  # object index per pixel
    objects, pixel_counts, visible_counts = [], [], []
    for (cat_id, name), (w, h) in specs:
        outer, hole = _shape_polygons(name, rng)
        mask, polygon = _rasterize(outer, hole, w, h)
        for _ in range(PLACEMENT_TRIES):
            x = int(rng.integers(0, image_size - w + 1))
            y = int(rng.integers(0, image_size - h + 1))
            covered = owner[y:y + h, x:x + w][mask]
            lost = np.bincount(covered[covered >= 0], minlength=len(objects))
            if all(v - gone >= MIN_VISIBLE * n for v, gone, n in zip(visible_counts, lost, pixel_counts)):
                break
        else:
            continue
        visible_counts = [int(v - gone) for v, gone in zip(visible_counts, lost)]
        owner[y:y + h, x:x + w][mask] = len(objects)
        image[y:y + h, x:x + w][mask] = _object_colour(rng, background)
        pixel_counts.append(int(mask.sum()))
        visible_counts.append(pixel_counts[-1])
        rows, cols = np.nonzero(mask)
        objects.append({
            "category_id": cat_id,
            "bbox": [float(x + cols.min()), float(y + rows.min()),
                     float(cols.max() - cols.min() + 1), float(rows.max() - rows.min() + 1)],
            "polygon": [round(float(v), 2) for v in (polygon + [x, y]).ravel()],
        })
    for obj, visible, total in zip(objects, visible_counts, pixel_counts):
        obj["visible"] = visible / total

    image = image + clutter * rng.normal(0, 4, size=image.shape)  # sensor noise over everything
    return np.clip(np.round(image), 0, 255).astype(np.uint8), objects


def _write_split(out_dir, split, split_code, num_images, image_size, seed, categories, max_objects,
                 size_weights, clutter):
    image_dir = out_dir / f"{split}2017"
    image_dir.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for index in range(num_images):
        rng = np.random.default_rng([seed, split_code, index])
        pixels, objects = render_image(rng, image_size, categories, max_objects, size_weights, clutter)
        image_id = index + 1
        file_name = f"{image_id:012d}.png"
        # noisy pixels barely compress: the fastest zlib level saves most of the time
        Image.fromarray(pixels).save(image_dir / file_name, compress_level=1)
        images.append({"id": image_id, "file_name": file_name,
                       "width": image_size, "height": image_size})
        for obj in objects:
            x, y, w, h = obj["bbox"]
            annotations.append({"id": len(annotations) + 1, "image_id": image_id,
                                "category_id": obj["category_id"], "bbox": [x, y, w, h],
                                "area": w * h, "iscrowd": 0, "segmentation": [obj["polygon"]],
                                "visible_fraction": round(obj["visible"], 3)})
    data = {
        "info": {"description": "dap-detr synthetic shapes", "version": "1.0"},
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": [{"id": cid, "name": name, "supercategory": "shape"}
                       for cid, name in categories],
    }
    ann_file = out_dir / "annotations" / f"instances_{split}2017.json"
    ann_file.parent.mkdir(parents=True, exist_ok=True)
    ann_file.write_text(json.dumps(data, separators=(",", ":")))
    return images, annotations


def make_synthetic_coco(out_dir, num_train=200, num_val=50, image_size=128, seed=0,
                        num_classes=10, max_objects=6, size_weights=SIZE_RANGE_WEIGHTS, clutter=1.0):
    """Write out_dir/{train2017,val2017}/*.png and out_dir/annotations/instances_*.json.

    num_classes: largest category id + 1, as for training (see the module docstring).
    size_weights: relative frequency of the small, medium and large area ranges.
    clutter: scale of the background texture, the number of random lines and the pixel noise
    (0 = a plain background). Returns a summary dict (num_classes, categories, and per split
    image/object/area-range counts)."""
    valid = [cid + 1 for cid, _ in CATEGORIES]
    if num_classes not in valid:
        raise ValueError(f"num_classes must be a category id + 1, one of {valid}; "
                         f"got {num_classes}")
    if image_size < MIN_SIDE + 2:
        raise ValueError(f"image_size must be at least {MIN_SIDE + 2}, got {image_size}")
    if max_objects < 1:
        raise ValueError(f"max_objects must be at least 1, got {max_objects}")
    if len(size_weights) != 3 or min(size_weights) < 0 or sum(size_weights) <= 0:
        raise ValueError(f"size_weights must be 3 non-negative weights (small, medium, large) "
                         f"with a positive sum, got {size_weights}")
    if clutter < 0:
        raise ValueError(f"clutter must be non-negative, got {clutter}")
    out_dir = Path(out_dir)
    categories = [(cid, name) for cid, name in CATEGORIES if cid < num_classes]
    summary = {"out_dir": str(out_dir), "num_classes": num_classes,
               "categories": {cid: name for cid, name in categories}}
    for split_code, (split, count) in enumerate([("train", num_train), ("val", num_val)]):
        images, annotations = _write_split(out_dir, split, split_code, count, image_size, seed,
                                           categories, max_objects, size_weights, clutter)
        areas = np.array([a["area"] for a in annotations])
        summary[split] = {
            "images": len(images),
            "objects": len(annotations),
            "small": int((areas < COCO_SMALL).sum()),
            "medium": int(((areas >= COCO_SMALL) & (areas < COCO_LARGE)).sum()),
            "large": int((areas >= COCO_LARGE).sum()),
            "occluded": sum(a["visible_fraction"] < 1 for a in annotations),
        }
    return summary
