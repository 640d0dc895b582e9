"""CocoEvaluator: every backend against hand-computed COCO numbers and bit for bit against
pycocotools run directly; the gathering of detections across ranks (simulated, and 2 gloo
processes); the choice of backend."""
import contextlib
import copy
import importlib.util
import io
import multiprocessing
import os

import numpy as np
import pytest
import torch
import torch.distributed as dist
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

import datasets.coco_eval as coco_eval_module
import main as detr_main
from benchmarks.coco_eval import as_predictions, synthetic_coco
from datasets.coco_eval import BACKENDS, STAT_NAMES, CocoEvaluator, resolve_backend
from util.errors import UserInputError

from conftest import parse

INSTALLED = [b for b in BACKENDS if importlib.util.find_spec(coco_eval_module._MODULES[b]) is not None]


@pytest.fixture(params=BACKENDS)
def backend(request):
    if request.param not in INSTALLED:
        pytest.skip(f"{request.param} is not installed")
    return request.param


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


def run(gt, batches, backend="pycocotools"):
    """The evaluator on these batches, checked bit for bit against pycocotools run directly on
    the same predictions (each image's first)."""
    evaluator = CocoEvaluator(gt, ("bbox",), backend=backend)
    for batch in batches:
        evaluator.update(batch)
    evaluator.synchronize_between_processes()
    with contextlib.redirect_stdout(io.StringIO()):
        evaluator.accumulate()
    first = {}
    for batch in batches:
        for image_id, pred in batch.items():
            first.setdefault(image_id, pred)
    assert_same_as(evaluator.coco_eval["bbox"], pycocotools_directly(gt.dataset, first))
    return evaluator


def xyxy(box):
    x, y, w, h = box
    return [x, y, x + w, y + h]


def test_perfect_predictions(capsys, backend):
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
    evaluator = run(gt, [{img: prediction(**p) for img, p in preds.items()}], backend)
    evaluator.summarize()
    out = capsys.readouterr().out
    assert out.startswith("IoU metric: bbox") and out.count("Average") == 12
    assert evaluator.stats() == pytest.approx([1, 1, 1, 1, -1, 1, 1, 1, 1, 1, -1, 1])
    assert len(STAT_NAMES) == 12


def test_iou_between_thresholds(backend):
    # GT 100x100 (large), prediction 72x100 inside it: IoU = 7200 / 10000 = 0.72. It matches
    # at IoU thresholds 0.50, 0.55, 0.60, 0.65, 0.70 (precision = recall = 1 there) and is a
    # false positive at 0.75 .. 0.95 (precision = recall = 0): AP = AR = 5 / 10.
    gt = make_gt([(1, 1, (0, 0, 100, 100))], num_images=1)
    evaluator = run(gt, [{1: prediction([[0, 0, 72, 100]], [0.8], [1])}], backend)
    stats = dict(zip(STAT_NAMES, evaluator.stats()))
    assert stats["AP"] == pytest.approx(0.5)
    assert stats["AP50"] == pytest.approx(1) and stats["AP75"] == 0
    assert stats["APs"] == stats["APm"] == -1 and stats["APl"] == pytest.approx(0.5)
    assert stats["AR1"] == stats["AR10"] == stats["AR100"] == pytest.approx(0.5)
    assert stats["ARs"] == stats["ARm"] == -1 and stats["ARl"] == pytest.approx(0.5)


def test_false_positive_ranked_between_true_positives(backend):
    # Three 40x40 (medium) GTs; detections by score: TP (0.9), FP (0.8), TP (0.7); the third
    # GT is missed. Precision by rank 1, 1/2, 2/3 at recall 1/3, 1/3, 2/3; made non-increasing
    # from the right: 1, 2/3, 2/3. Sampled at the 101 recall points r = 0, .01, .., 1: r <= .33
    # (34 points) -> 1, .34 <= r <= .66 (33 points) -> 2/3, r >= .67 (34 points) -> 0, so
    # AP = (34 + 33 * 2/3) / 101 = 56 / 101 at every IoU threshold (the TPs are exact).
    # AR@100 = AR@10 = 2/3; AR@1 keeps only the top detection (a TP): 1/3.
    gts = [(0, 0, 40, 40), (60, 0, 40, 40), (120, 0, 40, 40)]
    gt = make_gt([(1, 1, box) for box in gts], num_images=1)
    dets = prediction([xyxy(gts[0]), [0, 100, 40, 140], xyxy(gts[1])], [0.9, 0.8, 0.7], [1, 1, 1])
    stats = dict(zip(STAT_NAMES, run(gt, [{1: dets}], backend).stats()))
    for name in ("AP", "AP50", "AP75", "APm"):
        assert stats[name] == pytest.approx(56 / 101)
    assert stats["APs"] == stats["APl"] == -1
    assert stats["AR1"] == pytest.approx(1 / 3)
    assert stats["AR10"] == stats["AR100"] == stats["ARm"] == pytest.approx(2 / 3)


def test_images_without_detections_count_as_misses(backend):
    gt = make_gt([(1, 1, (0, 0, 100, 100)), (2, 3, (10, 10, 20, 20))], num_images=2)
    empty = prediction([], [], [])
    stats = dict(zip(STAT_NAMES, run(gt, [{1: empty}, {2: empty}], backend).stats()))
    assert stats["AP"] == stats["AR100"] == stats["APl"] == stats["APs"] == 0
    assert stats["APm"] == stats["ARm"] == -1


# ----------------------------------------------------------------------------- bit for bit against pycocotools

def ground_truth_api(ground_truth):
    coco = COCO()
    coco.dataset = ground_truth
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def pycocotools_directly(ground_truth, predictions):
    """The reference: pycocotools' own steps on COCO result dicts made from the predictions as
    upstream DETR makes them (Python floats from the float32 tensors), over the images given."""
    results = []
    for image_id, pred in predictions.items():
        for (x0, y0, x1, y1), score, label in zip(pred["boxes"].tolist(), pred["scores"].tolist(),
                                                  pred["labels"].tolist()):
            results.append({"image_id": image_id, "category_id": label, "bbox": [x0, y0, x1 - x0, y1 - y0],
                            "score": score})
    coco_gt = ground_truth_api(copy.deepcopy(ground_truth))
    with contextlib.redirect_stdout(io.StringIO()):
        coco_eval = COCOeval(coco_gt, coco_gt.loadRes(results) if results else COCO(), "bbox")
        coco_eval.params.imgIds = sorted(predictions)
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()
    return coco_eval


@pytest.fixture(scope="module")
def hard_case():
    """60 images with what COCO treats specially: crowd boxes, categories without ground truth
    (which detections use), detections of a category the ground truth does not list (0),
    images without detections, images without objects, and images with more detections than
    maxDets (150 > 100)."""
    ground_truth, detections = synthetic_coco(60, seed=3, num_categories=6, crowd_fraction=0.15,
                                              detections_per_image=150, empty_categories=2)
    detections[::7, 6] = 0
    predictions = as_predictions(detections)
    for image_id in (2, 9, 31):
        predictions[image_id] = {k: v[:0] for k, v in predictions[image_id].items()}
    ground_truth["annotations"] = [a for a in ground_truth["annotations"] if a["image_id"] not in (5, 17)]
    objects = {a["image_id"] for a in ground_truth["annotations"]}
    empty_category = ground_truth["categories"][-1]["id"]
    assert any(a["iscrowd"] for a in ground_truth["annotations"])
    assert any(i not in objects for i in predictions)
    labels = torch.cat([p["labels"] for p in predictions.values()]).tolist()
    assert empty_category in labels and 0 in labels
    assert 0 not in [c["id"] for c in ground_truth["categories"]]
    return ground_truth, predictions, pycocotools_directly(ground_truth, predictions)


def assert_same_as(coco_eval, reference):
    assert np.array_equal(np.asarray(coco_eval.stats), reference.stats)
    for key in ("precision", "recall", "scores"):
        assert coco_eval.eval[key].shape == reference.eval[key].shape
        assert np.array_equal(coco_eval.eval[key], reference.eval[key]), key


def test_every_backend_gives_pycocotools_numbers_bit_for_bit(backend, hard_case):
    ground_truth, predictions, reference = hard_case
    # the case reaches the special paths: a category without ground truth is -1 throughout, and
    # images hold more detections than maxDets
    assert (reference.eval["precision"][..., -1, :, :] == -1).all()
    assert max(len(p["scores"]) for p in predictions.values()) > reference.params.maxDets[-1]
    batches = [dict(list(predictions.items())[i:i + 4]) for i in range(0, len(predictions), 4)]
    evaluator = run(ground_truth_api(ground_truth), batches, backend)
    assert_same_as(evaluator.coco_eval["bbox"], reference)
    assert evaluator.stats() == reference.stats.tolist()


@pytest.fixture(scope="module")
def coco_like_case():
    ground_truth, detections = synthetic_coco(150, seed=1)
    predictions = as_predictions(detections)
    return ground_truth, predictions, pycocotools_directly(ground_truth, predictions)


def test_coco_like_set_bit_for_bit(backend, coco_like_case):
    ground_truth, predictions, reference = coco_like_case
    evaluator = run(ground_truth_api(ground_truth), [predictions], backend)
    assert_same_as(evaluator.coco_eval["bbox"], reference)


def test_no_detections_at_all(backend):
    gt = make_gt([(1, 1, (0, 0, 100, 100)), (2, 3, (10, 10, 20, 20))], num_images=2)
    empty = prediction([], [], [])
    assert run(gt, [{1: empty, 2: empty}], backend).stats() == [0, 0, 0, 0, -1, 0, 0, 0, 0, 0, -1, 0]


def test_the_ground_truth_is_left_as_it_was(backend, hard_case):
    ground_truth, predictions, _ = hard_case
    gt = ground_truth_api(ground_truth)
    before = repr(gt.dataset)
    run(gt, [predictions], backend)
    assert repr(gt.dataset) == before


# ----------------------------------------------------------------------------- across ranks

def split_like_a_distributed_sampler(predictions, ranks):
    """Each rank's batches: images dealt round robin, the last padded with the first images
    again, as DistributedSampler does."""
    ids = sorted(predictions)
    ids += ids[:(-len(ids)) % ranks]
    return [[{i: predictions[i]} for i in ids[rank::ranks]] for rank in range(ranks)]


def test_gathered_ranks_equal_one_process(monkeypatch, hard_case):
    ground_truth, predictions, reference = hard_case
    gt = ground_truth_api(ground_truth)
    per_rank = split_like_a_distributed_sampler(predictions, 7)
    assert sum(map(len, per_rank)) > len(predictions)  # padding repeats images
    evaluators = [run_updates(CocoEvaluator(gt, backend="pycocotools"), batches) for batches in per_rank]
    local = [(e.img_ids, np.concatenate(e._detections)) for e in evaluators]
    monkeypatch.setattr(coco_eval_module, "all_gather", lambda obj: local)
    evaluators[0].synchronize_between_processes()
    evaluators[0].accumulate()
    assert sorted(evaluators[0].img_ids) == sorted(predictions)  # each image once
    assert_same_as(evaluators[0].coco_eval["bbox"], reference)


def run_updates(evaluator, batches):
    for batch in batches:
        evaluator.update(batch)
    return evaluator


def test_an_image_seen_twice_keeps_its_first_predictions():
    gt = make_gt([(1, 1, (0, 0, 100, 100))], num_images=1)
    good, bad = prediction([[0, 0, 100, 100]], [0.9], [1]), prediction([[50, 50, 60, 60]], [0.9], [1])
    assert run(gt, [{1: good}, {1: bad}]).stats()[0] == pytest.approx(1)
    assert run(gt, [{1: bad}, {1: good}]).stats()[0] == 0


def _rank_worker(rank, init_file, backend, batches, queue):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    torch.set_num_threads(1)
    ground_truth, _, _ = batches
    evaluator = run_updates(CocoEvaluator(ground_truth_api(ground_truth), backend=backend), batches[1][rank])
    evaluator.synchronize_between_processes()
    evaluator.accumulate()
    coco_eval = evaluator.coco_eval["bbox"]
    arrays = None if coco_eval.eval is None else {k: coco_eval.eval[k] for k in ("precision", "recall", "scores")}
    queue.put((rank, evaluator.stats(), arrays))
    dist.destroy_process_group()


@pytest.mark.parametrize("backend_name", ["hotcoco", "pycocotools"])
def test_two_gloo_processes_equal_one(backend_name, hard_case, tmp_path):
    if backend_name not in INSTALLED:
        pytest.skip(f"{backend_name} is not installed")
    ground_truth, predictions, reference = hard_case
    context = multiprocessing.get_context("spawn")  # fork after a Rust thread pool started is unsafe
    queue = context.Queue()
    work = (ground_truth, split_like_a_distributed_sampler(predictions, 2), None)
    processes = [context.Process(target=_rank_worker, args=(r, os.fspath(tmp_path / "init"), backend_name, work,
                                                            queue)) for r in range(2)]
    for process in processes:
        process.start()
    results = dict((rank, (stats, arrays)) for rank, stats, arrays in (queue.get(timeout=120) for _ in processes))
    for process in processes:
        process.join(timeout=60)
        assert process.exitcode == 0
    assert results[0][0] == results[1][0] == reference.stats.tolist()
    assert results[1][1] is None  # only rank 0 evaluates
    for key, array in results[0][1].items():
        assert np.array_equal(array, reference.eval[key]), key


# ----------------------------------------------------------------------------- the choice of backend

def test_auto_takes_the_first_installed_and_a_missing_backend_is_refused(monkeypatch):
    monkeypatch.setattr(coco_eval_module, "installed_backends", lambda: ["ultrafast-pycocotools", "pycocotools"])
    assert resolve_backend("auto") == "ultrafast-pycocotools"
    assert resolve_backend("pycocotools") == "pycocotools"
    with pytest.raises(UserInputError, match=r"^--eval_backend hotcoco is not installed; pip install hotcoco, "
                                             r"or choose one of: auto, ultrafast-pycocotools, pycocotools$"):
        resolve_backend("hotcoco")
    with pytest.raises(UserInputError, match="not one of auto, hotcoco"):
        resolve_backend("lvis")
    monkeypatch.setattr(coco_eval_module, "installed_backends", lambda: [])
    with pytest.raises(UserInputError, match="no COCO evaluation backend is installed; pip install hotcoco"):
        resolve_backend("auto")


def test_the_flag_is_checked_before_anything_loads(monkeypatch):
    monkeypatch.setattr(coco_eval_module, "installed_backends", lambda: ["pycocotools"])
    args = parse(["--device", "cpu", "--eval_backend", "hotcoco"])
    with pytest.raises(UserInputError, match="--eval_backend hotcoco is not installed"):
        detr_main.check_args(args)
    args = parse(["--device", "cpu"])
    detr_main.check_args(args)
    assert args.eval_backend == "auto"  # checked, not changed
    detr_main.resolve_args(args)
    assert args.eval_backend == "pycocotools"  # what auto resolved to is what the run records


def test_only_bbox_is_supported():
    with pytest.raises(ValueError, match="segm"):
        CocoEvaluator(make_gt([], num_images=1), ("bbox", "segm"))


def test_one_process_may_skip_the_synchronisation(hard_case):
    ground_truth, predictions, reference = hard_case
    evaluator = CocoEvaluator(ground_truth_api(ground_truth))
    for image_id, prediction in predictions.items():
        evaluator.update({image_id: prediction})
    evaluator.accumulate()  # no synchronize_between_processes(): every image still counts
    assert_same_as(evaluator.coco_eval["bbox"], reference)
