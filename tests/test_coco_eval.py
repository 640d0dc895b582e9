"""CocoEvaluator against hand-computed COCO numbers, and the cross-rank merge."""
import contextlib
import io

import numpy as np
import pytest
import torch
from pycocotools.coco import COCO

import datasets.coco_eval as coco_eval_module
from datasets.coco_eval import STAT_NAMES, CocoEvaluator


def make_gt(objects, num_images, categories=(1, 3)):
    """A COCO ground truth from (image_id, category_id, xywh box); area = box area."""
    coco = COCO()
    coco.dataset = {
        "images": [{"id": i, "file_name": f"{i}.png", "width": 200, "height": 200}
                   for i in range(1, num_images + 1)],
        "annotations": [{"id": k + 1, "image_id": img, "category_id": cat, "bbox": list(box),
                         "area": box[2] * box[3], "iscrowd": 0}
                        for k, (img, cat, box) in enumerate(objects)],
        "categories": [{"id": c, "name": str(c)} for c in categories],
    }
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def prediction(boxes, scores, labels):
    return {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            "scores": torch.tensor(scores, dtype=torch.float32),
            "labels": torch.tensor(labels, dtype=torch.int64)}


def run(gt, batches):
    evaluator = CocoEvaluator(gt, ("bbox",))
    for batch in batches:
        evaluator.update(batch)
    evaluator.synchronize_between_processes()
    with contextlib.redirect_stdout(io.StringIO()):
        evaluator.accumulate()
    return evaluator


def xyxy(box):
    x, y, w, h = box
    return [x, y, x + w, y + h]


def test_perfect_predictions(capsys):
    # One object per (image, category), so even AR@1 is 1. No medium object: APm = ARm = -1.
    objects = [(1, 1, (10, 10, 10, 10)), (1, 3, (50, 50, 100, 100)),
               (2, 1, (0, 0, 120, 90)), (3, 3, (150, 20, 20, 25))]
    gt = make_gt(objects, num_images=3)
    preds = {}
    for img, cat, box in objects:
        p = preds.setdefault(img, {"boxes": [], "scores": [], "labels": []})
        p["boxes"].append(xyxy(box))
        p["scores"].append(0.9)
        p["labels"].append(cat)
    evaluator = run(gt, [{img: prediction(**p) for img, p in preds.items()}])
    evaluator.summarize()
    out = capsys.readouterr().out
    assert out.startswith("IoU metric: bbox") and out.count("Average") == 12
    assert evaluator.stats() == pytest.approx([1, 1, 1, 1, -1, 1, 1, 1, 1, 1, -1, 1])
    assert len(STAT_NAMES) == 12


def test_iou_between_thresholds():
    # GT 100x100 (large), prediction 72x100 inside it: IoU = 7200 / 10000 = 0.72. It matches
    # at IoU thresholds 0.50, 0.55, 0.60, 0.65, 0.70 (precision = recall = 1 there) and is a
    # false positive at 0.75 .. 0.95 (precision = recall = 0): AP = AR = 5 / 10.
    gt = make_gt([(1, 1, (0, 0, 100, 100))], num_images=1)
    evaluator = run(gt, [{1: prediction([[0, 0, 72, 100]], [0.8], [1])}])
    stats = dict(zip(STAT_NAMES, evaluator.stats()))
    assert stats["AP"] == pytest.approx(0.5)
    assert stats["AP50"] == pytest.approx(1) and stats["AP75"] == 0
    assert stats["APs"] == stats["APm"] == -1 and stats["APl"] == pytest.approx(0.5)
    assert stats["AR1"] == stats["AR10"] == stats["AR100"] == pytest.approx(0.5)
    assert stats["ARs"] == stats["ARm"] == -1 and stats["ARl"] == pytest.approx(0.5)


def test_false_positive_ranked_between_true_positives():
    # Three 40x40 (medium) GTs; detections by score: TP (0.9), FP (0.8), TP (0.7); the third
    # GT is missed. Precision by rank 1, 1/2, 2/3 at recall 1/3, 1/3, 2/3; made non-increasing
    # from the right: 1, 2/3, 2/3. Sampled at the 101 recall points r = 0, .01, .., 1: r <= .33
    # (34 points) -> 1, .34 <= r <= .66 (33 points) -> 2/3, r >= .67 (34 points) -> 0, so
    # AP = (34 + 33 * 2/3) / 101 = 56 / 101 at every IoU threshold (the TPs are exact).
    # AR@100 = AR@10 = 2/3; AR@1 keeps only the top detection (a TP): 1/3.
    gts = [(0, 0, 40, 40), (60, 0, 40, 40), (120, 0, 40, 40)]
    gt = make_gt([(1, 1, box) for box in gts], num_images=1)
    dets = prediction([xyxy(gts[0]), [0, 100, 40, 140], xyxy(gts[1])], [0.9, 0.8, 0.7], [1, 1, 1])
    stats = dict(zip(STAT_NAMES, run(gt, [{1: dets}]).stats()))
    for name in ("AP", "AP50", "AP75", "APm"):
        assert stats[name] == pytest.approx(56 / 101)
    assert stats["APs"] == stats["APl"] == -1
    assert stats["AR1"] == pytest.approx(1 / 3)
    assert stats["AR10"] == stats["AR100"] == stats["ARm"] == pytest.approx(2 / 3)


def test_images_without_detections_count_as_misses():
    gt = make_gt([(1, 1, (0, 0, 100, 100)), (2, 3, (10, 10, 20, 20))], num_images=2)
    empty = prediction([], [], [])
    stats = dict(zip(STAT_NAMES, run(gt, [{1: empty}, {2: empty}]).stats()))
    assert stats["AP"] == stats["AR100"] == stats["APl"] == stats["APs"] == 0
    assert stats["APm"] == stats["ARm"] == -1


def random_case(seed):
    """Four images of random GTs and noisy predictions (jittered GTs plus false positives)."""
    rng = np.random.default_rng(seed)
    objects, preds = [], {}
    for img in range(1, 5):
        own = []
        for _ in range(rng.integers(1, 4)):
            box = (*rng.uniform(0, 100, 2), *rng.uniform(5, 90, 2))
            own.append((img, int(rng.choice([1, 3])), box))
        objects += own
        boxes = [np.array(xyxy(box)) + rng.normal(0, 3, 4) for _, _, box in own]
        boxes += [np.array(xyxy((*rng.uniform(0, 100, 2), *rng.uniform(5, 90, 2))))
                  for _ in range(2)]
        labels = [cat for _, cat, _ in own] + [int(rng.choice([1, 3])) for _ in range(2)]
        preds[img] = prediction(np.array(boxes), rng.uniform(0, 1, len(boxes)), labels)
    return make_gt(objects, num_images=4), preds


def test_merge_across_ranks_matches_single_evaluator(monkeypatch):
    gt, preds = random_case(seed=0)
    single = run(gt, [{1: preds[1], 2: preds[2]}, {3: preds[3], 4: preds[4]}]).stats()
    rank0_alone = run(gt, [{1: preds[1], 2: preds[2]}, {3: preds[3]}]).stats()
    assert not np.allclose(single, rank0_alone)  # rank 1's images matter

    # Two ranks as a DistributedSampler would split 4 images with padding: image 3 on both.
    rank0, rank1 = CocoEvaluator(gt), CocoEvaluator(gt)
    rank0.update({1: preds[1], 2: preds[2]})
    rank0.update({3: preds[3]})
    rank1.update({3: preds[3]})
    rank1.update({4: preds[4]})
    from_rank1 = iter([rank1.img_ids, np.concatenate(rank1.eval_imgs["bbox"], axis=2)])
    monkeypatch.setattr(coco_eval_module, "all_gather", lambda obj: [obj, next(from_rank1)])
    rank0.synchronize_between_processes()
    with contextlib.redirect_stdout(io.StringIO()):
        rank0.accumulate()

    coco_eval = rank0.coco_eval["bbox"]
    assert coco_eval.params.imgIds == [1, 2, 3, 4]
    assert len(coco_eval.evalImgs) == 2 * 4 * 4  # categories x area ranges x unique images
    assert rank0.stats() == pytest.approx(single, abs=1e-12)


def test_merge_keeps_first_copy_in_id_order():
    ids, merged = coco_eval_module.merge(
        [[5, 2], [2, 9]],
        [np.array([[["a5", "a2"]]], dtype=object), np.array([[["b2", "b9"]]], dtype=object)])
    assert ids == [2, 5, 9]
    assert merged.tolist() == [[["a2", "a5", "b9"]]]


def test_only_bbox_is_supported():
    with pytest.raises(ValueError, match="segm"):
        CocoEvaluator(make_gt([], num_images=1), ("bbox", "segm"))
