"""The files a run writes beside its checkpoints: log.txt and iterations.jsonl (one JSON object per
line) and the COCO evaluation arrays."""
import json

import torch

from util.misc import is_main_process


def append_log(path, record):
    """Append one JSON line."""
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")


def write_json(path, record):
    """Write one JSON object to path, atomically (temp file + rename)."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(record))
    tmp.replace(path)


def drop_log_lines_from(log_path, epoch):
    """Remove the lines of epochs >= epoch from a JSON-lines log (they are about to be redone)."""
    if not log_path.exists():
        return
    lines = log_path.read_text().splitlines(keepends=True)
    kept = [line for line in lines if line.strip() and json.loads(line).get("epoch", -1) < epoch]
    if len(kept) != len(lines):
        log_path.write_text("".join(kept))


def save_coco_eval(coco_evaluator, path):
    """Save the bbox COCOeval arrays (precision, recall, scores) as tensors, readable with weights_only."""
    if coco_evaluator is None or not is_main_process():
        return
    ev = coco_evaluator.coco_eval["bbox"].eval
    torch.save({k: torch.as_tensor(ev[k]) for k in ("precision", "recall", "scores")}, path)
