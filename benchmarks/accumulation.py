"""Cost of an accumulated optimisation step with DAP-loss, whose counting pass runs every
micro-batch forward once more without gradients, against the same step with the raw losses
and against one batch holding all the images (model forward + backward + optimizer step).

    python -m benchmarks.accumulation --device cuda
    python -m benchmarks.accumulation --device cpu --size 256 --repeats 3

Prints the time per optimisation step of each setting (median over rounds) and its ratio to raw
with accumulation, both as a ratio of medians and round by round (median and quartiles of each
round's ratio): settings are timed round-robin.
"""
import argparse
import statistics
import time

import torch

import main as detr_main
import util.misc as utils
from benchmarks import environment
from engine import MixedPrecision, train_step
from models import build_model
from util.args import positive_int

# name: (loss flags, images per micro-batch, micro-batches per step)
SETTINGS = {
    "raw, 2 x 2 accumulated": (["--loss", "raw"], 2, 2),
    "raw+dap, 2 x 2 accumulated": (["--loss", "raw+dap", "--matcher", "dap"], 2, 2),
    "raw, 4 in one batch": (["--loss", "raw"], 4, 1),
    "raw+dap, 4 in one batch": (["--loss", "raw+dap", "--matcher", "dap"], 4, 1),
}


def build(flags, opts):
    parser = argparse.ArgumentParser(parents=[detr_main.get_args_parser()])
    args = parser.parse_args(["--device", opts.device, "--no_pretrained_backbone",
                                         "--backbone", opts.backbone, *flags])
    model, criterion, _ = build_model(args)
    model.to(opts.device).train()
    criterion.to(opts.device).train()
    torch.manual_seed(0)
    return model, criterion, torch.optim.AdamW(model.parameters(), lr=1e-5)


def make_step(images_per_batch, micro_batches, opts, seed=0):
    """micro_batches batches of random images with 1-7 random boxes each (DETR's targets)."""
    g = torch.Generator().manual_seed(seed)
    step = []
    for _ in range(micro_batches):
        images = torch.rand(images_per_batch, 3, opts.size, opts.size, generator=g)
        targets = []
        for _ in range(images_per_batch):
            n = int(torch.randint(1, 8, (1,), generator=g))
            centres, sizes = torch.rand(n, 2, generator=g) * 0.6 + 0.2, torch.rand(n, 2, generator=g) * 0.3 + 0.05
            boxes = torch.cat([centres, sizes], -1)
            targets.append({"labels": torch.randint(1, 91, (n,), generator=g), "boxes": boxes})
        step.append((utils.nested_tensor_from_tensor_list(list(images)), targets))
    return step


def step_time(model, criterion, optimizer, step, opts):
    start = time.perf_counter()
    train_step(model, criterion, step, optimizer, opts.device, 0.1, utils.MetricLogger(),
                MixedPrecision(opts.device, enabled=False))
    if opts.device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--backbone", default="resnet50")
    p.add_argument("--size", type=positive_int, default=800, help="image side in pixels")
    p.add_argument("--repeats", type=positive_int, default=5)
    opts = p.parse_args()
    environment.keep_freed_memory()  # page faults would swamp the differences measured
    print(environment.header(opts.device))
    print(f"DETR {opts.backbone}, {opts.size} px images, 4 images per step, {opts.repeats} repeats")
    runs = {name: (build(flags, opts), make_step(images, micro, opts))
            for name, (flags, images, micro) in SETTINGS.items()}
    times = environment.round_robin(runs, lambda run: step_time(*run[0], run[1], opts), opts.repeats)
    medians = {name: statistics.median(t) for name, t in times.items()}
    reference = "raw, 2 x 2 accumulated"
    ratios = environment.paired_ratios(times, reference)
    print(f"| setting | ms / step | ratio to {reference} | per-round ratio: median [quartiles] |\n"
          "| --- | --- | --- | --- |")
    for name, median in medians.items():
        ratio, q1, q3 = ratios[name]
        print(f"| {name} | {1000 * median:.0f} | {median / medians[reference]:.2f} | "
              f"{ratio:.2f} [{q1:.2f}, {q3:.2f}] |")
    print(environment.footer())


if __name__ == "__main__":
    main()
