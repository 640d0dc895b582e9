"""AP matching cost (Eq. 11) against a brute-force float64 loop, and the DAPMatcher around it:
its assignments, its momentum table, and how the criterion and checkpoints keep that table."""
import argparse
import math
import os

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment

import main as detr_main
from models import build_model
from models.dap_functional import ap_matching_cost, constant_precision, differentiable_ap_terms
from models.dap_matcher import DAPMatcher
from models.detections import gather_detections
from models.matcher import matched_pairs
from util.checkpoint import load_checkpoint, restore_criterion

from conftest import TINY_DETR_FLAGS

ALPHAS = [0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95]


def phi(z):
    return 0.5 * math.erfc(-z / math.sqrt(2))


def ref_cost(s, u, prec, sigma):
    """-sum_i L̂_i(u) F_i(s), with L̂_i interpolated by np.interp through the knots of Eq. 4."""
    n = len(prec[0])
    total = 0.0
    for i in range(n):
        lower = 0.0 if i == 0 else phi((i / n - s) / sigma)
        upper = 1.0 if i == n - 1 else phi(((i + 1) / n - s) / sigma)
        heights = [0.0]
        for k in range(len(ALPHAS)):
            heights.append(heights[-1] + prec[k][i])
        heights.append(heights[-1] + prec[-1][i])
        total += (upper - lower) * np.interp(u, [0.0] + ALPHAS + [1.0], heights)
    return -total


def random_pairs(rng, num_queries, num_targets):
    scores = np.where(rng.random((num_queries, num_targets)) < 0.2,
                      rng.choice([0.0, 0.25, 1.0], (num_queries, num_targets)),
                      rng.random((num_queries, num_targets)))
    ious = np.where(rng.random((num_queries, num_targets)) < 0.3,
                    rng.choice([0.0, 1.0] + ALPHAS, (num_queries, num_targets)),
                    rng.random((num_queries, num_targets)))
    return scores, ious


@pytest.mark.parametrize("seed", range(8))
def test_cost_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    n, sigma = int(rng.choice([1, 4, 32])), float(rng.choice([0.02, 0.05, 0.2]))
    scores, ious = random_pairs(rng, 7, 5)
    prec = np.maximum.accumulate(rng.random((10, n)), axis=1)
    cost = ap_matching_cost(torch.tensor(scores), torch.tensor(ious), torch.tensor(prec), sigma=sigma)
    assert cost.shape == (7, 5) and cost.dtype == torch.float64
    expected = [[ref_cost(scores[q, t], ious[q, t], prec.tolist(), sigma) for t in range(5)] for q in range(7)]
    np.testing.assert_allclose(cost.numpy(), expected, rtol=1e-10, atol=1e-13)


def test_cost_prefers_high_scores_when_precision_grows_with_score():
    prec = torch.linspace(0.1, 1.0, 8).expand(10, 8)
    cost = ap_matching_cost(torch.tensor([[0.2], [0.9]]), torch.tensor([[0.8], [0.8]]), prec, sigma=0.05)
    assert cost[1, 0] < cost[0, 0]


def test_constant_precision_table():
    table = constant_precision(16, dtype=torch.float64)
    assert table.shape == (10, 16) and table.dtype == torch.float64
    assert (table == 1 / 16).all()


@pytest.mark.parametrize("n", [1, 32])
def test_constant_mode_is_iou_only(n):
    rng = np.random.default_rng(n)
    scores_a, ious = random_pairs(rng, 6, 4)
    scores_b = rng.random((6, 4))
    prec = constant_precision(n, dtype=torch.float64)
    costs = [ap_matching_cost(torch.tensor(s), torch.tensor(ious), prec, sigma=0.05) for s in (scores_a, scores_b)]
    # -L̂(u) through (0, 0), (alpha_k, (k + 1) / N), (1, 11 / N)
    expected = -np.interp(ious, [0.0] + ALPHAS + [1.0], np.arange(12) / n)
    for cost in costs:
        np.testing.assert_allclose(cost.numpy(), expected, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(costs[0].numpy(), costs[1].numpy(), rtol=1e-12, atol=1e-15)


def test_dtype_and_empty_targets():
    prec = constant_precision(8)
    cost = ap_matching_cost(torch.rand(5, 3), torch.rand(5, 3), prec, sigma=0.05)
    assert cost.dtype == torch.float32 and cost.shape == (5, 3)
    assert ap_matching_cost(torch.rand(5, 0), torch.rand(5, 0), prec, sigma=0.05).shape == (5, 0)


# ---------------------------------------------------------------- DAPMatcher

def spec_cost(s, u, prec, sigma):
    """Eq. 11 written out from its definition (docs/DAP.md): Phi by math.erf, L̂_i by finding u's segment by hand."""
    def big_phi(z):
        return 0.5 * (1 + math.erf(z / math.sqrt(2)))

    n = len(prec[0])
    u = min(max(u, 0.0), 1.0)
    knots = [0.0] + ALPHAS + [1.0]
    total = 0.0
    for i in range(n):
        upper = 1.0 if i == n - 1 else big_phi(((i + 1) / n - s) / sigma)  # x_N = +inf
        lower = 0.0 if i == 0 else big_phi((i / n - s) / sigma)  # x_0 = -inf
        mass = upper - lower
        heights = [0.0]
        for k in range(len(ALPHAS)):
            heights.append(heights[-1] + prec[k][i])
        heights.append(heights[-1] + prec[-1][i])
        a = next(a for a in range(len(knots) - 1) if knots[a] <= u <= knots[a + 1])
        total += mass * (heights[a] + (u - knots[a]) / (knots[a + 1] - knots[a]) * (heights[a + 1] - heights[a]))
    return -total


def hand_iou(a, b):
    """IoU of two cxcywh boxes given as lists."""
    ax0, ay0, ax1, ay1 = a[0] - a[2] / 2, a[1] - a[3] / 2, a[0] + a[2] / 2, a[1] + a[3] / 2
    bx0, by0, bx1, by1 = b[0] - b[2] / 2, b[1] - b[3] / 2, b[0] + b[2] / 2, b[1] + b[3] / 2
    inter = max(0.0, min(ax1, bx1) - max(ax0, bx0)) * max(0.0, min(ay1, by1) - max(ay0, by0))
    return inter / (a[2] * a[3] + b[2] * b[3] - inter)


def matcher_inputs(seed, target_counts=(4, 0, 3, 1), num_queries=7, num_classes=3, spread=0.25):
    """Softmax outputs and targets; every box is near the image centre (spread), so IoUs are
    continuous and mostly above 0, and ties in the cost are unlikely."""
    g = torch.Generator().manual_seed(seed)

    def boxes(*shape):
        centres = 0.5 + spread * (torch.rand(*shape, 2, generator=g) - 0.5)
        return torch.cat([centres, 0.2 + 0.4 * torch.rand(*shape, 2, generator=g)], -1)

    outputs = {"pred_logits": 2 * torch.randn(len(target_counts), num_queries, num_classes + 1, generator=g),
               "pred_boxes": boxes(len(target_counts), num_queries)}
    targets = [{"labels": torch.randint(0, num_classes, (n,), generator=g), "boxes": boxes(n)} for n in target_counts]
    return outputs, targets


def spec_cost_matrices(outputs, targets, prec, sigma):
    costs = []
    for logits, pred_boxes, target in zip(outputs["pred_logits"].tolist(), outputs["pred_boxes"].tolist(), targets):
        cost = np.zeros((len(logits), len(target["labels"])))
        for q, (row, box) in enumerate(zip(logits, pred_boxes)):
            exps = [math.exp(v) for v in row]
            for t, (label, gt_box) in enumerate(zip(target["labels"].tolist(), target["boxes"].tolist())):
                cost[q, t] = spec_cost(exps[label] / sum(exps), hand_iou(box, gt_box), prec, sigma)
        costs.append(cost)
    return costs


def check_is_assignment(indices, targets, num_queries):
    assert len(indices) == len(targets)
    for (src, tgt), target in zip(indices, targets):
        assert src.dtype == tgt.dtype == torch.int64
        assert len(src) == len(tgt) == min(num_queries, len(target["labels"]))
        assert len(set(src.tolist())) == len(src) and sorted(tgt.tolist()) == list(range(len(tgt)))


@pytest.mark.parametrize("mode", ["constant", "momentum"])
@pytest.mark.parametrize("seed", range(4))
def test_matcher_minimises_the_spec_cost(mode, seed):
    n, sigma = 8, [0.05, 0.1][seed % 2]
    matcher = DAPMatcher(activation="softmax", num_bins=n, sigma=sigma, mode=mode)
    if mode == "momentum":
        # A table as the criterion reports it: interpolated, so non-decreasing over the bins.
        rng = np.random.default_rng(seed)
        matcher.precision.copy_(torch.from_numpy(np.maximum.accumulate(rng.random((10, n)), axis=1)))
    outputs, targets = matcher_inputs(seed)
    indices = matcher(outputs, targets)
    check_is_assignment(indices, targets, 7)
    for (src, tgt), cost in zip(indices, spec_cost_matrices(outputs, targets, matcher.precision.tolist(), sigma)):
        best = cost[linear_sum_assignment(cost)].sum()
        # Ties aside, the matcher's assignment is optimal for the cost of Eq. 11.
        assert cost[src.numpy(), tgt.numpy()].sum() == pytest.approx(best, abs=1e-5)


@pytest.mark.parametrize("seed", range(3))
def test_constant_matcher_assigns_by_iou_only(seed):
    n = 16
    matcher = DAPMatcher(activation="softmax", num_bins=n, sigma=0.05)
    outputs, targets = matcher_inputs(seed, target_counts=(5, 2, 3), num_queries=8)
    indices = matcher(outputs, targets)
    check_is_assignment(indices, targets, 8)
    for (src, tgt), pred_boxes, target in zip(indices, outputs["pred_boxes"], targets):
        ious = np.array([[hand_iou(p, t) for t in target["boxes"].tolist()] for p in pred_boxes.tolist()])
        assert (ious > 0).all()  # no ties at cost 0
        # -L̂(u) with P = 1/N: through (0, 0), (alpha_k, (k + 1) / N), (1, 11 / N)
        expected = linear_sum_assignment(-np.interp(ious, [0.0] + ALPHAS + [1.0], np.arange(12) / n))
        assert src.tolist() == expected[0].tolist() and tgt.tolist() == expected[1].tolist()

    # Other scores, the same assignment; whereas a score-dependent table does change it.
    g = torch.Generator().manual_seed(99)
    other = dict(outputs, pred_logits=4 * torch.randn(outputs["pred_logits"].shape, generator=g))
    for (src, tgt), (src2, tgt2) in zip(indices, matcher(other, targets)):
        assert torch.equal(src, src2) and torch.equal(tgt, tgt2)
    rising = DAPMatcher(activation="softmax", num_bins=n, sigma=0.05, mode="momentum")
    rising.precision.copy_(torch.linspace(0.0, 1.0, n).expand(10, n))
    pairs = [[list(zip(src.tolist(), tgt.tolist())) for src, tgt in rising(o, targets)] for o in (outputs, other)]
    assert pairs[0] != pairs[1]


def test_momentum_update_arithmetic():
    n, m = 6, 0.8
    matcher = DAPMatcher(activation="softmax", num_bins=n, mode="momentum", momentum=m)
    constant = DAPMatcher(activation="softmax", num_bins=n, mode="constant", momentum=m)
    c = torch.full((10, n), 1 / n, dtype=torch.float64)
    p1, p2 = torch.rand(10, n, dtype=torch.float64), torch.rand(10, n, dtype=torch.float64)
    torch.testing.assert_close(matcher.precision, c.float())
    for table in (p1, p2):
        matcher.update_precision(table)
        constant.update_precision(table)
    assert matcher.precision.dtype == torch.float32
    torch.testing.assert_close(matcher.precision, (m * (m * c + (1 - m) * p1) + (1 - m) * p2).float())
    assert (constant.precision == 1 / n).all()
    assert set(matcher.state_dict()) == {"precision"}


def build_criterion(*flags):
    parser = argparse.ArgumentParser(parents=[detr_main.get_args_parser()])
    args = parser.parse_args(TINY_DETR_FLAGS + ["--num_classes", "3", "--dec_layers", "3", "--loss", "dap",
                                                "--matcher", "dap", "--dap_bins", "8", *flags])
    return build_model(args)[1]


def criterion_inputs(seed):
    """Final and two auxiliary layers; the queries 0..T-1 sit on their targets and score their
    class, so DAP and its precision table are far from the constant 1/N."""
    layers = [matcher_inputs(seed + i, target_counts=(3, 0, 2), num_queries=6) for i in range(3)]
    targets = layers[0][1]
    g = torch.Generator().manual_seed(seed)
    for outputs, _ in layers:
        for b, target in enumerate(targets):
            count = len(target["labels"])
            outputs["pred_boxes"][b, :count] = target["boxes"] + 0.02 * torch.randn(count, 4, generator=g)
            outputs["pred_logits"][b, torch.arange(count), target["labels"]] += 4
    return dict(layers[0][0], aux_outputs=[outputs for outputs, _ in layers[1:]]), targets


def test_criterion_feeds_the_final_layer_precision_to_the_matcher_in_training_only():
    criterion = build_criterion("--dap_cost_mode", "momentum", "--dap_momentum", "0.5", "--dap_num_gt", "0")
    matcher = criterion.matcher
    assert isinstance(matcher, DAPMatcher) and matcher.mode == "momentum" and matcher.momentum == 0.5
    outputs, targets = criterion_inputs(0)
    before = matcher.precision.clone()
    final = {k: v for k, v in outputs.items() if k != "aux_outputs"}
    detections = gather_detections(final, matched_pairs(targets, matcher(final, targets)), "softmax")
    terms = differentiable_ap_terms(*detections, num_bins=8, sigma=0.05)

    criterion.train()
    criterion(outputs, targets)
    torch.testing.assert_close(matcher.precision, 0.5 * before + 0.5 * terms.precision)
    assert not torch.allclose(matcher.precision, before)

    trained = matcher.precision.clone()
    criterion.eval()
    criterion(outputs, targets)
    assert torch.equal(matcher.precision, trained)


def test_every_layer_of_an_iteration_is_matched_with_the_same_table():
    """The table is an average over earlier iterations (docs/DAP.md, section 4): the auxiliary layers of an
    iteration must not be matched with a table that already holds this iteration's precision."""
    criterion = build_criterion("--dap_cost_mode", "momentum", "--dap_momentum", "0.5")
    matcher, seen = criterion.matcher, []

    def recording_forward(outputs, targets, forward=matcher.forward):
        seen.append(matcher.precision.clone())
        return forward(outputs, targets)

    matcher.forward = recording_forward
    criterion.train()
    for seed in range(2):
        seen.clear()
        criterion(*criterion_inputs(seed))
        assert len(seen) == 3
        for table in seen[1:]:
            torch.testing.assert_close(table, seen[0], rtol=0, atol=0)


def test_momentum_table_survives_checkpoint_and_resume(synthetic_coco, tmp_path, monkeypatch, capsys):
    path, num_classes = synthetic_coco
    flags = TINY_DETR_FLAGS + ["--coco_path", path, "--num_classes", str(num_classes), "--batch_size", "2",
                               "--loss", "dap", "--matcher", "dap", "--dap_cost_mode", "momentum", "--dap_bins", "8",
                               "--dap_num_gt", "0", "--epochs", "1", "--output_dir", str(tmp_path)]
    parser = argparse.ArgumentParser(parents=[detr_main.get_args_parser()])
    detr_main.main(parser.parse_args(flags))
    ckpt_path = os.path.join(tmp_path, "checkpoint.pth")
    ckpt = load_checkpoint(ckpt_path)
    saved = ckpt["matcher"]["precision"]
    assert saved.shape == (10, 8)
    assert not torch.allclose(saved, constant_precision(8))

    # main's resume path hands the table to the new run's matcher (--epochs 1: nothing more to train).
    built, build_model = [], detr_main.build_model
    monkeypatch.setattr(detr_main, "build_model", lambda *a: built.append(build_model(*a)) or built[-1])
    detr_main.main(parser.parse_args(flags + ["--resume", ckpt_path]))
    assert torch.equal(built[0][1].matcher.precision, saved)

    # restore_criterion itself, on a freshly built criterion, and on a checkpoint without matcher state.
    fresh = build_criterion("--num_classes", str(num_classes), "--dec_layers", "2", "--dap_cost_mode", "momentum")
    restore_criterion(fresh, ckpt, ckpt_path)
    assert torch.equal(fresh.matcher.precision, saved)
    untouched = build_criterion("--dap_cost_mode", "momentum")
    capsys.readouterr()
    restore_criterion(untouched, {"model": {}}, "old.pth")
    assert torch.equal(untouched.matcher.precision, constant_precision(8))
    assert "old.pth" in capsys.readouterr().out


def per_image_reference(matcher, outputs, targets):
    """The cost of Eq. 11 image by image (the matcher computes the batch at once)."""
    from models.dap_functional import class_probabilities
    from models.matcher import assign_each
    from util.box_ops import box_cxcywh_to_xyxy, box_iou
    probs = class_probabilities(outputs["pred_logits"], matcher.activation)
    costs = []
    for image_probs, boxes, target in zip(probs, box_cxcywh_to_xyxy(outputs["pred_boxes"]), targets):
        ious, _ = box_iou(boxes, box_cxcywh_to_xyxy(target["boxes"]))
        costs.append(ap_matching_cost(image_probs[:, target["labels"]], ious, matcher.precision, sigma=matcher.sigma))
    return costs, assign_each(costs)


@pytest.mark.parametrize("mode", ["constant", "momentum"])
@pytest.mark.parametrize("counts", [(4, 0, 3, 1), (0, 0), (2,), (7, 7, 1)])
def test_batched_matcher_equals_the_per_image_cost(mode, counts):
    matcher = DAPMatcher(activation="softmax", num_bins=8, sigma=0.05, mode=mode)
    if mode == "momentum":
        matcher.precision.copy_(torch.linspace(0.2, 0.9, 80).reshape(10, 8).cummax(-1).values)
    for seed in range(3):
        outputs, targets = matcher_inputs(seed, target_counts=counts)
        costs, expected = per_image_reference(matcher, outputs, targets)
        indices = matcher(outputs, targets)
        for (src, tgt), (src_ref, tgt_ref), cost in zip(indices, expected, costs):
            if mode == "momentum":  # the same arithmetic, batched: the same assignment
                assert src.tolist() == src_ref.tolist() and tgt.tolist() == tgt_ref.tolist()
            else:  # the closed form -L̂(u): optimal for the binned cost
                cost = cost.numpy()
                best = cost[linear_sum_assignment(cost)].sum()
                assert cost[src.numpy(), tgt.numpy()].sum() == pytest.approx(best, abs=1e-6)
