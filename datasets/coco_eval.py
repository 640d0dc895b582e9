"""COCO box evaluation that works batch by batch and across processes.

Each batch of predictions is matched against the ground truth right away (per-image COCOeval
results, kept as a [categories, area ranges, images] array); at the end the arrays of all
ranks are merged and pycocotools accumulates and summarizes them once.
"""
import contextlib
import copy
import io

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from util.misc import all_gather

STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl",
              "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")


class CocoEvaluator:
    def __init__(self, coco_gt, iou_types=("bbox",)):
        unsupported = [t for t in iou_types if t != "bbox"]
        if unsupported:
            raise ValueError(f"unsupported iou types {unsupported}; only 'bbox' is implemented")
        self.coco_gt = copy.deepcopy(coco_gt)
        self.iou_types = tuple(iou_types)
        self.coco_eval = {t: COCOeval(self.coco_gt, iouType=t) for t in self.iou_types}
        self.img_ids = []
        self.eval_imgs = {t: [] for t in self.iou_types}

    def update(self, predictions):
        """predictions: {image_id: {'boxes': [N,4] absolute xyxy, 'scores': [N], 'labels': [N]}}."""
        img_ids = sorted({int(i) for i in predictions})
        self.img_ids.extend(img_ids)
        coco_dt = load_results(self.coco_gt, to_coco_results(predictions))
        for t, coco_eval in self.coco_eval.items():
            coco_eval.cocoDt = coco_dt
            coco_eval.params.imgIds = img_ids
            self.eval_imgs[t].append(evaluate(coco_eval))

    def synchronize_between_processes(self):
        for t, coco_eval in self.coco_eval.items():
            if self.eval_imgs[t]:
                local = np.concatenate(self.eval_imgs[t], axis=2)
            else:  # this rank saw no images
                local = np.empty((len(coco_eval.params.catIds), len(coco_eval.params.areaRng), 0),
                                 dtype=object)
            img_ids, eval_imgs = merge(all_gather(self.img_ids), all_gather(local))
            set_eval_imgs(coco_eval, img_ids, eval_imgs)

    def accumulate(self):
        for coco_eval in self.coco_eval.values():
            coco_eval.accumulate()

    def summarize(self):
        for t, coco_eval in self.coco_eval.items():
            print(f"IoU metric: {t}")
            coco_eval.summarize()

    def stats(self, iou_type="bbox"):
        """The 12 summary numbers (see STAT_NAMES) as floats; -1 where there is no ground truth.
        Needs accumulate(); summarizes silently if summarize() was not called."""
        coco_eval = self.coco_eval[iou_type]
        if len(coco_eval.stats) == 0:
            with contextlib.redirect_stdout(io.StringIO()):
                coco_eval.summarize()
        return [float(s) for s in coco_eval.stats]


def to_coco_results(predictions):
    """Flatten per-image predictions into COCO result dicts with xywh boxes."""
    results = []
    for image_id, pred in predictions.items():
        boxes, scores, labels = (pred[k].tolist() for k in ("boxes", "scores", "labels"))
        for (x0, y0, x1, y1), score, label in zip(boxes, scores, labels):
            results.append({"image_id": int(image_id), "category_id": int(label),
                            "bbox": [x0, y0, x1 - x0, y1 - y0], "score": score})
    return results


def load_results(coco_gt, results):
    if not results:  # loadRes cannot take an empty list
        return COCO()
    with contextlib.redirect_stdout(io.StringIO()):
        return coco_gt.loadRes(results)


def evaluate(coco_eval):
    """COCOeval.evaluate without its prints; returns the per-image results as an object array
    [categories, area ranges, images] (entries are dicts, or None where an image has neither
    ground truth nor detections of that category)."""
    p = coco_eval.params
    p.imgIds = list(np.unique(p.imgIds))
    if p.useCats:
        p.catIds = list(np.unique(p.catIds))
    p.maxDets = sorted(p.maxDets)
    coco_eval._prepare()
    cat_ids = p.catIds if p.useCats else [-1]
    coco_eval.ious = {(img_id, cat_id): coco_eval.computeIoU(img_id, cat_id)
                      for img_id in p.imgIds for cat_id in cat_ids}
    max_det = p.maxDets[-1]
    per_image = [coco_eval.evaluateImg(img_id, cat_id, area_rng, max_det)
                 for cat_id in cat_ids for area_rng in p.areaRng for img_id in p.imgIds]
    eval_imgs = np.empty(len(per_image), dtype=object)
    eval_imgs[:] = per_image
    return eval_imgs.reshape(len(cat_ids), len(p.areaRng), len(p.imgIds))


def merge(img_ids_per_rank, eval_imgs_per_rank):
    """Concatenate the ranks' image ids and per-image results, keeping each image once (the
    DistributedSampler pads the last batch with repeats), in sorted image-id order."""
    img_ids = np.concatenate([np.asarray(ids, dtype=np.int64) for ids in img_ids_per_rank])
    eval_imgs = np.concatenate(eval_imgs_per_rank, axis=2)
    img_ids, first = np.unique(img_ids, return_index=True)
    return img_ids.tolist(), eval_imgs[..., first]


def set_eval_imgs(coco_eval, img_ids, eval_imgs):
    """Install merged per-image results so that COCOeval.accumulate() can run on them."""
    coco_eval.evalImgs = list(eval_imgs.flatten())
    coco_eval.params.imgIds = img_ids
    coco_eval._paramsEval = copy.deepcopy(coco_eval.params)
