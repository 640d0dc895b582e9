"""models/dap_criterion.py, the plumbing that feeds DAP from a detector (docs/DAP.md, section 5):
the positives and negatives of a layer against a brute force, and DETR's criterion with DAPLoss."""
import argparse
import math

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from main import get_args_parser
from models import build_model, dap_criterion
from models import matcher as matcher_module
from models.dap_criterion import DAPLoss
from models.dap_functional import (
    class_probabilities,
    differentiable_ap,
    differentiable_ap_terms,
)
from models.detections import BatchLossLayer, gather_detections, softmax_log_odds
from models.matcher import matched_pairs
from models.set_criterion import StepContext
from util import box_ops

from conftest import TINY_DETR_FLAGS

# ---------------------------------------------------------------- plumbing: detections of a layer

def random_layer(seed, target_counts=(3, 0, 2), num_queries=6, num_classes=4, num_logits=5, dtype=torch.float64):
    """Random outputs of one decoder layer, targets and a random one-to-one matching.

    Image 1 has no targets; the last image's targets share a class, so two positives of one
    image can have the same class. Boxes are normalised cxcywh well inside the image."""
    g = torch.Generator().manual_seed(seed)

    def boxes(*shape):
        return torch.cat([0.25 + 0.5 * torch.rand(*shape, 2, generator=g, dtype=dtype),
                          0.1 + 0.4 * torch.rand(*shape, 2, generator=g, dtype=dtype)], -1)

    outputs = {"pred_logits": 2 * torch.randn(len(target_counts), num_queries, num_logits, generator=g, dtype=dtype),
               "pred_boxes": boxes(len(target_counts), num_queries)}
    targets, indices = [], []
    for count in target_counts:
        labels = torch.randint(0, num_classes, (count,), generator=g)
        if count >= 2:
            labels[-1] = labels[-2]
        targets.append({"labels": labels, "boxes": boxes(count).float()})
        indices.append((torch.randperm(num_queries, generator=g)[:count], torch.randperm(count, generator=g)))
    return outputs, targets, indices


def ref_iou(a, b):
    """IoU of two cxcywh boxes, by hand."""
    ax0, ay0, ax1, ay1 = a[0] - a[2] / 2, a[1] - a[3] / 2, a[0] + a[2] / 2, a[1] + a[3] / 2
    bx0, by0, bx1, by1 = b[0] - b[2] / 2, b[1] - b[3] / 2, b[0] + b[2] / 2, b[1] + b[3] / 2
    inter = (torch.minimum(ax1, bx1) - torch.maximum(ax0, bx0)).clamp(min=0) * \
        (torch.minimum(ay1, by1) - torch.maximum(ay0, by0)).clamp(min=0)
    return inter / (a[2] * a[3] + b[2] * b[3] - inter)


def ref_gather(outputs, targets, indices, activation, neg_topk):
    """Spec section 3 with loops over images, queries and classes; torch scalars keep autograd.
    Returns ([(pos score, pos IoU)], [neg score])."""
    logits, pred_boxes = outputs["pred_logits"], outputs["pred_boxes"]
    positives, negatives = [], []
    for b, (target, (src, tgt)) in enumerate(zip(targets, indices)):
        matched = {int(q): int(t) for q, t in zip(src, tgt)}
        pairs = []  # (score, query, class) of every candidate negative pair (sigmoid)
        for q in range(logits.shape[1]):
            row = list(logits[b, q])
            if activation == "softmax":
                total = sum(torch.exp(v) for v in row)
                probs = [torch.exp(v) / total for v in row[:-1]]
            else:
                probs = [1 / (1 + torch.exp(-v)) for v in row]
            label = int(target["labels"][matched[q]]) if q in matched else None
            if label is not None:
                positives.append((probs[label], ref_iou(pred_boxes[b, q], target["boxes"][matched[q]].double())))
            if activation == "softmax":
                if label is None:
                    negatives.append(max(probs))
            else:
                pairs += [(p, q, c) for c, p in enumerate(probs) if c != label]
        pairs.sort(key=lambda pair: -pair[0].item())
        negatives += [p for p, _, _ in (pairs if neg_topk == 0 else pairs[:neg_topk])]
    return positives, negatives


def pair_objective(pos_scores, pos_ious, neg_scores):
    """Order-independent but pairing-sensitive function of the detections, for comparing gradients."""
    return (pos_scores * pos_ious + pos_scores ** 2 + 2 * pos_ious).sum() + (neg_scores ** 2 + neg_scores).sum()


@pytest.mark.parametrize("activation,neg_topk", [("softmax", 100), ("sigmoid", 0), ("sigmoid", 5),
                                                 ("sigmoid", 23), ("sigmoid", 24), ("sigmoid", 1000)])
@pytest.mark.parametrize("seed", range(3))
def test_gather_detections_matches_brute_force(activation, neg_topk, seed):
    """Sigmoid: 24 (query, class) pairs per image, so k = 23, 24, 1000 cover k at and above the
    number of negatives of images with positives; neg_topk 0 keeps every pair."""
    num_logits = 5 if activation == "softmax" else 4
    outputs, targets, indices = random_layer(seed, num_logits=num_logits)
    if seed == 2:
        # Positive pairs scored far above everything: they must still not take a negative's place.
        for b, (src, tgt) in enumerate(indices):
            outputs["pred_logits"][b, src, targets[b]["labels"][tgt]] = 6.0
    for t in outputs.values():
        t.requires_grad_()
    pos_s, pos_u, all_neg, neg_w = gather_detections(outputs, matched_pairs(targets, indices), activation, neg_topk)
    ref_pos, ref_neg = ref_gather(outputs, targets, indices, activation, neg_topk)

    assert pos_s.dtype == pos_u.dtype == all_neg.dtype == neg_w.dtype == torch.float32
    assert pos_s.shape == pos_u.shape == (5,)
    # a fixed number of entries (every query; the top k pairs of every image), weighted 0 or 1
    entries = {"softmax": 3 * 6, 0: 3 * 24, 5: 15, 23: 3 * 23, 24: 3 * 24, 1000: 3 * 24}
    assert all_neg.shape == neg_w.shape == (entries["softmax" if activation == "softmax" else neg_topk],)
    assert set(neg_w.tolist()) <= {0.0, 1.0}
    neg_s = all_neg[neg_w > 0]
    expected_negatives = {"softmax": 3 * 6 - 5, 0: 3 * 24 - 5, 5: 15, 23: 21 + 23 + 22, 24: 3 * 24 - 5,
                          1000: 3 * 24 - 5}
    assert neg_s.shape == (expected_negatives["softmax" if activation == "softmax" else neg_topk],)
    got_pos = sorted(zip(pos_s.tolist(), pos_u.tolist()))
    want_pos = sorted((s.item(), u.item()) for s, u in ref_pos)
    np.testing.assert_allclose(got_pos, want_pos, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(sorted(neg_s.tolist()), sorted(s.item() for s in ref_neg), rtol=1e-5, atol=1e-6)

    # The IoUs are those of box_iou on the matched boxes.
    for b, (src, tgt) in enumerate(indices):
        for q, t in zip(src.tolist(), tgt.tolist()):
            iou = box_ops.box_iou(box_ops.box_cxcywh_to_xyxy(outputs["pred_boxes"][b, q:q + 1].float()),
                                  box_ops.box_cxcywh_to_xyxy(targets[b]["boxes"][t:t + 1]))[0]
            score = class_probabilities(outputs["pred_logits"][b, q], activation)[targets[b]["labels"][t]].item()
            assert (score, iou.item()) in [pytest.approx(p, rel=1e-6) for p in got_pos]

    # Gradients reach the logits and the boxes, and equal those of the reference.
    grads = torch.autograd.grad(pair_objective(pos_s, pos_u, neg_s), list(outputs.values()))
    ref_objective = pair_objective(torch.stack([s for s, _ in ref_pos]), torch.stack([u for _, u in ref_pos]),
                                   torch.stack(ref_neg))
    ref_grads = torch.autograd.grad(ref_objective, list(outputs.values()))
    for grad, ref_grad in zip(grads, ref_grads):
        assert grad.abs().sum() > 0
        torch.testing.assert_close(grad, ref_grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("activation", ["softmax", "sigmoid"])
def test_gather_detections_without_any_target(activation):
    outputs, targets, indices = random_layer(0, target_counts=(0, 0), num_logits=5)
    pos_s, pos_u, neg_s, neg_w = gather_detections(outputs, matched_pairs(targets, indices), activation, neg_topk=0)
    assert pos_s.shape == pos_u.shape == (0,) and bool((neg_w == 1).all())
    probs = class_probabilities(outputs["pred_logits"], activation)
    expected = probs.max(-1).values if activation == "softmax" else probs
    torch.testing.assert_close(neg_s.sort().values, expected.flatten().sort().values)


def test_gather_detections_scores_in_float32_under_mixed_precision():
    outputs, targets, indices = random_layer(1)
    half = {"pred_logits": outputs["pred_logits"].bfloat16(), "pred_boxes": outputs["pred_boxes"].bfloat16()}
    pos_s, pos_u, neg_s, _ = gather_detections(half, matched_pairs(targets, indices), "softmax")
    assert pos_s.dtype == pos_u.dtype == neg_s.dtype == torch.float32
    # softmax of the bfloat16 logits evaluated in float32, not rounded to bfloat16
    exact = outputs["pred_logits"].bfloat16().float().softmax(-1)
    batch_idx = torch.cat([torch.full_like(src, b) for b, (src, _) in enumerate(indices)])
    query_idx = torch.cat([src for src, _ in indices])
    labels = torch.cat([t["labels"][tgt] for t, (_, tgt) in zip(targets, indices)])
    torch.testing.assert_close(pos_s, exact[batch_idx, query_idx, labels], rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------- plumbing: DETR's criterion with DAPLoss

def build_criterion(*flags):
    parser = argparse.ArgumentParser(parents=[get_args_parser()])
    args = parser.parse_args(TINY_DETR_FLAGS + ["--num_classes", "4", "--dec_layers", "3", *flags])
    return build_model(args)[1]


def three_layers(seed):
    """Final outputs with two auxiliary layers (dec_layers 3), 10 queries, classes 0..3, and targets.
    Some queries of every layer lie near the ground truth and favour its class, so that positives
    reach IoU 0.5 and precision grows with the score: DAP and its gradients are not 0."""
    layers = [random_layer(seed + i, num_queries=10) for i in range(3)]
    outputs = dict(layers[0][0], aux_outputs=[layer[0] for layer in layers[1:]])
    targets = layers[0][1]
    g = torch.Generator().manual_seed(seed)
    for layer in [outputs] + outputs["aux_outputs"]:
        for b, target in enumerate(targets):
            near = target["boxes"].double() + 0.03 * torch.randn(len(target["boxes"]), 4, generator=g,
                                                                  dtype=torch.float64)
            layer["pred_boxes"][b, 2:2 + len(near)] = near
            layer["pred_logits"][b, torch.arange(2, 2 + len(near)), target["labels"]] += 3
        for key in ("pred_logits", "pred_boxes"):
            layer[key] = layer[key].float().requires_grad_()
    return outputs, targets


def layer_items(outputs):
    return [("", outputs)] + [(f"_{i}", aux) for i, aux in enumerate(outputs["aux_outputs"])]


@pytest.mark.parametrize("loss,num_gt", [("dap", 0), ("raw+dap", 7)])
def test_dap_set_criterion(loss, num_gt):
    criterion = build_criterion("--loss", loss, "--dap_num_gt", str(num_gt), "--dap_bins", "16",
                                "--dap_sigma", "0.1", "--dap_loss_coef", "2.5")
    assert isinstance(criterion.batch_loss, DAPLoss)
    outputs, targets = three_layers(10)
    losses = criterion(outputs, targets)

    dap_keys = {"loss_dap", "loss_dap_0", "loss_dap_1"}
    raw_keys = {f"{k}{s}" for k in ("loss_ce", "loss_bbox", "loss_giou") for s in ("", "_0", "_1")}
    log_keys = {"dap_value", "dap_precision", "cardinality_error", "cardinality_error_0", "cardinality_error_1"}
    if loss == "dap":
        assert set(losses) == dap_keys | log_keys
        assert criterion.weight_dict == {k: 2.5 for k in dap_keys}
    else:
        assert set(losses) == dap_keys | raw_keys | log_keys | {"class_error"}
        raw_weights = {"loss_ce": 1, "loss_bbox": 5, "loss_giou": 2}
        assert criterion.weight_dict == {**{k: 2.5 for k in dap_keys},
                                         **{k + s: w for k, w in raw_weights.items() for s in ("", "_0", "_1")}}
        # The raw terms are those of the plain upstream criterion.
        raw = build_criterion("--loss", "raw")(outputs, targets)
        for key in raw_keys | {"class_error"}:
            torch.testing.assert_close(losses[key], raw[key])

    assert losses["loss_dap"].item() == -losses["dap_value"].item()
    for suffix, layer in layer_items(outputs):
        indices = criterion.matcher(layer, targets)
        detections = gather_detections(layer, matched_pairs(targets, indices), "softmax", 100)
        terms = differentiable_ap_terms(*detections, num_bins=16, sigma=0.1, num_gt=num_gt or None)
        torch.testing.assert_close(losses["loss_dap" + suffix], -terms.dap)
        if not suffix:
            torch.testing.assert_close(losses["dap_precision"], terms.precision.mean())
    # --dap_num_gt 0 divides by the five positives, not by a fixed G.
    if num_gt == 0:
        detections = gather_detections(outputs, matched_pairs(targets, criterion.matcher(outputs, targets)), "softmax")
        fixed = differentiable_ap(*detections, num_bins=16, sigma=0.1, num_gt=6)
        assert losses["loss_dap"].item() == pytest.approx(-fixed.item() * 6 / 5, rel=1e-6)
    assert losses["loss_dap"].item() < 0 and losses["dap_value"].grad_fn is None

    # Every layer's loss_dap reaches its own logits and boxes.
    for suffix, layer in layer_items(outputs):
        grads = torch.autograd.grad(losses["loss_dap" + suffix], [layer["pred_logits"], layer["pred_boxes"]],
                                    retain_graph=True)
        assert all(g.abs().sum() > 0 for g in grads)


class OpCounter(TorchDispatchMode):
    """How many times each operator ran."""

    def __init__(self):
        super().__init__()
        self.calls = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        self.calls[name] = self.calls.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


def test_raw_plus_dap_shares_one_log_softmax_per_layer():
    """Under raw+dap on DETR the cross-entropy and DAP read one log_softmax per layer; the
    weighted loss and its gradients are those of the two criteria computed apart."""
    criterion = build_criterion("--loss", "raw+dap", "--dap_bins", "16", "--dap_sigma", "0.1")
    raw_criterion = build_criterion("--loss", "raw")
    dap_criterion_alone = build_criterion("--loss", "dap", "--dap_bins", "16", "--dap_sigma", "0.1")
    outputs, targets = three_layers(3)
    leaves = [t for _, layer in layer_items(outputs) for t in (layer["pred_logits"], layer["pred_boxes"])]

    with OpCounter() as counter:
        losses = criterion(outputs, targets)
    # (the Hungarian matcher's softmax, one per layer, has no gradient)
    assert counter.calls.get("_log_softmax") == 3 and counter.calls.get("_softmax") == 3

    def weighted(crit, values):
        return sum(values[k] * w for k, w in crit.weight_dict.items() if k in values)
    grads = torch.autograd.grad(weighted(criterion, losses), leaves)
    apart = weighted(raw_criterion, raw_criterion(outputs, targets)) + weighted(
        dap_criterion_alone, dap_criterion_alone(outputs, targets))
    for got, want in zip(grads, torch.autograd.grad(apart, leaves)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("loss", ["raw", "raw+dap"])
def test_each_layer_forms_its_matched_pairs_once(monkeypatch, loss):
    """The matching goes to the device once per layer (matched_pairs), not once for each loss
    that reads it (labels, boxes, DAP)."""
    made = []

    class CountedPairs(matcher_module.MatchedPairs):
        def __new__(cls, *fields):
            made.append(1)
            return super().__new__(cls, *fields)

    monkeypatch.setattr(matcher_module, "MatchedPairs", CountedPairs)
    criterion = build_criterion("--loss", loss)
    outputs, targets = three_layers(3)
    losses = criterion(outputs, targets)
    assert {"loss_ce", "loss_bbox", "loss_giou_0"} <= set(losses) and ("loss_dap" in losses) == (loss == "raw+dap")
    assert len(made) == 3


class HostReads(TorchDispatchMode):
    """The operators that make the host wait for the device: reading a value back (item, float,
    bool), and those whose output size depends on the data (nonzero, boolean-mask indexing)."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        bool_index = name in ("index", "index_put_") and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] if len(args) > 1 else []) or [])
        if name in ("_local_scalar_dense", "nonzero", "masked_select", "item") or bool_index:
            self.seen.append(name)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("activation,num_logits", [("softmax", 5), ("sigmoid", 4)])
@pytest.mark.parametrize("with_others", [False, True])
def test_dap_loss_reads_nothing_back_to_the_host(activation, num_logits, with_others):
    # Given the matching (the matcher runs on the host by design), a layer's DAP-loss, forward
    # and backward, queues its work without waiting for the device, under accumulation too.
    outputs, targets, indices = random_layer(0, num_logits=num_logits, dtype=torch.float32)
    for t in outputs.values():
        t.requires_grad_()
    dap = DAPLoss(activation=activation, num_bins=8, neg_topk=7)
    num_matched = torch.tensor(5.0)
    pairs = matched_pairs(targets, indices)
    layers = [BatchLossLayer("", outputs, indices, pairs), BatchLossLayer("_0", outputs, indices, pairs)]
    totals = {"num_matched": num_matched, "shares": 2}
    if with_others:
        records = {name: r.record for name, r in dap(layers, totals, StepContext.single(targets)).items()}
        step = StepContext([targets, targets], 0, [None, records])
    else:
        step = StepContext.single(targets)
    with HostReads() as reads:
        result = dap(layers, totals, step)[""]
        result.loss.backward()
    assert reads.seen == []
    # the counter sees them where they are
    with HostReads() as reads:
        float(result.dap), outputs["pred_logits"][outputs["pred_logits"] > 0]
    assert reads.seen == ["_local_scalar_dense", "index"]


@pytest.mark.parametrize("activation,num_logits", [("softmax", 5), ("sigmoid", 4)])
def test_dap_loss_of_several_layers_equals_each_layer_alone(activation, num_logits, monkeypatch):
    # Layers of equal sizes are computed as one stack (one all-reduce), others apart: every
    # layer's loss, table, record and gradients as when it is the only layer.
    layers, layer_targets = [], []
    for i, counts in enumerate([(3, 0, 2), (3, 0, 2), (1, 2, 1, 1), (3, 0, 2)]):
        outputs, targets, indices = random_layer(i, target_counts=counts, num_logits=num_logits)
        for t in outputs.values():
            t.requires_grad_()
        layers.append(BatchLossLayer(f"_{i}", outputs, indices, matched_pairs(targets, indices)))
        layer_targets.append(targets)
    dap = DAPLoss(activation=activation, num_bins=8, neg_topk=7)
    reducers = []
    original = dap_criterion.CountReducer.__call__

    def counting(self, counts):
        reducers.append(counts.shape[0])
        return original(self, counts)

    with monkeypatch.context() as patch:
        patch.setattr(dap_criterion.CountReducer, "__call__", counting)
        together = dap(layers, {"num_matched": 5.0, "shares": 2}, StepContext.single(layer_targets[0]))
    assert sorted(reducers) == [1, 3]  # one stack of the three equal layers, one alone
    leaves = [t for layer in layers for t in layer.outputs.values()]
    grads = torch.autograd.grad(sum((i + 1) * together[layer.name].loss for i, layer in enumerate(layers)), leaves)
    for i, (layer, targets) in enumerate(zip(layers, layer_targets)):
        alone = dap([layer], {"num_matched": 5.0, "shares": 2}, StepContext.single(targets))[layer.name]
        result = together[layer.name]
        for got, want in [(result.loss, alone.loss), (result.dap, alone.dap), (result.precision, alone.precision),
                          (result.record.counts, alone.record.counts),
                          (result.record.pos_scores, alone.record.pos_scores)]:
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)
        mine = torch.autograd.grad((i + 1) * alone.loss, list(layer.outputs.values()))
        for got, want in zip(grads[2 * i:2 * i + 2], mine):
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("activation,num_logits,neg_topk", [("softmax", 5, 100), ("sigmoid", 4, 7), ("sigmoid", 4, 0)])
def test_gather_detections_log_odds_are_the_logits_of_the_probabilities(activation, num_logits, neg_topk):
    # The ranking losses rank log(p / (1 - p)) of the same detections DAP scores by p.
    outputs, targets, indices = random_layer(5, num_logits=num_logits)
    probs = gather_detections(outputs, matched_pairs(targets, indices), activation, neg_topk)
    odds = gather_detections(outputs, matched_pairs(targets, indices), activation, neg_topk, log_odds=True)
    for p, o in [(probs[0], odds[0]), (probs[2], odds[2])]:
        torch.testing.assert_close(o, torch.logit(p.double()).to(o.dtype), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(odds[1], probs[1], rtol=0, atol=0)
    torch.testing.assert_close(odds[3], probs[3], rtol=0, atol=0)


def test_softmax_log_odds_are_finite_where_the_probability_rounds_to_one():
    logits = torch.tensor([[40.0, 0.0, -3.0], [0.0, 1.0, 2.0]])
    got = softmax_log_odds(logits, torch.tensor([0, 2]))
    want = [40.0 - math.log(1 + math.exp(-3.0)), 2.0 - math.log(math.exp(0.0) + math.exp(1.0))]
    torch.testing.assert_close(got, torch.tensor(want), rtol=1e-6, atol=0)
    assert torch.softmax(logits[0], 0)[0] == 1.0  # where the probability alone cannot tell
