"""CPU demo of the main job: fine-tune a tiny DETR from a checkpoint and print COCO AP.

1. generate a small synthetic COCO-format dataset;
2. train a tiny DETR with the upstream (raw) loss, to get a checkpoint to start from;
3. fine-tune that checkpoint with each loss of --arms (same data order, one tenth of the
   learning rate, as in the paper's recipe) and print the COCO numbers of each arm.

    python scripts/demo.py --out outputs/demo
"""
import argparse
import json
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import main as detr_main  # noqa: E402
from datasets.synthetic import make_synthetic_coco  # noqa: E402

TINY_MODEL = ["--backbone", "resnet18", "--no_pretrained_backbone", "--hidden_dim", "64",
              "--dim_feedforward", "128", "--nheads", "4", "--enc_layers", "1", "--dec_layers", "2",
              "--num_queries", "20", "--device", "cpu", "--num_workers", "1"]
ARMS = {
    "raw": ["--loss", "raw"],
    "dap": ["--loss", "dap", "--matcher", "dap"],
    "raw+dap": ["--loss", "raw+dap"],
}
COCO_NAMES = ["AP", "AP50", "AP75", "APs", "APm", "APl"]


def run_main(flags):
    parser = argparse.ArgumentParser(parents=[detr_main.get_args_parser()])
    args = detr_main.parse_args(parser, flags)
    os.makedirs(args.output_dir, exist_ok=True)
    return detr_main.main(args)


def final_coco_stats(run_dir):
    with open(os.path.join(run_dir, "log.txt")) as f:
        return json.loads(f.read().splitlines()[-1])["test_coco_eval_bbox"]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="outputs/demo")
    p.add_argument("--num_train", type=int, default=160)
    p.add_argument("--num_val", type=int, default=40)
    p.add_argument("--image_size", type=int, default=128)
    p.add_argument("--pretrain_epochs", type=int, default=12)
    p.add_argument("--finetune_epochs", type=int, default=3)
    p.add_argument("--batch_size", type=int, default=4)
    p.add_argument("--lr", type=float, default=4e-4)
    p.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    p.add_argument("--seed", type=int, default=0)
    opts = p.parse_args()
    start = time.time()

    data_dir = os.path.join(opts.out, "data")
    info = make_synthetic_coco(data_dir, num_train=opts.num_train, num_val=opts.num_val,
                               image_size=opts.image_size, seed=opts.seed)
    common = TINY_MODEL + ["--coco_path", data_dir, "--num_classes", str(info["num_classes"]),
                           "--input_scale", str(opts.image_size / 800), "--batch_size", str(opts.batch_size),
                           "--seed", str(opts.seed), "--print_freq", "20"]

    print(f"\n== 1/2: training a tiny DETR for {opts.pretrain_epochs} epochs (raw loss) ==", flush=True)
    pretrain_dir = os.path.join(opts.out, "pretrain")
    run_main(common + ["--output_dir", pretrain_dir, "--epochs", str(opts.pretrain_epochs),
                       "--lr", str(opts.lr), "--lr_backbone", str(opts.lr / 10),
                       "--lr_drop", str(opts.pretrain_epochs)])
    results = {"start (pretrained)": final_coco_stats(pretrain_dir)}

    for i, arm in enumerate(opts.arms, 1):
        print(f"\n== 2/2 ({i}/{len(opts.arms)}): fine-tuning with --loss {arm} ==", flush=True)
        arm_dir = os.path.join(opts.out, f"finetune_{arm}")
        run_main(common + ARMS[arm] + [
            "--output_dir", arm_dir, "--finetune", os.path.join(pretrain_dir, "checkpoint.pth"),
            "--epochs", str(opts.finetune_epochs), "--lr", str(opts.lr / 10),
            "--lr_backbone", str(opts.lr / 100), "--lr_drop", str(max(opts.finetune_epochs - 1, 1))])
        results[arm] = final_coco_stats(arm_dir)

    print(f"\nCOCO box AP on the synthetic val set ({opts.num_val} images), "
          f"{time.time() - start:.0f} s in all:")
    print("| run | " + " | ".join(COCO_NAMES) + " |")
    print("| --- |" + " --- |" * len(COCO_NAMES))
    for name, stats in results.items():
        print(f"| {name} | " + " | ".join(f"{100 * v:.1f}" for v in stats[:6]) + " |")


if __name__ == "__main__":
    main()
