"""models/rank_criterion.py, the ranking losses on a detector's outputs (docs/LOSSES.md, section 2):
the losses of a layer against the functional core on DAP's detections in log-odds, the gradient
scaling of a share of the step, RS Loss's self-balanced GIoU term, and tiny detectors trained
end to end. One process against two, and accumulation, are in tests/test_dap_distributed.py."""
import argparse
import json
import os

import pytest
import torch
from test_dap_criterion import random_layer
from test_dap_training import make_big_box_coco

import main as detr_main
from models.detections import BatchLossLayer, gather_detections
from models.matcher import matched_pairs
from models.rank_criterion import RankingLoss, SelfBalance, scaled_gradient
from models.rank_losses import alrp_loss_terms, ap_loss, rank_sort_loss_terms
from models.set_criterion import StepContext
from util import box_ops

from conftest import TINY_DEFORMABLE_FLAGS, TINY_DETR_FLAGS, TINY_RTDETR_FLAGS


def leaves_of(outputs):
    return [t.requires_grad_() for t in outputs.values()]


@pytest.mark.parametrize("activation,num_logits", [("softmax", 5), ("sigmoid", 4)])
@pytest.mark.parametrize("shares", [1, 3])
def test_ap_loss_of_a_layer_is_ap_loss_of_its_detections(activation, num_logits, shares):
    outputs, targets, indices = random_layer(1, num_logits=num_logits)
    pairs = matched_pairs(targets, indices)
    leaves = leaves_of(outputs)
    result = RankingLoss("ap", activation=activation, neg_topk=7)(
        [BatchLossLayer("", outputs, indices, pairs, final=True)], {"shares": shares}, StepContext.single(targets))[""]
    pos, _, neg, weights = gather_detections(outputs, pairs, activation, 7, log_odds=True)
    expected = ap_loss(pos, neg, weights)
    torch.testing.assert_close(result.losses["loss_ap"], expected.to(result.losses["loss_ap"].dtype))
    # Each share of the step back-propagates into its own detections only: its gradient counts
    # `shares` times (the engine and DDP divide by the number of shares).
    got = torch.autograd.grad(result.losses["loss_ap"], leaves, allow_unused=True)
    want = torch.autograd.grad(expected * shares, leaves, allow_unused=True)
    for g, w in zip(got, want):
        if w is None:
            assert g is None or not g.any()
        else:
            torch.testing.assert_close(g, w)
    assert result.precision is None and result.logged == {}


def test_scaled_gradient_keeps_the_value_and_multiplies_the_gradient():
    x = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
    y = scaled_gradient(x ** 2, 4)
    assert y.item() == pytest.approx(0.49, rel=1e-15)
    y.backward()
    assert x.grad.item() == pytest.approx(4 * 1.4, rel=1e-15)


@pytest.mark.parametrize("activation,num_logits", [("softmax", 5), ("sigmoid", 4)])
def test_rs_giou_term_is_as_large_as_rs_loss_and_trains_the_boxes(activation, num_logits):
    outputs, targets, indices = random_layer(2, num_logits=num_logits)
    pairs = matched_pairs(targets, indices)
    leaves_of(outputs)
    result = RankingLoss("rs", activation=activation, neg_topk=7)(
        [BatchLossLayer("", outputs, indices, pairs, final=True)], {"shares": 1}, StepContext.single(targets))[""]
    pos, ious, neg, weights = gather_detections(outputs, pairs, activation, 7, log_odds=True)
    terms = rank_sort_loss_terms(pos, ious, neg, weights)
    torch.testing.assert_close(result.losses["loss_rs"], (terms.ranking + terms.sorting).float())
    # lambda = L_RS / L_GIoU (a constant): the term's value equals RS Loss's ...
    torch.testing.assert_close(result.losses["loss_rs_giou"], result.losses["loss_rs"])
    # ... and its gradient is lambda times that of the mean GIoU loss of the matched boxes.
    matched = [(b, int(q), t) for b, (qs, ts) in enumerate(indices) for q, t in zip(qs, ts)]
    giou = torch.stack([box_ops.paired_generalized_box_iou(
        box_ops.box_cxcywh_to_xyxy(outputs["pred_boxes"][b, q].float()),
        box_ops.box_cxcywh_to_xyxy(targets[b]["boxes"][t].float())) for b, q, t in matched])
    mean_loss = (1 - giou).mean()
    weight = result.losses["loss_rs"].detach() / mean_loss.detach()
    got = torch.autograd.grad(result.losses["loss_rs_giou"], outputs["pred_boxes"])[0]
    want = torch.autograd.grad(weight * mean_loss, outputs["pred_boxes"])[0]
    torch.testing.assert_close(got, want)


def test_self_balance_weight_is_last_epochs_ratio_and_survives_a_state_round_trip():
    def step(balance, epoch, cls, loc):
        balance.start(epoch)
        weight = balance.weight.item()  # what the step trains with
        balance.record(torch.tensor(cls), torch.tensor(loc))
        return weight

    balance = SelfBalance()
    # epoch 0 (means 0.5 and 0.2) trains with the paper's start
    assert [step(balance, 0, cls, loc) for cls, loc in [(0.6, 0.2), (0.4, 0.2)]] == [50.0, 50.0]
    assert step(balance, 1, 0.3, 0.1) == pytest.approx((0.5 + 0.2) / 0.2)
    restored = SelfBalance()
    restored.load_state_dict(balance.state_dict())  # e.g. a mid-epoch checkpoint
    assert restored.epoch == 1 and torch.equal(restored.sums, balance.sums)
    assert step(restored, 1, 0.5, 0.3) == pytest.approx((0.5 + 0.2) / 0.2)  # same epoch: unchanged
    assert step(restored, 2, 0.5, 0.0) == pytest.approx((0.3 + 0.1 + 0.5 + 0.3) / (0.1 + 0.3))
    assert step(restored, 3, 0.5, 0.0) == pytest.approx((0.3 + 0.1 + 0.5 + 0.3) / (0.1 + 0.3))  # no error: kept


@pytest.mark.parametrize("activation,num_logits", [("softmax", 5), ("sigmoid", 4)])
def test_alrp_terms_of_a_layer_and_the_weighted_localisation(activation, num_logits):
    outputs, targets, indices = random_layer(3, num_logits=num_logits)
    pairs = matched_pairs(targets, indices)
    leaves_of(outputs)
    loss = RankingLoss("alrp", activation=activation, neg_topk=7)
    loss.balance.weight.fill_(4.0)
    result = loss([BatchLossLayer("", outputs, indices, pairs, final=True)], {"shares": 1},
                  StepContext.single(targets))[""]
    pos, ious, neg, weights = gather_detections(outputs, pairs, activation, 7, log_odds=True)
    terms = alrp_loss_terms(pos, ious, neg, weights)
    torch.testing.assert_close(result.losses["loss_alrp"], terms.classification.float())
    torch.testing.assert_close(result.losses["loss_alrp_loc"], 4 * terms.localisation.float())
    assert result.logged["alrp_sb_weight"].item() == 4.0
    got = torch.autograd.grad(result.losses["loss_alrp_loc"], outputs["pred_boxes"])[0]
    want = torch.autograd.grad(4 * terms.localisation, outputs["pred_boxes"])[0]
    torch.testing.assert_close(got, want.to(got.dtype))


def test_unknown_ranking_loss_is_refused():
    with pytest.raises(ValueError, match="unknown ranking loss"):
        RankingLoss("lrp", activation="softmax")


# ---------------------------------------------------------------- end to end

@pytest.fixture(scope="module")
def big_box_coco(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("big_box_coco"))
    make_big_box_coco(root)
    return root


@pytest.mark.parametrize("model_flags", [TINY_DETR_FLAGS, TINY_DEFORMABLE_FLAGS + ["--num_classes", "2"],
                                         TINY_RTDETR_FLAGS + ["--no_iou_aware_query_selection"]],
                         ids=["detr", "deformable_detr", "rtdetr"])
@pytest.mark.parametrize("loss", ["ap", "alrp", "rs"])
def test_tiny_detectors_train_with_a_ranking_loss(big_box_coco, tmp_path, model_flags, loss):
    out = str(tmp_path)
    argv = model_flags + ["--coco_path", big_box_coco, "--num_classes", "2", "--batch_size", "2",
                          "--no_train_augmentation", "--dropout", "0", "--lr", "1e-3", "--epochs", "6",
                          "--output_dir", out, "--loss", loss]
    detr_main.main(argparse.ArgumentParser(parents=[detr_main.get_args_parser()]).parse_args(argv))
    with open(os.path.join(out, "log.txt")) as f:
        log = [json.loads(line) for line in f]
    key = f"train_loss_{loss}"
    values = [row[key] for row in log]
    assert all(v == v and 0 <= v for v in values), values
    assert values[-1] < values[0], values
    assert "train_loss_ce" not in log[0] and "train_loss_vfl" not in log[0]
    if loss == "ap":
        assert "train_loss_giou" in log[0]
    elif loss == "rs":
        assert log[0]["train_loss_rs_giou"] == pytest.approx(values[0], rel=1e-5)
    else:
        # One step per epoch: epoch e + 1 trains with (L_cls + L_loc) / L_loc of epoch e's step.
        assert log[0]["train_alrp_sb_weight"] == 50
        for before, after in zip(log, log[1:]):
            localisation = before["train_loss_alrp_loc"] / before["train_alrp_sb_weight"]
            assert after["train_alrp_sb_weight"] == pytest.approx(
                (before["train_loss_alrp"] + localisation) / localisation, rel=1e-4)
    assert all(len(row["test_coco_eval_bbox"]) == 12 for row in log)
