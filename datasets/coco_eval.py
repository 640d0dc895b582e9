"""COCO box evaluation across processes, by a choice of evaluation backends.

Each process collects its detections as the batches come (`update`); `synchronize_between_processes`
gathers them, each image once; rank 0 evaluates the whole set in one pass (load results ->
evaluate -> accumulate) and sends the 12 summary numbers to the other ranks. Evaluating the
epoch's detections in one pass is what every fast backend supports exactly; it also gives the same
numbers however the images were split across processes, since COCO sorts detections by score
(stably, in image-id order) before accumulating.

Backends (`--eval_backend`), all giving pycocotools' numbers bit for bit (tests/test_coco_eval.py):
    pycocotools            the reference implementation (Python/NumPy, slow: ~50 s on COCO val);
    hotcoco                MIT, Rust; a requirement of this project;
    ultrafast-pycocotools  BSD-2, Rust, pycocotools' API; used when installed.
`auto` (the default) takes the fastest installed, in the order measured by benchmarks/coco_eval.py.
"""
import contextlib
import copy
import importlib.util
import io

import numpy as np
import torch.distributed as dist

from util.errors import UserInputError
from util.misc import all_gather, get_rank, is_dist_avail_and_initialized

STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl",
              "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")

# fastest first: what 'auto' picks from (docs/RESULTS.md, "COCO evaluation")
BACKENDS = ("hotcoco", "ultrafast-pycocotools", "pycocotools")
_MODULES = {"hotcoco": "hotcoco", "ultrafast-pycocotools": "ultrafast_pycocotools", "pycocotools": "pycocotools"}


def installed_backends():
    return [name for name in BACKENDS if importlib.util.find_spec(_MODULES[name]) is not None]


def resolve_backend(name="auto"):
    """The backend to use for `name` ('auto' or one of BACKENDS); refuses one that is not installed."""
    installed = installed_backends()
    if name == "auto":
        if not installed:
            raise UserInputError("no COCO evaluation backend is installed; pip install hotcoco (or pycocotools)")
        return installed[0]
    if name not in BACKENDS:
        raise UserInputError(f"--eval_backend {name!r} is not one of auto, {', '.join(BACKENDS)}")
    if name not in installed:
        raise UserInputError(f"--eval_backend {name} is not installed; pip install {name}, or choose one of: "
                             f"auto, {', '.join(installed)}")
    return name


class CocoEvaluator:
    """Upstream DETR's interface: update() per batch, then synchronize_between_processes(),
    accumulate(), summarize(); coco_eval['bbox'].stats holds the 12 numbers (STAT_NAMES) on every
    rank, and on rank 0 coco_eval['bbox'] is the backend's COCOeval (its .eval holds the
    precision, recall and scores arrays)."""

    def __init__(self, coco_gt, iou_types=("bbox",), backend="auto"):
        unsupported = [t for t in iou_types if t != "bbox"]
        if unsupported:
            raise ValueError(f"unsupported iou types {unsupported}; only 'bbox' is implemented")
        self.coco_gt = coco_gt
        self.iou_types = tuple(iou_types)
        self.backend = resolve_backend(backend)
        self.coco_eval = {}  # filled by accumulate()
        self.img_ids = []  # the images seen, each once, in the order they came
        self._seen = set()
        self._detections = []  # per image: [n, 7] rows of (image id, x, y, w, h, score, category)
        self._summary = ""

    def update(self, predictions):
        """predictions: {image_id: {'boxes': [N,4] absolute xyxy, 'scores': [N], 'labels': [N]}}.
        An image seen before (a DistributedSampler pads with repeats) keeps its first predictions."""
        for image_id, pred in predictions.items():
            image_id = int(image_id)
            if image_id in self._seen:
                continue
            self._seen.add(image_id)
            self.img_ids.append(image_id)
            self._detections.append(detection_rows(image_id, pred))

    def synchronize_between_processes(self):
        """Gather every rank's images and detections; each image keeps the detections of the first
        rank (in rank order) that saw it."""
        local = (self.img_ids, np.concatenate(self._detections) if self._detections else np.zeros((0, 7)))
        img_ids, detections = [], []
        for rank_img_ids, rank_detections in all_gather(local):
            known = set(img_ids)
            new = [i for i in rank_img_ids if i not in known]
            img_ids.extend(new)
            detections.append(rank_detections[np.isin(rank_detections[:, 0], new)])
        self.img_ids, self._seen = img_ids, set(img_ids)
        self._detections = [np.concatenate(detections)]

    def accumulate(self):
        """Evaluate on rank 0; the other ranks receive the 12 numbers."""
        stats = None
        if get_rank() == 0:
            detections = np.concatenate(self._detections) if self._detections else np.zeros((0, 7))
            coco_eval = evaluate_detections(self.coco_gt, detections, sorted(self.img_ids), self.backend)
            printed = io.StringIO()
            with contextlib.redirect_stdout(printed):
                coco_eval.summarize()
            self._summary = printed.getvalue()
            stats = np.asarray(coco_eval.stats, dtype=np.float64)
            self.coco_eval["bbox"] = coco_eval
        if is_dist_avail_and_initialized():
            shared = [stats]
            dist.broadcast_object_list(shared, src=0)
            stats = shared[0]
        if get_rank() != 0:
            self.coco_eval["bbox"] = RankSummary(stats)

    def summarize(self):
        print("IoU metric: bbox")
        print(self._summary, end="")

    def stats(self, iou_type="bbox"):
        """The 12 summary numbers (see STAT_NAMES) as floats; -1 where there is no ground truth."""
        return [float(s) for s in self.coco_eval[iou_type].stats]


class RankSummary:
    """What ranks other than 0 hold in coco_eval['bbox']: the 12 numbers rank 0 computed."""

    def __init__(self, stats):
        self.stats = np.asarray(stats, dtype=np.float64)
        self.eval = None


def detection_rows(image_id, pred):
    """One image's predictions as [N, 7] float64 rows (image id, x, y, w, h, score, category);
    the width and height are taken in float64, as pycocotools does with Python floats."""
    boxes = pred["boxes"].detach().cpu().double().numpy().reshape(-1, 4)
    rows = np.empty((len(boxes), 7))
    rows[:, 0] = image_id
    rows[:, 1:3] = boxes[:, :2]
    rows[:, 3:5] = boxes[:, 2:] - boxes[:, :2]
    rows[:, 5] = pred["scores"].detach().cpu().double().numpy()
    rows[:, 6] = pred["labels"].detach().cpu().numpy()
    return rows


def evaluate_detections(coco_gt, detections, img_ids, backend):
    """Run `backend` on a pycocotools COCO ground truth and [N, 7] detection rows over the images
    img_ids; returns the backend's COCOeval after evaluate() and accumulate()."""
    # COCO evaluates each ground-truth category on its own, so a detection of a category the
    # ground truth lacks (a detector's head has a logit for every id below --num_classes) is
    # never looked at; dropped here, as hotcoco would warn about each one.
    categories = [category["id"] for category in coco_gt.dataset["categories"]]
    detections = detections[np.isin(detections[:, 6], categories)]
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools narrates every step
        if backend == "hotcoco":
            import hotcoco

            gt = hotcoco.COCO(coco_gt.dataset)
            coco_eval = hotcoco.COCOeval(gt, gt.load_res(detections), "bbox")
        else:
            if backend == "pycocotools":
                from pycocotools.coco import COCO
                from pycocotools.cocoeval import COCOeval
            else:
                from ultrafast_pycocotools.coco import COCO
                from ultrafast_pycocotools.cocoeval import COCOeval
            gt = COCO()
            gt.dataset = copy.deepcopy(coco_gt.dataset)  # COCOeval marks the ground truth's boxes
            gt.createIndex()
            # loadRes cannot take an empty array; an empty COCO is a result set without detections
            coco_eval = COCOeval(gt, gt.loadRes(detections) if len(detections) else COCO(), "bbox")
        coco_eval.params.imgIds = list(img_ids)
        coco_eval.evaluate()
        coco_eval.accumulate()
    return coco_eval
