"""Plots of training logs (log.txt) and of COCO precision-recall curves (eval/*.pth)."""
import json
from pathlib import Path

import torch


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")  # files only: runs on machines without a display
    import matplotlib.pyplot as plt
    return plt


def read_log(log_path):
    """The JSON lines of a log.txt as a list of dicts."""
    with open(log_path) as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_logs(log_dirs, fields=("train_loss", "test_loss", "mAP"), out_path=None):
    """One panel per field, one curve per run folder (each holding a log.txt).
    'mAP' plots the first COCO number (AP@[.5:.95]) of test_coco_eval_bbox."""
    plt = _pyplot()
    log_dirs = [Path(d) for d in log_dirs]
    fig, axes = plt.subplots(1, len(fields), figsize=(5 * len(fields), 4), squeeze=False)
    for log_dir in log_dirs:
        rows = read_log(log_dir / "log.txt")
        epochs = [r["epoch"] for r in rows]
        for ax, field in zip(axes[0], fields):
            if field == "mAP":
                values = [r["test_coco_eval_bbox"][0] for r in rows]
            else:
                values = [r.get(field, float("nan")) for r in rows]
            ax.plot(epochs, values, marker="o", label=log_dir.name)
            ax.set_title(field)
            ax.set_xlabel("epoch")
    return _finish(plt, fig, axes, out_path)


def _finish(plt, fig, axes, out_path):
    """Legends, layout, and the PNG when out_path is given (the figure is then closed)."""
    for ax in axes[0]:
        ax.legend()
    fig.tight_layout()
    if out_path:
        fig.savefig(out_path, dpi=100)
        plt.close(fig)
    return fig


def precision_recall(eval_path, iou_threshold=0.5):
    """Recall points and precision (averaged over classes with ground truth) at one IoU
    threshold, area 'all', 100 detections, from a saved COCOeval .pth."""
    ev = torch.load(eval_path, map_location="cpu", weights_only=True)
    precision = ev["precision"]  # [T, R, K, A, M]: IoU thr, recall pts, classes, areas, max dets
    t = int(round((iou_threshold - 0.5) / 0.05))
    p = precision[t, :, :, 0, -1]
    valid = (p > -1).all(dim=0)  # classes without ground truth are marked -1
    recall = torch.linspace(0, 1, p.shape[0])
    return recall, p[:, valid].mean(dim=1) if valid.any() else torch.zeros_like(recall)


def plot_precision_recall(eval_files, names=None, iou_thresholds=(0.5, 0.75), out_path=None):
    plt = _pyplot()
    names = names or [Path(f).parent.parent.name or str(f) for f in eval_files]
    fig, axes = plt.subplots(1, len(iou_thresholds), figsize=(5 * len(iou_thresholds), 4), squeeze=False)
    for ax, thr in zip(axes[0], iou_thresholds):
        for f, name in zip(eval_files, names):
            recall, precision = precision_recall(f, thr)
            ax.plot(recall.numpy(), precision.numpy(), label=name)
        ax.set_title(f"precision-recall @ IoU {thr}")
        ax.set_xlabel("recall")
        ax.set_ylabel("precision")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.02)
    return _finish(plt, fig, axes, out_path)
