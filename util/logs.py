"""The files a run writes beside its checkpoints: log.txt and iterations.jsonl (one JSON object per
line) and the COCO evaluation arrays. Each is written atomically (util.output_dir.write_atomically)
but iterations.jsonl, appended at every step: a line cut by a kill is dropped on --resume."""
import json
import math

import torch

from util.misc import is_main_process
from util.output_dir import write_atomically

# The 12 numbers of COCOeval.summarize(), in its order (log.txt's test_coco_eval_bbox).
COCO_STATS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")


def append_log(path, record):
    """Add one JSON line to path (the whole file rewritten atomically: log.txt is small)."""
    old = path.read_text() if path.exists() else ""
    write_atomically(path, lambda tmp: tmp.write_text(old + json.dumps(record) + "\n"))


def write_json(path, record):
    """Write one JSON object to path, atomically."""
    write_atomically(path, lambda tmp: tmp.write_text(json.dumps(record)))


def _position(line):
    """(epoch, step) of a log line; a log.txt line, which sums up its epoch, comes after the
    epoch's steps."""
    try:
        record = json.loads(line)
    except ValueError:  # the last line, cut by a kill while it was appended
        return None
    return record.get("epoch", -1), record.get("step", math.inf)


def drop_log_lines_from(log_path, epoch, step=0):
    """Remove the lines from (epoch, step) on from a JSON-lines log (they are about to be
    redone), and a last line cut short."""
    if not log_path.exists():
        return
    lines = log_path.read_text().splitlines(keepends=True)
    kept = [line for line in lines if line.strip() and (p := _position(line)) is not None and p < (epoch, step)]
    if len(kept) != len(lines):
        write_atomically(log_path, lambda tmp: tmp.write_text("".join(kept)))


def save_coco_eval(coco_evaluator, path):
    """Save the bbox COCOeval arrays (precision, recall, scores) as tensors, readable with weights_only."""
    if coco_evaluator is None or not is_main_process():
        return
    ev = coco_evaluator.coco_eval["bbox"].eval
    arrays = {k: torch.as_tensor(ev[k]) for k in ("precision", "recall", "scores")}
    write_atomically(path, lambda tmp: torch.save(arrays, tmp))
