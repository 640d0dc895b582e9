"""models/dap_functional.py, DAP's mathematics: values against a brute-force float64 reference
written from docs/DAP.md (sections 3-4), gradients against finite differences, the distributed
counts hook, numerics and memory."""
import math

import numpy as np
import pytest
import torch

from models.dap_functional import (
    COCO_IOU_THRESHOLDS,
    bin_mass,
    differentiable_ap,
    differentiable_ap_terms,
    interpolated_precision,
    localisation_function,
    score_thresholds,
    tail_mass,
    weighted_tail_sum,
)

from conftest import LargestTensor

ALPHAS = [0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95]


# ---------------------------------------------------------------- brute-force reference

def phi(z):
    return 0.5 * math.erfc(-z / math.sqrt(2))


def ref_bin_mass(s, n, sigma):
    """F_i(s) = Phi((x_{i+1} - s) / sigma) - Phi((x_i - s) / sigma), x_0 = -inf, x_N = +inf."""
    masses = []
    for i in range(n):
        lower = 0.0 if i == 0 else phi((i / n - s) / sigma)
        upper = 1.0 if i == n - 1 else phi(((i + 1) / n - s) / sigma)
        masses.append(upper - lower)
    return masses


def ref_tails(s, n, sigma):
    """T_i(s) = sum_{j >= i} F_j(s)."""
    masses = ref_bin_mass(s, n, sigma)
    return [sum(masses[i:]) for i in range(n)]


def ref_localisation(u, prec):
    """L̂_i(u) for every bin i, by locating u's segment among the knots one by one."""
    u = min(max(u, 0.0), 1.0)
    xs = [0.0] + ALPHAS + [1.0]
    out = []
    for i in range(len(prec[0])):
        heights, c = [0.0], 0.0
        for k in range(len(ALPHAS)):
            c += prec[k][i]
            heights.append(c)
        heights.append(c + prec[-1][i])
        for a in range(len(xs) - 1):
            if xs[a] <= u <= xs[a + 1]:
                out.append(heights[a] + (u - xs[a]) / (xs[a + 1] - xs[a]) * (heights[a + 1] - heights[a]))
                break
    return out


def ref_precision(pos_s, pos_u, neg_s, n, sigma, scale=1.0):
    pos_t = [ref_tails(s, n, sigma) for s in pos_s]
    neg_t = [ref_tails(s, n, sigma) for s in neg_s]
    table = []
    for alpha in ALPHAS:
        row = []
        for i in range(n):
            tp = fp = 0.0
            for tails, u in zip(pos_t, pos_u):
                if u >= alpha:
                    tp += tails[i]
                else:
                    fp += tails[i]
            for tails in neg_t:
                fp += tails[i]
            tp, fp = scale * tp, scale * fp
            p = tp / (tp + fp) if tp + fp > 0 else 0.0
            row.append(max(p, row[-1]) if row else p)  # running max over j <= i
        table.append(row)
    return table


def ref_dap(pos_s, pos_u, neg_s, n, sigma, num_gt=None):
    prec = ref_precision(pos_s, pos_u, neg_s, n, sigma)
    g = len(pos_s) if num_gt is None else num_gt
    if g == 0:
        return 0.0, prec
    total = 0.0
    for s, u in zip(pos_s, pos_u):
        for f, height in zip(ref_bin_mass(s, n, sigma), ref_localisation(u, prec)):
            total += f * height
    return total / (len(ALPHAS) * g), prec


def counting_ap(pos_s, pos_u, neg_s, n, num_gt):
    """Rectangle-rule AP of Eq. 3 by plain counting at the score thresholds x_i = i / N:
    sum_i (R_i - R_{i+1}) * max_{j <= i} precision_j, averaged over the IoU thresholds."""
    aps = []
    for alpha in ALPHAS:
        precisions, recalls = [], []
        for i in range(n):
            def kept(s, i=i):
                return i == 0 or s >= i / n
            tp = sum(1 for s, u in zip(pos_s, pos_u) if kept(s) and u >= alpha)
            fp = sum(1 for s, u in zip(pos_s, pos_u) if kept(s) and u < alpha) + sum(map(kept, neg_s))
            precisions.append(tp / (tp + fp) if tp + fp else 0.0)
            recalls.append(tp / num_gt)
        recalls.append(0.0)
        aps.append(sum((recalls[i] - recalls[i + 1]) * max(precisions[:i + 1]) for i in range(n)))
    return sum(aps) / len(aps)


# ---------------------------------------------------------------- helpers

def random_case(seed):
    """Random detections, with a share of scores at 0, 1 or exactly on a score threshold and of
    IoUs at 0, 1 or exactly on an IoU threshold."""
    rng = np.random.default_rng(seed)
    n = int(rng.choice([1, 2, 5, 8, 32]))
    sigma = float(rng.choice([0.01, 0.05, 0.2]))
    num_pos, num_neg = int(rng.integers(0, 25)), int(rng.integers(0, 30))

    def scores(m):
        special = rng.choice([0.0, 1.0] + [i / n for i in range(n)], size=m)
        return np.where(rng.random(m) < 0.3, special, rng.random(m))

    special_iou = rng.choice([0.0, 1.0] + ALPHAS, size=num_pos)
    ious = np.where(rng.random(num_pos) < 0.3, special_iou, rng.random(num_pos))
    num_gt = [None, num_pos, int(rng.integers(1, 40))][seed % 3]
    return scores(num_pos), ious, scores(num_neg), n, sigma, num_gt


def tensors(*arrays, dtype=torch.float64):
    return [torch.tensor(np.asarray(a, dtype=np.float64), dtype=dtype).requires_grad_() for a in arrays]


def run(pos_s, pos_u, neg_s, n, sigma, num_gt, dtype=torch.float64):
    ps, pu, ns = tensors(pos_s, pos_u, neg_s, dtype=dtype)
    terms = differentiable_ap_terms(ps, pu, ns, num_bins=n, sigma=sigma, num_gt=num_gt)
    terms.dap.backward()
    return terms, (ps.grad, pu.grad, ns.grad)


# ---------------------------------------------------------------- values

def test_iou_thresholds_are_the_decimals():
    assert COCO_IOU_THRESHOLDS == tuple(ALPHAS)


@pytest.mark.parametrize("seed", range(60))
def test_matches_brute_force(seed):
    pos_s, pos_u, neg_s, n, sigma, num_gt = random_case(seed)
    (dap, prec), grads = run(pos_s, pos_u, neg_s, n, sigma, num_gt)
    ref, ref_prec = ref_dap(list(pos_s), list(pos_u), list(neg_s), n, sigma, num_gt)
    assert dap.dtype == torch.float64 and prec.shape == (10, n)
    assert dap.item() == pytest.approx(ref, rel=1e-10, abs=1e-13)
    np.testing.assert_allclose(prec.detach().numpy(), ref_prec, rtol=1e-10, atol=1e-13)
    assert all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("seed", range(20))
def test_float32_matches_brute_force_with_finite_gradients(seed):
    pos_s, pos_u, neg_s, n, sigma, num_gt = random_case(500 + seed)
    (dap, prec), grads = run(pos_s, pos_u, neg_s, n, sigma, num_gt, torch.float32)
    ref, ref_prec = ref_dap(list(pos_s), list(pos_u), list(neg_s), n, sigma, num_gt)
    assert dap.dtype == torch.float32
    assert dap.item() == pytest.approx(ref, rel=1e-5, abs=1e-6)
    np.testing.assert_allclose(prec.detach().numpy(), ref_prec, rtol=1e-5, atol=1e-6)
    assert all(torch.isfinite(g).all() for g in grads)


EDGE_CASES = {
    "no_positives": ([], [], [0.3, 0.9], 8, 0.05, None),
    "no_positives_fixed_gt": ([], [], [0.3, 0.9], 8, 0.05, 5),
    "nothing": ([], [], [], 8, 0.05, None),
    "no_negatives": ([0.2, 0.7, 0.9], [0.3, 0.6, 0.97], [], 8, 0.05, None),
    "all_scores_0": ([0.0, 0.0], [0.7, 0.2], [0.0, 0.0, 0.0], 32, 0.05, None),
    "all_scores_1": ([1.0, 1.0], [0.7, 0.2], [1.0, 1.0, 1.0], 32, 0.05, 4),
    "ious_0": ([0.4, 0.8], [0.0, 0.0], [0.5], 32, 0.05, None),
    "ious_1": ([0.4, 0.8], [1.0, 1.0], [0.5], 32, 0.05, None),
    "on_thresholds": ([0.25, 0.5, 0.75], [0.5, 0.85, 0.9], [0.125, 0.875], 8, 0.05, None),
    "tiny_sigma_far_tail": ([0.05, 0.99], [0.6, 0.96], [0.02, 0.98], 32, 0.001, None),
    "zero_gt": ([0.2, 0.7], [0.6, 0.9], [0.5], 8, 0.05, 0),
    # Tails 37.8 sigma out: subnormal soft counts in float64.
    "subnormal_counts": ([0.122, 0.122], [0.7, 0.2], [0.122], 2, 0.01, None),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", EDGE_CASES)
def test_edge_cases(name, dtype):
    pos_s, pos_u, neg_s, n, sigma, num_gt = EDGE_CASES[name]
    (dap, prec), grads = run(pos_s, pos_u, neg_s, n, sigma, num_gt, dtype)
    ref, ref_prec = ref_dap(pos_s, pos_u, neg_s, n, sigma, num_gt)
    assert dap.dtype == dtype and prec.dtype == dtype
    assert dap.grad_fn is not None
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    assert dap.item() == pytest.approx(ref, rel=tol, abs=tol)
    np.testing.assert_allclose(prec.detach().numpy(), ref_prec, rtol=tol, atol=tol)
    assert torch.isfinite(prec).all()
    assert all(torch.isfinite(g).all() for g in grads)
    if num_gt == 0 or not pos_s:
        assert dap.item() == 0.0
        assert all((g == 0).all() for g in grads)


def test_value_is_zero_exactly_without_positives_even_with_negatives_requiring_grad():
    neg = torch.rand(7, requires_grad=True)
    dap = differentiable_ap(torch.zeros(0, requires_grad=True), torch.zeros(0), neg, num_gt=3)
    dap.backward()
    assert dap.item() == 0.0 and (neg.grad == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n", [1, 8, 32])
def test_perfect_detections_give_1_point_1(n, dtype):
    scores = torch.cat([torch.ones(3), torch.rand(5, generator=torch.Generator().manual_seed(n))]).to(dtype)
    terms = differentiable_ap_terms(scores, torch.ones_like(scores), scores[:0], num_bins=n)
    assert terms.dap.dtype == dtype
    assert terms.dap.item() == pytest.approx(1.1, rel=1e-6 if dtype == torch.float32 else 1e-14)
    assert (terms.precision == 1).all()


@pytest.mark.parametrize("seed", range(15))
def test_sharp_limit_is_counting_ap(seed):
    """sigma -> 0 with IoUs on the knots of L̂ (where L̂ = L) gives the rectangle-rule AP of Eq. 3."""
    rng = np.random.default_rng(100 + seed)
    n = int(rng.choice([4, 10, 32]))
    num_pos, num_neg = int(rng.integers(1, 20)), int(rng.integers(0, 20))

    def scores(m):  # inside a bin, at least 0.1 / n away from its edges; or 0 or 1
        inside = (rng.integers(0, n, m) + rng.uniform(0.1, 0.9, m)) / n
        return np.where(rng.random(m) < 0.15, rng.choice([0.0, 1.0], m), inside)

    pos_s, neg_s = scores(num_pos), scores(num_neg)
    pos_u = rng.choice([0.0] + ALPHAS, num_pos)
    num_gt = num_pos + int(rng.integers(0, 5))
    dap = differentiable_ap(*tensors(pos_s, pos_u, neg_s), num_bins=n, sigma=1e-4, num_gt=num_gt)
    assert dap.item() == pytest.approx(counting_ap(pos_s, pos_u, neg_s, n, num_gt), rel=1e-12, abs=1e-15)


def test_iou_on_a_threshold_reaches_it_in_float32():
    # 0.85 and 0.9 are where accumulated thresholds (0.8500000000000001, 0.8999999999999999) err.
    for alpha in (0.85, 0.9):
        ious = torch.tensor([alpha], dtype=torch.float32)
        prec = differentiable_ap_terms(torch.tensor([0.6]), ious, torch.tensor([0.6]), num_bins=4).precision
        k = ALPHAS.index(alpha)
        assert (prec[k] == 0.5).all() and (prec[k + 1] == 0).all()


# ---------------------------------------------------------------- building blocks

def test_bin_and_tail_mass():
    scores = torch.tensor([[0.0, 0.3], [0.5, 1.0]], dtype=torch.float64)
    x = score_thresholds(8, torch.float64)
    masses, tails = bin_mass(scores, x, 0.05), tail_mass(scores, x, 0.05)
    assert masses.shape == tails.shape == (2, 2, 8)
    for idx in np.ndindex(2, 2):
        s = scores[idx].item()
        np.testing.assert_allclose(masses[idx].numpy(), ref_bin_mass(s, 8, 0.05), atol=1e-15)
        np.testing.assert_allclose(tails[idx].numpy(), ref_tails(s, 8, 0.05), atol=1e-15)
    assert (tails[..., 0] == 1).all()
    torch.testing.assert_close(masses.sum(-1), torch.ones(2, 2, dtype=torch.float64), rtol=0, atol=1e-15)


def test_tail_keeps_relative_precision_far_in_the_tail():
    # 10 sigma below the threshold: 1 - Phi(10) would round to 0.
    tails = tail_mass(torch.tensor([0.0], dtype=torch.float64), score_thresholds(2, torch.float64), 0.05)
    assert tails[0, 1].item() == pytest.approx(phi(-10), rel=1e-12, abs=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_tail_is_exact_down_to_the_smallest_normal_number_and_flat_beyond(dtype):
    """T_i(s) against Phi in float64 wherever Phi is a normal number of the dtype, 0 where it
    is below (subnormals, which the CPU computes several times slower), 1 where 1 - Phi is;
    its derivative too."""
    tiny, eps = torch.finfo(dtype).tiny, torch.finfo(dtype).eps
    n, sigma = 64, 0.02  # down to 49 sigma: below float64's smallest normal number too
    scores = torch.linspace(0, 1, 101, dtype=dtype).requires_grad_()
    exact_scores = scores.detach().double()
    tails = tail_mass(scores, score_thresholds(n, dtype), sigma)
    z = (exact_scores[:, None] - torch.arange(n, dtype=torch.float64) / n) / sigma
    exact = torch.tensor([[phi(v) for v in row] for row in z.tolist()], dtype=torch.float64)
    exact[:, 0] = 1.0
    upper = torch.tensor([[phi(-v) for v in row] for row in z.tolist()], dtype=torch.float64)  # 1 - Phi(z)
    kept, dropped, saturated = exact >= 8 * tiny, exact < tiny, upper < tiny
    saturated[:, 0] = False
    assert kept.any() and dropped.any() and saturated.any()  # every regime is covered
    # A rounding of the erfc argument u = -z / sqrt 2 by a few ulp costs 2u^2 as much in erfc(u)
    relative_error = ((tails.double() - exact) / exact)[kept].abs()
    assert (relative_error <= 8 * (1 + z[kept] ** 2) * eps).all()
    assert (tails[dropped] == 0).all() and (tails[saturated] == 1).all()
    assert (tails.detach()[tails.detach() != 0] >= tiny).all()  # never subnormal

    # dT/ds = phi(z) / sigma where T is kept (T_0 = 1 is constant), exactly 0 where it is 0
    density = torch.exp(-0.5 * z ** 2) / (sigma * math.sqrt(2 * math.pi))
    density[:, 0] = 0
    (grad_kept,) = torch.autograd.grad((tails * kept.to(dtype)).sum(), scores, retain_graph=True)
    (grad_dropped,) = torch.autograd.grad((tails * (dropped | saturated).to(dtype)).sum(), scores)
    torch.testing.assert_close(grad_kept.double(), (density * kept).sum(1), rtol=8 * (1 + z.abs().max() ** 2) * eps,
                               atol=0)
    assert (grad_dropped == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("weighted", [False, True])
def test_weighted_tail_sum_equals_the_sum_of_tails_and_its_gradient(dtype, weighted):
    """The hand-written backward of the negatives' summed tails against autograd through
    tail_mass, and against finite differences in float64."""
    g = torch.Generator().manual_seed(0)
    scores = torch.cat([torch.rand(300, generator=g) ** 3, torch.tensor([0.0, 0.5, 1.0])]).to(dtype)
    weights = (torch.rand(len(scores), generator=g) > 0.2).to(dtype) if weighted else None
    n, sigma = 32, 0.05
    out_grad = torch.randn(n, generator=g).to(dtype)

    a = scores.clone().requires_grad_()
    fast = weighted_tail_sum(a, weights, n, sigma)
    (grad_fast,) = torch.autograd.grad(fast @ out_grad, a)
    b = scores.clone().requires_grad_()
    tails = tail_mass(b, score_thresholds(n, dtype), sigma)
    reference = (tails * (1 if weights is None else weights[:, None])).sum(0)
    (grad_reference,) = torch.autograd.grad(reference @ out_grad, b)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(fast, reference, **tol)
    torch.testing.assert_close(grad_fast, grad_reference, **tol)
    if dtype == torch.float64:
        few, few_weights = scores[:40].clone().requires_grad_(), None if weights is None else weights[:40]
        torch.autograd.gradcheck(lambda s: weighted_tail_sum(s, few_weights, n, sigma), (few,))


def test_localisation_function_knots_and_extension():
    rng = np.random.default_rng(0)
    prec = np.sort(rng.random((10, 6)), axis=1)
    ious = np.array([-0.1, 0.0, 0.2, 0.5, 0.52, 0.85, 0.9, 0.93, 0.95, 0.97, 1.0, 1.2])
    values = localisation_function(torch.tensor(ious), torch.tensor(prec))
    assert values.shape == (len(ious), 6)
    expected = [ref_localisation(u, prec.tolist()) for u in ious]
    np.testing.assert_allclose(values.numpy(), expected, rtol=1e-12, atol=1e-15)
    cumulative = prec.cumsum(0)
    # At the knots L̂ equals the step function; the last segment is extended to (1, C_9 + P_9).
    np.testing.assert_array_equal(values[3].numpy(), cumulative[0])
    np.testing.assert_array_equal(values[6].numpy(), cumulative[8])
    np.testing.assert_allclose(values[10].numpy(), cumulative[9] + prec[9], rtol=1e-15)
    np.testing.assert_array_equal(values[0].numpy(), 0)


def test_localisation_slope_at_the_ends_of_the_iou_range():
    prec = torch.full((10, 3), 0.5, dtype=torch.float64)
    ious = torch.tensor([0.0, 1.0, 1.5], dtype=torch.float64, requires_grad=True)
    localisation_function(ious, prec)[:, 0].sum().backward()
    # Slopes: 0.5 / 0.5 on the first segment, 0.5 / 0.05 on the last; flat beyond 1.
    torch.testing.assert_close(ious.grad, torch.tensor([1.0, 10.0, 0.0], dtype=torch.float64))


# ---------------------------------------------------------------- distributed counts

def test_reduce_counts_simulates_all_reduce():
    """Two 'ranks' holding halves of the detections, whose reduce_counts adds the other rank's
    counts (with their graph), sum to the global DAP and share its gradients."""
    rng = np.random.default_rng(7)
    pos_s, pos_u, neg_s = rng.random(12), rng.random(12), rng.random(16)
    kwargs = dict(num_bins=8, sigma=0.05)
    everything = tensors(pos_s, pos_u, neg_s)
    halves = [tensors(pos_s[:5], pos_u[:5], neg_s[:9]), tensors(pos_s[5:], pos_u[5:], neg_s[9:])]

    local = [[], []]  # counts (tp, fp, num_gt) of each rank, in call order
    for rank in range(2):
        differentiable_ap(*halves[rank], reduce_counts=lambda t, r=rank: local[r].append(t) or t, **kwargs)

    def all_reduce(rank):
        others = iter(local[1 - rank])
        return lambda t: t + next(others)

    shares = [differentiable_ap(*halves[r], reduce_counts=all_reduce(r), **kwargs) for r in range(2)]
    global_dap = differentiable_ap(*everything, **kwargs)
    assert (shares[0] + shares[1]).item() == pytest.approx(global_dap.item(), rel=1e-13)

    (shares[0] + shares[1]).backward()
    global_dap.backward()
    for i in range(3):
        joined = torch.cat([halves[0][i].grad, halves[1][i].grad])
        torch.testing.assert_close(joined, everything[i].grad, rtol=1e-10, atol=1e-14)


def test_reduce_counts_doubling_equals_duplicated_detections():
    pos_s, pos_u, neg_s, n, sigma, _ = random_case(11)
    kwargs = dict(num_bins=n, sigma=sigma)
    doubled = differentiable_ap(*tensors(pos_s, pos_u, neg_s), reduce_counts=lambda t: 2 * t, **kwargs)
    duplicated = differentiable_ap(*tensors(np.tile(pos_s, 2), np.tile(pos_u, 2), np.tile(neg_s, 2)), **kwargs)
    # Each of two identical ranks holds half of the global DAP.
    assert 2 * doubled.item() == pytest.approx(duplicated.item(), rel=1e-12)
    # With a fixed G, scaling all counts leaves precision and so the value unchanged.
    fixed = [differentiable_ap(*tensors(pos_s, pos_u, neg_s), num_gt=9, reduce_counts=f, **kwargs).item()
             for f in (None, lambda t: 3 * t)]
    assert fixed[0] == pytest.approx(fixed[1], rel=1e-12)


def test_reduce_counts_is_applied_to_gt_count_only_when_counting():
    calls = []
    args = tensors([0.3, 0.8], [0.6, 0.9], [0.5])
    differentiable_ap(*args, num_gt=4, reduce_counts=lambda t: calls.append(t.shape) or t)
    assert calls == [(2, 10, 32)]  # tp and fp in one call: one all-reduce
    calls.clear()
    differentiable_ap(*args, reduce_counts=lambda t: calls.append(t.shape) or t)
    assert calls == [(2, 10, 32), ()]


# ---------------------------------------------------------------- gradients

def smooth_case(seed):
    """Random detections away from the kinks: IoUs off the knots, distinct scores."""
    rng = np.random.default_rng(1000 + seed)
    num_pos, num_neg = int(rng.integers(1, 8)), int(rng.integers(0, 8))
    knots = np.array([0.0] + ALPHAS + [1.0])
    ious = rng.uniform(0.02, 0.98, num_pos)
    ious = np.where(np.abs(ious[:, None] - knots).min(1) < 0.01, ious + 0.02, ious)
    return tensors(rng.uniform(0.05, 0.95, num_pos), ious, rng.uniform(0.05, 0.95, num_neg))


@pytest.mark.parametrize("seed", range(6))
def test_gradcheck(seed):
    inputs = smooth_case(seed)
    num_gt = [None, 10][seed % 2]
    assert torch.autograd.gradcheck(
        lambda s, u, neg: differentiable_ap(s, u, neg, num_bins=8, sigma=0.1, num_gt=num_gt), inputs)


@pytest.mark.parametrize("seed", range(20))
def test_gradient_signs(seed):
    pos_s, pos_u, neg_s, n, sigma, num_gt = random_case(200 + seed)
    pos_u = np.where(np.arange(len(pos_u)) % 3 == 0, np.maximum(pos_u, 0.95), pos_u)
    _, (grad_s, grad_u, grad_neg) = run(pos_s, pos_u, neg_s, n, sigma, num_gt)
    assert (grad_neg <= 0).all()
    assert (grad_u >= 0).all()
    assert (grad_s[torch.from_numpy(pos_u >= 0.95)] >= -1e-12).all()


def test_gradient_signs_are_strict_where_they_should_be():
    _, (grad_s, grad_u, grad_neg) = run([0.4, 0.6], [0.97, 0.7], [0.5, 0.55], 8, 0.1, None)
    assert (grad_neg < 0).all() and (grad_u > 0).all() and grad_s[0] > 0


# ---------------------------------------------------------------- complexity

def test_memory_is_linear_in_detections():
    num_pos = num_neg = 10000
    n = 32
    pos_s, pos_u, neg_s = (torch.rand(m, requires_grad=True) for m in (num_pos, num_pos, num_neg))
    with LargestTensor() as largest:
        differentiable_ap(pos_s, pos_u, neg_s, num_bins=n).backward()
    assert 0 < largest.numel <= (num_pos + num_neg) * n


@pytest.mark.parametrize("num_pos", [1, 5, 20])
def test_float32_gradient_where_every_score_ties(num_pos):
    """Every score 0, every IoU 1, N = 8, 329 negatives: all bins have the same precision in exact
    arithmetic and DAP does not depend on the scores (float64 gradient ~0). A plain cummax sent
    the float32 gradient to the bin that rounded highest (|grad| ~1e-3)."""
    grads = {}
    for dtype in (torch.float32, torch.float64):
        pos = torch.zeros(num_pos, dtype=dtype, requires_grad=True)
        neg = torch.zeros(329, dtype=dtype, requires_grad=True)
        dap = differentiable_ap(pos, torch.ones(num_pos, dtype=dtype), neg, num_bins=8, sigma=0.05)
        grads[dtype] = [g.double() for g in torch.autograd.grad(dap, [pos, neg])]
    for g32, g64 in zip(grads[torch.float32], grads[torch.float64]):
        assert g64.abs().max() < 1e-15  # float64 rounding noise
        assert (g32 - g64).abs().max() < 1e-7  # float32 rounding of a DAP of ~1e-2


def test_interpolated_precision_value_is_cummax_and_ties_go_to_the_lowest_bin():
    p = torch.tensor([[0.5, 0.5 * (1 + 2 ** -23), 0.3, 0.7, 0.7]], requires_grad=True)
    envelope = interpolated_precision(p)
    assert torch.equal(envelope, p.detach().cummax(-1).values)
    rows = [torch.autograd.grad(envelope[0, i], p, retain_graph=True)[0][0].tolist() for i in range(5)]
    # bins 0 and 1 tie within rounding: bins 1 and 2 take bin 0's gradient; 3 and 4 tie exactly.
    assert rows == [[1, 0, 0, 0, 0], [1, 0, 0, 0, 0], [1, 0, 0, 0, 0], [0, 0, 0, 1, 0], [0, 0, 0, 1, 0]]


def test_constant_tensors_are_made_once_and_usable_after_inference_mode():
    with torch.inference_mode():  # first made here: still a normal tensor
        first = score_thresholds(13, torch.float32)
    assert score_thresholds(13, torch.float32) is first and not first.is_inference()
    scores = torch.rand(4, requires_grad=True)
    differentiable_ap(scores, torch.rand(4), torch.rand(9), num_bins=13).backward()
    assert scores.grad is not None


def test_weighted_out_negatives_count_for_nothing():
    # The criterion's fixed-size negatives: entries of weight 0 change neither the value nor the
    # other gradients, and get no gradient themselves.
    g = torch.Generator().manual_seed(4)
    pos_s, pos_u = (torch.rand(5, generator=g, dtype=torch.float64) * 0.5 + 0.5 for _ in range(2))
    neg_s, junk = torch.rand(7, generator=g, dtype=torch.float64), torch.rand(4, generator=g, dtype=torch.float64)
    compact = [t.clone().requires_grad_() for t in (pos_s, neg_s)]
    padded = [t.clone().requires_grad_() for t in (pos_s, torch.cat([neg_s[:3], junk, neg_s[3:]]))]
    weights = torch.tensor([1.0] * 3 + [0.0] * 4 + [1.0] * 4, dtype=torch.float64)
    dap = differentiable_ap(compact[0], pos_u, compact[1], num_bins=8, sigma=0.1, num_gt=6)
    weighted = differentiable_ap(padded[0], pos_u, padded[1], weights, num_bins=8, sigma=0.1, num_gt=6)
    torch.testing.assert_close(weighted, dap, rtol=1e-12, atol=0)
    dap.backward()
    weighted.backward()
    torch.testing.assert_close(padded[0].grad, compact[0].grad, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(padded[1].grad[weights > 0], compact[1].grad, rtol=1e-10, atol=1e-14)
    assert bool((padded[1].grad[weights == 0] == 0).all()) and bool((compact[1].grad != 0).all())


# ---------------------------------------------------------------- a stack of problems

@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("weighted", [False, True])
def test_a_stack_of_problems_equals_each_problem_alone(dtype, weighted):
    # [L, P] and [L, M] inputs are L independent DAP problems: values, tables and gradients as
    # each row computed on its own, and the counts hook sees [L, 2, K, N] in one call.
    g = torch.Generator().manual_seed(3)
    layers, p, m, n = 3, 5, 9, 8
    pos = torch.rand(layers, p, generator=g, dtype=dtype).requires_grad_()
    ious = (0.3 + 0.7 * torch.rand(layers, p, generator=g, dtype=dtype)).requires_grad_()
    neg = torch.rand(layers, m, generator=g, dtype=dtype).requires_grad_()
    weights = (torch.rand(layers, m, generator=g) > 0.3).to(dtype) if weighted else None
    calls = []

    def reduce(counts):
        calls.append(counts.shape)
        return counts

    stacked = differentiable_ap_terms(pos, ious, neg, weights, num_bins=n, sigma=0.07, num_gt=6, reduce_counts=reduce)
    assert calls == [torch.Size([layers, 2, len(COCO_IOU_THRESHOLDS), n])]
    assert stacked.dap.shape == (layers,) and stacked.precision.shape == (layers, len(COCO_IOU_THRESHOLDS), n)
    coefficients = torch.tensor([1.0, -2.0, 0.5], dtype=dtype)
    grads = torch.autograd.grad((stacked.dap * coefficients).sum(), (pos, ious, neg))
    tol = dict(rtol=1e-12, atol=1e-14) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-7)
    for row in range(layers):
        alone = differentiable_ap_terms(pos[row], ious[row], neg[row], None if weights is None else weights[row],
                                        num_bins=n, sigma=0.07, num_gt=6)
        torch.testing.assert_close(stacked.dap[row], alone.dap, **tol)
        torch.testing.assert_close(stacked.precision[row], alone.precision, **tol)
        row_grads = torch.autograd.grad(alone.dap * coefficients[row], (pos, ious, neg))
        for got, want in zip(grads, row_grads):
            torch.testing.assert_close(got[row], want[row], **tol)


def test_localisation_function_of_a_stack_uses_each_rows_table():
    g = torch.Generator().manual_seed(4)
    tables = torch.rand(2, len(COCO_IOU_THRESHOLDS), 6, generator=g, dtype=torch.float64)
    ious = torch.rand(2, 7, generator=g, dtype=torch.float64)
    stacked = localisation_function(ious, tables)
    assert stacked.shape == (2, 7, 6)
    for row in range(2):
        torch.testing.assert_close(stacked[row], localisation_function(ious[row], tables[row]), rtol=0, atol=0)
