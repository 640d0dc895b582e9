"""Where a DETR training step's time goes, raw against DAP: data loading, forward, matching,
losses, backward and the optimizer step, so that the cost of DAP is seen in proportion.

    python -m benchmarks.step_profile                               # CPU, every configuration
    python -m benchmarks.step_profile --device cuda --configs r50-paper --batch_size 4

Configurations: the demo's tiny DETR (ResNet-18, 64-wide transformer) and DETR R50 (100 queries,
6 + 6 layers), each at the demo's image size (128 px, no augmentation) and at the paper's (COCO-
sized 640 px images through the training pipeline: multi-scale resize to 480-800 px and random
crops). The data is the synthetic COCO-format set; the loader is the project's (--num_workers
workers), read ahead so that every loss trains on the same batches (data: the time the loop
waited for each batch). Each step is one batch (no accumulation); the losses are the paper's
settings, raw (Hungarian matcher) and DAP (--loss dap --matcher dap, constant cost), timed round
robin after one warm-up step each. Matching is the matcher's calls inside the criterion; losses
are the rest of the criterion.
"""
import argparse
import statistics
import tempfile
import time

import torch

from benchmarks import environment
from datasets import build_data_loaders, build_dataset
from datasets.synthetic import make_synthetic_coco
from main import build_optimizer, get_args_parser
from models import FAMILIES, build_model
from util.args import non_negative_int, positive_int

TINY = ["--backbone", "resnet18", "--hidden_dim", "64", "--dim_feedforward", "128", "--nheads", "4",
        "--enc_layers", "1", "--dec_layers", "2", "--num_queries", "10", "--backbone_norm", "batch"]
R50 = ["--backbone", "resnet50"]
DEMO = dict(image_size=128, flags=["--input_scale", "0.16", "--no_train_augmentation"])
PAPER = dict(image_size=640, flags=[])
CONFIGS = {"tiny-demo": (TINY, DEMO), "tiny-paper": (TINY, PAPER), "r50-demo": (R50, DEMO), "r50-paper": (R50, PAPER)}
LOSSES = {"raw": ["--loss", "raw"], "dap": ["--loss", "dap", "--matcher", "dap"]}
PHASES = ("data", "copy to device", "forward", "matching", "losses", "backward", "optimizer")


class Clock:
    """Readings in seconds; on CUDA each reading waits for the queued kernels."""

    def __init__(self, device):
        self.cuda = torch.device(device).type == "cuda"
        self.matching = 0.0

    def now(self):
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    def timing(self, matcher_forward):
        """matcher_forward, its time added to self.matching."""
        def forward(*args, **kwargs):
            start = self.now()
            result = matcher_forward(*args, **kwargs)
            self.matching += self.now() - start
            return result
        return forward


class Setting:
    """A model, criterion and optimizer for one (configuration, loss)."""

    def __init__(self, model_flags, data, loss_flags, opts, num_classes):
        args = get_args_parser().parse_args([
            *model_flags, *data["flags"], *loss_flags, "--no_pretrained_backbone", "--device", opts.device,
            "--num_classes", str(num_classes)])
        torch.manual_seed(0)
        family = FAMILIES[args.model]
        self.model, self.criterion, _ = build_model(args)
        self.model.to(opts.device).train()
        self.criterion.to(opts.device).train()
        self.optimizer, _ = build_optimizer(family.param_groups(self.model, args), args)
        self.max_norm = args.clip_max_norm
        self.device = opts.device
        self.clock = Clock(opts.device)
        self.criterion.matcher.forward = self.clock.timing(self.criterion.matcher.forward)

    def step(self, batch):
        """One training step on batch = (samples, targets); returns {phase: seconds} (data: 0,
        see loaded_batches)."""
        clock = self.clock
        clock.matching = 0.0
        start = clock.now()
        samples, targets = batch
        samples = samples.to(self.device)
        targets = [{k: v.to(self.device) for k, v in t.items()} for t in targets]
        marks = [clock.now()]
        outputs = self.model(samples)
        marks.append(clock.now())
        loss_dict = self.criterion(outputs, targets)
        loss = sum(loss_dict[k] * w for k, w in self.criterion.weight_dict.items() if k in loss_dict)
        marks.append(clock.now())
        self.optimizer.zero_grad()
        loss.backward()
        marks.append(clock.now())
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.max_norm)
        self.optimizer.step()
        marks.append(clock.now())
        return {"data": 0.0, "copy to device": marks[0] - start, "forward": marks[1] - marks[0],
                "matching": clock.matching, "losses": marks[2] - marks[1] - clock.matching,
                "backward": marks[3] - marks[2], "optimizer": marks[4] - marks[3]}


def loaded_batches(model_flags, data, opts, coco_path, num_classes, count):
    """count batches from the project's training loader, and the seconds the loop waited for
    each: every loss is timed on the same batches (the paper's pipeline draws image sizes at
    random), and loading costs the same under every loss."""
    args = get_args_parser().parse_args([
        *model_flags, *data["flags"], "--no_pretrained_backbone", "--coco_path", coco_path, "--num_classes",
        str(num_classes), "--batch_size", str(opts.batch_size), "--num_workers", str(opts.num_workers)])
    args.distributed = False  # one process
    torch.manual_seed(0)
    dataset = build_dataset("train", args, FAMILIES[args.model].data_pipeline)
    loader = build_data_loaders(dataset, dataset, args)[1]
    batches, waits = [], []
    while len(batches) < count:
        start = time.perf_counter()
        for batch in loader:
            waits.append(time.perf_counter() - start)
            batches.append(batch)
            if len(batches) == count:
                break
            start = time.perf_counter()
    return batches, waits


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    p.add_argument("--batch_size", type=positive_int, default=2, help="images per step (the paper: 4 per GPU)")
    p.add_argument("--num_workers", type=non_negative_int, default=2)
    p.add_argument("--repeats", type=positive_int, default=3, help="timed steps per setting")
    opts = p.parse_args()
    environment.keep_freed_memory()  # page faults would swamp the differences measured
    print(environment.header(opts.device))
    print(f"{opts.batch_size} images per step, {opts.num_workers} loader workers, median of {opts.repeats} steps")
    with tempfile.TemporaryDirectory() as tmp:
        for name in opts.configs:
            model_flags, data = CONFIGS[name]
            path = f"{tmp}/{data['image_size']}"
            info = make_synthetic_coco(path, num_train=4 * opts.batch_size, num_val=1,
                                       image_size=data["image_size"], seed=0)
            settings = {loss: Setting(model_flags, data, flags, opts, info["num_classes"])
                        for loss, flags in LOSSES.items()}
            batches, waits = loaded_batches(model_flags, data, opts, path, info["num_classes"], opts.repeats + 1)
            for setting in settings.values():  # warm-up
                setting.step(batches[0])
            times = {loss: [] for loss in settings}
            for batch, wait in zip(batches[1:], waits[1:]):
                for loss, setting in settings.items():
                    times[loss].append({**setting.step(batch), "data": wait})
            medians = {loss: {phase: statistics.median(t[phase] for t in runs) for phase in PHASES}
                       for loss, runs in times.items()}
            print(f"\n{name}: ms per step (share of the step)")
            print("| phase | " + " | ".join(settings) + " |\n| --- |" + " --- |" * len(settings))
            for phase in PHASES:
                cells = [f"{1000 * m[phase]:.1f} ({100 * m[phase] / sum(m.values()):.1f} %)" for m in medians.values()]
                print(f"| {phase} | " + " | ".join(cells) + " |")
            print("| **step** | " + " | ".join(f"{1000 * sum(m.values()):.1f}" for m in medians.values()) + " |")
            print("| matching + losses | " + " | ".join(
                f"{100 * (m['matching'] + m['losses']) / sum(m.values()):.1f} %" for m in medians.values()) + " |")
            print(f"DAP step / raw step: {sum(medians['dap'].values()) / sum(medians['raw'].values()):.2f}", flush=True)
    print(environment.footer())


if __name__ == "__main__":
    main()
