"""Print the paper's tables in Markdown with the numbers measured in the output folders of
scripts/reproduce.py beside them.

    python -m scripts.table1 --output_root outputs [--configs configs]

A row's numbers come from <output_root>/<config name>/eval_stats.json (main.py --eval) or else
from the last epoch in its log.txt; a row whose folder does not exist is marked "not run", and
one still training shows its progress. Sweeps (the section 4.2 ablations) get one row per value.
"""
import argparse
import json
import sys
from pathlib import Path

from scripts.reproduce import load_config, sweep_points

METRICS = ("AP", "AP50", "AP75")  # the first three of COCOeval's 12 numbers

# (row, config name, reference AP/AP50/AP75 or None). The reference is the paper's number
# (its section 5), or, for a released checkpoint, the number published with it.
TABLES = {
    "Table 1: fine-tuning the released checkpoints (COCO val2017)": [
        ("DETR R50, released checkpoint", "detr_r50_eval", (42.0, 62.4, None)),
        ("DETR R50, raw", "detr_r50_raw", (42.2, 62.5, 44.6)),
        ("DETR R50, raw + DAP", "detr_r50_rawdap", (42.7, 63.0, 45.1)),
        ("DETR R50, DAP", "detr_r50_dap", (43.4, 63.0, 45.8)),
        ("DETR R101, released checkpoint", "detr_r101_eval", (43.5, 63.8, None)),
        ("DETR R101, raw", "detr_r101_raw", (43.6, 64.1, 46.1)),
        ("DETR R101, DAP", "detr_r101_dap", (44.9, 64.3, 48.0)),
        ("Deformable DETR R50, released checkpoint", "deformable_r50_eval", (46.2, None, None)),
        ("Deformable DETR R50, raw", "deformable_r50_raw", (46.2, 64.9, 50.2)),
        ("Deformable DETR R50, DAP", "deformable_r50_dap", (47.3, 65.1, 51.3)),
        ("RT-DETR† R50, raw", "rtdetr_r50_noiou_raw", (52.2, 71.1, 56.8)),
        ("RT-DETR† R50, DAP", "rtdetr_r50_noiou_dap", (52.8, 71.2, 57.3)),
        ("RT-DETR R50, released checkpoint", "rtdetr_r50_eval", (53.1, 71.2, None)),
        ("RT-DETR R50, raw", "rtdetr_r50_raw", (53.1, 71.4, 57.5)),
        ("RT-DETR R50, raw + DAP", "rtdetr_r50_rawdap", (53.3, 71.7, 57.5)),
    ],
    "Table 2: matcher, with the DAP-loss (DETR)": [
        ("R50, Hungarian (raw) matcher", "detr_r50_dap_hungarian", (42.8, None, None)),
        ("R50, AP-cost matcher, momentum", "detr_r50_dap_momentum", (43.4, None, None)),
        ("R50, AP-cost matcher, constant", "detr_r50_dap", (43.4, None, None)),
        ("R101, Hungarian (raw) matcher", "detr_r101_dap_hungarian", (44.6, None, None)),
        ("R101, AP-cost matcher, constant", "detr_r101_dap", (44.9, None, None)),
    ],
    "The ranking-loss arena (not in the paper; docs/LOSSES.md): each loss from the released checkpoint": [
        ("DETR R50, raw", "detr_r50_raw", (None, None, None)),
        ("DETR R50, raw at 10x the learning rate", "detr_r50_raw_lr10", (None, None, None)),
        ("DETR R50, DAP, Hungarian matcher", "detr_r50_dap_hungarian", (None, None, None)),
        ("DETR R50, DAP, AP-cost matcher, constant", "detr_r50_dap", (None, None, None)),
        ("DETR R50, DAP, AP-cost matcher, momentum", "detr_r50_dap_momentum", (None, None, None)),
        ("DETR R50, raw + DAP", "detr_r50_rawdap", (None, None, None)),
        ("DETR R50, AP-Loss", "detr_r50_ap", (None, None, None)),
        ("DETR R50, aLRP Loss", "detr_r50_alrp", (None, None, None)),
        ("DETR R50, RS Loss", "detr_r50_rs", (None, None, None)),
        ("Deformable DETR R50, raw", "deformable_r50_raw", (None, None, None)),
        ("Deformable DETR R50, raw at 10x the learning rate", "deformable_r50_raw_lr10", (None, None, None)),
        ("Deformable DETR R50, DAP, Hungarian matcher", "deformable_r50_dap_hungarian", (None, None, None)),
        ("Deformable DETR R50, DAP, AP-cost matcher, constant", "deformable_r50_dap", (None, None, None)),
        ("Deformable DETR R50, DAP, AP-cost matcher, momentum", "deformable_r50_dap_momentum", (None, None, None)),
        ("Deformable DETR R50, raw + DAP", "deformable_r50_rawdap", (None, None, None)),
        ("Deformable DETR R50, AP-Loss", "deformable_r50_ap", (None, None, None)),
        ("Deformable DETR R50, aLRP Loss", "deformable_r50_alrp", (None, None, None)),
        ("Deformable DETR R50, RS Loss", "deformable_r50_rs", (None, None, None)),
        ("RT-DETR† R50, raw", "rtdetr_r50_noiou_raw", (None, None, None)),
        ("RT-DETR† R50, raw at 10x the learning rate", "rtdetr_r50_noiou_raw_lr10", (None, None, None)),
        ("RT-DETR† R50, DAP, Hungarian matcher", "rtdetr_r50_noiou_dap_hungarian", (None, None, None)),
        ("RT-DETR† R50, DAP, AP-cost matcher, constant", "rtdetr_r50_noiou_dap", (None, None, None)),
        ("RT-DETR† R50, DAP, AP-cost matcher, momentum", "rtdetr_r50_noiou_dap_momentum", (None, None, None)),
        ("RT-DETR† R50, raw + DAP", "rtdetr_r50_noiou_rawdap", (None, None, None)),
        ("RT-DETR† R50, AP-Loss", "rtdetr_r50_noiou_ap", (None, None, None)),
        ("RT-DETR† R50, aLRP Loss", "rtdetr_r50_noiou_alrp", (None, None, None)),
        ("RT-DETR† R50, RS Loss", "rtdetr_r50_noiou_rs", (None, None, None)),
    ],
    "Table 3: DETR R50 trained from scratch": [
        ("raw", "detr_r50_scratch_raw", (39.5, None, None)),
        ("DAP", "detr_r50_scratch_dap", (29.4, None, None)),
        ("raw + DAP", "detr_r50_scratch_rawdap", (35.8, None, None)),
    ],
}
ABLATIONS = ("ablation_bins", "ablation_sigma", "ablation_batch")
LEGEND = ("Each cell: ours (reference, ours - reference). Reference = the paper's number; for a "
          "released checkpoint, the number published with it. † = without IoU-aware query selection. "
          "To compare runs in detail (training losses, AP per epoch, precision-recall curves, the 12 COCO "
          "numbers): `python -m util.plot_utils OUTPUT_ROOT/NAME_A OUTPUT_ROOT/NAME_B --out compare.png`.")


def measured(folder, epochs):
    """(AP, AP50, AP75) in percent and a status, or (None, status) when there is nothing yet."""
    stats_file, log_file = folder / "eval_stats.json", folder / "log.txt"
    if stats_file.is_file():
        stats = json.loads(stats_file.read_text())
        return [100 * v for v in stats["test_coco_eval_bbox"][:3]], "evaluated"
    rows = []
    if log_file.is_file():
        rows = [json.loads(line) for line in log_file.read_text().splitlines() if line.strip()]
        rows = [r for r in rows if "test_coco_eval_bbox" in r]
    if not rows:
        return None, "started" if folder.is_dir() else "not run"
    last = max(rows, key=lambda r: r["epoch"])
    done = last["epoch"] + 1
    status = "done" if epochs and done >= epochs else f"epoch {done}/{epochs or '?'}"
    return [100 * v for v in last["test_coco_eval_bbox"][:3]], status


def cell(ours, reference):
    if ours is None:
        return "—" if reference is None else f"— ({reference:.1f})"
    if reference is None:
        return f"{ours:.1f}"
    return f"{ours:.1f} ({reference:.1f}, {ours - reference:+.1f})"


def markdown(title, rows):
    """rows: (label, numbers or None, reference tuple, status)."""
    lines = [f"### {title}", "", f"| row | {' | '.join(METRICS)} | status |",
             "|" + " --- |" * (len(METRICS) + 2)]
    for label, numbers, reference, status in rows:
        cells = [cell(None if numbers is None else numbers[i], reference[i]) for i in range(len(METRICS))]
        lines.append(f"| {label} | {' | '.join(cells)} | {status} |")
    return "\n".join(lines)


def config_epochs(configs, name):
    path = configs / f"{name}.toml"
    return load_config(path)["flags"].get("epochs") if path.is_file() else None


def tables(output_root, configs):
    output_root, configs = Path(output_root), Path(configs)
    out = [LEGEND]
    for title, spec in TABLES.items():
        rows = []
        for label, name, reference in spec:
            numbers, status = measured(output_root / name, config_epochs(configs, name))
            rows.append((f"{label} (`{name}`)", numbers, reference, status))
        out.append(markdown(title, rows))
    for name in ABLATIONS:
        path = configs / f"{name}.toml"
        if not path.is_file():
            continue
        rows = []
        for point, flags in sweep_points(load_config(path)):
            numbers, status = measured(output_root / name / point, flags.get("epochs"))
            rows.append((point, numbers, (None,) * len(METRICS), status))
        out.append(markdown(f"Ablation `{name}` (paper's numbers not available to us)", rows))
    return "\n\n".join(out) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output_root", default="outputs", help="the --output_root of scripts/reproduce.sh")
    parser.add_argument("--configs", default=str(Path(__file__).resolve().parent.parent / "configs"))
    args = parser.parse_args(argv)
    sys.stdout.write(tables(args.output_root, args.configs))


if __name__ == "__main__":
    main()
