"""models/set_criterion.py, with DETR's SetCriterion as its subclass: losses against values computed
by hand, one prediction at a time; the step totals (num_boxes) on one process and two; the
auxiliary layers and their weights."""
import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from models.detr import SetCriterion
from models.matcher import HungarianMatcher
from models.set_criterion import StepContext, with_aux_weights

from conftest import reference_giou

NUM_CLASSES = 3  # logits have 4 columns; column 3 = no object
EOS = 0.1


class FixedMatcher:
    """Returns preset indices, so the loss arithmetic is tested apart from the matching."""

    def __init__(self, indices):
        self.indices = indices
        self.calls = 0

    def __call__(self, outputs, targets):
        self.calls += 1
        assert "aux_outputs" not in outputs
        return [(torch.as_tensor(s, dtype=torch.int64), torch.as_tensor(t, dtype=torch.int64)) for s, t in self.indices]


# Image 0: queries 2, 0 -> targets 0, 1. Image 1: query 1 -> target 0. Everything else unmatched.
INDICES = [([2, 0], [0, 1]), ([1], [0])]


def make_targets():
    return [{"labels": torch.tensor([1, 2]),
             "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.4], [0.3, 0.6, 0.2, 0.2]])},
            {"labels": torch.tensor([0]), "boxes": torch.tensor([[0.4, 0.4, 0.3, 0.1]])}]


def make_outputs(seed):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(2, 3, NUM_CLASSES + 1, generator=g)
    boxes = torch.cat([torch.rand(2, 3, 2, generator=g) * 0.5 + 0.25,
                       torch.rand(2, 3, 2, generator=g) * 0.3 + 0.1], dim=-1)
    return {"pred_logits": logits.requires_grad_(), "pred_boxes": boxes.requires_grad_()}


def reference_losses(outputs, targets, indices, num_boxes):
    """Every loss of upstream DETR's criterion, written out with Python scalars."""
    logits = outputs["pred_logits"].tolist()
    boxes = outputs["pred_boxes"].tolist()
    matched = {(b, q): t for b, (src, tgt) in enumerate(indices) for q, t in zip(src, tgt)}

    ce_sum = weight_sum = 0.0
    correct = 0
    for b in range(len(logits)):
        for q in range(len(logits[b])):
            cls = int(targets[b]["labels"][matched[b, q]]) if (b, q) in matched else NUM_CLASSES
            weight = EOS if cls == NUM_CLASSES else 1.0
            log_z = math.log(sum(math.exp(v) for v in logits[b][q]))
            ce_sum += weight * (log_z - logits[b][q][cls])
            weight_sum += weight
            if (b, q) in matched:
                correct += max(range(NUM_CLASSES + 1), key=lambda c: logits[b][q][c]) == cls

    def xyxy(cx, cy, w, h):
        return cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2

    l1 = giou_loss = 0.0
    for (b, q), t in matched.items():
        pred, tgt = boxes[b][q], targets[b]["boxes"][t].tolist()
        l1 += sum(abs(p - g) for p, g in zip(pred, tgt))
        giou_loss += 1 - reference_giou(xyxy(*pred), xyxy(*tgt))

    cardinality = sum(abs(sum(max(range(NUM_CLASSES + 1), key=lambda c: row[c]) != NUM_CLASSES for row in img)
                          - len(tgt["labels"])) for img, tgt in zip(logits, targets)) / len(logits)
    return {"loss_ce": ce_sum / weight_sum,
            "class_error": 100 - 100 * correct / len(matched) if matched else 100.0,
            "cardinality_error": cardinality,
            "loss_bbox": l1 / num_boxes,
            "loss_giou": giou_loss / num_boxes}


def num_boxes(targets, micro_batches=1):
    """The criterion's num_boxes for a step of `micro_batches` copies of these targets."""
    step = StepContext([targets] * micro_batches)
    return make_criterion().step_totals(step, num_queries=3, device="cpu")["num_boxes"]


def make_criterion(indices=INDICES, losses=("labels", "boxes", "cardinality")):
    weight_dict = {"loss_ce": 1, "loss_bbox": 5, "loss_giou": 2}
    return SetCriterion(NUM_CLASSES, FixedMatcher(indices), weight_dict, EOS, list(losses))


def test_losses_match_hand_computation():
    outputs, targets = make_outputs(0), make_targets()
    losses = make_criterion()(outputs, targets)
    expected = reference_losses(outputs, targets, INDICES, num_boxes=3)
    assert set(losses) == set(expected)
    for k, v in expected.items():
        assert losses[k].item() == pytest.approx(v, rel=1e-5, abs=1e-5), k


def test_class_error_and_cardinality_on_crafted_logits():
    outputs, targets = make_outputs(1), make_targets()
    with torch.no_grad():
        logits = outputs["pred_logits"]
        logits.zero_()
        logits[0, 2, 1] = 5    # matched to label 1: correct
        logits[0, 0, 0] = 5    # matched to label 2: wrong
        logits[1, 1, 0] = 5    # matched to label 0: correct
        logits[1, 0, 3] = 5    # unmatched, says no object
        logits[1, 2, 2] = 5    # unmatched, says object
        logits[0, 1, 3] = 5    # unmatched, says no object
    losses = make_criterion()(outputs, targets)
    assert losses["class_error"].item() == pytest.approx(100 / 3)
    # Image 0: 2 objects predicted, 2 targets; image 1: 2 predicted, 1 target.
    assert losses["cardinality_error"].item() == pytest.approx(0.5)


def test_no_object_weight_is_eos_coef():
    criterion = make_criterion()
    assert criterion.empty_weight.tolist() == pytest.approx([1, 1, 1, EOS])
    # With no targets every query is "no object": the weighted mean reduces to the plain mean.
    outputs = make_outputs(2)
    empty = [{"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)}] * 2
    losses = make_criterion(indices=[([], []), ([], [])])(outputs, empty)
    expected = -outputs["pred_logits"].log_softmax(-1)[..., NUM_CLASSES].mean()
    assert losses["loss_ce"].item() == pytest.approx(expected.item(), rel=1e-6)


def test_num_boxes_is_clamped_for_empty_targets():
    outputs = make_outputs(3)
    empty = [{"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)}] * 2
    losses = make_criterion(indices=[([], []), ([], [])])(outputs, empty)
    # Without the clamp these would be 0 / 0 = nan.
    assert losses["loss_bbox"].item() == 0 and losses["loss_giou"].item() == 0
    assert num_boxes(empty) == 1
    assert num_boxes(make_targets()) == 3
    total = sum(v for k, v in losses.items() if k.startswith("loss"))
    total.backward()
    assert torch.isfinite(outputs["pred_logits"].grad).all()


def test_aux_outputs_get_suffixed_losses_and_no_class_error():
    final, aux0, aux1 = make_outputs(4), make_outputs(5), make_outputs(6)
    outputs = {**final, "aux_outputs": [aux0, aux1]}
    targets = make_targets()
    criterion = make_criterion()
    losses = criterion(outputs, targets)

    assert criterion.matcher.calls == 3  # matched separately for every layer
    base = ["loss_ce", "loss_bbox", "loss_giou", "cardinality_error"]
    assert set(losses) == set(base + ["class_error"] + [f"{k}_{i}" for k in base for i in (0, 1)])
    for suffix, layer in (("", final), ("_0", aux0), ("_1", aux1)):
        expected = reference_losses(layer, targets, INDICES, num_boxes=3)
        for k in base:
            assert losses[k + suffix].item() == pytest.approx(expected[k], rel=1e-5, abs=1e-5), k + suffix


def test_with_aux_weights_copies_every_entry():
    weights = with_aux_weights({"loss_ce": 1, "loss_bbox": 5}, ["_0", "_1"])
    assert weights == {"loss_ce": 1, "loss_bbox": 5, "loss_ce_0": 1, "loss_bbox_0": 5,
                       "loss_ce_1": 1, "loss_bbox_1": 5}
    assert with_aux_weights({"loss_ce": 1}, []) == {"loss_ce": 1}


def test_gradients_reach_matched_boxes_and_all_logits():
    outputs, targets = make_outputs(7), make_targets()
    criterion = make_criterion()
    losses = criterion(outputs, targets)
    total = sum(losses[k] * w for k, w in criterion.weight_dict.items())
    total.backward()
    logits_grad, boxes_grad = outputs["pred_logits"].grad, outputs["pred_boxes"].grad
    # Every query is classified (matched ones as their class, the rest as no object).
    assert (logits_grad.abs().sum(-1) > 0).all()
    # Only matched queries get box gradients.
    matched = torch.zeros(2, 3, dtype=torch.bool)
    matched[0, [2, 0]] = True
    matched[1, 1] = True
    assert (boxes_grad.abs().sum(-1) > 0).eq(matched).all()
    # Logging values carry no gradient.
    assert not losses["cardinality_error"].requires_grad


def test_with_the_hungarian_matcher_perfect_predictions_cost_nothing_on_boxes():
    targets = make_targets()
    boxes = torch.full((2, 3, 4), 0.5)
    boxes[0, 1], boxes[0, 2] = targets[0]["boxes"][1], targets[0]["boxes"][0]
    boxes[1, 0] = targets[1]["boxes"][0]
    boxes[1, 2] = torch.tensor([0.1, 0.1, 0.05, 0.05])
    outputs = {"pred_logits": torch.zeros(2, 3, NUM_CLASSES + 1), "pred_boxes": boxes}
    criterion = SetCriterion(NUM_CLASSES, HungarianMatcher(1, 5, 2), {}, EOS, ["boxes"])
    losses = criterion(outputs, targets)
    assert losses["loss_bbox"].item() == pytest.approx(0, abs=1e-6)
    assert losses["loss_giou"].item() == pytest.approx(0, abs=1e-6)


def _distributed_num_boxes(rank, world_size, tmp_dir):
    dist.init_process_group("gloo", init_method=f"file://{tmp_dir}/init", rank=rank, world_size=world_size)
    try:
        # Rank 0 holds 1 box, rank 1 holds 4: both must divide by the global mean 2.5.
        n = 1 if rank == 0 else 4
        targets = [{"labels": torch.zeros(n, dtype=torch.int64), "boxes": torch.zeros(n, 4)}]
        with open(f"{tmp_dir}/rank{rank}.txt", "w") as f:
            f.write(repr(float(num_boxes(targets))))  # a tensor under DDP (never read back in training)
    finally:
        dist.destroy_process_group()


def test_num_boxes_is_averaged_over_processes(tmp_path):
    # fork: the children need nothing re-imported, which keeps this test well under a second.
    mp.start_processes(_distributed_num_boxes, args=(2, str(tmp_path)), nprocs=2, start_method="fork")
    assert [float((tmp_path / f"rank{r}.txt").read_text()) for r in (0, 1)] == [2.5, 2.5]
