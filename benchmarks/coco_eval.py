"""COCO box evaluation: the project's CocoEvaluator with each backend, and faster-coco-eval, against
pycocotools, on a synthetic COCO-val-like set (80 categories, ~7.3 boxes and 100 detections per
image, 1% crowd boxes).

    python -m benchmarks.coco_eval                          # 500 and 5,000 images, 3 repeats
    python -m benchmarks.coco_eval --sizes 500 5000 50000 --reference_max 5000

Each measurement runs in a fresh process (so that its peak memory is its own), in round-robin
order over the settings. A measurement is the whole evaluation of an epoch's detections: for
CocoEvaluator, update() from tensors, synchronize, accumulate (loads the ground truth and the
results, evaluates, accumulates) and summarize; for faster-coco-eval, the same steps through its
own API. Prints the minimum time over the repeats, its ratio to pycocotools, the peak resident
memory added by the evaluation (+MB: the process's peak minus what it held before; the data
loaded before is not counted), and whether the 12 numbers and the
precision/recall/scores arrays equal pycocotools' bit for bit.
"""
import argparse
import contextlib
import hashlib
import importlib.util
import io
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks import environment
from util.args import positive_int

# CocoEvaluator with each backend, and faster-coco-eval on its own (not a backend: not bit-identical)
SETTINGS = ("pycocotools", "hotcoco", "ultrafast-pycocotools", "faster-coco-eval")
MODULES = {"pycocotools": "pycocotools", "hotcoco": "hotcoco", "ultrafast-pycocotools": "ultrafast_pycocotools",
           "faster-coco-eval": "faster_coco_eval"}


def synthetic_coco(num_images, seed=0, num_categories=80, boxes_per_image=7.3, detections_per_image=100,
                   crowd_fraction=0.01, empty_categories=0):
    """A COCO ground truth dict and [N, 7] detection rows (image id, x, y, w, h, score, category):
    per image, Poisson(boxes_per_image) objects; the detections are jittered copies of the objects
    (up to 3 per object, 20% with a wrong category) and random boxes, detections_per_image in all.
    empty_categories: that many extra categories with no ground truth (detections may use them)."""
    rng = np.random.default_rng(seed)
    category_ids = np.sort(rng.choice(np.arange(1, 201), num_categories + empty_categories, replace=False))
    with_objects = category_ids[:num_categories]
    images, annotations, detections = [], [], []
    for image_id in range(1, num_images + 1):
        width, height = int(rng.integers(300, 641)), int(rng.integers(300, 641))
        images.append({"id": image_id, "width": width, "height": height, "file_name": f"{image_id:012}.jpg"})
        objects = []
        for _ in range(rng.poisson(boxes_per_image)):
            w, h = rng.uniform(2, width / 2), rng.uniform(2, height / 2)
            box = [rng.uniform(0, width - w), rng.uniform(0, height - h), w, h]
            category = int(rng.choice(with_objects))
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": category,
                                "bbox": box, "area": w * h * rng.uniform(0.5, 1.0),
                                "iscrowd": int(rng.random() < crowd_fraction)})
            objects.append((box, category))
        for k in range(detections_per_image):
            if objects and k < 3 * len(objects):
                (x, y, w, h), category = objects[k % len(objects)]
                jitter = rng.normal(0, 0.1, 4) * [w, h, w, h]
                box = [x + jitter[0], y + jitter[1], max(w + jitter[2], 1.0), max(h + jitter[3], 1.0)]
                if rng.random() < 0.2:
                    category = int(rng.choice(category_ids))
            else:
                w, h = rng.uniform(2, width / 2), rng.uniform(2, height / 2)
                box = [rng.uniform(0, width - w), rng.uniform(0, height - h), w, h]
                category = int(rng.choice(category_ids))
            detections.append([image_id, *box, rng.random(), category])
    ground_truth = {"images": images, "annotations": annotations,
                    "categories": [{"id": int(c), "name": f"category {c}"} for c in category_ids]}
    return ground_truth, np.asarray(detections, dtype=np.float64).reshape(-1, 7)


def as_predictions(detections):
    """Detection rows as the post-processor's per-image predictions (xyxy float32 tensors)."""
    import torch

    predictions = {}
    order = np.argsort(detections[:, 0], kind="stable")  # each image's rows together, in their order
    image_ids, starts = np.unique(detections[order, 0].astype(np.int64), return_index=True)
    for image_id, rows in zip(image_ids, np.split(detections[order], starts[1:])):
        boxes = np.concatenate([rows[:, 1:3], rows[:, 1:3] + rows[:, 3:5]], axis=1)
        predictions[int(image_id)] = {"boxes": torch.tensor(boxes, dtype=torch.float32),
                                      "scores": torch.tensor(rows[:, 5], dtype=torch.float32),
                                      "labels": torch.tensor(rows[:, 6], dtype=torch.int64)}
    return predictions


def measure(setting, folder):
    """One timed evaluation in this process; returns its time, peak memory and results."""
    import torch  # noqa: F401  (imported by every setting, before the memory baseline)

    ground_truth = json.loads((folder / "gt.json").read_text())
    detections = np.load(folder / "detections.npy")
    if setting == "faster-coco-eval":
        import faster_coco_eval

        rss_before = resident_mb()
        start = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()):
            gt = faster_coco_eval.COCO(ground_truth)
            coco_eval = faster_coco_eval.COCOeval_faster(gt, gt.loadRes(detections), "bbox")
            coco_eval.evaluate()
            coco_eval.accumulate()
            coco_eval.summarize()
    else:
        from pycocotools.coco import COCO

        from datasets.coco_eval import CocoEvaluator

        with contextlib.redirect_stdout(io.StringIO()):
            gt = COCO()
            gt.dataset = ground_truth
            gt.createIndex()
        predictions = as_predictions(detections)  # what engine.evaluate hands over, not timed
        rss_before = resident_mb()
        start = time.perf_counter()
        evaluator = CocoEvaluator(gt, ("bbox",), backend=setting)
        for image_id, prediction in predictions.items():
            evaluator.update({image_id: prediction})
        evaluator.synchronize_between_processes()
        evaluator.accumulate()
        with contextlib.redirect_stdout(io.StringIO()):
            evaluator.summarize()
        coco_eval = evaluator.coco_eval["bbox"]
    seconds = time.perf_counter() - start
    arrays = hashlib.sha256()
    for key in ("precision", "recall", "scores"):
        arrays.update(np.ascontiguousarray(coco_eval.eval[key], dtype=np.float64).tobytes())
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - rss_before
    return {"seconds": seconds, "peak_mb": peak_mb,
            "stats": [float(s) for s in coco_eval.stats], "arrays": arrays.hexdigest()}


def resident_mb():
    return int(Path("/proc/self/statm").read_text().split()[1]) * resource.getpagesize() / 2**20


def run_measurement(setting, folder):
    out = subprocess.run([sys.executable, "-m", "benchmarks.coco_eval", "--measure", setting, str(folder)],
                         cwd=environment.REPO, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=positive_int, nargs="+", default=[500, 5000], help="numbers of images")
    parser.add_argument("--repeats", type=positive_int, default=3)
    parser.add_argument("--reference_max", type=positive_int, default=5000,
                        help="run pycocotools only up to this many images (it needs ~17 GB and >460 s at 50,000)")
    parser.add_argument("--measure", nargs=2, metavar=("SETTING", "FOLDER"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure[0], Path(args.measure[1]))))
        return

    settings = [s for s in SETTINGS if importlib.util.find_spec(MODULES[s]) is not None]
    print(environment.header("cpu"))
    print(f"settings installed: {', '.join(settings)}; not installed: "
          f"{', '.join(s for s in SETTINGS if s not in settings) or 'none'}")
    for size in args.sizes:
        ground_truth, detections = synthetic_coco(size)
        print(f"\n{size} images, {len(ground_truth['annotations'])} boxes, {len(detections)} detections, "
              f"{len(ground_truth['categories'])} categories; min of {args.repeats}, round robin")
        runnable = [s for s in settings if s != "pycocotools" or size <= args.reference_max]
        results = {s: [] for s in runnable}
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp)
            (folder / "gt.json").write_text(json.dumps(ground_truth))
            np.save(folder / "detections.npy", detections)
            for _ in range(args.repeats):
                for setting in runnable:
                    results[setting].append(run_measurement(setting, folder))
        reference = results.get("pycocotools")
        print(f"{'setting':<38}{'time (s)':>9}{'x faster':>9}{'+MB':>7}  same 12 numbers / arrays as pycocotools")
        for setting, runs in results.items():
            best = min(r["seconds"] for r in runs)
            if reference:
                ref = reference[0]
                speedup = f"{min(r['seconds'] for r in reference) / best:.1f}"
                diff = max(abs(a - b) for a, b in zip(runs[0]["stats"], ref["stats"]))
                same = (f"{'identical' if diff == 0 else f'differ by up to {diff:.1e}'} / "
                        f"{'identical' if runs[0]['arrays'] == ref['arrays'] else 'differ'}")
            else:
                speedup, same = "-", "(no reference at this size)"
            name = setting if setting == "faster-coco-eval" else f"CocoEvaluator[{setting}]"
            print(f"{name:<38}{best:>9.2f}{speedup:>9}{max(r['peak_mb'] for r in runs):>7.0f}  {same}")
    print(environment.footer())


if __name__ == "__main__":
    main()
