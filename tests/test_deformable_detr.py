"""Deformable DETR: state-dict compatibility with the released checkpoints, forward shapes and
masks, the transformer's geometry against its formulas, the focal criterion, matcher and
top-k post-processor against hand references, DAP on the sigmoid head, and main.py end to end."""
import math
import os

import pytest
import torch
from test_detr import expected_detr_state_dict
from test_matcher import brute_force_min, random_boxes, reference_cost

import main as detr_main
from models import build_model
from models.backbone import Backbone
from models.dap_functional import differentiable_ap_terms
from models.deformable_detr import SetCriterion
from models.deformable_transformer import DeformableTransformer, DeformableTransformerEncoder
from models.detections import gather_detections
from models.matcher import HungarianMatcher, focal_class_cost, matched_pairs
from models.postprocess import TopKPostProcess
from models.set_criterion import sigmoid_focal_loss
from util.checkpoint import load_checkpoint
from util.errors import UserInputError
from util.misc import NestedTensor, inverse_sigmoid

from conftest import DEFORMABLE_VARIANTS, TINY_DEFORMABLE_FLAGS, TINY_DETR_FLAGS, parse


def build(flags):
    return build_model(parse(flags))


def tiny(variant, *flags, levels=2):
    return build(TINY_DEFORMABLE_FLAGS + DEFORMABLE_VARIANTS[variant] + ["--num_feature_levels", str(levels), *flags])


# ----------------------------------------------------------------------------- state dict

def expected_deformable_state_dict(levels, refine=False, two_stage=False):
    """Key -> shape of a released Deformable DETR R50 checkpoint."""
    hidden, ffn, heads, points, layers, queries, classes = 256, 1024, 8, 4, 6, 300, 91
    sd = {k: v for k, v in expected_detr_state_dict(6).items() if k.startswith("backbone.0.")}

    def linear(prefix, out, inp):
        sd[f"{prefix}.weight"] = [out, inp]
        sd[f"{prefix}.bias"] = [out]

    def norms(prefix, n, dim=hidden):
        for k in range(1, n + 1):
            sd[f"{prefix}.norm{k}.weight"] = [dim]
            sd[f"{prefix}.norm{k}.bias"] = [dim]

    def deform_attn(prefix):
        linear(f"{prefix}.sampling_offsets", heads * levels * points * 2, hidden)
        linear(f"{prefix}.attention_weights", heads * levels * points, hidden)
        linear(f"{prefix}.value_proj", hidden, hidden)
        linear(f"{prefix}.output_proj", hidden, hidden)

    sd["transformer.level_embed"] = [levels, hidden]
    for n in range(layers):
        p = f"transformer.encoder.layers.{n}"
        deform_attn(f"{p}.self_attn")
        linear(f"{p}.linear1", ffn, hidden)
        linear(f"{p}.linear2", hidden, ffn)
        norms(p, 2)
    for n in range(layers):
        p = f"transformer.decoder.layers.{n}"
        deform_attn(f"{p}.cross_attn")
        sd[f"{p}.self_attn.in_proj_weight"] = [3 * hidden, hidden]
        sd[f"{p}.self_attn.in_proj_bias"] = [3 * hidden]
        linear(f"{p}.self_attn.out_proj", hidden, hidden)
        linear(f"{p}.linear1", ffn, hidden)
        linear(f"{p}.linear2", hidden, ffn)
        norms(p, 3)

    num_pred = layers + (1 if two_stage else 0)
    heads_at = [""] + (["transformer.decoder."] if refine else [])
    for prefix in heads_at:
        for n in range(num_pred):
            linear(f"{prefix}bbox_embed.{n}.layers.0", hidden, hidden)
            linear(f"{prefix}bbox_embed.{n}.layers.1", hidden, hidden)
            linear(f"{prefix}bbox_embed.{n}.layers.2", 4, hidden)
    for prefix in [""] + (["transformer.decoder."] if two_stage else []):
        for n in range(num_pred):
            linear(f"{prefix}class_embed.{n}", classes, hidden)

    if two_stage:
        linear("transformer.enc_output", hidden, hidden)
        sd["transformer.enc_output_norm.weight"] = sd["transformer.enc_output_norm.bias"] = [hidden]
        linear("transformer.pos_trans", 2 * hidden, 2 * hidden)
        sd["transformer.pos_trans_norm.weight"] = sd["transformer.pos_trans_norm.bias"] = [2 * hidden]
    else:
        linear("transformer.reference_points", 2, hidden)
        sd["query_embed.weight"] = [queries, 2 * hidden]

    convs = [(2048, 1)] if levels == 1 else [(512, 1), (1024, 1), (2048, 1)] + [(2048, 3)] + [(256, 3)] * (levels - 4)
    for n, (in_ch, k) in enumerate(convs):
        sd[f"input_proj.{n}.0.weight"] = [hidden, in_ch, k, k]
        sd[f"input_proj.{n}.0.bias"] = [hidden]
        sd[f"input_proj.{n}.1.weight"] = sd[f"input_proj.{n}.1.bias"] = [hidden]
    return sd


@pytest.mark.parametrize("variant,levels,millions", [
    ("single_scale", 1, 34), ("multi_scale", 4, 40), ("box_refine", 4, 41), ("two_stage", 4, 41)])
def test_state_dict_matches_released_checkpoints(variant, levels, millions):
    model, criterion, _ = build(["--model", "deformable_detr", "--device", "cpu", "--no_pretrained_backbone"]
                                + DEFORMABLE_VARIANTS[variant])
    actual = {k: list(v.shape) for k, v in model.state_dict().items()}
    expected = expected_deformable_state_dict(levels, refine=variant in ("box_refine", "two_stage"),
                                              two_stage=variant == "two_stage")
    assert sorted(set(actual) - set(expected)) == []
    assert sorted(set(expected) - set(actual)) == []
    assert {k: v for k, v in actual.items() if v != expected[k]} == {}
    # Unique parameters (shared heads count once), as the README's 34M / 40M / 41M.
    assert round(sum(p.numel() for p in model.parameters()) / 1e6) == millions
    assert list(criterion.state_dict()) == []  # no empty_weight: focal loss has no background class


def test_state_dict_with_dc5_and_five_levels():
    """DC5 keeps the keys; a fifth level adds a 3x3 conv from the previous projected level."""
    common = ["--model", "deformable_detr", "--device", "cpu", "--no_pretrained_backbone"]
    model, _, _ = build(common + ["--num_feature_levels", "1", "--dilation"])
    assert {k: list(v.shape) for k, v in model.state_dict().items()} == expected_deformable_state_dict(1)
    assert model.backbone.strides == [16]
    model, _, _ = build(common + ["--num_feature_levels", "5"])
    assert {k: list(v.shape) for k, v in model.state_dict().items()} == expected_deformable_state_dict(5)


# ----------------------------------------------------------------------------- backbone

@pytest.mark.parametrize("name,channels", [("resnet18", [128, 256, 512]), ("resnet50", [512, 1024, 2048])])
def test_backbone_returns_layer2_to_4_when_asked(name, channels):
    x = NestedTensor(torch.zeros(1, 3, 64, 96), torch.zeros(1, 64, 96, dtype=torch.bool))
    single = Backbone(name, train_backbone=False).eval()
    multi = Backbone(name, train_backbone=False, return_interm_layers=True).eval()
    assert (single.strides, single.num_channels) == ([32], channels[-1:])
    assert (multi.strides, multi.num_channels) == ([8, 16, 32], channels)
    assert list(multi.state_dict()) == list(single.state_dict())
    with torch.no_grad():
        out = multi(x)
        assert sorted(out) == ["0", "1", "2"]
        assert [tuple(out[k].tensors.shape) for k in "012"] == [(1, c, 64 // s, 96 // s)
                                                              for c, s in zip(channels, [8, 16, 32])]
        assert torch.equal(out["2"].tensors, single(x)["0"].tensors)


def test_deformable_uses_pixel_centre_sine_offset():
    detr_model, _, _ = build(TINY_DETR_FLAGS + ["--num_classes", "5"])
    deformable_model, _, _ = tiny("multi_scale")
    assert detr_model.backbone[1].offset == 0.0 and deformable_model.backbone[1].offset == -0.5


# ----------------------------------------------------------------------------- model

@pytest.mark.parametrize("variant,levels", [("single_scale", 1), ("multi_scale", 5), ("box_refine", 2),
                                            ("two_stage", 4)])
def test_forward_shapes_heads_and_padding(variant, levels):
    torch.manual_seed(0)
    model, _, _ = tiny(variant, levels=levels)
    model.eval()
    refine, two_stage = variant in ("box_refine", "two_stage"), variant == "two_stage"

    # Heads: one per decoder layer (+1 two-stage), shared unless refining; the decoder sees them.
    assert len(model.class_embed) == len(model.bbox_embed) == 2 + two_stage
    assert (model.class_embed[0] is model.class_embed[1]) == (not refine)
    assert (model.transformer.decoder.bbox_embed is model.bbox_embed) == refine
    assert (model.transformer.decoder.class_embed is model.class_embed) == two_stage
    assert torch.allclose(model.class_embed[1].bias, torch.full((5,), -math.log(99)))
    assert torch.equal(model.bbox_embed[1].layers[2].weight, torch.zeros(4, 32))
    # w/h bias -2 only where the reference is a point (layer 0 or no refinement); 0 for two-stage.
    wh_bias = 0.0 if two_stage else -2.0
    assert torch.equal(model.bbox_embed[0].layers[2].bias, torch.tensor([0, 0, wh_bias, wh_bias]))
    assert torch.equal(model.bbox_embed[1].layers[2].bias[2:], torch.full((2,), 0.0 if refine else -2.0))
    # Backbone levels are the last min(levels, 3) of resnet18's layer2-4; extra levels chain 3x3 convs.
    convs = [proj[0] for proj in model.input_proj]
    expected_in = {1: [512], 2: [256, 512], 4: [128, 256, 512, 512], 5: [128, 256, 512, 512, 32]}[levels]
    assert [c.in_channels for c in convs] == expected_in
    assert [c.kernel_size[0] for c in convs] == [1] * min(levels, 3) + [3] * (levels - min(levels, 3))

    big, small = torch.randn(3, 160, 160), torch.randn(3, 96, 64)
    captured = {}
    model.transformer.register_forward_hook(lambda module, args, output: captured.update(out=output))
    with torch.no_grad():
        out = model([big, small])
        transformer_out = captured["out"]
        alone = model([big])
    assert out["pred_logits"].shape == (2, 10, 5) and out["pred_boxes"].shape == (2, 10, 4)
    assert ((out["pred_boxes"] > 0) & (out["pred_boxes"] < 1)).all()
    assert [tuple(a["pred_logits"].shape) for a in out["aux_outputs"]] == [(2, 10, 5)]
    assert [tuple(a["pred_boxes"].shape) for a in out["aux_outputs"]] == [(2, 10, 4)]
    if two_stage:  # one proposal per token: 160 px at strides 8, 16, 32, then 3x3 from the extra conv
        assert out["enc_outputs"]["pred_logits"].shape == (2, 20 ** 2 + 10 ** 2 + 5 ** 2 + 3 ** 2, 5)
        assert out["enc_outputs"]["pred_boxes"].shape == (2, 534, 4)
    else:
        assert "enc_outputs" not in out

    # Boxes are offsets from the references in logit space; refined references are the boxes.
    hs, init_reference, inter_references = transformer_out[:3]
    assert init_reference.shape == (2, 10, 4 if two_stage else 2)
    boxes = [a["pred_boxes"] for a in out["aux_outputs"]] + [out["pred_boxes"]]
    for lvl, layer_boxes in enumerate(boxes):
        reference = inverse_sigmoid(init_reference if lvl == 0 else inter_references[lvl - 1])
        with torch.no_grad():
            delta = model.bbox_embed[lvl](hs[lvl])
        delta[..., :reference.shape[-1]] += reference
        torch.testing.assert_close(layer_boxes, delta.sigmoid())
        if refine:
            torch.testing.assert_close(inter_references[lvl], layer_boxes)
        else:
            assert torch.equal(inter_references[lvl], init_reference)

    # The unpadded image gives the same detections alone and next to a smaller, padded one.
    torch.testing.assert_close(out["pred_logits"][0], alone["pred_logits"][0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out["pred_boxes"][0], alone["pred_boxes"][0], atol=1e-5, rtol=1e-4)


def test_training_step_reaches_every_trainable_parameter():
    torch.manual_seed(0)
    model, criterion, _ = tiny("two_stage", levels=4)
    images = [torch.randn(3, 96, 96), torch.randn(3, 64, 96)]
    targets = [{"labels": torch.tensor([1, 3]), "boxes": torch.tensor([[0.5, 0.5, 0.4, 0.3], [0.2, 0.3, 0.2, 0.2]])},
               {"labels": torch.tensor([4]), "boxes": torch.tensor([[0.6, 0.4, 0.3, 0.5]])}]
    losses = criterion(model(images), targets)
    sum(losses[k] * w for k, w in criterion.weight_dict.items()).backward()
    no_grad = {n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.any())}
    # Everything, the encoder-proposal heads and pos_trans included, except what sits behind a
    # zero-initialised layer at the first step (upstream's init): the box MLPs' hidden layers
    # (last layer 0) and the level embedding (only in the queries of MSDeformAttn, whose
    # sampling_offsets and attention_weights have weight 0).
    behind_zero = {n for n, _ in model.named_parameters()
                   if "bbox_embed" in n and (".layers.0." in n or ".layers.1." in n)}
    assert behind_zero and no_grad == behind_zero | {"transformer.level_embed"}


def test_drop_class_head_covers_both_two_stage_registrations():
    """A COCO two-stage checkpoint fine-tunes on another --num_classes with the head dropped."""
    from util.checkpoint import fit_state_dict
    source = tiny("two_stage", "--num_classes", "7")[0]
    target = tiny("two_stage", "--num_classes", "4")[0]
    with pytest.raises(UserInputError, match="transformer.decoder.class_embed"):
        fit_state_dict(target, source.state_dict(), drop_prefixes=("class_embed.",))
    fit_state_dict(target, source.state_dict(), drop_prefixes=target.class_head_prefixes)
    assert torch.equal(target.transformer.level_embed, source.transformer.level_embed)
    assert target.class_embed[0].weight.shape[0] == 4


def test_bad_deformable_flags_are_user_errors():
    with pytest.raises(UserInputError, match="--with_box_refine"):
        build(TINY_DEFORMABLE_FLAGS + ["--two_stage"])
    with pytest.raises(UserInputError, match="--pre_norm"):
        build(TINY_DEFORMABLE_FLAGS + ["--pre_norm"])
    args = parse(TINY_DEFORMABLE_FLAGS)
    args.model = "yolo"
    with pytest.raises(UserInputError, match="deformable_detr"):
        build_model(args)


# ----------------------------------------------------------------------------- transformer geometry

def test_valid_ratios_and_encoder_reference_points():
    masks = [torch.zeros(2, 4, 6, dtype=torch.bool), torch.zeros(2, 2, 3, dtype=torch.bool)]
    masks[0][1, 3:, :] = True  # image 1: 3 of 4 rows, 4 of 6 columns valid
    masks[0][1, :, 4:] = True
    masks[1][1, :, 2:] = True  # 2 of 2 rows, 2 of 3 columns
    ratios = torch.stack([DeformableTransformer.get_valid_ratio(m) for m in masks], 1)
    assert torch.allclose(ratios, torch.tensor([[[1, 1], [1, 1]], [[4 / 6, 3 / 4], [2 / 3, 1.0]]]))

    shapes = torch.tensor([[4, 6], [2, 3]])
    ref = DeformableTransformerEncoder.get_reference_points(shapes.tolist(), ratios, "cpu")
    assert ref.shape == (2, 24 + 6, 2, 2)
    for b in range(2):
        token = 0
        for lvl, (h, w) in enumerate(shapes.tolist()):
            for i in range(h):
                for j in range(w):
                    # Centre relative to the valid part of its own level, then into level l's padded frame.
                    x = (j + 0.5) / (ratios[b, lvl, 0] * w)
                    y = (i + 0.5) / (ratios[b, lvl, 1] * h)
                    for target in range(2):
                        expected = torch.stack([x * ratios[b, target, 0], y * ratios[b, target, 1]])
                        assert torch.allclose(ref[b, token, target], expected, atol=1e-6)
                    token += 1


def test_encoder_proposals_and_their_position_embedding():
    torch.manual_seed(0)
    transformer = DeformableTransformer(d_model=16, nhead=2, num_encoder_layers=1, num_decoder_layers=1,
                                        dim_feedforward=16, num_feature_levels=2, two_stage=True)
    shapes = torch.tensor([[5, 4], [3, 2]])
    mask = torch.zeros(1, 5 * 4 + 3 * 2, dtype=torch.bool)
    mask[0, :20].view(5, 4)[:, 3:] = True  # level 0: 3 valid columns of 4
    memory = torch.randn(1, 26, 16)
    output_memory, proposals = transformer.gen_encoder_output_proposals(memory, mask, shapes.tolist())

    token = 0
    for lvl, ((h, w), valid_w) in enumerate(zip(shapes.tolist(), [3, 2])):
        for i in range(h):
            for j in range(w):
                box = [(j + 0.5) / valid_w, (i + 0.5) / h, 0.05 * 2 ** lvl, 0.05 * 2 ** lvl]
                if mask[0, token] or not all(0.01 < v < 0.99 for v in box):
                    assert torch.isinf(proposals[0, token]).all()
                    expected_memory = transformer.enc_output_norm(transformer.enc_output(torch.zeros(16)))
                else:
                    assert torch.allclose(proposals[0, token], torch.logit(torch.tensor(box)), atol=1e-5)
                    expected_memory = transformer.enc_output_norm(transformer.enc_output(memory[0, token]))
                assert torch.allclose(output_memory[0, token], expected_memory, atol=1e-5)
                token += 1

    boxes = torch.randn(1, 3, 4)
    embed = transformer.get_proposal_pos_embed(boxes)
    assert embed.shape == (1, 3, 32)
    for q in range(3):
        for coord in range(4):
            for k in range(8):
                angle = torch.sigmoid(boxes[0, q, coord]) * 2 * math.pi / 10000 ** (2 * (k // 2) / 8)
                value = torch.sin(angle) if k % 2 == 0 else torch.cos(angle)
                assert torch.isclose(embed[0, q, coord * 8 + k], value, atol=1e-6)


# ----------------------------------------------------------------------------- focal loss, matcher, post-process

def focal_reference(logits, onehot, alpha=0.25, gamma=2.0):
    """Sum over every (image, query, class) of the focal loss, with Python floats."""
    total = 0.0
    for x, t in zip(logits.flatten().tolist(), onehot.flatten().tolist()):
        p = 1 / (1 + math.exp(-x))
        ce = -(t * math.log(p) + (1 - t) * math.log(1 - p))
        p_t = p * t + (1 - p) * (1 - t)
        total += ce * (1 - p_t) ** gamma * (alpha * t + (1 - alpha) * (1 - t))
    return total


class FixedMatcher:
    def __init__(self, indices):
        self.indices = [(torch.tensor(s), torch.tensor(t)) for s, t in indices]
        self.seen_labels = []

    def __call__(self, outputs, targets):
        self.seen_labels.append([t["labels"].tolist() for t in targets])
        return self.indices


def test_focal_loss_and_enc_outputs_against_hand_reference():
    g = torch.Generator().manual_seed(0)
    targets = [{"labels": torch.tensor([3, 1]), "boxes": torch.tensor([[.5, .5, .2, .4], [.3, .6, .2, .2]])},
               {"labels": torch.tensor([2]), "boxes": torch.tensor([[.4, .4, .3, .1]])}]
    indices = [([2, 0], [0, 1]), ([1], [0])]

    def layer():
        return {"pred_logits": torch.randn(2, 4, 5, generator=g) * 2,
                "pred_boxes": torch.rand(2, 4, 4, generator=g) * 0.3 + 0.2}
    outputs = {**layer(), "enc_outputs": layer()}
    matcher = FixedMatcher(indices)
    criterion = SetCriterion(5, matcher, {}, losses=["labels", "boxes"], focal_alpha=0.3)
    losses = criterion(outputs, targets)

    def onehot(labels):
        t = torch.zeros(2, 4, 5)
        for b, (src, tgt) in enumerate(indices):
            for q, j in zip(src, tgt):
                t[b, q, labels[b][j]] = 1
        return t
    labels = [t["labels"].tolist() for t in targets]
    assert losses["loss_ce"].item() == pytest.approx(focal_reference(outputs["pred_logits"], onehot(labels), 0.3) / 3,
                                                     rel=1e-5)
    # Encoder proposals: the same queries, but every target is class 0.
    assert matcher.seen_labels == [labels, [[0, 0], [0]]]
    enc = outputs["enc_outputs"]["pred_logits"]
    assert losses["loss_ce_enc"].item() == pytest.approx(focal_reference(enc, onehot([[0, 0], [0]]), 0.3) / 3,
                                                         rel=1e-5)
    assert set(losses) == {"loss_ce", "class_error", "loss_bbox", "loss_giou",
                           "loss_ce_enc", "loss_bbox_enc", "loss_giou_enc"}
    # class_error: argmax over the sigmoid logits of the matched queries.
    hits = [outputs["pred_logits"][b, q].argmax().item() == labels[b][j]
            for b, (src, tgt) in enumerate(indices) for q, j in zip(src, tgt)]
    assert losses["class_error"].item() == pytest.approx(100 - 100 * sum(hits) / 3)
    # alpha < 0 switches the class weighting off.
    x, t = outputs["pred_logits"], onehot(labels)
    unweighted = sigmoid_focal_loss(x, t, 1.0, alpha=-1) * 4
    assert unweighted.item() == pytest.approx(
        focal_reference(x, t, alpha=0.5) * 2, rel=1e-5)


def test_focal_class_cost_against_formula():
    logits = torch.tensor([[-3.0, 0.0, 2.5], [1.0, -1.0, 0.3]])
    cost = focal_class_cost(logits, torch.tensor([2, 0, 2]))
    for q in range(2):
        for t, c in enumerate([2, 0, 2]):
            p = 1 / (1 + math.exp(-logits[q, c].item()))
            pos = 0.25 * (1 - p) ** 2 * -math.log(p + 1e-8)
            neg = 0.75 * p ** 2 * -math.log(1 - p + 1e-8)
            assert cost[q, t].item() == pytest.approx(pos - neg, rel=1e-5, abs=1e-7)


@pytest.mark.parametrize("seed", range(4))
def test_focal_matcher_is_optimal(seed):
    g = torch.Generator().manual_seed(seed)
    num_queries, sizes = 5, [3, 0, 5]
    outputs = {"pred_logits": torch.randn(3, num_queries, 4, generator=g) * 2,
               "pred_boxes": torch.stack([random_boxes(num_queries, g) for _ in sizes])}
    targets = [{"labels": torch.randint(0, 4, (n,), generator=g), "boxes": random_boxes(n, g)} for n in sizes]
    indices = HungarianMatcher(2, 5, 2, focal=True)(outputs, targets)
    for b, ((src, tgt), target) in enumerate(zip(indices, targets)):
        n = len(target["labels"])
        assert len(src) == len(tgt) == min(num_queries, n)
        if n == 0:
            continue
        box_cost = reference_cost(outputs["pred_logits"][b], outputs["pred_boxes"][b], target["labels"],
                                  target["boxes"], 0, 5, 2)
        class_cost = focal_class_cost(outputs["pred_logits"][b], target["labels"]).tolist()
        cost = [[box_cost[q][t] + 2 * class_cost[q][t] for t in range(n)] for q in range(num_queries)]
        chosen = sum(cost[q][t] for q, t in zip(src.tolist(), tgt.tolist()))
        assert chosen == pytest.approx(brute_force_min(cost, num_queries, n), abs=1e-5)


@pytest.mark.parametrize("num_select", [10, 100])
def test_postprocess_top_k_against_brute_force(num_select):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 7, 5, generator=g)
    boxes = torch.rand(2, 7, 4, generator=g) * 0.4 + 0.1
    sizes = torch.tensor([[100, 200], [50, 80]])
    results = TopKPostProcess(num_select)({"pred_logits": logits, "pred_boxes": boxes}, sizes)
    for b, r in enumerate(results):
        pairs = sorted(((logits[b, q, c].sigmoid().item(), q, c) for q in range(7) for c in range(5)), reverse=True)
        pairs = pairs[:num_select]
        assert len(r["scores"]) == len(pairs) == min(num_select, 35)
        assert r["scores"].tolist() == pytest.approx([s for s, _, _ in pairs])
        assert r["labels"].tolist() == [c for _, _, c in pairs]
        h, w = sizes[b].tolist()
        for box, (_, q, _) in zip(r["boxes"], pairs):
            cx, cy, bw, bh = boxes[b, q].tolist()
            assert box.tolist() == pytest.approx([(cx - bw / 2) * w, (cy - bh / 2) * h,
                                                  (cx + bw / 2) * w, (cy + bh / 2) * h], rel=1e-5)


# ----------------------------------------------------------------------------- DAP on the sigmoid head

def test_dap_on_every_layer_and_the_encoder_proposals():
    torch.manual_seed(0)
    model, criterion, _ = tiny("two_stage", "--loss", "dap", "--matcher", "dap", "--dap_neg_topk", "7",
                               "--dap_loss_coef", "3")
    model.eval()  # no dropout: the targets below are copies of the predictions
    assert criterion.batch_loss.activation == "sigmoid" and criterion.batch_loss.neg_topk == 7
    assert criterion.matcher.activation == "sigmoid"
    assert criterion.weight_dict == {"loss_dap": 3, "loss_dap_0": 3, "loss_dap_enc": 3}
    images = [torch.randn(3, 96, 96), torch.randn(3, 64, 96)]
    # L̂'s slope in the IoU is the precision at the next IoU threshold, 0 until some positive
    # reaches it (and these scores all sit at the 0.01 prior, so they get no gradient). Each
    # output thus gets a ground truth at IoU 0.97 (> 0.95) from one of its own boxes: final
    # layer, auxiliary layer, encoder proposal.
    with torch.no_grad():
        boxes = model(images)
    near = torch.stack([boxes["pred_boxes"][0, 0], boxes["aux_outputs"][0]["pred_boxes"][0, 1],
                        boxes["enc_outputs"]["pred_boxes"][0, 0], boxes["pred_boxes"][1, 0]])
    near[:, 0] += 0.015 * near[:, 2]
    targets = [{"labels": torch.tensor([1, 3, 2]), "boxes": near[:3]}, {"labels": torch.tensor([4]), "boxes": near[3:]}]
    outputs = model(images)
    losses = criterion(outputs, targets)
    assert set(losses) == {"loss_dap", "loss_dap_0", "loss_dap_enc", "dap_value", "dap_precision",
                           "cardinality_error", "cardinality_error_0", "cardinality_error_enc"}

    binary = [{**t, "labels": torch.zeros_like(t["labels"])} for t in targets]
    layers = [("loss_dap", outputs, targets), ("loss_dap_0", outputs["aux_outputs"][0], targets),
              ("loss_dap_enc", outputs["enc_outputs"], binary)]
    for key, layer, layer_targets in layers:
        indices = criterion.matcher(layer, layer_targets)
        detections = gather_detections(layer, matched_pairs(layer_targets, indices), "sigmoid", 7)
        terms = differentiable_ap_terms(*detections, num_gt=256)
        torch.testing.assert_close(losses[key], -terms.dap)
        assert losses[key] < 0

    sum(losses[k] * w for k, w in criterion.weight_dict.items()).backward()
    # Each output's loss reaches its own box head (refinement: one per layer, the references
    # in between are detached; index 2 makes the encoder proposals).
    for head in model.bbox_embed:
        assert head.layers[2].weight.grad.abs().sum() > 0
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)

    # raw+dap: the upstream terms, _enc included, next to the DAP ones.
    _, both, _ = tiny("two_stage", "--loss", "raw+dap")
    raw = {f"{k}{s}": w for k, w in (("loss_ce", 2), ("loss_bbox", 5), ("loss_giou", 2)) for s in ("", "_0", "_enc")}
    assert both.weight_dict == {**raw, "loss_dap": 1, "loss_dap_0": 1, "loss_dap_enc": 1}


# ----------------------------------------------------------------------------- main.py end to end

@pytest.mark.parametrize("variant,flags", [
    ("box_refine", []),
    ("two_stage", ["--loss", "dap", "--matcher", "dap", "--dap_cost_mode", "momentum"]),
])
def test_train_checkpoint_resume_eval(variant, flags, synthetic_coco, tmp_path):
    path, num_classes = synthetic_coco
    common = (TINY_DEFORMABLE_FLAGS + DEFORMABLE_VARIANTS[variant] + flags
              + ["--num_feature_levels", "2", "--coco_path", path, "--num_classes", str(num_classes)])

    def run(*extra):
        args = parse(common + list(extra))
        os.makedirs(args.output_dir, exist_ok=True)
        return detr_main.main(args)

    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    last = run("--output_dir", str(straight), "--epochs", "2")
    assert len(last["test_coco_eval_bbox"]) == 12 and last["epoch"] == 1
    logged = {"train_loss_dap", "train_loss_dap_0", "train_loss_dap_enc"} if flags else \
        {"train_loss_ce", "train_loss_ce_0", "train_loss_bbox", "train_class_error"}
    assert logged <= set(last)
    ckpt = load_checkpoint(str(straight / "checkpoint.pth"))
    # Three optimizer groups: the rest, the backbone, the sampling offsets and reference points at lr / 10.
    assert [group["lr"] for group in ckpt["optimizer"]["param_groups"]] == pytest.approx([2e-4, 2e-5, 2e-5])

    run("--output_dir", str(interrupted), "--epochs", "1")
    run("--output_dir", str(interrupted), "--epochs", "2", "--resume", str(interrupted / "checkpoint.pth"))
    resumed = load_checkpoint(str(interrupted / "checkpoint.pth"))
    for name, value in ckpt["model"].items():
        assert torch.equal(value, resumed["model"][name]), name
    for name, value in ckpt["matcher"].items():
        assert torch.equal(value, resumed["matcher"][name]), name

    stats = run("--output_dir", str(tmp_path / "eval"), "--eval", "--resume", str(straight / "checkpoint.pth"))
    assert stats["coco_eval_bbox"] == pytest.approx(last["test_coco_eval_bbox"], abs=1e-9)


def test_amp_trains_two_stage_with_dap(synthetic_coco):
    # bfloat16 autocast on the CPU: the PyTorch deformable-attention path, the two-stage
    # proposals and the encoder's DAP term all run under it.
    path, num_classes = synthetic_coco
    stats = detr_main.main(parse(TINY_DEFORMABLE_FLAGS + DEFORMABLE_VARIANTS["two_stage"] + [
        "--loss", "raw+dap", "--amp", "--epochs", "1", "--num_feature_levels", "2",
        "--coco_path", path, "--num_classes", str(num_classes)]))
    assert math.isfinite(stats["train_loss"]) and "train_loss_dap_enc" in stats
    assert len(stats["test_coco_eval_bbox"]) == 12
