"""Plots of training logs (log.txt), of COCO precision-recall curves (eval/*.pth) and of DAP's
precision tables; and the comparison of runs:

    python -m util.plot_utils OUT_A OUT_B ... --out compare.png

draws, for each run folder (a main.py --output_dir), its training loss and COCO AP per epoch and
its final precision-recall curves at IoU 0.5 and 0.75, and prints its 12 COCO numbers side by
side in Markdown, with the differences to the first run.
"""
import argparse
import json
import sys
from pathlib import Path

import torch

from util.logs import COCO_STATS
from util.output_dir import write_atomically

IOU_THRESHOLDS = tuple(0.5 + 0.05 * k for k in range(10))  # COCO's, the rows of DAP's tables


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")  # files only: runs on machines without a display
    import matplotlib.pyplot as plt
    return plt


def read_log(log_path):
    """The JSON lines of a log.txt as a list of dicts."""
    with open(log_path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _draw_logs(axes, log_dirs, fields):
    """One panel per field, one curve per run folder (each holding a log.txt). 'mAP' plots the
    first COCO number (AP@[.5:.95]) of test_coco_eval_bbox."""
    for log_dir in log_dirs:
        rows = read_log(log_dir / "log.txt")
        epochs = [r["epoch"] for r in rows]
        for ax, field in zip(axes, fields):
            if field == "mAP":
                values = [r["test_coco_eval_bbox"][0] for r in rows]
            else:
                values = [r.get(field, float("nan")) for r in rows]
            ax.plot(epochs, values, marker="o", label=log_dir.name)
            ax.set_title(field)
            ax.set_xlabel("epoch")


def plot_logs(log_dirs, fields=("train_loss", "test_loss", "mAP"), out_path=None):
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(fields), figsize=(5 * len(fields), 4), squeeze=False)
    _draw_logs(axes[0], [Path(d) for d in log_dirs], fields)
    return _finish(plt, fig, axes, out_path)


def _finish(plt, fig, axes, out_path):
    """Legends, layout, and the PNG when out_path is given (the figure is then closed)."""
    for ax in axes[0]:
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    fig.tight_layout()
    if out_path:
        save_png(plt, fig, out_path)
    return fig


def save_png(plt, fig, out_path):
    """Write the figure to out_path as a PNG, atomically, and close it."""
    write_atomically(out_path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)


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


def _draw_precision_recall(axes, eval_files, names, iou_thresholds):
    for ax, thr in zip(axes, iou_thresholds):
        for f, name in zip(eval_files, names):
            recall, precision = precision_recall(f, thr)
            ax.plot(recall.numpy(), precision.numpy(), label=name)
        ax.set_title(f"precision-recall @ IoU {thr}")
        ax.set_xlabel("recall")
        ax.set_ylabel("precision")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.02)


def plot_precision_recall(eval_files, names=None, iou_thresholds=(0.5, 0.75), out_path=None):
    plt = _pyplot()
    names = names or [Path(f).parent.parent.name or str(f) for f in eval_files]
    fig, axes = plt.subplots(1, len(iou_thresholds), figsize=(5 * len(iou_thresholds), 4), squeeze=False)
    _draw_precision_recall(axes[0], eval_files, names, iou_thresholds)
    return _finish(plt, fig, axes, out_path)


# ---------------------------------------------------------------------- DAP's precision tables

def precision_table_figure(table, title):
    """A heat map of one DAP precision table, [10 IoU thresholds][N score bins] (nested lists
    or a tensor), bin i starting at score i / N (docs/DAP.md)."""
    plt = _pyplot()
    table = torch.as_tensor(table, dtype=torch.float32)
    fig, ax = plt.subplots(figsize=(6, 3))
    image = ax.imshow(table.numpy(), aspect="auto", origin="lower", vmin=0, vmax=1, cmap="viridis",
                      extent=(0, 1, -0.5, table.shape[0] - 0.5))
    ax.set_yticks(range(table.shape[0]), [f"{a:.2f}" for a in IOU_THRESHOLDS[:table.shape[0]]])
    ax.set_xlabel("score threshold")
    ax.set_ylabel("IoU threshold")
    ax.set_title(title)
    fig.colorbar(image, ax=ax, label="precision")
    fig.tight_layout()
    return fig


def plot_precision_tables(log_dir, epoch=None, out_path=None):
    """The precision tables of one epoch of a run's log.txt (the last by default) as heat maps:
    train_dap_precision_table, the final layer's at the epoch's last step, and, under
    --dap_cost_mode momentum, train_matcher_precision_table. With out_path, one PNG per table,
    named out_path's stem + '_<table>.png', and the figures are closed; returns {name: figure}."""
    rows = read_log(Path(log_dir) / "log.txt")
    matching = [r for r in rows if epoch is None or r["epoch"] == epoch]
    if not matching:
        raise ValueError(f"{log_dir}/log.txt has no epoch {epoch}: choose one of {[r['epoch'] for r in rows]}")
    row = matching[-1]
    figures = {name: precision_table_figure(table, f"{name}, epoch {row['epoch']}")
               for name, table in row.items() if name.endswith("_table")}
    if out_path:
        out = Path(out_path)
        for name, fig in figures.items():
            save_png(_pyplot(), fig, out.with_name(f"{out.stem}_{name}.png"))
    return figures


# ---------------------------------------------------------------------- comparing runs

def final_coco_stats(run_dir):
    """The 12 COCO numbers of a run folder: eval_stats.json (main.py --eval), else the last epoch
    of log.txt; None when neither holds them."""
    run_dir = Path(run_dir)
    if (run_dir / "eval_stats.json").is_file():
        return json.loads((run_dir / "eval_stats.json").read_text())["test_coco_eval_bbox"]
    rows = [r for r in read_log(run_dir / "log.txt") if "test_coco_eval_bbox" in r] \
        if (run_dir / "log.txt").is_file() else []
    return max(rows, key=lambda r: r["epoch"])["test_coco_eval_bbox"] if rows else None


def final_eval_file(run_dir):
    """The last evaluation's COCOeval arrays: eval/latest.pth (training), else eval.pth (--eval)."""
    for path in (Path(run_dir) / "eval" / "latest.pth", Path(run_dir) / "eval.pth"):
        if path.is_file():
            return path
    return None


def coco_table(run_dirs):
    """The 12 COCO numbers of each run in percent, one column per run, in Markdown; each number
    after the first run's with its difference to the first run's."""
    names = [Path(d).name for d in run_dirs]
    stats = [final_coco_stats(d) for d in run_dirs]
    lines = [f"| metric | {' | '.join(names)} |", "|" + " --- |" * (len(names) + 1)]
    for i, metric in enumerate(COCO_STATS):
        cells = [f"{100 * stats[0][i]:.1f}"]
        cells += [f"{100 * s[i]:.1f} ({100 * (s[i] - stats[0][i]):+.1f})" for s in stats[1:]]
        lines.append(f"| {metric} | {' | '.join(cells)} |")
    return "\n".join(lines) + "\n"


def compare_runs(run_dirs, out_path=None):
    """Training loss and COCO AP per epoch, and the final precision-recall curves at IoU 0.5 and
    0.75, of every run folder, in one figure."""
    plt = _pyplot()
    run_dirs = [Path(d) for d in run_dirs]
    fig, axes = plt.subplots(1, 4, figsize=(20, 4), squeeze=False)
    _draw_logs(axes[0][:2], [d for d in run_dirs if (d / "log.txt").is_file()], ("train_loss", "mAP"))
    with_eval = [d for d in run_dirs if final_eval_file(d) is not None]
    _draw_precision_recall(axes[0][2:], [final_eval_file(d) for d in with_eval], [d.name for d in with_eval],
                           (0.5, 0.75))
    return _finish(plt, fig, axes, out_path)


def check_run_dir(run_dir):
    """Refuse, with one line, a folder that holds no evaluated run."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return f"{run_dir} is not a folder: pass the --output_dir of a main.py run"
    if final_coco_stats(run_dir) is None:
        return (f"{run_dir} holds no COCO numbers (no eval_stats.json, no evaluated epoch in log.txt): pass the "
                "--output_dir of a run that finished an epoch, or of main.py --eval")
    return None


def main(argv=None):
    parser = argparse.ArgumentParser(description="Compare runs: training loss, COCO AP per epoch, final "
                                                 "precision-recall curves (a PNG) and the 12 COCO numbers (Markdown)")
    parser.add_argument("run_dirs", nargs="+", metavar="OUTPUT_DIR", help="main.py --output_dir folders")
    parser.add_argument("--out", default="compare.png", help="the PNG to write")
    args = parser.parse_args(argv)
    for run_dir in args.run_dirs:
        problem = check_run_dir(run_dir)
        if problem:
            parser.exit(2, f"error: {problem}\n")
    compare_runs(args.run_dirs, args.out)
    sys.stdout.write(coco_table(args.run_dirs))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
