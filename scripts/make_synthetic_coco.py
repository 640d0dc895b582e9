"""Write a synthetic COCO-format shapes dataset (see datasets/synthetic.py for what it holds).

    python -m scripts.make_synthetic_coco --out data/shapes --num_train 200 --num_val 50
    python main.py --coco_path data/shapes --num_classes 10 ...
"""
import argparse
import json
import time

from datasets.synthetic import make_synthetic_coco
from util.args import positive_int


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="output folder (created)")
    parser.add_argument("--num_train", type=positive_int, default=200)
    parser.add_argument("--num_val", type=positive_int, default=50)
    parser.add_argument("--image_size", type=positive_int, default=128, help="side of the square images")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num_classes", type=positive_int, default=10,
                        help="largest category id + 1, the value to train with: "
                             "2, 3, 5, 6, 8, 10 (default, 6 shapes), 12 or 14 (all 8 shapes)")
    parser.add_argument("--max_objects", type=positive_int, default=6, help="objects per image: 1..this")
    args = parser.parse_args()
    start = time.time()
    try:
        summary = make_synthetic_coco(args.out, args.num_train, args.num_val, args.image_size,
                                      args.seed, args.num_classes, args.max_objects)
    except ValueError as err:
        parser.error(str(err))
    print(json.dumps(summary, indent=2))
    print(f"done in {time.time() - start:.1f} s; train with --coco_path {args.out} "
          f"--num_classes {summary['num_classes']}")


if __name__ == "__main__":
    main()
