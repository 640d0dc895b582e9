"""models/rank_losses.py, the functional core of AP-Loss, aLRP Loss and Rank & Sort Loss, against
float64 brute-force references written from docs/LOSSES.md section 1: plain double loops over the
positives and negatives for the smoothed ranks, the values, and, independently, the error-driven
update from the primary terms L_ij (which is not the gradient of the value, so it is never checked
by finite differences; only aLRP's IoU gradient, an ordinary derivative, is). Edge cases, the
papers' balance properties, and the cost (no P x M tensor)."""
import resource

import pytest
import torch

from models.rank_losses import alrp_loss, alrp_loss_terms, ap_loss, rank_sort_loss, rank_sort_loss_terms

from conftest import LargestTensor

DEFAULT_DELTA = {"ap": 1.0, "alrp": 1.0, "rs": 0.5}
TAU = 0.5


# ---------------------------------------------------------------- brute-force reference

def step(x, delta):
    """H(x) = clamp(x / (2 delta) + 1/2, 0, 1)."""
    return min(max(x / (2.0 * delta) + 0.5, 0.0), 1.0)


def ref_ranks(pos, neg, w, delta):
    """rank⁺(i) (itself counted as 1), N_FP(i) (weighted), rank(i) and p(i), one pair at a time."""
    rank_plus = [1.0 + sum(step(pos[k] - pos[i], delta) for k in range(len(pos)) if k != i) for i in range(len(pos))]
    nfp = [sum(w[j] * step(neg[j] - pos[i], delta) for j in range(len(neg))) for i in range(len(pos))]
    rank = [rp + n for rp, n in zip(rank_plus, nfp)]
    prec = [rp / r for rp, r in zip(rank_plus, rank)]
    return rank_plus, nfp, rank, prec


def updates_from_primary_terms(num_pos, num_neg, neg_terms, pos_terms=None):
    """∂L/∂s_i = −(1/|P|) Σ_j L_ij for the positive that suffers, ∂L/∂s_j = +(1/|P|) Σ_i L_ij for
    the cause. neg_terms[i][j]: caused by negative j; pos_terms[i][k]: caused by positive k."""
    gpos, gneg = [0.0] * num_pos, [0.0] * num_neg
    for i in range(num_pos):
        for j in range(num_neg):
            gpos[i] -= neg_terms[i][j] / num_pos
            gneg[j] += neg_terms[i][j] / num_pos
        for k in range(num_pos if pos_terms else 0):
            gpos[i] -= pos_terms[i][k] / num_pos
            gpos[k] += pos_terms[i][k] / num_pos
    return gpos, gneg


def ref_ap(pos, neg, w, delta):
    """L_AP = 1 − mean P̄(i), P̄(i) = max_{s_k <= s_i} p(k); L_ij = w_j H(x_ij) / rank(i) · c(i)."""
    num_pos, num_neg = len(pos), len(neg)
    if num_pos == 0:
        return {"value": 0.0, "gpos": [], "gneg": [0.0] * num_neg, "pbar": []}
    _, _, rank, prec = ref_ranks(pos, neg, w, delta)
    pbar = [max(prec[k] for k in range(num_pos) if pos[k] <= pos[i]) for i in range(num_pos)]
    terms = []
    for i in range(num_pos):
        c = 1.0 if prec[i] == pbar[i] else (1.0 - pbar[i]) / (1.0 - prec[i])
        terms.append([w[j] * step(neg[j] - pos[i], delta) / rank[i] * c for j in range(num_neg)])
    gpos, gneg = updates_from_primary_terms(num_pos, num_neg, terms)
    return {"value": 1.0 - sum(pbar) / num_pos, "gpos": gpos, "gneg": gneg, "pbar": pbar}


def ref_alrp(pos, ious, neg, w, delta, tau=TAU):
    """L_cls = mean N_FP(i)/rank(i), L_loc = mean [E(i) + Σ_{k≠i} E(k) H(x_ik)] / rank(i);
    L_ij = [N_FP(i) + Σ_{k≠i} E(k) H(x_ik)] / rank(i) · w_j H(x_ij) / N_FP(i); the IoU gradient of
    L_loc with ranks held constant, derived by hand:
    ∂L_loc/∂IoU_k = −1/((1−τ)|P|) · [1/rank(k) + Σ_{i≠k} H(x_ik)/rank(i)]."""
    num_pos, num_neg = len(pos), len(neg)
    if num_pos == 0:
        return {"value": 0.0, "terms": (0.0, 0.0), "gpos": [], "gneg": [0.0] * num_neg, "giou": []}
    _, nfp, rank, _ = ref_ranks(pos, neg, w, delta)
    err = [(1.0 - u) / (1.0 - tau) for u in ious]
    others = [sum(err[k] * step(pos[k] - pos[i], delta) for k in range(num_pos) if k != i) for i in range(num_pos)]
    cls = sum(nfp[i] / rank[i] for i in range(num_pos)) / num_pos
    loc = sum((err[i] + others[i]) / rank[i] for i in range(num_pos)) / num_pos
    terms = [[0.0 if nfp[i] == 0 else (nfp[i] + others[i]) / rank[i] * w[j] * step(neg[j] - pos[i], delta) / nfp[i]
              for j in range(num_neg)] for i in range(num_pos)]
    gpos, gneg = updates_from_primary_terms(num_pos, num_neg, terms)
    giou = [-(1.0 / rank[k] + sum(step(pos[k] - pos[i], delta) / rank[i] for i in range(num_pos) if i != k))
            / ((1.0 - tau) * num_pos) for k in range(num_pos)]
    return {"value": cls + loc, "terms": (cls, loc), "gpos": gpos, "gneg": gneg, "giou": giou}


def ref_rs(pos, ious, neg, w, delta):
    """ℓ_R(i) = N_FP(i)/rank(i); ℓ_S(i) = Σ_k H'(x_ik)(1 − y_k)/rank⁺(i), its target over y_k >= y_i;
    ranking L_ij = ℓ_R(i) w_j H(x_ij)/N_FP(i), sorting L_ik = (ℓ_S − ℓ*_S)(i) H(x_ik)[y_k < y_i] /
    Σ_{y_m < y_i} H(x_im). Also each part's update alone ("rank_*", "sort_*")."""
    num_pos, num_neg = len(pos), len(neg)
    if num_pos == 0:
        zeros = [0.0] * num_neg
        return {"value": 0.0, "terms": (0.0, 0.0), "gpos": [], "gneg": zeros, "rank_gpos": [], "rank_gneg": zeros,
                "sort_gpos": []}
    rank_plus, nfp, rank, _ = ref_ranks(pos, neg, w, delta)

    def h_prime(i, k):
        return 1.0 if i == k else step(pos[k] - pos[i], delta)

    ell_r = [nfp[i] / rank[i] for i in range(num_pos)]
    ell_s = [sum(h_prime(i, k) * (1.0 - ious[k]) for k in range(num_pos)) / rank_plus[i] for i in range(num_pos)]
    ell_t = []
    for i in range(num_pos):
        above = [k for k in range(num_pos) if ious[k] >= ious[i]]
        ell_t.append(sum(h_prime(i, k) * (1.0 - ious[k]) for k in above) / sum(h_prime(i, k) for k in above))
    rank_terms = [[0.0 if nfp[i] == 0 else ell_r[i] * w[j] * step(neg[j] - pos[i], delta) / nfp[i]
                   for j in range(num_neg)] for i in range(num_pos)]
    sort_terms = []
    for i in range(num_pos):
        lower = [step(pos[k] - pos[i], delta) if ious[k] < ious[i] else 0.0 for k in range(num_pos)]
        total = sum(lower)
        sort_terms.append([0.0 if total == 0 else (ell_s[i] - ell_t[i]) * lower[k] / total for k in range(num_pos)])
    rank_gpos, rank_gneg = updates_from_primary_terms(num_pos, num_neg, rank_terms)
    sort_gpos, _ = updates_from_primary_terms(num_pos, 0, [[]] * num_pos, sort_terms)
    gpos, gneg = updates_from_primary_terms(num_pos, num_neg, rank_terms, sort_terms)
    ranking = sum(ell_r) / num_pos
    sorting = sum(s - t for s, t in zip(ell_s, ell_t)) / num_pos
    return {"value": ranking + sorting, "terms": (ranking, sorting), "gpos": gpos, "gneg": gneg,
            "rank_gpos": rank_gpos, "rank_gneg": rank_gneg, "sort_gpos": sort_gpos}


def reference(name, pos, ious, neg, w, delta):
    w = [1.0] * len(neg) if w is None else w
    if name == "ap":
        return ref_ap(pos, neg, w, delta)
    if name == "alrp":
        return ref_alrp(pos, ious, neg, w, delta)
    return ref_rs(pos, ious, neg, w, delta)


# ---------------------------------------------------------------- calling the implementation

def call(name, pos, ious, neg, w, delta=None, terms=False):
    """The function under test on tensors; delta=None uses its default."""
    kwargs = {} if delta is None else {"delta": delta}
    if name == "ap":
        assert not terms
        return ap_loss(pos, neg, w, **kwargs)
    if name == "alrp":
        return (alrp_loss_terms if terms else alrp_loss)(pos, ious, neg, w, **kwargs)
    return (rank_sort_loss_terms if terms else rank_sort_loss)(pos, ious, neg, w, **kwargs)


def leaves(pos, ious, neg, w, dtype=torch.float64, iou_grad=False):
    """Leaf tensors: scores (and aLRP's IoUs) requiring gradients."""
    pos_t = torch.tensor(pos, dtype=dtype, requires_grad=True)
    neg_t = torch.tensor(neg, dtype=dtype, requires_grad=True)
    iou_t = torch.tensor(ious, dtype=dtype, requires_grad=iou_grad)
    w_t = None if w is None else torch.tensor(w, dtype=dtype)
    return pos_t, iou_t, neg_t, w_t


def grad_of(t):
    """A leaf's gradient as float64 (None, no path to the loss, reads as zeros)."""
    return torch.zeros(t.shape, dtype=torch.float64) if t.grad is None else t.grad.double()


def run(name, pos, ious, neg, w, delta=None, dtype=torch.float64, scale=1.0):
    """Value and the gradients of scale * loss: (value, gpos, gneg, giou or None)."""
    pos_t, iou_t, neg_t, w_t = leaves(pos, ious, neg, w, dtype, iou_grad=name == "alrp")
    loss = call(name, pos_t, iou_t, neg_t, w_t, delta)
    assert loss.dim() == 0 and loss.dtype == dtype and loss.requires_grad
    (scale * loss).backward()
    for t in (pos_t, neg_t):
        assert t.grad is None or t.grad.dtype == dtype
    return loss.detach().double(), grad_of(pos_t), grad_of(neg_t), grad_of(iou_t) if name == "alrp" else None


def t64(values):
    return torch.tensor(values, dtype=torch.float64)


def assert_close(actual, expected, rtol=1e-10, atol=1e-12):
    torch.testing.assert_close(actual.double(), t64(expected).reshape(actual.shape), rtol=rtol, atol=atol)


def check_against_reference(name, pos, ious, neg, w, delta, dtype=torch.float64, rtol=1e-10, atol=1e-12, scale=1.0):
    ref = reference(name, pos, ious, neg, w, DEFAULT_DELTA[name] if delta is None else delta)
    value, gpos, gneg, giou = run(name, pos, ious, neg, w, delta, dtype, scale)
    assert_close(value, ref["value"], rtol, atol)
    assert_close(gpos, [scale * g for g in ref["gpos"]], rtol, atol)
    assert_close(gneg, [scale * g for g in ref["gneg"]], rtol, atol)
    if name == "alrp":
        assert_close(giou, [scale * g for g in ref["giou"]], rtol, atol)
    return ref, (value, gpos, gneg, giou)


# ---------------------------------------------------------------- random cases

def random_case(seed, num_pos, num_neg, delta, weighted=True, grid=False):
    """Scores within ±2.5δ of 0 (positives shifted up by δ/2), so that some pairs fall inside ±δ
    and some outside; grid=True puts them on multiples of δ/4 (ties, pairs exactly at ±δ)."""
    g = torch.Generator().manual_seed(seed)
    pos = (torch.rand(num_pos, generator=g, dtype=torch.float64) * 5 - 2) * delta
    neg = (torch.rand(num_neg, generator=g, dtype=torch.float64) * 5 - 2.5) * delta
    if grid:
        pos, neg = (torch.round(s / (delta / 4)) * (delta / 4) for s in (pos, neg))
    ious = torch.rand(num_pos, generator=g, dtype=torch.float64)
    w = (torch.rand(num_neg, generator=g) < 0.7).double().tolist() if weighted else None
    return pos.tolist(), ious.tolist(), neg.tolist(), w


SIZES = [(p, m) for p in (1, 2, 5, 17) for m in (0, 1, 7, 50)]
CASES = [(seed, p, m, delta) for seed, (p, m) in enumerate(SIZES) for delta in (0.25, 0.5, 1.0)]
LOSSES = ["ap", "alrp", "rs"]


@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("seed,num_pos,num_neg,delta", CASES)
def test_value_and_update_match_reference(name, seed, num_pos, num_neg, delta):
    pos, ious, neg, w = random_case(seed, num_pos, num_neg, delta, weighted=seed % 2 == 0, grid=seed % 3 == 0)
    check_against_reference(name, pos, ious, neg, w, delta)


@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_defaults(name, seed):
    """δ = 1 (AP-Loss), δ = 1 and τ = 0.5 (aLRP), δ = 0.5 (RS) when not given."""
    pos, ious, neg, w = random_case(100 + seed, 5, 30, 0.7)
    check_against_reference(name, pos, ious, neg, w, None)


@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("scale", [3.0, -0.5])
def test_incoming_gradient_scales_the_update(name, scale):
    pos, ious, neg, w = random_case(7, 5, 20, 0.5)
    _, (value, gpos, gneg, giou) = check_against_reference(name, pos, ious, neg, w, 0.5)
    _, gpos_s, gneg_s, giou_s = run(name, pos, ious, neg, w, 0.5, scale=scale)
    assert gpos.abs().max() > 0.01 and gneg.abs().max() > 0.01
    torch.testing.assert_close(gpos_s, scale * gpos, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(gneg_s, scale * gneg, rtol=1e-12, atol=1e-14)
    if name == "alrp":
        torch.testing.assert_close(giou_s, scale * giou, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("seed,num_pos,num_neg", [(0, 1, 7), (1, 5, 50), (2, 17, 50)])
def test_float32_in_float32_out(name, seed, num_pos, num_neg):
    pos, ious, neg, w = random_case(200 + seed, num_pos, num_neg, 0.5)
    check_against_reference(name, pos, ious, neg, w, 0.5, dtype=torch.float32, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------- the terms

@pytest.mark.parametrize("name", ["alrp", "rs"])
@pytest.mark.parametrize("seed,num_pos,num_neg", [(0, 1, 0), (1, 2, 7), (2, 5, 50), (3, 17, 50)])
def test_terms_match_reference_and_sum_to_the_loss(name, seed, num_pos, num_neg):
    pos, ious, neg, w = random_case(300 + seed, num_pos, num_neg, 0.5)
    ref = reference(name, pos, ious, neg, w, 0.5)
    pos_t, iou_t, neg_t, w_t = leaves(pos, ious, neg, w, iou_grad=name == "alrp")
    terms = call(name, pos_t, iou_t, neg_t, w_t, 0.5, terms=True)
    assert len(terms) == 2
    for term, expected in zip(terms, ref["terms"]):
        assert term.dim() == 0 and term.dtype == torch.float64
        assert_close(term.detach(), expected)
    assert_close((terms[0] + terms[1]).detach(), call(name, *leaves(pos, ious, neg, w), 0.5).item())
    (terms[0] + terms[1]).backward()
    assert_close(grad_of(pos_t), ref["gpos"])
    assert_close(grad_of(neg_t), ref["gneg"])
    if name == "alrp":
        assert_close(grad_of(iou_t), ref["giou"])


@pytest.mark.parametrize("tau", [0.3, 0.7])
@pytest.mark.parametrize("seed,num_pos,num_neg", [(0, 2, 7), (1, 5, 50), (2, 17, 0)])
def test_alrp_tau(tau, seed, num_pos, num_neg):
    pos, ious, neg, w = random_case(450 + seed, num_pos, num_neg, 0.5)
    ref = ref_alrp(pos, ious, neg, w, 0.5, tau)
    pos_t, iou_t, neg_t, w_t = leaves(pos, ious, neg, w, iou_grad=True)
    terms = alrp_loss_terms(pos_t, iou_t, neg_t, w_t, delta=0.5, tau=tau)
    for term, expected in zip(terms, ref["terms"]):
        assert_close(term.detach(), expected)
    alrp_loss(pos_t, iou_t, neg_t, w_t, delta=0.5, tau=tau).backward()
    for t, key in ((pos_t, "gpos"), (neg_t, "gneg"), (iou_t, "giou")):
        assert_close(grad_of(t), ref[key])


@pytest.mark.parametrize("seed,num_pos,num_neg", [(0, 2, 7), (1, 5, 50), (2, 17, 50)])
def test_alrp_ious_are_trained_through_localisation_only(seed, num_pos, num_neg):
    pos, ious, neg, w = random_case(400 + seed, num_pos, num_neg, 0.5)
    ref = ref_alrp(pos, ious, neg, w, 0.5)
    pos_t, iou_t, neg_t, w_t = leaves(pos, ious, neg, w, iou_grad=True)
    cls, loc = alrp_loss_terms(pos_t, iou_t, neg_t, w_t, delta=0.5)
    assert_close(torch.autograd.grad(loc, iou_t, retain_graph=True)[0], ref["giou"])
    cls_grad = torch.autograd.grad(cls, iou_t, allow_unused=True)[0]
    assert cls_grad is None or not cls_grad.any()


@pytest.mark.parametrize("seed,num_pos,num_neg", [(0, 2, 7), (1, 5, 50), (2, 17, 50), (3, 17, 0)])
def test_rs_terms_carry_their_own_updates(seed, num_pos, num_neg):
    """Backward of the ranking term alone gives the update of the ranking primary terms, of the
    sorting term alone that of the sorting terms (negatives untouched): it balances among the
    positives."""
    pos, ious, neg, w = random_case(500 + seed, num_pos, num_neg, 0.5, grid=True)
    ref = ref_rs(pos, ious, neg, w, 0.5)
    pos_t, iou_t, neg_t, w_t = leaves(pos, ious, neg, w)
    ranking, sorting = rank_sort_loss_terms(pos_t, iou_t, neg_t, w_t, delta=0.5)
    gpos, gneg = torch.autograd.grad(ranking, (pos_t, neg_t), retain_graph=True, allow_unused=True)
    assert_close(torch.zeros(num_pos, dtype=torch.float64) if gpos is None else gpos, ref["rank_gpos"])
    assert_close(torch.zeros(num_neg, dtype=torch.float64) if gneg is None else gneg, ref["rank_gneg"])
    gpos, gneg = torch.autograd.grad(sorting, (pos_t, neg_t), allow_unused=True)
    assert_close(gpos, ref["sort_gpos"])
    assert gneg is None or not gneg.any()
    assert abs(sum(ref["sort_gpos"])) < 1e-12 and gpos.sum().abs() < 1e-12
    if num_pos > 2:
        assert max(abs(g) for g in ref["sort_gpos"]) > 1e-3  # the sorting update is exercised


# ---------------------------------------------------------------- worked by hand

def test_hand_worked_ap():
    """δ = 0.25 (a hard step at these gaps). Positives A = 2, B = 0, one negative at 3.
    A: rank⁺ = 1, N_FP = 1, p = 1/2. B: rank⁺ = 2 (A above), N_FP = 1, p = 2/3.
    P̄(A) = max(p(A), p(B)) = 2/3 (s_B <= s_A), P̄(B) = 2/3: L_AP = 1 − 2/3 = 1/3.
    c(A) = (1 − 2/3)/(1 − 1/2) = 2/3, L_A,neg = 1 · 1/2 · 2/3 = 1/3; c(B) = 1, L_B,neg = 1/3.
    ∂/∂s_A = ∂/∂s_B = −(1/2)(1/3) = −1/6, ∂/∂s_neg = +(1/2)(1/3 + 1/3) = 1/3."""
    expected = {"value": 1 / 3, "gpos": [-1 / 6, -1 / 6], "gneg": [1 / 3]}
    ref = ref_ap([2.0, 0.0], [3.0], [1.0], 0.25)
    for key, value in expected.items():
        assert ref[key] == pytest.approx(value, rel=1e-12)
    check_against_reference("ap", [2.0, 0.0], [], [3.0], None, 0.25)
    # One positive at 0, negatives at 2 and -2: p = 1/2 = P̄, L = 1/2, ∂s = −1/2, the negatives [1/2, 0].
    assert ref_ap([0.0], [2.0, -2.0], [1.0, 1.0], 0.25)["gneg"] == pytest.approx([0.5, 0.0], rel=1e-12)
    check_against_reference("ap", [0.0], [], [2.0, -2.0], None, 0.25)


def test_hand_worked_alrp():
    """δ = 0.25, τ = 0.5; positives A = 2 (IoU 0.75, E = 0.5), B = 0 (IoU 0.5, E = 1), one negative at 3.
    A: rank 2, N_FP 1, nothing above among positives. B: rank⁺ 2, N_FP 1, rank 3, E(A) H = 0.5 above.
    L_cls = (1/2)(1/2 + 1/3) = 5/12; L_loc = (1/2)(0.5/2 + (1 + 0.5)/3) = 3/8.
    L_A,neg = (1 + 0)/2 = 1/2, L_B,neg = (1 + 0.5)/3 = 1/2: ∂s_A = ∂s_B = −1/4, ∂s_neg = 1/2.
    ∂L_loc/∂IoU_A = −(1/(0.5·2))(1/2 + 1/3) = −5/6, ∂L_loc/∂IoU_B = −(1/(0.5·2))(1/3) = −1/3."""
    ref = ref_alrp([2.0, 0.0], [0.75, 0.5], [3.0], [1.0], 0.25)
    assert ref["terms"] == pytest.approx((5 / 12, 3 / 8), rel=1e-12)
    assert ref["gpos"] == pytest.approx([-0.25, -0.25], rel=1e-12)
    assert ref["gneg"] == pytest.approx([0.5], rel=1e-12)
    assert ref["giou"] == pytest.approx([-5 / 6, -1 / 3], rel=1e-12)
    check_against_reference("alrp", [2.0, 0.0], [0.75, 0.5], [3.0], None, 0.25)


def test_hand_worked_rs():
    """δ = 0.25; positives A = 2 (y 0.5), B = 0 (y 0.9), one negative at 3.
    A: rank 2, ℓ_R = 1/2, ℓ_S = ℓ*_S = 0.5. B: rank⁺ 2, rank 3, ℓ_R = 1/3,
    ℓ_S = (1·0.5 + 1·0.1)/2 = 0.3, ℓ*_S = 0.1 (only B has y >= 0.9): sorting error 0.2, caused by A.
    ranking = 5/12, sorting = 0.1. ∂s_A = −(1/2)(1/2) + (1/2)(0.2) = −0.15, ∂s_B = −(1/2)(1/3 + 0.2)
    = −4/15, ∂s_neg = (1/2)(1/2 + 1/3) = 5/12."""
    ref = ref_rs([2.0, 0.0], [0.5, 0.9], [3.0], [1.0], 0.25)
    assert ref["terms"] == pytest.approx((5 / 12, 0.1), rel=1e-12)
    assert ref["gpos"] == pytest.approx([-0.15, -4 / 15], rel=1e-12)
    assert ref["gneg"] == pytest.approx([5 / 12], rel=1e-12)
    check_against_reference("rs", [2.0, 0.0], [0.5, 0.9], [3.0], None, 0.25)


def test_alrp_reference_iou_gradient_by_finite_differences():
    """The hand-derived IoU gradient against central differences of the reference L_loc (the ranks
    do not depend on the IoUs, so 'ranks held constant' is the ordinary derivative)."""
    pos, ious, neg, w = random_case(11, 5, 20, 0.5)
    ref = ref_alrp(pos, ious, neg, w, 0.5)
    eps = 1e-6
    for k in range(len(pos)):
        up, down = list(ious), list(ious)
        up[k] += eps
        down[k] -= eps
        fd = (ref_alrp(pos, up, neg, w, 0.5)["terms"][1] - ref_alrp(pos, down, neg, w, 0.5)["terms"][1]) / (2 * eps)
        assert fd == pytest.approx(ref["giou"][k], rel=1e-7, abs=1e-9)


# ---------------------------------------------------------------- edge cases

@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("num_neg", [0, 6])
def test_no_positives(name, num_neg):
    pos_t, iou_t, neg_t, w_t = leaves([], [], [0.5 * j for j in range(num_neg)], None, iou_grad=name == "alrp")
    outputs = [call(name, pos_t, iou_t, neg_t, w_t, 0.5)]
    if name != "ap":
        outputs += list(call(name, pos_t, iou_t, neg_t, w_t, 0.5, terms=True))
    for out in outputs:
        assert out.dim() == 0 and out.dtype == torch.float64 and out.item() == 0.0
        assert out.requires_grad and out.grad_fn is not None
    sum(outputs).backward()
    assert not grad_of(neg_t).any() and grad_of(pos_t).shape == (0,)


@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("num_pos", [1, 2, 5])
def test_no_negatives_and_all_weights_zero(name, num_pos):
    """M = 0, and M = 6 with every weight 0: the same value and positive updates, zero negative updates."""
    pos, ious, _, _ = random_case(600 + num_pos, num_pos, 0, 0.5)
    ref, (value, gpos, _, giou) = check_against_reference(name, pos, ious, [], None, 0.5)
    neg = [pos[0] + 0.1, pos[0] - 0.2, 5.0, -5.0, pos[-1], 0.0]
    _, (value_w, gpos_w, gneg_w, giou_w) = check_against_reference(name, pos, ious, neg, [0.0] * 6, 0.5)
    torch.testing.assert_close(value_w, value, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(gpos_w, gpos, rtol=1e-12, atol=1e-14)
    assert not gneg_w.any()
    if name == "ap":
        assert value.item() == 0.0 and not gpos.any()
    if name == "alrp":
        assert ref["terms"][0] == 0.0 and not gpos.any()  # no negative: no classification error, no update
        torch.testing.assert_close(giou_w, giou, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("seed,num_pos,num_neg", [(0, 3, 8), (1, 5, 20), (2, 17, 50)])
def test_ties_on_a_grid(name, seed, num_pos, num_neg):
    """Scores on multiples of δ/4 (many exact ties, pairs exactly at ±δ), IoUs from {0, 0.5, 0.7, 1}
    (ties in y for RS's y_k >= y_i)."""
    pos, _, neg, w = random_case(700 + seed, num_pos, num_neg, 0.5, grid=True)
    g = torch.Generator().manual_seed(seed)
    ious = torch.tensor([0.0, 0.5, 0.7, 1.0], dtype=torch.float64)[torch.randint(4, (num_pos,), generator=g)].tolist()
    assert len(set(pos + neg)) < len(pos + neg)
    check_against_reference(name, pos, ious, neg, w, 0.5)


@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("num_pos,num_neg", [(1, 1), (3, 0), (4, 5)])
def test_all_scores_equal(name, num_pos, num_neg):
    ious = [0.9, 0.3, 0.6, 0.3][:num_pos]
    ref, _ = check_against_reference(name, [0.3] * num_pos, ious, [0.3] * num_neg, None, 0.5)
    if name == "ap":  # every pair at H(0) = 1/2: rank⁺ = (P + 1)/2, N_FP = M/2
        assert ref["value"] == pytest.approx(1 - (num_pos + 1) / (num_pos + 1 + num_neg), rel=1e-12)


@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("delta", [0.25, 1.0])
def test_perfect_ranking(name, delta):
    """Every positive above every negative by more than δ: AP-Loss 0 with zero updates, aLRP's
    classification 0 with zero score updates (every primary term needs a negative above), RS's
    ranking 0 with zero negative updates."""
    pos, ious, neg, w = random_case(800, 6, 30, delta)
    pos = [s + max(neg) - min(pos) + delta * 1.01 for s in pos]
    ref, (value, gpos, gneg, _) = check_against_reference(name, pos, ious, neg, w, delta)
    assert not gneg.any()
    if name == "ap":
        assert value.item() == 0.0 and not gpos.any()
    elif name == "alrp":
        assert ref["terms"][0] == 0.0 and not gpos.any() and ref["terms"][1] > 0.1
        assert call(name, *leaves(pos, ious, neg, w), delta, terms=True)[0].item() == 0.0
    else:
        assert ref["terms"][0] == 0.0
        assert call(name, *leaves(pos, ious, neg, w), delta, terms=True)[0].item() == 0.0


@pytest.mark.parametrize("name", ["alrp", "rs"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ious_zero_and_one(name, seed):
    pos, _, neg, w = random_case(900 + seed, 6, 20, 0.5)
    ious = [float(u) for u in torch.randint(2, (6,), generator=torch.Generator().manual_seed(seed)).tolist()]
    check_against_reference(name, pos, ious, neg, w, 0.5)
    check_against_reference(name, pos, [1.0] * 6, neg, w, 0.5)
    check_against_reference(name, pos, [0.0] * 6, neg, w, 0.5)


@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_weight_zero_entry_is_absent(name, seed):
    """The loss and updates with weight-0 entries equal those with the entries removed; the
    ignored entries get no update. None means every weight 1."""
    pos, ious, neg, w = random_case(1000 + seed, 5, 30, 0.5)
    w[0] = 0.0
    value, gpos, gneg, giou = run(name, pos, ious, neg, w, 0.5)
    kept = [j for j in range(len(neg)) if w[j] == 1.0]
    value_r, gpos_r, gneg_r, giou_r = run(name, pos, ious, [neg[j] for j in kept], None, 0.5)
    torch.testing.assert_close(value, value_r, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(gpos, gpos_r, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(gneg[kept], gneg_r, rtol=1e-12, atol=1e-14)
    assert not gneg[[j for j in range(len(neg)) if w[j] == 0.0]].any()
    if name == "alrp":
        torch.testing.assert_close(giou, giou_r, rtol=1e-12, atol=1e-14)
    ones = run(name, pos, ious, neg, [1.0] * len(neg), 0.5)
    for a, b in zip(ones, run(name, pos, ious, neg, None, 0.5)):
        if a is not None:
            torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("name", LOSSES)
def test_weight_counts_the_entry_that_many_times(name):
    """A weight-2 negative is two copies of it; its update is the two copies' updates together."""
    pos, ious, neg, _ = random_case(1100, 4, 10, 0.5)
    neg[0] = pos[0] + 0.1  # inside ±δ of a positive
    value, gpos, gneg, _ = run(name, pos, ious, neg, [2.0] + [1.0] * 9, 0.5)
    value_d, gpos_d, gneg_d, _ = run(name, pos, ious, [neg[0]] + neg, None, 0.5)
    torch.testing.assert_close(value, value_d, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(gpos, gpos_d, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(gneg, torch.cat([gneg_d[:1] + gneg_d[1:2], gneg_d[2:]]), rtol=1e-12, atol=1e-14)
    assert gneg[0] > 0


def test_delta_and_tau_are_keyword_only():
    pos, neg = torch.zeros(2), torch.zeros(3)
    with pytest.raises(TypeError):
        ap_loss(pos, neg, None, 0.5)
    with pytest.raises(TypeError):
        alrp_loss(pos, torch.ones(2), neg, None, 0.5)
    with pytest.raises(TypeError):
        rank_sort_loss(pos, torch.ones(2), neg, None, 0.5)


# ---------------------------------------------------------------- the papers' properties

@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("seed,num_pos,num_neg", [(0, 2, 7), (1, 5, 50), (2, 17, 50), (3, 17, 7)])
def test_updates_balance(name, seed, num_pos, num_neg):
    """Σ over every score of ∂L/∂s = 0: the positives' total is minus the negatives' total."""
    pos, ious, neg, w = random_case(1200 + seed, num_pos, num_neg, 0.5, grid=seed % 2 == 1)
    ref = reference(name, pos, ious, neg, w, 0.5)
    assert abs(sum(ref["gpos"]) + sum(ref["gneg"])) < 1e-12
    _, gpos, gneg, _ = run(name, pos, ious, neg, w, 0.5)
    assert gneg.sum() > 0.01
    torch.testing.assert_close(gpos.sum(), -gneg.sum(), rtol=1e-12, atol=1e-12)
    assert (gneg >= 0).all()
    if name != "rs":  # only RS has positives as causes
        assert (gpos <= 0).all()


@pytest.mark.parametrize("seed,num_pos,num_neg", [(0, 2, 7), (1, 5, 50), (2, 17, 50)])
def test_ap_positive_update_is_one_minus_interpolated_precision(seed, num_pos, num_neg):
    pos, _, neg, w = random_case(1300 + seed, num_pos, num_neg, 1.0)
    pbar = ref_ap(pos, neg, [1.0] * num_neg if w is None else w, 1.0)["pbar"]
    _, gpos, _, _ = run("ap", pos, [], neg, w, 1.0)
    assert_close(gpos, [-(1 - q) / num_pos for q in pbar])
    assert any(q < 1 for q in pbar)


def test_ap_interpolation_uses_best_precision_below():
    """A positive with precision 1/2 above one with precision 2/3 gets P̄ = 2/3 (not its own 1/2)."""
    ref = ref_ap([2.0, 0.0], [3.0], [1.0], 0.25)
    assert ref["pbar"] == pytest.approx([2 / 3, 2 / 3], rel=1e-12)
    value, _, _, _ = run("ap", [2.0, 0.0], [], [3.0], None, 0.25)
    assert value.item() == pytest.approx(1 / 3, rel=1e-12)  # 1 − mean(p) would be 5/12


# ---------------------------------------------------------------- cost

def vectorised_reference(name, pos, ious, neg, w, delta, tau=TAU):
    """The same definitions as the loop references, each sum over the negatives one vector
    operation per positive: every primary term caused by a negative is coef(i) · w_j H(x_ij)."""
    num_pos = len(pos)
    pos_l, ious_l = pos.tolist(), ious.tolist()

    def h(x):  # in place
        return x.mul_(1 / (2 * delta)).add_(0.5).clamp_(0, 1)

    buf = torch.empty_like(neg)
    nfp = [float(torch.dot(w, h(torch.sub(neg, s, out=buf)))) for s in pos_l]
    rank_plus, _, _, _ = ref_ranks(pos_l, [], [], delta)
    rank = [rp + n for rp, n in zip(rank_plus, nfp)]
    prec = [rp / r for rp, r in zip(rank_plus, rank)]
    if name == "ap":
        pbar = [max(prec[k] for k in range(num_pos) if pos_l[k] <= pos_l[i]) for i in range(num_pos)]
        coef = [(1.0 if prec[i] == pbar[i] else (1 - pbar[i]) / (1 - prec[i])) / rank[i] for i in range(num_pos)]
        value, extra = 1 - sum(pbar) / num_pos, [0.0] * num_pos
    elif name == "alrp":
        err = [(1 - u) / (1 - tau) for u in ious_l]
        others = [sum(err[k] * step(pos_l[k] - pos_l[i], delta) for k in range(num_pos) if k != i)
                  for i in range(num_pos)]
        coef = [0.0 if nfp[i] == 0 else (nfp[i] + others[i]) / rank[i] / nfp[i] for i in range(num_pos)]
        value = sum((nfp[i] + err[i] + others[i]) / rank[i] for i in range(num_pos)) / num_pos
        extra = [0.0] * num_pos
    else:
        ref = ref_rs(pos_l, ious_l, [], [], delta)  # the sorting part does not involve negatives
        coef = [0.0 if nfp[i] == 0 else 1 / rank[i] for i in range(num_pos)]
        value = sum(nfp[i] / rank[i] for i in range(num_pos)) / num_pos + ref["terms"][1]
        extra = ref["sort_gpos"]
    gpos = [-coef[i] * nfp[i] / num_pos + extra[i] for i in range(num_pos)]
    gneg, buf = torch.zeros_like(neg), torch.empty_like(neg)
    for i in range(num_pos):
        gneg.add_(h(torch.sub(neg, pos_l[i], out=buf)), alpha=coef[i])
    return value, torch.tensor(gpos, dtype=torch.float64), gneg * w / num_pos


@pytest.mark.parametrize("name", LOSSES)
def test_vectorised_reference_matches_loop_reference(name):
    pos, ious, neg, w = random_case(1400, 17, 50, 0.5)
    ref = reference(name, pos, ious, neg, w, 0.5)
    value, gpos, gneg = vectorised_reference(name, t64(pos), t64(ious), t64(neg), t64(w), 0.5)
    assert value == pytest.approx(ref["value"], rel=1e-12)
    assert_close(gpos, ref["gpos"])
    assert_close(gneg, ref["gneg"])


@pytest.mark.parametrize("name", LOSSES)
def test_two_million_negatives_without_a_pairwise_tensor(name):
    """P = 50, M = 2,000,000 (a P x M float64 tensor would be 800 MB): no operator output larger
    than a few (P + M) elements, backward included; peak resident memory grows by less than
    500 MB; value and every update match the reference summed one positive at a time."""
    num_pos, num_neg, delta = 50, 2_000_000, 0.5
    g = torch.Generator().manual_seed(1500)
    pos = torch.rand(num_pos, generator=g, dtype=torch.float64) * 4 + 2.5  # from ~12,000 negatives above to none
    neg = torch.randn(num_neg, generator=g, dtype=torch.float64)
    ious = torch.rand(num_pos, generator=g, dtype=torch.float64)
    w = (torch.rand(num_neg, generator=g) < 0.8).double()
    pos_t, neg_t = pos.clone().requires_grad_(), neg.clone().requires_grad_()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with LargestTensor() as largest:
        loss = call(name, pos_t, ious, neg_t, w, delta)
        loss.backward()
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert 0 < largest.numel <= 8 * (num_pos + num_neg)
    assert grown_mb < 500
    value, gpos, gneg = vectorised_reference(name, pos, ious, neg, w, delta)
    assert loss.item() == pytest.approx(value, rel=1e-9)
    torch.testing.assert_close(pos_t.grad, gpos, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(neg_t.grad, gneg, rtol=1e-8, atol=1e-13)
    assert gneg.abs().max() > 1e-6
