"""AP matching cost (Eq. 11) against a brute-force float64 loop."""
import math

import numpy as np
import pytest
import torch

from models.dap_matcher import ap_matching_cost, constant_precision

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


@pytest.mark.parametrize('seed', range(8))
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


@pytest.mark.parametrize('n', [1, 32])
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
