"""HungarianMatcher against brute force over every assignment, on small random cases."""
import itertools
import math

import pytest
import torch

from models.matcher import HungarianMatcher, assign_per_image
from models.set_criterion import build_matcher

from conftest import reference_giou


def random_boxes(n, generator):
    """Valid normalised cxcywh boxes."""
    cxcy = torch.rand(n, 2, generator=generator) * 0.6 + 0.2
    wh = torch.rand(n, 2, generator=generator) * 0.3 + 0.05
    return torch.cat([cxcy, wh], dim=1)


def reference_cost(logits, pred_boxes, labels, tgt_boxes, w_class, w_bbox, w_giou):
    """Upstream DETR's matching cost, one pair at a time in float64."""
    def xyxy(b):
        cx, cy, w, h = (float(v) for v in b)
        return cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2

    cost = [[0.0] * len(labels) for _ in range(len(logits))]
    for q in range(len(logits)):
        z = [math.exp(float(v)) for v in logits[q]]
        for t in range(len(labels)):
            prob = z[int(labels[t])] / sum(z)
            l1 = sum(abs(float(a) - float(b)) for a, b in zip(pred_boxes[q], tgt_boxes[t]))
            cost[q][t] = (-w_class * prob + w_bbox * l1
                          - w_giou * reference_giou(xyxy(pred_boxes[q]), xyxy(tgt_boxes[t])))
    return cost


def brute_force_min(cost, num_queries, num_targets):
    """Smallest total cost of any one-to-one assignment of min(Q, T) pairs."""
    if num_targets <= num_queries:
        return min(sum(cost[q][t] for t, q in enumerate(perm))
                   for perm in itertools.permutations(range(num_queries), num_targets))
    return min(sum(cost[q][t] for q, t in enumerate(perm))
               for perm in itertools.permutations(range(num_targets), num_queries))


WEIGHTS = [(1, 5, 2), (1, 0, 0), (0, 1, 0), (0, 0, 1), (2, 1, 0)]


@pytest.mark.parametrize("weights", WEIGHTS)
@pytest.mark.parametrize("seed", range(6))
def test_matcher_is_optimal(weights, seed):
    g = torch.Generator().manual_seed(seed)
    num_classes = 4
    num_queries = int(torch.randint(1, 7, (1,), generator=g))
    # Include images without targets and, for small Q, more targets than queries.
    sizes = [0] + [int(torch.randint(0, 5, (1,), generator=g)) for _ in range(2)]
    bs = len(sizes)
    outputs = {"pred_logits": torch.randn(bs, num_queries, num_classes + 1, generator=g) * 2,
               "pred_boxes": torch.stack([random_boxes(num_queries, g) for _ in range(bs)])}
    targets = [{"labels": torch.randint(0, num_classes, (n,), generator=g), "boxes": random_boxes(n, g)}
               for n in sizes]

    indices = HungarianMatcher(*weights)(outputs, targets)

    assert len(indices) == bs
    for b, ((src, tgt), target) in enumerate(zip(indices, targets)):
        n = len(target["labels"])
        assert src.dtype == tgt.dtype == torch.int64
        assert len(src) == len(tgt) == min(num_queries, n)
        assert len(set(src.tolist())) == len(src) and len(set(tgt.tolist())) == len(tgt)
        if n == 0:
            continue
        cost = reference_cost(outputs["pred_logits"][b], outputs["pred_boxes"][b], target["labels"],
                              target["boxes"], *weights)
        chosen = sum(cost[q][t] for q, t in zip(src.tolist(), tgt.tolist()))
        assert chosen == pytest.approx(brute_force_min(cost, num_queries, n), abs=1e-5)


def test_matcher_with_no_targets_in_the_batch():
    outputs = {"pred_logits": torch.randn(2, 3, 5), "pred_boxes": torch.rand(2, 3, 4) * 0.5 + 0.25}
    targets = [{"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)}] * 2
    for src, tgt in HungarianMatcher(1, 5, 2)(outputs, targets):
        assert src.shape == tgt.shape == (0,) and src.dtype == torch.int64


def test_matcher_finds_the_obvious_assignment():
    boxes = torch.tensor([[0.2, 0.2, 0.1, 0.1], [0.5, 0.5, 0.2, 0.2], [0.8, 0.7, 0.1, 0.3]])
    logits = torch.zeros(1, 3, 4)
    outputs = {"pred_logits": logits, "pred_boxes": boxes[None]}
    targets = [{"labels": torch.tensor([0, 1]), "boxes": boxes[[2, 0]]}]
    (src, tgt), = HungarianMatcher(1, 5, 2)(outputs, targets)
    assert sorted(zip(src.tolist(), tgt.tolist())) == [(0, 1), (2, 0)]


def test_assign_per_image_splits_the_batched_cost():
    # Image 0 has 1 target, image 1 has 2: columns 0 | 1, 2 of the batched cost.
    cost = torch.tensor([[[5., 0., 9.], [1., 9., 0.]],
                         [[9., 3., 1.], [0., 2., 8.]]])
    (s0, t0), (s1, t1) = assign_per_image(cost, [1, 2])
    assert s0.tolist() == [1] and t0.tolist() == [0]
    assert sorted(zip(s1.tolist(), t1.tolist())) == [(0, 1), (1, 0)]


def test_build_matcher_and_all_zero_weights():
    class Args:
        matcher, set_cost_class, set_cost_bbox, set_cost_giou = "hungarian", 1, 5, 2

    m = build_matcher(Args, "softmax")
    assert (m.cost_class, m.cost_bbox, m.cost_giou, m.focal) == (1, 5, 2, False)
    assert build_matcher(Args, "sigmoid").focal
    with pytest.raises(ValueError):
        HungarianMatcher(0, 0, 0)
