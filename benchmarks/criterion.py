"""Cost of the criterion + matcher, raw vs DAP and the ranking losses, at the paper's batch scale (forward + backward).

    python -m benchmarks.criterion --device cuda            # DETR and Deformable DETR scales
    python -m benchmarks.criterion --device cpu --repeats 3

Only the loss side is timed (matching, loss, backward into the head outputs): the detector is
the same under every loss. Prints the time per iteration of each setting, its ratio to raw,
and the peak memory on CUDA. Settings are timed round-robin and the median is reported; the
ratio of each round (a setting's time over raw's in the same round) is summarised too, as its
median and quartiles, which machine drifts between rounds do not move.
"""
import argparse
import statistics
import time

import torch

import main as detr_main
from benchmarks import environment
from models import build_model
from util.args import positive_int

SCALES = {
    # model: images, queries, classes (without background), decoder layers, boxes per image
    "detr": dict(images=56, queries=100, num_classes=91, layers=6, boxes=7),
    "deformable_detr": dict(images=24, queries=300, num_classes=91, layers=6, boxes=7),
}
SETTINGS = {
    "raw": ["--loss", "raw", "--matcher", "hungarian"],
    "dap (dap matcher)": ["--loss", "dap", "--matcher", "dap"],
    "dap (hungarian)": ["--loss", "dap", "--matcher", "hungarian"],
    "raw+dap": ["--loss", "raw+dap", "--matcher", "hungarian"],
    # the ranking losses (docs/LOSSES.md), with the upstream matcher
    "ap-loss (hungarian)": ["--loss", "ap", "--matcher", "hungarian"],
    "alrp-loss (hungarian)": ["--loss", "alrp", "--matcher", "hungarian"],
    "rs-loss (hungarian)": ["--loss", "rs", "--matcher", "hungarian"],
}


def build_criterion(model, flags, device):
    parser = argparse.ArgumentParser(parents=[detr_main.get_args_parser()])
    args = parser.parse_args([
        "--model", model, "--device", device, "--no_pretrained_backbone", "--backbone", "resnet50",
        "--enc_layers", "1", "--dec_layers", str(SCALES[model]["layers"]), *flags])
    return build_model(args)[1]


def make_inputs(model, device, seed=0):
    s = SCALES[model]
    g = torch.Generator().manual_seed(seed)
    logit_width = s["num_classes"] + (1 if model == "detr" else 0)  # DETR's no-object logit

    def head():
        logits = torch.randn(s["images"], s["queries"], logit_width, generator=g)
        boxes = torch.cat([torch.rand(s["images"], s["queries"], 2, generator=g) * 0.6 + 0.2,
                           torch.rand(s["images"], s["queries"], 2, generator=g) * 0.3 + 0.05], -1)
        return logits.to(device).requires_grad_(), boxes.to(device).requires_grad_()

    heads = [head() for _ in range(s["layers"])]
    targets = []
    for _ in range(s["images"]):
        boxes = torch.cat([torch.rand(s["boxes"], 2, generator=g) * 0.6 + 0.2,
                           torch.rand(s["boxes"], 2, generator=g) * 0.3 + 0.05], -1)
        targets.append({"labels": torch.randint(1, s["num_classes"], (s["boxes"],), generator=g).to(device),
                        "boxes": boxes.to(device)})
    outputs = {"pred_logits": heads[-1][0], "pred_boxes": heads[-1][1],
               "aux_outputs": [{"pred_logits": lg, "pred_boxes": bx} for lg, bx in heads[:-1]]}
    return outputs, targets, [t for h in heads for t in h]


def step_time(criterion, outputs, targets, leaves, device):
    """Seconds for one matching + loss + backward."""
    for leaf in leaves:
        leaf.grad = None
    start = time.perf_counter()
    loss_dict = criterion(outputs, targets)
    sum(loss_dict[k] * w for k, w in criterion.weight_dict.items() if k in loss_dict).backward()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def peak_memory(criterion, outputs, targets, leaves, device):
    if device != "cuda":
        return float("nan")
    torch.cuda.reset_peak_memory_stats()
    step_time(criterion, outputs, targets, leaves, device)
    return torch.cuda.max_memory_allocated() / 2**20


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--repeats", type=positive_int, default=10)
    p.add_argument("--models", nargs="+", default=["detr"], choices=sorted(SCALES))
    opts = p.parse_args()
    environment.keep_freed_memory()  # page faults would swamp the differences measured
    print(environment.header(opts.device))
    print(f"{opts.repeats} repeats")
    for model in opts.models:
        s = SCALES[model]
        print(f"\n{model}: {s['images']} images x {s['queries']} queries x {s['num_classes']} classes, "
              f"{s['boxes']} boxes per image, {s['layers']} decoder layers")
        print("| setting | ms / iteration | ratio to raw | per-round ratio: median [quartiles] | peak memory (MiB) |\n"
              "| --- | --- | --- | --- | --- |")
        criteria = {name: build_criterion(model, flags, opts.device) for name, flags in SETTINGS.items()}
        inputs = make_inputs(model, opts.device)
        times = environment.round_robin(
            criteria, lambda criterion, inputs=inputs: step_time(criterion, *inputs, opts.device), opts.repeats)
        medians = {name: statistics.median(t) for name, t in times.items()}
        ratios = environment.paired_ratios(times, "raw")
        for name, criterion in criteria.items():
            peak = peak_memory(criterion, *inputs, opts.device)
            median, q1, q3 = ratios[name]
            print(f"| {name} | {1000 * medians[name]:.1f} | {medians[name] / medians['raw']:.2f} | "
                  f"{median:.2f} [{q1:.2f}, {q3:.2f}] | {peak:.0f} |", flush=True)
    print(environment.footer())


if __name__ == "__main__":
    main()
