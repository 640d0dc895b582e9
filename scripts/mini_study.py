"""CPU mini-study of the paper's claim: fine-tuning with DAP-loss vs the raw DETR losses.

    python -m scripts.mini_study            # whole study: about 25 min on 2 shared CPU cores
    python -m scripts.mini_study --quick    # DETR only, one seed, no ablations: about 2-3 min (the README demo)
    python -m scripts.mini_study --smoke    # a handful of tiny images: seconds (what the tests run)

1. generate a synthetic COCO-format dataset (datasets/synthetic.py);
2. pretrain each tiny detector (DETR, Deformable DETR) with the raw losses;
3. fine-tune each from its checkpoint with every arm (raw; DAP with the constant matcher; DAP
   with the momentum matcher; raw + DAP; and, as a control, raw at 10x the learning rate): same
   data order, same schedule, for several seeds;
4. ablations of the DAP arm on the first detector (sigma, N, batch size; the paper's Figure 3);
5. write results.md (the tables) and PNG plots into --out.

Every run is main.py with flags (its folder keeps log.txt, eval/latest.pth and stdout.txt).
A run whose folder holds a finished run with the same flags is reused, so a second call only
redoes what changed, the tables and the plots.
"""
import argparse
import contextlib
import json
import multiprocessing
import os
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch

import main as detr_main
from datasets.synthetic import make_synthetic_coco
from util.errors import UserInputError
from util.plot_utils import plot_logs, plot_precision_recall, read_log

COCO_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl")

# Tiny detectors: a ResNet-18 from scratch (no weights can be downloaded), a 64-wide transformer
# with 1 encoder and 2 decoder layers, 10 queries, deterministic inputs (no augmentation).
TINY = ["--backbone", "resnet18", "--no_pretrained_backbone", "--hidden_dim", "64", "--dim_feedforward", "128",
        "--nheads", "4", "--enc_layers", "1", "--dec_layers", "2", "--num_queries", "10", "--dropout", "0",
        "--no_train_augmentation", "--device", "cpu", "--num_workers", "0", "--print_freq", "50",
        "--log_iterations"]
# name: (title, flags, pretraining lr, lr_backbone and batch size). DETR trains its backbone with
# batch norm: with the frozen identity norm of a from-scratch backbone it predicts the same boxes
# for every image for many epochs. Deformable DETR learns from the frozen random backbone (its
# input projections are group-normalised) at a third of the cost.
MODELS = {
    "detr": ("DETR", TINY + ["--backbone_norm", "batch"], dict(lr=2e-4, lr_backbone=2e-4, batch_size=8)),
    "deformable_detr": ("Deformable DETR", TINY + ["--model", "deformable_detr", "--num_feature_levels", "3"],
                        dict(lr=5e-4, lr_backbone=0, batch_size=4)),
}
# name: (title, flags, learning rate in units of the recipe's). The last arm is a control, not in
# the paper: raw fine-tuning at the pretraining learning rate asks whether DAP's gain is only that
# of pushing the model harder, or of training longer at the rate that got it there.
ARMS = {
    "raw": ("raw", ["--loss", "raw"], 1),
    "dap_constant": ("DAP, constant matcher", ["--loss", "dap", "--matcher", "dap", "--dap_cost_mode", "constant"], 1),
    "dap_momentum": ("DAP, momentum matcher", ["--loss", "dap", "--matcher", "dap", "--dap_cost_mode", "momentum"], 1),
    "raw+dap": ("raw + DAP", ["--loss", "raw+dap"], 1),
    "raw_lr10": ("raw, 10x learning rate (control)", ["--loss", "raw"], 10),
}
# name: (column title, flag, values); run on the DAP (constant matcher) arm of the first model.
ABLATIONS = {
    "sigma": ("σ", "--dap_sigma", (0.01, 0.02, 0.05, 0.1, 0.2)),
    "bins": ("N", "--dap_bins", (4, 8, 16, 32, 64)),
    "batch": ("batch size", "--batch_size", (2, 4, 8, 16)),
}
ABLATION_ARM = "dap_constant"

# Data: 3 shape classes (rectangle, ellipse, triangle; colour is random), 1-2 objects per image,
# mostly medium and large (COCO area ranges at 128 px), light clutter.
DATA = dict(image_size=128, num_classes=5, max_objects=2, size_weights=(0.1, 0.5, 0.4), clutter=0.3)
PRESETS = {
    "full": dict(data=dict(DATA, num_train=1000, num_val=200), pretrain_epochs=10,
                 finetune=dict(epochs=2, batch_size=8), seeds=(0, 1, 2), models=("detr", "deformable_detr"),
                 ablations=True),
    "quick": dict(data=dict(DATA, num_train=600, num_val=100), pretrain_epochs=5,
                  finetune=dict(epochs=2, batch_size=8), seeds=(0,), models=("detr",), ablations=False),
    "smoke": dict(data=dict(DATA, num_train=8, num_val=4, image_size=64), pretrain_epochs=1,
                  finetune=dict(epochs=1, batch_size=4), seeds=(0,), models=("detr", "deformable_detr"),
                  ablations=False),
}


# ----------------------------------------------------------------------------- runs

class Run:
    """One main.py training run into its own folder."""

    def __init__(self, run_dir, flags):
        self.dir = Path(run_dir)
        self.flags = [str(f) for f in flags] + ["--output_dir", str(self.dir)]

    def finished(self):
        """A finished run with these flags is already in the folder (run.json is written last)."""
        record = self.dir / "run.json"
        return record.is_file() and json.loads(record.read_text())["flags"] == self.flags

    def seconds(self):
        """Wall time of the training, evaluations included."""
        return json.loads((self.dir / "run.json").read_text())["seconds"]

    def rows(self):
        """log.txt: one dict per epoch."""
        return read_log(self.dir / "log.txt")

    def iterations(self):
        """iterations.jsonl: one dict per optimisation step."""
        return read_log(self.dir / "iterations.jsonl")

    def coco(self):
        """The final epoch's AP, AP50, AP75, APs, APm, APl in percent."""
        return [100 * v for v in self.rows()[-1]["test_coco_eval_bbox"][:6]]


def execute(run, threads):
    """Train one run in this process, its printout in stdout.txt; returns the wall time."""
    torch.set_num_threads(threads)
    if run.dir.exists():
        shutil.rmtree(run.dir)
    run.dir.mkdir(parents=True)
    start = time.time()
    with open(run.dir / "stdout.txt", "w") as out, contextlib.redirect_stdout(out):
        detr_main.main(parse_flags(run.flags))
    seconds = time.time() - start
    (run.dir / "run.json").write_text(json.dumps({"flags": run.flags, "seconds": seconds}))
    return seconds


def execute_all(runs, jobs, threads):
    """Run what is not finished yet, up to `jobs` at a time (one process each) with `threads`
    torch threads each (0: the CPUs shared among the runs at a time); prints progress."""
    todo = [r for r in runs if not r.finished()]
    for r in runs:
        if r not in todo:
            print(f"  reused   {r.dir}", flush=True)
    jobs = max(1, min(jobs, len(todo)))
    threads = threads or max(1, (os.cpu_count() or 1) // jobs)
    if jobs == 1:
        times = map(execute, todo, [threads] * len(todo))
        pool = contextlib.nullcontext()
    else:
        # spawn: a fresh interpreter per worker, no forked torch thread pools
        pool = multiprocessing.get_context("spawn").Pool(jobs)
        times = pool.imap(_execute_star, [(r, threads) for r in todo])
    with pool:
        for run, seconds in zip(todo, times):
            print(f"  {seconds:6.0f} s  {run.dir}", flush=True)


def _execute_star(args):
    return execute(*args)


# ----------------------------------------------------------------------------- study

def plan(preset, out, data_dir, num_classes):
    """The pretraining runs, the fine-tuning runs {(model, arm, seed): Run} and the ablation
    runs {(name, value): Run}."""
    data = preset["data"]
    common = ["--coco_path", data_dir, "--num_classes", num_classes,
              "--input_scale", data["image_size"] / 800]
    epochs, ft = preset["pretrain_epochs"], preset["finetune"]
    # learning rate x0.1 for the last fifth
    pretrain = {m: Run(out / "pretrain" / m, MODELS[m][1] + common + [
        "--epochs", epochs, "--lr_drop", max(epochs * 4 // 5, 1), "--batch_size", MODELS[m][2]["batch_size"],
        "--lr", MODELS[m][2]["lr"], "--lr_backbone", MODELS[m][2]["lr_backbone"], "--seed", 0])
        for m in preset["models"]}

    def finetune(model, arm, seed, extra=()):
        # The paper's recipe, scaled: one tenth of the pretraining learning rate, divided by 10
        # again for the last epoch; G = the true number of boxes of the batch (the paper's G = 256
        # is about the box count of its batches). The backbone is frozen (a third of the cost on
        # a CPU). The seed fixes the data order.
        return MODELS[model][1] + common + ARMS[arm][1] + [
            "--finetune", pretrain[model].dir / "checkpoint.pth", "--epochs", ft["epochs"],
            "--lr_drop", max(ft["epochs"] - 1, 1), "--batch_size", ft["batch_size"],
            "--lr", MODELS[model][2]["lr"] / 10 * ARMS[arm][2], "--lr_backbone", 0, "--dap_num_gt", 0,
            "--seed", seed, *extra]

    arms = {(m, a, s): Run(out / m / f"seed{s}" / a, finetune(m, a, s))
            for m in preset["models"] for a in ARMS for s in preset["seeds"]}
    ablations = {}
    if preset["ablations"]:
        model, seed = preset["models"][0], preset["seeds"][0]
        base = arms[(model, ABLATION_ARM, seed)]
        base_args = parse_flags(base.flags)
        for name, (_, flag, values) in ABLATIONS.items():
            for v in values:
                # the arm's own value is the arm's run
                ablations[(name, v)] = base if getattr(base_args, flag[2:]) == v else Run(
                    out / model / "ablations" / f"{name}_{v}", finetune(model, ABLATION_ARM, seed, (flag, v)))
    return pretrain, arms, ablations


def parse_flags(flags):
    return argparse.ArgumentParser(parents=[detr_main.get_args_parser()]).parse_args(flags)


# ----------------------------------------------------------------------------- tables

def mean_std(values):
    """'m ± s' (sample std over seeds), or 'm' for a single value; 'n/a' where COCO has no
    ground truth in that area range (it reports -1)."""
    if min(values) < 0:
        return "n/a"
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}"


def table_finetuning(preset, pretrain, arms):
    """The paper's Table 1 layout: one row per model and arm; each cell the mean ± std over
    seeds and, for the DAP arms, the difference of the means to the raw arm."""
    lines = ["| model | fine-tuning | " + " | ".join(COCO_NAMES) + " |", "|---|---|" + "---|" * len(COCO_NAMES)]
    for m in preset["models"]:
        title = MODELS[m][0]
        start = " | ".join(mean_std([v]) for v in pretrain[m].coco())
        lines.append(f"| {title} | start (pretrained) | {start} |")
        raw = [arms[(m, "raw", s)].coco() for s in preset["seeds"]]
        for arm, (label, *_) in ARMS.items():
            stats = [arms[(m, arm, s)].coco() for s in preset["seeds"]]
            cells = []
            for i in range(len(COCO_NAMES)):
                cell = mean_std([st[i] for st in stats])
                if arm != "raw" and cell != "n/a":
                    cell += f" ({statistics.mean(st[i] for st in stats) - statistics.mean(r[i] for r in raw):+.1f})"
                cells.append(cell)
            lines.append(f"| {title} | {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def table_paired(preset, arms):
    """AP of each arm minus the raw arm's, seed by seed (same data order and start)."""
    lines = ["| model | fine-tuning | ΔAP per seed | mean ± std | seeds better than raw |", "|---|---|---|---|---|"]
    for m in preset["models"]:
        for arm, (label, *_) in ARMS.items():
            if arm == "raw":
                continue
            deltas = [arms[(m, arm, s)].coco()[0] - arms[(m, "raw", s)].coco()[0] for s in preset["seeds"]]
            lines.append(f"| {MODELS[m][0]} | {label} | " + ", ".join(f"{d:+.1f}" for d in deltas)
                         + f" | {mean_std(deltas)} | {sum(d > 0 for d in deltas)} of {len(deltas)} |")
    return "\n".join(lines)


def table_ablations(ablations):
    """One column pair (value, AP) per ablated parameter, as the panels of the paper's Figure 3."""
    columns = [[(v, ablations[(name, v)].coco()[0]) for v in values] for name, (_, _, values) in ABLATIONS.items()]
    lines = ["| " + " | ".join(f"{title} | AP" for title, _, _ in ABLATIONS.values()) + " |",
             "|" + "---|---|" * len(ABLATIONS)]
    for i in range(max(len(c) for c in columns)):
        lines.append("| " + " | ".join(f"{c[i][0]} | {c[i][1]:.1f}" if i < len(c) else " | " for c in columns) + " |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- plots

CURVES = (("loss_ce_unscaled", "loss_ce"), ("loss_bbox_unscaled", "loss_bbox"), ("loss_giou_unscaled", "loss_giou"),
          ("loss_dap_unscaled", "loss_dap"), ("dap_value", "DAP value (training batch)"), ("AP", "AP (validation)"))
SMOOTHING = 10  # iterations in the trailing mean of the per-iteration curves


def trailing_mean(values, window):
    return [statistics.mean(values[max(0, i - window + 1):i + 1]) for i in range(len(values))]


def plot_finetune_curves(preset, model, pretrain, arms, out_path):
    """Training terms per iteration (mean over seeds, smoothed) and validation AP per epoch
    (from the pretrained checkpoint at epoch 0) of every arm."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(2, len(CURVES) // 2, figsize=(13, 7))
    for colour, (arm, (label, *_)) in enumerate(ARMS.items()):
        style = dict(label=label, color=f"C{colour}")  # one colour per arm in every panel
        runs = [arms[(model, arm, s)] for s in preset["seeds"]]
        steps = [r.iterations() for r in runs]
        logs = [r.rows() for r in runs]
        for ax, (field, title) in zip(axes.flat, CURVES):
            if field == "AP":
                values = [pretrain[model].coco()[0]] + [statistics.mean(100 * log[i]["test_coco_eval_bbox"][0]
                                                                         for log in logs) for i in range(len(logs[0]))]
                ax.plot(range(len(values)), values, marker="o", **style)
                ax.set_xlabel("fine-tuning epoch")
            else:
                if field in steps[0][0]:
                    values = [statistics.mean(run[i][field] for run in steps) for i in range(len(steps[0]))]
                    ax.plot(range(1, len(values) + 1), trailing_mean(values, SMOOTHING), **style)
                ax.set_xlabel("iteration")
            ax.set_title(title)
    axes.flat[-1].legend(fontsize=8)
    fig.suptitle(f"{MODELS[model][0]}: fine-tuning, mean over {len(preset['seeds'])} seed(s); "
                 f"training terms smoothed over {SMOOTHING} iterations")
    fig.tight_layout()
    fig.savefig(out_path, dpi=90)
    plt.close(fig)


def plot_ablations(ablations, raw_ap, out_path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(ABLATIONS), figsize=(4.5 * len(ABLATIONS), 3.6))
    for ax, (name, (title, _, values)) in zip(axes, ABLATIONS.items()):
        ax.plot(values, [ablations[(name, v)].coco()[0] for v in values], marker="o", label="DAP")
        ax.axhline(raw_ap, color="gray", linestyle="--", label="raw arm")
        ax.set_xscale("log", base=2)
        ax.set_xticks(values, [str(v) for v in values])
        ax.set_xlabel(title)
        ax.set_ylabel("AP")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(out_path, dpi=90)
    plt.close(fig)


def write_plots(preset, out, pretrain, arms, ablations):
    """All PNGs into out; returns their names."""
    plot_logs([pretrain[m].dir for m in preset["models"]], fields=("train_loss", "test_loss", "mAP"),
              out_path=out / "pretrain.png")
    names = ["pretrain.png"]
    for m in preset["models"]:
        plot_finetune_curves(preset, m, pretrain, arms, out / f"{m}_finetune_curves.png")
        seed = preset["seeds"][0]
        # the arms first: they get the colours of the curves plot
        plot_precision_recall([arms[(m, a, seed)].dir / "eval" / "latest.pth" for a in ARMS]
                              + [pretrain[m].dir / "eval" / "latest.pth"],
                              names=[label for label, *_ in ARMS.values()] + ["start (pretrained)"],
                              out_path=out / f"{m}_precision_recall.png")
        names += [f"{m}_finetune_curves.png", f"{m}_precision_recall.png"]
    if ablations:
        model, seed = preset["models"][0], preset["seeds"][0]
        plot_ablations(ablations, arms[(model, "raw", seed)].coco()[0], out / "ablations.png")
        names.append("ablations.png")
    return names


# ----------------------------------------------------------------------------- main

def machine():
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):  # Linux names the CPU model here
        cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
                   cpu)
    return (f"{cpu}, {os.cpu_count()} logical CPUs visible, Python {platform.python_version()}, "
            f"torch {torch.__version__}")


def write_results(path, preset_name, preset, command, data_info, pretrain, arms, ablations, plots, timings):
    data = preset["data"]
    ft = preset["finetune"]
    sections = [
        f"# CPU mini-study ({preset_name})",
        f"Command: `{command}`  \nMachine: {machine()}  \n"
        f"Wall time of this call: {timings['total'] / 60:.1f} min (data {timings['data']:.0f} s, pretraining "
        f"{timings['pretrain'] / 60:.1f} min, fine-tuning and ablations {timings['finetune'] / 60:.1f} min; "
        f"runs reused from an earlier call take none), up to {timings['jobs']} run(s) at a time with "
        + (f"{timings['threads']} thread(s) each" if timings["threads"] else "the CPUs shared among them")
        + ".  \n"
        f"Training time summed over the runs: pretraining "
        f"{sum(r.seconds() for r in pretrain.values()) / 60:.1f} min, fine-tuning arms "
        f"{sum(r.seconds() for r in arms.values()) / 60:.1f} min, ablations "
        f"{sum(r.seconds() for r in set(ablations.values()) - set(arms.values())) / 60:.1f} min.",
        f"Data: {data['num_train']} training and {data['num_val']} validation images of {data['image_size']} px, "
        f"{len(data_info['categories'])} classes ({', '.join(data_info['categories'].values())}), "
        f"1-{data['max_objects']} objects per image; validation objects: {data_info['val']['small']} small, "
        f"{data_info['val']['medium']} medium, {data_info['val']['large']} large (COCO area ranges).",
        f"Fine-tuning: {ft['epochs']} epochs from the pretrained checkpoint, batch {ft['batch_size']}, "
        f"seeds {', '.join(map(str, preset['seeds']))} (a seed fixes the data order, the same for every arm).",
        "## Fine-tuning arms (layout of the paper's Table 1)",
        "COCO box AP on the validation set after fine-tuning, in percent: mean ± std over seeds "
        "(difference of the means to the raw arm).",
        table_finetuning(preset, pretrain, arms),
        "### Paired differences to the raw arm",
        table_paired(preset, arms),
    ]
    if ablations:
        model, seed = preset["models"][0], preset["seeds"][0]
        label = ARMS[ABLATION_ARM][0]
        sections += [
            "## Ablations (compare the trends of the paper's Figure 3)",
            f"{MODELS[model][0]}, {label}, seed {seed}; one parameter changed at a time from the arm's "
            f"(σ 0.05, N 32, batch {ft['batch_size']}). Raw arm, same seed: AP "
            f"{arms[(model, 'raw', seed)].coco()[0]:.1f}.",
            table_ablations(ablations),
        ]
    sections += ["## Plots", "\n".join(f"![{p}]({p})" for p in plots)]
    path.write_text("\n\n".join(sections) + "\n")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", help="data, runs, results.md and plots (default: outputs/mini_study[_quick|_smoke])")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", dest="preset", action="store_const", const="quick",
                      help="one model, one seed, no ablations: a few minutes (the README demo)")
    size.add_argument("--smoke", dest="preset", action="store_const", const="smoke",
                      help="a handful of tiny images, one epoch each: seconds (the tests)")
    p.add_argument("--seeds", type=int, nargs="+", help="fine-tuning seeds (default: the preset's)")
    p.add_argument("--jobs", type=int, default=2, help="runs trained at the same time, one process each")
    p.add_argument("--threads", type=int, default=0,
                   help="torch threads per run; 0 = the CPUs shared among the runs trained at a time")
    opts = p.parse_args()
    preset_name = opts.preset or "full"
    preset = dict(PRESETS[preset_name])
    if opts.seeds:
        preset["seeds"] = tuple(opts.seeds)
    out = Path(opts.out or "outputs/mini_study" + ("" if preset_name == "full" else f"_{preset_name}")).resolve()
    out.mkdir(parents=True, exist_ok=True)
    # Runs are reused by their flags, which do not name the data: one folder, one data set.
    settings = json.dumps(preset["data"], sort_keys=True)
    if (out / "data.json").is_file() and (out / "data.json").read_text() != settings:
        raise UserInputError(f"{out} holds a study on other data ({(out / 'data.json').read_text()}); "
                             f"pass another --out or delete that folder")
    (out / "data.json").write_text(settings)
    command = "python -m scripts.mini_study " + " ".join(sys.argv[1:])
    timings = {"jobs": opts.jobs, "threads": opts.threads}

    start = time.time()
    data_dir = out / "data"
    data_info = make_synthetic_coco(data_dir, seed=0, **preset["data"])
    timings["data"] = time.time() - start
    pretrain, arms, ablations = plan(preset, out, str(data_dir), data_info["num_classes"])

    print(f"== pretraining {', '.join(preset['models'])} (raw losses) ==", flush=True)
    step = time.time()
    execute_all(list(pretrain.values()), opts.jobs, opts.threads)
    timings["pretrain"] = time.time() - step
    print(f"== fine-tuning: {len(arms)} arm runs, {len(set(ablations.values()) - set(arms.values()))} "
          f"ablation runs ==", flush=True)
    step = time.time()
    # longest first (Deformable DETR, small batches) keeps the workers busy to the end
    runs = sorted(set(arms.values()) | set(ablations.values()),
                  key=lambda r: ("deformable" not in str(r.dir), "batch_2" not in str(r.dir)))
    execute_all(runs, opts.jobs, opts.threads)
    timings["finetune"] = time.time() - step
    timings["total"] = time.time() - start

    plots = write_plots(preset, out, pretrain, arms, ablations)
    write_results(out / "results.md", preset_name, preset, command, data_info, pretrain, arms, ablations,
                  plots, timings)
    print((out / "results.md").read_text())
    print(f"Written: {out / 'results.md'} and {len(plots)} plots in {out}")


if __name__ == "__main__":
    try:
        main()
    except UserInputError as e:
        sys.stderr.write(f"error: {e}\n")
        sys.exit(2)
