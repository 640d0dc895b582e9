"""CPU mini-study, the ranking-loss arena: fine-tuning with DAP-loss, the earlier ranking losses
and raw DETR losses at several learning rates, from the same checkpoints, over several seeds.

    python -m scripts.mini_study            # whole study: about 85 min on 2 quiet CPU cores
    python -m scripts.mini_study --quick    # DETR only, one seed pair, 7 arms, no ablations: about 3.5 min
                                            # (the README demo)
    python -m scripts.mini_study --smoke    # a handful of tiny images: about 40 s (what the tests run)

1. generate a synthetic COCO-format dataset (datasets/synthetic.py);
2. pretrain each tiny detector (DETR, Deformable DETR) with the raw losses, once per pretraining
   seed (--seed p: another initialisation and data order, so another checkpoint);
3. fine-tune each pretraining seed's checkpoint with every arm (ARMS: raw at 1x, 3x and 10x the
   recipe's learning rate; DAP with the Hungarian, the constant and the momentum AP-cost matcher;
   raw + DAP; AP-Loss; Rank & Sort Loss; aLRP Loss), for several fine-tuning seeds: within a
   seed pair (p, f) every arm starts from p's checkpoint and sees the same data order;
4. ablations of the DAP (constant matcher) arm on the first detector (σ, N, batch size; the
   paper's Figure 3), first seed pair;
5. write results.md (the tables: mean ± std, paired differences to raw's best learning rate with
   95 % t-intervals over pretraining seeds, the spread across pretraining seeds) and PNG plots
   into --out.

Sizes: full = 2 models x 10 arms x (3 pretraining x 2 fine-tuning seeds) = 120 fine-tuning runs,
6 pretraining runs, 11 ablation runs. Measured (docs/RESULTS.md; one thread each, two runs at a
time on 2 cores): a fine-tuning run 47-53 s (DETR) / 65-72 s (Deformable DETR), a pretraining run
7-12 min; 114 min wall with other jobs sharing the cores for about half of it, about 85 min alone.
quick = DETR, 1 x 1 seed pair, arms raw, raw 10x, DAP constant, DAP momentum, raw + DAP,
AP-Loss, RS Loss: 1 pretraining and 7 fine-tuning runs (a ranking-loss run takes as long as a
raw one): about 3.5 min alone on 2 cores (estimated), 4.6 min measured with other jobs sharing
them. smoke = both models, every arm, 2 x 1 seed pairs on 8 images of 64 px.

An arm whose --loss main.py does not accept (yet) is skipped with a note. Every run is main.py
with flags (its folder keeps log.txt, eval/latest.pth and stdout.txt). A run whose folder holds
a finished run with the same flags is reused, so a second call only redoes what changed, the
tables and the plots; a run that was stopped (killed, a full disk) continues from its last
checkpoint. One study at a time per --out: the folder is locked while it runs.
"""
import argparse
import contextlib
import ctypes
import json
import math
import multiprocessing
import os
import platform
import re
import shutil
import signal
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from scipy import stats as scipy_stats

import main as detr_main
from datasets.synthetic import make_synthetic_coco
from util.errors import UserInputError
from util.output_dir import exclusive_lock, write_atomically
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
# name: (title, flags, learning rate in units of the recipe's). One line per arm: an arm added
# here runs in the full study (and is skipped with a note while main.py's --loss rejects it).
# The raw arms (flags exactly --loss raw) are the control, swept over the learning rate: every
# other arm is compared with the best of them, so that a gain is not merely that of pushing the
# model harder. The ranking losses train on DAP's positives and negatives with the Hungarian
# matcher (docs/LOSSES.md).
ARMS = {
    "raw": ("raw", ["--loss", "raw"], 1),
    "raw_lr3": ("raw, 3x learning rate", ["--loss", "raw"], 3),
    "raw_lr10": ("raw, 10x learning rate", ["--loss", "raw"], 10),
    "dap_hungarian": ("DAP, Hungarian matcher", ["--loss", "dap", "--matcher", "hungarian"], 1),
    "dap_constant": ("DAP, constant matcher", ["--loss", "dap", "--matcher", "dap", "--dap_cost_mode", "constant"], 1),
    "dap_momentum": ("DAP, momentum matcher", ["--loss", "dap", "--matcher", "dap", "--dap_cost_mode", "momentum"], 1),
    "raw+dap": ("raw + DAP", ["--loss", "raw+dap"], 1),
    "ap": ("AP-Loss", ["--loss", "ap", "--matcher", "hungarian"], 1),
    "rs": ("Rank & Sort Loss", ["--loss", "rs", "--matcher", "hungarian"], 1),
    "alrp": ("aLRP Loss", ["--loss", "alrp", "--matcher", "hungarian"], 1),
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
QUICK_ARMS = ("raw", "raw_lr10", "dap_constant", "dap_momentum", "raw+dap", "ap", "rs")
PRESETS = {
    "full": dict(data=dict(DATA, num_train=1000, num_val=200), pretrain_epochs=10,
                 finetune=dict(epochs=2, batch_size=8), pretrain_seeds=(0, 1, 2), finetune_seeds=(0, 1),
                 models=("detr", "deformable_detr"), arms=tuple(ARMS), ablations=True),
    "quick": dict(data=dict(DATA, num_train=600, num_val=100), pretrain_epochs=5,
                  finetune=dict(epochs=2, batch_size=8), pretrain_seeds=(0,), finetune_seeds=(0,),
                  models=("detr",), arms=QUICK_ARMS, ablations=False),
    "smoke": dict(data=dict(DATA, num_train=8, num_val=4, image_size=64), pretrain_epochs=1,
                  finetune=dict(epochs=1, batch_size=4), pretrain_seeds=(0, 1), finetune_seeds=(0,),
                  models=("detr", "deformable_detr"), arms=tuple(ARMS), ablations=False),
}
CONFIDENCE = 0.95


def is_raw(arm):
    """A raw control arm: the upstream losses, only the learning rate changed."""
    return ARMS[arm][1] == ["--loss", "raw"]


def arm_loss(arm):
    flags = ARMS[arm][1]
    return flags[flags.index("--loss") + 1]


def finetune_seed(pretrain_seed, seed):
    """main.py's --seed of fine-tuning seed `seed` of pretraining seed `pretrain_seed`: fixes the
    data order, the same for every arm of the pair, another one for every pair (pretraining seed 0
    keeps the plain seed, as the earlier one-checkpoint study)."""
    if not 0 <= seed < 100:
        raise UserInputError(f"fine-tuning seeds are 0 to 99, not {seed}")
    return 100 * pretrain_seed + seed


# ----------------------------------------------------------------------------- runs

# What the study reads from a finished run's folder (finished() checks they are there).
RUN_OUTPUTS = ("log.txt", "iterations.jsonl", "eval/latest.pth")


def read_json(path):
    """The JSON in path, or None where it is missing or unreadable (cut short by a kill or a full
    disk)."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def write_file(path, text):
    """path holds text or its old content, never a part: a kill or a full disk mid-write leaves at
    most path.tmp."""
    write_atomically(path, lambda tmp: tmp.write_text(text))


class Run:
    """One main.py training run into its own folder. keep_checkpoint: whether its checkpoints stay
    once it has finished; the study reads only the logs and eval/ of a fine-tuning run, and its
    checkpoint (about 100 MB: weights and optimizer state) times the 130 runs of the full study
    would fill a disk."""

    def __init__(self, run_dir, flags, keep_checkpoint=False):
        self.dir = Path(run_dir)
        self.flags = [str(f) for f in flags] + ["--output_dir", str(self.dir)]
        self.keep_checkpoint = keep_checkpoint

    def finished(self):
        """A finished run with these flags is already in the folder: run.json (written once it has
        finished) names them, and the outputs the study reads are there. An unreadable run.json
        counts as not finished: the run is redone."""
        record = read_json(self.dir / "run.json")
        outputs = RUN_OUTPUTS + (("checkpoint.pth",) if self.keep_checkpoint else ())
        return (isinstance(record, dict) and record.get("flags") == self.flags
                and all((self.dir / name).is_file() for name in outputs))

    def resumable(self):
        """Whether the folder holds a checkpoint of a stopped start of this run: started.json
        (written before main.py starts) names the same flags."""
        return read_json(self.dir / "started.json") == {"flags": self.flags} and \
            (self.dir / "checkpoint.pth").is_file()

    def resume_flags(self):
        """main.py's flags continuing from checkpoint.pth: its whole training state replaces the
        --finetune weights (main.py takes one or the other)."""
        flags = list(self.flags)
        if "--finetune" in flags:
            i = flags.index("--finetune")
            del flags[i:i + 2]
        return flags + ["--resume", str(self.dir / "checkpoint.pth")]

    def drop_checkpoints(self):
        if not self.keep_checkpoint:
            for checkpoint in self.dir.glob("checkpoint*.pth"):
                checkpoint.unlink()

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
    """Train one run in this process, its printout in stdout.txt; returns the wall time (of this
    call: a resumed run's earlier part is not counted). A stopped start of the same run continues
    from its checkpoint; anything else in the folder is removed first."""
    torch.set_num_threads(threads)
    resume = run.resumable()
    if not resume:
        if run.dir.exists():
            shutil.rmtree(run.dir)
        run.dir.mkdir(parents=True)
        write_file(run.dir / "started.json", json.dumps({"flags": run.flags}))
    start = time.time()
    with open(run.dir / "stdout.txt", "a" if resume else "w") as out, contextlib.redirect_stdout(out):
        detr_main.main(parse_flags(run.resume_flags() if resume else run.flags))
    seconds = time.time() - start
    # run.json first: stopped in between, the run is finished and its checkpoints are dropped on
    # the next call, rather than trained again
    write_file(run.dir / "run.json", json.dumps({"flags": run.flags, "seconds": seconds}))
    run.drop_checkpoints()
    return seconds


def die_with_parent(parent):
    """Pool initializer: the worker is killed when the study's process ends, however it ends
    (SIGKILL too), instead of training on into a folder that a rerun starts over (Linux; elsewhere
    only a parent already gone is noticed)."""
    if sys.platform.startswith("linux"):
        pr_set_pdeathsig = 1  # <linux/prctl.h>
        ctypes.CDLL(None).prctl(pr_set_pdeathsig, int(signal.SIGKILL))
    if os.getppid() != parent:  # it ended before the prctl
        os._exit(1)


def worker_pool(jobs):
    # spawn: a fresh interpreter per worker, no forked torch thread pools
    return multiprocessing.get_context("spawn").Pool(jobs, initializer=die_with_parent, initargs=(os.getpid(),))


def execute_all(runs, jobs, threads):
    """Run what is not finished yet, up to `jobs` at a time (one process each) with `threads`
    torch threads each (0: the CPUs shared among the runs at a time); prints progress."""
    todo = [r for r in runs if not r.finished()]
    for r in runs:
        if r not in todo:
            print(f"  reused   {r.dir}", flush=True)
            r.drop_checkpoints()  # left by a stop between run.json and their removal
    jobs = max(1, min(jobs, len(todo)))
    threads = threads or max(1, (os.cpu_count() or 1) // jobs)
    if jobs == 1:
        times = map(execute, todo, [threads] * len(todo))
        pool = contextlib.nullcontext()
    else:
        pool = worker_pool(jobs)
        times = pool.imap(_execute_star, [(r, threads) for r in todo])
    with pool:
        for run, seconds in zip(todo, times):
            print(f"  {seconds:6.0f} s  {run.dir}", flush=True)


def _execute_star(args):
    return execute(*args)


# ----------------------------------------------------------------------------- study

@dataclass
class Study:
    """The runs of one study: pretrain {(model, pretraining seed): Run}, arms {(model, arm,
    pretraining seed, fine-tuning seed): Run}, ablations {(name, value): Run}, and the arms run
    (the preset's, less those main.py does not accept), in ARMS order."""
    preset: dict
    pretrain: dict
    arms: dict
    ablations: dict
    arm_names: tuple

    @property
    def pairs(self):
        """The (pretraining seed, fine-tuning seed) pairs, grouped by pretraining seed."""
        return [(p, f) for p in self.preset["pretrain_seeds"] for f in self.preset["finetune_seeds"]]

    def values(self, model, arm, index=0):
        """{(p, f): the final COCO number `index` (0 = AP) of the arm's run of that pair}."""
        return {(p, f): self.arms[(model, arm, p, f)].coco()[index] for p, f in self.pairs}

    def start(self, model, index=0):
        """{p: the COCO number of pretraining seed p's checkpoint}."""
        return {p: self.pretrain[(model, p)].coco()[index] for p in self.preset["pretrain_seeds"]}


def accepted_losses():
    """The --loss values main.py's parser accepts."""
    action = next(a for a in detr_main.get_args_parser()._actions if "--loss" in a.option_strings)
    return set(action.choices)


def supported_arms(names):
    """The arms among `names` (in ARMS order) whose --loss main.py accepts; prints a note for
    each one skipped."""
    accepted = accepted_losses()
    kept = []
    for arm in ARMS:
        if arm not in names:
            continue
        if arm_loss(arm) in accepted:
            kept.append(arm)
        else:
            print(f"note: arm {arm!r} ({ARMS[arm][0]}) skipped: main.py does not accept --loss {arm_loss(arm)} "
                  f"yet", flush=True)
    if not any(is_raw(a) for a in kept):
        raise UserInputError("the study needs a raw arm (every other arm is compared with raw's best)")
    return tuple(kept)


def plan(preset, out, data_dir, num_classes):
    """The Study: every run's folder and flags (nothing is run)."""
    data = preset["data"]
    common = ["--coco_path", data_dir, "--num_classes", num_classes,
              "--input_scale", data["image_size"] / 800]
    epochs, ft = preset["pretrain_epochs"], preset["finetune"]
    arm_names = supported_arms(preset["arms"])
    # learning rate x0.1 for the last fifth; the seed changes the initialisation and data order
    pretrain = {(m, p): Run(out / "pretrain" / f"{m}_seed{p}", MODELS[m][1] + common + [
        "--epochs", epochs, "--lr_drop", max(epochs * 4 // 5, 1), "--batch_size", MODELS[m][2]["batch_size"],
        "--lr", MODELS[m][2]["lr"], "--lr_backbone", MODELS[m][2]["lr_backbone"], "--seed", p],
        keep_checkpoint=True)  # every fine-tuning run starts from it
        for m in preset["models"] for p in preset["pretrain_seeds"]}

    def finetune(model, arm, p, f, extra=()):
        # The paper's recipe, scaled: one tenth of the pretraining learning rate (times the arm's
        # factor), divided by 10 again for the last epoch; G = the true number of boxes of the
        # batch (the paper's G = 256 is about the box count of its batches). The backbone is
        # frozen (a third of the cost on a CPU). The seed fixes the data order.
        lr = float(f"{MODELS[model][2]['lr'] / 10 * ARMS[arm][2]:.6g}")
        return MODELS[model][1] + common + ARMS[arm][1] + [
            "--finetune", pretrain[(model, p)].dir / "checkpoint.pth", "--epochs", ft["epochs"],
            "--lr_drop", max(ft["epochs"] - 1, 1), "--batch_size", ft["batch_size"],
            "--lr", lr, "--lr_backbone", 0, "--dap_num_gt", 0, "--seed", finetune_seed(p, f), *extra]

    pairs = [(p, f) for p in preset["pretrain_seeds"] for f in preset["finetune_seeds"]]
    arms = {(m, a, p, f): Run(out / m / f"pretrain{p}_seed{f}" / a, finetune(m, a, p, f))
            for m in preset["models"] for a in arm_names for p, f in pairs}
    ablations = {}
    if preset["ablations"] and ABLATION_ARM in arm_names:
        model, (p, f) = preset["models"][0], pairs[0]
        base = arms[(model, ABLATION_ARM, p, f)]
        base_args = parse_flags(base.flags)
        for name, (_, flag, values) in ABLATIONS.items():
            for v in values:
                # the arm's own value is the arm's run
                ablations[(name, v)] = base if getattr(base_args, flag[2:]) == v else Run(
                    out / model / "ablations" / f"{name}_{v}", finetune(model, ABLATION_ARM, p, f, (flag, v)))
    return Study(preset, pretrain, arms, ablations, arm_names)


def parse_flags(flags):
    return argparse.ArgumentParser(parents=[detr_main.get_args_parser()]).parse_args(flags)


# ----------------------------------------------------------------------------- statistics

def mean_std(values):
    """'m ± s' (sample std), or 'm' for a single value; 'n/a' where COCO has no ground truth in
    that area range (it reports -1)."""
    if min(values) < 0:
        return "n/a"
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}"


def t_quantile(df, confidence=CONFIDENCE):
    """Student's t quantile of a two-sided interval: 12.71, 4.30, 3.18, 2.78 for df = 1, 2, 3, 4
    at 95 %."""
    return float(scipy_stats.t.ppf((1 + confidence) / 2, df))


def t_interval(values, confidence=CONFIDENCE):
    """(mean, (low, high)): the two-sided Student t-interval for the mean of independent values,
    mean ± t(n-1) s / sqrt(n); (mean, None) for a single value."""
    mean = statistics.mean(values)
    if len(values) < 2:
        return mean, None
    half = t_quantile(len(values) - 1, confidence) * statistics.stdev(values) / math.sqrt(len(values))
    return mean, (mean - half, mean + half)


def by_pretraining_seed(values):
    """{(p, f): x} -> {p: mean of x over p's fine-tuning seeds}, in the order of p."""
    groups = {}
    for (p, _), x in values.items():
        groups.setdefault(p, []).append(x)
    return {p: statistics.mean(xs) for p, xs in groups.items()}


def paired_differences(study, model, arm, reference, index=0):
    """{(p, f): the arm's COCO number `index` minus the reference arm's, same seed pair (same
    checkpoint, same data order)}."""
    values, ref = study.values(model, arm, index), study.values(model, reference, index)
    return {pair: values[pair] - ref[pair] for pair in values}


def summarize_differences(diffs, confidence=CONFIDENCE):
    """Paired differences {(p, f): Δ} -> mean, t-interval and counts. The pairs of one
    pretraining seed share their checkpoint, so they are not independent: with 2 or more
    pretraining seeds, Δ is averaged over each one's fine-tuning seeds first and the interval is
    over those means (units 'pretraining seeds'); with a single pretraining seed it is over its
    fine-tuning seeds (data-order noise only); with a single pair there is none (ci None)."""
    clusters = by_pretraining_seed(diffs)
    units, values = (("pretraining seeds", list(clusters.values())) if len(clusters) > 1
                     else ("fine-tuning seeds", list(diffs.values())))
    mean, ci = t_interval(values, confidence)
    return dict(mean=mean, ci=ci, n=len(values), units=units, better=sum(d > 0 for d in diffs.values()),
                pairs=len(diffs))


def verdict(ci, reference="raw's best"):
    """Whether the interval excludes zero."""
    if ci is None:
        return "no interval (one seed pair)"
    if ci[0] > 0:
        return f"survives (above {reference})"
    if ci[1] < 0:
        return f"survives (below {reference})"
    return "does not survive (CI includes 0)"


def best_raw(study, model):
    """The raw arm (learning rate) with the highest validation AP averaged over all seed pairs;
    on a tie the first in ARMS order (the lowest rate)."""
    raws = [a for a in study.arm_names if is_raw(a)]
    return max(raws, key=lambda a: statistics.mean(study.values(model, a).values()))


# ----------------------------------------------------------------------------- tables

def signed(x):
    return f"{x:+.1f}"


def interval(summary):
    """'+m [+lo, +hi]' or '+m' without an interval."""
    ci = summary["ci"]
    return signed(summary["mean"]) + (f" [{signed(ci[0])}, {signed(ci[1])}]" if ci else "")


def finetune_lr(model, arm):
    return float(f"{MODELS[model][2]['lr'] / 10 * ARMS[arm][2]:.6g}")


def table_raw_sweep(study):
    """The raw arms' learning rates and their AP averaged over all seed pairs; the best marked."""
    lines = ["| model | raw arm | fine-tuning lr | AP, mean over seed pairs | |", "|---|---|---|---|---|"]
    for m in study.preset["models"]:
        best = best_raw(study, m)
        for arm in (a for a in study.arm_names if is_raw(a)):
            ap = statistics.mean(study.values(m, arm).values())
            lines.append(f"| {MODELS[m][0]} | {ARMS[arm][0]} | {finetune_lr(m, arm):g} | {ap:.2f} | "
                         + ("raw's best" if arm == best else "") + " |")
    return "\n".join(lines)


def table_finetuning(study):
    """The paper's Table 1 layout: one row per model and arm; each cell the mean ± std over all
    seed pairs and, for every arm but raw's best, the difference of the means to raw's best."""
    lines = ["| model | fine-tuning | " + " | ".join(COCO_NAMES) + " |", "|---|---|" + "---|" * len(COCO_NAMES)]
    for m in study.preset["models"]:
        title = MODELS[m][0]
        start = " | ".join(mean_std(list(study.start(m, i).values())) for i in range(len(COCO_NAMES)))
        lines.append(f"| {title} | start (pretrained) | {start} |")
        best = best_raw(study, m)
        for arm in study.arm_names:
            cells = []
            for i in range(len(COCO_NAMES)):
                values = list(study.values(m, arm, i).values())
                cell = mean_std(values)
                if arm != best and cell != "n/a":
                    cell += f" ({signed(statistics.mean(values) - statistics.mean(study.values(m, best, i).values()))})"
                cells.append(cell)
            label = ARMS[arm][0] + (" (raw's best)" if arm == best else "")
            lines.append(f"| {title} | {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def grouped_differences(study, diffs):
    """The paired differences per seed pair, '/' between pretraining seeds."""
    return " / ".join(", ".join(signed(diffs[(p, f)]) for f in study.preset["finetune_seeds"])
                      for p in study.preset["pretrain_seeds"])


def table_paired(study):
    """ΔAP = AP(arm) − AP(raw's best) per seed pair; its mean, 95 % t-interval, the pairs better
    than raw's best and whether the interval excludes 0; one row per model and arm but raw's best."""
    pct = f"{CONFIDENCE:.0%}"
    lines = [f"| model | fine-tuning | ΔAP per seed pair | mean ΔAP [{pct} CI] | pairs better than raw's best "
             "| verdict |", "|---|---|---|---|---|---|"]
    for m in study.preset["models"]:
        best = best_raw(study, m)
        for arm in study.arm_names:
            if arm == best:
                continue
            diffs = paired_differences(study, m, arm, best)
            s = summarize_differences(diffs)
            lines.append(f"| {MODELS[m][0]} | {ARMS[arm][0]} | {grouped_differences(study, diffs)} | {interval(s)} | "
                         f"{s['better']} of {s['pairs']} | {verdict(s['ci'])} |")
    return "\n".join(lines)


DAP_ARMS = ("dap_hungarian", "dap_constant", "dap_momentum")
RANKING_ARMS = ("ap", "rs", "alrp")


def head_to_head_comparisons(study):
    """(arm, reference) pairs present in the study: each DAP arm against each ranking loss, then
    every AP-style arm against raw at the same (the recipe's) learning rate."""
    pairs = [(d, r) for d in DAP_ARMS for r in RANKING_ARMS]
    pairs += [(a, "raw") for a in (*DAP_ARMS, "raw+dap", *RANKING_ARMS)]
    return [(a, r) for a, r in pairs if a in study.arm_names and r in study.arm_names]


def table_head_to_head(study):
    """The paired method of table_paired, arm against arm (head_to_head_comparisons)."""
    pct = f"{CONFIDENCE:.0%}"
    lines = [f"| model | fine-tuning | against | ΔAP per seed pair | mean ΔAP [{pct} CI] | pairs better | verdict |",
             "|---|---|---|---|---|---|---|"]
    for m in study.preset["models"]:
        for arm, reference in head_to_head_comparisons(study):
            diffs = paired_differences(study, m, arm, reference)
            s = summarize_differences(diffs)
            lines.append(f"| {MODELS[m][0]} | {ARMS[arm][0]} | {ARMS[reference][0]} | "
                         f"{grouped_differences(study, diffs)} | {interval(s)} | {s['better']} of {s['pairs']} | "
                         f"{verdict(s['ci'], ARMS[reference][0])} |")
    return "\n".join(lines)


def table_paired_ap50_ap75(study):
    """The same paired differences for AP50 and AP75 (raw's best still chosen on AP)."""
    pct = f"{CONFIDENCE:.0%}"
    lines = [f"| model | fine-tuning | mean ΔAP50 [{pct} CI] | verdict | mean ΔAP75 [{pct} CI] | verdict |",
             "|---|---|---|---|---|---|"]
    for m in study.preset["models"]:
        best = best_raw(study, m)
        for arm in study.arm_names:
            if arm == best:
                continue
            cells = []
            for index in (COCO_NAMES.index("AP50"), COCO_NAMES.index("AP75")):
                s = summarize_differences(paired_differences(study, m, arm, best, index))
                cells += [interval(s), verdict(s["ci"])]
            lines.append(f"| {MODELS[m][0]} | {ARMS[arm][0]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def table_spread(study):
    """How much the absolute AP moves with the pretraining run: per model, the start and every
    arm's AP per pretraining seed (mean over its fine-tuning seeds), their std and range across
    pretraining seeds, and for comparison the std across fine-tuning seeds (pooled within the
    pretraining seeds)."""
    seeds = study.preset["pretrain_seeds"]
    lines = ["| model | fine-tuning | AP per pretraining seed (" + ", ".join(map(str, seeds)) + ") | std across "
             "pretraining seeds | max − min | std across fine-tuning seeds (pooled) |", "|---|---|---|---|---|---|"]

    def row(title, label, per_seed, pooled):
        values = list(per_seed.values())
        spread = (f"{statistics.stdev(values):.2f} | {max(values) - min(values):.2f}" if len(values) > 1
                  else "n/a | n/a")
        return f"| {title} | {label} | " + ", ".join(f"{v:.1f}" for v in values) + f" | {spread} | {pooled} |"

    for m in study.preset["models"]:
        title = MODELS[m][0]
        lines.append(row(title, "start (pretrained)", study.start(m), "—"))
        for arm in study.arm_names:
            values = study.values(m, arm)
            pooled = "n/a"
            if len(study.preset["finetune_seeds"]) > 1:
                variances = [statistics.variance([values[(p, f)] for f in study.preset["finetune_seeds"]])
                             for p in seeds]
                pooled = f"{math.sqrt(statistics.mean(variances)):.2f}"
            lines.append(row(title, ARMS[arm][0], by_pretraining_seed(values), pooled))
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

# the final layer's loss terms, as logged per iteration (not their auxiliary copies loss_*_0)
TERM = re.compile(r"loss_[a-z]+(?:_[a-z]+)*_unscaled")
SMOOTHING = 10  # iterations in the trailing mean of the per-iteration curves


def trailing_mean(values, window):
    return [statistics.mean(values[max(0, i - window + 1):i + 1]) for i in range(len(values))]


def colour(arm):
    """One colour per arm in every plot of every preset."""
    return f"C{list(ARMS).index(arm) % 10}"


def curve_fields(study, model):
    """The per-iteration fields to plot: every arm's own loss terms (final layer), in ARMS order,
    then DAP's value on the training batch where an arm logs it."""
    fields = []
    for arm in study.arm_names:
        for key in study.arms[(model, arm, *study.pairs[0])].iterations()[0]:
            if (TERM.fullmatch(key) or key == "dap_value") and key not in fields:
                fields.append(key)
    return sorted(fields, key=lambda k: k == "dap_value")  # stable: the DAP value last


def plot_finetune_curves(study, model, out_path):
    """Training terms per iteration (mean over seed pairs, smoothed) and validation AP per epoch
    (from the pretrained checkpoints at epoch 0) of every arm."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fields = curve_fields(study, model)
    cols = 4
    rows = math.ceil((len(fields) + 1) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3.2 * rows), squeeze=False)
    panels = {field: ax for field, ax in zip([*fields, "AP"], axes.flat)}
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    start = statistics.mean(study.start(model).values())
    for arm in study.arm_names:
        style = dict(label=ARMS[arm][0], color=colour(arm))
        runs = [study.arms[(model, arm, p, f)] for p, f in study.pairs]
        steps = [r.iterations() for r in runs]
        logs = [r.rows() for r in runs]
        for field in fields:
            if field in steps[0][0]:
                values = [statistics.mean(run[i][field] for run in steps) for i in range(len(steps[0]))]
                panels[field].plot(range(1, len(values) + 1), trailing_mean(values, SMOOTHING), **style)
        values = [start] + [statistics.mean(100 * log[i]["test_coco_eval_bbox"][0] for log in logs)
                            for i in range(len(logs[0]))]
        panels["AP"].plot(range(len(values)), values, marker="o", **style)
    for field, ax in panels.items():
        ax.set_title("AP (validation)" if field == "AP" else
                     "DAP value (training batch)" if field == "dap_value" else field.removesuffix("_unscaled"))
        ax.set_xlabel("fine-tuning epoch" if field == "AP" else "iteration")
    panels["AP"].legend(fontsize=7)
    fig.suptitle(f"{MODELS[model][0]}: fine-tuning, mean over {len(study.pairs)} seed pair(s); "
                 f"training terms (each arm's own) smoothed over {SMOOTHING} iterations")
    fig.tight_layout()
    fig.savefig(out_path, dpi=90)
    plt.close(fig)


def plot_pr(study, model, out_path):
    """Precision-recall curves of every arm and the start, first seed pair."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    p, f = study.pairs[0]
    fig = plot_precision_recall([study.arms[(model, a, p, f)].dir / "eval" / "latest.pth" for a in study.arm_names]
                                + [study.pretrain[(model, p)].dir / "eval" / "latest.pth"],
                                names=[ARMS[a][0] for a in study.arm_names] + ["start (pretrained)"])
    for ax in fig.axes:
        lines = ax.get_lines()
        for line, arm in zip(lines, study.arm_names):
            line.set_color(colour(arm))
        lines[-1].set_color("black")
        lines[-1].set_linestyle("--")
        ax.legend(fontsize=7)
    fig.suptitle(f"{MODELS[model][0]}, pretraining seed {p}, fine-tuning seed {f}")
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
        ax.axhline(raw_ap, color="gray", linestyle="--", label="raw's best")
        ax.set_xscale("log", base=2)
        ax.set_xticks(values, [str(v) for v in values])
        ax.set_xlabel(title)
        ax.set_ylabel("AP")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(out_path, dpi=90)
    plt.close(fig)


def write_plots(study, out):
    """All PNGs into out; returns their names."""
    plot_logs([r.dir for r in study.pretrain.values()], fields=("train_loss", "test_loss", "mAP"),
              out_path=out / "pretrain.png")
    names = ["pretrain.png"]
    for m in study.preset["models"]:
        plot_finetune_curves(study, m, out / f"{m}_finetune_curves.png")
        plot_pr(study, m, out / f"{m}_precision_recall.png")
        names += [f"{m}_finetune_curves.png", f"{m}_precision_recall.png"]
    if study.ablations:
        model, pair = study.preset["models"][0], study.pairs[0]
        plot_ablations(study.ablations, study.arms[(model, best_raw(study, model), *pair)].coco()[0],
                       out / "ablations.png")
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


def method_text(study):
    """How the paired differences and their intervals are computed, for this study's seeds."""
    npre, nft = len(study.preset["pretrain_seeds"]), len(study.preset["finetune_seeds"])
    pct = f"{CONFIDENCE:.0%}"
    text = ("Method: for every seed pair (p, f), ΔAP = AP(arm) − AP(raw's best) of that pair: the same "
            "pretrained checkpoint and the same data order, so the pretraining's and the order's luck "
            "cancel in the difference. ")
    if npre > 1:
        text += (f"The pairs of one pretraining seed share their checkpoint, so they are not independent "
                 f"samples: ΔAP is first averaged over the {nft} fine-tuning seed(s) of each pretraining seed, "
                 f"and the {pct} interval is Student's t over those {npre} per-pretraining-seed means "
                 f"(df = {npre - 1}, t = {t_quantile(npre - 1):.2f}). This cluster-level interval is valid "
                 f"however strongly the pairs of one checkpoint are correlated, at the price of few degrees of "
                 f"freedom: it is wide, and an arm survives only if its gain holds across pretraining runs. ")
    elif nft > 1:
        text += (f"With a single pretraining seed the {pct} interval is Student's t over its {nft} fine-tuning "
                 f"seeds (df = {nft - 1}, t = {t_quantile(nft - 1):.2f}): it covers the data order's noise "
                 f"only, not that of the pretraining run. ")
    else:
        text += "With a single seed pair there is no interval: one difference, no estimate of its noise. "
    return text + ("An arm survives when its interval excludes 0. 'Pairs better' counts the seed pairs whose "
                   "ΔAP is above 0.")


def write_results(path, preset_name, study, command, data_info, plots, timings):
    preset = study.preset
    data, ft = preset["data"], preset["finetune"]
    skipped = [a for a in preset["arms"] if a not in study.arm_names]
    raws = [a for a in study.arm_names if is_raw(a)]
    pair0 = study.pairs[0]
    sections = [
        f"# CPU mini-study ({preset_name})",
        f"Command: `{command}`  \nMachine: {machine()}  \n"
        f"Wall time of this call: {timings['total'] / 60:.1f} min (data {timings['data']:.0f} s, pretraining "
        f"{timings['pretrain'] / 60:.1f} min, fine-tuning and ablations {timings['finetune'] / 60:.1f} min; "
        f"runs reused from an earlier call take none), up to {timings['jobs']} run(s) at a time with "
        + (f"{timings['threads']} thread(s) each" if timings["threads"] else "the CPUs shared among them")
        + ".  \n"
        f"Training time summed over the runs: pretraining "
        f"{sum(r.seconds() for r in study.pretrain.values()) / 60:.1f} min, fine-tuning arms "
        f"{sum(r.seconds() for r in study.arms.values()) / 60:.1f} min, ablations "
        f"{sum(r.seconds() for r in set(study.ablations.values()) - set(study.arms.values())) / 60:.1f} min.",
        f"Data: {data['num_train']} training and {data['num_val']} validation images of {data['image_size']} px, "
        f"{len(data_info['categories'])} classes ({', '.join(data_info['categories'].values())}), "
        f"1-{data['max_objects']} objects per image; validation objects: {data_info['val']['small']} small, "
        f"{data_info['val']['medium']} medium, {data_info['val']['large']} large (COCO area ranges).",
        f"Seeds: pretraining seeds {', '.join(map(str, preset['pretrain_seeds']))} (each its own pretraining run "
        f"of {preset['pretrain_epochs']} epochs with main.py --seed p: another initialisation and data order, "
        f"another checkpoint) x fine-tuning seeds {', '.join(map(str, preset['finetune_seeds']))} = "
        f"{len(study.pairs)} seed pair(s). Every fine-tuning run of pair (p, f) starts from pretraining seed p's "
        f"checkpoint and runs with --seed 100p + f, which fixes its data order: the same for every arm of the "
        f"pair, another one for every pair.  \n"
        f"Fine-tuning: {ft['epochs']} epochs, batch {ft['batch_size']}, backbone frozen, the recipe's learning "
        f"rate (a tenth of the pretraining one, times the arm's factor), divided by 10 for the last epoch. "
        f"Arms: " + "; ".join(f"{ARMS[a][0]} (`{' '.join(ARMS[a][1])}`)" for a in study.arm_names) + "."
        + ("  \nSkipped (main.py does not accept their --loss yet): "
           + ", ".join(ARMS[a][0] for a in skipped) + "." if skipped else ""),
        "## Raw's learning rate",
        f"The raw control is fine-tuned at {len(raws)} learning rate(s), "
        + ", ".join(f"{ARMS[a][2]}x" for a in raws)
        + " the recipe's. Per model, raw's best is the rate with the highest validation AP averaged over all "
        "seed pairs, and every other arm is compared with it. Choosing the best of "
        f"{len(raws)} on the same validation set the arms are scored on favours raw slightly (its best is "
        "partly the luckiest of the rates), so the comparisons below are conservative for the other arms.",
        table_raw_sweep(study),
        "## Fine-tuning arms (layout of the paper's Table 1)",
        f"COCO box AP on the validation set after fine-tuning, in percent: mean ± std over the {len(study.pairs)} "
        "seed pair(s) (difference of the means to raw's best). The start row: mean ± std over the pretraining "
        "seeds.",
        table_finetuning(study),
        "## Paired differences to raw's best",
        method_text(study),
        table_paired(study),
        "AP50 and AP75, the same pairs and method (raw's best chosen on AP):",
        table_paired_ap50_ap75(study),
    ]
    if head_to_head_comparisons(study):
        sections += [
            "## DAP against the ranking losses, and every AP-style loss against raw at its learning rate",
            "The same paired method, arm against arm. Every DAP and ranking-loss arm runs at the recipe's learning "
            "rate; DAP with the Hungarian matcher against a ranking loss (also with the Hungarian matcher) "
            "compares the losses alone. Against raw: raw at the same learning rate, not raw's best.",
            table_head_to_head(study),
        ]
    sections += [
        "## How much the absolute numbers move across pretraining runs",
        "AP per pretraining seed (mean over its fine-tuning seeds), its spread across pretraining seeds and, "
        "for comparison, the spread across fine-tuning seeds of the same checkpoint. The first is what moves "
        "between machines or pretraining runs: compare absolute numbers from another run only within it.",
        table_spread(study),
    ]
    if study.ablations:
        model = preset["models"][0]
        best = best_raw(study, model)
        sections += [
            "## Ablations (compare the trends of the paper's Figure 3)",
            f"{MODELS[model][0]}, {ARMS[ABLATION_ARM][0]}, pretraining seed {pair0[0]}, fine-tuning seed "
            f"{pair0[1]}; one parameter changed at a time from the arm's (σ 0.05, N 32, batch {ft['batch_size']}). "
            f"Raw's best ({ARMS[best][0]}), same seed pair: AP {study.arms[(model, best, *pair0)].coco()[0]:.1f}.",
            table_ablations(study.ablations),
        ]
    sections += ["## Plots", "\n".join(f"![{p}]({p})" for p in plots)]
    path.write_text("\n\n".join(sections) + "\n")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", help="data, runs, results.md and plots (default: outputs/mini_study[_quick|_smoke])")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", dest="preset", action="store_const", const="quick",
                      help="DETR, one seed pair, 7 arms, no ablations: a few minutes (the README demo)")
    size.add_argument("--smoke", dest="preset", action="store_const", const="smoke",
                      help="a handful of tiny images, one epoch each: about a minute (the tests)")
    p.add_argument("--pretrain_seeds", type=int, nargs="+", help="pretraining seeds (default: the preset's)")
    p.add_argument("--finetune_seeds", "--seeds", type=int, nargs="+",
                   help="fine-tuning seeds per pretraining seed, 0-99 (default: the preset's)")
    p.add_argument("--jobs", type=int, default=2, help="runs trained at the same time, one process each")
    p.add_argument("--threads", type=int, default=0,
                   help="torch threads per run; 0 = the CPUs shared among the runs trained at a time")
    opts = p.parse_args()
    preset_name = opts.preset or "full"
    preset = dict(PRESETS[preset_name])
    if opts.pretrain_seeds:
        preset["pretrain_seeds"] = tuple(dict.fromkeys(opts.pretrain_seeds))
    if opts.finetune_seeds:
        preset["finetune_seeds"] = tuple(dict.fromkeys(opts.finetune_seeds))
    out = Path(opts.out or "outputs/mini_study" + ("" if preset_name == "full" else f"_{preset_name}")).resolve()
    out.mkdir(parents=True, exist_ok=True)
    with lock_study(out):
        run_study(opts, preset_name, preset, out)


def lock_study(out):
    """Hold an exclusive lock on out/.lock until the returned file is closed: a second study in the
    same folder would start over the runs this one is training."""
    return exclusive_lock(out / ".lock", f"another study is running in {out} (it holds {out / '.lock'}); wait for "
                                         "it to end or pass another --out")


def claim_data(out, data):
    """Runs are reused by their flags, which do not name the data: one folder, one data set, the
    one data.json names (written once, atomically)."""
    settings = json.dumps(data, sort_keys=True)
    path = out / "data.json"
    if not path.is_file():
        write_file(path, settings)
    elif path.read_text() != settings:
        raise UserInputError(f"{out} holds a study on other data ({path.read_text()}); "
                             f"pass another --out or delete that folder")


def run_study(opts, preset_name, preset, out):
    """Data, runs, results.md and plots into out."""
    claim_data(out, preset["data"])
    command = "python -m scripts.mini_study " + " ".join(sys.argv[1:])
    timings = {"jobs": opts.jobs, "threads": opts.threads}

    start = time.time()
    data_dir = out / "data"
    data_info = make_synthetic_coco(data_dir, seed=0, **preset["data"])
    timings["data"] = time.time() - start
    study = plan(preset, out, str(data_dir), data_info["num_classes"])

    print(f"== pretraining {', '.join(preset['models'])} (raw losses), seeds "
          f"{', '.join(map(str, preset['pretrain_seeds']))} ==", flush=True)
    step = time.time()
    # DETR (the longer pretraining) first keeps the workers busy to the end
    execute_all(sorted(study.pretrain.values(), key=lambda r: "deformable" in r.dir.name), opts.jobs, opts.threads)
    timings["pretrain"] = time.time() - step
    extra = set(study.ablations.values()) - set(study.arms.values())
    print(f"== fine-tuning: {len(study.arms)} arm runs ({len(study.arm_names)} arms x {len(study.pairs)} seed "
          f"pairs x {len(preset['models'])} models), {len(extra)} ablation runs ==", flush=True)
    step = time.time()
    # longest first (Deformable DETR, small batches) keeps the workers busy to the end
    runs = sorted(set(study.arms.values()) | extra,
                  key=lambda r: ("deformable" not in str(r.dir), "batch_2" not in str(r.dir), str(r.dir)))
    execute_all(runs, opts.jobs, opts.threads)
    timings["finetune"] = time.time() - step
    timings["total"] = time.time() - start

    plots = write_plots(study, out)
    write_results(out / "results.md", preset_name, study, command, data_info, plots, timings)
    print((out / "results.md").read_text())
    print(f"Written: {out / 'results.md'} and {len(plots)} plots in {out}")


if __name__ == "__main__":
    try:
        main()
    except UserInputError as e:
        sys.stderr.write(f"error: {e}\n")
        sys.exit(2)
